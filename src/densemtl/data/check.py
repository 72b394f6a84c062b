"""``densemtl data check``: every problem of a folder-format dataset in one pass, plus its statistics.

The checker reads every file once with the same loaders ``FolderDataset`` uses (so it accepts exactly what
training accepts) but collects each error instead of stopping at the first, and adds what a loader never sees:
files without an image, files in the wrong format (``.npy`` or float TIFF depth, JPEG labels), missing or
empty split folders, every ``dataset.json`` mistake at once. While it reads, it accumulates per-split class
histograms and depth statistics. It never writes into the dataset.

Depth in the folder format is a uint16 PNG, which cannot hold NaN, inf or negative values; those are checked
(and counted) in the ``.npy`` / float TIFF depth files people often drop in before converting them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from densemtl.data.folder import load_depth, load_image, load_intrinsics, load_normals, load_semseg, meta_path
from densemtl.data.format import DEPTH_SCALE, IMAGE_EXTS, TASK_DIRS, DatasetFormatError, read_dataset_json
from densemtl.tasks import IGNORE_INDEX

_DEPTH_BIN = 0.1  # metres per histogram bin for depth percentiles
_DEPTH_BINS = 2600  # covers the 255.99 m a uint16/256 PNG can store
_MIN_SIDE = 32  # stride-32 backbones need at least this many pixels per side
_RAW_DEPTH_EXTS = (".npy", ".tif", ".tiff")
_FIELDS = {"tasks": list, "classes": list, "palette": list, "ignore_index": int, "depth": dict}


@dataclass
class Problem:
    """One finding: the file it concerns, what kind of file, the message (naming the file and the fix)."""

    path: str
    what: str  # "image", "semseg", "depth", "normals", "meta", "split", "dataset.json"
    message: str
    severity: str = "error"  # "error" breaks training or evaluation; "warning" is suspicious but loads


@dataclass
class SplitStats:
    """Counts, class histogram and depth statistics of one split (over the files that loaded)."""

    samples: int = 0
    with_task: dict[str, int] = field(default_factory=dict)
    class_pixels: list[int] = field(default_factory=list)  # labelled pixels per class id
    class_images: list[int] = field(default_factory=list)  # images containing each class
    ignore_pixels: int = 0
    depth: dict[str, float] = field(default_factory=dict)  # valid_fraction, min, max, mean, p05, p50, p95


@dataclass
class DatasetReport:
    """What :func:`check_dataset` found: problems, per-split statistics and the class names."""

    root: str
    classes: list[str]
    problems: list[Problem]
    splits: dict[str, SplitStats]

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def ok(self) -> bool:
        """True when nothing would stop training or evaluation (warnings allowed)."""
        return not self.errors

    def to_dict(self) -> dict[str, Any]:
        return {"root": self.root, "ok": self.ok, **asdict(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def format(self) -> str:
        """A readable multi-line report: per-split summary, class histogram, depth statistics, problems."""
        lines = [f"dataset {self.root}"]
        for name, s in self.splits.items():
            tasks = ", ".join(f"{t} {n}" for t, n in s.with_task.items())
            lines.append(f"  split {name}: {s.samples} samples ({tasks})")
            total = sum(s.class_pixels) or 1
            for i, (px, imgs) in enumerate(zip(s.class_pixels, s.class_images, strict=True)):
                label = self.classes[i] if i < len(self.classes) else str(i)
                lines.append(f"    {i:3d} {label:<16} {100 * px / total:6.2f}% of pixels, in {imgs} images")
            if s.ignore_pixels:
                lines.append(f"    ignore (255): {s.ignore_pixels} pixels")
            if s.depth:
                d = s.depth
                lines.append(
                    f"    depth: {100 * d['valid_fraction']:.1f}% valid, {d['min']:.2f}..{d['max']:.2f} m, "
                    f"mean {d['mean']:.2f}, p05/p50/p95 {d['p05']:.1f}/{d['p50']:.1f}/{d['p95']:.1f} m"
                )
        n_err = len(self.errors)
        lines.append(f"{n_err} error(s), {len(self.problems) - n_err} warning(s)")
        lines += [f"  {p.severity.upper()}: {p.message}" for p in self.problems]
        return "\n".join(lines)


class _Stats:
    """Accumulates one split's histograms as files are read."""

    def __init__(self, num_classes: int) -> None:
        self.s = SplitStats(class_pixels=[0] * num_classes, class_images=[0] * num_classes)
        self.s.with_task = dict.fromkeys(TASK_DIRS, 0)
        self.hist = np.zeros(_DEPTH_BINS, np.int64)
        self.dsum, self.dmin, self.dmax, self.pixels = 0.0, np.inf, 0.0, 0

    def add_semseg(self, labels: np.ndarray) -> None:
        n = len(self.s.class_pixels)
        counts = np.bincount(labels[labels != IGNORE_INDEX].ravel(), minlength=n)[:n]
        self.s.class_pixels = [a + int(b) for a, b in zip(self.s.class_pixels, counts, strict=True)]
        self.s.class_images = [a + int(b > 0) for a, b in zip(self.s.class_images, counts, strict=True)]
        self.s.ignore_pixels += int((labels == IGNORE_INDEX).sum())

    def add_depth(self, depth: np.ndarray) -> None:
        valid = depth[depth > 0]
        self.pixels += depth.size
        if valid.size:
            self.hist += np.bincount(
                np.minimum(valid / _DEPTH_BIN, _DEPTH_BINS - 1).astype(np.int64), minlength=_DEPTH_BINS
            )
            self.dsum += float(valid.sum(dtype=np.float64))
            self.dmin, self.dmax = min(self.dmin, float(valid.min())), max(self.dmax, float(valid.max()))

    def finish(self) -> SplitStats:
        n = int(self.hist.sum())
        if n:
            cum = np.cumsum(self.hist)
            pct = {
                f"p{q:02d}": float(np.searchsorted(cum, q / 100 * n) + 0.5) * _DEPTH_BIN for q in (5, 50, 95)
            }
            self.s.depth = {
                "valid_fraction": n / self.pixels,
                "min": self.dmin,
                "max": self.dmax,
                "mean": self.dsum / n,
                **pct,
            }
        return self.s


