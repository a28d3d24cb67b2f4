"""Tensor codecs: float32 in, compact arrays out, and back.

- ``fp32`` / ``fp16`` / ``bf16``: a cast (round to nearest even).
- ``int8``: per-output-channel affine quantisation. A tensor of shape (C, ...) is viewed as
  rows x (C, K); each row c gets lo_c = min, scale_c = (max - min) / 255 and codes
  q = round((x - lo_c) / scale_c) in 0..255 (uint8); the decoder returns lo_c + q * scale_c.
  Error per element <= scale_c / 2. With stochastic rounding q = floor((x - lo_c)/scale_c + u),
  u ~ U[0, 1), the decoded value is unbiased (E[x_hat] = x, error < scale_c), so averaging many
  clients' updates (FedAvg) does not accumulate rounding bias (FedPAQ, Reisizadeh et al. 2020).
- ``raw``: the tensor's own dtype, bit-exact. Non-float tensors always use it.

zstd is applied afterwards, per section (see envelope.py), not here. Each codec turns one tensor
into parts ``{suffix: (safetensors dtype, shape, array)}``; suffix "" is the main array and int8
adds ":affine" (float32, shape (C, 2): scale_c, lo_c per row).
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np
import torch

from .blob import FROM_TORCH, ST_DTYPES, TORCH_NAMES, to_numpy
from . import quant
from .limits import WireError
from .policy import CodecSpec

#: int8 needs at least this many elements per output channel, else the tensor goes as fp32
#: (a per-row scale + offset costs 8 bytes; below 16 elements int8 would not beat fp16).
INT8_MIN_ROW = 16
FP16_MAX = 65504.0

Parts = dict[str, tuple[str, tuple[int, ...], np.ndarray]]

_MAIN_CODE = {"fp32": "F32", "fp16": "F16", "bf16": "BF16", "int8": "U8", "int4": "U8", "int2": "U8"}


def is_float(dtype_name: str) -> bool:
    return dtype_name in ("float64", "float32", "float16", "bfloat16")


def finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in ``t``. A finite sum proves every element finite (NaN/Inf propagate)
    without allocating a mask; only a sum that overflows needs the element-wise check."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def _fp32(x: torch.Tensor) -> Parts:
    return {"": ("F32", tuple(x.shape), to_numpy(x))}


def _cast(x: torch.Tensor, dtype: torch.dtype, code: str) -> Parts | None:
    """x cast to fp16/bf16, or None when finite values overflow (caller falls back to fp32)."""
    y = x.to(dtype)
    if x.numel():
        lo, hi = torch.aminmax(x)  # one pass, no mask: in range (and not NaN) means no overflow
        limit = torch.finfo(dtype).max
        if not (-limit <= lo.item() and hi.item() <= limit):
            if bool((torch.isinf(y) & torch.isfinite(x)).any()):
                return None
    return {"": (code, tuple(x.shape), to_numpy(y))}


def _int8(x: torch.Tensor, stochastic: bool, generator: torch.Generator | None) -> Parts | None:
    """Per-row affine uint8 codes, or None when int8 does not apply (caller falls back to fp32)."""
    if x.dim() < 2 or x.shape[0] == 0 or x.numel() // x.shape[0] < INT8_MIN_ROW:
        return None
    rows = x.reshape(x.shape[0], -1)  # (C, K)
    lo, hi = torch.aminmax(rows, dim=1)  # (C,), (C,)
    scale = (hi - lo) / 255.0
    if not bool(torch.isfinite(scale).all()):  # NaN/Inf inside, or a range beyond float32
        return None
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    v = (rows - lo[:, None]) / safe[:, None]  # (C, K), in [0, 255]
    if stochastic:
        v.add_(torch.rand(v.shape, generator=generator, dtype=v.dtype)).floor_()
    else:
        v.round_()
    q = v.clamp_(0, 255).to(torch.uint8).reshape(x.shape)
    affine = torch.stack([scale, lo], dim=1)  # (C, 2)
    return {"": ("U8", tuple(x.shape), to_numpy(q)), ":affine": ("F32", (x.shape[0], 2), to_numpy(affine))}


def _blockwise(x: torch.Tensor, bits: int, stochastic: bool, generator: torch.Generator | None) -> Parts | None:
    """Blockwise 4- or 2-bit codes (quant.py), or None for a tiny or non-finite tensor (-> fp32)."""
    if x.numel() < quant.BLOCK_MIN_ELEMENTS:
        return None
    got = quant.block_encode(x.reshape(-1), bits, stochastic, generator)
    if got is None:
        return None
    packed, affine = got
    return {"": ("U8", packed.shape, packed), ":affine": ("F32", affine.shape, affine)}


def _topk(x: torch.Tensor, spec: CodecSpec, generator: torch.Generator | None) -> tuple[CodecSpec, Parts]:
    """The k largest-magnitude elements: gap-coded positions and values under spec.dtype. A tensor
    holding NaN/Inf goes whole as fp32 (its magnitude order means nothing)."""
    flat = x.reshape(-1)
    if not finite(flat):
        return CodecSpec("fp32", spec.zstd_level), _fp32(x)
    n = flat.numel()
    k = quant.topk_count(n, spec.topk)
    idx, values = quant.topk_select(flat, k)
    gaps = quant.gaps_encode(idx, n)
    parts: Parts = {":idx": (quant.index_code(n), (k,), gaps)}
    bits = quant.BLOCK_BITS.get(spec.dtype)
    if bits:
        got = quant.block_encode(values, bits, spec.stochastic, generator) if k else None
        if got is None:  # no values: nothing to quantise; keep the layout fixed anyway
            got = (np.zeros(quant.packed_len(k, bits), np.uint8), np.zeros((quant.blocks(k), 2), np.float32))
        parts[""] = ("U8", got[0].shape, got[0])
        parts[":affine"] = ("F32", got[1].shape, got[1])
    elif spec.dtype == "fp32":
        parts[""] = ("F32", (k,), to_numpy(values.contiguous()))
    else:
        cast = _cast(values, torch.float16 if spec.dtype == "fp16" else torch.bfloat16, _MAIN_CODE[spec.dtype])
        if cast is None:  # a kept value overflows fp16: the values go as fp32
            spec = CodecSpec("fp32", spec.zstd_level, topk=spec.topk)
            cast = {"": ("F32", (k,), to_numpy(values.contiguous()))}
        parts[""] = cast[""]
    return spec, parts


def encode_tensor(
    t: torch.Tensor, spec: CodecSpec, generator: torch.Generator | None = None
) -> tuple[CodecSpec, Parts]:
    """(codec actually used, parts). Non-float -> raw; fallbacks as in policy.py."""
    if not isinstance(t, torch.Tensor):
        raise WireError(f"expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FROM_TORCH:
        raise WireError(f"unsupported tensor dtype {t.dtype} (supported: "
                        f"{', '.join(sorted(TORCH_NAMES))})")
    if t.is_complex() or not t.is_floating_point() or spec.dtype == "raw":
        used = CodecSpec("raw", spec.zstd_level)
        return used, {"": (FROM_TORCH[t.dtype], tuple(t.shape), to_numpy(t))}
    x = t.detach().to(device="cpu", dtype=torch.float32)
    if spec.topk is not None:
        return _topk(x, spec, generator)
    parts = None
    if spec.dtype in quant.BLOCK_BITS:
        parts = _blockwise(x, quant.BLOCK_BITS[spec.dtype], spec.stochastic, generator)
    elif spec.dtype == "fp16":
        parts = _cast(x, torch.float16, "F16")
    elif spec.dtype == "bf16":
        parts = _cast(x, torch.bfloat16, "BF16")
    elif spec.dtype == "int8":
        parts = _int8(x, spec.stochastic, generator)
    if parts is None:  # fp32 asked for, or a fallback
        return CodecSpec("fp32", spec.zstd_level), _fp32(x)
    return spec, parts


def expected_parts(
    codec: CodecSpec, dtype_name: str, shape: tuple[int, ...]
) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{suffix: (safetensors dtype, shape)} a decoder must find for this manifest entry."""
    if codec.dtype == "raw":
        return {"": (TORCH_NAMES[dtype_name], shape)}
    if not is_float(dtype_name):
        raise WireError(f"codec {codec} cannot carry a {dtype_name} tensor (only raw can)")
    n = math.prod(shape)
    if codec.topk is not None:
        k = quant.topk_count(n, codec.topk)
        out = {":idx": (quant.index_code(n), (k,))}
        return {**out, **_value_parts(codec, k)}
    if codec.dtype in quant.BLOCK_BITS:
        return _value_parts(codec, n)
    if codec.dtype == "int8":
        if len(shape) < 1:
            raise WireError("codec int8 needs a tensor with at least one dimension")
        return {"": ("U8", shape), ":affine": ("F32", (shape[0], 2))}
    return {"": (_MAIN_CODE[codec.dtype], shape)}


