"""Codec configuration: which codec each tensor travels with, per direction.

Grammar (whitespace ignored)::

    spec    := dtype ["+sr"] ["+topk:" F] ["+zstd" [":" level]]
                                 dtype in fp32 | fp16 | bf16 | int8 | int4 | int2 | raw; 0 < F <= 1
    policy  := [spec] (";" pattern "=" spec)*           first matching fnmatch pattern wins

Examples: ``"fp32"``, ``"fp16+zstd:3"``, ``"int8+sr+zstd"`` (zstd level 3), and
``"fp16+zstd:3; *.bias=fp32"``. ``raw`` keeps the tensor's own dtype bit-exactly. ``int4``, ``int2`` and
``topk:F`` (the fraction F of largest-magnitude elements; values fp32/fp16/bf16/int4/int2) are for
update deltas sent with error feedback (:mod:`fedpara.wire.quant`, :mod:`fedpara.wire.lean`).

Rules the encoder applies on top of the policy (documented in docs/wire.md):

- non-float tensors (int64 counters, bool masks...) always travel as ``raw`` (lossless); the
  policy's zstd level still applies;
- ``int8`` falls back to ``fp32`` for tensors with fewer than 2 dims or fewer than
  ``INT8_MIN_ROW`` elements per output channel (the per-channel scale would cost more than it
  saves), and for tensors holding NaN/Inf (they cannot be quantised);
- ``fp16`` falls back to ``fp32`` for a tensor whose finite values overflow fp16 (|x| > 65504).

The paper's FedPAQ combination (Table 12: FedPara + fp16 uplink) is
``WireConfig(downlink="fp32", uplink="fp16")``, also ``WireConfig.preset("fedpaq")``.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Mapping, Union

from .limits import MessageKind

DTYPES = ("fp32", "fp16", "bf16", "int8", "int4", "int2", "raw")
TOPK_DTYPES = ("fp32", "fp16", "bf16", "int4", "int2")  # value formats top-k can carry
ZSTD_DEFAULT_LEVEL = 3
ZSTD_MIN_LEVEL, ZSTD_MAX_LEVEL = 1, 22


@dataclass(frozen=True)
class CodecSpec:
    """One tensor codec: a number format, optionally followed by zstd."""

    dtype: str = field(default="fp32", metadata={"help": "fp32 | fp16 | bf16 | int8 | int4 | int2 | raw"})
    zstd_level: int | None = field(default=None, metadata={"help": "None = no zstd, else 1..22"})
    stochastic: bool = field(default=False, metadata={"help": "int8/int4/int2: stochastic rounding"})
    topk: float | None = field(default=None, metadata={"help": "None = dense, else the fraction "
                                                       "0 < F <= 1 of largest-magnitude elements "
                                                       "kept (deltas only)"})

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"CodecSpec.dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        level = self.zstd_level
        if level is not None and (
            isinstance(level, bool) or not isinstance(level, int)
            or not ZSTD_MIN_LEVEL <= level <= ZSTD_MAX_LEVEL
        ):
            raise ValueError(
                f"CodecSpec.zstd_level must be None or an int in "
                f"{ZSTD_MIN_LEVEL}..{ZSTD_MAX_LEVEL}, got {level!r}"
            )
        if not isinstance(self.stochastic, bool):
            raise ValueError(f"CodecSpec.stochastic must be a bool, got {self.stochastic!r}")
        if self.stochastic and self.dtype not in ("int8", "int4", "int2"):
            raise ValueError(f"CodecSpec.stochastic applies to int8, int4 and int2 only, not {self.dtype}")
        f = self.topk
        if f is not None:
            if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 < f <= 1.0:
                raise ValueError(f"CodecSpec.topk must be None or a fraction in (0, 1], got {f!r}")
            object.__setattr__(self, "topk", float(f))
            if self.dtype not in TOPK_DTYPES:
                raise ValueError(f"CodecSpec.topk values must be one of {', '.join(TOPK_DTYPES)}, "
                                 f"not {self.dtype}")

    @classmethod
    def parse(cls, text: str | CodecSpec) -> CodecSpec:
        if isinstance(text, CodecSpec):
            return text
        if not isinstance(text, str):
            raise ValueError(f"CodecSpec.parse expects a string, got {type(text).__name__}")
        parts = [p.strip().lower() for p in text.split("+")]
        dtype, level, stochastic, topk = parts[0], None, False, None
        for part in parts[1:]:
            name, _, arg = part.partition(":")
            if name == "sr" and not arg and not stochastic:
                stochastic = True
            elif name == "topk" and topk is None:
                try:
                    topk = float(arg)
                except ValueError:
                    raise ValueError(f"CodecSpec.topk: not a number in {text!r}") from None
                if topk != topk:  # NaN
                    raise ValueError(f"CodecSpec.topk: not a number in {text!r}")
            elif name == "zstd" and level is None:
                try:
                    level = int(arg) if arg else ZSTD_DEFAULT_LEVEL
                except ValueError:
                    raise ValueError(f"CodecSpec.zstd_level: not an integer in {text!r}") from None
            else:
                raise ValueError(f"CodecSpec: unknown or repeated option {part!r} in {text!r} "
                                 "(expected dtype[+sr][+topk:F][+zstd[:level]])")
        return cls(dtype=dtype, zstd_level=level, stochastic=stochastic, topk=topk)

    def __str__(self) -> str:
        s = self.dtype + ("+sr" if self.stochastic else "")
        if self.topk is not None:
            s += f"+topk:{self.topk!r}"
        return s if self.zstd_level is None else f"{s}+zstd:{self.zstd_level}"


SpecLike = Union[CodecSpec, str]


@dataclass(frozen=True)
class CodecPolicy:
    """A default codec plus ordered per-tensor overrides (fnmatch pattern -> codec)."""

    default: CodecSpec = field(default_factory=CodecSpec, metadata={"help": "codec for tensors "
                                                                    "no override matches"})
    overrides: tuple[tuple[str, CodecSpec], ...] = field(
        default=(), metadata={"help": "(pattern, codec) pairs; the first match wins"}
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "default", CodecSpec.parse(self.default))
        items = self.overrides.items() if isinstance(self.overrides, Mapping) else self.overrides
        pairs = []
        for item in items:
            try:
                pattern, spec = item
            except (TypeError, ValueError):
                raise ValueError(f"CodecPolicy.overrides: expected (pattern, codec), got {item!r}") from None
            if not isinstance(pattern, str) or not pattern or any(c in pattern for c in ";="):
                raise ValueError(f"CodecPolicy.overrides: bad pattern {pattern!r}")
            pairs.append((pattern, CodecSpec.parse(spec)))
        object.__setattr__(self, "overrides", tuple(pairs))

    @classmethod
    def parse(cls, text: str | CodecPolicy) -> CodecPolicy:
        if isinstance(text, CodecPolicy):
            return text
        if not isinstance(text, str):
            raise ValueError(f"CodecPolicy.parse expects a string, got {type(text).__name__}")
        default: CodecSpec | None = None
        overrides = []
        for i, item in enumerate(p.strip() for p in text.split(";")):
            if not item:
                continue
            if "=" in item:
                pattern, _, spec = item.partition("=")
                overrides.append((pattern.strip(), CodecSpec.parse(spec)))
            elif i == 0:
                default = CodecSpec.parse(item)
            else:
                raise ValueError(f"CodecPolicy: {item!r} must be pattern=codec (only the first "
                                 "item may be a bare default codec)")
        return cls(default=default or CodecSpec(), overrides=tuple(overrides))

    def __str__(self) -> str:
        return "; ".join([str(self.default)] + [f"{p}={s}" for p, s in self.overrides])

    def for_tensor(self, name: str) -> CodecSpec:
        for pattern, spec in self.overrides:
            if fnmatch.fnmatchcase(name, pattern):
                return spec
        return self.default


PolicyLike = Union[CodecPolicy, str]

_PRESETS = {
    "dense": ("fp32", "fp32"),
    "fedpaq": ("fp32", "fp16"),  # the paper's Table 12: fp16 uplink only
    "fp16": ("fp16+zstd:3", "fp16+zstd:3"),
    "int8": ("fp16+zstd:3", "int8+sr+zstd:3"),
}


@dataclass(frozen=True)
class WireConfig:
    """Codec policy per direction. task/control use downlink; update/status use uplink."""

    downlink: CodecPolicy = field(default_factory=CodecPolicy,
                                  metadata={"help": "coordinator -> clients"})
    uplink: CodecPolicy = field(default_factory=CodecPolicy,
                                metadata={"help": "clients -> coordinator"})

    def __post_init__(self) -> None:
        object.__setattr__(self, "downlink", CodecPolicy.parse(self.downlink))
        object.__setattr__(self, "uplink", CodecPolicy.parse(self.uplink))

    @classmethod
    def preset(cls, name: str) -> WireConfig:
        """dense (fp32 both ways), fedpaq (fp16 uplink), fp16 (+zstd both), int8 (int8+sr up)."""
        try:
            down, up = _PRESETS[name]
        except KeyError:
            raise ValueError(f"WireConfig.preset: unknown {name!r} (known: {', '.join(_PRESETS)})") from None
        return cls(downlink=down, uplink=up)

    def policy_for(self, kind) -> CodecPolicy:
        return self.uplink if MessageKind.coerce(kind).uplink else self.downlink

