"""The `pdsupervisor` command: one module per command group. Nothing imports this package."""
