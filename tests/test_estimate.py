"""`meft-convert estimate` and estimate_memory: the estimate against every committed GPU figure."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from meft_convert import cli
from meft_convert.estimate import estimate_memory, remainder_layout
from tests.test_cli import PROBE  # runs the CLI, reports its exit code and the heavy modules it imported

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "tests" / "data" / "configs"
RESULTS = ROOT / "benchmarks" / "results"
# the measured files, and whether their MEFT rows come from the current engine. h200.json's MEFT
# arms ran an older engine (int64 streams, three of them alive, the MLP unchunked);
# h200-llama-3-8b.json, h200-opt-1.3b-llm.json and the max-context search kept the attention whole
# (before families.py's AttentionParts), the attention-parts files held six of the gated MLP's
# intermediates (before SiluProduct), and the query-chunks files held the stack input and, in one
# chunk, a third stream's integers, so only their other arms count.
MEASURED = {"h200-llama-3-8b-stream-release.json": True, "h200-llama-3-8b-one-graph.json": True,
            "h200-opt-1.3b-llm-kept-couplings.json": True, "h200-opt-1.3b-llm-one-graph.json": True,
            "h200-llama-3-8b-query-chunks.json": False, "h200-opt-1.3b-llm-query-chunks.json": False,
            "h200-llama-3-8b-attention-parts.json": False, "h200-llama-3-8b-attention-parts-run1.json": False,
            "h200-llama-3-8b.json": False, "h200.json": False, "h200-opt-1.3b-llm.json": False,
            "h200-llama-3-8b-max-context.json": False}
# the first run with the parts counts at 8k and 16k only: a census of its 16k step failed and left
# that step's graph alive, inflating every row after it (offloaded checkpoints 12 GiB at 32k, not 8)
LENGTHS = {"h200-llama-3-8b-attention-parts-run1.json": (8192, 16384)}
SHAPE_CONFIGS = {"llama-3-8b": "llama-3-8b", "opt-1.3b": "opt-1.3b", "opt-1.3b-long": "opt-1.3b", "bert-base": "bert-base-uncased"}
NON_MEFT = {"full", "lora", "lora+gc", "lora+gc+chunked-loss", "lora+offload-gc+chunked-loss", "head-only", "frozen-layer"}
ACTIVATION_TOLERANCE, STATIC_TOLERANCE = 0.15, 0.05


def _rows():
    """(file, row) for every measured row the estimate covers: rows with an error or without a
    figure are left out; the MEFT arms only where the file measured the current engine; the
    compiled, vanilla and bf16-adapter arms are not estimated (the compiled engine keeps what
    the eager one keeps, minus fused temporaries)."""
    rows = []
    for name, current in MEASURED.items():
        path = RESULTS / name
        if not path.exists():
            continue
        for row in json.loads(path.read_text())["memory_speed"]:
            method = row["method"]
            if "error" in row or row.get("activation_gib") is None or row["shape"] not in SHAPE_CONFIGS:
                continue
            if name in LENGTHS and row["seq"] not in LENGTHS[name]:
                continue
            if method.startswith("meft") and (not current or any(mode in method for mode in ("compiled", "vanilla", "whole",
                                                                                              "queries"))):
                continue
            if not method.startswith("meft") and method not in NON_MEFT:
                continue
            rows.append((name, row))
    return rows


ROWS = _rows()


def _estimate(row: dict) -> dict:
    config = json.loads((CONFIGS / f"{SHAPE_CONFIGS[row['shape']]}.json").read_text())
    meft = row.get("meft") or {}
    return estimate_memory(
        config, row["batch"], row["seq"], dtype="bf16", layers=row.get("layers"),
        variant_scales={meft["variant"]: (meft["lambda_"], meft["beta"])} if meft else None,
        stream_bits=meft.get("stream_bits"), recompute_chunk_tokens=meft.get("recompute_chunk_tokens", 4096),
    )


def test_every_measured_file_is_covered():
    names = {name for name, _ in ROWS}
    assert set(MEASURED) <= names
    methods = {row["method"] for name, row in ROWS if name == "h200-llama-3-8b-stream-release.json"}
    assert {"meft1", "meft1+offload", "meft3+offload", "lora+gc+chunked-loss", "lora+offload-gc+chunked-loss"} <= methods
    assert {row["seq"] for name, row in ROWS if name == "h200-llama-3-8b-one-graph.json"} == {4096, 16384}
    methods = {row["method"] for name, row in ROWS if name == "h200-opt-1.3b-llm-one-graph.json"}
    assert {"meft1", "meft2", "meft3", "meft1+offload", "meft2+offload", "meft3+offload", "meft3-float"} <= methods
    methods = {row["method"] for name, row in ROWS if name.startswith("h200-llama-3-8b-attention-parts")}
    assert {"lora+gc+chunked-loss", "lora+offload-gc+chunked-loss"} <= methods
    methods = {row["method"] for name, row in ROWS if name == "h200-llama-3-8b.json"}
    assert {"frozen-layer", "lora+gc+chunked-loss", "lora+offload-gc+chunked-loss"} <= methods
    methods = {row["method"] for name, row in ROWS if name == "h200-opt-1.3b-llm.json"}
    assert {"lora+gc+chunked-loss", "lora+offload-gc+chunked-loss", "frozen-layer"} <= methods
    methods = {row["method"] for name, row in ROWS if name == "h200.json"}
    assert {"full", "lora", "lora+gc", "lora+gc+chunked-loss", "head-only"} <= methods


@pytest.mark.parametrize("name,row", ROWS, ids=[f"{n}:{r['method']}:L{r.get('layers')}:{r['batch']}x{r['seq']}" for n, r in ROWS])
def test_estimate_matches_measured(name, row):
    """Activation within 15% and static within 5% of what the H200 measured, every arm and shape.
    The float MEFT rows count too: their loss is NaN (λ = β = 2^-10 in float arithmetic), but
    the tensors a step allocates do not depend on their values."""
    result = _estimate(row)
    if row["method"] == "frozen-layer":
        estimate, static = result["frozen_layer_gib"], None
    else:
        arm = result["arms"][row["method"].partition("@")[0]]  # "@2048": the chunk, in row["meft"]
        estimate, static = arm["activation_gib"], arm["static_gib"]
    error = abs(estimate - row["activation_gib"]) / row["activation_gib"]
    assert error <= ACTIVATION_TOLERANCE, f"activation: estimated {estimate:.3f} GiB, measured {row['activation_gib']:.3f}"
    if static is not None:
        assert abs(static - row["static_gib"]) / row["static_gib"] <= STATIC_TOLERANCE, (static, row["static_gib"])


def test_max_context_probes():
    """The max-context searches' probes that fit (Llama-3-8B, 45k–160k tokens, one step each):
    their peak less the arm's measured static within 15% of the estimated activation (MEFT's
    probes where they ran the current engine)."""
    config = json.loads((CONFIGS / "llama-3-8b.json").read_text())
    checked = 0
    for name in ("h200-llama-3-8b-max-context.json", "h200-llama-3-8b-attention-parts.json"):
        data = json.loads((RESULTS / name).read_text())
        static = {row["method"]: row["static_gib"] for row in data["memory_speed"]}
        arms = data.get("arms") or {}
        for search in data["max_context"]:
            method = search["method"]
            if method.startswith("meft") and MEASURED[name] is not True:
                continue
            meft = arms.get(method) or {}
            for probe in search["probes"]:
                if not probe["fits"]:
                    continue
                result = estimate_memory(
                    config, 1, probe["seq"], dtype="bf16",
                    variant_scales={meft["variant"]: (meft["lambda_"], meft["beta"])} if meft else None)
                measured = probe["peak_gib"] - static[method]
                estimate = result["arms"][method]["activation_gib"]
                assert abs(estimate - measured) / measured <= ACTIVATION_TOLERANCE, (method, probe["seq"], estimate, measured)
                checked += 1
    assert checked >= 4


def test_offloaded_host_memory():
    """Offloaded checkpoints: one 16-bit T × H tensor per layer on the host (the benchmark
    counts them); offloaded remainders: every layer's, log2(m) bits per element per stream."""
    for name, row in ROWS:
        if row["method"] == "lora+offload-gc+chunked-loss":
            host = _estimate(row)["arms"][row["method"]]["host_gib"]
            assert host == pytest.approx(row["offloaded_checkpoints_gib"], rel=0.01)
    config = json.loads((CONFIGS / "llama-3-8b.json").read_text())
    result = estimate_memory(config, 1, 16384, variants=("meft3",), lambda_=2**-10, beta=2**-10)
    assert result["arms"]["meft3+offload"]["host_gib"] == pytest.approx(32 * 16384 * 4096 * 20 / 8 / 2**30)
    assert result["arms"]["meft3"]["host_gib"] == 0


