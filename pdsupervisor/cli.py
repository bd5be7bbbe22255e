"""The `pdsupervisor` command: plan, cluster control, and the programs it ships."""

from __future__ import annotations

import click

from pdsupervisor import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pdsupervisor")
def main() -> None:
    """Supervise prefill/decode-disaggregated LLM serving."""


# Subcommands register below, one line each, from their own modules.
from pdsupervisor.simengine.cli import sim_engine  # noqa: E402
main.add_command(sim_engine)
from pdsupervisor.plan_command import plan_command  # noqa: E402

main.add_command(plan_command)
from pdsupervisor.proxy.cli import proxy  # noqa: E402
main.add_command(proxy)
from pdsupervisor.cluster_commands import (  # noqa: E402
    events_command,
    logs_command,
    start_command,
    status_command,
    stop_command,
)

for _command in (status_command, start_command, stop_command, events_command, logs_command):
    main.add_command(_command)
from pdsupervisor.demo import demo_command  # noqa: E402

main.add_command(demo_command)


if __name__ == "__main__":
    main()
