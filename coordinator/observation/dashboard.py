"""The live dashboard and Prometheus endpoint of a running coordinator (docs/dashboard.md).

``fedpara coordinator --dashboard HOST:PORT`` (and ``fedpara demo --dashboard ...``) serve, from
a daemon thread (stdlib ``ThreadingHTTPServer``):

    /                   the page: clients and their state, the current round and its replies,
                        accuracy and bytes so far, the report's plots (plotly), updated every second
    /api/state          what the page shows, as JSON (polled)
    /api/figures        the plots as plotly JSON (fetched when ``figures_version`` changes)
    /static/plotly.min.js, /static/dashboard.js   plotly.js from the installed package, the page's script
    /metrics            Prometheus text format (:mod:`.prom`)

Read-only: GET only, anything else is 405. Bound to loopback unless told otherwise: a
non-loopback address needs ``dashboard_public`` and a token, which every request must carry
(``Authorization: Bearer TOKEN``, or ``?token=TOKEN`` once: the page then keeps it in an
HttpOnly, SameSite=Strict cookie); without it, 401. Nothing secret is shown: no keys or key paths,
no broker credentials, no file paths; client-supplied strings are bounded and the page inserts
them as text, never as HTML.

The state is fed by the coordinator's events (:class:`DashboardState` is a listener) and reads
``coordinator.registry.snapshot()`` (safe from another thread) when the page asks.
"""
from __future__ import annotations

import json
import hmac
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from . import plots
from ..events import ClientStatusChanged, ReplyAccepted, RoundCompleted, TaskSent
from .listen import is_loopback
from .timeline import ClientTimeline, Listeners
from .prom import CONTENT_TYPE as PROM_CONTENT_TYPE
from .prom import RunMetrics

log = logging.getLogger(__name__)

TOKEN_COOKIE = "fedpara_dashboard_token"  # a non-loopback dashboard keeps its token here
MAX_TEXT = 64          # client-supplied strings (device) are cut to this length
MAX_CLIENTS_SHOWN = 500  # clients listed on the page (the count says how many there are)
TIMELINE_KEEP = 5000   # clients-online records the page's plot keeps
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    # plotly.js injects its own <style> elements; no inline scripts, nothing from elsewhere
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
                               "img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
                               "frame-ancestors 'none'",
}


def _text(v, limit: int = MAX_TEXT) -> str:
    s = str(v)
    return s if len(s) <= limit else s[: limit - 1] + "\u2026"


