"""``fedpara info``: layer-by-layer ranks and sizes of a reference model under a scheme."""
from __future__ import annotations

import argparse

from fedpara import count_params, global_state, local_state
from fedpara.layers import FactorisedLayer
from fedpara.lstm import FactorisedMatrix
from fedpara.models import MODELS, SCHEMES, ModelSpec, build
from fedpara.state import state_bytes


class InfoCommand:
    help = "show ranks and parameter counts of a reference model (dense vs factorised)"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", default="vgg16", choices=sorted(MODELS), help="reference model")
        p.add_argument("--num-classes", type=int, default=10, help="number of classes")
        p.add_argument("--scheme", default="fedpara", choices=[s for s in SCHEMES if s != "dense"])
        p.add_argument("--ratio", type=float, default=0.1, help="the paper's gamma in [0, 1]")
        p.add_argument("--form", default="tensor", choices=["tensor", "matrix"], help="conv form")

    def run(self, args) -> int:
        dense = build(args.model, num_classes=args.num_classes)
        model = ModelSpec(args.model, args.num_classes, args.scheme, args.ratio, args.form).build(0)
        print(f"{args.model} ({args.num_classes} classes), scheme={args.scheme}, ratio={args.ratio}")
        print(f"{'layer':<28}{'type':<16}{'rank':>6}{'params':>12}")
        for name, m in model.named_modules():
            if isinstance(m, FactorisedLayer) and not isinstance(m, FactorisedMatrix):
                n = sum(p.numel() for p in m.parameters())
                print(f"{name:<28}{type(m).__name__:<16}{m.rank:>6}{n:>12,}")
        nd, nf = count_params(dense), count_params(model)
        g, loc = global_state(model), local_state(model)
        print(f"dense parameters      {nd:>14,}  ({nd / 1e6:.2f}M)")
        print(f"factorised parameters {nf:>14,}  ({nf / 1e6:.2f}M, {nf / nd:.1%} of dense)")
        print(f"transferred per direction: {state_bytes(g) / 1e6:.3f} MB fp32 "
              f"(dense {state_bytes(dense.state_dict()) / 1e6:.3f} MB); kept on device: "
              f"{state_bytes(loc) / 1e6:.3f} MB")
        return 0


COMMAND = InfoCommand()
