"""An attacker on loopback against (a) a cluster set up as an operator would, with the defaults
plus the PKI and a token, and (b) `pdsupervisor demo`: every path that could make a node run
something is tried, and each must be refused with no file written and the cluster unchanged.

(a) `TestSecureCluster`: `pdsupervisor pki init`, a token file (0600), agents with `etcd_tls`
and `rest.token_file` listening where the defaults put them (every interface), node1's agent
running the embedded etcd over TLS; node3 also has `allowed_commands`. The cluster is started
with `pdsupervisor start --token-file ... --wait`. Then:

- REST: hostile specs (an engine argv that touches a canary) without a credential, with a wrong
  one, as a browser would send them, in the wrong content type; process logs without a
  credential; oversized and deeply nested bodies, bad query integers, CR/LF in the path; bad
  spec values (NaN, a huge lease TTL, ...) with the right token;
- etcd: a plaintext client, TLS without a client certificate, a client certificate of another
  CA (one that copies the cluster CA's name), the peer port: each tries to put an assignment;
- hostile assignments written with the admin certificate (a compromised writer, which also
  takes the leader key so that the coordinator does not repair them): each is refused by the
  node, said in its status and an event, and the good processes of the assignment keep running;
- secrets: an engine env value from `{file:}` reaches the engine and nowhere else (etcd, the
  open REST reads, any process's argv).

"Unchanged" is read through the store with the admin certificate: the spec record's
generation and mod revision and every assignment's mod revision, before and after each probe.

(b) `TestDemo`: the demo's documented mode is loopback without credentials, so its probes are
the browser and DNS-rebinding paths (foreign `Origin`, non-loopback `Host`), its etcd without
the demo's certificates, what listens where, and its private state dir. It runs on the demo's
fixed ports (etcd 2379, agents 8470-8472, ...), as tests/e2e/test_demo.py does: one at a time.

Bad specs given to `pdsupervisor plan -f` exit 2 naming the field and write nothing.

Every process a fixture starts carries a marker in its environment: teardown kills the whole
family (engines, etcd, anything a hostile probe might have started), whatever the outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import re
import secrets
import socket
import ssl
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil
import pytest
import yaml

from pdsupervisor.api.client import DEFAULT_API
from pdsupervisor.core import pki
from pdsupervisor.core.models import FileSpec, NodeAssignment, Probe, ProcessSpec
from pdsupervisor.local.cluster import LocalAgent, LocalCluster
from pdsupervisor.local.ports import free_port
from pdsupervisor.store.etcd import Store
from pdsupervisor.store.gateway import b64
from pdsupervisor.store.transport import client_ssl_context
from tests.agent_helpers import marked
from tests.certs import TestCA
from tests.cluster_helpers import cluster_spec, demo_phase, running_demo
from tests.conftest import wait_for

pytestmark = pytest.mark.slow

TTL = 5
NODES = {"node1": "127.0.0.1", "node2": "127.0.0.2", "node3": "127.0.0.3"}
HOSTILE_NODE = "node3"  # the node with allowed_commands, where the hostile assignments go
SECRET_ENV = "PD_ATTACK_SECRET"
DEEP = 100_000  # nesting levels of the deeply nested bodies (the limit is 32)


# ---- HTTP as an attacker writes it: every header chosen, nothing added -------------------------


@dataclass
class Answer:
    status: int
    body: Any  # the JSON document, or the text

    @property
    def fields(self) -> list[str]:
        """The fields the error body names (`problems[].field`)."""
        problems = self.body.get("problems") if isinstance(self.body, dict) else None
        return [p["field"] for p in problems or []]


def call(base: str, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
         timeout: float = 20) -> Answer:
    """One request with exactly these headers (`Host` too, when given) on a fresh connection."""
    headers = dict(headers or {})
    u = urlsplit(base)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        conn.putrequest(method, path, skip_host="Host" in headers, skip_accept_encoding=True)
        for k, v in headers.items():
            conn.putheader(k, v)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders()
        if body is not None:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # refused before it read it all
                conn.send(body)
        resp = conn.getresponse()
        raw = resp.read()
        ctype = resp.getheader("Content-Type", "")
    finally:
        conn.close()
    if raw and ctype.startswith("application/json"):
        return Answer(resp.status, json.loads(raw))
    return Answer(resp.status, raw.decode(errors="replace"))


def call_chunked(base: str, path: str, chunks: Iterator[bytes], headers: dict[str, str]) -> Answer:
    """A POST whose body comes chunked, without a Content-Length to refuse it by."""
    u = urlsplit(base)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=20)
    try:
        conn.putrequest("POST", path, skip_accept_encoding=True)
        for k, v in {**headers, "Transfer-Encoding": "chunked"}.items():
            conn.putheader(k, v)
        conn.endheaders()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            for chunk in chunks:
                conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            conn.send(b"0\r\n\r\n")
        resp = conn.getresponse()
        raw = resp.read()
    finally:
        conn.close()
    return Answer(resp.status, json.loads(raw) if raw.startswith(b"{") else raw.decode(errors="replace"))


def raw_request(base: str, request: bytes) -> bytes:
    """Bytes on a socket, the first line of the answer back (CR/LF a client library would refuse)."""
    u = urlsplit(base)
    assert u.hostname and u.port
    with socket.create_connection((u.hostname, u.port), timeout=10) as s:
        s.sendall(request)
        data = b""
        while b"\r\n" not in data:
            more = s.recv(4096)
            if not more:
                break
            data += more
    return data.split(b"\r\n", 1)[0]


# ---- etcd as an attacker reaches it -------------------------------------------------------------


def etcd_put(url: str, key: str, value: bytes, tls: ssl.SSLContext | None) -> str:
    """Try to put a key through etcd's JSON gateway; what came back ("200" when it was written)."""
    req = urllib.request.Request(url + "/v3/kv/put", data=json.dumps({"key": b64(key), "value": b64(value)}).encode(),
                                 method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=5, context=tls) as resp:
            return str(resp.status)
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code}: {exc.read()[:200]!r}"
    except (urllib.error.URLError, OSError) as exc:
        return f"no connection: {exc}"