class DashboardState:
    """What the page shows, kept up to date by the coordinator's events (a listener: quick, never
    raises). ``snapshot()`` and ``figures_json()`` are called from the HTTP threads."""

    def __init__(self, *, run_info: Mapping[str, object], rounds_total: int, rows: Sequence[dict] = (),
                 registry=None, clock: Callable[[], float] = time.monotonic) -> None:
        self.run_info = dict(run_info)
        self.rounds_total = rounds_total
        self.registry = registry
        self.clock = clock
        self._lock = threading.Lock()
        self.rows: list[dict] = list(rows)
        self.timeline = ClientTimeline(None, registry, keep=TIMELINE_KEEP)
        self.status = "waiting for clients"
        self.current_round: int | None = None
        self.attempt = 0
        self.sampled: tuple[str, ...] = ()
        self.replied: list[str] = []
        self.online: dict[str, bool] = {}  # from events, when there is no registry to ask
        self.started = clock()
        self._fig_key: tuple | None = None
        self._fig_json = b"{}"
        self._fig_version = 0

    # --- events (coordinator thread) ----------------------------------------------------------
    def __call__(self, event) -> None:
        try:
            with self._lock:
                self._handle(event)
                self.timeline(event)
        except Exception:  # noqa: BLE001 - never into the round loop
            log.exception("dashboard: cannot record %s", type(event).__name__)

    def _handle(self, event) -> None:
        if isinstance(event, ClientStatusChanged):
            self.online[event.client_id] = event.online
            if self.current_round is None and not self.rows:
                self.status = "waiting for clients"
        elif isinstance(event, TaskSent):
            self.current_round, self.attempt, self.sampled, self.replied = event.round, event.attempt, event.sampled, []
            again = f" (attempt {event.attempt})" if event.attempt > 1 else ""
            self.status = f"round {event.round}{again}: training on {len(event.sampled)} clients"
        elif isinstance(event, ReplyAccepted):
            if event.client_id not in self.replied:
                self.replied.append(event.client_id)
            self.status = f"round {event.round}: {event.replies} of {event.expected} replies"
        elif isinstance(event, RoundCompleted):
            if isinstance(event.row, dict) and isinstance(event.row.get("round"), int):
                self.rows.append(event.row)
            self.current_round = None
            self.status = f"round {event.round} done"

    def finish(self, status: str) -> None:
        """The run is over (``status`` from its summary: completed, failed: ...)."""
        with self._lock:
            self.status, self.current_round = f"run {status}", None

    # --- readers (HTTP threads) ---------------------------------------------------------------
    def _clients(self, sampled: set[str], replied: set[str], online: dict[str, bool]) -> tuple[list[dict], int, int]:
        now = self.clock()
        out = []
        if self.registry is not None:
            snap = self.registry.snapshot()
            for info, live in snap:
                out.append({"id": info.client_id, "online": bool(info.online), "live": bool(live),
                            "last_seen_s": round(max(0.0, now - info.last_seen), 1) if info.last_seen else None,
                            "device": _text(info.device), "num_examples": int(info.num_examples),
                            "heartbeat_s": info.heartbeat_s})
        else:
            out = [{"id": c, "online": o, "live": o, "last_seen_s": None, "device": "", "num_examples": 0,
                    "heartbeat_s": 0} for c, o in sorted(online.items())]
        for c in out:
            if not c["live"]:
                c["state"] = "offline" if not c["online"] else "silent (missed heartbeats)"
            elif c["id"] in replied:
                c["state"] = "replied"
            elif c["id"] in sampled:
                c["state"] = "training"
            else:
                c["state"] = "idle"
            c["id"] = _text(c["id"])
        live = sum(1 for c in out if c["live"])
        return out[:MAX_CLIENTS_SHOWN], live, len(out)

    def snapshot(self) -> dict:
        """The JSON the page polls (bounded; nothing secret)."""
        with self._lock:
            rows = list(self.rows)
            status, current, attempt = self.status, self.current_round, self.attempt
            sampled, replied, online = list(self.sampled), list(self.replied), dict(self.online)
            key = self._figure_key_locked()
        clients, live, known = self._clients(set(sampled) if current else set(), set(replied) if current else set(),
                                             online)
        h = plots.headline(rows)
        last = rows[-1] if rows else {}
        return {
            **self.run_info, "rounds_total": self.rounds_total, "status": status,
            "round": h["last_round"], "current_round": current, "attempt": attempt if current else None,
            "sampled": len(sampled) if current else 0, "replies": len(replied) if current else 0,
            "last_round_replied": last.get("replied"), "last_round_sampled": last.get("sampled"),
            "accuracy": h["accuracy"], "best_accuracy": h["best_accuracy"], "mb_down": round(h["mb_down"], 4),
            "mb_up": round(h["mb_up"], 4), "dense_mb": round(h["dense_mb"], 4), "dense_ratio": h["dense_ratio"],
            "energy_j": round(h["energy_j"], 3), "energy_measured": h["energy_measured"],
            "epsilon": last.get("epsilon"), "delta": last.get("delta"),
            "mode": last.get("mode", "sync"), "staleness_max": last.get("staleness_max"),
            "in_flight": last.get("in_flight"),
            "clients_online": live, "clients_known": known, "clients": clients,
            "figures_version": self._version_for(key), "uptime_s": round(self.clock() - self.started, 1),
        }

    def _figure_key_locked(self) -> tuple:
        return (len(self.rows), self.timeline.written)

    def _version_for(self, key: tuple) -> int:
        with self._lock:
            if key != self._fig_key:
                self._fig_key, self._fig_version = key, self._fig_version + 1
                self._fig_json = b""  # built on the next /api/figures
            return self._fig_version

    def figures_json(self) -> tuple[int, bytes]:
        """(version, the plots as one JSON object name -> plotly figure); cached per version."""
        from plotly.io.json import to_json_plotly

        with self._lock:
            key = self._figure_key_locked()
        version = self._version_for(key)
        with self._lock:
            if self._fig_json and self._fig_version == version:
                return version, self._fig_json
            rows, timeline = list(self.rows), list(self.timeline.records)
        figs = plots.figures(rows, timeline)
        notes = plots.notes(rows, timeline)
        body = to_json_plotly({"version": version, "titles": plots.TITLES, "notes": notes,
                               "figures": {k: f.to_plotly_json() for k, f in figs.items()}}).encode()
        with self._lock:
            if self._fig_version == version:
                self._fig_json = body
        return version, body


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def _static(name: str) -> bytes:
    return resources.files("coordinator.observation").joinpath("dashboard_static", name).read_bytes()


