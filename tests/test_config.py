"""Typed configs: TOML + flags, errors that name the field."""
from pathlib import Path

import pytest

from coordinator.config import CoordinatorConfig
from edge_client.config import ClientConfig
from fedpara.runtime.mqtt import parse_broker_url


def test_coordinator_toml_and_overrides(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text('[run]\nrun_id = "r1"\nmodel = "mlp"\nscheme = "pfedpara"\nratio = 0.5\nrounds = 7\nlr = 1\n'
                 'insecure = true\n')
    cfg = CoordinatorConfig.load(f, rounds=3, uplink="fp16")
    assert (cfg.run_id, cfg.model, cfg.scheme, cfg.rounds, cfg.uplink, cfg.lr) == ("r1", "mlp", "pfedpara", 3, "fp16", 1.0)
    assert cfg.spec.scheme == "pfedpara"


@pytest.mark.parametrize("data,field", [
    ({"rounds": 0}, "rounds"), ({"rounds": "5"}, "rounds"), ({"ratio": 1.5}, "ratio"),
    ({"scheme": "lora"}, "scheme"), ({"model": "resnet"}, "model"), ({"uplink": "fp12"}, "uplink"),
    ({"run_id": "a/b"}, "run_id"), ({"min_reply_fraction": 0.0}, "min_reply_fraction"),
    ({"roundz": 1}, "roundz"), ({"max_packet": 10}, "max_packet"), ({"tanh": "yes"}, "tanh"),
])
def test_coordinator_config_errors_name_the_field(data, field):
    with pytest.raises(ValueError, match=field):
        CoordinatorConfig.from_mapping(data)


def test_bad_toml_is_a_clear_error(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text("rounds = = 3")
    with pytest.raises(ValueError, match="invalid TOML"):
        CoordinatorConfig.load(f)


@pytest.mark.parametrize("kw,field", [
    ({"client_id": "a b"}, "client_id"), ({"threads": 0}, "threads"), ({"device": "tpu"}, "device"),
    ({"data": "imagenet"}, "data"), ({"data": "fashion-mnist,clients=2,index=5"}, "data"),
])
def test_client_config_errors_name_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        ClientConfig(**kw)


def test_client_config_toml(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[client]\nclient_id = "pi-07"\nthreads = 4\nkey = "keys/pi-07.key"\ncoordinator_pub = "keys/c.pub"\n')
    cfg = ClientConfig.load(f, run_id="r9")
    assert (cfg.client_id, cfg.threads, cfg.run_id) == ("pi-07", 4, "r9")
    assert cfg.state_dir.endswith("pi-07")
    assert (cfg.key_path, cfg.insecure) == (Path("keys/pi-07.key"), False)


def test_signed_is_the_default_and_insecure_is_explicit():
    with pytest.raises(ValueError, match="key: a signed run needs"):
        ClientConfig()
    with pytest.raises(ValueError, match="coordinator_key: a signed run needs"):
        CoordinatorConfig()
    assert ClientConfig(insecure=True).insecure and CoordinatorConfig(insecure=True).insecure


def test_broker_urls(monkeypatch):
    b = parse_broker_url("mqtt://127.0.0.1")
    assert (b.host, b.port, b.tls) == ("127.0.0.1", 1883, False)
    monkeypatch.setenv("FEDPARA_MQTT_PASSWORD", "s3cret")
    b = parse_broker_url("mqtts://alice@broker.local")
    assert (b.port, b.tls, b.username, b.password) == (8883, True, "alice", "s3cret")
    assert "s3cret" not in str(b) and "s3cret" not in repr(b)
    for bad in ("127.0.0.1:1883", "http://x", "mqtt://", "mqtt://h:99999"):
        with pytest.raises(ValueError, match="broker"):
            parse_broker_url(bad)


def test_client_energy_options_reach_the_meter(tmp_path):
    from edge_client.client import EdgeClient
    readings = tmp_path / "watts.log"
    readings.write_text("2026-11-26T10:00:00 4.5\n")
    cfg = ClientConfig(client_id="pi", data="synthetic,n=64", state_dir=str(tmp_path / "s"), insecure=True,
                       energy="external",
                       energy_options={"external_file": str(readings), "link": "lte"})
    client = EdgeClient(cfg, parse_broker_url("mqtt://127.0.0.1:1"))  # never connects
    assert client.energy.source.startswith("external")
    client.energy.close()
    with pytest.raises(ValueError, match="energy_options"):
        ClientConfig(energy_options={"link": "carrier-pigeon"})
