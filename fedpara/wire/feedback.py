"""Error feedback: what a lossy codec did not send this round is added to the next round's delta.

    x_t     = delta_t + e_t              (what should be sent, owed residual included)
    sent_t  = decode(encode(x_t))        (what the receiver really gets)
    e_{t+1} = x_t - sent_t               (the residual: owed, not lost)

so after T rounds sum(sent) = sum(delta) - e_{T+1}: the running sum of what was sent tracks the
running sum of what should have been sent up to one residual, which a codec whose error is
bounded relative to its input keeps bounded (Karimireddy et al. 2019, "Error Feedback Fixes
SignSGD"; Stich et al. 2018 for top-k). ``tests/test_compress_feedback.py`` checks that property.

Only float tensors carry a residual. A residual is saved with what it belongs to (run id and model
spec, :meth:`ErrorFeedback.save`) and refused on load for another run or model: a client restart
keeps it, a new run starts from zero.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Mapping

from torch import Tensor

log = logging.getLogger(__name__)


class ErrorFeedback:
    """Per-tensor residuals of one sender and direction."""

    def __init__(self) -> None:
        self.residual: dict[str, Tensor] = {}

    def add(self, delta: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """delta + the residual owed (float tensors; others pass through). A residual whose name
        or shape no longer fits (the model changed) is dropped."""
        out = {}
        for name, d in delta.items():
            r = self.residual.get(name)
            if d.is_floating_point() and r is not None and r.shape == d.shape:
                out[name] = d.float() + r
            else:
                out[name] = d
        return out

    def settle(self, intended: Mapping[str, Tensor], sent: Mapping[str, Tensor]) -> None:
        """The new residual: what should have been sent minus what the receiver decoded."""
        self.residual = {name: (x.float() - sent[name].float()).contiguous()
                         for name, x in intended.items() if x.is_floating_point() and name in sent}

    def norm(self) -> float:
        return float(sum(float(r.double().pow(2).sum()) for r in self.residual.values()) ** 0.5)

    def clear(self) -> None:
        self.residual = {}

    def save(self, path: str | os.PathLike, owner: Mapping) -> None:
        """Atomically write the residuals with ``owner`` (JSON: run id, model spec, round)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file({k: v.contiguous() for k, v in self.residual.items()}, str(tmp),
                  metadata={"owner": json.dumps(dict(owner), sort_keys=True)})
        os.replace(tmp, path)

    def load(self, path: str | os.PathLike, owner: Mapping) -> bool:
        """Restore residuals saved for the same ``owner`` keys; anything else (another run or
        model, a damaged file) is ignored with a log line and the residual starts at zero."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.exists():
            return False
        try:
            with safe_open(str(path), framework="pt") as f:
                saved = json.loads((f.metadata() or {}).get("owner", "{}"))
                if any(saved.get(k) != v for k, v in owner.items()):
                    log.info("error-feedback residual %s belongs to %s, not %s: starting from zero",
                             path, saved, dict(owner))
                    return False
                self.residual = {k: f.get_tensor(k).float() for k in f.keys()}
        except (OSError, ValueError, SafetensorError) as exc:
            log.warning("ignoring error-feedback residual %s: %s", path, exc)
            self.residual = {}
            return False
        return True
