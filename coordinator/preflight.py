"""Checks and set-up before the round loop starts: the trust material and the model/data pair."""
from __future__ import annotations

import logging

import torch

from fedpara.models import ModelSpec
from fedpara.runtime.signing import endpoints, load_trust_dir

from .config import CoordinatorConfig

log = logging.getLogger(__name__)


def trust(cfg: CoordinatorConfig):
    """(sealer, opener) for the coordinator; an insecure run says what it gives up."""
    if cfg.insecure:
        log.warning("insecure run: messages are not signed; anyone who can publish on the broker can take "
                    "part in run %s, impersonate clients or end it (docs/security.md)", cfg.run_id)
    return endpoints("coordinator", insecure=cfg.insecure, key_path=cfg.coordinator_key,
                     trusted=lambda: load_trust_dir(cfg.trusted_keys), max_age_s=cfg.max_message_age_s)


def check_model_fits_data(model, spec: ModelSpec, data, data_spec: str) -> None:
    """ValueError in one line when the model cannot take the data's samples (e.g. vgg16, a
    3x32x32 model, on 1x28x28 Fashion-MNIST), before any client is asked to train it."""
    x, _ = data[0]
    try:
        with torch.no_grad():
            out = model.eval()(x.unsqueeze(0))
    except (RuntimeError, ValueError, IndexError) as exc:
        raise ValueError(f"model {spec.model} does not fit the data {data_spec} (samples of shape "
                         f"{tuple(x.shape)}): {str(exc).splitlines()[0][:200]}") from None
    finally:
        model.train()
    if out.shape[-1] != spec.num_classes:
        raise ValueError(f"model {spec.model} outputs {out.shape[-1]} classes, num_classes is {spec.num_classes}")
