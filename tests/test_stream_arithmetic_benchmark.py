"""benchmarks/stream_arithmetic.py: the half-step arithmetic timed alone, its inverse checked."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "stream_arithmetic.py"
_spec = importlib.util.spec_from_file_location("stream_arithmetic_benchmark", _PATH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_every_scale_is_timed_and_rebuilt(tmp_path):
    out = tmp_path / "sa.json"
    bench.main(["--rows", "9", "--hidden", "16", "--m", "1", "10", "256", "4096", "--repeats", "2", "--modes", "eager",
                "--device", "cpu", "--out", str(out)])
    result = json.loads(out.read_text())
    assert [r["m"] for r in result["results"]] == [1, 10, 256, 4096]
    assert all(r["mode"] == "eager" and r["couple_ms"] > 0 and r["uncouple_ms"] > 0 for r in result["results"])
    assert result["rows"] == 9 and result["command"].startswith("python benchmarks/stream_arithmetic.py")


def test_a_wrong_inverse_is_caught(monkeypatch, tmp_path):
    monkeypatch.setattr(bench.FP, "_uncouple", lambda y, out, packed, m, k, dtype: (y, None, None))
    with pytest.raises(AssertionError, match="did not rebuild"):
        bench.main(["--rows", "4", "--hidden", "8", "--m", "10", "--modes", "eager", "--device", "cpu",
                    "--out", str(tmp_path / "sa.json")])
