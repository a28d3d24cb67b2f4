"""Typed edge-client configuration (TOML file and/or flags; flags win)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedpara.data import parse_data_spec
from fedpara.runtime.options import (
    check_device,
    check_int,
    check_number,
    load_config,
    option,
)
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
    key: str = option("", "this device's Ed25519 private key, or a directory holding <client_id>.key "
                          "(fedpara keys new ID --dir DIR)")
    coordinator_pub: str = option("", "the coordinator's public key: only messages it signed are obeyed")
    insecure: bool = option(False, "run unsigned and obey anyone who can publish on the broker (warns)")
    max_message_age_s: float = option(600.0, "signed messages older (or newer) than this by our clock are refused")
    heartbeat_s: float = option(10.0, "seconds between repeated online statuses (0: none); the coordinator "
                                      "drops a client silent for 3 periods, even when its last will was lost")
    eval_local: bool = option(True, "evaluate on the local test split after training (reported to the coordinator)")
    save_every: int = option(-1, "write the trained global factors to state_dir every N rounds; 0: only when "
                                 "the run ends or the client stops; -1: every round for one client, at the end "
                                 "for the clients of a --pool. pFedPara's local half is written every round")

    def __post_init__(self) -> None:
        check_id("client_id", self.client_id)
        check_id("run_id", self.run_id)
        try:
            parse_data_spec(self.data)
        except ValueError as exc:
            raise ValueError(f"data: {exc}") from None
        check_int("threads", self.threads, min=1, max=1024)
        check_device("device", self.device)
        check_number("heartbeat_s", self.heartbeat_s, min=0.0, max=3600.0)
        check_number("max_message_age_s", self.max_message_age_s, min=1.0)
        check_int("save_every", self.save_every, min=-1)
        if self.energy != "off":
            from .energy import EnergyConfig
            try:
                EnergyConfig.from_dict({**self.energy_options, "meter": self.energy})
            except (ValueError, TypeError) as exc:
                raise ValueError(f"energy_options: {exc}") from None
        if not self.insecure:
            for name, what in (("key", "this device's private key"), ("coordinator_pub", "the coordinator's public key")):
                if not getattr(self, name):
                    raise ValueError(f"{name}: a signed run needs {what} (fedpara keys new ...), "
                                     "or insecure = true to run unsigned")
        if not self.state_dir:
            self.state_dir = str(Path("client-state") / self.client_id)

    @property
    def key_path(self) -> Path:
        p = Path(self.key)
        return p / f"{self.client_id}.key" if p.is_dir() else p

    @classmethod
    def load(cls, path: str | Path | None = None, **overrides) -> ClientConfig:
        """TOML file (optional, keys flat or under [client]) with flag overrides (None is ignored)."""
        return load_config(cls, path, "client", overrides)