def check_dataset_json(root: Path) -> tuple[dict[str, Any] | None, list[Problem]]:
    """Read ``dataset.json`` and list all its problems at once; info is None when it cannot be used."""
    path = root / "dataset.json"
    try:
        info = read_dataset_json(root)
    except DatasetFormatError as e:
        info = None
        first = str(e)
    if info is not None:
        return info, _info_warnings(path, info)
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None, [Problem(str(path), "dataset.json", first)]
    if not isinstance(raw, dict):
        return None, [
            Problem(str(path), "dataset.json", f"{path}: must be a JSON object; see docs/folder_format.md")
        ]
    problems = []
    for key, typ in _FIELDS.items():
        if key not in raw:
            msg = f"{path}: missing key {key!r}; add it (see docs/folder_format.md)"
        elif not isinstance(raw[key], typ):
            msg = f"{path}: {key!r} must be a {typ.__name__}, got {type(raw[key]).__name__}; fix its value"
        else:
            continue
        problems.append(Problem(str(path), "dataset.json", msg))
    return None, problems or [Problem(str(path), "dataset.json", first)]


def _info_warnings(path: Path, info: dict[str, Any]) -> list[Problem]:
    """Checks on a dataset.json that loads: known tasks, RGB palette, depth scale, ignore index."""
    found = []
    unknown = [t for t in info["tasks"] if t not in TASK_DIRS]
    if unknown:
        found.append(f"{path}: unknown task(s) {unknown} in 'tasks'; use a subset of {sorted(TASK_DIRS)}")
    bad = [c for c in info["palette"] if not (isinstance(c, list) and len(c) == 3)]
    bad += [
        c for c in info["palette"] if c not in bad and not all(isinstance(v, int) and 0 <= v < 256 for v in c)
    ]
    if bad:
        found.append(f"{path}: palette entries {bad[:3]} are not [r, g, b] with 0..255 integers; fix them")
    scale = info["depth"].get("scale")
    if not isinstance(scale, int | float) or scale <= 0:
        found.append(f"{path}: depth.scale must be a positive number (uint16 value per metre), got {scale!r}")
    if info["ignore_index"] != IGNORE_INDEX:
        found.append(
            f"{path}: ignore_index must be {IGNORE_INDEX}, got {info['ignore_index']}; relabel to 255"
        )
    if len(info["classes"]) > IGNORE_INDEX:
        found.append(f"{path}: {len(info['classes'])} classes do not fit uint8 labels with 255 = ignore")
    return [Problem(str(path), "dataset.json", m) for m in found]


