"""The `pdsupervisor` command: plan, cluster control, and the programs it ships."""

from __future__ import annotations

import click

from pdsupervisor import __version__
from pdsupervisor.cli.cluster import events_command, logs_command, start_command, status_command, stop_command
from pdsupervisor.cli.demo import demo_command
from pdsupervisor.cli.doctor import doctor_command
from pdsupervisor.cli.etcd import etcd_group
from pdsupervisor.cli.nodes import nodes_command
from pdsupervisor.cli.pki import pki_group
from pdsupervisor.cli.plan import plan_command
from pdsupervisor.proxy.cli import proxy
from pdsupervisor.simengine.cli import sim_engine


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pdsupervisor")
def main() -> None:
    """Supervise prefill/decode-disaggregated LLM serving."""


for _command in (plan_command, start_command, status_command, stop_command, nodes_command, events_command,
                 logs_command, demo_command, doctor_command, pki_group, etcd_group, proxy, sim_engine):
    main.add_command(_command)
