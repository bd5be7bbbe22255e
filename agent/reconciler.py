"""Make the node's processes match its assignment; report what runs.

Only the assignment stops a process: a key read as absent means "run nothing", but a
failed read means nothing at all (etcd away: everything keeps running as it is).
Each process is admitted first (`agent.admission`): one this node refuses is never started
(nor kept running, if the node's rules now refuse what runs), it is reported `failed` with why,
and an event says so; the rest of the assignment runs. A new spec for a running process is
checked before anything stops: refused, the running one keeps serving as it is, its status
says what was refused and why (a bad rollout does not take healthy engines down).
Status is written when it changes (coalesced, at most one write per `min_interval_s`) and
otherwise only every `heartbeat_s`, so a node at rest costs etcd almost no writes. It is
written under the agent's member lease (`LeaseState`), and again under each new one.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import aclosing
from pathlib import Path
from typing import Any

import psutil
import structlog
from pydantic import ValidationError

from agent.admission import Admission, RefusedProcess
from agent.lease import LeaseState
from agent.process.failures import STOPS_KEPT
from agent.process.statefile import ProcRecord, ProcStore
from agent.process.supervisor import ManagedProcess
from pdsupervisor.aio.wait import wait_event
from pdsupervisor.core.admission import problems_text, show
from pdsupervisor.core.models import NodeAssignment, NodeStatus, ProcessSpec, StopEscalation
from pdsupervisor.store.etcd import Store, StoreUnavailable

log = structlog.get_logger("agent.reconciler")


class Reconciler:
    def __init__(
        self,
        node: str,
        store: Store,
        records: ProcStore,
        log_dir: Path,
        lease: LeaseState,
        *,
        admission: Admission,
        heartbeat_s: float = 60.0,
        resync_s: float = 60.0,
        min_interval_s: float = 0.25,
    ) -> None:
        self.node = node
        self.store = store
        self.records = records
        self.log_dir = log_dir
        self.lease = lease  # the member lease status is reported under
        self.admission = admission
        self.heartbeat_s = heartbeat_s
        self.resync_s = resync_s
        self.min_interval_s = min_interval_s
        self.procs: dict[str, ManagedProcess | RefusedProcess] = {}  # in the assignment's order
        # the last stops that took SIGKILL, reported with the status: a process stopped because
        # its assignment dropped it leaves the status, its escalation must not go with it
        self.stops_escalated: list[StopEscalation] = []
        self.assignment_seen = False  # True once an assignment was read (present or absent)
        self._dirty = asyncio.Event()
        self._lock = asyncio.Lock()
        self._snapshots = 0  # taken by report_status, numbered from 1
        self._published = 0  # the number of the last one known to be in etcd
        self._publishing = asyncio.Event()  # set (and replaced) when that number grows

    # ---- adoption ----------------------------------------------------------------

    def adopt(self) -> list[str]:
        """Adopt live processes from the records, before any assignment is read."""
        adopted = []
        for rec, proc in self.records.live():
            self._new(rec.process_spec, adopt=(rec, proc)).start()
            adopted.append(rec.name)
        return adopted

    def _new(self, spec: ProcessSpec, adopt: tuple[ProcRecord, psutil.Process] | None = None) -> ManagedProcess:
        m = ManagedProcess(spec, records=self.records, log_dir=self.log_dir, on_change=self.mark_dirty, adopt=adopt,
                           on_stop_escalated=self._stop_escalated, published=self.published)
        self.procs[spec.name] = m
        return m

    # ---- applying an assignment --------------------------------------------------

    async def apply(self, assignment: NodeAssignment | None) -> None:
        refusals: list[tuple[str, list[str], str | None]] = []  # (process, problems, hash kept running)
        async with self._lock:
            self.assignment_seen = True
            desired = {p.name: p for p in (assignment.processes if assignment else [])}
            # a spec about to start is checked against this machine too; the one running is not
            problems = {n: self.admission.problems(s, starting=not self._runs(n, s)) for n, s in desired.items()}

            def kept(n: str) -> bool:  # same spec, and still refused or still admitted
                cur = self.procs[n]
                return cur.spec_hash == desired[n].spec_hash() and isinstance(cur, RefusedProcess) == bool(problems[n])

            def held(n: str) -> bool:  # a refused new spec: the one running keeps serving, nothing stops
                cur = self.procs[n]
                return bool(problems[n]) and isinstance(cur, ManagedProcess) and cur.spec_hash != desired[n].spec_hash()

            stop = [n for n in self.procs if n not in desired]
            changed = [n for n in desired if n in self.procs and not kept(n) and not held(n)]
            if stop or changed:
                log.info("stopping", removed=stop, changed=changed)
            # planned stops: each drains first (in parallel), while report_status writes `stopping`
            await asyncio.gather(*(self.procs[n].stop(drain=True) for n in stop + changed))
            for n in changed:  # started anew below; removed ones go with the rebuild at the end
                self.procs.pop(n)
            for n, spec in desired.items():
                cur = self.procs.get(n)
                if isinstance(cur, ManagedProcess) and cur.spec_hash != spec.spec_hash():  # held
                    if cur.refused_spec_hash != spec.spec_hash():
                        refusals.append((n, problems[n], cur.spec_hash))
                    cur.hold(spec.spec_hash(), problems_text(problems[n]))
                elif problems[n] and (not isinstance(cur, RefusedProcess) or cur.problems != problems[n]):
                    self.procs[n] = RefusedProcess(spec, problems[n])
                    refusals.append((n, problems[n], None))
                elif cur is None:
                    log.info("starting", process=n)
                    self._new(spec).start()
                else:
                    if isinstance(cur, ManagedProcess):
                        cur.hold(None)
                    if cur.spec != spec:
                        cur.update_spec(spec)
            self.procs = {n: self.procs[n] for n in desired}
            self.mark_dirty()
        for refusal in refusals:  # outside the lock: etcd being slow must not hold up the next apply
            await self._record_refusal(*refusal)

    def _runs(self, name: str, spec: ProcessSpec) -> bool:
        cur = self.procs.get(name)
        return isinstance(cur, ManagedProcess) and cur.spec_hash == spec.spec_hash()

    async def _record_refusal(self, name: str, problems: list[str], running: str | None) -> None:
        kept = f"; the running one (spec {running}) keeps running" if running else ""
        message = f"{show(name)} on {self.node} refused: {'; '.join(problems)}{kept}"
        log.error("process refused", process=name, problems=problems, kept_running=running)
        try:
            await self.store.append_event("refused", message, node=self.node, process=name)
        except StoreUnavailable as exc:  # best effort: the status says it too
            log.warning("refusal event not recorded", process=name, error=str(exc) or type(exc).__name__)

    async def watch_assignment(self) -> None:
        """Read the key once, watch from the next revision; on failure back off and redo."""
        key = self.store.keys.assignment(self.node)
        delay = 0.5
        while True:
            try:
                kv, rev = await self.store.read(key)
                await self._apply_raw(kv.value if kv else None)
                delay = 0.5
                loop = asyncio.get_running_loop()
                try:
                    async with asyncio.timeout(self.resync_s) as deadline, \
                            aclosing(self.store.watch_key(key, rev + 1)) as events:
                        async for ev in events:
                            deadline.reschedule(None)  # never cancel an apply half-way
                            await self._apply_raw(ev.value)
                            deadline.reschedule(loop.time() + self.resync_s)
                except TimeoutError:
                    continue  # periodic re-read, in case the watch silently missed something
            except StoreUnavailable as exc:
                log.warning("assignment unavailable, keeping processes as they are", error=str(exc) or type(exc).__name__)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    async def _apply_raw(self, value: bytes | None) -> None:
        if value is None:
            await self.apply(None)
            return
        try:
            assignment = NodeAssignment.model_validate_json(value)
        except ValidationError as exc:
            log.error("invalid assignment ignored, keeping processes as they are", error=str(exc))
            return
        await self.apply(assignment)

    # ---- status ------------------------------------------------------------------

    def mark_dirty(self) -> None:
        self._dirty.set()

    async def published(self) -> None:
        """Until the node's status as it is now is in etcd: a snapshot taken after this call
        was written (or found the same as the last write). A drain waits for it, so the proxy
        sees `stopping` before the drain counts the requests left."""
        want = self._snapshots + 1
        self.mark_dirty()
        while self._published < want:
            await self._publishing.wait()

    def _now_published(self, snapshot: int) -> None:
        self._published = snapshot
        self._publishing.set()
        self._publishing = asyncio.Event()

    def _stop_escalated(self, stop: StopEscalation) -> None:
        self.stops_escalated = [*self.stops_escalated, stop][-STOPS_KEPT:]
        self.mark_dirty()

    def snapshot_procs(self) -> list[ManagedProcess | RefusedProcess]:
        return list(self.procs.values())

    def snapshot(self) -> NodeStatus:
        return NodeStatus(node=self.node, updated_at=time.time(), lease=self.lease.lease_id or 0,
                          processes=[m.status() for m in self.snapshot_procs()], stops_escalated=self.stops_escalated)

    @staticmethod
    def _comparable(st: NodeStatus) -> tuple[int, list[dict[str, Any]], list[StopEscalation]]:
        """What a write must carry when it changes: the processes, the stops that took
        SIGKILL, and the lease they are reported under (readers ignore status under any
        other lease, so a re-registration gets its own write)."""
        return st.lease, [p.model_dump(exclude={"uptime_s"}) for p in st.processes], st.stops_escalated

    async def rewrite_status_on_new_lease(self) -> None:
        """A new member lease (the first, or one replacing a lost lease) gets its own status
        write: readers ignore status under any other lease."""
        seen: int | None = None
        while True:
            seen = await self.lease.next_lease(seen)
            self.mark_dirty()

    async def report_status(self) -> None:
        """Write status on change (coalesced) and every `heartbeat_s`; retry while etcd is away."""
        last: tuple[int, list[dict[str, Any]], list[StopEscalation]] | None = None
        last_write = -1e9
        delay = 0.5
        while True:
            await wait_event(self._dirty, self.heartbeat_s)
            wait = self.min_interval_s - (time.monotonic() - last_write)
            await asyncio.sleep(max(0.05, wait))  # coalesce a burst of changes into one write
            self._dirty.clear()
            if not self.assignment_seen and not self.procs:
                continue
            st = self.snapshot()
            self._snapshots += 1
            snapshot = self._snapshots
            cmp = self._comparable(st)
            stale = time.monotonic() - last_write >= self.heartbeat_s
            if cmp == last and not stale:
                self._now_published(snapshot)
                continue
            try:
                await self.store.put_status(st)
                last, last_write, delay = cmp, time.monotonic(), 0.5
                self._now_published(snapshot)
            except StoreUnavailable as exc:
                log.warning("status write failed, will retry", error=str(exc) or type(exc).__name__)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
                self._dirty.set()

    async def detach_all(self) -> None:
        """Agent shutdown: stop supervising, leave every process running."""
        await asyncio.gather(*(m.detach() for m in self.procs.values()))
