"""Make a folder ready for a new dataset: refuse one that is not empty, or clear an old dataset's own files.

Writing a dataset over an existing one would leave the old samples beside the new ones under a dataset.json
that describes only the new ones. :func:`prepare_dataset_folder` therefore accepts an absent or empty folder,
refuses any other unless ``overwrite``, and then deletes only what a folder-format dataset consists of:
``dataset.json`` and the files in each split's ``images/``, task and ``meta/`` folders. It never follows a
symlink (a linked file or folder is unlinked, its target untouched), never deletes a file it does not know,
and refuses a folder that does not look like a dataset at all (so ``--overwrite`` on a home folder is harmless).
"""

from __future__ import annotations

from pathlib import Path

from densemtl.data.format import DatasetFormatError
from densemtl.data.objects import INSTANCES_DIR, OBJECTS_DIR
from densemtl.tasks import TASKS


class DatasetExistsError(DatasetFormatError):
    """The output folder of a dataset writer is not empty (or cannot be cleared safely)."""


def _dataset_subfolders() -> set[str]:
    return {"images", "meta", INSTANCES_DIR, OBJECTS_DIR, *(t.folder for t in TASKS.values())}


def _is_split(folder: Path) -> bool:
    """A real (not linked) folder holding only dataset sub-folders, at least an ``images/`` one."""
    if folder.is_symlink() or not folder.is_dir():
        return False
    names = {p.name for p in folder.iterdir() if not p.name.startswith(".")}
    return "images" in names and names <= _dataset_subfolders()


def _looks_like_dataset(root: Path) -> bool:
    """A dataset.json, or (a writer interrupted before writing it) nothing but split folders."""
    if (root / "dataset.json").is_file():
        return True
    entries = [p for p in root.iterdir() if not p.name.startswith(".")]
    return bool(entries) and all(_is_split(p) for p in entries)


def _clear_split(split: Path) -> list[Path]:
    """Delete the files (and links) of a split's dataset sub-folders; remove the folders left empty."""
    removed = []
    for sub in sorted(_dataset_subfolders()):
        folder = split / sub
        if folder.is_symlink():
            folder.unlink()
            removed.append(folder)
            continue
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            if p.is_symlink() or p.is_file():
                p.unlink()
                removed.append(p)
        if not any(folder.iterdir()):
            folder.rmdir()
    if not any(split.iterdir()):
        split.rmdir()
    return removed


def prepare_dataset_folder(root: str | Path, overwrite: bool = False) -> list[Path]:
    """Check that ``root`` can receive a new dataset; with ``overwrite``, delete the old dataset's files first.

    Returns the paths deleted. Raises :class:`DatasetExistsError` (naming the folder and the fix) when ``root``
    is a file, is not empty and ``overwrite`` is False, or does not look like a dataset.
    """
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise DatasetExistsError(f"{root} exists and is not a folder; choose another output folder")
    entries = sorted(root.iterdir()) if root.is_dir() else []
    if not entries:
        return []
    if not overwrite:
        raise DatasetExistsError(
            f"{root} is not empty ({len(entries)} entries, e.g. {entries[0].name!r}): a new dataset there would "
            "mix with the old files; choose an empty or new folder, or pass --overwrite (overwrite=True) to "
            "delete the old dataset first"
        )
    if not _looks_like_dataset(root):
        raise DatasetExistsError(
            f"{root} is not empty and is not a densemtl dataset (no dataset.json, not only <split>/images/ "
            "folders): refusing to clear it even with --overwrite; choose an empty or new folder"
        )
    removed = []
    dataset_json = root / "dataset.json"
    if dataset_json.is_symlink() or dataset_json.is_file():
        dataset_json.unlink()  # first: a half-cleared folder must not look like a complete dataset
        removed.append(dataset_json)
    for p in entries:
        if p.is_dir() and not p.is_symlink():
            removed += _clear_split(p)
    for p in root.glob(".dataset.json.*.tmp"):  # a writer killed while writing dataset.json
        if p.is_file() and not p.is_symlink():
            p.unlink()
            removed.append(p)
    return removed
