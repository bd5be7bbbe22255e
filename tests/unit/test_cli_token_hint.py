"""A 401's hint: how to pass the token, and the demo's token file when a demo made one here."""

from __future__ import annotations

from pdsupervisor.cli import cluster as cli_cluster


def test_a_401_hint_names_the_demo_token_file_only_when_a_demo_made_one(tmp_path, monkeypatch):
    token = tmp_path / "run" / "token"
    monkeypatch.setattr(cli_cluster, "DEMO_TOKEN_FILE", token)
    assert cli_cluster.token_hint() == cli_cluster.TOKEN_HINT
    token.parent.mkdir()
    token.write_text("t\n")
    assert cli_cluster.token_hint() == f"{cli_cluster.TOKEN_HINT}; the demo's: export PDSUPERVISOR_TOKEN_FILE={token}"
