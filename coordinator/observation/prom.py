"""Prometheus metrics of one coordinator (``prometheus-client``), fed by its events.

Each :class:`RunMetrics` has its own ``CollectorRegistry`` (never the process-wide default), so
tests and several coordinators in one process do not collide. The dashboard serves
:meth:`RunMetrics.exposition` at ``/metrics``; docs/dashboard.md lists every metric.

Counters are cumulative over this coordinator process (a resumed run starts them again, which
Prometheus' ``rate()`` and ``increase()`` treat as a restart). Clients online and ignored
messages are read when scraped, from the callables given (the coordinator's registry and its
``ignored`` counts), so they are current between rounds too.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from . import plots
from ..events import ClientStatusChanged, ReplyAccepted, RoundCompleted, TaskSent
from .records import finite_or_none

log = logging.getLogger(__name__)

CONTENT_TYPE = CONTENT_TYPE_LATEST
ROUND_SECONDS_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, float("inf"))
# metrics row fields -> fedpara_bytes_total{direction, layer}
BYTE_FIELDS = (("down", "payload", "bytes_down"), ("up", "payload", "bytes_up"),
               ("down", "mqtt", "mqtt_bytes_down"), ("up", "mqtt", "mqtt_bytes_up"),
               ("down", "socket", "socket_bytes_sent"), ("up", "socket", "socket_bytes_received"))
PHASE_SECONDS = {"send_s": "transfer", "wait_s": "wait", "aggregate_s": "aggregate", "eval_s": "evaluate",
                 "save_s": "save"}


class _LiveCollector:
    """Values read at scrape time: clients online/known, ignored messages by reason."""

    def __init__(self, owner: RunMetrics) -> None:
        self.owner = owner

    def collect(self):
        online, known = self.owner.clients_now()
        g = GaugeMetricFamily("fedpara_clients_online", "clients online and heard from within their heartbeat")
        g.add_metric([], online)
        yield g
        g = GaugeMetricFamily("fedpara_clients_known", "clients the coordinator has heard of")
        g.add_metric([], known)
        yield g
        c = CounterMetricFamily("fedpara_ignored_messages_total", "messages ignored or rejected, by reason "
                                "(docs/protocol.md, docs/security.md)", labels=["reason"])
        for reason, n in sorted(self.owner.ignored_now().items()):
            c.add_metric([reason], n)
        yield c


class RunMetrics:
    """The metrics; call the object with each coordinator event (quick, never raises)."""

    def __init__(self, *, run_info: Mapping[str, str] | None = None,
                 clients: Callable[[], tuple[int, int]] | None = None,
                 ignored: Callable[[], Mapping[str, int]] | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._clients_fn, self._ignored_fn = clients, ignored
        self._online: dict[str, bool] = {}
        self._last_ignored: dict[str, int] = {}
        if run_info:
            Info("fedpara_run", "the run this coordinator drives", registry=r).info(
                {k: str(v) for k, v in run_info.items()})
        self.round = Gauge("fedpara_round", "last completed round", registry=r)
        self.round_started = Gauge("fedpara_round_started", "round whose task was sent last", registry=r)
        self.sampled = Gauge("fedpara_round_sampled_clients", "clients sampled in the current attempt", registry=r)
        self.replies = Gauge("fedpara_round_replies", "updates accepted so far in the current attempt", registry=r)
        self.accuracy = Gauge("fedpara_accuracy", "test accuracy after the last completed round (0..1)", registry=r)
        self.loss = Gauge("fedpara_loss", "test loss after the last completed round", registry=r)
        self.epsilon = Gauge("fedpara_epsilon", "differential privacy spent so far: epsilon at the run's delta "
                             "(DP runs only; docs/privacy.md)", registry=r)
        self.bytes = Counter("fedpara_bytes", "bytes moved, by direction (down: to clients) and layer (payload: "
                             "envelopes; mqtt: whole MQTT packets; socket: the coordinator's TCP connection)",
                             ["direction", "layer"], registry=r)
        self.dense = Counter("fedpara_dense_bytes", "what the dense fp32 model would have moved (reference)",
                             ["direction"], registry=r)
        self.energy = Counter("fedpara_energy_joules", "joules the clients reported, by phase (upload: "
                              "reported with the next reply)", ["phase"], registry=r)
        self.energy_measured = Gauge("fedpara_energy_measured", "1 when every energy figure so far came from a "
                                     "sensor, 0 when any is an estimate", registry=r)
        self.version = Gauge("fedpara_global_version", "async runs: global versions published so far "
                             "(docs/async.md)", registry=r)
        self.staleness = Histogram("fedpara_update_staleness", "async runs: versions published between an update's "
                                   "task and its folding into the buffer", buckets=(0, 1, 2, 3, 4, 6, 8, 12, 16, 32),
                                   registry=r)
        self.duration = Histogram("fedpara_round_duration_seconds", "wall time of a completed round",
                                  buckets=ROUND_SECONDS_BUCKETS, registry=r)
        self.phase_seconds = Counter("fedpara_round_phase_seconds", "seconds of completed rounds by phase "
                                     "(when the coordinator records timing; train: slowest client)", ["phase"],
                                     registry=r)
        r.register(_LiveCollector(self))
        for direction, layer, _ in BYTE_FIELDS:  # every series exists from the first scrape
            self.bytes.labels(direction, layer)
        for direction in ("down", "up"):
            self.dense.labels(direction)
        for phase in plots.PHASES:
            self.energy.labels(phase)
        self._measured_all: bool | None = None

    # --- scrape-time values -------------------------------------------------------------------
    def clients_now(self) -> tuple[int, int]:
        if self._clients_fn is not None:
            try:
                return self._clients_fn()
            except Exception:  # noqa: BLE001 - a scrape must not fail for this
                log.debug("clients callable failed", exc_info=True)
        online = dict(self._online)
        return sum(online.values()), len(online)

    def ignored_now(self) -> dict[str, int]:
        counts = dict(self._last_ignored)
        if self._ignored_fn is not None:
            try:
                live = dict(self._ignored_fn())
            except Exception:  # noqa: BLE001 - e.g. the dict changed size while copied
                live = {}
            for k, v in live.items():
                if (v := finite_or_none(v)) is not None:
                    counts[str(k)] = max(counts.get(str(k), 0), int(v))
        return counts

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    # --- events ---------------------------------------------------------------------------------
    def __call__(self, event) -> None:
        try:
            self._handle(event)
        except Exception:  # noqa: BLE001 - an observer never breaks the run
            log.exception("prometheus metrics: cannot record %s", type(event).__name__)

    def _handle(self, event) -> None:
        if isinstance(event, ClientStatusChanged):
            self._online[event.client_id] = event.online
        elif isinstance(event, TaskSent):
            self.round_started.set(event.round)
            self.sampled.set(len(event.sampled))
            self.replies.set(0)
        elif isinstance(event, ReplyAccepted):
            self.replies.set(event.replies)
        elif isinstance(event, RoundCompleted):
            self.record_row(event.row)

    def record_row(self, row: Mapping) -> None:
        """Add one metrics.jsonl row (a completed round)."""
        self.round.set(row["round"])
        if isinstance(row.get("version"), int):
            self.version.set(row["version"])
        for s in (row.get("staleness") or {}).values() if isinstance(row.get("staleness"), Mapping) else ():
            if isinstance(s, int) and s >= 0:
                self.staleness.observe(s)
        for gauge, key in ((self.accuracy, "accuracy"), (self.loss, "loss"), (self.epsilon, "epsilon")):
            if (v := finite_or_none(row.get(key))) is not None:
                gauge.set(v)
        for direction, layer, key in BYTE_FIELDS:
            if (v := finite_or_none(row.get(key))) is not None and v > 0:
                self.bytes.labels(direction, layer).inc(v)
        for direction in ("down", "up"):
            if (v := finite_or_none(row.get(f"dense_bytes_{direction}"))) is not None and v > 0:
                self.dense.labels(direction).inc(v)
        per_client = plots.energy_by_client([row])
        for phase, joules in plots.energy_by_phase([row]).items():
            if joules > 0:
                self.energy.labels(phase).inc(joules)
        if per_client:
            measured = all(e["measured"] for e in per_client.values())
            self._measured_all = measured if self._measured_all is None else (self._measured_all and measured)
            self.energy_measured.set(1 if self._measured_all else 0)
        if (v := finite_or_none(row.get("duration_s"))) is not None:
            self.duration.observe(v)
        timing = row.get("timing")
        if isinstance(timing, Mapping):
            for key, phase in PHASE_SECONDS.items():
                if (v := finite_or_none(timing.get(key))) is not None and v >= 0:
                    self.phase_seconds.labels(phase).inc(v)
            if (v := plots.slowest_training(row)) is not None:
                self.phase_seconds.labels("train").inc(v)
        if isinstance(row.get("ignored"), Mapping):
            for k, v in row["ignored"].items():
                if (v := finite_or_none(v)) is not None:
                    self._last_ignored[str(k)] = max(self._last_ignored.get(str(k), 0), int(v))
        self.replies.set(finite_or_none(row.get("replied")) or 0)
