"""The ``export``, ``quantize`` and ``benchmark`` subcommands of ``densemtl``: parsers and thin handlers.

Kept out of ``densemtl.cli`` so that it stays short; as there, heavy modules are imported inside the handlers.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

from densemtl.argtypes import nonnegative_int, output_file, positive_int


def _cmd_export(args: argparse.Namespace) -> int:
    from densemtl.deploy.export import export_checkpoint

    r = export_checkpoint(
        args.checkpoint, args.out, size=args.size, dynamic=args.dynamic,
        bake_normalization=args.bake_normalization, class_ids=not args.no_class_ids, data_root=args.data,
    )  # fmt: skip
    print(
        f"wrote {r['onnx']} ({r['file_mb']:.1f} MiB, input {r['size'][0]}x{r['size'][1]}); parity {r['parity']}"
    )
    return 0


def _cmd_quantize(args: argparse.Namespace) -> int:
    from densemtl.deploy.quantize import accuracy_change, quantize_onnx

    out = args.out or args.onnx.with_name(args.onnx.stem + "_int8.onnx")
    from densemtl.fileio import atomic_write_text, check_output

    accuracy = out.with_suffix(".accuracy.json")
    if args.eval_split:
        check_output(accuracy)  # before the minutes of calibration, not after
    quantize_onnx(args.onnx, out, args.calib, n=args.n, split=args.calib_split)
    print(f"wrote {out}")
    if args.eval_split:
        change = accuracy_change(args.onnx, out, args.calib, args.eval_split, args.eval_samples)
        atomic_write_text(accuracy, json.dumps(change, indent=2) + "\n")
        print(json.dumps(change["delta"], indent=2))
    return 0


def _cmd_benchmark(args: argparse.Namespace) -> int:
    from densemtl.deploy.benchmark import format_table, load_benchmark_model, run_benchmark
    from densemtl.fileio import atomic_write_text, check_output

    if args.json:
        check_output(args.json)  # before the benchmark, not after
    model, label, calib = load_benchmark_model(args.checkpoint, args.config, args.set)
    backends = tuple(b.strip() for b in args.backends.split(",") if b.strip())
    result = run_benchmark(
        model, args.size, backends, args.threads, args.runs, args.warmup, not args.no_reference, calib, label
    )
    print(format_table(result))
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def _backend_list(text: str) -> str:
    """``--backends``: a comma-separated subset of ``densemtl.deploy.benchmark.BACKENDS`` (kept as given)."""
    from densemtl.deploy.benchmark import BACKENDS

    names = [b.strip() for b in text.split(",") if b.strip()]
    unknown = [b for b in names if b not in BACKENDS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown backend(s) {unknown or [text]}: give a comma-separated list of {', '.join(BACKENDS)}"
        )
    return text


def add_deploy_parsers(sub: argparse._SubParsersAction, parse_size: Callable[[str], tuple[int, int]]) -> None:
    """Add ``export``, ``quantize`` and ``benchmark`` to ``sub``; ``parse_size`` reads HEIGHTxWIDTH."""
    s = sub.add_parser("export", help="ONNX export with metadata and an ORT-vs-PyTorch parity check")
    s.add_argument("--checkpoint", type=Path, required=True, help="densemtl .pt checkpoint to export")
    s.add_argument("--out", type=output_file("model.onnx"), required=True,
                   help="ONNX file to write (replaced atomically; its folder is created)")  # fmt: skip
    s.add_argument("--size", type=parse_size, default=None,
                   help="network input HEIGHTxWIDTH (default: the size the network ran at in training)")  # fmt: skip
    s.add_argument("--dynamic", action="store_true", help="free batch, height and width axes")
    s.add_argument("--bake-normalization", action="store_true", help="accepted for old scripts; does nothing")
    s.add_argument(
        "--no-class-ids", action="store_true", help="omit the convenience outputs (argmax class ids)"
    )
    s.add_argument("--data", type=Path, default=None,
                   help="dataset root for the parity images (default: the checkpoint's)")  # fmt: skip
    s.set_defaults(func=_cmd_export)

    s = sub.add_parser("quantize", help="INT8 static quantisation (ONNX Runtime) + accuracy change")
    s.add_argument("--onnx", type=Path, required=True, help="fp32 file written by densemtl export")
    s.add_argument("--calib", type=Path, required=True, help="dataset root with calibration images")
    s.add_argument("-n", type=positive_int, default=64, help="calibration images, >= 1 (default 64)")
    s.add_argument("--calib-split", default="train", help="split of --calib to calibrate on (default train)")
    s.add_argument("--out", type=output_file("model_int8.onnx"), default=None,
                   help="INT8 file to write (default: <onnx>_int8.onnx)")  # fmt: skip
    s.add_argument("--eval-split", default="val", help="split for the accuracy change ('' to skip)")
    s.add_argument("--eval-samples", type=nonnegative_int, default=0, help="first N images of it (0 = all)")
    s.set_defaults(func=_cmd_quantize)

    s = sub.add_parser("benchmark", help="latency per inference backend vs torchvision LR-ASPP, table + JSON")
    s.add_argument("--checkpoint", type=Path, default=None, help="densemtl .pt checkpoint to time")
    s.add_argument("--config", "--model", dest="config", type=Path, default=None,
                   help="or a config YAML: its model with random weights (--model: the old name)")  # fmt: skip
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. model.backbone=resnet18 (repeatable)")  # fmt: skip
    s.add_argument("--size", type=parse_size, default=(480, 640),
                   help="input HEIGHTxWIDTH, batch 1 (default 480x640)")  # fmt: skip
    s.add_argument("--backends", "--engines", dest="backends", type=_backend_list, default="torch,onnxruntime,int8",
                   help="comma-separated: torch, onnxruntime, int8 (--engines: the old name, still accepted)")  # fmt: skip
    s.add_argument(
        "--threads", type=positive_int, default=2, help="CPU threads per backend, >= 1 (default 2)"
    )
    s.add_argument("--runs", type=positive_int, default=30, help="timed interleaved runs, >= 1 (default 30)")
    s.add_argument("--warmup", type=nonnegative_int, default=5, help="untimed runs first, >= 0 (default 5)")
    s.add_argument("--no-reference", action="store_true", help="skip the LR-ASPP reference")
    s.add_argument("--json", type=output_file("benchmark.json"), default=None,
                   help="also write the result as JSON here")  # fmt: skip
    s.set_defaults(func=_cmd_benchmark)