def etcd_range(url: str, key: str, tls: ssl.SSLContext | None) -> str:
    """A read through the same gateway: the positive control of `etcd_put`'s probes."""
    req = urllib.request.Request(url + "/v3/kv/range", data=json.dumps({"key": b64(key)}).encode(),
                                 method="POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5, context=tls) as resp:
        return str(resp.status)


def foreign_client(directory: Path, like_ca: Path, cn: str) -> ssl.SSLContext:
    """A client context with a certificate of another CA that copies the cluster CA's name,
    for a subject (`admin`) the cluster knows; it trusts the real CA, so only the server can
    say no."""
    from cryptography import x509

    real = x509.load_pem_x509_certificate(like_ca.read_bytes())
    name = real.subject.rfc4514_string().removeprefix("CN=")
    fake = TestCA(directory, name=name)
    issued = fake.issue("intruder", cn)
    return client_ssl_context(str(like_ca), str(issued.cert), str(issued.key))


def tls_files_context(d: Path) -> ssl.SSLContext:
    return client_ssl_context(str(d / pki.CA_CERT), str(d / pki.CLIENT_CERT), str(d / pki.CLIENT_KEY))


@dataclass
class EtcdView:
    """The cluster as the admin certificate reads it through the product's store."""

    endpoint: str
    cluster: str
    tls: ssl.SSLContext

    def run(self, fn: Callable[[Store], Any]) -> Any:
        """`fn(store)` on a fresh store with the admin certificate."""
        async def go() -> Any:
            async with Store([self.endpoint], self.cluster, tls=self.tls, timeout_s=5) as store:
                return await fn(store)
        return asyncio.run(go())

    def fingerprint(self) -> dict[str, int]:
        """What any accepted change of the cluster moves: the spec record's generation and mod
        revision, each assignment's mod revision."""
        async def read(store: Store) -> dict[str, int]:
            kvs, _ = await store.get_prefix(store.keys.root)
            out = {kv.key: kv.mod_revision for kv in kvs
                   if kv.key == store.keys.spec or kv.key.startswith(store.keys.assignments)}
            spec = next(kv for kv in kvs if kv.key == store.keys.spec)
            out["generation"] = json.loads(spec.value)["generation"]
            return out
        fp: dict[str, int] = self.run(read)
        assert sum(k.startswith(f"/pdsupervisor/{self.cluster}/assignments/") for k in fp) >= 3, fp
        return fp

    def get(self, key: str) -> bytes | None:
        kv = self.run(lambda s: s.get(key))
        return kv.value if kv else None

    def everything(self) -> list[tuple[str, bytes]]:
        """Every key and value in this etcd (not only the cluster's)."""
        kvs, _ = self.run(lambda s: s.get_prefix("/"))
        return [(kv.key, kv.value) for kv in kvs]

    def status(self, node: str) -> dict[str, dict[str, Any]]:
        st = self.run(lambda s: s.get(s.keys.node_status(node)))
        return {p["name"]: p for p in json.loads(st.value)["processes"]} if st else {}

    def assignment_raw(self, node: str) -> bytes:
        value = self.get(f"/pdsupervisor/{self.cluster}/assignments/{node}")
        assert value, f"no assignment for {node}"
        return value


# ---- (a) a cluster as an operator sets it up -----------------------------------------------------


@dataclass
class OperatorCluster(LocalCluster):
    """The product's local cluster, configured as the README's operator guide says: a token
    (`token=True`: a 0600 file in each agent's config, so the REST API listens on every
    interface, the default with a credential) and `allowed_commands` where given."""

    allowed_commands: dict[str, list[str]] = field(default_factory=dict)

    def config(self, agent: LocalAgent) -> dict[str, object]:
        doc = super().config(agent)
        if agent.name in self.allowed_commands:
            doc["allowed_commands"] = self.allowed_commands[agent.name]
        return doc

    def argv(self, agent: LocalAgent) -> list[str]:
        argv = super().argv(agent)
        i = argv.index("--listen")
        argv[i + 1] = f":{agent.api_port}"  # the default host: 0.0.0.0 with a credential
        return argv


@dataclass
class Secure:
    lc: OperatorCluster
    tmp: Path
    token: str
    spec: dict[str, Any]
    etcd: EtcdView
    canaries: Path
    secret: str

    @property
    def api(self) -> str:
        return self.lc.agents[0].api_url

    def agent(self, name: str) -> LocalAgent:
        return next(a for a in self.lc.agents if a.name == name)

    def get(self, path: str, via: str = "node1") -> Any:
        answer = call(self.agent(via).api_url, "GET", path)
        assert answer.status == 200, (path, answer)
        return answer.body

    def hostile_doc(self, canary: Path) -> dict[str, Any]:
        """The running spec with the prefill engine's argv turned into a command."""
        doc = json.loads(json.dumps(self.spec))
        doc["prefill"]["argv"] = ["/bin/sh", "-c", f"touch {canary}"]
        return doc

    def hostile_spec(self, canary: Path) -> bytes:
        return yaml.safe_dump(self.hostile_doc(canary)).encode()

    def ready_pids(self, node: str) -> dict[str, int]:
        return {p["name"]: p["pid"] for p in self.get("/status", via=node)["processes"] if p["state"] == "ready"}


@pytest.fixture(scope="class")
def secure(tmp_path_factory) -> Iterator[Secure]:
    tmp = tmp_path_factory.mktemp("attack")
    root = tmp / "cluster"
    canaries = tmp / "canaries"
    canaries.mkdir()
    name = f"attack-{uuid.uuid4().hex[:8]}"
    lc = OperatorCluster(cluster=name, root=root, etcd_port=free_port(), etcd_peer_port=free_port(),
                         api_base_port=free_port(span=len(NODES)), ttl=TTL, tls=True,
                         token=True, allowed_commands={HOSTILE_NODE: [sys.executable]})
    assert [(a.name, a.ip) for a in lc.agents] == list(NODES.items())
    try:
        # the PKI, as the README's operator guide makes it
        nodes = [arg for n, ip in NODES.items() for arg in ("--node", f"{n}={ip}")]
        out = subprocess.run([sys.executable, "-m", "pdsupervisor", "pki", "init", str(lc.pki_dir), *nodes],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
        secret = f"pdsecret-{secrets.token_hex(16)}"
        secret_file = tmp / "hf_token"
        secret_file.write_text(secret + "\n")
        secret_file.chmod(0o600)

        asyncio.run(lc.boot(90))
        token = lc.token_file.read_text().strip()
        spec = cluster_spec(name, f"127.0.0.1:{lc.etcd_port}", decode_nodes=["node2", "node3"], ttl=TTL)
        spec["prefill"]["node_names"] = ["node1"]
        spec["etcd"] = {"bootstrap_node": "node1", "client_port": lc.etcd_port, "peer_port": lc.etcd_peer_port}
        spec["engine_env"][SECRET_ENV] = {"file": str(secret_file)}
        spec_file = tmp / "cluster.yaml"
        spec_file.write_text(yaml.safe_dump(spec))
        out = subprocess.run([sys.executable, "-m", "pdsupervisor", "start", "-f", str(spec_file), "--api",
                              lc.agents[0].api_url, "--token-file", str(lc.token_file), "--wait", "--timeout", "120"],
                             capture_output=True, text=True, timeout=150)
        assert out.returncode == 0, out.stdout + out.stderr + "\n".join(
            a.log_path.read_text(errors="replace")[-2000:] for a in lc.agents)
        etcd = EtcdView(lc.etcd_endpoint, name, tls_files_context(lc.pki_dir / pki.client_dir(pki.ADMIN)))
        yield Secure(lc, tmp, token, spec, etcd, canaries, secret)
    finally:
        lc.stop_agents(timeout=5)
        lc.kill_all(grace_s=3)
        assert lc.processes() == [], "processes of the cluster left behind"


# The probes of the REST API: (id, method, path, headers, body kind, expected status, field named).
# Body kinds: "hostile" (a spec whose prefill argv touches the canary), "none".
TOKEN = "<token>"  # replaced by the cluster's token
RIGHT = {"Authorization": f"Bearer {TOKEN}"}
YAML = {"Content-Type": "application/yaml"}
EVIL = "http://attacker.example"
START = "/cluster/start?replace=true"
REST_PROBES = [
    ("start, no credential", "POST", START, YAML, "hostile", 401, "Authorization"),
    ("start, wrong token", "POST", START, {**YAML, "Authorization": "Bearer " + "0" * 64}, "hostile", 401,
     "Authorization"),
    ("start, token as Basic", "POST", START, {**YAML, "Authorization": f"Basic {TOKEN}"}, "hostile", 401,
     "Authorization"),
    ("start, token in the query", "POST", f"{START}&token={TOKEN}", YAML, "hostile", 401, "Authorization"),
    ("start, token upper-cased", "POST", START, {**YAML, "Authorization": f"Bearer {TOKEN.upper()}"}, "hostile", 401,
     "Authorization"),
    ("start, right token as text/plain", "POST", START,
     {"Content-Type": "text/plain", "authorization": f"bearer {TOKEN}"}, "hostile", 415, "Content-Type"),
    ("start, right token, form-encoded", "POST", START,
     {**RIGHT, "Content-Type": "application/x-www-form-urlencoded"}, "hostile", 415, "Content-Type"),
    ("start, right token, no content type", "POST", START, RIGHT, "hostile", 415, "Content-Type"),
    ("start, right token, foreign Origin", "POST", START, {**YAML, **RIGHT, "Origin": EVIL}, "hostile", 403, "Origin"),
    ("start, right token, Origin null", "POST", START, {**YAML, **RIGHT, "Origin": "null"}, "hostile", 403, "Origin"),
    ("start, browser simple request", "POST", START, {"Content-Type": "text/plain", "Origin": EVIL}, "hostile", 401,
     "Authorization"),
    ("stop, no credential", "POST", "/cluster/stop", {}, "none", 401, "Authorization"),
    ("stop, wrong token", "POST", "/cluster/stop", {"Authorization": "Bearer nope"}, "none", 401, "Authorization"),
    ("stop, right token, foreign Origin", "POST", "/cluster/stop", {**RIGHT, "Origin": EVIL}, "none", 403, "Origin"),
    ("PUT start, no credential", "PUT", START, YAML, "hostile", 401, "Authorization"),
    ("logs, no credential", "GET", "/logs/prefill-0", {}, "none", 401, "Authorization"),
    ("logs, wrong token", "GET", "/logs/prefill-0", {"Authorization": "Bearer nope"}, "none", 401, "Authorization"),
    ("logs HEAD, no credential", "HEAD", "/logs/prefill-0", {}, "none", 401, None),
    ("logs, right token, foreign Origin", "GET", "/logs/prefill-0", {**RIGHT, "Origin": EVIL}, "none", 403, "Origin"),
    ("logs, right token, another loopback Origin", "GET", "/logs/prefill-0",
     {**RIGHT, "Origin": "http://127.0.0.1:8888"}, "none", 403, "Origin"),
    ("logs, right token, a path out of logs/", "GET", "/logs/..%2F..%2F..%2Fetc%2Fpasswd", RIGHT, "none", 404, None),
    ("logs, right token, tail too big", "GET", "/logs/prefill-0?tail=100000000000000000000", RIGHT, "none", 400, "tail"),
    ("logs, right token, tail negative", "GET", "/logs/prefill-0?tail=-1", RIGHT, "none", 400, "tail"),
    ("events, limit 2^63", "GET", "/events?limit=9223372036854775808", {}, "none", 400, "limit"),
    ("events, limit 0", "GET", "/events?limit=0", {}, "none", 400, "limit"),
    ("events, limit not a number", "GET", "/events?limit=1e3", {}, "none", 400, "limit"),
    ("CR LF in the path, encoded", "POST", "/cluster/stop%0D%0AX-Injected:%201", RIGHT, "none", 400, "path"),
    ("NUL in the query", "GET", "/events?limit=5%00", {}, "none", 400, "query"),
]


def _headers(h: dict[str, str], token: str) -> dict[str, str]:
    return {k: v.replace(TOKEN, token).replace(TOKEN.upper(), token.upper()) for k, v in h.items()}


# Bad spec values, each with the field its refusal must name: POSTed with the right token,
# and given to `pdsupervisor plan -f`.
def _nan(doc: dict[str, Any]) -> str:
    doc["policy"]["restart"]["initial_backoff_s"] = float("nan")
    return "policy.restart.initial_backoff_s"


def _inf(doc: dict[str, Any]) -> str:
    doc["prefill"]["readiness"]["period_s"] = float("inf")
    return "prefill.readiness.period_s"


def _huge_ttl(doc: dict[str, Any]) -> str:
    doc["policy"]["lease_ttl_s"] = 1_000_000_000_000
    return "policy.lease_ttl_s"


def _nul_argv(doc: dict[str, Any]) -> str:
    doc["decode"]["argv"] = [*doc["decode"]["argv"], "x\0y"]
    return "decode.argv"


def _equals_env(doc: dict[str, Any]) -> str:
    doc["engine_env"]["LD_PRELOAD=/tmp/x.so;A"] = "1"
    return "engine_env"


def _crlf_probe(doc: dict[str, Any]) -> str:
    doc["decode"]["readiness"]["path"] = "/health HTTP/1.1\r\nX-Injected: 1\r\n\r\nGET /"
    return "decode.readiness.path"


def _too_big(doc: dict[str, Any]) -> str:
    # 256 engines on one node, each with 8 KB of argv: that node's assignment would not fit in etcd
    doc["decode"]["slots"] = doc["decode"]["tp"] * 256
    doc["decode"]["argv"] = [*doc["decode"]["argv"], *["--pad", "p" * 2000] * 4]
    return "decode"


BAD_VALUES = {"NaN": _nan, "inf": _inf, "huge lease_ttl_s": _huge_ttl, "NUL in argv": _nul_argv,
              "= in an env name": _equals_env, "CR LF in readiness.path": _crlf_probe,
              "assignments too big for etcd": _too_big}


def _nested(depth: int) -> str:
    return "cluster: x\nengine_env:\n  DEEP: " + "[" * depth + "]" * depth + "\n"


def _dump_spec(doc: dict[str, Any]) -> bytes:
    """YAML as a user writes it (`.nan`, `.inf`; NUL and CR LF escaped in double quotes)."""
    return yaml.safe_dump(doc, allow_unicode=False).encode()


class TestSecureCluster:
    """Everything an attacker on loopback can reach of a cluster set up as the README says."""

    def test_the_cluster_is_ready_and_secured_as_configured(self, secure):
        doc = secure.get("/cluster")
        assert doc["phase"] == "ready" and doc["generation"] == 1
        assert {p["node"] for p in doc["processes"]} == set(NODES)
        # the REST API listens on every interface (the default with a token), etcd on loopback
        # only, and both need a credential: what the probes below rely on
        listening = {(c.laddr.ip, c.laddr.port) for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN}
        assert all(("0.0.0.0", a.api_port) in listening for a in secure.lc.agents), listening
        assert ("127.0.0.1", secure.lc.etcd_port) in listening
        assert not any(port == secure.lc.etcd_port and ip != "127.0.0.1" for ip, port in listening)
        assert stat.S_IMODE((secure.lc.pki_dir / pki.CA_KEY).stat().st_mode) == 0o600

    @pytest.mark.parametrize("probe", REST_PROBES, ids=[p[0] for p in REST_PROBES])
    def test_rest_probe_is_refused(self, secure, probe):
        what, method, path, headers, body_kind, status, field_named = probe
        canary = secure.canaries / ("rest-" + "".join(c if c.isalnum() else "-" for c in what))
        body = secure.hostile_spec(canary) if body_kind == "hostile" else None
        before = secure.etcd.fingerprint()
        for via in ("node1", "node3"):  # the bootstrap node's agent and another's
            t0 = time.monotonic()
            answer = call(secure.agent(via).api_url, method, path.replace(TOKEN, secure.token), body,
                          _headers(headers, secure.token))
            assert answer.status == status, (via, answer)
            assert time.monotonic() - t0 < 5, f"{what}: answered after {time.monotonic() - t0:.1f}s"
            if field_named and method != "HEAD":
                assert field_named in answer.fields, answer.body
            assert not canary.exists()
        assert secure.etcd.fingerprint() == before

    def test_an_oversized_body_is_refused_before_it_is_read(self, secure):
        canary = secure.canaries / "oversized"
        hostile = secure.hostile_spec(canary)
        body = hostile + b"#" + b"x" * (2 * 1024 * 1024) + b"\n"  # a valid spec, padded with a comment
        before = secure.etcd.fingerprint()
        headers = {**YAML, "Authorization": f"Bearer {secure.token}"}
        answer = call(secure.api, "POST", START, body, headers)
        assert answer.status == 413 and answer.fields == ["body"], answer

        def chunks() -> Iterator[bytes]:  # no Content-Length: refused at the limit while reading
            yield hostile + b"#"
            for _ in range(40):
                yield b"x" * 65536
            yield b"\n"

        answer = call_chunked(secure.api, START, chunks(), headers)
        assert answer.status == 413, answer
        assert not canary.exists() and secure.etcd.fingerprint() == before

    @pytest.mark.parametrize("kind", ["yaml", "json"])
    def test_a_deeply_nested_body_is_refused_fast(self, secure, kind):
        text = _nested(DEEP) if kind == "yaml" else '{"cluster": "x", "engine_env": {"DEEP": ' + "[" * DEEP + "]" * DEEP + "}}"
        before = secure.etcd.fingerprint()
        t0 = time.monotonic()
        answer = call(secure.api, "POST", START, text.encode(),
                      {"Content-Type": f"application/{kind}", "Authorization": f"Bearer {secure.token}"})
        assert answer.status == 400 and "spec" in answer.fields, answer
        assert time.monotonic() - t0 < 3, f"answered after {time.monotonic() - t0:.1f}s"
        assert secure.etcd.fingerprint() == before
        assert call(secure.api, "GET", "/healthz").status == 200  # and the agent is still there

    @pytest.mark.parametrize("bad", list(BAD_VALUES), ids=list(BAD_VALUES))
    def test_a_bad_spec_value_with_the_right_token_is_refused_naming_it(self, secure, bad):
        canary = secure.canaries / f"bad-{bad.replace(' ', '-')}"
        doc = secure.hostile_doc(canary)
        field_named = BAD_VALUES[bad](doc)
        before = secure.etcd.fingerprint()
        answer = call(secure.api, "POST", START, _dump_spec(doc), {**YAML, "Authorization": f"Bearer {secure.token}"})
        assert answer.status == 400, answer
        assert any(f == field_named or f.startswith(field_named + ".") or f.startswith(field_named + "[")
                   for f in answer.fields), answer.body
        assert not canary.exists() and secure.etcd.fingerprint() == before

    @pytest.mark.parametrize("line", [
        b"POST /cluster/stop\r\nX-Injected: 1 HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n",
        b"POST /cluster/st\rop HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n",
        b"POST /cluster/stop\nAuthorization: Bearer x HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n",
    ], ids=["CR LF", "CR", "LF"])
    def test_raw_control_characters_in_the_request_line_are_refused(self, secure, line):
        before = secure.etcd.fingerprint()
        first = raw_request(secure.api, line)
        # a 400, or (aiohttp reads the line up to the CR/LF as an HTTP/0.9 request) a 401: never
        # a path holding the injected text
        assert re.fullmatch(rb"HTTP/[019.]+ 40[01] [A-Za-z ]+", first), first
        assert secure.etcd.fingerprint() == before

    # ---- etcd directly ----------------------------------------------------------------------

    @pytest.mark.parametrize("who", ["plaintext", "TLS without a client certificate",
                                     "a client certificate of another CA", "the peer port, no client certificate"])
    def test_etcd_refuses_a_client_without_the_cluster_certificate(self, secure, who):
        lc = secure.lc
        admin = lc.pki_dir / pki.client_dir(pki.ADMIN)
        key = f"/pdsupervisor/{lc.cluster}/assignments/intruder"
        hostile = NodeAssignment(node="intruder", processes=[ProcessSpec(
            name="x", role="decode", argv=["/bin/sh", "-c", f"touch {secure.canaries / 'etcd'}"])])
        url, tls = {
            "plaintext": (f"http://127.0.0.1:{lc.etcd_port}", None),
            "TLS without a client certificate": (lc.etcd_endpoint, client_ssl_context(str(admin / pki.CA_CERT))),
            "a client certificate of another CA": (
                lc.etcd_endpoint, foreign_client(secure.tmp / "other-ca", admin / pki.CA_CERT, pki.ADMIN)),
            "the peer port, no client certificate": (
                f"https://127.0.0.1:{lc.etcd_peer_port}", client_ssl_context(str(admin / pki.CA_CERT))),
        }[who]
        assert etcd_range(lc.etcd_endpoint, key, secure.etcd.tls) == "200"  # the admin's: the gateway answers
        before = secure.etcd.fingerprint()
        for target in (key, f"/pdsupervisor/{lc.cluster}/assignments/node1"):
            got = etcd_put(url, target, hostile.model_dump_json().encode(), tls)
            assert got != "200", f"{who}: put {target}: {got}"
        assert secure.etcd.get(key) is None
        assert secure.etcd.fingerprint() == before

    # ---- secrets ----------------------------------------------------------------------------

    def test_a_secret_from_a_file_reaches_the_engine_and_nothing_else(self, secure):
        secret = secure.secret.encode()
        engines = [p for p in secure.get("/cluster")["processes"] if p["role"] in ("prefill", "decode")]
        assert engines and all(p["pid"] for p in engines)
        for p in engines:  # where it must be: every engine's environment
            assert f"{SECRET_ENV}={secure.secret}".encode() in Path(f"/proc/{p['pid']}/environ").read_bytes().split(b"\0")
        kvs = secure.etcd.everything()
        assert sum(k.startswith(f"/pdsupervisor/{secure.lc.cluster}/") for k, _ in kvs) > 10
        assert [k for k, v in kvs if secret in v or secret in k.encode()] == []
        assert any(b"hf_token" in v for k, v in kvs if k.endswith("/spec"))  # the path, not the value
        for path in ("/cluster", "/nodes", "/events?limit=1000", "/status"):
            for a in secure.lc.agents:
                answer = call(a.api_url, "GET", path)
                assert answer.status == 200 and secure.secret not in json.dumps(answer.body), (a.name, path)
        for proc in secure.lc.processes():  # argv is world-readable
            with contextlib.suppress(psutil.NoSuchProcess):
                assert secure.secret not in " ".join(proc.cmdline()), proc

    # ---- hostile assignments written with valid etcd credentials ------------------------------

    @pytest.mark.parametrize("kind", ["setuid file outside the state dir", "setuid file inside the state dir",
                                      "../ in the process name", "file in the agent's procs/",
                                      "command outside allowed_commands", "NUL in argv", "= in an env name",
                                      "CR LF in the readiness path"])
    def test_a_hostile_assignment_is_refused_by_the_node(self, secure, hijacked, kind):
        node = secure.agent(HOSTILE_NODE)
        state = node.state_dir
        canary = secure.canaries / f"assign-{kind.split()[0].strip('./')}-{uuid.uuid4().hex[:6]}"
        touch = [sys.executable, "-c", "import sys; open(sys.argv[1], 'w').close()", str(canary)]
        outside = secure.tmp / "outside"
        also: list[Path] = []  # what the hostile process would have written besides the canary
        proc, expect = {
            "setuid file outside the state dir": (
                ProcessSpec(name="suid", role="decode", argv=touch,
                            files=[FileSpec(path=str(outside / "suid-sh"), content="#!/bin/sh\n", mode=0o4755)]),
                "files[0].mode 0o4755 has setuid, setgid or sticky bits"),
            "setuid file inside the state dir": (
                ProcessSpec(name="suid-in", role="decode", argv=touch,
                            files=[FileSpec(path=str(state / "suid-sh"), content="#!/bin/sh\n", mode=0o6755)]),
                "files[0].mode 0o6755 has setuid, setgid or sticky bits"),
            "../ in the process name": (
                ProcessSpec(name="../../../escaped", role="decode", argv=touch),
                "name ../../../escaped does not match"),
            "file in the agent's procs/": (
                ProcessSpec(name="forger", role="decode", argv=touch,
                            files=[FileSpec(path=str(state / "procs" / "decode-0.json"), content="{}")]),
                f"is in the agent's own directory {state}/procs"),
            "command outside allowed_commands": (
                ProcessSpec(name="shell", role="decode", argv=["/bin/sh", "-c", f"touch {canary}"]),
                "argv[0] /bin/sh matches none of allowed_commands"),
            "NUL in argv": (
                ProcessSpec(name="nul", role="decode", argv=[*touch, "a\0b"]), "argv[4] contains a NUL byte"),
            "CR LF in the readiness path": (
                ProcessSpec(name="probe", role="decode", argv=touch, readiness=Probe(
                    port=free_port(), path="/health HTTP/1.1\r\nX-Injected: 1\r\n\r\nGET /")),
                "readiness.path '/health HTTP/1.1\\r\\nX-Injected: 1\\r\\n\\r\\nGET /' is not a request path"),
            "= in an env name": (
                ProcessSpec(name="envname", role="decode", argv=touch, env={"LD_PRELOAD=/x.so;A": "1"}),
                "env name LD_PRELOAD=/x.so;A does not match"),
        }[kind]
        if kind == "setuid file outside the state dir":
            also.append(outside / "suid-sh")
        if kind == "setuid file inside the state dir":
            also.append(state / "suid-sh")
        if kind == "../ in the process name":  # its log and adoption record, resolved
            also += [Path(os.path.normpath(state / "logs" / "../../../escaped.log")),
                     Path(os.path.normpath(state / "procs" / "../../../escaped.json"))]
        original = secure.etcd.assignment_raw(HOSTILE_NODE)
        good = NodeAssignment.model_validate_json(original)
        pids = secure.ready_pids(HOSTILE_NODE)
        assert set(pids) == {p.name for p in good.processes}, pids
        recorded_procs = {p: p.read_bytes() for p in (state / "procs").iterdir()}
        t0 = time.time()
        hijacked.put_assignment(HOSTILE_NODE, good.model_copy(update={"processes": [*good.processes, proc]}))
        try:
            message = wait_for(lambda: _refused(secure.etcd.status(HOSTILE_NODE).get(proc.name)), 15,
                               what=f"{proc.name} refused in etcd's status of {HOSTILE_NODE}")
            assert expect in message, message
            local = {p["name"]: p for p in secure.get("/status", via=HOSTILE_NODE)["processes"]}
            assert _refused(local.get(proc.name)) == message
            assert local[proc.name]["pid"] is None and local[proc.name]["restarts"] == 0
            events = wait_for(lambda: [e for e in secure.get("/events?limit=1000")["events"]
                                       if e["kind"] == "refused" and e.get("process") == proc.name and e["ts"] >= t0],
                              10, what="the refused event")
            assert events[0]["node"] == HOSTILE_NODE and expect in events[0]["message"]
            # the good processes of the assignment run on, untouched
            assert secure.ready_pids(HOSTILE_NODE) == pids
            assert all(psutil.pid_exists(pid) for pid in pids.values())
        finally:
            hijacked.put_raw(HOSTILE_NODE, original)
        wait_for(lambda: set(secure.etcd.status(HOSTILE_NODE)) == set(pids), 15, what="the hostile process gone")
        assert not canary.exists()
        assert [p for p in also if p.exists()] == []
        assert {p: p.read_bytes() for p in (state / "procs").iterdir()} == recorded_procs
        assert secure.ready_pids(HOSTILE_NODE) == pids

    def test_nothing_hostile_ever_ran_and_the_cluster_is_as_it_was(self, secure):
        assert sorted(os.listdir(secure.canaries)) == []
        doc = secure.get("/cluster")
        assert doc["phase"] == "ready" and doc["generation"] == 1, doc
        spec = json.loads(secure.etcd.get(f"/pdsupervisor/{secure.lc.cluster}/spec") or b"{}")
        assert spec["spec"]["prefill"]["argv"] == secure.spec["prefill"]["argv"]
        audits = [e for e in secure.get("/events?limit=1000")["events"] if e["kind"] == "audit"]
        assert [e["caller"] for e in audits] == ["token"] and audits[0]["generation"] == 1  # the operator's start only


def _refused(p: dict[str, Any] | None) -> str | None:
    return p["message"] if p and p["state"] == "failed" and p["message"].startswith("refused: ") else None


@dataclass
class Hijack:
    """A compromised writer with the admin certificate that holds the leader key: the real
    coordinators are fenced out, so what it writes into an assignment stays there."""

    etcd: EtcdView
    lease: int = 0

    def put_raw(self, node: str, value: bytes) -> None:
        self.etcd.run(lambda s: s.put(s.keys.assignment(node), value))

    def put_assignment(self, node: str, assignment: NodeAssignment) -> None:
        self.put_raw(node, assignment.model_dump_json().encode())


@pytest.fixture
def hijacked(secure) -> Iterator[Hijack]:
    h = Hijack(secure.etcd)
    h.lease = secure.etcd.run(lambda s: s.grant_lease(600))
    secure.etcd.run(lambda s: s.put(s.keys.leader, b"attacker", h.lease))
    try:
        wait_for(lambda: secure.get("/cluster")["leader"] == "attacker", 10, what="the attacker holding the leader key")
        yield h
    finally:
        secure.etcd.run(lambda s: s.revoke_lease(h.lease))
        wait_for(lambda: secure.get("/cluster")["leader"] in NODES, 20, what="an agent leading again")


# ---- plan -f ------------------------------------------------------------------------------------


def _plan_spec() -> dict[str, Any]:
    spec = cluster_spec("planned", "127.0.0.1:2379", decode_nodes=["node2", "node3"])
    spec["prefill"]["node_names"] = ["node1"]
    return spec


PLAN_PROBES = {"deep nesting": None, **BAD_VALUES}


@pytest.mark.parametrize("bad", list(PLAN_PROBES), ids=list(PLAN_PROBES))
def test_plan_refuses_a_bad_spec_naming_the_field_and_writes_nothing(tmp_path, bad):
    work = tmp_path / "work"
    work.mkdir()
    canary = tmp_path / "canary"
    spec = work / "spec.yaml"
    if bad == "deep nesting":
        spec.write_text(_nested(DEEP))
        field_named = "spec"
    else:
        doc = _plan_spec()
        doc["prefill"]["argv"] = ["/bin/sh", "-c", f"touch {canary}"]
        field_named = BAD_VALUES[bad](doc)
        spec.write_bytes(_dump_spec(doc))
    nodes = [arg for n, ip in NODES.items() for arg in ("--node", f"{n}={ip},accelerators=512")]
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "pdsupervisor", "plan", "-f", str(spec), *nodes],
                         capture_output=True, text=True, timeout=60, cwd=work)
    assert out.returncode == 2, out.stdout + out.stderr
    assert time.monotonic() - t0 < 20
    assert "Traceback" not in out.stderr
    assert f"  {field_named}" in out.stderr, out.stderr
    assert sorted(os.listdir(work)) == ["spec.yaml"] and not canary.exists()