def test_remainder_bits_are_the_engine_s():
    from meft_convert.templates import fixed_point

    # one definition, read by the engine's packing and by the estimate
    assert remainder_layout is fixed_point.remainder_layout
    assert [remainder_layout(m) for m in (1, 3, 10, 1024)] == [(1, 0), (5, 8), (3, 10), (1, 10)]


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIGS.glob("*.json")))
def test_parameter_count_matches_transformers(name):
    """Static memory starts from the parameter count: the one the library's model has."""
    import torch
    import transformers

    values = json.loads((CONFIGS / f"{name}.json").read_text())
    config = transformers.AutoConfig.for_model(values.pop("model_type"), **{k: v for k, v in values.items() if k != "_name_or_path"})
    causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in values.get("architectures") or ())
    auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    with torch.device("meta"):
        model = auto.from_config(config)
    expected = sum(p.numel() for p in model.parameters())
    result = estimate_memory(json.loads((CONFIGS / f"{name}.json").read_text()), 1, 8)
    # exact, but for what the estimate counts that these library models lack: BART's final_logits_bias (one per
    # vocabulary entry; its LM head model has it) and a final norm OPT-350m does not have (it normalises after
    # each sublayer)
    counted_besides = {"bart-base": 50265, "opt-350m": 2 * 1024}
    assert result["parameters"] == expected + counted_besides.get(name, 0)


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIGS.glob("*.json")))
def test_quantized_weights_match_transformers(name):
    """A quantized base quantizes the layers' linear projections: the estimate counts the
    weights, output rows and largest matrix of the library's model's nn.Linear (GPT-2's Conv1D)
    modules in its layers."""
    import re

    import torch
    import transformers

    from meft_convert.estimate import read_shape

    values = json.loads((CONFIGS / f"{name}.json").read_text())
    config = transformers.AutoConfig.for_model(values.pop("model_type"), **{k: v for k, v in values.items() if k != "_name_or_path"})
    with torch.device("meta"):
        model = transformers.AutoModel.from_config(config)
    linear = (torch.nn.Linear, transformers.pytorch_utils.Conv1D)
    in_layers = re.compile(r"(^|\.)(layers?|h)\.\d+\.")
    quantized = [m for n, m in model.named_modules() if isinstance(m, linear) and in_layers.search(n)]
    shape = read_shape(json.loads((CONFIGS / f"{name}.json").read_text()))
    assert shape.linear_weights == sum(m.weight.numel() for m in quantized)
    # LLM.int8 keeps a scale per output row; the 4-bit matmul dequantises one matrix at a time
    assert shape.linear_rows == sum(m.nf if hasattr(m, "nf") else m.out_features for m in quantized)
    assert shape.largest_linear == max(m.weight.numel() for m in quantized)


