"""Typed edge-client configuration (TOML file and/or flags; flags win)."""
from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedpara.data import parse_data_spec
from fedpara.topics import check_id


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class ClientConfig:
    client_id: str = _f("client-0", "unique client id (an MQTT topic level)")
    run_id: str = _f("demo", "run to join (must match the coordinator's run_id)")
    data: str = _f("fashion-mnist", "data spec, e.g. fashion-mnist,partition=iid,clients=3,index=0")
    device: str = _f("auto", "auto | cpu | cuda[:N]")
    threads: int = _f(1, "torch CPU threads (1 avoids contention with other processes)")
    state_dir: str = _f("", "where local state lives (pFedPara local factors, last global); "
                            "default: ./client-state/<client_id>")
    energy: str = _f("auto", "energy meter: auto | rapl | jetson | nvml | rpi | external | estimate | off")
    export_on_finish: bool = _f(False, "export the final (personalised) model to ONNX when the run ends")
    exit_on_finish: bool = _f(True, "exit when the coordinator announces the end of the run")
    eval_local: bool = _f(True, "evaluate on the local test split after training (reported to the coordinator)")

    def __post_init__(self) -> None:
        check_id("client_id", self.client_id)
        check_id("run_id", self.run_id)
        try:
            parse_data_spec(self.data)
        except ValueError as exc:
            raise ValueError(f"data: {exc}") from None
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 1:
            raise ValueError(f"threads: must be a positive int, got {self.threads!r}")
        if not (self.device in ("auto", "cpu") or self.device.startswith("cuda")):
            raise ValueError(f"device: expected auto, cpu or cuda[:N], got {self.device!r}")
        if not self.state_dir:
            self.state_dir = str(Path("client-state") / self.client_id)

    @classmethod
    def load(cls, path: str | Path | None = None, **overrides) -> ClientConfig:
        data: dict[str, Any] = {}
        if path is not None:
            with open(path, "rb") as f:
                try:
                    data = tomllib.load(f)
                except tomllib.TOMLDecodeError as exc:
                    raise ValueError(f"{path}: invalid TOML: {exc}") from None
            data = dict(data.get("client", data))
        data.update({k: v for k, v in overrides.items() if v is not None})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{path or 'config'}: unknown field(s) {unknown}; known: {sorted(names)}")
        return cls(**data)
