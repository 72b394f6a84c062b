"""NYU Depth v2 (indoor, Kinect): the official labelled ``.mat`` file and the MTAN/LibMTL NumPy layout.

Official file ``nyu_depth_v2_labeled.mat`` (MATLAB v7.3 = HDF5, read with h5py). MATLAB stores arrays
column-major, so h5py sees every axis reversed::

    images  (1449, 3, 640, 480) uint8    -> frame i is images[i].transpose(2, 1, 0)  = (480, 640, 3) RGB
    depths  (1449, 640, 480)    float32  -> depths[i].T  = (480, 640) metres (in-painted, no holes)
    labels  (1449, 640, 480)    uint16   -> labels[i].T  = (480, 640) raw ids 1..894, 0 = unlabelled

Raw ids map to 40 classes with ``classMapping40.mat`` (``mapClass``: 894 values in 1..40) and those to 13 with
``class13Mapping.mat`` (``labels13``: 40 values in 1..13); we store ids 0..N-1 with 255 = unlabelled.
``splits.mat`` holds the standard 1-based ``trainNdxs`` (795) and ``testNdxs`` (654); the test frames become our
``val`` split. These metadata files are passed by path (``meta_dir``), never bundled.

The official file has no surface normals. The widely used NYUv2 normal maps (Eigen & Fergus / Ladicky et al.,
as published by multi-task-refinenet) are 8-bit RGB PNGs named ``norm_gt_<frame>.png`` with the 1-based
official frame number in six digits (``norm_gt_000433.png`` is frame 433, a test frame); pass their folder as
``normals_dir`` and :func:`nyu_normals_to_camera` turns them into our camera frame.

MTAN/LibMTL layout (``<src>/{train,val}/{image,label,depth,normal}/<i>.npy``, 288x384, 13 classes):
image (H, W, 3) float in [0, 1], label (H, W) float with -1 = unlabelled, depth (H, W, 1) metres with 0 =
invalid, normal (H, W, 3) in [-1, 1]. Those normals are copied as they are (assumed to be in our camera
frame already); no sample of that layout was at hand to check this, so compare a few against
:func:`densemtl.tasks.normals.normals_from_depth` before relying on them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from densemtl.data.format import DatasetFormatError, image_to_uint8, open_image, write_dataset_json
from densemtl.data.progress import track
from densemtl.datasets.common import Intrinsics, crop_box, label_palette, read_npy, write_converted
from densemtl.tasks.semseg import SEMSEG

# Kinect RGB camera of the official toolbox (pixels, 640x480 frames).
NYU_INTRINSICS: Intrinsics = (518.8579, 519.4696, 325.5824, 253.7362)
# The valid Kinect region (Eigen et al.): rows 44..470, columns 40..600 (0-based, end exclusive); outside it
# the registered RGB has a white border and depth is extrapolated.
NYU_VALID_CROP = (44, 471, 40, 601)  # top, bottom, left, right
NYU_DEPTH_MAX = 10.0  # metres; Kinect range, used for dataset.json and evaluation
NYU13_CLASSES = [
    "bed", "books", "ceiling", "chair", "floor", "furniture", "objects",
    "picture", "sofa", "table", "tv", "wall", "window",
]  # fmt: skip
META_FILES = {"mapping40": "classMapping40.mat", "mapping13": "class13Mapping.mat", "splits": "splits.mat"}
NYU_NORMALS_NAME = "norm_gt_{frame:06d}.png"  # frame: the 1-based official frame number


def nyu_normals_to_camera(rgb: np.ndarray) -> np.ndarray:
    """NYUv2 normal-map PNG pixels (H, W, 3) uint8 -> (H, W, 3) float32 unit normals in our camera frame.

    Encoding: ``n = value / 127.5 - 1`` per channel (unitless direction cosines); ``(127, 127, 127)``, which
    decodes to a near-zero vector, marks pixels without a normal (in these maps everything outside the valid
    Kinect region ``NYU_VALID_CROP``), so any decoded length under 0.5 is invalid and becomes ``(0, 0, 0)``.
    Axes: the channels are (R, G, B) = (x right, z forward, -y = up) of the OpenCV camera frame, a right-handed
    frame x right / y forward / z up, so ours is ``(R, -B, G)``: a floor has B near 255, a surface facing the
    camera has G < 127.

    How this was found (tests/test_nyuv2.py repeats it): frame 433's map against normals from its Kinect depth
    (metres = value / 5000) back-projected with ``NYU_INTRINSICS`` and differenced over +-8 pixels, on planar
    wall and floor pixels. Of the 48 signed axis permutations only this one agrees: median angle 5.1 degrees
    (floor 3.4, walls 11.4); the next best, x mirrored, gives 11.3 (walls 72). Dividing by 127.5 gives a median
    decoded length of 1.0003 (127: 1.0039); the tiny difference is normalised away.
    """
    a = np.asarray(rgb)
    if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8:
        raise ValueError(f"NYU normals must be an (H, W, 3) uint8 RGB array, got {a.dtype} {a.shape}")
    n = a.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    length = np.linalg.norm(n, axis=-1, keepdims=True)
    cam = np.stack([n[..., 0], -n[..., 2], n[..., 1]], axis=-1) / np.maximum(length, 1e-6)
    cam[length[..., 0] <= 0.5] = 0.0
    return cam


def load_nyu_normals(path: str | Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """Read a NYUv2 normal-map PNG and convert it (:func:`nyu_normals_to_camera`); ``size`` (H, W) is checked."""
    img = open_image(Path(path), "NYU normal map")
    if img.mode != "RGB":
        raise DatasetFormatError(
            f"{path}: a NYU normal map is an 8-bit RGB PNG, got mode {img.mode}; use the published maps"
        )
    rgb = np.asarray(img)
    if size is not None and rgb.shape[:2] != tuple(size):
        raise DatasetFormatError(
            f"{path}: normal map is {rgb.shape[0]}x{rgb.shape[1]}, the frame is {size[0]}x{size[1]}"
        )
    return nyu_normals_to_camera(rgb)


def _loadmat(path: Path) -> dict[str, Any]:
    import scipy.io

    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: NYUv2 conversion needs {sorted(META_FILES.values())} from the public "
            "nyuv2-meta-data repository in the folder given as meta_dir (--meta)"
        )
    try:
        return scipy.io.loadmat(str(path))
    except (ValueError, TypeError, OSError, NotImplementedError, scipy.io.matlab.MatReadError) as e:
        raise DatasetFormatError(
            f"{path}: not a readable MATLAB file ({e}); download it again from the nyuv2-meta-data repository"
        ) from e


@contextmanager
def _fields(path: str | Path):
    """Turn a missing or malformed field of a metadata .mat into an error naming the file."""
    try:
        yield
    except DatasetFormatError:
        raise
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise DatasetFormatError(
            f"{path}: missing or malformed field ({e!r}); is this {Path(path).name} from nyuv2-meta-data? "
            "download it again"
        ) from e


def load_mapping40(path: str | Path) -> tuple[np.ndarray, list[str]]:
    """Lookup table (895,) uint8 raw id -> 0..39 (raw 0 -> 255) and the 40 class names."""
    mat = _loadmat(Path(path))
    with _fields(path):
        mapping = np.asarray(mat["mapClass"]).ravel().astype(np.int64)  # raw id k (1-based) -> 1..40
        if mapping.size != 894 or mapping.min() < 1 or mapping.max() > 40:
            raise DatasetFormatError(f"{path}: mapClass should hold 894 values in 1..40, got {mapping.size}")
        lut = np.full(895, 255, np.uint8)
        lut[1:] = mapping - 1
        names = [str(np.asarray(n).ravel()[0]) for n in np.asarray(mat["className"]).ravel()]
    return lut, names


def load_mapping13(path: str | Path) -> tuple[np.ndarray, list[str]]:
    """Lookup table (256,) uint8 40-class id 0..39 -> 0..12 (everything else -> 255) and the 13 class names."""
    mat = _loadmat(Path(path))
    with _fields(path):
        rec = mat["classMapping13"][0, 0]
        labels13 = np.asarray(rec["labels13"]).ravel().astype(np.int64)  # 40 values in 1..13
        if labels13.size != 40 or labels13.min() < 1 or labels13.max() > 13:
            raise DatasetFormatError(f"{path}: labels13 should hold 40 values in 1..13")
        lut = np.full(256, 255, np.uint8)
        lut[:40] = labels13 - 1
        names = [str(np.asarray(n).ravel()[0]) for n in np.asarray(rec["classNames"]).ravel()]
    return lut, names


def load_splits(path: str | Path) -> dict[str, np.ndarray]:
    """``{"train": 0-based frame indices (795), "val": (654)}`` from ``splits.mat`` (1-based there)."""
    mat = _loadmat(Path(path))
    with _fields(path):
        return {
            "train": np.asarray(mat["trainNdxs"]).ravel().astype(np.int64) - 1,
            "val": np.asarray(mat["testNdxs"]).ravel().astype(np.int64) - 1,
        }


class NyuLabeledFile:
    """Frames of ``nyu_depth_v2_labeled.mat`` in image axis order; use as a context manager."""

    def __init__(self, path: str | Path) -> None:
        import h5py

        self.path = Path(path)
        try:
            self._f = h5py.File(self.path, "r")
        except OSError as e:
            raise ValueError(
                f"{self.path} is not an HDF5 (MATLAB v7.3) file ({e}); pass nyu_depth_v2_labeled.mat"
            ) from e
        missing = [k for k in ("images", "depths", "labels") if k not in self._f]
        if missing:
            raise ValueError(f"{self.path}: datasets {missing} missing; is this nyu_depth_v2_labeled.mat?")

    def __len__(self) -> int:
        return int(self._f["images"].shape[0])

    def frame(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """RGB (H, W, 3) uint8, depth (H, W) float32 metres, raw labels (H, W) uint16 (0 = unlabelled)."""
        rgb = np.ascontiguousarray(
            self._f["images"][i].transpose(2, 1, 0), np.uint8
        )  # (3, W, H) -> (H, W, 3)
        depth = np.ascontiguousarray(self._f["depths"][i].T, np.float32)  # (W, H) -> (H, W)
        labels = np.ascontiguousarray(self._f["labels"][i].T)
        return rgb, depth, labels

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> NyuLabeledFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _write_info(
    dst: Path, classes: list[str], splits: list[str], source: str, normals: bool, **extra: Any
) -> None:
    tasks = ["semseg", "depth"] + (["normals"] if normals else [])
    write_dataset_json(
        dst, name="nyuv2", tasks=tasks, classes=classes, palette=label_palette(len(classes)),
        splits=splits, depth_max=NYU_DEPTH_MAX, extra={"source": source, **extra},
    )  # fmt: skip


def convert_nyuv2_mat(
    src: str | Path,
    dst: str | Path,
    meta_dir: str | Path,
    classes: int = 40,
    size: tuple[int, int] | None = None,
    crop_valid: bool = False,
    image_format: str = "png",
    max_per_split: int = 0,
    normals_dir: str | Path | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Official labelled file -> folder format with 795 train / 654 val frames.

    Args:
        src: ``nyu_depth_v2_labeled.mat``.
        dst: output dataset root.
        meta_dir: folder with classMapping40.mat, class13Mapping.mat and splits.mat.
        classes: 40 (Gupta et al.) or 13 (Couprie et al., as MTAN/LibMTL).
        size: output (H, W); None keeps 480x640 (or the cropped 427x561).
        crop_valid: keep only the valid Kinect region ``NYU_VALID_CROP`` (drops the white border).
        image_format: "png" or "jpg".
        max_per_split: write only the first N frames of each split (0 = all), for quick looks.
        normals_dir: optional folder of NYU normal maps ``norm_gt_<frame>.png`` (see the module docstring);
            frames without one get no normals file. The .mat file itself has no normals.
        progress: report the frames written on stderr.
    """
    if classes not in (40, 13):
        raise ValueError(f"NYUv2 classes must be 40 or 13, got {classes}")
    meta = Path(meta_dir)
    lut, names = load_mapping40(meta / META_FILES["mapping40"])
    if classes == 13:
        lut13, names = load_mapping13(meta / META_FILES["mapping13"])
        lut = lut13[lut]  # raw -> 40 -> 13; 255 stays 255 (lut13[255] = 255)
    splits = load_splits(meta / META_FILES["splits"])
    if normals_dir is not None and not Path(normals_dir).is_dir():
        raise FileNotFoundError(f"{normals_dir}: normals_dir must be a folder of {NYU_NORMALS_NAME} files")
    dst = Path(dst)
    counts: dict[str, int] = {}
    with NyuLabeledFile(src) as nyu:
        for split, indices in splits.items():
            if indices.max(initial=-1) >= len(nyu):
                raise ValueError(
                    f"{src}: split {split} needs frame {indices.max() + 1} but the file has {len(nyu)}"
                )
            indices = indices[:max_per_split] if max_per_split > 0 else indices
            for i in track(indices, f"convert nyuv2 {split}", enabled=progress, unit="frame"):
                rgb, depth, raw = nyu.frame(int(i))
                sample = {"image": rgb, "semseg": lut[np.minimum(raw, 894)], "depth": depth}
                sample["intrinsics"] = NYU_INTRINSICS
                sample["normals"] = _frame_normals(normals_dir, int(i) + 1, depth.shape)
                if crop_valid:
                    sample = crop_box(sample, *NYU_VALID_CROP)
                write_converted(
                    dst, split, f"{int(i) + 1:04d}", sample, size, image_format, {"frame": int(i) + 1}
                )
            counts[split] = len(indices)
    _write_info(
        dst,
        names,
        list(splits),
        "nyu_depth_v2_labeled.mat",
        normals_dir is not None,
        classes_from=f"nyu{classes}",
    )
    return {"name": "nyuv2", "root": str(dst), "counts": counts}


