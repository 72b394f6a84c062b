"""``densemtl data check``: every problem of a folder-format dataset in one pass, plus its statistics.

The checker reads every sample once with the function ``FolderDataset`` reads it with
(``densemtl.data.folder.read_sample``, so it accepts exactly what training accepts and gives the same message
for the same bad file) but collects each error instead of stopping at the first, and adds what a loader never
sees: files without an image, files in the wrong format (``.npy`` or float TIFF depth, JPEG labels), missing
or empty split folders, every ``dataset.json`` mistake at once. While it reads, it accumulates per-split class
histograms and depth statistics. The optional object files (``instances/<id>.png``, ``objects/<id>.json``, see
``densemtl.data.objects``) are validated when present, checked against each other (ids, boxes) and counted per
object class. It never writes into the dataset.

Depth in the folder format is a uint16 PNG, which cannot hold NaN, inf or negative values; those are checked
(and counted) in the ``.npy`` / float TIFF depth files people often drop in before converting them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from densemtl.data.folder import read_sample, task_path
from densemtl.data.format import DEPTH_SCALE, IMAGE_EXTS, DatasetFormatError, open_image, read_dataset_json
from densemtl.data.objects import (
    INSTANCES_DIR,
    OBJECT_CLASSES_KEY,
    OBJECTS_DIR,
    check_object_classes,
    instances_path,
    objects_path,
    read_instances,
    read_objects,
)
from densemtl.data.progress import track
from densemtl.tasks import IGNORE_INDEX, TASKS
from densemtl.tasks.base import TaskStats

_MIN_SIDE = 32  # stride-32 backbones need at least this many pixels per side
_RAW_DEPTH_EXTS = (".npy", ".tif", ".tiff")
_FIELDS = {"tasks": list, "classes": list, "palette": list, "ignore_index": int, "depth": dict}


@dataclass
class Problem:
    """One finding: the file it concerns, what kind of file, the message (naming the file and the fix)."""

    path: str
    what: str  # "image", a task name, "meta", "split", "dataset.json"
    message: str
    severity: str = "error"  # "error" breaks training or evaluation; "warning" is suspicious but loads


@dataclass
class SplitStats:
    """Counts and each task's statistics (``Task.new_stats``) of one split, over the files that loaded.

    ``tasks`` holds e.g. ``semseg``: class_pixels, class_images, ignore_pixels; ``depth``: valid_fraction, min,
    max, mean, p05, p50, p95 (metres); ``normals``: valid_fraction. ``objects`` (empty when the split has no
    object files): ``files`` and ``instance_masks`` that loaded, ``per_class`` object counts.
    """

    samples: int = 0
    with_task: dict[str, int] = field(default_factory=dict)
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    objects: dict[str, Any] = field(default_factory=dict)


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
            for task, stats in s.tasks.items():
                if stats and task in TASKS:
                    lines += [f"    {line}" for line in TASKS[task].describe_stats(stats, self.classes)]
            if s.objects:
                per_class = ", ".join(f"{c} {n}" for c, n in s.objects["per_class"].items()) or "none"
                lines.append(
                    f"    objects: {s.objects['files']} objects files, {s.objects['instance_masks']} instance "
                    f"masks; objects per class: {per_class}"
                )
        n_err = len(self.errors)
        lines.append(f"{n_err} error(s), {len(self.problems) - n_err} warning(s)")
        lines += [f"  {p.severity.upper()}: {p.message}" for p in self.problems]
        return "\n".join(lines)


class _Stats:
    """Accumulates one split's statistics, task by task, as files are read."""

    def __init__(self, info: dict[str, Any]) -> None:
        self.s = SplitStats(with_task=dict.fromkeys(TASKS, 0))
        # the task that trains on objects files, when this dataset can train it
        self.objects_task = next(
            (n for n, t in TASKS.items() if t.folder == OBJECTS_DIR and t.available(info)), None
        )
        self.tasks: dict[str, TaskStats | None] = {name: t.new_stats(info) for name, t in TASKS.items()}

    def add(self, task: str, array: Any, path: Path, info: dict[str, Any]) -> list[str]:
        """Count one loaded file; returns the task's warnings about it."""
        self.s.with_task[task] += 1
        stats = self.tasks[task]
        return stats.add(array, path, info) if stats is not None else []

    def add_objects(self, objects: list[dict[str, Any]] | None, has_mask: bool) -> None:
        """Count one sample's object files (``objects`` None: no objects file that loaded)."""
        if not self.s.objects:
            self.s.objects = {"files": 0, "instance_masks": 0, "per_class": {}}
        o = self.s.objects
        o["instance_masks"] += int(has_mask)
        if objects is not None:
            o["files"] += 1
            if self.objects_task is not None:
                self.s.with_task[self.objects_task] += 1
            for obj in objects:
                o["per_class"][obj["class"]] = o["per_class"].get(obj["class"], 0) + 1

    def finish(self) -> SplitStats:
        self.s.tasks = {name: st.finish() for name, st in self.tasks.items() if st is not None}
        if self.s.objects:
            self.s.objects["per_class"] = dict(sorted(self.s.objects["per_class"].items()))
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
    unknown = [t for t in info["tasks"] if t not in TASKS]
    if unknown:
        found.append(f"{path}: unknown task(s) {unknown} in 'tasks'; use a subset of {sorted(TASKS)}")
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
    if OBJECT_CLASSES_KEY in info:
        try:
            check_object_classes(info[OBJECT_CLASSES_KEY], path)
        except DatasetFormatError as e:
            found.append(str(e))
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
    fix = "convert it to depth/<id>.png with densemtl.data.folder.write_sample (metres -> uint16 * 256)"
    try:
        arr = (
            np.load(path, allow_pickle=False)
            if path.suffix == ".npy"
            else np.asarray(open_image(path, "depth"))
        )
    except DatasetFormatError as e:
        return f"{e}; the folder format reads depth/<id>.png: {fix}"
    except (OSError, ValueError, EOFError) as e:  # np.load: truncated, not .npy, or pickled objects
        return f"{path}: unreadable depth file ({e}); the folder format reads depth/<id>.png: {fix}"
    arr = arr.astype(np.float64, copy=False)
    bad = {"NaN": np.isnan(arr).sum(), "inf": np.isinf(arr).sum(), "negative": (arr < 0).sum()}
    found = ", ".join(f"{int(n)} {k}" for k, n in bad.items() if n)
    values = f" and has {found} values (they become 0 = invalid when converted)" if found else ""
    return f"{path}: depth must be a uint16 PNG, not {path.suffix}{values}; {fix}"


