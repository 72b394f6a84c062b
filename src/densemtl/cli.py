"""``densemtl`` command line: thin subcommands over library functions a user can call from Python.

Heavy modules (torch, the renderer) are imported inside each handler so that ``densemtl --help`` is instant.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from densemtl.argtypes import (
    device_name,
    field_of_view,
    nonnegative_float,
    output_file,
    output_folder,
    parse_size,
    positive_float,
    positive_int,
)


def _cmd_synth(args: argparse.Namespace) -> int:
    from densemtl.synth.generate import generate_dataset

    stats = generate_dataset(
        args.out,
        n_train=args.train,
        n_val=args.val,
        size=args.size,
        seed=args.seed,
        workers=args.workers,
        image_format=args.image_format,
        overwrite=args.overwrite,
    )
    print(json.dumps(stats, indent=2))
    return 0


def _cmd_preview(args: argparse.Namespace) -> int:
    from densemtl.viz.preview import write_preview

    out = write_preview(args.root, split=args.split, n=args.n, out=args.out)
    print(f"wrote {out}")
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from densemtl.data.check import check_dataset
    from densemtl.fileio import atomic_write_text

    report = check_dataset(args.root, splits=args.split or None, progress=True)
    print(report.format())
    if args.json is not None:
        atomic_write_text(args.json, report.to_json() + "\n")
    return 0 if report.ok else 1


def _cmd_models(args: argparse.Namespace) -> int:
    from densemtl.models.zoo import format_model_table, model_table

    print(format_model_table(model_table(size=args.size)))
    return 0


def _load_cfg(args: argparse.Namespace):
    from densemtl.config import load_config

    return load_config(args.config, args.set)


def _cmd_train(args: argparse.Namespace) -> int:
    from densemtl.config import replace
    from densemtl.train.engine import config_for_resume, train

    if args.resume is not None and args.config is None:
        cfg = config_for_resume(args.resume, args.set)  # the run's own settings, in the checkpoint's folder
    else:
        cfg = _load_cfg(args)
    if args.out is not None:
        cfg = replace(cfg, train=replace(cfg.train, out_dir=str(args.out)))
    result = train(cfg, resume=args.resume, overwrite=args.overwrite)
    best = "none (no finite value)" if result["best"] is None else f"{result['best']:.4f}"
    print(f"done: best {cfg.train.best_metric} = {best}; checkpoints in {result['out_dir']}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from densemtl.evaluation import evaluate_checkpoint

    result = evaluate_checkpoint(
        args.checkpoint, data_root=args.data, split=args.split, out_dir=args.out, device=args.device
    )
    print(json.dumps(result["summary"], indent=2))
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from densemtl.calibration import calibrate_checkpoint

    result = calibrate_checkpoint(args.checkpoint, args.split, args.data, args.out, args.device)
    print(json.dumps(result, indent=2))
    return 0


def _cmd_synth_video(args: argparse.Namespace) -> int:
    from densemtl.synth.drive import synth_video

    r = synth_video(args.out, args.frames, args.size, args.fps, args.speed, args.hfov, args.seed)
    print(f"wrote {r['frames']} frames to {r['video']} (codec {r['codec']}) and camera {r['meta']}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from densemtl.viz.report import write_report

    print(f"wrote {write_report(args.run_dir)}")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from densemtl.datasets.convert import convert_dataset

    opts: dict = {"image_format": args.image_format, "max_per_split": args.max_per_split}
    if args.objects:
        if args.dataset == "nyuv2":
            raise ValueError("--objects: NYUv2 has no object boxes; use it with cityscapes or kitti")
        opts["objects"] = True
    if args.dataset == "nyuv2":
        opts.update(meta_dir=args.meta, classes=args.classes or 40, crop_valid=args.crop_valid)
        if args.normals is not None:
            opts["normals_dir"] = args.normals
        if args.src.is_dir():  # the MTAN/LibMTL .npy layout takes no metadata options
            opts = {"image_format": args.image_format}
    elif args.dataset == "cityscapes":
        from densemtl.datasets.cityscapes import DepthPrep

        crop = [float(v) for v in args.crop.split(",")] if args.crop else [0.0] * 4
        if len(crop) != 4:
            raise ValueError(f"--crop needs TOP,BOTTOM,LEFT,RIGHT fractions, got {args.crop!r}")
        prep = DepthPrep(*crop, inpaint=args.inpaint, smooth=args.smooth, clip=args.clip)
        opts.update(classes=args.classes or 19, prep=prep, splits=tuple(args.split or ("train", "val")))
    else:
        opts.update(eval_crop=args.eval_crop)
    stats = convert_dataset(args.dataset, args.src, args.dst, size=args.size, progress=True, **opts)
    print(json.dumps(stats, indent=2))
    return 0


def _add_convert_parser(data) -> None:
    """``data convert {cityscapes,nyuv2,kitti} SRC DST`` and each dataset's options (see docs/datasets.md)."""
    s = data.add_parser("convert", help="official Cityscapes / NYUv2 / KITTI layout -> folder format")
    s.add_argument("dataset", choices=("cityscapes", "nyuv2", "kitti"))
    s.add_argument(
        "src", type=Path, help="dataset folder (NYUv2: nyu_depth_v2_labeled.mat or MTAN .npy folder)"
    )
    s.add_argument("dst", type=Path)
    s.add_argument("--size", type=parse_size, default=None, help="output HEIGHTxWIDTH (default: original)")
    s.add_argument("--image-format", choices=("png", "jpg"), default="png")
    s.add_argument("--max-per-split", type=int, default=0, help="first N samples per split (0 = all)")
    s.add_argument("--classes", type=int, default=0, help="nyuv2: 40|13, cityscapes: 19|7")
    s.add_argument("--meta", type=Path, default=None, help="nyuv2: folder with classMapping40.mat, "
                   "class13Mapping.mat, splits.mat")  # fmt: skip
    s.add_argument("--crop-valid", action="store_true", help="nyuv2: keep the valid Kinect region")
    s.add_argument("--normals", type=Path, default=None, help="nyuv2 .mat: folder of norm_gt_<frame>.png normal maps")
    s.add_argument("--split", action="append", default=[], help="cityscapes: split (repeatable)")
    s.add_argument(
        "--crop", default="", help="cityscapes: TOP,BOTTOM,LEFT,RIGHT fractions, e.g. 0,0.2,0.05,0"
    )
    s.add_argument("--inpaint", action="store_true", help="cityscapes: fill depth holes (OpenCV)")
    s.add_argument("--smooth", type=int, default=0, help="cityscapes: median kernel 3|5 (0 = off)")
    s.add_argument("--clip", type=float, default=0.0, help="cityscapes: clamp depth to M metres (0 = off)")
    s.add_argument("--eval-crop", choices=("none", "garg", "eigen"), default="none", help="kitti: val crop")
    s.add_argument("--objects", action="store_true", help="cityscapes: also boxes + instance masks from "
                   "gtFine_instanceIds (+ gtBbox3d/); kitti: also SRC/data_object/training boxes")  # fmt: skip
    s.set_defaults(func=_cmd_convert)