def _frame_normals(normals_dir: str | Path | None, frame: int, size: tuple[int, int]) -> np.ndarray | None:
    """The converted normal map of 1-based ``frame`` from ``normals_dir``, or None when there is none."""
    if normals_dir is None:
        return None
    path = Path(normals_dir) / NYU_NORMALS_NAME.format(frame=frame)
    return load_nyu_normals(path, size) if path.is_file() else None


def mtan_files(split_dir: Path) -> list[Path]:
    """The ``image/<i>.npy`` files of an MTAN/LibMTL split folder, in numeric order."""
    return sorted((split_dir / "image").glob("*.npy"), key=lambda p: int(p.stem) if p.stem.isdigit() else -1)


def _mtan_image(path: Path) -> np.ndarray:
    """An MTAN image .npy, (H, W, 3) float in [0, 1] (or 0..255 floats, or uint8) -> uint8, checked."""
    image = read_npy(path, "image")
    if image.dtype.kind == "f" and image.size:
        top = float(np.nanmax(image))
        image = np.minimum(image, 1.0) if top <= 1.0 + 1e-3 else image / 255.0  # float rounding above 1
    return image_to_uint8(image, path)


def iter_mtan(split_dir: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(id, sample)`` for each ``image/<i>.npy`` of an MTAN/LibMTL split folder, in numeric order.

    Arrays are read without unpickling; labels (-1 -> 255) go through the semseg task's ``encode``, which
    refuses non-integer or out-of-range ids instead of wrapping them to uint8.
    """
    for path in mtan_files(split_dir):
        sample: dict[str, Any] = {"image": _mtan_image(path)}
        label_path = split_dir / "label" / path.name
        if label_path.is_file():
            label = read_npy(label_path, "label")  # (H, W) float, -1 = unlabelled
            try:  # the task's own check: whole ids 0..255, not wrapped to uint8
                sample["semseg"] = SEMSEG.encode(np.where(label == -1, 255, label))
            except ValueError as e:
                raise DatasetFormatError(f"{label_path}: {e}") from e
        depth_path = split_dir / "depth" / path.name
        if depth_path.is_file():
            depth = read_npy(depth_path, "depth")
            sample["depth"] = depth[..., 0] if depth.ndim == 3 else depth  # (H, W, 1) -> (H, W) metres
        normal_path = split_dir / "normal" / path.name
        if normal_path.is_file():
            sample["normals"] = read_npy(normal_path, "normal")  # (H, W, 3)
        yield path.stem, sample


def convert_nyuv2_mtan(
    src: str | Path,
    dst: str | Path,
    size: tuple[int, int] | None = None,
    image_format: str = "png",
    progress: bool = False,
) -> dict[str, Any]:
    """MTAN/LibMTL ``train|val/{image,label,depth,normal}/<i>.npy`` -> folder format (13 classes + normals).

    Intrinsics are NYU's scaled to the 288x384 frames (the layout resized full 480x640 frames).
    """
    src, dst = Path(src), Path(dst)
    counts: dict[str, int] = {}
    has_normals = False
    for split in ("train", "val"):
        if not (src / split / "image").is_dir():
            continue
        n = 0
        total = len(mtan_files(src / split))
        desc = f"convert nyuv2 {split}"
        for sample_id, sample in track(iter_mtan(src / split), desc, total, enabled=progress, unit="frame"):
            has_normals |= sample.get("normals") is not None
            h, w = sample["image"].shape[:2]
            fx, fy, cx, cy = NYU_INTRINSICS
            sx, sy = w / 640, h / 480
            sample["intrinsics"] = (fx * sx, fy * sy, (cx + 0.5) * sx - 0.5, (cy + 0.5) * sy - 0.5)
            write_converted(dst, split, sample_id, sample, size, image_format)
            n += 1
        counts[split] = n
    if not counts:
        raise FileNotFoundError(
            f"{src}: no train/image or val/image folders of .npy files (MTAN/LibMTL layout)"
        )
    _write_info(dst, NYU13_CLASSES, list(counts), "mtan_npy", has_normals, classes_from="nyu13")
    return {"name": "nyuv2", "root": str(dst), "counts": counts}


def convert_nyuv2(
    src: str | Path, dst: str | Path, size: tuple[int, int] | None = None, **options: Any
) -> dict[str, Any]:
    """Dispatch on ``src``: a ``.mat`` file -> :func:`convert_nyuv2_mat` (needs ``meta_dir``), a folder ->
    :func:`convert_nyuv2_mtan`."""
    src = Path(src)
    if src.is_dir():
        return convert_nyuv2_mtan(
            src,
            dst,
            size=size,
            image_format=options.get("image_format", "png"),
            progress=options.get("progress", False),
        )
    if options.get("meta_dir") is None:
        raise ValueError(
            "converting nyu_depth_v2_labeled.mat needs the metadata folder (--meta DIR) holding "
            f"{sorted(META_FILES.values())}"
        )
    return convert_nyuv2_mat(src, dst, size=size, **options)
