"""What ``fedpara export`` exports: a run directory, one checkpoint, or a client's state directory.

* run directory   ``RUN_DIR/checkpoints/round-NNNN.safetensors`` (the highest round is the latest
                  global model) and ``RUN_DIR/summary.json`` ("spec", "final_accuracy").
* checkpoint      one ``fedpara-checkpoint/1`` safetensors file (:mod:`fedpara.runtime.checkpoint`).
* client state    ``STATE_DIR/global.safetensors`` (last global state received) and, for pFedPara,
                  ``STATE_DIR/local.safetensors`` (the personalised half, paper Sec. 2.3); both are
                  loaded into one model with ``load_state(part=...)``.

Every problem (missing file, corrupt file, a state that does not fit its model spec, a pFedPara
model without its local half) is a ``ValueError`` / ``FileNotFoundError`` naming the file and the
problem. No pickle anywhere: checkpoints are safetensors, the summary is JSON.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from torch import nn

from fedpara import load_state, local_state
from fedpara.models import ModelSpec
from fedpara.runtime.checkpoint import load_checkpoint
from fedpara.runtime.rundir import ClientStateDir, RunDir

log = logging.getLogger(__name__)

GLOBAL_FILE, LOCAL_FILE = ClientStateDir.GLOBAL, ClientStateDir.LOCAL


def latest_checkpoint(run_dir: str | os.PathLike) -> Path:
    """The checkpoint of the last completed round (see :meth:`RunDir.latest_checkpoint`)."""
    return RunDir(run_dir).latest_checkpoint()


def _fill(model: nn.Module, state: dict, part: str, path: Path, spec: ModelSpec) -> None:
    try:
        load_state(model, state, part=part)
    except ValueError as exc:
        raise ValueError(f"checkpoint {path} does not match its model spec ({spec.model}, "
                         f"scheme={spec.scheme}, ratio={spec.ratio}, form={spec.form}): {exc}") from None


def model_from_checkpoint(path: str | os.PathLike) -> tuple[nn.Module, ModelSpec, dict]:
    """The factorised model of one checkpoint holding a global state or a full (global + local) one."""
    path = Path(path)
    state, spec, info = load_checkpoint(path)
    model = spec.build()
    local = local_state(model)
    if local and set(local) <= set(state):  # a full state: global and local halves together
        _fill(model, {k: v for k, v in state.items() if k not in local}, "global", path, spec)
        _fill(model, {k: state[k] for k in local}, "local", path, spec)
    else:
        _fill(model, state, "global", path, spec)
        if local:
            raise ValueError(f"checkpoint {path} holds only the global half of a pFedPara model; "
                             f"export a client's state directory ({GLOBAL_FILE} + {LOCAL_FILE}) "
                             "to get a personalised model")
    return model.eval(), spec, {**info, "source": str(path)}


def _from_run_dir(run_dir: Path) -> tuple[nn.Module, ModelSpec, dict]:
    rd = RunDir(run_dir)
    ckpt = rd.latest_checkpoint()
    model, spec, info = model_from_checkpoint(ckpt)
    summary = rd.read_summary()
    if "spec" in summary:
        try:
            run_spec = ModelSpec.from_dict(summary["spec"])
        except (TypeError, ValueError) as exc:
            raise ValueError(f"run summary {rd.summary_path}: bad spec ({exc})") from None
        if run_spec != spec:
            raise ValueError(f"checkpoint {ckpt} was written for {spec.to_dict()}, but the run "
                             f"summary says {run_spec.to_dict()}")
    if "accuracy" not in info and "final_accuracy" in summary:
        info["accuracy"] = summary["final_accuracy"]
    info["run_dir"] = str(run_dir)
    return model, spec, info


def _from_state_dir(state_dir: Path) -> tuple[nn.Module, ModelSpec, dict]:
    gpath, lpath = state_dir / GLOBAL_FILE, state_dir / LOCAL_FILE
    gstate, spec, ginfo = load_checkpoint(gpath)
    model = spec.build()
    _fill(model, gstate, "global", gpath, spec)
    info = {**ginfo, "source": str(state_dir)}
    if local_state(model):
        if not lpath.is_file():
            raise FileNotFoundError(f"client state {state_dir}: pFedPara needs {LOCAL_FILE} "
                                    "(the personalised half), which is missing")
        lstate, lspec, linfo = load_checkpoint(lpath)
        if lspec != spec:
            raise ValueError(f"client state {state_dir}: {LOCAL_FILE} was written for "
                             f"{lspec.to_dict()}, {GLOBAL_FILE} for {spec.to_dict()}")
        _fill(model, lstate, "local", lpath, spec)
        info.update({k: v for k, v in linfo.items() if k not in ("round",)})
        info["round"] = ginfo.get("round", linfo.get("round"))
        info["personalised"] = True
    elif lpath.is_file():
        log.warning("client state %s: ignoring %s, scheme %s has no local half", state_dir,
                    LOCAL_FILE, spec.scheme)
    return model.eval(), spec, info


def load_source(source: str | os.PathLike) -> tuple[nn.Module, ModelSpec, dict]:
    """(factorised model in eval mode, spec, info) from a run dir, a checkpoint or a client state dir.

    ``info`` carries what the checkpoint recorded (round, accuracy, client, ...) plus ``source``.
    """
    path = Path(source)
    if path.is_file():
        return model_from_checkpoint(path)
    if not path.is_dir():
        raise FileNotFoundError(f"export source {path} does not exist")
    if ClientStateDir(path).is_state_dir():
        return _from_state_dir(path)
    if RunDir(path).looks_like_run():
        return _from_run_dir(path)
    raise ValueError(f"{path} is neither a run directory (checkpoints/, summary.json) nor a "
                     f"client state directory ({GLOBAL_FILE}); give one of those or a checkpoint file")
