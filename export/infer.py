"""``fedpara infer`` / ``fedpara-infer``: run an exported ONNX model with onnxruntime, no PyTorch.

    fedpara-infer model.onnx --data fashion-mnist,limit=1000 [--threads N] [--provider cpu|cuda|tensorrt]
    fedpara-infer model.onnx --data inputs.npy          # unlabelled: one prediction per line

This module imports only the standard library, numpy, onnxruntime and the numpy-only parts of
``fedpara.data`` (the spec parser, the row selection, the IDX / Fashion-MNIST reader): the ``infer``
install profile, no torch. ``fedpara infer`` (the full CLI) and ``fedpara-infer`` (its own console
script) run the same command. Data read without torch: ``.npy`` inputs and every Fashion-MNIST spec
and split (the same rows as ``fedpara.data``'s loaders give); other data sets go through
``fedpara.data``'s loaders, which need the ``client`` profile. Images are kept as uint8 and
normalised one batch at a time. Exit status: 0 ok, 2 usage / input errors.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Callable

import numpy as np

from fedpara.data import fashion_mnist
from fedpara.data.rows import select, which_for
from fedpara.data.spec import parse_data_spec

log = logging.getLogger(__name__)

BATCH = 64  # samples per onnxruntime call over the data: cnn28 at 256 peaks ~20 MB higher


def _pct(a: float | None) -> str:
    return "-" if a is None else f"{100 * a:.2f}%"


def load_inputs(text: str, scheme: str | None = None,
                split: str = "auto") -> tuple[np.ndarray, np.ndarray | None]:
    """``(x, labels or None)`` for ``--data``: an .npy file, or a labelled data spec."""
    x, labels, transform = load_raw_inputs(text, scheme, split)
    return (x if transform is None else transform(x)), labels


def dataset_for(text: str, scheme: str | None = None, split: str = "auto"):
    """The torch dataset a data spec and ``--split`` name (see :func:`fedpara.data.rows.which_for`):
    the client's training data, its own test rows, or the held-out evaluation split. Needs torch."""
    from fedpara.data.loaders import load_rows

    spec = parse_data_spec(text)
    return load_rows(spec, which_for(split, scheme, spec))


def load_raw_inputs(text: str, scheme: str | None = None,
                    split: str = "auto") -> tuple[np.ndarray, np.ndarray | None, Callable | None]:
    """Like :func:`load_inputs` but ``(x, labels, transform)``: image datasets come as uint8
    pixels with ``transform`` mapping a batch to the model's float32 input (``None`` when ``x``
    is already the input), so a caller converts one batch at a time instead of the whole split.
    """
    if text.endswith(".npy"):
        return np.load(text, allow_pickle=False), None, None
    spec = parse_data_spec(text)
    which = which_for(split, scheme, spec)
    if spec.name == "fashion-mnist":  # numpy alone: the same rows as fedpara.data's loaders
        file_split, idx = select(spec, which, lambda s: fashion_mnist.read_labels(s, spec.path))
        x, y = fashion_mnist.read_split_uint8(file_split, spec.path, idx)
        return x, y, fashion_mnist.normalise
    try:
        import torch  # noqa: F401
    except ImportError as exc:
        raise ValueError(f"--data {text}: {spec.name} needs torch (fedpara.data's loaders read it; {exc}); "
                         "without torch use an .npy file of inputs or a Fashion-MNIST spec") from None
    ds = dataset_for(text, scheme, split)
    if hasattr(ds, "images") and hasattr(ds, "lut"):  # fedpara.data's uint8 NormalisedImages
        lut = ds.lut
        return ds.images, ds.labels.numpy(), lambda batch: lut[batch]
    x, y = ds.tensors
    return x.numpy(), y.numpy(), None


class InferCommand:
    help = "run an exported ONNX model with onnxruntime: accuracy or predictions, latency, throughput"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("model", type=Path, help="an .onnx file written by `fedpara export`")
        p.add_argument("--data", required=True,
                       help="labelled data spec (e.g. fashion-mnist,limit=1000) -> accuracy, or an "
                            ".npy file of inputs (N, ...) -> predictions")
        p.add_argument("--split", default="auto", choices=["auto", "test", "local", "train"],
                       help="which split of a data spec (auto: test; the client's local test for "
                            "pFedPara models with clients > 1)")
        p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (0: all)")
        p.add_argument("--provider", default="cpu", choices=["cpu", "cuda", "tensorrt"],
                       help="onnxruntime execution provider")
        p.add_argument("--runs", type=int, default=200, help="timed runs at batch 1 (p50/p95)")
        p.add_argument("--json", action="store_true", help="print the result as JSON")

    def run(self, args) -> int:
        from .onnx_model import OnnxModel, accuracy, measure
        om = OnnxModel(args.model, provider=args.provider, threads=args.threads)
        meta = om.metadata
        x, labels, transform = load_raw_inputs(args.data, meta.get("scheme"), args.split)
        prep = (lambda b: b) if transform is None else transform
        want = [d for d in om.input_shape[1:]]
        if x.ndim < 1 or (all(isinstance(d, int) for d in want) and list(x.shape[1:]) != want):
            raise ValueError(f"{args.data}: samples have shape {tuple(x.shape[1:])}, the model "
                             f"{args.model} takes {tuple(want)}")
        if len(x) == 0:
            raise ValueError(f"{args.data}: no samples")
        logits = om.predict_all(x, batch_size=BATCH, transform=transform)
        b64 = prep(x[np.arange(64) % len(x)])
        lat1 = measure(om.predict, prep(x[:1]), runs=args.runs)
        lat64 = measure(om.predict, b64, runs=max(args.runs // 10, 10))
        result = {"model": str(args.model), "provider": args.provider, "threads": args.threads,
                  "samples": len(x), "metadata": {k: v for k, v in meta.items() if k not in ("spec", "info")},
                  "batch1": lat1.to_dict(), "batch64": lat64.to_dict()}
        preds = logits.argmax(1)
        if labels is not None:
            result["accuracy"] = accuracy(logits, labels)
        else:
            result["predictions"] = preds.tolist()
        if args.json:
            print(json.dumps(result, indent=2))
            return 0
        if labels is None:
            for p in preds:
                print(int(p))
        print(f"# {args.model}: {meta.get('model', '?')} scheme={meta.get('scheme', '?')} "
              f"ratio={meta.get('ratio', '?')} round={meta.get('round') or '-'} "
              f"{meta.get('quantization', 'fp32')}")
        if labels is not None:
            print(f"# accuracy {_pct(result['accuracy'])} on {len(x)} samples ({args.data})")
        print(f"# batch 1: p50 {lat1.p50_ms:.3f} ms, p95 {lat1.p95_ms:.3f} ms ({lat1.runs} runs, "
              f"{args.provider}, {args.threads} thread(s))")
        print(f"# batch 64: {lat64.throughput:,.0f} samples/s (p50 {lat64.p50_ms:.2f} ms)")
        return 0


INFER_COMMAND = InferCommand()


def main(argv: list[str] | None = None) -> int:
    """The ``fedpara-infer`` console script (same arguments and exit codes as ``fedpara infer``)."""
    parser = argparse.ArgumentParser(prog="fedpara-infer", description=INFER_COMMAND.help)
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    INFER_COMMAND.add_arguments(parser)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING - 10 * min(args.verbose, 2),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(INFER_COMMAND.run(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError, TypeError) as exc:
        print(f"fedpara-infer: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