def _task_name(text: str) -> str:
    """``--task``: a name in ``densemtl.tasks.TASKS`` (imported only when the flag is given: fast --help)."""
    from densemtl.tasks import TASKS

    if text not in TASKS:
        raise argparse.ArgumentTypeError(f"unknown task {text!r}; choose from {sorted(TASKS)}")
    return text


def _cmd_pseudolabel(args: argparse.Namespace) -> int:
    from densemtl.data.pseudolabel import pseudolabel

    task = {"task": args.task} if args.task is not None else {}  # the library's default task otherwise
    r = pseudolabel(args.teacher, args.data, splits=args.split or None, min_confidence=args.min_confidence,
                    max_rel_std=args.max_rel_std, device=args.device, size=args.size, progress=True,
                    **task)  # fmt: skip
    print(json.dumps(r, indent=2))
    return 0


def _add_pseudolabel_parser(sub) -> None:
    s = sub.add_parser("pseudolabel", help="fill a task's missing targets with a teacher's predictions")
    s.add_argument("--teacher", type=Path, required=True, help="densemtl .pt checkpoint or exported .onnx")
    s.add_argument("--data", type=Path, required=True, help="folder-format dataset root (modified in place)")
    s.add_argument("--task", type=_task_name, default=None, help="task to fill, any of densemtl.tasks.TASKS "
                   "(default: depth)")  # fmt: skip
    s.add_argument("--split", action="append", default=[], help="split to fill (repeatable; default: all)")
    s.add_argument("--min-confidence", type=float, default=0.0, help="for tasks whose pseudo_label uses it "
                   "(semseg: pixels less confident -> 255, ignore)")  # fmt: skip
    s.add_argument("--max-rel-std", type=nonnegative_float, default=0.0, help="for tasks with a predicted "
                   "std (depth: pixels whose std is above this fraction of the depth -> 0, invalid); 0 = off")  # fmt: skip
    s.add_argument("--size", type=parse_size, default=None, help="teacher input HEIGHTxWIDTH")
    s.add_argument("--device", default="auto")
    s.set_defaults(func=_cmd_pseudolabel)


