"""`pdsupervisor sim-engine` / `python -m pdsupervisor.simengine`: takes a vLLM command line.

vLLM's flags have no fixed arity we could declare to click, so the command takes its
arguments unprocessed and `config.parse_args` interprets them.
"""

from __future__ import annotations

import sys

import click

from pdsupervisor.host.logsetup import configure_logging
from pdsupervisor.simengine.config import ConfigError, parse_args
from pdsupervisor.simengine.dpgroup import DPGroupError
from pdsupervisor.simengine.kvstore import KVError
from pdsupervisor.simengine.server import serve

HELP = """Simulated vLLM OpenAI server. Takes vLLM's flags (--model, --host, --port, -tp,
--kv-transfer-config; others are ignored) plus --sim-load-time S, --sim-ttft-per-token S,
--sim-tpot S, --sim-max-batch N, --sim-natural-len N, --sim-prefix-cache-blocks N (blocks of 16
tokens; 0: no prefix cache). Reads MOONCAKE_CONFIG_PATH. With DP size > 1
(--data-parallel-size N --data-parallel-rank R --data-parallel-address IP --data-parallel-rpc-port P,
or else VLLM_DP_SIZE / _RANK / _MASTER_IP / _MASTER_PORT) it is one rank of a DP group: it serves
only once all ranks met at the master address, and for good not after one left. Real KV hand-off
through Mooncake Store (needs the mooncake package and MOONCAKE_CONFIG_PATH): --sim-kv-transfer
mooncake, --sim-kv-bytes-per-token N, --sim-kv-max-bytes N, --sim-kv-timeout S, and caps on the
JSON's sizes --sim-mooncake-segment-cap N, --sim-mooncake-buffer-cap N (sizes take k/m/g
suffixes). Every --sim-* flag may also be given in the environment as PDSIM_<NAME>
(--sim-max-batch: PDSIM_MAX_BATCH); a flag wins."""


def run(argv: list[str]) -> None:
    configure_logging("info")
    try:
        cfg = parse_args(argv)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc
    try:
        serve(cfg)
    except (KVError, DPGroupError) as exc:  # the store or the DP master could not be set up
        raise click.ClickException(str(exc)) from exc


@click.command(
    "sim-engine",
    help=HELP,
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": ["--help"]},
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def sim_engine(args: tuple[str, ...]) -> None:
    run(list(args))


if __name__ == "__main__":
    sim_engine(sys.argv[1:])
