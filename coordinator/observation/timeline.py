"""Listener fan-out and the clients-online timeline (RUN_DIR/clients.jsonl).

Everything here hangs off the coordinator's ``on_event`` (coordinator/events.py); the round loop
knows nothing about it. Listeners run on the coordinator's thread: each one here is quick and never
raises into it.
"""
from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable

from fedpara.runtime.rundir import RunDir

from ..events import ClientStatusChanged, RoundCompleted, TaskSent

log = logging.getLogger(__name__)

MAX_TIMELINE_RECORDS = 20_000  # clients.jsonl lines one coordinator process writes at most


class Listeners:
    """One ``on_event`` that calls several listeners in turn; one listener's exception is logged
    and does not keep the others (or the round loop) from running."""

    def __init__(self, *listeners: Callable | None) -> None:
        self._listeners: list[Callable] = [f for f in listeners if f is not None]

    def add(self, listener: Callable) -> None:
        self._listeners = [*self._listeners, listener]  # copy: the coordinator thread may be iterating

    def __call__(self, event) -> None:
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:
                log.exception("listener %r failed on %s", listener, type(event).__name__)


class ClientTimeline:
    """Records the number of online clients whenever it changes, and once per completed round:
    what the "clients online over time" plots read.

    With a ``run_dir`` the records are appended to ``RUN_DIR/clients.jsonl`` (at most
    ``max_records`` lines per process; heartbeats that change nothing write nothing); with
    ``keep`` the newest ``keep`` also stay in ``records`` (the live dashboard's copy)."""

    def __init__(self, run_dir: RunDir | None, registry=None, *, fresh: bool = True, keep: int = 0,
                 clock: Callable[[], float] = time.time, max_records: int = MAX_TIMELINE_RECORDS) -> None:
        self.run_dir, self.registry, self.clock, self.max_records = run_dir, registry, clock, max_records
        self.records: collections.deque[dict] = collections.deque(maxlen=keep)
        self.online: dict[str, bool] = {}
        self.count: int | None = None
        self.round = 0
        self.written = 0  # records made by this object
        if run_dir is not None:
            if fresh:
                run_dir.start_client_timeline()
            else:
                self.round = max((r["round"] for r in run_dir.read_client_timeline()), default=0)

    def _live_count(self) -> int:
        if self.registry is not None:
            try:
                return len(self.registry.live())
            except Exception:  # noqa: BLE001 - an observer must never break the run
                pass
        return sum(self.online.values())

    def _record(self, record: dict) -> None:
        self.written += 1
        self.records.append(record)
        if self.run_dir is None or self.written > self.max_records:
            return
        if self.written == self.max_records:
            log.warning("clients.jsonl: %d records written by this process; no more", self.max_records)
        try:
            self.run_dir.append_client_timeline(record)
        except OSError as exc:
            log.warning("cannot append to %s: %s", self.run_dir.client_timeline_path, exc)

    def __call__(self, event) -> None:
        if isinstance(event, ClientStatusChanged):
            self.online[event.client_id] = event.online
        elif isinstance(event, RoundCompleted):
            self.round = event.round
        elif not isinstance(event, TaskSent):
            return
        count = self._live_count()
        now = self.clock()
        if count != self.count:
            self.count = count
            rec = {"round": self.round, "t": now, "online": count}
            if isinstance(event, ClientStatusChanged):
                rec.update(client=event.client_id, client_online=event.online)
            self._record(rec)
        if isinstance(event, RoundCompleted):
            self._record({"round": event.round, "t": now, "online": count, "completed": True})
