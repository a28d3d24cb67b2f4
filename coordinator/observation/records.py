"""What a round and a run write down: the metrics.jsonl row and summary.json (pure functions).

Byte counts (docs/protocol.md): ``bytes_*`` are envelope payload bytes, ``mqtt_bytes_*`` the
MQTT-framed bytes that crossed the broker, ``dense_bytes_*`` what the dense fp32 model would have
cost for the same receivers and replies (exact, from its size).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from ..strategy import FitResult

TOTALS = ("bytes_down", "bytes_up", "mqtt_bytes_down", "mqtt_bytes_up", "dense_bytes_down", "dense_bytes_up")


def finite_or_none(v) -> float | None:
    """``v`` as a float when it is a finite real number (not a bool), else None."""
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return float(v)
    return None


def weighted(results: Sequence[FitResult], key: str) -> float | None:
    """Example-weighted mean of a numeric client metric (clients without it are left out)."""
    vals = [(finite_or_none(r.metrics.get(key)), r.num_examples) for r in results]
    vals = [(v, n) for v, n in vals if v is not None]
    if not vals:
        return None
    return sum(v * n for v, n in vals) / sum(n for _, n in vals)


def energy_fields(results: Sequence[FitResult]) -> dict:
    """Joules the replying clients reported (this round's download + train, previous upload)."""
    energy = [r.metrics.get("energy") for r in results]
    energy = [e for e in energy if isinstance(e, Mapping)]
    if not energy:
        return {}
    total = 0.0
    for e in energy:
        prev = e.get("prev_upload")
        total += (finite_or_none(e.get("total_j")) or 0.0) + (finite_or_none(prev.get("joules") if isinstance(prev, Mapping)
                                                             else None) or 0.0)
    return {"energy_j": total, "energy_measured": all(e.get("measured") is True for e in energy)}


def round_row(*, rnd: int, attempt: int, evaluation: dict, sampled: Sequence[str], broadcast: bool,
              results: Sequence[FitResult], sent: Mapping[str, int], mqtt_bytes_up: int, dense_bytes: int,
              lr: float, duration_s: float, ignored: Mapping[str, int], personalised: bool) -> dict:
    """The metrics.jsonl line of one completed round."""
    results = sorted(results, key=lambda r: r.client_id)
    ids = [r.client_id for r in results]
    row = {"round": rnd, "attempt": attempt, "accuracy": evaluation["accuracy"], "loss": evaluation["loss"],
           "sampled": len(sampled), "replied": len(ids), "clients": ids,
           "bytes_down": sent["bytes_down"], "bytes_up": sum(r.payload_bytes for r in results),
           "mqtt_bytes_down": sent["mqtt_bytes_down"], "mqtt_bytes_up": mqtt_bytes_up,
           "dense_bytes_down": dense_bytes * sent["receivers"], "dense_bytes_up": dense_bytes * len(ids),
           "broadcast": broadcast, "lr": lr, "train_loss": weighted(results, "loss"),
           "duration_s": duration_s, "ignored": dict(ignored),
           "client_metrics": {r.client_id: dict(r.metrics) for r in results}}
    row.update(energy_fields(results))
    if personalised:
        # personalised models are evaluated by each client on its own test split
        row["global_accuracy"] = row["accuracy"]
        local = weighted(results, "local_accuracy")
        if local is not None:
            row["accuracy"] = local
    return row


def summarize(rows: Sequence[dict], **fields) -> dict:
    """summary.json: totals over the rounds, accuracy, dense ratio, energy; ``fields`` added as is."""
    tot = {k: sum(r[k] for r in rows) for k in TOTALS}
    moved = tot["mqtt_bytes_down"] + tot["mqtt_bytes_up"]
    summary = {
        "status": fields.pop("status"), "run_id": fields.pop("run_id"), "spec": fields.pop("spec"),
        "rounds": len(rows), "final_accuracy": rows[-1]["accuracy"] if rows else None,
        # rounds skipped by eval_every have no accuracy
        "best_accuracy": max((r["accuracy"] for r in rows if r["accuracy"] is not None), default=None),
        "wall_s": fields.pop("wall_s"), **tot,
        "dense_ratio": (tot["dense_bytes_down"] + tot["dense_bytes_up"]) / moved if moved else None,
        "params": fields.pop("params"),
        "energy_j": sum(r.get("energy_j", 0.0) for r in rows),
        "energy_measured": bool(rows) and all(r.get("energy_measured", False) for r in rows),
        **fields,
    }
    acc = summary["final_accuracy"]
    summary["joules_per_accuracy_point"] = summary["energy_j"] / (100 * acc) if acc else None
    return summary
