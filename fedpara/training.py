"""Local training and evaluation loops shared by the edge client (train) and the coordinator (eval).

Plain SGD as in the paper's Table 6 (no momentum by default); the factorised model composes its
weights inside every forward pass, so these loops are the same for dense and FedPara models.
"""
from __future__ import annotations

import itertools
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available; ``cuda`` without a GPU is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device: {name!r} requested but CUDA is not available on this machine")
    if name != "cpu" and not name.startswith("cuda"):
        raise ValueError(f"device: expected auto, cpu or cuda[:N], got {name!r}")
    return torch.device(name)


@torch.no_grad()
def sgd_step(params: list[torch.Tensor], buffers: dict[int, torch.Tensor], *, lr: float, momentum: float = 0.0,
             weight_decay: float = 0.0) -> None:
    """One step of plain SGD (paper Table 6), the same arithmetic, in the same order, as
    ``torch.optim.SGD``'s single-tensor path (no dampening, no Nesterov). Written out because
    creating a ``torch.optim`` optimizer imports torch's compiler stack (``torch._dynamo``, sympy):
    about 75 MB of RSS on a device that only needs these three lines."""
    for i, p in enumerate(params):
        if p.grad is None:
            continue
        d_p = p.grad if weight_decay == 0 else p.grad.add(p, alpha=weight_decay)
        if momentum != 0:
            buf = buffers.get(i)
            if buf is None:
                buf = buffers[i] = torch.clone(d_p).detach()
            else:
                buf.mul_(momentum).add_(d_p)
            d_p = buf
        p.add_(d_p, alpha=-lr)


@torch.no_grad()
def add_prox_grad(pairs: list[tuple[torch.Tensor, torch.Tensor]], mu: float) -> None:
    """FedProx (Li et al., MLSys 2020): add the gradient of (mu / 2) ||w - w_anchor||^2, that is
    mu (w - w_anchor), to each parameter's gradient (a parameter without one gets it as its own)."""
    for p, anchor in pairs:
        g = (p - anchor).mul_(mu)
        if p.grad is None:
            p.grad = g
        else:
            p.grad.add_(g)


def train_epochs(model: nn.Module, data: Dataset, *, epochs: int, batch_size: int, lr: float,
                 momentum: float = 0.0, weight_decay: float = 0.0, device: torch.device | str = "cpu",
                 seed: int = 0, progress=None, prox_mu: float = 0.0,
                 prox_anchor: dict[str, torch.Tensor] | None = None) -> dict:
    """E epochs of minibatch SGD; returns {"loss", "num_examples", "steps", "seconds"}.

    ``prox_mu`` > 0 (FedProx): each step's gradient also gets mu (w - w_anchor) for every parameter
    named in ``prox_anchor`` (the task's global factors; pFedPara's local half has no anchor and
    is left alone). The loss reported is the task loss, without the proximal term."""
    device = torch.device(device)
    if any(t.device != device for t in itertools.chain(model.parameters(), model.buffers())):
        model.to(device)  # (a model already there: .to() would still walk and reassign every tensor)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    prox: list[tuple[torch.Tensor, torch.Tensor]] = []
    if prox_mu:
        if not prox_anchor:
            raise ValueError("prox_mu: FedProx needs the global factors to anchor to (prox_anchor)")
        named = dict(model.named_parameters())
        unknown = sorted(set(prox_anchor) - set(named))
        if unknown:
            raise ValueError(f"prox_anchor: not parameters of the model: {unknown[:5]}")
        prox = [(named[k], a.detach().to(device)) for k, a in prox_anchor.items() if named[k].requires_grad]
    momentum_buffers: dict[int, torch.Tensor] = {}
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, generator=gen, drop_last=False)
    t0, total, count, steps = time.perf_counter(), 0.0, 0, 0
    for _ in range(epochs):
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = F.cross_entropy(model(x), y)
            for p in params:
                p.grad = None
            loss.backward()
            if prox:
                add_prox_grad(prox, prox_mu)
            sgd_step(params, momentum_buffers, lr=lr, momentum=momentum, weight_decay=weight_decay)
            total += loss.item() * len(y)
            count += len(y)
            steps += 1
            if progress is not None:
                progress(steps)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return {"loss": total / max(count, 1), "num_examples": len(data), "steps": steps,
            "seconds": time.perf_counter() - t0}


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset, *, batch_size: int = 1000,
             device: torch.device | str = "cpu") -> dict:
    """{"accuracy", "loss", "num_examples"} of ``model`` on ``data``."""
    device = torch.device(device)
    was_training = model.training
    model.to(device).eval()
    correct, total, loss = 0, 0, 0.0
    for x, y in DataLoader(data, batch_size=batch_size):
        x, y = x.to(device), y.to(device)
        out = model(x)
        loss += F.cross_entropy(out, y, reduction="sum").item()
        correct += (out.argmax(1) == y).sum().item()
        total += len(y)
    model.train(was_training)
    return {"accuracy": correct / max(total, 1), "loss": loss / max(total, 1), "num_examples": total}


def check_model_fits_data(model: nn.Module, spec, data, data_spec: str) -> None:
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