def _add_data_parsers(sub) -> None:
    """``data synth | synth-video | preview | check | convert``."""
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
    s.add_argument("--overwrite", action="store_true",
                   help="delete the dataset already in --out first (only its own files); "
                   "without it a non-empty --out is refused")  # fmt: skip
    s.set_defaults(func=_cmd_synth)

    s = data.add_parser(
        "synth-video", help="render a clip driving through one synthetic street (+ .json camera)"
    )
    s.add_argument("--out", type=output_file("drive.mp4"), default=Path("data/synth_drive.mp4"),
                   help="MP4 to write (its camera goes to <out>.json)")  # fmt: skip
    s.add_argument("--frames", type=positive_int, default=60, help="number of frames, >= 1")
    s.add_argument("--size", type=parse_size, default=(256, 512), help="HEIGHTxWIDTH")
    s.add_argument("--fps", type=positive_float, default=12.0, help="frames per second, > 0")
    s.add_argument("--speed", type=nonnegative_float, default=8.0, help="metres per second")
    s.add_argument("--hfov", type=field_of_view, default=70.0, help="horizontal field of view, degrees in (0, 180)")
    s.add_argument("--seed", type=int, default=0, help="random seed of the street")
    s.set_defaults(func=_cmd_synth_video)

    s = data.add_parser("preview", help="grid of RGB | each task's target")
    s.add_argument("root", type=Path, help="folder-format dataset root")
    s.add_argument("--split", default="val", help="split to show (default val)")
    s.add_argument("-n", type=positive_int, default=8, help="number of samples, >= 1")
    s.add_argument("--out", type=output_file("preview.png"), default=Path("preview.png"), help="PNG to write")
    s.set_defaults(func=_cmd_preview)

    s = data.add_parser("check", help="report every problem of a dataset in one pass, with statistics")
    s.add_argument("root", type=Path)
    s.add_argument("--split", action="append", default=[], help="split to check (repeatable; default: all)")
    s.add_argument("--json", type=Path, default=None, help="also write the report as JSON here")
    s.set_defaults(func=_cmd_check)
    _add_convert_parser(data)


def _cmd_save_pretrained(args: argparse.Namespace) -> int:
    from densemtl.deploy.pretrained import save_pretrained

    out = save_pretrained(args.checkpoint, args.out, onnx=args.onnx, benchmark_json=args.benchmark,
                          license=args.license)  # fmt: skip
    print(f"wrote {out}: " + ", ".join(sorted(p.name for p in out.iterdir() if not p.name.startswith("."))))
    return 0


def _cmd_push_to_hub(args: argparse.Namespace) -> int:
    from densemtl.deploy.pretrained import push_to_hub

    url = push_to_hub(args.pretrained or args.checkpoint, args.repo, private=args.private)
    print(f"pushed to {args.repo}: {url}")
    return 0


