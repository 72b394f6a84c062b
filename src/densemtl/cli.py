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
    from densemtl.synth.render import generate_dataset

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
    from densemtl.viz.preview import write_preview

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
    from densemtl.train.engine import config_for_resume, train

    if args.resume is not None and args.config is None:
        cfg = config_for_resume(args.resume, args.set)  # continue with the run's own settings
    else:
        cfg = _load_cfg(args)
    result = train(cfg, resume=args.resume)
    print(f"done: best {cfg.train.best_metric} = {result['best']:.4f}; checkpoints in {result['out_dir']}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from densemtl.evaluation import evaluate_checkpoint

    result = evaluate_checkpoint(
        args.checkpoint, data_root=args.data, split=args.split, out_dir=args.out, device=args.device
    )
    print(json.dumps(result["summary"], indent=2))
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from densemtl.inference import predict_paths

    scene = _scene_options(args) if args.pointcloud or args.bev else None
    written = predict_paths(
        args.checkpoint,
        args.inputs,
        args.out,
        device=args.device,
        size=args.size,
        scene=scene,
        backend=args.backend,
    )
    print(f"wrote predictions for {len(written)} image(s) to {args.out}")
    return 0


def _scene_options(args: argparse.Namespace):
    """SceneOptions from the camera flags (``_add_camera_args``)."""
    from densemtl.scene3d.bev import BevGrid, SceneOptions
    from densemtl.scene3d.geometry import CameraPose

    k = (args.fx, args.fy, args.cx, args.cy)
    if any(v is not None for v in k) and any(v is None for v in k):
        raise ValueError("give all four of --fx --fy --cx --cy (pixels), or --hfov DEGREES")
    pose = None if args.camera_height is None else CameraPose(args.camera_height, args.pitch, args.roll)
    return SceneOptions(
        pointcloud=getattr(args, "pointcloud", False),
        bev=getattr(args, "bev", True),
        intrinsics=None if k[0] is None else k,
        hfov_deg=args.hfov,
        pose=pose,
        max_range=args.max_range,
        voxel=args.voxel or None,
        grid=BevGrid(
            x_range=(-args.bev_range / 2, args.bev_range / 2),
            z_range=(0.0, args.bev_range),
            cell=args.bev_cell,
        ),
    )


def _add_backend_arg(s: argparse.ArgumentParser) -> None:
    """``--backend`` of ``predict`` and ``video`` (``--engine``: its old name, still accepted)."""
    s.add_argument("--backend", "--engine", dest="backend", choices=("torch", "onnxruntime"), default="torch",
                   help="inference backend for a .pt checkpoint (onnxruntime: exported first)")  # fmt: skip


def _add_camera_args(s: argparse.ArgumentParser) -> None:
    """Intrinsics, pose and BEV/point-cloud extent flags shared by ``predict`` and ``video``."""
    g = s.add_argument_group(
        "camera (default: the sample's meta JSON, else --hfov, pose fitted to road/floor)"
    )
    for name in ("fx", "fy", "cx", "cy"):
        g.add_argument(f"--{name}", type=float, default=None, help=f"intrinsic {name} in pixels")
    g.add_argument("--hfov", type=float, default=None, help="horizontal field of view in degrees")
    g.add_argument("--camera-height", type=float, default=None, help="optical centre above the ground, m")
    g.add_argument("--pitch", type=float, default=0.0, help="degrees, > 0 looks down")
    g.add_argument("--roll", type=float, default=0.0, help="degrees")
    g.add_argument("--max-range", type=float, default=40.0, help="drop points farther than this, m")
    g.add_argument("--voxel", type=float, default=0.05, help="point-cloud voxel size, m (0 = keep all)")
    g.add_argument("--bev-range", type=float, default=40.0, help="BEV extent ahead (and width), m")
    g.add_argument("--bev-cell", type=float, default=0.2, help="BEV cell size, m")


def _cmd_video(args: argparse.Namespace) -> int:
    from densemtl.viz.video import run_video

    source = int(args.input) if args.input.isdigit() else Path(args.input)
    from dataclasses import replace

    opts = replace(_scene_options(args), bev=not args.no_bev)
    r = run_video(
        args.checkpoint, source, args.out, opts, args.fps, args.max_frames, args.device, args.backend
    )
    print(f"wrote {r['frames']} frames to {r['video']} (codec {r['codec']}, {r['fps']:.1f} FPS)")
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
    stats = convert_dataset(args.dataset, args.src, args.dst, size=args.size, **opts)
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
                    device=args.device, size=args.size, **task)  # fmt: skip
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
    s.set_defaults(func=_cmd_synth)

    s = data.add_parser(
        "synth-video", help="render a clip driving through one synthetic street (+ .json camera)"
    )
    s.add_argument("--out", type=Path, default=Path("data/synth_drive.mp4"))
    s.add_argument("--frames", type=int, default=60)
    s.add_argument("--size", type=parse_size, default=(256, 512), help="HEIGHTxWIDTH")
    s.add_argument("--fps", type=float, default=12.0)
    s.add_argument("--speed", type=float, default=8.0, help="metres per second")
    s.add_argument("--hfov", type=float, default=70.0, help="horizontal field of view, degrees")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_cmd_synth_video)

    s = data.add_parser("preview", help="grid of RGB | each task's target")
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
    _add_convert_parser(data)


def _add_predict_parsers(sub) -> None:
    """``predict`` (images) and ``video`` (a clip or a camera)."""
    s = sub.add_parser("predict", help="every task of a checkpoint for images or folders")
    s.add_argument("--checkpoint", type=Path, required=True)
    s.add_argument("inputs", nargs="+", type=Path)
    s.add_argument("--out", type=Path, required=True)
    s.add_argument(
        "--size", type=parse_size, default=None, help="resize input to HEIGHTxWIDTH for the network"
    )
    s.add_argument("--device", default="auto")
    s.add_argument("--pointcloud", action="store_true", help="also write <id>.ply and <id>_cloud.npz")
    s.add_argument("--bev", action="store_true", help="also write the bird's-eye view <id>_bev.png/.npy")
    _add_camera_args(s)
    _add_backend_arg(s)
    s.set_defaults(func=_cmd_predict)

    s = sub.add_parser("video", help="video file or camera -> MP4 of RGB | each task | BEV panels")
    s.add_argument(
        "--checkpoint", type=Path, required=True, help=".pt checkpoint (or an exported .onnx: ONNX Runtime)"
    )
    s.add_argument("input", help="video file, or a camera index (0) for live input")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--fps", type=float, default=None, help="output frame rate (default: clip's, else 12)")
    s.add_argument("--max-frames", type=int, default=None)
    s.add_argument("--no-bev", action="store_true", help="leave the BEV panel out")
    s.add_argument("--device", default="auto")
    _add_backend_arg(s)
    _add_camera_args(s)
    s.set_defaults(func=_cmd_video)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    from densemtl.deploy.commands import add_deploy_parsers  # argparse only: no torch at --help

    p = argparse.ArgumentParser(prog="densemtl", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    _add_data_parsers(sub)

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

    _add_predict_parsers(sub)
    add_deploy_parsers(sub, parse_size)
    _add_pseudolabel_parser(sub)
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
