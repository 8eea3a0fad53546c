"""benchmarks/memory_speed.py's long-sequence code paths on the CPU, at a tiny Llama shape: the
offloaded-checkpoint arm, the frozen-layer arm, MEFT arms built on the plain model's own
weights, and the max-context search. Memory figures need CUDA; here only the code runs."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("memory_speed_benchmark", ROOT / "benchmarks" / "memory_speed.py")
ms = importlib.util.module_from_spec(_spec)
sys.modules["memory_speed_benchmark"] = ms
_spec.loader.exec_module(ms)

pytestmark = pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="needs peft")

TINY = dict(
    ms.SHAPES["llama-3-8b"], seq=64,
    overrides=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=1000, max_position_embeddings=256),
)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def plain():
    return ms.build_plain(TINY, CPU, torch.float32)


@pytest.fixture(autouse=True)
def llm_settings(monkeypatch):
    monkeypatch.setitem(ms.RUN, "profile", "llm")
    monkeypatch.setitem(ms.RUN, "recompute_chunk_tokens", 32)


def _lora_grads(plain, method):
    model, undo = ms.build_shared(plain, TINY, method, CPU, torch.float32)
    try:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():  # lora_B starts at zero, which would leave lora_A without a gradient
            for name, p in sorted(model.named_parameters()):
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        batch = ms.make_batch(TINY, model.config, CPU)
        loss = model(**batch).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    finally:
        undo()


def test_offloaded_checkpointing_gives_plain_checkpointings_gradients_exactly(plain):
    ms.OFFLOADED.update(current=0, peak=0)
    loss, grads = _lora_grads(plain, "lora+gc+chunked-loss")
    assert ms.OFFLOADED["peak"] == 0
    offloaded_loss, offloaded = _lora_grads(plain, ms.OFFLOAD_GC)
    # each of the 2 layers' input (1 x 64 x 32 float32) went to the host, and came back
    assert ms.OFFLOADED["peak"] == 2 * 64 * 32 * 4 and ms.OFFLOADED["current"] == 0
    assert torch.equal(loss, offloaded_loss)
    assert sorted(grads) == sorted(offloaded) and len(grads) == 8  # q, v: A and B, 2 layers
    for name in grads:
        assert torch.equal(grads[name], offloaded[name]), name
        assert grads[name].abs().sum() > 0, name
    # unwrapped again: the plain model has its own modules and no checkpointing
    assert not any("lora" in n for n, _ in plain.named_parameters())
    assert not any(getattr(m, "gradient_checkpointing", False) for m in plain.modules())


def test_frozen_layer_arm_runs(plain):
    arm = ms.Arm(plain, TINY, "frozen-layer", CPU, torch.float32)
    [row] = ms.measure_arm(arm, "tiny-llama", [64], steps=1)
    assert row["trainable"] == 0 and row["step_ms"] > 0
    batch = arm.batch(64)
    out = arm.frozen.layer(batch["hidden"], attention_mask=None, **batch["kwargs"])
    assert out.shape == (1, 64, 32)
    assert all(p.grad is None for p in plain.parameters())


@pytest.mark.parametrize("method,bits", [("meft1", 8), ("meft2+offload", 8), ("meft3+offload", 20), ("meft3-float", 0),
                                         ("meft1-queries", 8), ("meft2-whole+offload", 8)])
def test_meft_arms_run_on_the_plain_models_weights(plain, method, bits):
    model, _ = ms.build_shared(plain, TINY, method, CPU, torch.float32)
    own = dict(model.named_parameters())
    for name, tensor in plain.state_dict().items():
        assert own[name].data_ptr() == tensor.data_ptr(), name  # the same storage, not a copy
        assert not own[name].requires_grad
    adapters = [p for n, p in own.items() if ".meft." in n]
    assert adapters and all(p.dtype == torch.float32 and not p.is_meta for p in adapters)
    assert all(p.requires_grad for n, p in own.items() if p.requires_grad) and any(p.requires_grad for p in adapters)
    config = model.config
    assert config.recompute_chunk_tokens == 32 and config.offload_remainders == method.endswith("+offload")
    assert config.frac_bits == 18 and config.stream_bits == 32
    # the attention in parts; its core a chunk of queries at a time only where the arm asks for it
    [stack] = model.meft_stacks
    blocks = [b for c in stack.couplings(split=True) for b in (c.F, c.G) if b.mixing is not None]
    assert config.chunk_attention_queries == ("-queries" in method)
    assert len(blocks) == len(stack) and all((b.causal is None) == ("-queries" not in method) for b in blocks)
    assert all((b.before is None) == ("-whole" in method) for b in blocks)
    arm = ms.Arm(model, TINY, method, CPU, torch.float32)
    [row] = ms.measure_arm(arm, "tiny-llama", [64], steps=1)
    assert row["remainder_bits_per_element_per_layer"] == bits
    assert row["meft"]["lambda_"] == ms.LLM_SCALES[method[:5]][0]
    assert torch.isfinite(torch.tensor(row["loss"]))
    arm.close()


def test_max_context_search_runs(plain, tmp_path):
    results = {"memory_speed": [], "max_context": []}
    budget = ms.Budget(None)
    ms.max_context(results, tmp_path / "r.json", plain, "llama-3-8b", ["meft3"], CPU, torch.float32, cap_gib=40,
                   limit=192, probes=3, budget=budget, granule=64)
    [row] = results["max_context"]
    # without CUDA every step fits: the search climbs to the limit
    assert row["max_context"] == 192 and row["first_failing"] is None
    assert [p["fits"] for p in row["probes"]] == [True] * len(row["probes"])
    assert json.loads((tmp_path / "r.json").read_text())["max_context"][0]["max_context"] == 192


def test_the_search_starts_where_it_is_told(plain, tmp_path):
    results = {"memory_speed": [], "max_context": []}
    ms.max_context(results, tmp_path / "r.json", plain, "llama-3-8b", ["meft3"], CPU, torch.float32, cap_gib=40,
                   limit=512, probes=1, budget=ms.Budget(None), granule=64, start=320)
    assert [p["seq"] for p in results["max_context"][0]["probes"]] == [320]


def test_the_longest_context_is_predicted_from_measured_peaks_and_names_what_binds():
    # 2 GiB + 0.1 GiB per 1k tokens on the GPU, 1 GiB per 1k tokens of pinned host memory
    results = {"memory_speed": [dict(shape="s", method="m", seq=s, peak_gib=2 + 0.1 * s / 1024, pinned_host_peak_gib=s / 1024)
                                for s in (8192, 16384)],
               "max_context": [dict(shape="s", method="m", cap_gib=22, probes=[
                   dict(seq=65536, fits=True, peak_gib=2 + 6.4 + 0.05, host_gib=64.0),
                   dict(seq=131072, fits=False, peak_gib=22.0, host_gib=None)])]}
    points = ms.measured_peaks(results, "s", "m")
    assert [p["seq"] for p in points] == [8192, 16384, 65536]
    gpu_bound = ms.predict_context(points, cap_gib=22, host_gib=1000)
    assert gpu_bound["binds"] == "gpu"
    assert gpu_bound["gib_per_1k_tokens"] == pytest.approx(0.1, rel=0.02)
    # (22 - 2) / 0.1 GiB per 1k tokens = 200k tokens, less what the 0.05 GiB miss moves the line
    assert 192 * 1024 <= gpu_bound["predicted_max_context"] <= 200 * 1024
    assert gpu_bound["predicted_max_context"] % 4096 == 0
    assert 0.001 < abs(gpu_bound["fit_worst_miss_gib"]) < 0.05  # least squares spreads the 0.05 GiB
    host_bound = ms.predict_context(points, cap_gib=22, host_gib=100)
    assert host_bound["binds"] == "host" and host_bound["predicted_max_context"] == 100 * 1024
    assert ms.predictions(results, "s", [22.0])["m"]["22"]["predicted_gpu_bound"] == gpu_bound["predicted_gpu_bound"]


@pytest.mark.slow  # 7 s
def test_the_long_sequence_run_end_to_end(monkeypatch, tmp_path):
    monkeypatch.setitem(ms.SHAPES, "llama-3-8b", TINY)
    out = tmp_path / "run.json"
    methods = ["frozen-layer", "lora+offload-gc+chunked-loss", "meft3+offload"]
    ms.main(["--shapes", "llama-3-8b", "--device", "cpu", "--skip-checks", "--depths", "--seq-lengths", "--steps", "1",
             "--methods", *methods, "--long-seqs", "64", "--max-context-methods", "meft3+offload",
             "--max-context-limit", "256", "--max-probes", "2", "--time-budget", "600", "--out", str(out)])
    results = json.loads(out.read_text())
    rows = results["memory_speed"]
    assert [(r["method"], r["seq"]) for r in rows] == [(m, 64) for m in methods]
    assert not [r for r in rows if "error" in r]
    assert results["arms"]["meft3+offload"]["remainder_bits_per_element_per_layer"] == 20
    assert [r["max_context"] for r in results["max_context"]] == [256]
    summary = results["summary"]["llama-3-8b"]
    assert summary["64"]["best_exact_meft_offloaded"] == "meft3+offload"
    assert summary["max_context"] == {"meft3+offload": 256}
    # the CPU has no card and measures no memory: nothing to predict from
    assert summary["predicted"] == {}


needs_bitsandbytes = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")


@needs_bitsandbytes
@pytest.mark.parametrize("base", ["nf4", "nf4-double"])
def test_a_4bit_base_is_built_a_layer_at_a_time_and_every_arm_trains_on_it(base):
    import bitsandbytes as bnb

    plain = ms.build_plain(TINY, CPU, torch.bfloat16, base=base)
    layers = ms.decoder_layers(plain)
    assert len(layers) == plain.config.num_hidden_layers == 2
    quantized = [m for m in plain.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 14 and all(m.weight.dtype == torch.uint8 for m in quantized)
    assert all(m.weight.quant_state.nested == (base == "nf4-double") for m in quantized)
    assert plain.meft_base["bnb_4bit_use_double_quant"] == (base == "nf4-double")
    assert type(plain.lm_head) is torch.nn.Linear and plain.lm_head.weight.dtype == torch.bfloat16
    losses = {}
    for method in ("lora+gc+chunked-loss", "lora+offload-gc+chunked-loss", "meft1+offload", "meft3-queries"):
        model, undo = ms.build_shared(plain, TINY, method, CPU, torch.bfloat16)
        try:
            if method.startswith("meft"):
                # the quantized layers are the base's own modules, not copies
                shared = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
                assert len(shared) == 14 and {id(m) for m in shared} == {id(m) for m in quantized}
            arm = ms.Arm(model, TINY, method, CPU, torch.bfloat16, undo)
            [row] = ms.measure_arm(arm, "tiny-llama", [64], steps=1)
            losses[method] = row["loss"]
            assert row["trainable"] > 0 and math.isfinite(row["loss"])
        finally:
            ms._close(arm)
    # the same frozen base: every arm starts from about the same loss (adapters near zero)
    assert max(losses.values()) - min(losses.values()) < 0.05 * max(losses.values()), losses


@needs_bitsandbytes
def test_meft_on_a_4bit_base_gives_plain_autograds_gradients_bit_for_bit():
    plain = ms.build_plain(TINY, CPU, torch.bfloat16, base="nf4")
    batch = ms.make_batch(TINY, plain.config, CPU)
    for method in ("meft1", "meft3-queries+offload"):
        model, _ = ms.build_shared(plain, TINY, method, CPU, torch.bfloat16)
        reversible = _cpu_grads(model, batch, "reversible")
        vanilla = _cpu_grads(model, batch, "vanilla")
        assert reversible.keys() == vanilla.keys() and len(reversible) > 0
        assert all(torch.equal(reversible[n], vanilla[n]) for n in reversible), method


def _cpu_grads(model, batch, mode: str) -> dict:
    model.zero_grad(set_to_none=True)
    with model.meft_backward(mode):
        model(**batch).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