def _add_sharing_parsers(sub) -> None:
    """``save-pretrained`` and ``push-to-hub`` (docs/sharing.md)."""
    s = sub.add_parser("save-pretrained", help="checkpoint -> shareable folder (config.json, safetensors, card)")
    s.add_argument("--checkpoint", type=Path, required=True, help="densemtl .pt checkpoint, e.g. runs/x/best.pt")
    s.add_argument("--out", type=output_folder, required=True,
                   help="folder to write: new, empty, or an earlier save-pretrained folder")  # fmt: skip
    s.add_argument("--onnx", action="store_true", help="also export model.onnx (dynamic axes, parity-checked)")
    s.add_argument("--benchmark", type=Path, default=None,
                   help="a `densemtl benchmark --json` file: its latencies go into the model card")  # fmt: skip
    s.add_argument("--license", default=None, help="SPDX license id for the model card, e.g. mit, apache-2.0")
    s.set_defaults(func=_cmd_save_pretrained)

    s = sub.add_parser("push-to-hub", help="upload a pretrained folder or a checkpoint to the Hugging Face Hub")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--pretrained", type=Path, help="folder written by save-pretrained")
    src.add_argument("--checkpoint", type=Path, help="densemtl .pt checkpoint (saved to a temporary folder first)")
    s.add_argument("--repo", required=True, help="Hub model id org/name (log in first: `hf auth login` or HF_TOKEN)")
    s.add_argument("--private", action="store_true", help="create the repository as private")
    s.set_defaults(func=_cmd_push_to_hub)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    from densemtl.app import add_app_parser  # argparse only: gradio/numpy load when the app starts
    from densemtl.deploy.commands import add_deploy_parsers  # argparse only: no torch at --help
    from densemtl.predict_commands import add_predict_parsers

    p = argparse.ArgumentParser(prog="densemtl", description=__doc__.splitlines()[0])
    p.add_argument("--debug", action="store_true",
                   help="show the full traceback of an error instead of one line (anywhere on the line)")  # fmt: skip
    sub = p.add_subparsers(dest="command", required=True)

    _add_data_parsers(sub)

    s = sub.add_parser("models", help="list backbones and decoders with parameters and GFLOPs")
    s.add_argument("--size", type=parse_size, default=(480, 640), help="input HEIGHTxWIDTH for the GFLOPs")
    s.set_defaults(func=_cmd_models)

    s = sub.add_parser("train", help="train a model from a config (run folder rules: docs/run_folder.md)")
    s.add_argument("--config", type=Path, default=None, help="experiment YAML (default: built-in defaults; "
                   "with --resume alone: the checkpoint's own config)")  # fmt: skip
    s.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. train.epochs=5"
    )
    s.add_argument("--resume", type=Path, default=None, help="checkpoint to continue from (e.g. runs/x/last.pt); "
                   "the run continues in the checkpoint's folder unless --out says otherwise")  # fmt: skip
    s.add_argument("--out", type=Path, default=None, help="run folder (same as --set train.out_dir=DIR)")
    s.add_argument("--overwrite", action="store_true", help="replace the run in a non-empty run folder "
                   "(its files are removed only once the new run's setup has succeeded)")  # fmt: skip
    s.set_defaults(func=_cmd_train)

    s = sub.add_parser("evaluate", help="metrics, tables and plots for a checkpoint")
    s.add_argument("--checkpoint", type=Path, required=True, help="densemtl .pt checkpoint")
    s.add_argument(
        "--data", type=Path, default=None, help="dataset root (default: the one it was trained on)"
    )
    s.add_argument("--split", default="val", help="split to evaluate (default val)")
    s.add_argument("--out", type=output_folder, default=None, help="output folder (default: <run>/eval_<split>)")
    s.add_argument("--device", type=device_name, default="auto", help="auto, cpu, cuda or cuda:N")
    s.set_defaults(func=_cmd_evaluate)

    s = sub.add_parser("calibrate", help="fit the temperature / std scale on held-out data, into the checkpoint")
    s.add_argument("--checkpoint", type=Path, required=True, help="densemtl .pt checkpoint (updated in place)")
    s.add_argument("--split", default="val", help="held-out split to fit on (default val; not the train split)")
    s.add_argument("--data", type=Path, default=None, help="dataset root (default: the one it was trained on)")
    s.add_argument("--out", type=Path, default=None, help="write the calibrated checkpoint here instead")
    s.add_argument("--device", type=device_name, default="auto", help="auto, cpu, cuda or cuda:N")
    s.set_defaults(func=_cmd_calibrate)

    add_predict_parsers(sub)
    add_deploy_parsers(sub, parse_size)
    add_app_parser(sub)
    _add_sharing_parsers(sub)
    _add_pseudolabel_parser(sub)
    s = sub.add_parser("report", help="Markdown report of a run (metrics table and pictures)")
    s.add_argument("run_dir", type=Path, help="run folder (config.yaml, metrics.jsonl, eval_*/)")
    s.set_defaults(func=_cmd_report)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``densemtl`` console script.

    A user's error (a bad file, flag, disk, image or YAML: ``densemtl.errors.user_errors``) prints one line
    ``densemtl: error: <what, and the fix>`` and returns 2; ``--debug`` (before or after the subcommand) raises
    it with its traceback instead.
    """
    from densemtl.errors import error_message, user_errors

    argv = list(sys.argv[1:] if argv is None else argv)
    end = argv.index("--") if "--" in argv else len(argv)  # after "--" it would be a file name
    debug = "--debug" in argv[:end]
    argv = [a for i, a in enumerate(argv) if i >= end or a != "--debug"]
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except user_errors() as e:
        if debug:
            raise
        print(f"densemtl: error: {error_message(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
