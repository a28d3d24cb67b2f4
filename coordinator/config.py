"""Typed coordinator configuration: defaults, help per field, TOML loading, flag overrides.

A run file holds the same keys as the dataclass, flat or under a ``[run]`` table::

    run_id = "fmnist-fedpara"
    model = "cnn28"
    scheme = "fedpara"
    ratio = 0.1
    rounds = 20
    clients_per_round = 10
"""
from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedpara.checkpoint import ModelSpec
from fedpara.topics import check_id
from fedpara.wire import CodecPolicy


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class CoordinatorConfig:
    run_id: str = _f("demo", "run id: MQTT topic level and part of every message")
    # model
    model: str = _f("cnn28", "reference model: vgg16 | cnn28 | mlp | char_lstm")
    num_classes: int = _f(10, "number of classes")
    scheme: str = _f("fedpara", "dense | fedpara | lowrank | pfedpara")
    ratio: float = _f(0.1, "the paper's gamma in [0, 1] (rank rule)")
    form: str = _f("tensor", "conv factorisation: tensor (Prop. 3) | matrix (Prop. 1)")
    tanh: bool = _f(False, "tanh on the Hadamard halves (paper App. B)")
    seed: int = _f(0, "seed for model initialisation and client sampling")
    # federation
    rounds: int = _f(5, "number of rounds")
    clients_per_round: int = _f(0, "clients sampled per round (K); 0 = every live client")
    min_clients: int = _f(1, "live clients needed before a round starts")
    min_reply_fraction: float = _f(0.5, "fraction of sampled clients that must reply by the deadline")
    round_deadline_s: float = _f(120.0, "seconds a round waits for replies")
    wait_clients_s: float = _f(120.0, "seconds to wait for min_clients before giving up")
    max_attempts: int = _f(3, "tries per round when too few clients reply (model kept each time)")
    # local training (sent to the clients with every task)
    local_epochs: int = _f(1, "local epochs E per round")
    batch_size: int = _f(64, "local batch size")
    lr: float = _f(0.1, "local SGD learning rate")
    lr_decay: float = _f(0.992, "learning rate multiplier per round (paper: 0.992)")
    momentum: float = _f(0.0, "local SGD momentum (paper: 0)")
    weight_decay: float = _f(0.0, "local SGD weight decay")
    # evaluation
    test_data: str = _f("fashion-mnist", "data spec of the held-out test split evaluated every round")
    eval_batch_size: int = _f(1000, "evaluation batch size")
    # wire
    downlink: str = _f("fp32", "codec policy coordinator -> clients, e.g. 'fp16+zstd:3'")
    uplink: str = _f("fp32", "codec policy clients -> coordinator, e.g. 'fp16' (FedPAQ)")
    max_packet: int = _f(1_000_000, "largest MQTT packet to publish (bytes); payloads are chunked")
    # output
    out: str = _f("runs/demo", "run directory: metrics.jsonl, checkpoints/, summary.json")

    def __post_init__(self) -> None:
        check_id("run_id", self.run_id)
        self.spec  # validates model, num_classes, scheme, ratio, form  # noqa: B018
        for name in ("rounds", "min_clients", "max_attempts", "local_epochs", "batch_size",
                     "eval_batch_size", "max_packet"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: must be a positive int, got {v!r}")
        if isinstance(self.clients_per_round, bool) or not isinstance(self.clients_per_round, int) \
                or self.clients_per_round < 0:
            raise ValueError(f"clients_per_round: must be an int >= 0, got {self.clients_per_round!r}")
        if not 0.0 < self.min_reply_fraction <= 1.0:
            raise ValueError(f"min_reply_fraction: must be in (0, 1], got {self.min_reply_fraction!r}")
        for name in ("round_deadline_s", "wait_clients_s", "lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)!r}")
        if not 0 < self.lr_decay <= 1:
            raise ValueError(f"lr_decay: must be in (0, 1], got {self.lr_decay!r}")
        if self.max_packet < 1024:
            raise ValueError(f"max_packet: must be >= 1024 bytes, got {self.max_packet}")
        for name in ("downlink", "uplink"):
            try:
                CodecPolicy.parse(getattr(self, name))
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None

    @property
    def spec(self) -> ModelSpec:
        return ModelSpec(model=self.model, num_classes=self.num_classes, scheme=self.scheme,
                         ratio=self.ratio, form=self.form, tanh=self.tanh)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_mapping(cls, data: dict[str, Any], source: str = "config") -> CoordinatorConfig:
        data = dict(data.get("run", data)) if isinstance(data.get("run"), dict) else dict(data)
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ValueError(f"{source}: unknown field(s) {unknown}; known: {sorted(names)}")
        for key, value in data.items():
            want = type(names[key].default)
            if want is float and isinstance(value, int) and not isinstance(value, bool):
                data[key] = float(value)
            elif not isinstance(data[key], want) or (want is int and isinstance(value, bool)):
                raise ValueError(f"{key}: expected {want.__name__}, got {type(value).__name__} {value!r}")
        return cls(**data)

    @classmethod
    def load(cls, path: str | Path | None = None, **overrides) -> CoordinatorConfig:
        """TOML file (optional) with flag overrides on top (None values are ignored)."""
        data: dict[str, Any] = {}
        if path is not None:
            try:
                with open(path, "rb") as f:
                    data = tomllib.load(f)
            except tomllib.TOMLDecodeError as exc:
                raise ValueError(f"{path}: invalid TOML: {exc}") from None
            data = dict(data.get("run", data)) if isinstance(data.get("run"), dict) else data
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_mapping(data, str(path or "config"))

    @classmethod
    def help_table(cls) -> list[tuple[str, Any, str]]:
        return [(f.name, f.default, f.metadata["help"]) for f in dataclasses.fields(cls)]
