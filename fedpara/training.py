"""Local training and evaluation loops shared by the edge client (train) and the coordinator (eval).

Plain SGD as in the paper's Table 6 (no momentum by default); the factorised model composes its
weights inside every forward pass, so these loops are the same for dense and FedPara models.
"""
from __future__ import annotations

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


def train_epochs(model: nn.Module, data: Dataset, *, epochs: int, batch_size: int, lr: float,
                 momentum: float = 0.0, weight_decay: float = 0.0, device: torch.device | str = "cpu",
                 seed: int = 0, progress=None) -> dict:
    """E epochs of minibatch SGD; returns {"loss", "num_examples", "steps", "seconds"}."""
    device = torch.device(device)
    model.to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, generator=gen, drop_last=False)
    t0, total, count, steps = time.perf_counter(), 0.0, 0, 0
    for _ in range(epochs):
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
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