def _stray_files(split_dir: Path, ids: set[str], problems: list[Problem]) -> None:
    """Files in task/meta folders that have no image, or that the format does not read."""
    folders = {t.folder: (name, t.suffix) for name, t in TASKS.items()}  # each folder once
    for sub, what, suffix in (
        ("meta", "meta", ".json"),
        (OBJECTS_DIR, "objects", ".json"),
        (INSTANCES_DIR, "instances", ".png"),
    ):
        folders.setdefault(sub, (what, suffix))
    for sub, (what, want) in folders.items():
        folder = split_dir / sub
        if not folder.is_dir():
            continue
        for p in sorted(folder.iterdir()):
            if p.name.startswith(".") or p.is_dir():
                continue
            if p.suffix.lower() != want:
                if sub == "depth" and p.suffix.lower() in _RAW_DEPTH_EXTS:
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


def _object_classes(info: dict[str, Any]) -> list[str] | None:
    """dataset.json's object classes, or None (any name) when absent or malformed (reported once, elsewhere)."""
    try:
        return check_object_classes(info[OBJECT_CLASSES_KEY], "dataset.json")
    except (KeyError, DatasetFormatError):
        return None


def _check_objects(
    img: Path, size: tuple[int, int], info: dict[str, Any], stats: _Stats, problems: list[Problem]
) -> None:
    """Validate one sample's instance mask and objects file when present, against each other too; count them."""
    mask_file, objects_file = instances_path(img), objects_path(img)
    has_objects = objects_file.is_file()
    if not has_objects and not mask_file.is_file():
        return
    instances, objects, warn = None, None, []
    if mask_file.is_file():
        try:
            instances = read_instances(mask_file, size)
        except DatasetFormatError as e:
            problems.append(Problem(str(mask_file), "instances", str(e)))
        if not has_objects:
            warn.append(
                f"{mask_file}: no {OBJECTS_DIR}/{img.stem}.json for this instance mask, so its ids name no object "
                "class; add the objects file or delete the mask"
            )
    if has_objects:
        try:
            objects = read_objects(objects_file, size, _object_classes(info), instances=instances, warn=warn)
        except DatasetFormatError as e:
            problems.append(Problem(str(objects_file), "objects", str(e)))
    problems += [
        Problem(str(objects_file if has_objects else mask_file), "objects", m, "warning") for m in warn
    ]
    stats.add_objects(objects, instances is not None)


def _check_sample(img: Path, info: dict[str, Any], stats: _Stats, problems: list[Problem]) -> None:
    """Load every file of one sample, recording problems and feeding the statistics."""
    found: list[tuple[Path, str, str]] = []
    # Every task's files, also of tasks dataset.json does not list; objects files need its object_classes and
    # are read once, by _check_objects, which checks them against the instance mask too.
    tasks = tuple(
        t
        for t, task in TASKS.items()
        if task.folder != OBJECTS_DIR and (task.suffix == ".png" or task.available(info))
    )
    arrays = read_sample(img, info, tasks, found)
    problems += [Problem(str(path), what, message) for path, what, message in found]
    if arrays["image"] is None:
        return
    size = arrays["image"].shape[:2]
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
    for task in tasks:
        if arrays[task] is not None:
            path = task_path(img, task)
            for message in stats.add(task, arrays[task], path, info):
                problems.append(Problem(str(path), task, message, "warning"))
    _check_objects(img, size, info, stats, problems)


def check_dataset(
    root: str | Path, splits: list[str] | tuple[str, ...] | None = None, *, progress: bool = False
) -> DatasetReport:
    """Check every file of ``splits`` (default: those dataset.json lists, else every folder with images/).

    Returns a :class:`DatasetReport` with all problems found in one pass (each message names the file and
    the fix) and per-split statistics; never raises for a broken dataset and never writes to it.
    ``progress`` reports the samples checked on stderr (``densemtl.data.progress.track``).
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
        stats = _Stats(usable)
        stats.s.samples = len(images)
        for img in track(images.values(), f"check {split}", enabled=progress, unit="sample"):
            _check_sample(img, usable, stats, problems)
        if split_dir.is_dir():
            _stray_files(split_dir, set(images), problems)
        reports[split] = stats.finish()
    if (
        info is not None
        and OBJECT_CLASSES_KEY not in info
        and any(s.objects.get("files") for s in reports.values())
    ):
        problems.append(
            Problem(
                str(root / "dataset.json"),
                "dataset.json",
                f"{root / 'dataset.json'}: the dataset has objects files but no {OBJECT_CLASSES_KEY!r}; list the "
                f'object class names there, e.g. "{OBJECT_CLASSES_KEY}": ["car", "person"]',
            )
        )
    return DatasetReport(root=str(root), classes=classes, problems=problems, splits=reports)
