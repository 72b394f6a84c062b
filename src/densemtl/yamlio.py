"""Reading YAML that may come from anywhere: plain data only, bounded in size, errors that name the file and line.

``yaml.safe_load`` already refuses ``!!python/object`` and every other tag that would build an object, but on
its own it still lets a few hundred bytes of anchors and aliases ("billion laughs") expand into more nodes than
memory holds as soon as anything walks, copies or prints the result, and its errors are tracebacks. Here the
file is read with a size cap, decoded as UTF-8, parsed with ``safe_load`` and the expanded size of the result is
counted (shared aliases once per use, in linear time) before anyone touches it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

MAX_BYTES = 1 << 20  # a config is a few kB; anything near a MiB is not one
MAX_NODES = 100_000  # values after expanding aliases; the shipped configs have about a hundred


class YAMLFileError(ValueError):
    """A YAML file or string that cannot be read as plain data; the message names the source and the fix."""


def parse_yaml(text: str, source: str) -> Any:
    """``yaml.safe_load(text)``, with errors as :class:`YAMLFileError` naming ``source`` (and line:column)."""
    try:
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        at = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        if "constructor for the tag" in (e.problem or ""):
            fix = "YAML tags such as !!python/object are not allowed here; write plain values"
        else:
            fix = "fix the YAML syntax there (indentation, a missing ':', an unclosed bracket or quote)"
        what = f"{e.context}: {e.problem}" if e.context else e.problem
        raise YAMLFileError(f"{source}{at}: invalid YAML ({what}); {fix}") from None
    except yaml.reader.ReaderError as e:
        code = e.character if isinstance(e.character, int) else ord(e.character)
        line = text[: e.position].count("\n") + 1
        raise YAMLFileError(
            f"{source}:{line}: character U+{code:04X} is not allowed in YAML; remove it"
        ) from None
    except yaml.YAMLError as e:
        raise YAMLFileError(f"{source}: invalid YAML ({' '.join(str(e).split())})") from None
    except RecursionError:
        raise YAMLFileError(f"{source}: nested too deeply to be plain data; flatten it") from None
    _check_size(data, source)
    return data


def _check_size(data: Any, source: str) -> None:
    """Refuse data whose alias-expanded size exceeds :data:`MAX_NODES`, or that contains itself."""
    sizes: dict[int, int] = {}  # id -> expanded size, so a node shared by many aliases is counted in O(1)
    open_ids: set[int] = set()

    def size(x: Any) -> int:
        if not isinstance(x, list | dict):
            return 1
        if id(x) in sizes:
            return sizes[id(x)]
        if id(x) in open_ids:
            raise YAMLFileError(f"{source}: an alias refers to a value that contains it; remove the cycle")
        open_ids.add(id(x))
        children = [v for kv in x.items() for v in kv] if isinstance(x, dict) else x
        n = 1 + sum(size(c) for c in children)
        open_ids.discard(id(x))
        sizes[id(x)] = n
        return n

    try:
        n = size(data)
    except RecursionError:
        raise YAMLFileError(f"{source}: nested too deeply to be plain data; flatten it") from None
    if n > MAX_NODES:
        raise YAMLFileError(
            f"{source}: expands to {n:.3g} values (aliases included), over the limit of {MAX_NODES}; "
            "anchors and aliases that multiply like this are refused"
        )


def read_yaml(path: str | Path) -> Any:
    """Read and parse a YAML file (UTF-8, at most :data:`MAX_BYTES`); None for an empty file."""
    path = Path(path)
    if path.is_dir():
        raise YAMLFileError(f"{path} is a folder, not a YAML file; pass the file inside it")
    if not path.is_file():
        raise YAMLFileError(f"{path} does not exist (or is not a regular file)")
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except OSError as e:
        raise YAMLFileError(f"cannot read {path}: {e.strerror or e}; check its permissions") from None
    if len(raw) > MAX_BYTES:
        raise YAMLFileError(
            f"{path} is over {MAX_BYTES >> 20} MiB, too large for a YAML config; check the path"
        )
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise YAMLFileError(
            f"{path}:{line}: byte 0x{raw[e.start]:02x} is not UTF-8; save the file as UTF-8 text"
        ) from None
    return parse_yaml(text, str(path))
