"""Where a checkpoint's code came from: the meft_convert version that wrote it and the sha256
of every code file, recorded in config.json and compared with what this version ships.

A converted checkpoint runs its own code (`trust_remote_code=True`); a user who wants to
know whether that code is exactly ours can compare it byte for byte with this package's
templates, which `meft-convert check` does.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from . import __version__

VERSION_KEY = "meft_convert_version"
HASHES_KEY = "meft_code_sha256"


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def shipped_code(name: str) -> bytes | None:
    """The bytes of code file `name` as this version writes it into checkpoints (None if it
    writes no such file)."""
    if not name.endswith(".py") or name == "__init__.py" or "/" in name:
        return None
    path = resources.files("meft_convert.templates").joinpath(name)
    return path.read_bytes() if path.is_file() else None


def provenance(code_files: dict[str, bytes]) -> dict:
    """The config.json entries recording this version and the code files written."""
    return {VERSION_KEY: __version__, HASHES_KEY: {name: sha256_of(data) for name, data in sorted(code_files.items())}}


@dataclass
class CodeFile:
    name: str
    actual: str | None  # sha256 of the file in the checkpoint (None: missing)
    recorded: str | None  # sha256 recorded in config.json at conversion (None: not recorded)
    shipped: str | None  # sha256 of what this version writes (None: it writes no such file)

    @property
    def identical(self) -> bool:
        return self.actual is not None and self.actual == self.shipped

    def describe(self) -> str:
        if "--" in self.name:
            return "code from another repository (auto_map)"
        if self.actual is None:
            return "missing from the checkpoint"
        if self.identical:
            return "identical to this version's" + ("" if self.recorded == self.actual else " (but not recorded at conversion)")
        if self.shipped is None:
            return "not a file meft-convert writes"
        if self.recorded is not None and self.recorded != self.actual:
            return "changed since conversion"
        return "differs from this version's"


@dataclass
class CodeCheck:
    folder: Path
    written_by: str | None  # the meft_convert version recorded in config.json
    files: list[CodeFile]

    @property
    def identical(self) -> bool:
        return bool(self.files) and all(f.identical for f in self.files)

    def to_text(self) -> str:
        lines = [
            (f"code of {self.folder}: written by meft_convert {self.written_by or '(not recorded)'}, "
             f"compared with meft_convert {__version__}")
        ]
        for f in self.files:
            mark = "ok  " if f.identical else "DIFF"
            lines.append(f"  {mark} {f.name:<24} {(f.actual or '-')[:16]}  {f.describe()}")
        lines.append(
            "  the code is byte-identical to what this version ships"
            if self.identical
            else "  the code is NOT what this version ships"
        )
        return "\n".join(lines)


def check_code(folder: Path) -> CodeCheck:
    """Compares every code file of a converted checkpoint (each recorded in config.json, each
    Python file in the folder, each module its auto_map names) with this version's."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    recorded: dict[str, str] = dict(config.get(HASHES_KEY) or {})
    modules = {module + ".py" for module in _auto_map_references(config.get("auto_map") or {})}
    names = sorted(set(recorded) | {p.name for p in folder.glob("*.py")} | modules)
    files = []
    for name in names:
        path = folder / name
        shipped = shipped_code(name)
        files.append(
            CodeFile(
                name=name,
                actual=sha256_of(path.read_bytes()) if path.is_file() else None,
                recorded=recorded.get(name),
                shipped=None if shipped is None else sha256_of(shipped),
            )
        )
    return CodeCheck(folder=folder, written_by=config.get(VERSION_KEY), files=files)


def _auto_map_references(auto_map: dict) -> list[str]:
    # values are "module.Class", a [slow, fast] pair for tokenizers, or "repo--module.Class",
    # code from another repository, which is kept whole so that it never passes as ours
    references = []
    for value in auto_map.values():
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, str):
                references.append(item.rsplit(".", 1)[0])
    return references
