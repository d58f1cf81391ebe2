"""Input a user can fix: `InputError`, and the checks of paths and files that raise it.

A missing path, a malformed config.json, a truncated safetensors file or a bad jsonl row is reported in one
message that names the path (and the line) and what was expected, instead of surfacing as whatever the
library that tripped over it raises. The `dspark` command prints these as one line (exit code 2).

Loaders that accept a folder or a Hub repo id follow transformers: an existing folder is local, anything else
a repo id. A name that cannot be a repo id (absolute, `./x`, `~/x`, more than one `/`) or whose first
component is an existing folder is a local path, so a typo there is reported as a missing path rather than
as a malformed repo id.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from safetensors import SafetensorError, safe_open


class InputError(ValueError):
    """A bad argument or file that the user can fix; the message names it and says what was expected."""


def is_local_path(name_or_path: str | os.PathLike) -> bool:
    """Whether `name_or_path` means a local file or folder rather than a Hub repo id (see the module doc)."""
    if isinstance(name_or_path, os.PathLike):
        return True
    path = os.path.expanduser(name_or_path)
    if os.path.exists(path):
        return True
    try:
        validate_repo_id(name_or_path)
    except HFValidationError:
        return True
    head, _, rest = name_or_path.partition("/")
    return bool(rest) and os.path.isdir(head)


def check_model_source(name_or_path: str | os.PathLike, what: str) -> None:
    """Raise an InputError unless `name_or_path` is a Hub repo id or a local folder that holds a readable
    config.json and complete safetensors files; `what` names it in the message (e.g. "drafter folder")."""
    if not is_local_path(name_or_path):
        return
    folder = Path(name_or_path).expanduser()
    if not folder.exists():
        raise InputError(f"{what} {name_or_path} does not exist.")
    if not folder.is_dir():
        raise InputError(f"{what} {name_or_path} is a file; expected a model folder.")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise InputError(f"{what} {name_or_path} holds no config.json.")
    if not isinstance(read_json_file(config_file), dict):
        raise InputError(f"{config_file} is not a JSON object: not a model config.")
    check_safetensors_files(sorted(folder.glob("*.safetensors")))


def check_safetensors_files(files: Iterable[str | os.PathLike]) -> None:
    """Raise an InputError naming the first file whose safetensors header is unreadable or does not cover the
    file (what an interrupted save or download leaves); only the headers are read."""
    for file in files:
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except SafetensorError as err:
            raise InputError(
                f"{file} is not a complete safetensors file ({err}); it may have been cut short by an "
                "interrupted save or download."
            ) from err


def read_text_file(path: str | os.PathLike, what: str = "file") -> str:
    """The UTF-8 text of the file `path`; an InputError when it is missing, a folder or not text."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise InputError(f"{what} {path} does not exist.") from err
    except IsADirectoryError as err:
        raise InputError(f"{what} {path} is a folder; expected a file.") from err
    except UnicodeDecodeError as err:
        raise InputError(f"{what} {path} is not UTF-8 text ({err.reason} at byte {err.start}).") from err


def parse_json(text: str, source: str) -> Any:
    """`json.loads(text)`; an InputError names `source` (a file, or a file and line) when it is malformed."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(
            f"{source} is not valid JSON: {err.msg} (line {err.lineno} column {err.colno})."
        ) from err


def read_json_file(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """The JSON document in the file `path`; an InputError names the file when it is missing or malformed."""
    return parse_json(read_text_file(path, what), str(path))


def parse_json_lines(lines: Iterable[str], source: str) -> list[dict[str, Any]]:
    """The JSON objects of JSON-lines `lines` (blank lines skipped); an InputError names `source` and the line
    of a row that is malformed or not an object."""
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        row = parse_json(line, f"{source} line {number}")
        if not isinstance(row, dict):
            raise InputError(f"{source} line {number} is a JSON {type(row).__name__}; expected an object.")
        rows.append(row)
    return rows


__all__ = [
    "InputError",
    "is_local_path",
    "check_model_source",
    "check_safetensors_files",
    "read_text_file",
    "parse_json",
    "read_json_file",
    "parse_json_lines",
]
