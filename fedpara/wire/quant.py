"""Compact codecs for update *deltas*: blockwise 4- and 2-bit quantisation, top-k sparsification.

Both are meant for what changes between rounds (a client's delta to the model it trained from,
the coordinator's delta to the model its clients hold), sent with error feedback
(:mod:`fedpara.wire.feedback`) so that nothing is lost for good, only late. Applied to a whole
model state, top-k would zero most of it: :mod:`fedpara.wire.lean` only uses it on deltas.

- ``int4`` / ``int2``: the tensor, flattened, is cut into blocks of ``BLOCK`` elements; block b
  gets lo_b = min, s_b = (max - min) / L (L = 15 / 3) and codes q = round((x - lo_b) / s_b) in
  0..L, two (int4) or four (int2) per byte, element i of a byte's group in bits
  [bits * i, bits * (i + 1)). Parts: ``""`` U8 (ceil(n / codes per byte),) and ``":affine"`` F32
  (ceil(n / BLOCK), 2) = (s_b, lo_b). Error per element <= s_b / 2 (``+sr``: unbiased, < s_b).
  The codes after the last element of the last byte are 0 (a decoder refuses anything else).
- ``topk:F``: the k = max(1, ceil(F * n)) elements of largest magnitude; their positions travel
  as gaps between sorted flat indices (the first is the index itself), U16 when n <= 65,536 else
  U32, which zstd packs well; their values under the spec's dtype (fp32 / fp16 / bf16 / int4 / int2).
  Parts: ``""`` the values (k,) (int4/int2: packed, plus ``":affine"``) and ``":idx"`` (k,).

Every decoder here checks what a hostile peer controls (index range and order, padding, scale
values) and raises :class:`~fedpara.wire.limits.WireError`; the sizes themselves follow from the
manifest's shape, which the envelope checked against ``Limits`` before anything was allocated.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .limits import WireError

BLOCK = 256
#: bits per code of each blockwise dtype
BLOCK_BITS = {"int4": 4, "int2": 2}
#: a tensor smaller than this goes as fp32 under int4/int2 (block header + padding would not pay)
BLOCK_MIN_ELEMENTS = 32
U16_MAX_ELEMENTS = 1 << 16


def blocks(n: int) -> int:
    return -(-n // BLOCK)


def packed_len(n: int, bits: int) -> int:
    """Bytes holding n codes of ``bits`` bits (8 // bits codes a byte)."""
    return -(-n // (8 // bits))


def block_encode(flat: torch.Tensor, bits: int, stochastic: bool = False,
                 generator: torch.Generator | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """(packed codes uint8 (packed_len(n, bits),), affine float32 (blocks, 2)) of a flat float32
    tensor, or None when a value is not finite (the caller falls back to fp32)."""
    n = flat.numel()
    nb = blocks(n)
    levels = (1 << bits) - 1
    pad = nb * BLOCK - n
    x = flat
    if pad:  # pad the last block with its own first value: it does not widen the block's range
        x = torch.cat([flat, flat[(nb - 1) * BLOCK:][:1].expand(pad)])
    blk = x.reshape(nb, BLOCK)
    lo, hi = torch.aminmax(blk, dim=1)
    scale = (hi - lo) / levels
    if not bool(torch.isfinite(scale).all()):
        return None
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    v = (blk - lo[:, None]) / safe[:, None]
    if stochastic:
        v.add_(torch.rand(v.shape, generator=generator, dtype=v.dtype)).floor_()
    else:
        v.round_()
    q = v.clamp_(0, levels).to(torch.uint8).reshape(-1)[:n]
    per = 8 // bits
    if n % per:
        q = torch.cat([q, q.new_zeros(per - n % per)])
    groups = q.reshape(-1, per)
    packed = groups[:, 0].clone()
    for j in range(1, per):
        packed |= groups[:, j] << (bits * j)
    affine = torch.stack([scale, lo], dim=1).contiguous()
    return packed.contiguous().numpy(), affine.numpy()


def block_decode(packed: np.ndarray, affine: np.ndarray, n: int, bits: int) -> torch.Tensor:
    """Inverse of :func:`block_encode`: float32 (n,). WireError for a bad length, a non-zero
    padding code, or a scale that is negative or not finite."""
    name = f"int{bits}"
    if packed.shape != (packed_len(n, bits),) or affine.shape != (blocks(n), 2):
        raise WireError(f"{name}: {packed.shape} codes / {affine.shape} scales do not fit {n} elements")
    aff = torch.from_numpy(np.array(affine, dtype=np.float32))
    if not bool(torch.isfinite(aff).all()) or bool((aff[:, 0] < 0).any()):
        raise WireError(f"{name}: a block scale or offset is negative or not finite")
    b = torch.from_numpy(np.array(packed, dtype=np.uint8))
    per, mask = 8 // bits, (1 << bits) - 1
    used = n % per
    if used and int(b[-1]) >> (bits * used):
        raise WireError(f"{name}: the padding codes after the last element are not 0")
    q = torch.stack([(b >> (bits * j)) & mask for j in range(per)], dim=1).reshape(-1)[:n].to(torch.float32)
    rep = aff.repeat_interleave(BLOCK, dim=0)[:n]
    return torch.addcmul(rep[:, 1], q, rep[:, 0])


def topk_count(n: int, fraction: float) -> int:
    """How many elements ``topk:fraction`` keeps of ``n`` (at least 1 of a non-empty tensor)."""
    return 0 if n == 0 else min(n, max(1, math.ceil(fraction * n)))


def index_code(n: int) -> str:
    return "U16" if n <= U16_MAX_ELEMENTS else "U32"


def topk_select(flat: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted flat indices int64, their values) of the k largest-magnitude elements."""
    if k >= flat.numel():
        idx = torch.arange(flat.numel())
    else:
        idx = torch.topk(flat.abs(), k, sorted=False).indices.sort().values
    return idx, flat[idx]


def gaps_encode(idx: torch.Tensor, n: int) -> np.ndarray:
    gaps = torch.diff(idx, prepend=idx.new_zeros(1)) if idx.numel() else idx
    dtype = np.uint16 if index_code(n) == "U16" else np.uint32
    # sorted distinct indices < n: every gap fits (a U16 gap is at most n - 1 <= 65535)
    return gaps.numpy().astype(dtype)


def gaps_decode(gaps: np.ndarray, k: int, n: int) -> torch.Tensor:
    """Flat int64 indices from gaps. WireError unless there are exactly k, strictly increasing
    (every gap after the first >= 1) and all below n."""
    if gaps.shape != (k,):
        raise WireError(f"topk: {gaps.shape} indices, expected ({k},)")
    if k == 0:
        return torch.zeros(0, dtype=torch.int64)
    g = torch.from_numpy(gaps.astype(np.int64))
    if k > 1 and int(g[1:].min()) < 1:
        raise WireError("topk: indices are not strictly increasing")
    idx = torch.cumsum(g, 0)
    if int(idx[-1]) >= n:
        raise WireError(f"topk: index {int(idx[-1])} out of range for {n} elements")
    return idx
