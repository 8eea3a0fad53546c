"""Partial output folders: a conversion killed outright leaves its `.NAME.XXXX.partial` folder;
the next conversion of the same output removes it if its process is gone, and names it (with the
command that removes it) otherwise."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from meft_convert.convert import ConvertOptions, convert
from meft_convert.partial import MARKER, clean_stale_partials, mark_partial


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


# the CLI, with the calibration held up for a minute: a tiny model converts within a second on an
# idle machine, so without it the signal could arrive after the conversion has finished
# the calibration is held up (60 s), after touching the file that $CALIBRATION_STARTED names, if any
SLOW_CONVERSION = """
import os, pathlib, time
import meft_convert.calibrate as calibrate
slow = calibrate.calibrate_plan
def held_up(*args, **kwargs):
    if os.environ.get("CALIBRATION_STARTED"):
        pathlib.Path(os.environ["CALIBRATION_STARTED"]).touch()
    time.sleep(60)
    return slow(*args, **kwargs)
calibrate.calibrate_plan = held_up
from meft_convert.cli import main
main()
"""


def _wait_for_shards(parent: Path, out: Path, process: subprocess.Popen) -> None:
    """Until the conversion to `out` has its partial folder, marked, with shards being written."""
    deadline = time.monotonic() + 240
    while not (list(parent.glob(f".{out.name}.*.partial/{MARKER}")) and list(parent.glob(f".{out.name}.*.partial/*.safetensors"))):
        assert process.poll() is None and time.monotonic() < deadline, "the conversion ended before it could be stopped"
        time.sleep(0.01)


@pytest.mark.slow  # subprocesses: 4-5 s each
def test_ctrl_c_during_start_up_exits_130_and_leaves_nothing(tiny_checkpoints, tmp_path):
    """SIGINT mid-conversion (the shards copying, the calibration under way): exit 130, no partial folder."""
    out = tmp_path / "opt-meft3"
    started = tmp_path.parent / f"{tmp_path.name}-calibrating"
    process = subprocess.Popen(
        [sys.executable, "-c", SLOW_CONVERSION, str(tiny_checkpoints["opt-125m"]), "-o", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
        env={**os.environ, "CALIBRATION_STARTED": str(started)},
        # as from a shell: a test run that started with SIGINT ignored (some launchers and earlier
        # tests leave it so) would pass that on, and Python then never raises KeyboardInterrupt
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    _wait_for_shards(tmp_path, out, process)
    # the signal lands once the calibration is under way, however the start-up is ordered
    deadline = time.monotonic() + 240
    while not started.exists():
        assert process.poll() is None and time.monotonic() < deadline, "the conversion ended before it could be stopped"
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stdout + stderr
    assert "Interrupted: nothing was written." in stderr and "Aborted!" not in stderr and "Traceback" not in stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_killed_conversion_is_cleaned_up_by_the_next(tiny_checkpoints, tmp_path):
    out = tmp_path / "opt-meft3"
    killed = subprocess.Popen(
        [sys.executable, "-c", SLOW_CONVERSION, str(tiny_checkpoints["opt-125m"]), "-o", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path,
    )
    _wait_for_shards(tmp_path, out, killed)
    killed.send_signal(signal.SIGKILL)  # what the out-of-memory killer sends: no clean-up runs
    assert killed.wait(timeout=60) == -signal.SIGKILL
    [partial] = tmp_path.glob(f".{out.name}.*.partial")
    assert json.loads((partial / MARKER).read_text())["pid"] == killed.pid and not out.exists()

    logged = []
    convert(ConvertOptions(model=str(tiny_checkpoints["opt-125m"]), output=out, verify=False, show_progress=False), log=logged.append)
    assert not partial.exists()
    assert f"note: removed {partial}, left by a conversion that was killed before it finished" in logged
    assert (out / "config.json").is_file() and not (out / MARKER).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]


def _partial(parent: Path, name: str, owner: dict | None) -> Path:
    folder = parent / name
    folder.mkdir()
    (folder / "model-00001-of-00002.safetensors").write_bytes(b"\0" * 64)
    if owner is not None:
        (folder / MARKER).write_text(json.dumps(owner))
    return folder


def test_partials_of_live_foreign_or_unknown_runs_are_reported_not_removed(tmp_path):
    out, host = tmp_path / "model-meft3", socket.gethostname()
    dead = _partial(tmp_path, ".model-meft3.dead1234.partial", {"pid": _dead_pid(), "host": host})
    running = tmp_path / ".model-meft3.live5678.partial"
    running.mkdir()
    mark_partial(running, out)  # this process: still running
    elsewhere = _partial(tmp_path, ".model-meft3.host9012.partial", {"pid": _dead_pid(), "host": host + "-other"})
    unmarked = _partial(tmp_path, ".model-meft3.none3456.partial", None)
    other_output = _partial(tmp_path, ".other-model.dead7890.partial", {"pid": _dead_pid(), "host": host})
    # a pid in use again by a later process (this one) that started after the writer did
    reused = _partial(tmp_path, ".model-meft3.reuse000.partial", {"pid": os.getpid(), "host": host, "start_time": "1"})

    logged = []
    assert clean_stale_partials(out, logged.append) == sorted([dead, reused])
    assert not dead.exists() and not reused.exists()
    for kept, why in [
        (running, f"the conversion writing it (pid {os.getpid()}) is still running"),
        (elsewhere, f"it was written on another machine ({host}-other"),
        (unmarked, "it has no readable owner marker"),
    ]:
        assert kept.is_dir()
        [line] = [line for line in logged if str(kept) in line]
        assert why in line and line.endswith(f"remove it with: rm -rf {kept}"), line
    assert other_output.is_dir() and not any(str(other_output) in line for line in logged)
    assert len(logged) == 5


def test_a_conversion_refused_while_its_shards_copy_leaves_nothing(tiny_checkpoints, tmp_path):
    """A local folder's shards start copying before the settings and the plan are checked: a
    refusal then stops the copy and removes the partial folder (and the folders made for it)."""
    import pytest

    from meft_convert.errors import BadInputError

    model = str(tiny_checkpoints["opt-125m"])
    for options, match in [
        (dict(task="masked-lm"), "opt models have no masked-lm head"),
        (dict(lambda_=0.3), "is not 1/m"),
    ]:
        with pytest.raises(BadInputError, match=match):
            convert(ConvertOptions(model=model, output=tmp_path / "new" / "out", show_progress=False, **options), log=lambda _: None)
        assert list(tmp_path.iterdir()) == []