def _plotly_js() -> bytes:
    import plotly

    return (Path(plotly.__file__).parent / "package_data" / "plotly.min.js").read_bytes()


class Dashboard:
    """Serves a :class:`DashboardState` and a :class:`~coordinator.observation.prom.RunMetrics` over HTTP.

    ``listener`` is the ``on_event`` to add to the coordinator's listeners."""

    def __init__(self, state: DashboardState, metrics: RunMetrics, *, host: str = "127.0.0.1",
                 port: int = 0, token: str | None = None) -> None:
        self.state, self.metrics = state, metrics
        self.listener = Listeners(state, metrics)
        if not is_loopback(host):
            if not token:
                raise ValueError(f"dashboard: {host} is not loopback; serving it there needs a token")
            log.warning("dashboard bound to %s:%d, not loopback: every request needs the token; serve it over "
                        "TLS (a reverse proxy) where others share the network", host, port)
        self.token = token
        try:
            self.httpd = _Server((host, port), self._handler())
        except OSError as exc:  # port taken, address not ours: the operator's setting, named
            raise OSError(f"dashboard: cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        self.host, self.port = host, self.httpd.server_address[1]
        self._thread: threading.Thread | None = None
        self._cache: dict[str, bytes] = {}

    @classmethod
    def for_coordinator(cls, coordinator, *, host: str = "127.0.0.1", port: int = 0,
                        token: str | None = None) -> Dashboard:
        """A dashboard of ``coordinator`` (not yet serving: :meth:`start`); add ``.listener`` to
        the listeners the coordinator was built with."""
        cfg = coordinator.cfg
        info = {"run_id": cfg.run_id, "model": cfg.model, "scheme": cfg.scheme, "ratio": cfg.ratio}
        registry = coordinator.registry

        def clients() -> tuple[int, int]:
            snap = registry.snapshot()
            return sum(1 for _, live in snap if live), len(snap)

        def ignored() -> dict:
            return dict(coordinator.ignored)

        state = DashboardState(run_info={**info, "signed": not cfg.insecure}, rounds_total=cfg.rounds,
                               rows=list(coordinator.rows), registry=registry)
        metrics = RunMetrics(run_info={**info, "ratio": str(cfg.ratio)}, clients=clients, ignored=ignored)
        return cls(state, metrics, host=host, port=port, token=token)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def start(self) -> Dashboard:
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="dashboard", daemon=True)
        self._thread.start()
        log.info("dashboard on %s", self.url)
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join(5)
            self._thread = None
        self.httpd.server_close()

    def __enter__(self) -> Dashboard:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- HTTP -----------------------------------------------------------------------------------
    def _asset(self, name: str) -> bytes:
        if name not in self._cache:
            self._cache[name] = _plotly_js() if name == "plotly.min.js" else _static(name)
        return self._cache[name]

    def route(self, path: str) -> tuple[int, str, bytes, dict]:
        """(status, content type, body, extra headers) of a GET."""
        nostore = {"Cache-Control": "no-store"}
        if path in ("/", "/index.html"):
            return 200, "text/html; charset=utf-8", self._asset("index.html"), nostore
        if path == "/api/state":
            body = json.dumps(self.state.snapshot(), allow_nan=False, default=str).encode()
            return 200, "application/json", body, nostore
        if path == "/api/figures":
            return 200, "application/json", self.state.figures_json()[1], nostore
        if path == "/metrics":
            return 200, PROM_CONTENT_TYPE, self.metrics.exposition(), nostore
        if path == "/static/plotly.min.js":
            return (200, "text/javascript; charset=utf-8", self._asset("plotly.min.js"),
                    {"Cache-Control": "max-age=3600"})
        if path == "/static/dashboard.js":
            return 200, "text/javascript; charset=utf-8", self._asset("dashboard.js"), nostore
        if path == "/favicon.ico":
            return 204, "image/x-icon", b"", {}
        return 404, "text/plain; charset=utf-8", b"not found\n", {}

    @staticmethod
    def presented_token(headers, query: str) -> str | None:
        """The token a request carries: Bearer header, ``token`` query parameter, or cookie."""
        auth = headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            return auth[7:].strip()
        values = parse_qs(query).get("token")
        if values:
            return values[0]
        for part in headers.get("Cookie", "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == TOKEN_COOKIE:
                return value
        return None

    def _handler(self):
        dashboard = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "fedpara-dashboard"
            sys_version = ""
            protocol_version = "HTTP/1.1"
            timeout = 30  # an idle keep-alive connection is closed after this many seconds

            def _send(self, status: int, ctype: str, body: bytes, headers: Mapping[str, str]) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for k, v in {**SECURITY_HEADERS, **headers}.items():
                    self.send_header(k, v)
                self.end_headers()
                if body:
                    self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                url = urlsplit(self.path)
                if dashboard.token is not None:
                    given = dashboard.presented_token(self.headers, url.query)
                    if given is None or not hmac.compare_digest(given.encode(), dashboard.token.encode()):
                        self.close_connection = True
                        self._send(HTTPStatus.UNAUTHORIZED, "text/plain; charset=utf-8",
                                   b"token required: ?token=... or Authorization: Bearer ...\n",
                                   {"WWW-Authenticate": 'Bearer realm="fedpara"', "Connection": "close"})
                        return
                try:
                    status, ctype, body, headers = dashboard.route(url.path)
                    if dashboard.token is not None and "token=" in url.query:  # the page's later requests
                        headers = {**headers, "Set-Cookie": f"{TOKEN_COOKIE}={dashboard.token}; HttpOnly; "
                                                            "SameSite=Strict; Path=/"}
                except Exception:  # noqa: BLE001 - one bad request must not take the server down
                    log.exception("dashboard: %s failed", self.path)
                    status, ctype, body, headers = 500, "text/plain; charset=utf-8", b"internal error\n", {}
                self._send(status, ctype, body, headers)

            def _not_allowed(self) -> None:
                self.close_connection = True
                self._send(HTTPStatus.METHOD_NOT_ALLOWED, "text/plain; charset=utf-8",
                           b"read-only: GET only\n", {"Allow": "GET", "Connection": "close"})

            def __getattr__(self, name: str):
                if name.startswith("do_"):  # every other method, standard or not: 405
                    return self._not_allowed
                raise AttributeError(name)

            def log_message(self, format: str, *args) -> None:  # noqa: A002 - http.server's signature
                log.debug("dashboard %s: " + format, self.address_string(), *args)

        return Handler
