"""Instance registry: who serves which role, how loaded each is, and who is ejected.

Scheduling follows the seed's proxy: prefill goes to the instance with the fewest prompt
tokens in flight, decode to the one with the fewest requests in flight (ties by tokens).
Round-robin is available instead, and `prefix` for prefill (prefix.py): the instance that
last got the longest prefix of the prompt, unless it is busier than the least loaded by more
than `prefix_slack` times that prefix's tokens (the prefill the cache saves): then, as when no
instance holds a prefix, by load; such an overflow does not move the prefix (a burst would
otherwise make the other instance the busy one, and cost the prefix again on each move).
Decode is routed by load under `prefix`. An ejected instance gets no traffic until the
prober sees its `/health` answer 200 again.

Each instance says where its membership comes from (`source`): `static` (the command line),
`cached` (the routing cache, until etcd answers), `agent` (its node's agent reports it ready)
or `last-known` (its agent is away: routed on the agent's last status while its assignment
still holds it, kept alive or dropped by the proxy's own probes).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pdsupervisor.proxy.prefix import DEFAULT_CAPACITY, TOKENS_PER_BLOCK, PrefixIndex, block_keys, prompt_text

ProxyRole = Literal["prefill", "decode"]
ROLES: tuple[ProxyRole, ProxyRole] = ("prefill", "decode")
Source = Literal["static", "cached", "agent", "last-known"]
Policy = Literal["load", "round-robin", "prefix"]
POLICIES: tuple[Policy, ...] = ("load", "round-robin", "prefix")
# `prefix`: how much busier (in-flight prompt tokens) than the least loaded instance the one
# holding a prompt's prefix may be, in multiples of that prefix's tokens, and still get it.
# Well above 1: the in-flight tokens of an instance serving cache hits overstate its work by
# their cached share, and passing it over costs the whole prefix again elsewhere.
PREFIX_SLACK = 8.0
PREFIX_OUTCOMES = ("hit", "busy", "miss")  # to the holder; holder over the bound; no holder


@dataclass(eq=False)
class Instance:
    endpoint: str  # host:port
    role: ProxyRole
    source: Source = "static"
    base_url: str = field(init=False)
    inflight: int = 0
    tokens: int = 0  # prompt tokens of the requests in flight
    total_tokens: int = 0  # accumulated since it joined: spreads load when all are idle
    served: int = 0  # exchanges answered successfully (failures and 4xx are not counted)
    failures: int = 0
    ejected_at: float | None = None  # monotonic
    ejected_reason: str = ""
    probe_misses: int = 0  # probes in a row that got no answer (timed out, or the connection dropped)

    def __post_init__(self) -> None:
        self.base_url = f"http://{self.endpoint}"

    @property
    def ejected(self) -> bool:
        return self.ejected_at is not None

    def view(self) -> dict[str, object]:
        return {
            "endpoint": self.endpoint, "role": self.role, "source": self.source, "inflight": self.inflight, "tokens": self.tokens,
            "served": self.served, "failures": self.failures, "ejected": self.ejected,
            "ejected_for_s": round(time.monotonic() - self.ejected_at, 3) if self.ejected_at is not None else None,
            "ejected_reason": self.ejected_reason,
        }


@dataclass
class Registry:
    policy: Policy = "load"
    prefix_slack: float = PREFIX_SLACK
    prefix_capacity: int = DEFAULT_CAPACITY  # keys remembered per role
    prefix_routed: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PREFIX_OUTCOMES, 0))
    _by_role: dict[str, dict[str, Instance]] = field(default_factory=lambda: {r: {} for r in ROLES})
    _rr: dict[str, itertools.count[int]] = field(default_factory=lambda: {r: itertools.count() for r in ROLES})
    _prefix: dict[str, PrefixIndex[Instance]] = field(default_factory=dict)

    def set_endpoints(self, role: ProxyRole, endpoints: Mapping[str, Source] | Iterable[str]) -> None:
        """Replace a role's membership (endpoints, with their source when a mapping, else
        `static`); instances that stay keep their load and ejection. An instance dropped is
        only forgotten: requests in flight to it run to their end."""
        current = self._by_role[role]
        wanted: dict[str, Source] = dict(endpoints) if isinstance(endpoints, Mapping) else dict.fromkeys(endpoints, "static")
        self._by_role[role] = {ep: current.get(ep) or Instance(endpoint=ep, role=role) for ep in wanted}
        for ep, inst in self._by_role[role].items():
            inst.source = wanted[ep]

    def instances(self, role: ProxyRole | None = None) -> list[Instance]:
        roles = ROLES if role is None else (role,)
        return [i for r in roles for i in self._by_role[r].values()]

    def holds(self, inst: Instance) -> bool:
        """`inst` is a member now (not one a membership change dropped)."""
        return self._by_role[inst.role].get(inst.endpoint) is inst

    def healthy(self, role: ProxyRole) -> list[Instance]:
        return [i for i in self._by_role[role].values() if i.ejected_at is None]

    def prompt_keys(self, body: dict[str, Any], chat: bool) -> list[int]:
        """What `pick` routes a prompt by under `prefix` (its block keys); none under the others."""
        return block_keys(prompt_text(body, chat)) if self.policy == "prefix" else []

    def pick(self, role: ProxyRole, exclude: set[Instance] | frozenset[Instance] = frozenset(),
             keys: Sequence[int] = ()) -> Instance | None:
        """The instance of `role` for the next request (`keys`: its prompt's, from `prompt_keys`)."""
        candidates = [i for i in self._by_role[role].values() if i.ejected_at is None and i not in exclude]
        if not candidates:
            return None
        if self.policy == "round-robin":
            return candidates[next(self._rr[role]) % len(candidates)]
        if role == "prefill":
            least = min(candidates, key=lambda i: (i.tokens, i.total_tokens))
        else:
            least = min(candidates, key=lambda i: (i.inflight, i.tokens, i.total_tokens))
        return self._by_prefix(role, candidates, least, keys) if keys else least

    def _by_prefix(self, role: ProxyRole, candidates: list[Instance], least: Instance, keys: Sequence[int]) -> Instance:
        index = self._prefix.get(role)
        if index is None:
            index = self._prefix[role] = PrefixIndex(self.prefix_capacity)
        holder, blocks = index.longest(keys, candidates)
        if holder is None:
            outcome, chosen = "miss", least
        elif holder.tokens - least.tokens <= self.prefix_slack * blocks * TOKENS_PER_BLOCK:
            outcome, chosen = "hit", holder
        else:
            outcome, chosen = "busy", least
        self.prefix_routed[outcome] += 1
        if outcome != "busy":  # an overflow leaves the prefix where it is: the holder still has it cached
            index.record(keys, chosen)
        return chosen

    @staticmethod
    def acquire(inst: Instance, tokens: int) -> None:
        inst.inflight += 1
        inst.tokens += tokens
        inst.total_tokens += tokens

    @staticmethod
    def release(inst: Instance, tokens: int) -> None:
        inst.inflight -= 1
        inst.tokens -= tokens

    @staticmethod
    def eject(inst: Instance, reason: str) -> bool:
        """Take an instance out of rotation; True if it was in rotation until now."""
        if inst.ejected_at is not None:
            return False
        inst.ejected_at = time.monotonic()
        inst.ejected_reason = reason
        return True

    @staticmethod
    def restore(inst: Instance) -> None:
        inst.ejected_at = None
        inst.ejected_reason = ""
        inst.probe_misses = 0
