"""Typed edge-client configuration (TOML file and/or flags; flags win)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedpara.data import parse_data_spec
from fedpara.runtime.options import check_device, check_int, load_config, option
from fedpara.runtime.topics import check_id


@dataclass
class ClientConfig:
    client_id: str = option("client-0", "unique client id (an MQTT topic level)")
    run_id: str = option("demo", "run to join (must match the coordinator's run_id)", flag="--run")
    data: str = option("fashion-mnist", "data spec, e.g. fashion-mnist,partition=iid,clients=3,index=0")
    device: str = option("auto", "auto | cpu | cuda[:N]")
    threads: int = option(1, "torch CPU threads (1 avoids contention with other processes)")
    state_dir: str = option("", "where local state lives (pFedPara local factors, last global); "
                            "default: ./client-state/<client_id>")
    energy: str = option("auto", "energy meter: auto | rapl | jetson | nvml | rpi | external | estimate | off")
    energy_options: dict = option(None, "more energy settings (TOML table [client.energy_options]): link "
                                        "(wifi|lte|ethernet), profile, external_cmd, external_file, cpu_watts, ... "
                                        "see edge_client/energy/config.py", default_factory=dict)
    export_on_finish: bool = option(False, "export the final (personalised) model to ONNX when the run ends")
    exit_on_finish: bool = option(True, "exit when the coordinator announces the end of the run")
    eval_local: bool = option(True, "evaluate on the local test split after training (reported to the coordinator)")

    def __post_init__(self) -> None:
        check_id("client_id", self.client_id)
        check_id("run_id", self.run_id)
        try:
            parse_data_spec(self.data)
        except ValueError as exc:
            raise ValueError(f"data: {exc}") from None
        check_int("threads", self.threads, min=1, max=1024)
        check_device("device", self.device)
        if self.energy != "off":
            from .energy import EnergyConfig
            try:
                EnergyConfig.from_dict({**self.energy_options, "meter": self.energy})
            except (ValueError, TypeError) as exc:
                raise ValueError(f"energy_options: {exc}") from None
        if not self.state_dir:
            self.state_dir = str(Path("client-state") / self.client_id)

    @classmethod
    def load(cls, path: str | Path | None = None, **overrides) -> ClientConfig:
        """TOML file (optional, keys flat or under [client]) with flag overrides (None is ignored)."""
        return load_config(cls, path, "client", overrides)