def invoke(*args):
    return CliRunner().invoke(cli.main, [str(a) for a in args])


ARMS = (
    "full", "lora", "lora+gc", "lora+gc+chunked-loss", "lora+offload-gc+chunked-loss", "head-only",
    "meft1", "meft1+offload", "meft1-float", "meft2", "meft2+offload", "meft2-float",
    "meft3", "meft3+offload", "meft3-float",
)


def test_cli_json_has_every_arm():
    result = invoke("estimate", CONFIGS / "llama-3-8b.json", "--batch-size", 1, "--seq-len", 8192, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert set(data["arms"]) == set(ARMS)
    for arm in data["arms"].values():
        assert set(arm) >= {"static_gib", "activation_gib", "peak_gib", "host_gib", "label"}
        assert arm["peak_gib"] == pytest.approx(arm["static_gib"] + arm["activation_gib"])
        assert all(math.isfinite(v) and v >= 0 for k, v in arm.items() if k != "label")
    assert data["arms"]["meft3+offload"]["host_gib"] > 0 and data["arms"]["lora+offload-gc+chunked-loss"]["host_gib"] > 0


def test_cli_table_and_options(tmp_path):
    folder = tmp_path / "opt"
    folder.mkdir()
    (folder / "config.json").write_text((CONFIGS / "opt-1.3b.json").read_text())
    result = invoke("estimate", folder, "-b", 8, "-s", 512, "--variant", "meft3", "--lambda", "2^-10", "--beta", "1/1024",
                    "--dtype", "bf16")
    assert result.exit_code == 0, result.output
    assert "meft3+offload" in result.output and "meft1" not in result.output
    assert "20 bits per element per layer" in result.output
    assert "Estimates from the config" in result.output


def test_default_scales_and_remainder_bits():
    """Without --lambda/--beta the benchmark's starting points: 2^-8 on MEFT1/MEFT2's scaled
    stream (8 bits per element per layer), 2^-10 on both of MEFT3's (20 bits); the table and
    the JSON give the bits, and the help says where a converted model's calibrated scales are."""
    config = json.loads((CONFIGS / "llama-3-8b.json").read_text())
    result = estimate_memory(config, 1, 8192)
    assert result["settings"]["scales"] == {
        "meft1": dict(lambda_=2**-8, beta=1.0, remainder_bits_per_element_per_layer=8),
        "meft2": dict(lambda_=1.0, beta=2**-8, remainder_bits_per_element_per_layer=8),
        "meft3": dict(lambda_=2**-10, beta=2**-10, remainder_bits_per_element_per_layer=20)}
    arms = result["arms"]
    assert arms["meft3+offload"]["remainder_bits_per_element_per_layer"] == 20
    assert arms["meft1-float"]["remainder_bits_per_element_per_layer"] == 0
    assert "remainder_bits_per_element_per_layer" not in arms["lora+gc+chunked-loss"]
    text = invoke("estimate", CONFIGS / "llama-3-8b.json", "-b", 1, "-s", 8192).output
    assert "MEFT1 λ=2^-8 β=1: 8 remainder bits per element per layer" in text
    assert "MEFT3 λ=2^-10 β=2^-10: 20 remainder bits per element per layer" in text
    help_text = " ".join(invoke("estimate", "--help").output.split())
    assert "config.json holds the calibrated values to pass with --lambda and --beta" in help_text


def test_cli_same_as_function():
    config = json.loads((CONFIGS / "qwen2-0.5b.json").read_text())
    result = invoke("estimate", CONFIGS / "qwen2-0.5b.json", "-b", 2, "-s", 1024, "--json")
    assert json.loads(result.output) == json.loads(json.dumps(estimate_memory(config, 2, 1024)))


@pytest.mark.parametrize(
    "args,message",
    [
        (["/no/such/model", "-b", "1", "-s", "8"], "no such folder: /no/such/model"),
        (["{tmp}", "-b", "1", "-s", "8"], "has no config.json"),
        (["{tmp}/bad.json", "-b", "1", "-s", "8"], "cannot read"),
        (["{configs}/gpt2.json", "-b", "1", "-s", "8", "--lambda", "0.3"], "--lambda 0.3 is not 1/m"),
    ],
)
def test_cli_bad_input_exits_2(tmp_path, args, message):
    (tmp_path / "bad.json").write_text("{not json")
    args = [a.format(tmp=tmp_path, configs=CONFIGS) for a in args]
    result = invoke("estimate", *args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_cli_usage_errors_exit_2():
    assert invoke("estimate", CONFIGS / "gpt2.json", "-s", 8).exit_code == 2  # no --batch-size
    assert invoke("estimate", CONFIGS / "gpt2.json", "-b", 0, "-s", 8).exit_code == 2




@pytest.mark.parametrize("args,code", [
    (["estimate", "--help"], 0),
    (["estimate", str(CONFIGS / "llama-3-8b.json"), "-b", "1", "-s", "8192", "--json"], 0),
    (["estimate", "/no/such/model", "-b", "1", "-s", "8"], 2),
])
def test_estimate_does_not_import_torch(tmp_path, args, code):
    result = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    report = json.loads(result.stderr.strip().splitlines()[-1])
    assert report == {"code": code, "heavy": []}, result.stdout + result.stderr


def test_help_teaches():
    text = invoke("estimate", "--help").output
    for phrase in ("config.json", "HF_HUB_OFFLINE", "static", "activation", "host", "estimates from the config",
                   "--recompute-chunk-tokens", "log2(m)", "15%"):
        assert phrase in text, phrase
    assert "estimate" in invoke("--help").output


def test_hub_id_from_the_cache_offline(tmp_path):
    """A hub id resolves through the Hugging Face cache with HF_HUB_OFFLINE=1 (config.json only)."""
    import os

    repo = tmp_path / "hub" / "models--meta-llama--Meta-Llama-3-8B"
    commit = "0" * 40
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit / "config.json").write_text((CONFIGS / "llama-3-8b.json").read_text())
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"), HF_HOME=str(tmp_path / "home"))
    run = [sys.executable, "-m", "meft_convert", "estimate", "meta-llama/Meta-Llama-3-8B", "-b", "1", "-s", "8192", "--json"]
    result = subprocess.run(run, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["hidden_size"] == 4096
    result = subprocess.run([*run[:4], "nobody/absent", *run[5:]], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2 and "not found in the Hugging Face cache" in result.stderr, result.stderr


def test_memory_line_for_the_card():
    from meft_convert.estimate import memory_line

    config = json.loads((CONFIGS / "llama-3-8b.json").read_text())
    line = memory_line(config, 1, 16384, "meft3", lambda_=2**-10, beta=2**-10)
    arms = estimate_memory(config, 1, 16384, variants=("meft3",), lambda_=2**-10, beta=2**-10)["arms"]
    for arm in ("meft3", "meft3+offload", "lora+gc+chunked-loss", "lora+offload-gc+chunked-loss", "full"):
        assert f"{arms[arm]['activation_gib']:.2f} GiB" in line, arm
    assert "batch 1 × 16384" in line and "not measured" in line
    line = memory_line(json.loads((CONFIGS / "bert-base-uncased.json").read_text()), 32, 512, "meft1", exact=False)
    assert "MEFT1 float" in line and "host memory" in line


def test_encoder_arms_and_gradients():
    """An encoder has no causal-LM loss to chunk; its head-only arm trains a classifier.
    Gradients are reported apart: DESIGN §5 counts them in the activation figure."""
    result = estimate_memory(json.loads((CONFIGS / "bert-base-uncased.json").read_text()), 32, 512)
    arms = result["arms"]
    assert "lora+gc+chunked-loss" not in arms and arms["lora+offload-gc"]["host_gib"] > 0
    assert arms["head-only"]["activation_gib"] < 0.1
    assert arms["full"]["gradients_gib"] == pytest.approx(result["parameters"] * 2 / 2**30)
    assert arms["meft3"]["gradients_gib"] < 0.01


def test_pinned_host_memory_as_measured():
    """The pinned allocator rounds each buffer up to a power of two: MEFT3's 10-bit remainders
    (40 MiB a stream and layer at 8k) reserve 64 MiB each, as the benchmark's allocator counted."""
    from meft_convert.estimate import packed_remainder_bytes

    assert packed_remainder_bytes(1024, 12345) == 12345 + 2 * 1544  # a byte plane; 2 bits of 8 values in 2 bytes
    assert packed_remainder_bytes(256, 12345) == 12345  # one byte each
    for name, row in ROWS:
        if row["method"] in ("meft1+offload", "meft3+offload") and row.get("pinned_host_peak_gib"):
            pinned = _estimate(row)["arms"][row["method"]]["host_pinned_gib"]
            assert pinned == pytest.approx(row["pinned_host_peak_gib"], rel=0.01), row["method"]


def _llama(**quantized) -> dict:
    from meft_convert.estimate import Quantization

    config = json.loads((CONFIGS / "llama-3-8b.json").read_text())
    return estimate_memory(config, 1, 8192, quantization=Quantization(**quantized) if quantized else None)


def test_quantized_base_static_memory_by_hand():
    """DESIGN §7: Llama-3-8B's frozen base in NF4 takes about 5.5 GiB. By hand: 32 layers of
    q, k, v, o (4096 → 4096, 1024, 1024; 4096 → 4096) and gate, up, down (4096 ↔ 14336), each
    weight 0.5 byte plus a float32 scale per 64; embeddings and the untied LM head in bf16."""
    h, i, kv, vocab, layers = 4096, 14336, 1024, 128256, 32
    quantized = layers * (h * h + 2 * h * kv + h * h + 3 * h * i)
    assert quantized == 6_979_321_856
    by_hand = quantized * (0.5 + 4 / 64) + 2 * vocab * h * 2
    nf4 = _llama(bits=4)
    assert nf4["quantization"] == {"bits": 4, "double_quant": False}
    assert nf4["quantized_parameters"] == quantized
    assert nf4["frozen_weights_gib"] * 2**30 == pytest.approx(by_hand, rel=0.01)
    assert nf4["frozen_weights_gib"] == pytest.approx(5.61, abs=0.01)
    adapters = 63 * (2 * 8 * h + 8 + h)  # MEFT1: 2 per layer, the top one frozen; float32 with two AdamW states
    meft1 = nf4["arms"]["meft1"]
    assert meft1["static_gib"] * 2**30 == pytest.approx(by_hand + adapters * 12 + 64 * 2**20, rel=0.01)
    assert 5.5 < meft1["static_gib"] < 5.8
    for variant in ("meft1", "meft2", "meft3"):  # every MEFT arm holds the same frozen weights
        for arm in (variant, variant + "+offload", variant + "-float"):
            assert nf4["arms"][arm]["static_gib"] == pytest.approx(meft1["static_gib"], abs=0.01)


def test_quantized_bases_order():
    """Double quantization (8-bit scales per 64, a float32 per 256 blocks) is smaller than
    plain NF4, which is smaller than LLM.int8 (1 byte and a float32 per row), smaller than bf16."""
    bf16, nf4, nf4_double, int8 = _llama(), _llama(bits=4), _llama(bits=4, double_quant=True), _llama(bits=8)
    frozen = [r["frozen_weights_gib"] for r in (nf4_double, nf4, int8, bf16)]
    assert frozen == sorted(frozen)
    assert frozen == pytest.approx([5.31, 5.61, 8.46, 14.96], abs=0.01)
    saved = (nf4["frozen_weights_gib"] - nf4_double["frozen_weights_gib"]) * 2**30 * 8 / nf4["quantized_parameters"]
    assert saved == pytest.approx(32 / 64 - 8 / 64 - 32 / (64 * 256))  # bits per weight, QLoRA's 0.373
    for quantized in (nf4, nf4_double, int8):
        assert "full" not in quantized["arms"] and quantized["arms"]["lora+gc"]["static_gib"] < bf16["arms"]["lora+gc"]["static_gib"]
        # the activations of bf16 compute, plus one 4096 × 14336 matrix dequantised to bf16 (112 MiB)
        for name, arm in quantized["arms"].items():
            extra = arm["activation_gib"] - bf16["arms"][name]["activation_gib"]
            assert extra * 2**30 == pytest.approx(4096 * 14336 * 2), name
    assert bf16["quantization"] is None and "full" in bf16["arms"]


def test_cli_quantized_base():
    args = ("estimate", CONFIGS / "llama-3-8b.json", "-b", 1, "-s", 8192)
    data = json.loads(invoke(*args, "--load-in-4bit", "--bnb-4bit-use-double-quant", "--json").output)
    assert data["quantization"] == {"bits": 4, "double_quant": True}
    assert set(data["arms"]) == set(ARMS) - {"full"}
    assert data == json.loads(json.dumps(_llama(bits=4, double_quant=True)))
    assert json.loads(invoke(*args, "--load-in-8bit", "--json").output)["quantization"] == {"bits": 8, "double_quant": False}
    assert json.loads(invoke(*args, "--load-in-4bit", "--json").output)["quantization"] == {"bits": 4, "double_quant": False}
    text = invoke(*args, "--load-in-4bit").output
    assert "frozen base: NF4/FP4 (4-bit), double quant off" in text and "full fine-tuning left out" in text
    assert "\nfull " not in text and "frozen weights 5.61 GiB" in text
    assert "frozen base: LLM.int8 (8-bit)" in invoke(*args, "--load-in-8bit").output
    assert "frozen base" not in invoke(*args).output
    help_text = " ".join(invoke("estimate", "--help").output.split())
    assert "0.5625 byte per weight" in help_text and "dequantised" in help_text


@pytest.mark.parametrize("flags,message", [
    (["--load-in-4bit", "--load-in-8bit"], "--load-in-4bit and --load-in-8bit exclude each other"),
    (["--load-in-8bit", "--bnb-4bit-use-double-quant"], "--bnb-4bit-use-double-quant needs --load-in-4bit"),
])
def test_cli_quantization_usage_errors(flags, message):
    result = invoke("estimate", CONFIGS / "llama-3-8b.json", "-b", 1, "-s", 8, *flags)
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
