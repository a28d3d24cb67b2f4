"""The training loop's SGD step: bitwise what torch.optim.SGD computes, without its imports."""
import copy
import subprocess
import sys

import pytest
import torch

from fedpara.training import sgd_step


@pytest.mark.parametrize("momentum, weight_decay", [(0.0, 0.0), (0.9, 0.0), (0.9, 5e-4), (0.0, 1e-3)])
def test_sgd_step_equals_torch_sgd_bitwise(momentum, weight_decay):
    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.ReLU(), torch.nn.Linear(20, 3))
    ours = copy.deepcopy(ref)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=momentum, weight_decay=weight_decay)
    params, buffers = list(ours.parameters()), {}
    for _ in range(5):
        x, y = torch.randn(8, 10), torch.randint(0, 3, (8,))
        for m in (ref, ours):
            for p in m.parameters():
                p.grad = None
            torch.nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
        sgd_step(params, buffers, lr=0.1, momentum=momentum, weight_decay=weight_decay)
    assert all(torch.equal(a, b) for a, b in zip(ref.parameters(), ours.parameters(), strict=True))


def test_training_does_not_load_the_compiler_stack():
    code = ("import sys, torch; from fedpara.training import train_epochs; from fedpara.models import ModelSpec; "
            "from fedpara.data import make_synthetic; "
            "from torch.utils.data import TensorDataset; train = TensorDataset(*make_synthetic(32, (1, 28, 28), 10)); "
            "train_epochs(ModelSpec('cnn28').build(0), train, epochs=1, batch_size=8, lr=0.1, momentum=0.9); "
            "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
