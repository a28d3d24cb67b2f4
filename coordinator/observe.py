"""Watching a run from outside the round loop: listener fan-out, the clients-online timeline, and
the set of observers a CLI attaches (dashboard + /metrics, TensorBoard).

Everything here hangs off the coordinator's ``on_event`` (:mod:`.events`) and reads the
:class:`~coordinator.server.Coordinator` object; the round loop knows nothing about it. Listeners
run on the coordinator's thread: each one here is quick and never raises into it.
"""
from __future__ import annotations

import collections
import contextlib
import ipaddress
import logging
import os
import secrets
import time
from collections.abc import Callable, Iterator

from fedpara.runtime.rundir import RunDir

from .events import ClientStatusChanged, RoundCompleted, TaskSent

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
MAX_TIMELINE_RECORDS = 20_000  # clients.jsonl lines one coordinator process writes at most


def parse_listen(field: str, value: str) -> tuple[str, int]:
    """``HOST:PORT``, ``:PORT`` or ``PORT`` (loopback) -> (host, port); ValueError naming ``field``.

    IPv6 hosts go in brackets (``[::1]:8050``). Port 0 picks a free port."""
    text = str(value).strip()
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "", text
    host = host.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        num = int(port)
    except ValueError:
        raise ValueError(f"{field}: expected HOST:PORT (e.g. 127.0.0.1:8050), got {value!r}") from None
    if not 0 <= num <= 65535:
        raise ValueError(f"{field}: port must be 0..65535, got {num} in {value!r}")
    if not host or any(c.isspace() or c in "/?#@" for c in host):
        if host:
            raise ValueError(f"{field}: bad host {host!r} in {value!r}")
        host = LOOPBACK
    return host, num


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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


class Observers:
    """What :func:`observers` attached (each None when not asked for)."""

    def __init__(self) -> None:
        self.dashboard = None    # coordinator.dashboard.Dashboard
        self.tensorboard = None  # coordinator.tblog.TensorBoardLogger

    def finish(self, summary: dict) -> None:
        """Tell the observers how the run ended (the page then says so)."""
        if self.dashboard is not None:
            self.dashboard.state.finish(str(summary.get("status", "ended")))


@contextlib.contextmanager
def observers(cfg, coordinator, listeners: Listeners, *, resume: bool = False,
              echo: Callable[[str], None] | None = None) -> Iterator[Observers]:
    """Attach the clients timeline (always: RUN_DIR/clients.jsonl) and, when ``cfg`` asks, the
    live dashboard with /metrics (``cfg.dashboard``) and TensorBoard (``cfg.tensorboard``) to
    ``coordinator``, which was built with ``on_event=listeners``; stop them on exit. ``echo`` (a
    CLI's print) is told where the dashboard listens."""
    listeners.add(ClientTimeline(coordinator.run_dir, coordinator.registry, fresh=not resume))
    obs = Observers()
    try:
        if getattr(cfg, "tensorboard", ""):
            from .tblog import TensorBoardLogger

            obs.tensorboard = TensorBoardLogger(cfg.tensorboard)
            listeners.add(obs.tensorboard)
        if getattr(cfg, "dashboard", ""):
            from .dashboard import Dashboard

            host, port = parse_listen("dashboard", cfg.dashboard)
            token = None
            if not is_loopback(host):  # the config refused this unless dashboard_public is set
                token = (getattr(cfg, "dashboard_token", "") or os.environ.get("FEDPARA_DASHBOARD_TOKEN", "")
                         or secrets.token_urlsafe(18))
            obs.dashboard = Dashboard.for_coordinator(coordinator, host=host, port=port, token=token)
            listeners.add(obs.dashboard.listener)
            obs.dashboard.start()
            if echo is not None:
                if token is None:
                    echo(f"dashboard: {obs.dashboard.url}  (Prometheus: {obs.dashboard.url}metrics)")
                else:
                    echo(f"dashboard: {obs.dashboard.url}?token={token}  (Prometheus: {obs.dashboard.url}metrics "
                         "with the header 'Authorization: Bearer <token>')")
        yield obs
    finally:
        if obs.dashboard is not None:
            obs.dashboard.stop()
        if obs.tensorboard is not None:
            obs.tensorboard.close()
