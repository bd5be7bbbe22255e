"""`python -m pdsupervisor` is the `pdsupervisor` command."""

from pdsupervisor.cli import main

main()
