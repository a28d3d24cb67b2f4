"""The edge client's trainer: ``fit(task) -> update``, with no MQTT inside.

It owns the local data, the model (rebuilt only when the task's model spec changes), the device
and the client's state directory: pFedPara's local half (paper Sec. 2.3) is restored from and
saved to ``local.safetensors``, so it survives restarts and never leaves the device. The MQTT
side (:mod:`edge_client.client`) hands it typed tasks and sends what it returns; tests and
other runtimes can use it without a broker.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading

import torch
from torch import Tensor

from fedpara import global_state, load_state, local_state
from fedpara.data import load_client_data, load_client_test, parse_data_spec
from fedpara.models import ModelSpec
from fedpara.runtime.checkpoint import load_checkpoint, save_checkpoint
from fedpara.runtime.messages import Task
from fedpara.runtime.rundir import ClientStateDir
from fedpara.training import evaluate, resolve_device, train_epochs

from .fit import check_fit

log = logging.getLogger(__name__)

# local evaluation batch: cnn28's first activation at batch 1000 is 100 MB, at 256 about 26 MB
# (docs/results/footprint.md); the accuracy is the same
EVAL_BATCH = 256


@dataclasses.dataclass
class FitOutput:
    """What one task produced: the global factors to send, the example count and the metrics."""

    tensors: dict[str, Tensor]
    num_examples: int
    metrics: dict


def _no_phase(name: str, **kw):
    return contextlib.nullcontext()


class Trainer:
    def __init__(self, client_id: str, data: str, *, device: str = "auto", threads: int = 1,
                 state_dir: str, eval_local: bool = True, lock: threading.Lock | None = None) -> None:
        self.client_id, self.threads, self.eval_local = client_id, threads, eval_local
        self.device = resolve_device(device)
        self.data_spec = parse_data_spec(data)
        self.train_data, self.data_info = load_client_data(self.data_spec)
        self._test_data = None
        self.state = ClientStateDir(state_dir)
        self.state.root.mkdir(parents=True, exist_ok=True)
        self.model: torch.nn.Module | None = None
        self.spec: ModelSpec | None = None
        self.last_accuracy: float | None = None
        self._unsaved: tuple[ModelSpec, int] | None = None  # (spec, round) trained but not yet saved
        self._local_saved = False  # the local half of that round is written already
        self._loaded: str | None = None  # the task whose global factors the model holds
        # held while the model trains or exports; a client pool shares one: its clients take turns
        self.lock = lock or threading.Lock()
        # this client's own: loading, training and writing its model exclude each other (a pool's
        # client loads outside the shared lock; stop() may write from another thread)
        self.model_lock = threading.RLock()

    @property
    def num_examples(self) -> int:
        return len(self.train_data)

    @property
    def test_data(self):
        if self._test_data is None:
            self._test_data = load_client_test(self.data_spec)
        return self._test_data

    def ensure_model(self, spec: ModelSpec, seed: int) -> None:
        if self.model is not None and spec == self.spec:
            return
        model = spec.build(seed)  # the coordinator's seed: every client starts from the same factors
        path = self.state.local_path
        if local_state(model) and path.exists():
            try:
                state, saved_spec, _ = load_checkpoint(path)
                if saved_spec != spec:
                    raise ValueError(f"saved for {saved_spec}, run uses {spec}")
                load_state(model, state, part="local")
                log.info("%s: restored local factors from %s", self.client_id, path)
            except (ValueError, FileNotFoundError) as exc:
                log.warning("%s: ignoring local state %s: %s", self.client_id, path, exc)
        self.model, self.spec = model.to(self.device), spec

    def load(self, task: Task, tensors: dict[str, Tensor], phase=_no_phase) -> None:
        """Build the model when the task's spec is new and load the task's global factors into it.
        It touches only this client's model, so a pool's client runs it outside the shared lock,
        while another client trains. Raises ValueError for factors that do not fit the model."""
        with self.model_lock:
            self._loaded = None
            # the global factors the model held are overwritten now: nothing trained is pending
            # any more (save_every chose not to write them); the local half was written already
            self._unsaved = None
            with phase("download"):
                self.ensure_model(task.spec, task.init_seed)
                load_state(self.model, {k: v.to(self.device) for k, v in tensors.items()})
            self._loaded = task.task_id

    def fit(self, task: Task, rnd: int, tensors: dict[str, Tensor] | None = None, phase=_no_phase) -> FitOutput:
        """Train ``task.train`` locally, after loading ``tensors`` (the task's global factors;
        None: :meth:`load` loaded them already). Saving the state (:meth:`save_state`) and the
        local evaluation (:meth:`evaluate_local`) are the caller's next steps, after the update
        is sent: neither delays the round.

        ``phase(name)`` is a context manager factory wrapping the download/train phases (energy).
        The shared CPU lock (:attr:`lock`: a pool's clients take turns) is held for the training
        loop only: loading before it and gathering the update after it run beside another client's
        training. Raises ValueError for a task that does not fit the model or the data.
        """
        with self.model_lock:
            return self._fit(task, rnd, tensors, phase)

    def _fit(self, task: Task, rnd: int, tensors: dict[str, Tensor] | None, phase) -> FitOutput:
        t = task.train
        if tensors is not None:
            self.load(task, tensors, phase)
        elif self._loaded != task.task_id:
            raise ValueError(f"task {task.task_id}: its global factors were not loaded")
        self._loaded = None  # trained from here on: a second fit needs a fresh load
        # a task too big for this device's memory is refused now, not killed half-way (edge_client/fit.py)
        check_fit(self.model, self.train_data, t.batch_size,
                  what=f"{task.spec.model}/{task.spec.scheme} (ratio {task.spec.ratio})")
        # FedProx: the anchor is the global factors just loaded (parameters only: buffers do not train)
        anchor = None
        if t.prox_mu:
            names = {n for n, _ in self.model.named_parameters()}
            anchor = {k: v.detach().clone() for k, v in global_state(self.model).items() if k in names}
        with self.lock, phase("train"):
            torch.set_num_threads(self.threads)  # process-wide: set by whoever trains now
            res = train_epochs(self.model, self.train_data, epochs=t.epochs, batch_size=t.batch_size,
                               lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay,
                               device=self.device, seed=t.seed, prox_mu=t.prox_mu, prox_anchor=anchor)
        metrics = {"loss": res["loss"], "train_s": res["seconds"], "steps": res["steps"]}
        shared = global_state(self.model)
        self._unsaved, self._local_saved = (task.spec, rnd), False
        if self.eval_local:  # evaluate_local() follows once the update has gone (docs/protocol.md)
            metrics["report_follows"] = True
        return FitOutput({k: v.cpu() for k, v in shared.items()}, self.num_examples, metrics)

    def save_state(self, *, include_global: bool = True) -> None:
        """Write what the last :meth:`fit` trained to the state directory: pFedPara's local half
        (restored on restart: always) and, unless ``include_global`` is false, the global factors
        (``fedpara export`` reads them); global factors left unwritten are written by the next call
        that includes them (:attr:`global_pending`)."""
        with self.model_lock:
            if self._unsaved is None:
                return
            spec, rnd = self._unsaved
            local = local_state(self.model)
            if local and not self._local_saved:
                save_checkpoint(self.state.local_path, local, spec, round=rnd, client_id=self.client_id)
                self._local_saved = True
            if include_global:
                save_checkpoint(self.state.global_path, global_state(self.model), spec, round=rnd,
                                client_id=self.client_id)
                self._unsaved = None

    @property
    def global_pending(self) -> bool:
        """Trained global factors not yet written to the state directory."""
        return self._unsaved is not None

    def evaluate_local(self) -> dict:
        """The current (personalised) model on this client's own test split."""
        ev = evaluate(self.model, self.test_data, device=self.device, batch_size=EVAL_BATCH)
        self.last_accuracy = ev["accuracy"]
        return ev

    def export(self, info: dict):
        """The final (for pFedPara: personalised) model -> STATE_DIR/model.onnx (+ int8), checked
        against torch on the local test split and calibrated on local training data."""
        from export import export_model

        test = self.test_data.tensors
        with self.lock:
            return export_model(self.model, self.spec, self.state.onnx_path,
                                info={"client_id": self.client_id, "accuracy": self.last_accuracy, **info},
                                eval_data=(test[0], test[1]), calibration=self.train_data.tensors[0][:256],
                                int8=True, threads=self.threads, latency_runs=10)