def _list_images(split_dir: Path, problems: list[Problem]) -> dict[str, Path]:
    """Image files of a split by id; missing/empty folders and duplicate ids become problems."""
    img_dir = split_dir / "images"
    if not split_dir.is_dir() or not img_dir.is_dir():
        what = split_dir if not split_dir.is_dir() else img_dir
        problems.append(
            Problem(
                str(what),
                "split",
                f"{what} not found: create it with the split's images, or remove "
                f"'{split_dir.name}' from 'splits' in dataset.json (see docs/folder_format.md)",
            )
        )
        return {}
    images: dict[str, Path] = {}
    for p in sorted(img_dir.iterdir()):
        if p.name.startswith("."):
            continue
        if p.suffix.lower() not in IMAGE_EXTS:
            problems.append(
                Problem(str(p), "image", f"{p}: not a .png/.jpg/.jpeg image; convert or move it", "warning")
            )
        elif p.stem in images:
            problems.append(
                Problem(
                    str(p),
                    "image",
                    f"{p}: id {p.stem!r} also has {images[p.stem].name}; keep one image per id",
                )
            )
        else:
            images[p.stem] = p
    if not images:
        problems.append(
            Problem(
                str(img_dir),
                "split",
                f"{img_dir} contains no .png/.jpg/.jpeg images; add "
                "images or remove the split from dataset.json",
            )
        )
    return images


def _raw_depth_problem(path: Path) -> str:
    """Describe a ``.npy``/TIFF depth file: wrong format, and any NaN/inf/negative values in it."""
    fix = "convert it to depth/<id>.png with densemtl.data.format.write_sample (metres -> uint16 * 256)"
    try:
        arr = np.load(path, allow_pickle=False) if path.suffix == ".npy" else np.asarray(Image.open(path))
    except (OSError, ValueError) as e:
        return f"{path}: unreadable depth file ({e}); the folder format reads depth/<id>.png: {fix}"
    arr = arr.astype(np.float64, copy=False)
    bad = {"NaN": np.isnan(arr).sum(), "inf": np.isinf(arr).sum(), "negative": (arr < 0).sum()}
    found = ", ".join(f"{int(n)} {k}" for k, n in bad.items() if n)
    values = f" and has {found} values (they become 0 = invalid when converted)" if found else ""
    return f"{path}: depth must be a uint16 PNG, not {path.suffix}{values}; {fix}"


def _stray_files(split_dir: Path, ids: set[str], problems: list[Problem]) -> None:
    """Files in task/meta folders that have no image, or that the format does not read."""
    for what, sub in [*TASK_DIRS.items(), ("meta", "meta")]:
        folder = split_dir / sub
        if not folder.is_dir():
            continue
        want = ".json" if what == "meta" else ".png"
        for p in sorted(folder.iterdir()):
            if p.name.startswith(".") or p.is_dir():
                continue
            if p.suffix.lower() != want:
                if what == "depth" and p.suffix.lower() in _RAW_DEPTH_EXTS:
                    msg = _raw_depth_problem(p)
                else:
                    msg = f"{p}: {what} files must be {sub}/<id>{want}; convert it (lossless) or remove it"
                problems.append(Problem(str(p), what, msg))
            elif p.stem not in ids:
                problems.append(
                    Problem(
                        str(p),
                        what,
                        f"{p}: no image {split_dir.name}/images/{p.stem}.* for "
                        "this file; add the image or delete the file",
                        "warning",
                    )
                )


