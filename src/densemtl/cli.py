"""``densemtl`` command line: thin subcommands over library functions a user can call from Python.

Heavy modules (torch, the renderer) are imported inside each handler so that ``densemtl --help`` is instant.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def parse_size(text: str) -> tuple[int, int]:
    """``"256x512"`` -> ``(256, 512)`` as (height, width)."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be HEIGHTxWIDTH like 256x512, got {text!r}") from None
    if h <= 0 or w <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return h, w


def _cmd_synth(args: argparse.Namespace) -> int:
    from densemtl.data.synthetic import generate_dataset

    stats = generate_dataset(
        args.out,
        n_train=args.train,
        n_val=args.val,
        size=args.size,
        seed=args.seed,
        workers=args.workers,
        image_format=args.image_format,
    )
    print(json.dumps(stats, indent=2))
    return 0


def _cmd_preview(args: argparse.Namespace) -> int:
    from densemtl.data.preview import write_preview

    out = write_preview(args.root, split=args.split, n=args.n, out=args.out)
    print(f"wrote {out}")
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from densemtl.data.check import check_dataset

    report = check_dataset(args.root, splits=args.split or None)
    print(report.format())
    if args.json is not None:
        args.json.write_text(report.to_json() + "\n")
    return 0 if report.ok else 1


def _cmd_models(args: argparse.Namespace) -> int:
    from densemtl.models.zoo import format_model_table, model_table

    print(format_model_table(model_table(size=args.size)))
    return 0


def _load_cfg(args: argparse.Namespace):
    from densemtl.config import load_config

    return load_config(args.config, args.set)


def _cmd_train(args: argparse.Namespace) -> int:
    from densemtl.engine import config_for_resume, train

    if args.resume is not None and args.config is None:
        cfg = config_for_resume(args.resume, args.set)  # continue with the run's own settings
    else:
        cfg = _load_cfg(args)
    result = train(cfg, resume=args.resume)
    print(f"done: best {cfg.train.best_metric} = {result['best']:.4f}; checkpoints in {result['out_dir']}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from densemtl.evaluate import evaluate_checkpoint

    result = evaluate_checkpoint(
        args.checkpoint, data_root=args.data, split=args.split, out_dir=args.out, device=args.device
    )
    print(json.dumps(result["summary"], indent=2))
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from densemtl.inference import predict_paths

    written = predict_paths(args.checkpoint, args.inputs, args.out, device=args.device, size=args.size)
    print(f"wrote predictions for {len(written)} image(s) to {args.out}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from densemtl.report import write_report

    print(f"wrote {write_report(args.run_dir)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    p = argparse.ArgumentParser(prog="densemtl", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="create, convert, inspect datasets").add_subparsers(
        dest="data_cmd", required=True
    )
    s = data.add_parser("synth", help="render the synthetic street-scene dataset")
    s.add_argument("--out", type=Path, default=Path("data/synthetic"))
    s.add_argument("--train", type=int, default=2000, help="number of training images")
    s.add_argument("--val", type=int, default=400, help="number of validation images")
    s.add_argument("--size", type=parse_size, default=(256, 512), help="HEIGHTxWIDTH")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--workers", type=int, default=0, help="worker processes (0 = one per CPU core)")
    s.add_argument(
        "--image-format",
        choices=("jpg", "png"),
        default="jpg",
        help="RGB file format: jpg (quality 95, fast, small) or png (lossless)",
    )
    s.set_defaults(func=_cmd_synth)

    s = data.add_parser("preview", help="grid of RGB | labels | depth | normals")
    s.add_argument("root", type=Path)
    s.add_argument("--split", default="val")
    s.add_argument("-n", type=int, default=8)
    s.add_argument("--out", type=Path, default=Path("preview.png"))
    s.set_defaults(func=_cmd_preview)

    s = data.add_parser("check", help="report every problem of a dataset in one pass, with statistics")
    s.add_argument("root", type=Path)
    s.add_argument("--split", action="append", default=[], help="split to check (repeatable; default: all)")
    s.add_argument("--json", type=Path, default=None, help="also write the report as JSON here")
    s.set_defaults(func=_cmd_check)

    s = sub.add_parser("models", help="list backbones and decoders with parameters and GFLOPs")
    s.add_argument("--size", type=parse_size, default=(480, 640))
    s.set_defaults(func=_cmd_models)

    s = sub.add_parser("train", help="train a model from a config")
    s.add_argument("--config", type=Path, default=None)
    s.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. train.epochs=5"
    )
    s.add_argument(
        "--resume", type=Path, default=None, help="checkpoint to continue from (e.g. runs/x/last.pt)"
    )
    s.set_defaults(func=_cmd_train)

    s = sub.add_parser("evaluate", help="metrics, tables and plots for a checkpoint")
    s.add_argument("--checkpoint", type=Path, required=True)
    s.add_argument(
        "--data", type=Path, default=None, help="dataset root (default: the one it was trained on)"
    )
    s.add_argument("--split", default="val")
    s.add_argument("--out", type=Path, default=None, help="output folder (default: <run>/eval_<split>)")
    s.add_argument("--device", default="auto")
    s.set_defaults(func=_cmd_evaluate)

    s = sub.add_parser("predict", help="segmentation + depth for images or folders")
    s.add_argument("--checkpoint", type=Path, required=True)
    s.add_argument("inputs", nargs="+", type=Path)
    s.add_argument("--out", type=Path, required=True)
    s.add_argument(
        "--size", type=parse_size, default=None, help="resize input to HEIGHTxWIDTH for the network"
    )
    s.add_argument("--device", default="auto")
    s.set_defaults(func=_cmd_predict)

    s = sub.add_parser("report", help="Markdown report of a run (metrics table and pictures)")
    s.add_argument("run_dir", type=Path)
    s.set_defaults(func=_cmd_report)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``densemtl`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (FileNotFoundError, ValueError) as e:  # our errors carry the file and the fix in the message
        print(f"densemtl: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
