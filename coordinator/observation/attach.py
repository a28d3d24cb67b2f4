"""The set of observers a CLI attaches to a coordinator: the clients timeline (always), the live
dashboard with Prometheus /metrics, TensorBoard. Each reads the coordinator object and its events;
the round loop knows nothing about them.
"""
from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable, Iterator

from .listen import is_loopback, parse_listen
from .timeline import ClientTimeline, Listeners


class Observers:
    """What :func:`observers` attached (each None when not asked for)."""

    def __init__(self) -> None:
        self.dashboard = None    # coordinator.observation.dashboard.Dashboard
        self.tensorboard = None  # coordinator.observation.tblog.TensorBoardLogger

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