# ---- (b) the demo -------------------------------------------------------------------------------

DEMO_API = DEFAULT_API  # the demo's first agent


@dataclass
class Demo:
    proc: subprocess.Popen[bytes]
    state: Path
    marker: str
    out: Path
    etcd: EtcdView
    canaries: Path

    @property
    def pki(self) -> Path:
        return self.state / "run" / "pki"

    @property
    def auth(self) -> dict[str, str]:
        """The demo's own token (0600 in its private state dir): a probe carrying it isolates
        the check after authentication (Host, Origin, Content-Type, sizes)."""
        return {"Authorization": f"Bearer {(self.state / 'run' / 'token').read_text().strip()}"}

    def hostile_spec(self, canary: Path) -> bytes:
        from pdsupervisor.cli.demo import REPO_DEMO_SPEC

        doc = yaml.safe_load(REPO_DEMO_SPEC.read_text())
        doc["prefill"]["argv"] = ["/bin/sh", "-c", f"touch {canary}"]
        return yaml.safe_dump(doc).encode()


@pytest.fixture(scope="class")
def demo(tmp_path_factory) -> Iterator[Demo]:
    tmp = tmp_path_factory.mktemp("demo")
    state = tmp / "state"
    canaries = tmp / "canaries"
    canaries.mkdir()
    with running_demo(state, tmp / "demo.out") as run:
        proc = run.proc
        wait_for(lambda: proc.poll() is not None or demo_phase() == "ready", 120, 0.2, what="the demo ready")
        assert proc.poll() is None, run.out_path.read_text(errors="replace")
        admin = state / "run" / "pki" / pki.client_dir(pki.ADMIN)
        yield Demo(proc, state, run.marker, run.out_path, EtcdView("127.0.0.1:2379", "demo", tls_files_context(admin)),
                   canaries)


