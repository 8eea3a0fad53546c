"""The hidden folders a conversion writes into before it renames them to the output.

A conversion writes `.NAME.XXXXXXXX.partial` next to the output NAME and renames it when it is
complete; on an error or Ctrl-C it removes it. A process killed outright (SIGKILL, the
out-of-memory killer, a power cut) removes nothing, so every partial folder carries a marker
naming its process: the next conversion of the same output removes the partial folders whose
process is gone and names the others (a conversion still running, another machine's, or one
without a marker) with the command that removes them.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
from pathlib import Path
from typing import Callable

MARKER = ".meft-convert-partial.json"


def _start_time(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot, Linux), to tell it from a later
    process that got the same pid; None where /proc does not say."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) is in parentheses and may contain spaces: count from after it
    return stat.rpartition(")")[2].split()[19]


def mark_partial(folder: Path, output: Path) -> None:
    """Records in `folder` which process writes it (removed by unmark_partial before the rename)."""
    pid = os.getpid()
    owner = {"pid": pid, "start_time": _start_time(pid), "host": socket.gethostname(), "output": str(output)}
    (folder / MARKER).write_text(json.dumps(owner) + "\n")


def unmark_partial(folder: Path) -> None:
    (folder / MARKER).unlink(missing_ok=True)


def _alive(pid: int, start_time: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    # the pid exists; it is the writer only if it started when the writer did
    return start_time is None or _start_time(pid) in (None, start_time)


def partial_folders(output: Path) -> list[Path]:
    """The partial folders of conversions to `output` (the names mkdtemp gives them)."""
    prefix, parent = f".{output.name}.", output.parent
    if not parent.is_dir():
        return []
    return sorted(
        p for p in parent.iterdir()
        if p.name.startswith(prefix) and p.name.endswith(".partial") and p.is_dir() and not p.is_symlink()
    )


def _why_kept(folder: Path) -> str | None:
    """None if `folder` was written by a process of this machine that no longer runs (safe to
    remove), else why it is left alone."""
    try:
        owner = json.loads((folder / MARKER).read_text())
        pid, host, start_time = int(owner["pid"]), owner["host"], owner.get("start_time")
    except (OSError, ValueError, KeyError, TypeError):
        return "it has no readable owner marker"
    if host != socket.gethostname():
        return f"it was written on another machine ({host}, pid {pid})"
    if _alive(pid, start_time):
        return f"the conversion writing it (pid {pid}) is still running"
    return None


def clean_stale_partials(output: Path, log: Callable[[str], None]) -> list[Path]:
    """Removes the partial folders of `output` that an interrupted conversion left behind and
    names those it leaves alone; returns the removed ones."""
    removed = []
    for folder in partial_folders(output):
        why = _why_kept(folder)
        if why is None:
            shutil.rmtree(folder, ignore_errors=True)
            if not folder.exists():
                removed.append(folder)
                log(f"note: removed {folder}, left by a conversion that was killed before it finished")
                continue
            why = "it could not be removed"
        log(
            f"note: {folder} is the unfinished output of another conversion; {why}. "
            f"If no conversion to {output} is running, remove it with: rm -rf {shlex.quote(str(folder))}"
        )
    return removed
