"""``--tensorboard DIR``: a coordinator listener that logs each completed round's scalars to
TensorBoard (``torch.utils.tensorboard``; needs the ``tensorboard`` package, not a dependency).

Scalars, with the round as the step: accuracy, loss, MB moved (round and cumulative, MQTT-framed),
dense MB (cumulative), replies, round seconds, energy (J, round), ignored messages (cumulative,
by reason).
"""
from __future__ import annotations

import logging
import re
from collections.abc import Callable

from . import plots
from ..events import RoundCompleted
from .records import finite_or_none

log = logging.getLogger(__name__)


def _summary_writer(logdir: str):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:  # torch is there (coordinator extra); tensorboard may not be
        raise ValueError(f"tensorboard: cannot log to {logdir!r}: {exc} (pip install tensorboard)") from None
    return SummaryWriter(log_dir=logdir)


class TensorBoardLogger:
    """Call with coordinator events; ``writer_factory(logdir)`` returns an object with
    ``add_scalar(tag, value, step)``, ``flush()`` and ``close()`` (a SummaryWriter by default)."""

    def __init__(self, logdir: str, writer_factory: Callable | None = None) -> None:
        self.writer = (writer_factory or _summary_writer)(logdir)
        self.mb = self.dense_mb = 0.0

    def __call__(self, event) -> None:
        if not isinstance(event, RoundCompleted):
            return
        try:
            self._log(event.round, event.row)
        except Exception:  # noqa: BLE001 - an observer never breaks the run
            log.exception("tensorboard: cannot log round %s", event.round)

    def _log(self, step: int, row: dict) -> None:
        w = self.writer
        moved = sum(finite_or_none(row.get(k)) or 0.0 for k in ("mqtt_bytes_down", "mqtt_bytes_up")) / plots.MB
        self.mb += moved
        self.dense_mb += sum(finite_or_none(row.get(k)) or 0.0 for k in ("dense_bytes_down", "dense_bytes_up")) / plots.MB
        scalars = {"accuracy": finite_or_none(row.get("accuracy")), "loss": finite_or_none(row.get("loss")),
                   "train_loss": finite_or_none(row.get("train_loss")), "mb/round": moved, "mb/cumulative": self.mb,
                   "mb/dense_cumulative": self.dense_mb, "clients/replied": finite_or_none(row.get("replied")),
                   "clients/sampled": finite_or_none(row.get("sampled")), "seconds/round": finite_or_none(row.get("duration_s")),
                   "energy_j/round": finite_or_none(row.get("energy_j"))}
        for part, secs in plots.round_time_parts(row)[0].items():
            scalars["seconds/" + re.sub(r"[^A-Za-z0-9]+", "_", part).strip("_")] = secs
        if isinstance(row.get("ignored"), dict):
            for reason, n in row["ignored"].items():
                scalars[f"ignored/{reason}"] = finite_or_none(n)
        for tag, value in scalars.items():
            if value is not None:
                w.add_scalar(tag, value, step)
        w.flush()

    def close(self) -> None:
        try:
            self.writer.close()
        except Exception:  # noqa: BLE001
            log.debug("tensorboard writer close failed", exc_info=True)
