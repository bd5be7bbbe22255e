from pdsupervisor.proxy.cli import proxy

proxy(prog_name="python -m pdsupervisor.proxy")
