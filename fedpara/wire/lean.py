"""Delta coding with error feedback, stacked on FedPara's factors (docs/compression.md).

Both directions send what changed, compressed, instead of the state:

- **Downlink.** The coordinator keeps a *mirror* M: the exact state its lean clients hold. Each
  task carries x = G - M (G: the global model, so x is the round's change plus everything earlier
  tasks did not deliver: the downlink's error feedback, one for the fan-out), encoded under the
  downlink delta policy; sender and receivers then both set M += decode(x), and the task names
  the digests of M before ("base") and after ("target"). A client whose state is not the base,
  or whose result is not the target, refuses the delta and re-announces what it holds; the
  coordinator answers with the full state (fp32, exact). Round 1's base is the initial model,
  which every client builds itself from the task's spec and seed (its digest proves it).
- **Uplink.** A client sends Δ = trained - M (+ its residual, :mod:`.feedback`) under the uplink
  delta policy, naming M's digest; the coordinator adds the decoded Δ to G, so FedAvg of the
  reconstructed states is G + mean(Δ). The residual is kept in the client's state directory.

Statuses announce ``codecs`` (what this client decodes) and ``lean.holds`` (the digest of the state
it holds), like ``digests``. Stochastic rounding is refused in delta policies: the mirror must be
reproducible from the policy alone (and error feedback makes rounding bias harmless).
"""
from __future__ import annotations

import re
from typing import Any, Mapping

from torch import Tensor

from fedpara.state import state_digest  # noqa: F401  (re-exported: lean's chained digests)

from .limits import WireError
from .policy import CodecPolicy

#: coordinator ``wire`` settings: plain = the downlink/uplink policies on whole states (as
#: before); delta = delta coding + error feedback under those policies; lean = delta with the
#: preset below, measured in docs/compression.md
WIRE_MODES = ("plain", "delta", "lean")
# bench_compress.py "delta-int2": the fewest bytes to the target among the configurations within 1 pp of
# FedPara fp32 on mlp2 and cnn28, IID and Dirichlet(0.5) (docs/compression.md)
LEAN_DOWNLINK = "int2+zstd:3"
LEAN_UPLINK = "int2+zstd:3"
FULL_POLICY = "fp32+zstd:1"  # a full state must arrive exactly (the mirror's digest)
#: what this installation decodes, announced in a client's status (docs/compression.md)
CODECS = ("fp32", "fp16", "bf16", "int8", "int4", "int2", "topk", "delta")
_DIGEST = re.compile(r"[0-9a-f]{64}")


def delta_policy(text: str, what: str = "policy") -> CodecPolicy:
    """A codec policy usable for deltas: parsed, and without stochastic rounding."""
    pol = CodecPolicy.parse(text)
    for spec in [pol.default] + [s for _, s in pol.overrides]:
        if spec.stochastic:
            raise ValueError(f"{what}: stochastic rounding (+sr) cannot be delta coded (the receivers' "
                             "state must follow from the policy alone; error feedback removes the bias)")
    return pol


def subtract(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """a - b for float tensors (float32); other tensors (counters) travel whole: a's."""
    return {k: (v.float() - b[k].float()) if v.is_floating_point() else v for k, v in a.items()}


def apply(base: Mapping[str, Tensor], delta: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """base + delta for float tensors, delta itself for others. WireError when names or shapes
    differ from the base (a delta for another model)."""
    if set(base) != set(delta):
        missing, extra = sorted(set(base) - set(delta))[:3], sorted(set(delta) - set(base))[:3]
        raise WireError(f"delta does not fit the state it applies to (missing {missing}, extra {extra})")
    out = {}
    for k, b in base.items():
        d = delta[k]
        if tuple(d.shape) != tuple(b.shape):
            raise WireError(f"delta {k!r}: shape {tuple(d.shape)} != {tuple(b.shape)}")
        if b.is_floating_point():
            out[k] = (b.float() + d.float()).to(b.dtype)
        else:
            out[k] = d.to(b.dtype).clone()
    return out


def digest_field(value: Any, what: str) -> str:
    if not isinstance(value, str) or not _DIGEST.fullmatch(value):
        raise WireError(f"{what}: expected a 64-character hex digest")
    return value


def task_lean(meta: Mapping) -> dict | None:
    """The validated ``lean`` key of a task's meta, or None for a plain task:
    {"mode": "delta" | "full", "base": digest (delta only), "target": digest, "ef": bool}."""
    raw = meta.get("lean")
    if raw is None:
        return None
    if not isinstance(raw, Mapping) or raw.get("mode") not in ("delta", "full"):
        raise WireError("task.lean: expected {mode: delta|full, ...}")
    out = {"mode": raw["mode"], "target": digest_field(raw.get("target"), "task.lean.target"),
           "ef": raw.get("ef", True)}
    if not isinstance(out["ef"], bool):
        raise WireError("task.lean.ef: expected a bool")
    if out["mode"] == "delta":
        out["base"] = digest_field(raw.get("base"), "task.lean.base")
    return out


def policy_codecs(*policies: CodecPolicy) -> set[str]:
    """The ``codecs`` names a client must announce to decode and encode under these policies, with
    delta coding (an older client announcing fewer gets full fp32 states, as one announcing none)."""
    out = {"delta"}
    for pol in policies:
        for spec in [pol.default] + [s for _, s in pol.overrides]:
            out.add(spec.dtype)
            if spec.topk is not None:
                out.add("topk")
    out.discard("raw")  # every version carries non-float tensors raw
    return out


def status_holds(meta: Mapping, needs: set[str] = frozenset({"delta"})) -> tuple[bool, str | None, str | None]:
    """(announces delta coding and every codec in ``needs``, the digest it holds or None, the task
    id whose delta it refused or None) from a client's status meta; malformed values read as None."""
    codecs = meta.get("codecs")
    capable = isinstance(codecs, list) and needs <= {c for c in codecs if isinstance(c, str)}
    lean = meta.get("lean")
    lean = lean if isinstance(lean, Mapping) else {}
    holds, refused = lean.get("holds"), lean.get("refused")
    if holds is not None and not (isinstance(holds, str) and _DIGEST.fullmatch(holds)):
        holds = None
    if not (isinstance(refused, str) and len(refused) <= 256):
        refused = None
    return capable, holds, refused
