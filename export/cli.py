"""``fedpara export`` and ``fedpara infer`` (entry points ``EXPORT_COMMAND``, ``INFER_COMMAND``).

    fedpara export SOURCE [--out model.onnx] [--int8] [--opset N] [--data SPEC]
    fedpara infer model.onnx --data SPEC|inputs.npy [--threads N] [--provider cpu|cuda|tensorrt]

SOURCE is a run directory, a checkpoint, or a client's state directory (see :mod:`export.source`).
Without ``--data``, a run directory's own data spec (``config.json`` "test_data") is used for parity,
accuracy and int8 calibration. ``infer`` lives in :mod:`export.infer` (no torch); this module
imports torch only when an export runs. Exit status: 0 ok, 1 parity failed, 2 usage / input errors
(printed by the top-level CLI).
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from fedpara.runtime.rundir import RunDir

from .infer import INFER_COMMAND, InferCommand, _pct, dataset_for  # noqa: F401  (the ``infer`` entry point)

log = logging.getLogger(__name__)


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.3f} MB"


def recorded_data(source: Path) -> str | None:
    """The data spec a run directory was evaluated on (``config.json`` "test_data"), if any."""
    path = RunDir(source).config_path
    if not source.is_dir() or not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"run config {path} is not valid JSON: {exc}") from None
    data = config.get("test_data") if isinstance(config, dict) else None
    if data is not None and (not isinstance(data, str) or not data.strip()):
        raise ValueError(f"run config {path}: test_data must be a data spec string, got {data!r}")
    return data


def _load_data(text: str, scheme: str | None = None, split: str = "auto"):
    """(x, y) from a data spec; the client's own test split for pFedPara (or ``split=local``)."""
    return dataset_for(text, scheme, split).tensors


def _default_out(source: Path) -> Path:
    if source.is_dir():
        return source / "model.onnx"
    return source.with_suffix(".onnx")


class ExportCommand:
    help = "compose the factors of a run, checkpoint or client state and export ONNX (+ int8)"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("source", type=Path, help="run directory, checkpoint (.safetensors) or client state dir")
        p.add_argument("--out", type=Path, default=None,
                       help="ONNX file to write (default: SOURCE_DIR/model.onnx or CHECKPOINT.onnx); "
                            "the int8 model goes next to it as NAME.int8.onnx")
        p.add_argument("--int8", action="store_true", help="also write an int8 (static QDQ) model")
        p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
        p.add_argument("--data", default=None,
                       help="data spec (e.g. fashion-mnist,limit=2000): parity and accuracy on its test "
                            "split, int8 calibration on its train shard (needed for --int8); default "
                            "for a run directory: the test_data its config.json records")
        p.add_argument("--calibration", type=int, default=256, help="int8 calibration samples")
        p.add_argument("--atol", type=float, default=1e-4, help="max abs logit difference allowed")
        p.add_argument("--json", action="store_true", help="print the report as JSON")
        p.add_argument("--web", type=Path, default=None, metavar="DIR",
                       help="also write a static page running the model in a browser (onnxruntime-web) "
                            "into DIR, with test samples for ?selftest (export.web, docs/mobile.md)")
        p.add_argument("--web-samples", type=int, default=200,
                       help="test samples bundled with the --web page (the first N of --data's test split)")

    def run(self, args) -> int:
        try:
            import torch

            from fedpara.data import load_client_data, parse_data_spec

            from .pipeline import export_model
            from .source import load_source
        except ImportError as exc:
            raise ValueError(f"export needs torch, onnx and onnxscript ({exc}); install the "
                             "export profile: pip install 'fedpara-edge[export]'") from None
        if not args.data:
            args.data = recorded_data(args.source)
            if args.data:
                log.info("--data not given: using the run's recorded test_data %s", args.data)
        if args.int8 and not args.data:
            raise ValueError("--int8 needs --data SPEC: int8 ranges are calibrated on local data "
                             f"(and {args.source} is not a run directory recording its test_data)")
        if args.calibration < 1:
            raise ValueError(f"--calibration must be >= 1, got {args.calibration}")
        if args.web is not None:
            from .web import check_assets
            check_assets()  # before the export's work: say at once when onnxruntime-web is missing
            if args.web_samples < 0:
                raise ValueError(f"--web-samples must be >= 0, got {args.web_samples}")
        model, spec, info = load_source(args.source)
        out = args.out or (args.web / "model.onnx" if args.web is not None else _default_out(args.source))
        eval_data = calibration = None
        if args.data:
            eval_data = _load_data(args.data, spec.scheme)
            if args.int8:
                train, _ = load_client_data(parse_data_spec(args.data))
                x = train.tensors[0]
                idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:args.calibration]
                calibration = x[idx]
        report = export_model(model, spec, out, info=info, opset=args.opset, eval_data=eval_data,
                              calibration=calibration, int8=args.int8, atol=args.atol)
        web = None
        if args.web is not None and report.ok:
            from .web import write_web
            samples = None
            if eval_data is not None and args.web_samples:
                samples = tuple(t[:args.web_samples].numpy() for t in eval_data)
            web = write_web(report.onnx, spec, args.web, samples=samples, info=info)
        if args.json:
            d = report.to_dict()
            if web is not None:
                d["web"] = {"dir": str(web.out), "files": web.files, "samples": web.samples,
                            "python_correct": web.python_correct}
            print(json.dumps(d, indent=2, default=str))
            return 0 if report.ok else 1
        print(f"{spec.model} scheme={spec.scheme} ratio={spec.ratio} round={info.get('round', '-')} "
              f"recorded accuracy={info.get('accuracy', '-')}")
        print(f"fp32  {report.onnx}  {_mb(report.size_bytes)}")
        pr = report.parity_random
        print(f"parity (random, batch 1 and 64): max abs {pr.max_abs:.2e}, "
              f"{'same predictions' if pr.same_predictions else 'PREDICTIONS DIFFER'}")
        if report.parity_data:
            pd = report.parity_data
            print(f"parity ({args.data}, {pd.samples} samples): max abs {pd.max_abs:.2e}; accuracy "
                  f"torch {_pct(pd.torch_accuracy)} onnxruntime {_pct(pd.onnx_accuracy)}")
        print(f"latency batch 1 fp32: p50 {report.latency['fp32']['p50_ms']:.3f} ms")
        if report.int8:
            ratio = report.size_bytes / report.int8_size_bytes
            print(f"int8  {report.int8}  {_mb(report.int8_size_bytes)} ({ratio:.2f}x smaller); "
                  f"latency batch 1 p50 {report.latency['int8']['p50_ms']:.3f} ms")
            if report.int8_accuracy is not None:
                print(f"int8 accuracy {_pct(report.int8_accuracy)} (drop {report.int8_drop_pp:+.2f} pp, "
                      f"{_pct(report.int8_agreement)} of predictions equal fp32's)")
        if web is not None:
            print(f"web   {web.out}  {_mb(web.total_bytes)} in {len(web.files)} files; "
                  f"{web.samples} samples ({web.python_correct} classified right here); serve the "
                  "directory over https (or localhost) and open index.html, ?selftest to check")
        if not report.ok:
            print(f"PARITY FAILED: onnxruntime differs from torch by more than {args.atol} "
                  "or predicts different classes")
            return 1
        return 0


EXPORT_COMMAND = ExportCommand()
