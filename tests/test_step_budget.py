"""benchmarks/step_budget.py and the engine's labels (templates/labels.py): a profiled step of a
tiny Llama split into the engine's parts on the CPU. GPU kernel times need CUDA; here the host
times and the attribution run."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from templates import labels
from tests.test_memory_benchmark import CPU, TINY, llm_settings, ms, plain  # noqa: F401 (fixtures)

import step_budget as budget  # noqa: E402 (benchmarks/, on the path once the benchmark is loaded)

pytestmark = pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="needs peft")


def _profiled_row(plain, method: str) -> tuple[dict, dict]:
    model, undo = ms.build_shared(plain, TINY, method, CPU, torch.float32)
    arm = ms.Arm(model, TINY, method, CPU, torch.float32, undo)
    batch = arm.batch(64)
    arm.step(batch)  # warm-up: the optimizer's states
    profiled = ms._profile(lambda: arm.step(batch), model=arm.model)
    config = arm.model.config.to_dict()
    arm.close()
    return profiled, config


def test_labels_name_only_known_parts_and_cost_nothing_without_a_profiler():
    with pytest.raises(ValueError, match="unknown part"):
        labels.part("couplings")
    with pytest.raises(ValueError, match="unknown step part"):
        budget.step_part("loss")
    assert isinstance(labels.part("couple"), type(labels.contextlib.nullcontext()))

    @labels.labelled("block")
    def f(x):
        return x + 1

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        f(torch.ones(2))
    assert [e.name for e in prof.events() if e.name.startswith("meft:")] == ["meft:block"]


def test_a_reversible_step_is_split_into_the_engines_parts(plain):
    profiled, config = _profiled_row(plain, "meft1")
    b = profiled["budget"]
    parts = b["parts"]
    assert b["layers"] == config["num_hidden_layers"] == 2
    # forward: each half-step's block, its coupling, the layer's checksums and RNG records;
    # backward: the recompute, its gradients and the inverse coupling
    for key in ("forward/block", "forward/couple", "forward/checksums", "forward/rng", "forward/adapter",
                "backward/block", "backward/gradients", "backward/uncouple", "backward/checksums",
                "backward/rng", "model/other", "backward/other", "optimizer/other"):
        assert parts[key]["host_ms"] > 0, key
    # no part of a reversible step runs a decoder layer's own forward, and the CPU launches no kernels
    assert not any(k.endswith("/layer") for k in parts)
    assert all(v["device_ms"] == 0 and v["kernels"] == 0 for v in parts.values())
    # on the CPU one thread does everything: the parts' own times add up to the step's wall time
    total = sum(v["host_ms"] for v in parts.values())
    assert 0.7 * b["wall_ms"] < total < 1.02 * b["wall_ms"], (total, b["wall_ms"])


def test_a_checkpointed_step_shows_its_recompute_as_the_layers_forward_in_backward(plain):
    profiled, _ = _profiled_row(plain, "lora+gc+chunked-loss")
    parts = profiled["budget"]["parts"]
    assert parts["model/layer"]["host_ms"] > 0 and parts["backward/layer"]["host_ms"] > 0
    assert not any(k.split("/")[0] in ("forward",) for k in parts)
    # the layers' parts are themselves again afterwards
    assert all("forward" not in m.__dict__ for layer in ms.decoder_layers(plain) for m in layer.children())


def test_work_outside_the_calling_threads_labels_belongs_to_the_step_label_that_spans_it():
    # the autograd engine's device thread runs a backward that loss.backward() waits for
    spans = [(0.0, 10.0, "model"), (10.0, 30.0, "backward"), (30.0, 31.0, "optimizer"), (12.0, 14.0, "backward")]
    assert budget.phase_at(spans, 5.0) == "model" and budget.phase_at(spans, 13.0) == "backward"
    assert budget.phase_at(spans, 30.5) == "optimizer" and budget.phase_at(spans, 40.0) == "outside"


def test_the_overhead_is_the_engines_own_parts_against_the_gap():
    meft = dict(parts={"forward/couple": dict(device_ms=3.0, host_ms=1.0), "backward/uncouple": dict(device_ms=2.0, host_ms=1.0),
                       "backward/block": dict(device_ms=50.0, host_ms=4.0), "model/other": dict(device_ms=9.0, host_ms=9.0)},
                gpu_busy_share=0.8)
    base = dict(parts={}, gpu_busy_share=0.95)
    o = budget.overhead(meft, base, meft_step_ms=120.0, base_step_ms=100.0)
    assert o["gap_ms"] == 20.0 and o["ratio"] == pytest.approx(1.2)
    assert o["parts"]["couple"] == dict(device_ms=3.0, host_ms=1.0, device_share_of_gap=pytest.approx(0.15),
                                        host_share_of_gap=pytest.approx(0.05))
    assert o["parts"]["uncouple"]["device_share_of_gap"] == pytest.approx(0.1)
    assert "block" not in o["parts"] and o["parts"]["other"]["device_ms"] == 0  # model/other is not the engine's


def test_the_long_sequence_run_reports_each_arms_budget_and_the_engines_overhead(monkeypatch, tmp_path):
    monkeypatch.setitem(ms.SHAPES, "llama-3-8b", TINY)
    out = tmp_path / "run.json"
    methods = ["lora+gc+chunked-loss", "meft1-queries"]
    ms.main(["--shapes", "llama-3-8b", "--device", "cpu", "--skip-checks", "--depths", "--seq-lengths", "--steps", "1",
             "--methods", *methods, "--long-seqs", "64", "--max-context-methods", "--profile-seqs", "64",
             "--max-step-ratio", "1000", "--out", str(out)])
    summary = json.loads(out.read_text())["summary"]
    budgets = summary["step_budget"]["llama-3-8b 1x64"]
    assert set(budgets) == set(methods)
    base, meft = budgets["lora+gc+chunked-loss"], budgets["meft1-queries"]
    assert base["per_layer_ms"]["backward/layer"]["host"] > 0  # the checkpointed recompute
    assert meft["per_layer_ms"]["backward/uncouple"]["host"] > 0
    beyond = meft["beyond_lora+gc+chunked-loss"]
    assert beyond["gap_ms"] == pytest.approx(meft["step_ms"] - base["step_ms"])
    assert set(beyond["parts"]) == {*budget.OVERHEAD_PARTS, "other"}
    # per layer: the parts' host time over the layers adds back up to each phase's whole
    layers = TINY["overrides"]["num_hidden_layers"]
    assert beyond["parts"]["couple"]["host_ms"] == pytest.approx(meft["per_layer_ms"]["forward/couple"]["host"] * layers)

    # the regression check: every exact MEFT arm against LoRA + checkpointing, at every length
    ratio = summary["llama-3-8b"]["64"]["step_time_vs_lora+gc+chunked-loss"]["meft1-queries"]
    assert ms.step_ratio_failures(summary, ratio * 2) == []
    [line] = ms.step_ratio_failures(summary, ratio / 2)
    assert line.startswith("llama-3-8b at 64: meft1-queries takes")


def test_the_step_time_check_fails_the_run(monkeypatch, tmp_path):
    monkeypatch.setitem(ms.SHAPES, "llama-3-8b", TINY)
    with pytest.raises(SystemExit) as exit_:
        ms.main(["--shapes", "llama-3-8b", "--device", "cpu", "--skip-checks", "--depths", "--seq-lengths", "--steps", "1",
                 "--methods", "lora+gc+chunked-loss", "meft1", "--long-seqs", "64", "--max-context-methods",
                 "--max-step-ratio", "0.01", "--out", str(tmp_path / "run.json")])
    assert exit_.value.code == 1


def test_a_labels_device_side_span_is_not_counted_as_gpu_work():
    # on CUDA the profiler draws each label once more on the device, spanning its kernels and the
    # gaps between them: the step's busy time is the kernels' alone
    from torch.autograd.profiler_util import FunctionEvent

    cuda = torch.autograd.DeviceType.CUDA
    events = [FunctionEvent(1, "meft:backward", 0, 0.0, 1000.0, device_type=cuda, is_user_annotation=True),
              FunctionEvent(2, "step:model", 0, 0.0, 1000.0, device_type=cuda),
              FunctionEvent(3, "gemm", 0, 100.0, 300.0, device_type=cuda),
              FunctionEvent(4, "elementwise", 0, 250.0, 400.0, device_type=cuda)]
    assert [e.name for e in events if budget.is_device_work(e)] == ["gemm", "elementwise"]
    assert budget.part_budget(events, wall_ms=1.0, layers=1)["gpu_busy_ms"] == pytest.approx(0.3)