def _value_parts(codec: CodecSpec, n: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The parts carrying n values under a top-k or blockwise codec."""
    bits = quant.BLOCK_BITS.get(codec.dtype)
    if bits:
        return {"": ("U8", (quant.packed_len(n, bits),)), ":affine": ("F32", (quant.blocks(n), 2))}
    return {"": (_MAIN_CODE[codec.dtype], (n,))}


def decoded_dtype(codec: CodecSpec, dtype_name: str) -> torch.dtype:
    """Float codecs decode to float32; raw keeps the original dtype."""
    return ST_DTYPES[TORCH_NAMES[dtype_name]][1] if codec.dtype == "raw" else torch.float32


def decode_tensor(codec: CodecSpec, dtype_name: str, parts: Mapping[str, np.ndarray], *,
                  alias: bool = False, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """Inverse of encode_tensor, from the validated arrays (views into the message; copied here
    unless ``alias`` and the view is writable and aligned: then the tensor shares its memory).
    ``shape``: the manifest's (needed by int4/int2 and topk, whose parts do not have it)."""
    main = parts[""]
    if codec.topk is not None or codec.dtype in quant.BLOCK_BITS:
        if shape is None:
            raise WireError(f"codec {codec} needs the tensor's shape to decode")
        return _decode_compact(codec, parts, shape)

    def own(arr: np.ndarray) -> np.ndarray:
        return arr if alias and arr.flags.writeable and arr.flags.aligned else arr.copy()

    if codec.dtype == "raw":
        if dtype_name == "bool":  # normalise: any non-zero byte is True
            return torch.from_numpy(np.asarray(main.view(np.uint8) != 0))
        if dtype_name == "bfloat16":
            return torch.from_numpy(own(main)).view(torch.bfloat16)
        return torch.from_numpy(own(main))
    if codec.dtype == "fp32":
        return torch.from_numpy(own(main))
    if codec.dtype == "fp16":
        return torch.from_numpy(main.astype(np.float32))
    if codec.dtype == "bf16":
        return torch.from_numpy(np.asarray(main.astype(np.uint32) << 16).view(np.float32))
    # int8: (C, K) codes -> lo + q * scale
    c = main.shape[0]
    k = math.prod(main.shape[1:])
    q = torch.from_numpy(main.reshape(c, k).astype(np.float32))
    affine = torch.from_numpy(parts[":affine"].copy())  # (C, 2): scale, lo
    return torch.addcmul(affine[:, 1:], q, affine[:, :1]).reshape(main.shape)


def _values(codec: CodecSpec, parts: Mapping[str, np.ndarray], n: int) -> torch.Tensor:
    main = parts[""]
    if codec.dtype in quant.BLOCK_BITS:
        return quant.block_decode(main, parts[":affine"], n, quant.BLOCK_BITS[codec.dtype])
    if codec.dtype == "fp32":
        return torch.from_numpy(main.copy())
    if codec.dtype == "fp16":
        return torch.from_numpy(main.astype(np.float32))
    return torch.from_numpy(np.asarray(main.astype(np.uint32) << 16).view(np.float32))  # bf16


def _decode_compact(codec: CodecSpec, parts: Mapping[str, np.ndarray], shape: tuple[int, ...]) -> torch.Tensor:
    """int4/int2 and topk: float32 of ``shape``; every index and scale checked (WireError)."""
    n = math.prod(shape)
    if codec.topk is None:
        return _values(codec, parts, n).reshape(shape)
    k = quant.topk_count(n, codec.topk)
    idx = quant.gaps_decode(parts[":idx"], k, n)
    values = _values(codec, parts, k)
    if values.shape != (k,):
        raise WireError(f"topk: {tuple(values.shape)} values for {k} positions")
    out = torch.zeros(n, dtype=torch.float32)
    out[idx] = values
    return out.reshape(shape)


def roundtrip(t: torch.Tensor, spec: CodecSpec, generator: torch.Generator | None = None) -> torch.Tensor:
    """What a receiver decodes of ``t`` sent under ``spec`` (no envelope): for error feedback."""
    used, parts = encode_tensor(t, spec, generator)
    dtype_name = str(t.dtype).removeprefix("torch.")
    return decode_tensor(used, dtype_name, {s: arr for s, (_, _, arr) in parts.items()}, shape=tuple(t.shape))
