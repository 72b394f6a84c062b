"""The ``predict`` and ``video`` subcommands of ``densemtl``: parsers and thin handlers over
:func:`densemtl.inference.predict_paths` and :func:`densemtl.viz.video.run_video`.

Kept out of ``densemtl.cli`` so that it stays short; as there, heavy modules are imported inside the handlers,
and every numeric flag is range-checked by its ``type=`` (:mod:`densemtl.argtypes`) so a bad value exits 2
with the flag named instead of a traceback.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from densemtl.argtypes import (
    device_name,
    field_of_view,
    finite_float,
    float_range,
    nonnegative_float,
    nonnegative_int,
    output_file,
    output_folder,
    parse_size,
    positive_float,
    positive_int,
)
from densemtl.scene3d.defaults import DEFAULT_MAX_REL_STD


def mc_samples(text: str) -> int:
    """``--mc-samples``: 0 (off) or at least 2 passes."""
    n = nonnegative_int(text)
    if n == 1:
        raise argparse.ArgumentTypeError("one sample has no spread: use 0 (off) or at least 2")
    return n


def _cmd_predict(args: argparse.Namespace) -> int:
    from densemtl.inference import predict_paths

    camera = scene_options(args)  # the camera flags also give objects' distances their focal length
    scene = camera if args.pointcloud or args.bev else None
    written = predict_paths(
        args.checkpoint,
        args.inputs,
        args.out,
        device=args.device,
        size=args.size,
        scene=scene,
        backend=args.backend,
        tta=args.tta,
        mc_samples=args.mc_samples,
        camera=camera,
    )
    print(f"wrote predictions for {len(written)} image(s) to {args.out}")
    return 0


def scene_options(args: argparse.Namespace):
    """SceneOptions from the camera flags (``_add_camera_args``); a bad combination is a ``ValueError``."""
    from densemtl.scene3d.bev import BevGrid, SceneOptions
    from densemtl.scene3d.geometry import CameraPose

    k = (args.fx, args.fy, args.cx, args.cy)
    if any(v is not None for v in k) and any(v is None for v in k):
        raise ValueError("give all four of --fx --fy --cx --cy (pixels), or --hfov DEGREES")
    pose = None if args.camera_height is None else CameraPose(args.camera_height, args.pitch, args.roll)
    try:
        grid = BevGrid(x_range=(-args.bev_range / 2, args.bev_range / 2), z_range=(0.0, args.bev_range),
                       cell=args.bev_cell)  # fmt: skip
    except ValueError as e:
        raise ValueError(f"--bev-range {args.bev_range:g} with --bev-cell {args.bev_cell:g}: {e}") from None
    return SceneOptions(
        pointcloud=getattr(args, "pointcloud", False),
        bev=getattr(args, "bev", True),
        intrinsics=None if k[0] is None else k,
        hfov_deg=args.hfov,
        pose=pose,
        max_range=args.max_range,
        voxel=args.voxel or None,
        grid=grid,
        max_rel_std=args.max_rel_std,
    )


def _add_backend_arg(s: argparse.ArgumentParser) -> None:
    """``--backend`` of ``predict`` and ``video`` (``--engine``: its old name, still accepted)."""
    s.add_argument("--backend", "--engine", dest="backend", choices=("torch", "onnxruntime"), default="torch",
                   help="inference backend for a .pt checkpoint (onnxruntime: exported first)")  # fmt: skip


def _add_camera_args(s: argparse.ArgumentParser) -> None:
    """Intrinsics, pose and BEV/point-cloud extent flags shared by ``predict`` and ``video``; the focal length
    also sets the objects' distances (docs/objects.md, Distance)."""
    g = s.add_argument_group(
        "camera (default: the sample's meta JSON, else --hfov, pose fitted to road/floor); the focal length "
        "(--fx or --hfov) is also the one objects' distances are for (without one: a 70-degree camera)"
    )
    for name in ("fx", "fy"):
        g.add_argument(
            f"--{name}", type=positive_float, default=None, help=f"focal length {name} in pixels, > 0"
        )
    for name in ("cx", "cy"):
        g.add_argument(f"--{name}", type=finite_float, default=None, help=f"principal point {name} in pixels")
    g.add_argument(
        "--hfov", type=field_of_view, default=None, help="horizontal field of view, degrees in (0, 180)"
    )
    g.add_argument(
        "--camera-height", type=positive_float, default=None, help="optical centre above the ground, m"
    )
    g.add_argument("--pitch", type=float_range(-90.0, 90.0), default=0.0, help="degrees, > 0 looks down")
    g.add_argument("--roll", type=float_range(-180.0, 180.0), default=0.0, help="degrees")
    g.add_argument("--max-range", type=positive_float, default=40.0, help="drop points farther than this, m")
    g.add_argument(
        "--voxel", type=nonnegative_float, default=0.05, help="point-cloud voxel size, m (0 = keep all)"
    )
    g.add_argument("--bev-range", type=positive_float, default=40.0, help="BEV extent ahead (and width), m")
    g.add_argument("--bev-cell", type=positive_float, default=0.2, help="BEV cell size, m")
    g.add_argument("--max-rel-std", type=nonnegative_float, default=DEFAULT_MAX_REL_STD,
                   help="models with depth uncertainty: drop points whose predicted depth std exceeds this "
                   "fraction of the depth, e.g. 0.15 = 15 %%; 0 keeps every point")  # fmt: skip


