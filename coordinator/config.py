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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedpara.data.spec import parse_data_spec
from fedpara.lr import default_lr, lr_table
from fedpara.models import ModelSpec
from fedpara.runtime.options import (
    check_choice,
    check_int,
    check_number,
    from_mapping,
    load_config,
    option,
)
from fedpara.runtime.topics import check_id
from fedpara.wire import CodecPolicy

from .server_opt import check_params as check_server_opt
from .strategy import parse_aggregator


@dataclass
class CoordinatorConfig:
    run_id: str = option("demo", "run id: MQTT topic level and part of every message", flag="--run")
    # model
    model: str = option("cnn28", "reference model: vgg16 | cnn28 | mlp | char_lstm")
    num_classes: int = option(10, "number of classes")
    scheme: str = option("fedpara", "dense | fedpara | lowrank | pfedpara")
    ratio: float = option(0.1, "the paper's gamma in [0, 1] (rank rule)")
    form: str = option("tensor", "conv factorisation: tensor (Prop. 3) | matrix (Prop. 1)")
    tanh: bool = option(False, "tanh on the Hadamard halves (paper App. B)")
    seed: int = option(0, "seed for model initialisation and client sampling")
    # federation
    rounds: int = option(5, "number of rounds")
    clients_per_round: int = option(0, "clients sampled per round (K); 0 = every live client")
    min_clients: int = option(1, "live clients needed before a round starts")
    min_reply_fraction: float = option(0.5, "fraction of sampled clients that must reply by the deadline")
    round_deadline_s: float = option(120.0, "seconds a round waits for replies", flag="--deadline")
    wait_clients_s: float = option(120.0, "seconds to wait for min_clients before giving up")
    max_attempts: int = option(3, "tries per round when too few clients reply (model kept each time)")
    aggregator: str = option("fedavg", "fedavg | median | trimmed-mean:BETA | krum:F | norm-clip:TAU "
                             "(docs/security.md says what each tolerates)")
    screen_factor: float = option(10.0, "drop updates farther from the current model than this many times "
                                  "the median distance (0: off)")
    max_examples: int = option(10_000_000, "cap on the example count one client's update may claim "
                               "(also capped by what the client announced)")
    max_weight_ratio: float = option(4.0, "cap on one client's FedAvg weight: this many times the (lower) median "
                                     "example count its round's sampled clients announced (0: off)")
    max_step_factor: float = option(10.0, "refuse an aggregate that moves the model more than this many times the "
                                    "median of the last 5 moves (round 1: the model's norm); 0: off")
    # asynchronous buffered rounds (docs/async.md): every idle client trains the newest global factors
    mode: str = option("sync", "sync: rounds wait for their sampled clients | async: FedBuff-style buffered "
                       "versions, the slowest device does not set the pace (rounds counts versions)")
    buffer_size: int = option(3, "async: updates folded into each new global version")
    max_staleness: int = option(8, "async: refuse an update trained on a version more than this many versions old")
    sampling: str = option("fixed", "fixed: clients_per_round of the live clients, without replacement (all when 0) | "
                           "poisson: each live client independently with probability sample_rate")
    sample_rate: float = option(0.1, "poisson sampling: each live client's chance to be sampled in a round")
    # server optimiser over the aggregated factor delta (Reddi et al., ICLR 2021; docs/fidelity.md)
    server_opt: str = option("fedavg", "how the aggregate becomes the next global model: fedavg (take it) | fedavgm "
                             "(server momentum) | fedadam | fedyogi | fedadagrad (adaptive, along aggregate - current)")
    server_lr: float = option(1.0, "server learning rate eta (fedavg with 1: the aggregate itself)")
    server_momentum: float = option(0.9, "fedavgm: server momentum beta")
    server_beta1: float = option(0.9, "fedadam / fedyogi / fedadagrad: first-moment decay beta1")
    server_beta2: float = option(0.99, "fedadam / fedyogi: second-moment decay beta2")
    server_tau: float = option(1e-3, "fedadam / fedyogi / fedadagrad: adaptivity tau (v starts at tau^2)")
    prox_mu: float = option(0.0, "FedProx: each client adds (prox_mu / 2) ||w - w_global||^2 over the global "
                            "factors to its local loss (0: off; sent with every task)")
    # differential privacy (docs/privacy.md; needs the privacy extra: dp-accounting)
    dp_noise_multiplier: float = option(0.0, "user-level DP-FedAvg: Gaussian noise std on the sum of clipped deltas, "
                                        "in units of dp_clip_norm (0: off)", flag="--dp-noise")
    dp_clip_norm: float = option(1.0, "clip each client's update delta (the factors it sends) to this L2 norm",
                                 flag="--dp-clip")
    dp_delta: float = option(1e-5, "the delta of the (epsilon, delta) guarantee the run reports")
    max_epsilon: float = option(0.0, "stop the run before a round would push epsilon at dp_delta past this "
                                "(0: no limit)", flag="--max-epsilon")
    dp_mode: str = option("central", "central: the coordinator adds the noise | local: each client noises its own "
                          "update (an untrusted coordinator; far more noise in the average)")
    dp_adaptive_clip: bool = option(False, "adapt dp_clip_norm to the dp_target_quantile of the update norms "
                                    "(Andrew et al., NeurIPS 2021; central mode)")
    dp_target_quantile: float = option(0.5, "adaptive clipping: the share of updates meant to need no clipping")
    dp_clip_lr: float = option(0.2, "adaptive clipping: the geometric step of the clip norm")
    # local training (sent to the clients with every task)
    local_epochs: int = option(1, "local epochs E per round")
    batch_size: int = option(64, "local batch size")
    lr: float = option(0.0, "local SGD learning rate; 0 = the default measured for the model and scheme "
                       f"(fedpara/lr.py, docs/fidelity.md; batch 32): {lr_table()}; with a delta-coded wire "
                       f"(docs/compression.md): {lr_table(delta=True)}")
    lr_decay: float = option(0.992, "learning rate multiplier per round (paper: 0.992)")
    momentum: float = option(0.0, "local SGD momentum (paper: 0)")
    weight_decay: float = option(0.0, "local SGD weight decay")
    # evaluation
    test_data: str = option("fashion-mnist", "data spec of the held-out test split evaluated every round")
    eval_batch_size: int = option(1000, "evaluation batch size")
    eval_every: int = option(1, "evaluate the global model every N rounds (and always after the last); "
                             "for a big model, also cap the test data, e.g. test_data = 'fashion-mnist,limit=2000'")
    # wire
    downlink: str = option("fp32", "codec policy coordinator -> clients, e.g. 'fp16+zstd:3'")
    uplink: str = option("fp32", "codec policy clients -> coordinator, e.g. 'fp16' (FedPAQ)")
    wire: str = option("plain", "plain: the downlink/uplink policies on whole states | delta: send what changed, "
                       "under those policies, with error feedback | lean: delta with the measured preset, which "
                       "replaces downlink and uplink (docs/compression.md)")
    error_feedback: bool = option(True, "wire delta/lean: carry what a lossy codec dropped into the next round")
    max_packet: int = option(1_000_000, "largest MQTT packet to publish (bytes); payloads are chunked")
    digest: str = option("auto", "envelope digest: auto (BLAKE3 with every peer that announces it, else "
                         "SHA-256) | sha256 (docs/wire.md, Digests)")
    # trust (docs/security.md)
    coordinator_key: str = option("", "the coordinator's Ed25519 private key (fedpara keys new coordinator --dir DIR)")
    trusted_keys: str = option("", "directory of the clients' public keys, <client id>.pub each: only they take part")
    insecure: bool = option(False, "run unsigned: anyone who can publish on the broker can take part (warns)")
    max_message_age_s: float = option(600.0, "signed messages older (or newer) than this by our clock are refused")
    # output
    out: str = option("runs/demo", "run directory: metrics.jsonl, checkpoints/, summary.json")
    dashboard: str = option("", "serve a live dashboard and Prometheus /metrics on HOST:PORT (':8050' = loopback; "
                            "docs/dashboard.md)")
    dashboard_public: bool = option(False, "allow the dashboard on a non-loopback address; every request then needs "
                                    "a token (dashboard_token, else FEDPARA_DASHBOARD_TOKEN, else a random one, "
                                    "printed with the URL)")
    dashboard_token: str = option("", "the non-loopback dashboard's token (>= 16 characters; better in the "
                                  "FEDPARA_DASHBOARD_TOKEN environment variable than in a run file)")
    tensorboard: str = option("", "also log scalars to TensorBoard in this directory (needs tensorboard installed)")

    def __post_init__(self) -> None:
        check_id("run_id", self.run_id)
        self.spec  # validates model, num_classes, scheme, ratio, form  # noqa: B018
        if isinstance(self.lr, (int, float)) and self.lr == 0:
            self.lr = default_lr(self.model, self.scheme, self.wire)
        for name in ("rounds", "min_clients", "max_attempts", "local_epochs", "batch_size", "eval_batch_size",
                     "eval_every"):
            check_int(name, getattr(self, name), min=1)
        check_int("clients_per_round", self.clients_per_round, min=0)
        check_int("max_packet", self.max_packet, min=1024)
        check_int("seed", self.seed, min=0)
        check_int("max_examples", self.max_examples, min=1)
        check_choice("digest", self.digest, ("auto", "sha256"))
        check_choice("sampling", self.sampling, ("fixed", "poisson"))
        check_choice("mode", self.mode, ("sync", "async"))
        check_int("buffer_size", self.buffer_size, min=1)
        check_int("max_staleness", self.max_staleness, min=0)
        if self.mode == "async" and self.dp_noise_multiplier > 0:
            raise ValueError("mode: async rounds cannot be differentially private here: the accountant assumes each "
                             "round samples from every eligible client, which a staleness-weighted buffer does not "
                             "(docs/async.md); use mode = \"sync\"")
        if self.mode == "async" and self.sampling == "poisson":
            raise ValueError("sampling: poisson is for sync rounds; async hands the model to every idle client "
                             "(clients_per_round caps how many train at once)")
        check_number("sample_rate", self.sample_rate, min=0.0, max=1.0, min_open=True)
        check_choice("dp_mode", self.dp_mode, ("central", "local"))
        check_number("dp_noise_multiplier", self.dp_noise_multiplier, min=0.0, max=1e4)
        check_number("dp_clip_norm", self.dp_clip_norm, min=0.0, min_open=True)
        check_number("dp_delta", self.dp_delta, min=0.0, max=1.0, min_open=True, max_open=True)
        check_number("max_epsilon", self.max_epsilon, min=0.0)
        check_number("dp_target_quantile", self.dp_target_quantile, min=0.0, max=1.0, min_open=True, max_open=True)
        check_number("dp_clip_lr", self.dp_clip_lr, min=0.0, min_open=True)
        if self.dp_noise_multiplier > 0:
            from .privacy import accounting
            accounting()  # ValueError naming dp_noise_multiplier when dp-accounting is missing
            if parse_aggregator(self.aggregator)[0] != "fedavg":
                raise ValueError(f"aggregator: differential privacy runs DP-FedAvg (clipped, noised sum); "
                                 f"{self.aggregator} changes the sensitivity the noise is calibrated to "
                                 "(docs/privacy.md): use fedavg")
            if self.dp_adaptive_clip and self.dp_mode == "local":
                raise ValueError("dp_adaptive_clip: central mode only (local noise leaves no count to adapt from)")
        elif self.max_epsilon > 0:
            raise ValueError("max_epsilon: a privacy budget needs dp_noise_multiplier > 0")
        for name in ("screen_factor", "max_weight_ratio", "max_step_factor"):
            check_number(name, getattr(self, name), min=0.0)
        parse_aggregator(self.aggregator)
        check_server_opt(self.server_opt, self.server_lr, self.server_momentum, self.server_beta1,
                         self.server_beta2, self.server_tau)
        # (with DP the server optimiser steps along the noised aggregate: post-processing, no privacy cost)
        check_number("prox_mu", self.prox_mu, min=0.0, max=1e3)
        if self.dashboard:
            from .observation.listen import is_loopback, parse_listen
            host, _ = parse_listen("dashboard", self.dashboard)  # ValueError naming the field
            if not is_loopback(host) and not self.dashboard_public:
                raise ValueError(f"dashboard: {host} is not a loopback address: anyone who can reach it would see "
                                 "this run; bind 127.0.0.1, or set dashboard_public = true (--dashboard-public), "
                                 "which requires a token on every request (docs/dashboard.md)")
        if self.dashboard_token and len(self.dashboard_token) < 16:
            raise ValueError("dashboard_token: must be at least 16 characters")
        check_number("max_message_age_s", self.max_message_age_s, min=1.0)
        check_number("min_reply_fraction", self.min_reply_fraction, min=0.0, max=1.0, min_open=True)
        for name in ("round_deadline_s", "wait_clients_s", "lr"):
            check_number(name, getattr(self, name), min=0.0, min_open=True)
        check_number("lr_decay", self.lr_decay, min=0.0, max=1.0, min_open=True)
        check_number("momentum", self.momentum, min=0.0, max=1.0, max_open=True)
        check_number("weight_decay", self.weight_decay, min=0.0)
        for name in ("downlink", "uplink"):
            try:
                CodecPolicy.parse(getattr(self, name))
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None
        from .leanwire import configure
        configure(self)  # wire / error_feedback (docs/compression.md)
        if self.mode == "async" and self.wire != "plain":
            raise ValueError(f"wire: {self.wire} codes each task against the one state every client was sent last; "
                             "async versions send each client its own version: use wire = \"plain\" with "
                             "mode = \"async\" (docs/async.md)")
        if not self.insecure:
            for name, what in (("coordinator_key", "the coordinator's private key"),
                               ("trusted_keys", "a directory of the clients' public keys")):
                if not getattr(self, name):
                    raise ValueError(f"{name}: a signed run needs {what} (fedpara keys new ...), "
                                     "or insecure = true to run unsigned")

    @property
    def spec(self) -> ModelSpec:
        """The run's model, shaped for the samples of its data (e.g. vgg16 on Fashion-MNIST's 1x28x28)."""
        spec = ModelSpec(model=self.model, num_classes=self.num_classes, scheme=self.scheme,
                         ratio=self.ratio, form=self.form, tanh=self.tanh)
        try:
            shape = parse_data_spec(self.test_data).input_shape
        except ValueError as exc:
            raise ValueError(f"test_data: {exc}") from None
        try:
            return dataclasses.replace(spec, input_shape=shape)
        except ValueError as exc:
            raise ValueError(f"model: {self.model} cannot take the samples of test_data {self.test_data!r} "
                             f"({exc})") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_mapping(cls, data: dict[str, Any], source: str = "config") -> CoordinatorConfig:
        return from_mapping(cls, data, source)

    @classmethod
    def load(cls, path: str | Path | None = None, **overrides) -> CoordinatorConfig:
        """TOML file (optional, keys flat or under [run]) with flag overrides (None is ignored)."""
        return load_config(cls, path, "run", overrides)

