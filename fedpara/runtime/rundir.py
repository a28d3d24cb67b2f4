"""The run directory and a client's state directory: the one place that knows their layout.

    RUN_DIR/
      config.json                  the coordinator's config (what --resume reads)
      metrics.jsonl                one JSON object per completed round, appended
      checkpoints/round-NNNN.safetensors   global factors after round N (fedpara-checkpoint/1)
      summary.json                 totals when the run ends
      clients.jsonl                clients online over time (one line per change, one per round)
      report.html                  ``fedpara report``'s self-contained report (when written)
      logs/                        child processes' logs (demo)
      clients/<id>/                client state directories (demo)

    STATE_DIR/                     one edge client's state
      global.safetensors           the last global factors it trained
      local.safetensors            pFedPara's personalised half (never leaves the device)
      model.onnx, model.int8.onnx  the exported final model (--export-on-finish)

A crash may leave a torn last line in ``metrics.jsonl``; readers drop it, and :meth:`RunDir.
repair_metrics` rewrites the file without it before appending again. The last round recorded in
``metrics.jsonl`` is the last completed round: a checkpoint written just before a crash, for a
round that a resume redoes, is not.
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

METRICS, CONFIG, SUMMARY, CHECKPOINTS = "metrics.jsonl", "config.json", "summary.json", "checkpoints"
CLIENT_TIMELINE, REPORT = "clients.jsonl", "report.html"
ROUND_FILE = re.compile(r"^round-(\d+)\.safetensors$")


def read_json_lines(path: Path) -> list[dict]:
    """Complete JSON object lines carrying an int ``round``; reading stops at a torn line."""
    rows: list[dict] = []
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return rows
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            break
        if isinstance(row, dict) and isinstance(row.get("round"), int):
            rows.append(row)
    return rows


def strict_json(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (strict JSON readers reject NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def append_json_line(path: Path, record: dict) -> None:
    """Append ``record`` to a JSON-lines file as one strict JSON line (NaN and infinities become null)."""
    with open(path, "a") as f:
        f.write(json.dumps(strict_json(record), allow_nan=False) + "\n")


class RunDir:
    """A coordinator's run directory (see the module docstring for the layout)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    # paths
    @property
    def metrics_path(self) -> Path:
        return self.root / METRICS

    @property
    def config_path(self) -> Path:
        return self.root / CONFIG

    @property
    def summary_path(self) -> Path:
        return self.root / SUMMARY

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def client_timeline_path(self) -> Path:
        return self.root / CLIENT_TIMELINE

    @property
    def report_path(self) -> Path:
        return self.root / REPORT

    def checkpoint(self, rnd: int) -> Path:
        return self.checkpoints / f"round-{rnd:04d}.safetensors"

    def client_state(self, client_id: str) -> Path:
        return self.root / "clients" / client_id

    def looks_like_run(self) -> bool:
        return self.checkpoints.is_dir() or self.summary_path.is_file() or self.metrics_path.is_file()

    # metrics
    def read_metrics(self) -> list[dict]:
        return read_json_lines(self.metrics_path)

    def holds_rounds(self) -> bool:
        return bool(self.read_metrics())

    def start_metrics(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.metrics_path.write_text("")

    def repair_metrics(self) -> list[dict]:
        """Rewrite metrics.jsonl without a torn last line (a crash mid-append; so appends stay
        valid lines) and return its rows. A line that is not a round's JSON row anywhere else means
        the file was damaged: ValueError saying where and how to repair it, rather than silently
        dropping every later round and training those rounds again."""
        try:
            text = self.metrics_path.read_text()
        except FileNotFoundError:
            return []
        lines = text.splitlines()
        while lines and not lines[-1].strip():
            lines.pop()
        rows: list[dict] = []
        for i, line in enumerate(lines, 1):
            try:
                row = json.loads(line)
                ok = isinstance(row, dict) and isinstance(row.get("round"), int) and not isinstance(row["round"], bool)
            except json.JSONDecodeError:
                ok = False
            if ok and rows and row["round"] <= rows[-1]["round"]:
                ok = False
            if ok:
                rows.append(row)
            elif i == len(lines):  # a torn last line: the round it was writing is redone
                break
            else:
                later = len(lines) - i
                raise ValueError(
                    f"resume: {self.metrics_path} line {i} is not a round's JSON row (or repeats a round) and "
                    f"{later} line(s) follow it: the file is damaged, not torn. Repair it by hand: fix or delete "
                    f"line {i}, or keep only lines 1-{i - 1} (head -n {i - 1}) to train the later rounds again; "
                    "then --resume")
        self.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return rows

    def append_metrics(self, row: dict) -> None:
        """Append one strict JSON line (NaN and infinities become null)."""
        append_json_line(self.metrics_path, row)

    def last_recorded_round(self) -> int | None:
        rows = self.read_metrics()
        return rows[-1]["round"] if rows else None

    def latest_checkpoint(self) -> Path:
        """The checkpoint of the last recorded round, else the highest round on disk."""
        recorded = self.last_recorded_round()
        if recorded is not None and self.checkpoint(recorded).is_file():
            return self.checkpoint(recorded)
        rounds = [(int(m.group(1)), p) for p in self.checkpoints.glob("round-*.safetensors")
                  if (m := ROUND_FILE.match(p.name))] if self.checkpoints.is_dir() else []
        if not rounds:
            raise FileNotFoundError(f"run directory {self.root} has no checkpoints "
                                    f"({CHECKPOINTS}/round-NNNN.safetensors)")
        return max(rounds)[1]

    # clients online over time (coordinator.observation.ClientTimeline writes, reports read)
    def start_client_timeline(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.client_timeline_path.write_text("")

    def append_client_timeline(self, record: dict) -> None:
        """Append one strict JSON line (a dict with an int ``round``, like a metrics row)."""
        append_json_line(self.client_timeline_path, record)

    def read_client_timeline(self) -> list[dict]:
        """The complete records of clients.jsonl ([] when the run has none); a torn line ends it."""
        return read_json_lines(self.client_timeline_path)

    # config and summary
    def write_config(self, config: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(config, indent=2))

    def read_config(self) -> dict:
        return _read_object(self.config_path, "run config")

    def write_summary(self, summary: dict) -> None:
        self.summary_path.write_text(json.dumps(strict_json(summary), indent=2, allow_nan=False))

    def read_summary(self) -> dict:
        """The summary, or {} when the run has none yet."""
        if not self.summary_path.is_file():
            return {}
        return _read_object(self.summary_path, "run summary")


class ClientStateDir:
    """One edge client's state directory (see the module docstring)."""

    GLOBAL, LOCAL = "global.safetensors", "local.safetensors"

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    @property
    def global_path(self) -> Path:
        return self.root / self.GLOBAL

    @property
    def local_path(self) -> Path:
        return self.root / self.LOCAL

    @property
    def onnx_path(self) -> Path:
        return self.root / "model.onnx"

    def is_state_dir(self) -> bool:
        return self.global_path.is_file()


def _read_object(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{what} {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what} {path} is not a JSON object")
    return data