NO_TOKEN = {"Authorization": None}  # the probe goes without the demo's token

DEMO_PROBES = [
    # (id, method, path, headers, body kind, status, field); every probe carries the demo's
    # token unless its headers say NO_TOKEN
    ("start without the token", "POST", START, {**YAML, **NO_TOKEN}, "hostile", 401, "Authorization"),
    ("stop without the token", "POST", "/cluster/stop", NO_TOKEN, "none", 401, "Authorization"),
    ("logs without the token", "GET", "/logs/prefill-0", NO_TOKEN, "none", 401, "Authorization"),
    # a page that rebinds its own name to 127.0.0.1 has no token (its Host check guards agents
    # that run without one)
    ("start, DNS-rebinding Host", "POST", START, {**YAML, **NO_TOKEN, "Host": "attacker.example:8470"}, "hostile", 401,
     "Authorization"),
    ("start, Host under a loopback-looking name", "POST", START,
     {**YAML, **NO_TOKEN, "Host": "127.0.0.1.attacker.example"}, "hostile", 401, "Authorization"),
    ("start, foreign Origin", "POST", START, {**YAML, "Origin": EVIL}, "hostile", 403, "Origin"),
    ("start, Origin null", "POST", START, {**YAML, "Origin": "null"}, "hostile", 403, "Origin"),
    ("start, another loopback Origin", "POST", START, {**YAML, "Origin": "http://127.0.0.1:8888"}, "hostile", 403,
     "Origin"),
    ("start, browser simple request", "POST", START, {"Content-Type": "text/plain", "Origin": EVIL}, "hostile", 403,
     "Origin"),
    ("start, text/plain", "POST", START, {"Content-Type": "text/plain"}, "hostile", 415, "Content-Type"),
    ("start, form-encoded", "POST", START, {"Content-Type": "application/x-www-form-urlencoded"}, "hostile", 415,
     "Content-Type"),
    ("stop, DNS-rebinding Host", "POST", "/cluster/stop", {**NO_TOKEN, "Host": "attacker.example"}, "none", 401,
     "Authorization"),
    ("stop, foreign Origin", "POST", "/cluster/stop", {"Origin": EVIL}, "none", 403, "Origin"),
    ("logs, DNS-rebinding Host", "GET", "/logs/prefill-0", {**NO_TOKEN, "Host": "attacker.example:8470"}, "none", 401,
     "Authorization"),
    ("logs, foreign Origin", "GET", "/logs/prefill-0", {"Origin": EVIL}, "none", 403, "Origin"),
    ("CR LF in the path, encoded", "POST", "/cluster/stop%0D%0AX:%201", {}, "none", 400, "path"),
    ("events, limit 2^63", "GET", "/events?limit=9223372036854775808", {}, "none", 400, "limit"),
]


