"""benchmarks/cpu_step.py: the CPU census of a step's peak and the host work a step does."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("cpu_step_benchmark", ROOT / "benchmarks" / "cpu_step.py")
cpu_step = importlib.util.module_from_spec(_spec)
sys.modules["cpu_step_benchmark"] = cpu_step
_spec.loader.exec_module(cpu_step)
ms = cpu_step.ms

pytestmark = pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="needs peft")
MiB = 2**20


def test_the_cpu_census_replays_a_steps_allocations_to_their_peak():
    kept = []

    def step():
        a = torch.empty(4 * MiB, dtype=torch.uint8)
        b = torch.empty(8 * MiB, dtype=torch.uint8)
        kept.append(torch.empty(MiB, dtype=torch.uint8))
        del a, b
        torch.empty(2 * MiB, dtype=torch.uint8)  # after the peak: not in it

    census = ms.memory_census(step, device="cpu")
    assert census["peak_gib"] * 1024 == pytest.approx(13, abs=0.01)
    groups = {g["where"]: (round(g["gib"] * 1024, 3), g["tensors"]) for g in census["groups"]}
    assert groups["tensors of 8 MiB"] == (8, 1) and groups["tensors of 4 MiB"] == (4, 1)
    assert groups["tensors of 1 MiB"] == (1, 1) and "tensors of 2 MiB" not in groups


def test_a_meft_steps_host_work_stays_near_checkpointings(monkeypatch):
    """At OPT-1.3b's 24 layers and tiny widths, where a step is all host work: MEFT1's Python calls
    per step against LoRA + checkpointing's (1.02x measured at this shape; 1.25x before a block in
    one chunk was recomputed as one graph, 1.82x before the couplings were kept from one step to the
    next) and its aten calls (1.84x; the stream arithmetic runs eager on the CPU, compiled on CUDA)."""
    monkeypatch.setitem(ms.RUN, "profile", "llm")
    shape = dict(ms.SHAPES["opt-1.3b"], batch=2, seq=64)
    lora, meft = (cpu_step.host_counts(shape, method) for method in ("lora+gc+chunked-loss", "meft1"))
    assert lora["layers"] == meft["layers"] == 24
    assert meft["python_calls"] <= 1.12 * lora["python_calls"], (meft, lora)
    assert meft["aten_calls"] <= 2.0 * lora["aten_calls"], (meft, lora)


@pytest.mark.slow
def test_the_cpu_step_run_end_to_end(tmp_path):
    """One OPT-1.3b-wide layer at 1 x 2048 tokens: with the MLP in two chunks of 1024 its
    8192-wide intermediates (32 MiB in bf16 whole) cost half, and the census shows where."""
    out = tmp_path / "cpu.json"
    cpu_step.main(["--shape", "opt-1.3b", "--batch", "1", "--seq", "2048", "--census-layers", "1",
                   "--recompute-chunk-tokens", "0", "--methods", "meft1", "meft1@1024", "--out", str(out)])
    result = json.loads(out.read_text())
    whole, chunked = result["arms"]
    assert (whole["method"], chunked["method"]) == ("meft1", "meft1@1024") and result["seq"] == 2048
    assert result["meft"]["meft1@1024"]["recompute_chunk_tokens"] == 1024
    # at the peak outside the (eager) stream arithmetic: the whole MLP's backward, with its relu
    # output, the gradient of that and the gradient of fc1's output, 2048 x 8192 each: 32 MiB in
    # bf16 (torch 2.13's CPU matmul hands one of the gradients back at 64 MiB, as the code of
    # before the half-steps measured too); in chunks of 1024 none of them is alive at the peak,
    # which moves to the loss
    whole_peak, chunked_peak = (arm["census"]["outside_stream_arithmetic"] for arm in (whole, chunked))
    wide_sizes = ("32 MiB", "64 MiB")
    wide = [g for g in whole_peak["groups"] if g["size"] in wide_sizes]
    assert sum(g["tensors"] for g in wide) == 3 and all("opt_mlp" in g["where"] or "backward" in g["where"] for g in wide)
    assert not [g for g in chunked_peak["groups"] if g["size"] in wide_sizes]
    assert chunked_peak["peak_gib"] < whole_peak["peak_gib"] <= whole["census"]["peak_gib"]
    assert chunked["host"]["python_calls"] > whole["host"]["python_calls"] > 0
