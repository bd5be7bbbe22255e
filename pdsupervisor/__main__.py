"""`python -m pdsupervisor` is the `pdsupervisor` command."""

from pdsupervisor.cli.main import main

main()