class TestDemo:
    """`pdsupervisor demo`: loopback only, a token for writes and logs; what a web page or another
    machine could try is refused, and so is etcd without the demo's certificates."""

    def test_the_demo_runs(self, demo):
        assert demo_phase() == "ready"
        assert demo.etcd.fingerprint()["generation"] == 1

    @pytest.mark.parametrize("probe", DEMO_PROBES, ids=[p[0] for p in DEMO_PROBES])
    def test_rest_probe_is_refused(self, demo, probe):
        what, method, path, headers, body_kind, status, field_named = probe
        canary = demo.canaries / "".join(c if c.isalnum() else "-" for c in what)
        body = demo.hostile_spec(canary) if body_kind == "hostile" else None
        before = demo.etcd.fingerprint()
        for i in (0, 2):  # node1's agent and node3's
            base = f"http://127.0.0.{i + 1}:{LocalCluster.api_base_port + i}"
            sent = {k: v for k, v in {**demo.auth, **headers}.items() if v is not None}
            answer = call(base, method, path, body, sent)
            assert answer.status == status and field_named in answer.fields, (base, answer)
        assert not canary.exists() and demo.etcd.fingerprint() == before

    def test_oversized_and_deep_bodies_are_refused(self, demo):
        canary = demo.canaries / "oversized"
        before = demo.etcd.fingerprint()
        answer = call(DEMO_API, "POST", START, demo.hostile_spec(canary) + b"#" + b"x" * (2 << 20) + b"\n",
                      {**YAML, **demo.auth})
        assert answer.status == 413 and answer.fields == ["body"], answer
        answer = call(DEMO_API, "POST", START, _nested(DEEP).encode(), {**YAML, **demo.auth})
        assert answer.status == 400 and "spec" in answer.fields, answer
        assert not canary.exists() and demo.etcd.fingerprint() == before

    @pytest.mark.parametrize("who", ["plaintext", "TLS without a client certificate", "a client certificate of another CA"])
    def test_etcd_refuses_a_client_without_the_demo_certificate(self, demo, who, tmp_path):
        admin = demo.pki / pki.client_dir(pki.ADMIN)
        url, tls = {
            "plaintext": ("http://127.0.0.1:2379", None),
            "TLS without a client certificate": ("https://127.0.0.1:2379", client_ssl_context(str(admin / pki.CA_CERT))),
            "a client certificate of another CA": (
                "https://127.0.0.1:2379", foreign_client(tmp_path / "other-ca", admin / pki.CA_CERT, pki.ADMIN)),
        }[who]
        key = "/pdsupervisor/demo/assignments/intruder"
        assert etcd_range("https://127.0.0.1:2379", key, demo.etcd.tls) == "200"
        before = demo.etcd.fingerprint()
        hostile = NodeAssignment(node="node1", processes=[ProcessSpec(
            name="x", role="decode", argv=["/bin/sh", "-c", f"touch {demo.canaries / 'etcd'}"])])
        for target in (key, "/pdsupervisor/demo/assignments/node1"):
            got = etcd_put(url, target, hostile.model_dump_json().encode(), tls)
            assert got != "200", f"{who}: put {target}: {got}"
        assert demo.etcd.get(key) is None and demo.etcd.fingerprint() == before

    def test_the_agents_and_etcd_listen_on_loopback_only(self, demo):
        def agent_or_etcd(p: psutil.Process) -> bool:
            with contextlib.suppress(psutil.Error):
                return p.name() == "etcd" or "agent.main" in p.cmdline()
            return False

        ours = [p for p in marked(demo.marker) if agent_or_etcd(p)]
        assert len(ours) == 4, ours  # three agents and etcd
        pids = {p.pid for p in ours}
        listening = [(c.pid, c.laddr.ip, c.laddr.port) for c in psutil.net_connections("inet")
                     if c.status == psutil.CONN_LISTEN and c.pid in pids]
        assert len(listening) >= 5, listening
        assert [x for x in listening if not (x[1].startswith("127.") or x[1] == "::1")] == []

    def test_the_state_dir_is_private(self, demo):
        def mode(p: Path) -> int:
            st = p.lstat()
            assert st.st_uid == os.geteuid() and not stat.S_ISLNK(st.st_mode), p
            return stat.S_IMODE(st.st_mode)

        assert mode(demo.state) == 0o700  # what is below is nobody else's to reach
        for d in [demo.state / "run" / n for n in NODES] + [demo.pki]:
            assert mode(d) == 0o700, d
        keys = sorted(demo.pki.rglob("*.key"))
        assert len(keys) == 1 + 2 * len(NODES) + 1, keys  # the CA, each node's server and client, admin
        assert {k: mode(k) for k in keys} == {k: 0o600 for k in keys}
        assert all(mode(d) == 0o700 for d in demo.pki.rglob("*") if d.is_dir())
        assert all(mode(demo.state / "run" / n / "agent.yaml") == 0o600 for n in NODES)
        # nothing in the state dir anyone else may write
        assert [p for p in demo.state.rglob("*") if not p.is_symlink() and mode(p) & 0o022] == []


    def test_nothing_hostile_ever_ran_and_the_demo_is_as_it_was(self, demo):
        assert sorted(os.listdir(demo.canaries)) == []
        assert demo_phase() == "ready" and demo.etcd.fingerprint()["generation"] == 1
        audits = [e for e in call(DEMO_API, "GET", "/events?limit=1000").body["events"] if e["kind"] == "audit"]
        assert [(e["caller"], e["generation"]) for e in audits] == [("token", 1)]  # the demo's own start only