def _check_sample(img: Path, info: dict[str, Any], stats: _Stats, problems: list[Problem]) -> None:
    """Load every file of one sample, recording problems and feeding the statistics."""
    try:
        image = load_image(img)
    except DatasetFormatError as e:
        problems.append(Problem(str(img), "image", str(e)))
        return
    size = image.shape[:2]
    if min(size) < _MIN_SIDE:
        problems.append(
            Problem(
                str(img),
                "image",
                f"{img}: only {size[1]}x{size[0]} pixels; backbones need "
                f"at least {_MIN_SIDE} per side: upscale or drop it",
                "warning",
            )
        )
    scale = float(info["depth"].get("scale", DEPTH_SCALE))
    loaders = {
        "semseg": lambda p: load_semseg(p, size, len(info["classes"])),
        "depth": lambda p: load_depth(p, size, scale),
        "normals": lambda p: load_normals(p, size),
    }
    for task, sub in TASK_DIRS.items():
        path = img.parent.parent / sub / f"{img.stem}.png"
        if not path.is_file():
            continue
        try:
            arr = loaders[task](path)
        except DatasetFormatError as e:
            problems.append(Problem(str(path), task, str(e)))
            continue
        stats.s.with_task[task] += 1
        if task == "semseg":
            stats.add_semseg(arr)
        elif task == "depth":
            stats.add_depth(arr)
            _depth_warnings(path, arr, info, problems)
    try:
        load_intrinsics(meta_path(img))
    except DatasetFormatError as e:
        problems.append(Problem(str(meta_path(img)), "meta", str(e)))


def _depth_warnings(path: Path, depth: np.ndarray, info: dict[str, Any], problems: list[Problem]) -> None:
    """Depth that loads but looks wrong: no valid pixel, all under 1 m (unscaled metres?), beyond depth.max."""
    valid = depth[depth > 0]
    if not valid.size:
        msg = f"{path}: no valid depth pixel (all 0); delete the file if this image has no depth"
    elif valid.max() < 1.0:
        msg = (
            f"{path}: all depth under 1 m (max {valid.max():.3f}); were metres stored without the x"
            f"{info['depth'].get('scale', DEPTH_SCALE):g} scale? re-encode with encode_depth"
        )
    elif valid.max() > 2 * float(info["depth"].get("max", np.inf)):
        msg = (
            f"{path}: depth up to {valid.max():.1f} m, over twice dataset.json depth.max "
            f"{info['depth']['max']:g} m; check the units or raise depth.max"
        )
    else:
        return
    problems.append(Problem(str(path), "depth", msg, "warning"))


def check_dataset(root: str | Path, splits: list[str] | tuple[str, ...] | None = None) -> DatasetReport:
    """Check every file of ``splits`` (default: those dataset.json lists, else every folder with images/).

    Returns a :class:`DatasetReport` with all problems found in one pass (each message names the file and
    the fix) and per-split statistics; never raises for a broken dataset and never writes to it.
    """
    root = Path(root)
    info, problems = check_dataset_json(root)
    usable = info if info is not None else {"classes": [], "depth": {"scale": DEPTH_SCALE}}
    if info is None:  # still check images, sizes and formats; ids up to 254 are accepted without classes
        usable["classes"] = [str(i) for i in range(IGNORE_INDEX)]
    if splits is None:
        listed = info.get("splits") if info is not None else None
        found = sorted(p.name for p in root.iterdir() if (p / "images").is_dir()) if root.is_dir() else []
        splits = listed if isinstance(listed, list) and listed else found
        if not splits:
            problems.append(
                Problem(
                    str(root),
                    "split",
                    f"{root}: no split folder with an images/ folder; "
                    "lay the data out as <root>/<split>/images/ (see docs/folder_format.md)",
                )
            )
    reports = {}
    classes = list(info["classes"]) if info is not None else []
    for split in splits:
        split_dir = root / split
        images = _list_images(split_dir, problems)
        stats = _Stats(len(classes))
        stats.s.samples = len(images)
        for img in images.values():
            _check_sample(img, usable, stats, problems)
        if split_dir.is_dir():
            _stray_files(split_dir, set(images), problems)
        reports[split] = stats.finish()
    return DatasetReport(root=str(root), classes=classes, problems=problems, splits=reports)
