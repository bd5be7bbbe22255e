from pdsupervisor.simengine.cli import sim_engine

sim_engine(prog_name="python -m pdsupervisor.simengine")