def _cmd_video(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from densemtl.viz.video import run_video

    source = int(args.input) if args.input.isdigit() else Path(args.input)
    opts = replace(scene_options(args), bev=not args.no_bev)
    r = run_video(
        args.checkpoint, source, args.out, opts, args.fps, args.max_frames, args.device, args.backend
    )
    print(f"wrote {r['frames']} frames to {r['video']} (codec {r['codec']}, {r['fps']:.1f} FPS)")
    return 0


def add_predict_parsers(sub: argparse._SubParsersAction) -> None:
    """``predict`` (images) and ``video`` (a clip or a camera)."""
    s = sub.add_parser("predict", help="every task of a checkpoint for images or folders")
    s.add_argument("--checkpoint", type=Path, required=True, help="densemtl .pt checkpoint")
    s.add_argument("inputs", nargs="+", type=Path, help="image files and/or folders of images")
    s.add_argument("--out", type=output_folder, required=True, help="output folder (created); images with the "
                   "same name in different folders keep those folders under it")  # fmt: skip
    s.add_argument(
        "--size", type=parse_size, default=None, help="resize input to HEIGHTxWIDTH for the network"
    )
    s.add_argument("--device", type=device_name, default="auto", help="auto, cpu, cuda or cuda:N")
    s.add_argument("--pointcloud", action="store_true", help="also write <id>.ply and <id>_cloud.npz")
    s.add_argument("--bev", action="store_true", help="also write the bird's-eye view <id>_bev.png/.npy")
    s.add_argument("--tta", choices=("none", "flip"), default="none", help="flip: also predict the mirrored "
                   "image and merge both (epistemic spread into the uncertainty outputs; 2x the time)")  # fmt: skip
    s.add_argument("--mc-samples", type=mc_samples, default=0, help="N >= 2 passes with the heads' dropout on "
                   "(a model trained with model.dropout > 0; N x the time); 0 = off")  # fmt: skip
    _add_camera_args(s)
    _add_backend_arg(s)
    s.set_defaults(func=_cmd_predict)

    s = sub.add_parser("video", help="video file or camera -> MP4 of RGB | each task | BEV panels")
    s.add_argument(
        "--checkpoint", type=Path, required=True, help=".pt checkpoint (or an exported .onnx: ONNX Runtime)"
    )
    s.add_argument("input", help="video file, or a camera index (0) for live input")
    s.add_argument("--out", type=output_file("panels.mp4"), required=True, help="MP4 file to write")
    s.add_argument(
        "--fps", type=positive_float, default=None, help="output frame rate (default: clip's, else 12)"
    )
    s.add_argument("--max-frames", type=positive_int, default=None, help="stop after N frames (default: all)")
    s.add_argument("--no-bev", action="store_true", help="leave the BEV panel out")
    s.add_argument("--device", type=device_name, default="auto", help="auto, cpu, cuda or cuda:N")
    _add_backend_arg(s)
    _add_camera_args(s)
    s.set_defaults(func=_cmd_video)
