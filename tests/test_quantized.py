"""A quantized frozen base (QLoRA's setting), on the CPU with bitsandbytes: the PLM's linear layers in
4 or 8 bits, the adapters and a trained head kept out of quantization, and training exact through
the quantized layers (bit-exact reconstruction, gradients bit for bit plain autograd's)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import math
import shutil

import pytest
import torch
import transformers
from torch import nn

from meft_convert import get_meft_model
from meft_convert.convert import ConvertOptions, convert
from meft_convert.errors import BadInputError
from meft_convert.quiet import quiet_transformers
from meft_convert.templates.adapters import MeftAdapter
from tests.conftest import build_checkpoint, real_config
from tests.test_modeling import assert_reversible_equals_plain_autograd, batch
from tests.test_smollm2 import causal_lm_gradients


def _bitsandbytes_version() -> tuple[int, ...] | None:
    # found without importing it: collecting the suite should not load its kernels
    if importlib.util.find_spec("bitsandbytes") is None:
        return None
    return tuple(int(part) for part in importlib.metadata.version("bitsandbytes").split(".")[:2])


pytestmark = pytest.mark.skipif(
    (_bitsandbytes_version() or (0,)) < (0, 50),
    reason="needs bitsandbytes>=0.50 (pip install -e '.[bnb]'), which runs 4- and 8-bit layers on the CPU",
)

BNB = transformers.BitsAndBytesConfig
QUANTIZATIONS = {
    "nf4-bf16": lambda: BNB(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16),
    "nf4-double-fp16": lambda: BNB(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.float16),
    "fp4-bf16": lambda: BNB(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.bfloat16),
    "fp4-double-fp16": lambda: BNB(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.float16),
    "int8": lambda: BNB(load_in_8bit=True),
}
# the tiny LLaMA's seven projections per layer, two layers
PLM_LINEARS = 14
HEADS = ["AutoModelForCausalLM", "AutoModelForSequenceClassification"]


def _quantized_class(quantization: BNB) -> type:
    import bitsandbytes as bnb

    return bnb.nn.Linear8bitLt if quantization.load_in_8bit else bnb.nn.Linear4bit


def _load(folder, auto_class: str, quantization: BNB, **kwargs):
    with quiet_transformers():
        return getattr(transformers, auto_class).from_pretrained(
            folder, trust_remote_code=True, quantization_config=quantization, device_map="cpu", **kwargs
        )


def _linears(model) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def _adapter_linears(model) -> set[str]:
    # by class name: a model loaded with trust_remote_code has the checkpoint's own copy of the class
    return {f"{name}.{child}" for name, m in model.named_modules() if type(m).__name__ == MeftAdapter.__name__
            for child, c in m.named_children() if isinstance(c, nn.Linear)}


def assert_adapters_and_head_unquantized(model, quantization: BNB, head: str | None) -> None:
    """The PLM's projections quantized and frozen; every adapter and the head MEFT trains plain
    float32 linear layers that train; norms and embeddings floating point and frozen."""
    quantized_class, linears = _quantized_class(quantization), _linears(model)
    quantized = {name for name, m in linears.items() if isinstance(m, quantized_class)}
    adapters = _adapter_linears(model)
    assert len(quantized) == PLM_LINEARS and len(adapters) == 8 and not quantized & adapters
    weight_dtype = torch.int8 if quantization.load_in_8bit else torch.uint8
    assert all(linears[n].weight.dtype == weight_dtype and not linears[n].weight.requires_grad for n in quantized)
    kept = adapters | ({head} if head else set())
    for name in kept:
        assert type(linears[name]) is nn.Linear, name
        assert all(p.dtype == torch.float32 and p.requires_grad for p in linears[name].parameters()), name
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"{name}.{leaf}" for name in kept for leaf in ("weight", "bias") if getattr(linears[name], leaf) is not None
    }
    others = [p for n, p in model.named_parameters() if "norm" in n or "embed" in n]
    assert others and all(p.is_floating_point() and not p.requires_grad for p in others)


@pytest.fixture(scope="module")
def llama_meft3(converted):
    """The tiny bf16 LLaMA converted with every default (zero-initialised adapters)."""
    return converted("llama", "meft3")[0]


@pytest.mark.parametrize("auto_class", HEADS)
@pytest.mark.parametrize("quantization", list(QUANTIZATIONS))
def test_quantized_loading_trains_the_adapters_exactly(llama_meft3, quantization, auto_class):
    """Every bitsandbytes layout: the quantized PLM frozen, adapters and a new head in float32 and
    trainable, the reversible gradients (attention dropout on) plain autograd's bit for bit, with
    the blocks whole and in chunks of 4 tokens and queries (the batch has 27)."""
    config = QUANTIZATIONS[quantization]()
    head = "score" if auto_class == "AutoModelForSequenceClassification" else None
    for chunks in ({}, dict(recompute_chunk_tokens=4, chunk_attention_queries=True)):
        model = _load(llama_meft3, auto_class, config, pad_token_id=0, attention_dropout=0.1, **chunks)
        assert model.meft_layers.coupling.chunk_tokens == chunks.get("recompute_chunk_tokens", 4096)
        assert_adapters_and_head_unquantized(model, config, head)
        gradients = assert_reversible_equals_plain_autograd(model, auto_class)
        ups = [n for n in gradients if n.endswith("up_proj.weight")]
        assert len(ups) == 4 and all(gradients[n].abs().sum() > 0 for n in ups)


def test_the_users_skip_list_is_kept_beside_the_adapters(llama_meft3):
    """llm_int8_skip_modules is merged with what MEFT keeps unquantized, not replaced."""
    config = BNB(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=["mlp.down_proj"])
    model = _load(llama_meft3, "AutoModelForCausalLM", config)
    linears = _linears(model)
    kept = {n for n, m in linears.items() if type(m) is nn.Linear}
    assert {n for n in kept if n.endswith("mlp.down_proj")} == {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}
    assert _adapter_linears(model) <= kept
    # the layers' other projections quantized (lm_head too: a user's list replaces the library's default skips)
    quantized = {n for n, m in linears.items() if isinstance(m, _quantized_class(config)) and n.startswith("model.layers.")}
    assert len(quantized) == PLM_LINEARS - 2


def test_the_starting_point_is_the_quantized_originals(converted, tiny_checkpoints):
    """Quantizing the same weights gives the same integers: converted with λ = β = 2^-16 and
    zero-initialised adapters (the start kept almost exactly), the model in NF4 with bf16 compute
    gives the NF4 original's logits within 1e-3 of the largest (measured: 1.2e-4) and every
    prediction."""
    folder, _ = converted("llama", "meft3", lambda_=2**-16, beta=2**-16, adapter_init="zero", stream_bits="64")
    config = QUANTIZATIONS["nf4-bf16"]()
    ids, mask = batch()
    with quiet_transformers():
        original = transformers.AutoModelForCausalLM.from_pretrained(
            tiny_checkpoints["llama"], quantization_config=config, device_map="cpu"
        ).eval()
    model = _load(folder, "AutoModelForCausalLM", config).eval()
    with torch.no_grad():
        reference = original(input_ids=ids, attention_mask=mask).logits.float()
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
    real = mask.bool()
    assert (logits - reference)[real].abs().max() <= 1e-3 * reference[real].abs().max()
    assert torch.equal(logits.argmax(-1)[real], reference.argmax(-1)[real])


@pytest.mark.parametrize("quantization", ["nf4-bf16", "int8"])
def test_get_meft_model_on_a_quantized_plm(tiny_checkpoints, tmp_path, quantization):
    """A PLM loaded in 4 or 8 bits: MEFT uses its quantized layers (the same modules), adds float32
    adapters, calibrates and trains exactly; saved, it reloads quantized with the same logits."""
    config = QUANTIZATIONS[quantization]()
    with quiet_transformers():
        plm = transformers.AutoModelForCausalLM.from_pretrained(
            tiny_checkpoints["llama"], quantization_config=config, device_map="cpu"
        )
    meft = get_meft_model(plm, variant="meft3")
    assert meft.model.layers[1].mlp.up_proj is plm.model.layers[1].mlp.up_proj
    assert_adapters_and_head_unquantized(meft, config, None)
    # calibrated on the quantized model, in the dtype its norms and embeddings keep (bf16)
    calibration = meft.config.meft_calibration
    assert calibration["dtype"] == "bfloat16" and meft.config.stream_bits == 32
    assert calibration["meets_target"] and calibration["figures"]["top1_agreement"] >= 0.9
    gradients = assert_reversible_equals_plain_autograd(meft, "AutoModelForCausalLM")
    ups = [n for n in gradients if n.endswith("up_proj.weight")]
    assert len(ups) == 4 and all(gradients[n].abs().sum() > 0 for n in ups)

    meft.eval().save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["quantization_config"]["quant_method"] == "bitsandbytes"
    with quiet_transformers():
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved", trust_remote_code=True, device_map="cpu")
    assert_adapters_and_head_unquantized(reloaded, config, None)
    ids, mask = batch()
    with torch.no_grad():
        assert torch.equal(meft(input_ids=ids, attention_mask=mask).logits, reloaded.eval()(input_ids=ids, attention_mask=mask).logits)


def test_a_head_quantized_before_meft_is_refused_naming_the_skip_list(tmp_path):
    """A skip list without the classifier quantizes it at loading; MEFT must train it."""
    folder = build_checkpoint(tmp_path / "classifier", real_config(
        "tinyllama-1.1b", architectures=["LlamaForSequenceClassification"], pad_token_id=0), torch.bfloat16)
    config = BNB(load_in_4bit=True, llm_int8_skip_modules=[])
    with quiet_transformers():
        plm = transformers.AutoModelForSequenceClassification.from_pretrained(folder, quantization_config=config, device_map="cpu")
    with pytest.raises(BadInputError, match=r"score\.weight is quantized \(torch\.uint8\).*'score' in llm_int8_skip_modules"):
        get_meft_model(plm, variant="meft3")


@pytest.mark.parametrize("declared,message", [
    (dict(quant_method="bitsandbytes", load_in_4bit=True), "declares bitsandbytes 4-bit weights, but no tensor"),
    (dict(quant_method="bitsandbytes", load_in_8bit=True), r"quantized checkpoint \(bitsandbytes 8-bit\), and only"),
    (dict(quant_method="gptq", bits=4), r"quantized checkpoint \(gptq\), and only bitsandbytes 4-bit"),
])
def test_a_quantized_checkpoint_other_than_a_saved_4bit_one_is_refused_by_name(tiny_checkpoints, tmp_path, declared,
                                                                               message):
    """A config that declares quantization its tensors do not have, or a packing conversion cannot
    read: one error naming it, and nothing written."""
    source = tmp_path / "quantized"
    shutil.copytree(tiny_checkpoints["llama"], source)
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = declared
    (source / "config.json").write_text(json.dumps(config))
    with pytest.raises(BadInputError, match=message):
        convert(ConvertOptions(model=str(source), output=tmp_path / "out", show_progress=False), log=lambda _: None)
    assert not (tmp_path / "out").exists()


# --- a checkpoint published in 4 bits (*-bnb-4bit) as the converter's input -------------------


def _save_in_4bit(source, folder, quantization: BNB):
    """What a *-bnb-4bit checkpoint is: a model loaded in 4 bits and saved (packed weights, their
    quantization state, quantization_config in config.json)."""
    with quiet_transformers():
        model = transformers.AutoModelForCausalLM.from_pretrained(source, quantization_config=quantization,
                                                                  device_map="cpu")
    model.save_pretrained(folder)
    return folder


def _tensors(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


@pytest.fixture(scope="module")
def llama_bnb_4bit(tiny_checkpoints, tmp_path_factory):
    return _save_in_4bit(tiny_checkpoints["llama"], tmp_path_factory.mktemp("bnb-4bit") / "llama-bnb-4bit",
                         QUANTIZATIONS["nf4-double-fp16"]())


def test_a_4bit_checkpoint_converts_as_it_is_and_trains_in_4_bits_exactly(llama_bnb_4bit, tmp_path):
    """Converted with every default (calibrated and verified against the same 4-bit original): every
    tensor byte for byte, quantization_config kept, loaded back in 4 bits with no quantization config
    given and the very packed weights (nothing quantized again), reversible gradients plain
    autograd's bit for bit."""
    out = convert(ConvertOptions(model=str(llama_bnb_4bit), output=tmp_path / "out", show_progress=False),
                  log=lambda _: None)
    report = json.loads((out / "meft_report.json").read_text())
    assert report["passed"] and report["problems"] == [] and report["gradients"]["bitwise_equal"] == 16
    assert len(report["reconstruction"]) == 2 and all(r["differing_elements"] == 0 for r in report["reconstruction"])
    source, converted = _tensors(llama_bnb_4bit), _tensors(out)
    assert set(source) < set(converted)
    assert all(converted[k].dtype == t.dtype and torch.equal(converted[k], t) for k, t in source.items())
    assert {k for k in set(converted) - set(source)} == {k for k in converted if ".meft." in k}
    config, original = (json.loads((f / "config.json").read_text()) for f in (out, llama_bnb_4bit))
    assert config["quantization_config"] == original["quantization_config"]
    assert "4 bits (bitsandbytes, NF4, double quantization, computing in float16)" in (out / "README.md").read_text()

    with quiet_transformers():
        model = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, device_map="cpu",
                                                                  attention_dropout=0.1)
    assert_adapters_and_head_unquantized(model, QUANTIZATIONS["nf4-double-fp16"](), head=None)
    packed = {n: m.weight for n, m in model.named_modules() if isinstance(m, _quantized_class(BNB(load_in_4bit=True)))}
    assert all(torch.equal(w.data, source[n + ".weight"]) for n, w in packed.items())
    gradients = assert_reversible_equals_plain_autograd(model, "AutoModelForCausalLM")
    assert len(gradients) == 16

    # `meft-convert check` verifies it again against the same 4-bit original, with the same figures
    from meft_convert.check import check_checkpoint

    checked = check_checkpoint(str(out), original=str(llama_bnb_4bit), log=lambda _: None)
    assert checked.code.identical and checked.report.passed and checked.figure_differences == {}


def test_the_estimate_takes_a_4bit_checkpoint_as_it_is_stored(llama_bnb_4bit, tiny_checkpoints):
    from meft_convert.estimate import estimate_memory, load_config

    stored = estimate_memory(load_config(str(llama_bnb_4bit), None, None), 1, 64)
    plain = estimate_memory(load_config(str(tiny_checkpoints["llama"]), None, None), 1, 64)
    assert "full" in plain["arms"] and "full" not in stored["arms"]  # 4-bit weights cannot train
    assert stored["arms"]["meft3"]["static_gib"] < plain["arms"]["meft3"]["static_gib"]


# --- the real SmolLM2-135M in NF4 ------------------------------------------------------------

TOKENS = 256


def _perplexity_and_predictions(model, ids: torch.Tensor) -> tuple[float, torch.Tensor]:
    with torch.no_grad():
        logits = model.eval()(input_ids=ids).logits[0].float()
    return math.exp(nn.functional.cross_entropy(logits[:-1], ids[0, 1:]).item()), logits.argmax(-1)


@pytest.fixture(scope="module")
def smollm2_meft3(smollm2, tmp_path_factory):
    """SmolLM2 converted with the scales its default conversion chooses (MEFT3: λ = 2^-11,
    β = 2^-12, zero-initialised adapters; tests/test_smollm2.py), given so that nothing is measured."""
    out = tmp_path_factory.mktemp("smollm2-nf4") / "meft3"
    options = ConvertOptions(model=str(smollm2), output=out, variant="meft3", lambda_=2**-11, beta=2**-12,
                             adapter_init="zero", verify=False, show_progress=False)
    return convert(options, log=lambda _: None)


@pytest.mark.slow
def test_smollm2_in_nf4_keeps_the_quantized_originals_perplexity(smollm2, smollm2_meft3, wikitext_test):
    """Perplexity on the first 256 tokens of wikitext-2 test, both in NF4 with bf16 compute
    (measured: original 38.38, converted 38.32, top-1 agreement 99.2%; in float32 the original
    is 32.41)."""
    ids = transformers.AutoTokenizer.from_pretrained(smollm2)(wikitext_test, return_tensors="pt")["input_ids"][:, :TOKENS]
    config = QUANTIZATIONS["nf4-bf16"]()
    with quiet_transformers():
        original = transformers.AutoModelForCausalLM.from_pretrained(smollm2, quantization_config=config, device_map="cpu")
    ppl0, predicted0 = _perplexity_and_predictions(original, ids)
    del original
    model = _load(smollm2_meft3, "AutoModelForCausalLM", config)
    assert sum(isinstance(m, _quantized_class(config)) for m in model.modules()) == 30 * 7
    ppl, predicted = _perplexity_and_predictions(model, ids)
    assert 37 < ppl0 < 40
    assert abs(ppl / ppl0 - 1) <= 0.01, (ppl, ppl0)
    assert (predicted == predicted0).float().mean().item() >= 0.95


@pytest.mark.slow
@pytest.mark.parametrize("chunk_tokens", [4096, 8])
def test_smollm2_in_nf4_trains_with_plain_autograds_gradients(smollm2, smollm2_meft3, wikitext_test, chunk_tokens):
    """64 wikitext tokens, causal-LM loss: the reversible backward rebuilds every layer's input
    bit for bit (its audit raises otherwise) and every adapter gradient is the vanilla oracle's,
    with the blocks whole (the default) and 8 tokens at a time."""
    ids = transformers.AutoTokenizer.from_pretrained(smollm2)(wikitext_test, return_tensors="pt")["input_ids"][:, :64]
    config = QUANTIZATIONS["nf4-bf16"]()
    model = _load(smollm2_meft3, "AutoModelForCausalLM", config, recompute_chunk_tokens=chunk_tokens).train()
    assert model.config.audit and model.meft_layers.coupling.chunk_tokens == chunk_tokens
    names, params, grads = causal_lm_gradients(model, ids)
    assert len(params) == 240 and all(p.dtype == torch.float32 for p in params)  # 30 layers, 2 adapters, 4 tensors
    assert all(torch.equal(grads["reversible"][n], grads["vanilla"][n]) for n in names)
    ups = [n for n in names if n.endswith("up_proj.weight")]
    assert len(ups) == 60 and all(grads["reversible"][n].abs().sum() > 0 for n in ups)


@pytest.mark.slow
def test_smollm2_published_in_nf4_converts_with_defaults_and_keeps_its_start(smollm2, wikitext_test, tmp_path):
    """SmolLM2 saved in NF4 (bf16 compute), as a *-bnb-4bit checkpoint is, then converted with every
    default: calibration and verification run on the 4-bit original and pass, and on 256 wikitext
    tokens the converted model, loaded as it is stored, keeps the 4-bit original's perplexity within
    1% and its top-1 predictions on at least 95% of the tokens."""
    published = _save_in_4bit(smollm2, tmp_path / "smollm2-bnb-4bit", QUANTIZATIONS["nf4-bf16"]())
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (smollm2 / name).exists():
            shutil.copyfile(smollm2 / name, published / name)
    out = convert(ConvertOptions(model=str(published), output=tmp_path / "meft", show_progress=False), log=lambda _: None)
    report = json.loads((out / "meft_report.json").read_text())
    assert report["passed"] and report["gradients"]["bitwise_equal"] == report["gradients"]["tensors"] > 0
    ids = transformers.AutoTokenizer.from_pretrained(smollm2)(wikitext_test, return_tensors="pt")["input_ids"][:, :TOKENS]
    with quiet_transformers():
        original = transformers.AutoModelForCausalLM.from_pretrained(published, device_map="cpu")
        model = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, device_map="cpu")
    ppl0, predicted0 = _perplexity_and_predictions(original, ids)
    ppl, predicted = _perplexity_and_predictions(model, ids)
    assert sum(isinstance(m, _quantized_class(BNB(load_in_4bit=True))) for m in model.modules()) == 30 * 7
    assert 37 < ppl0 < 40
    assert abs(ppl / ppl0 - 1) <= 0.01, (ppl, ppl0)
    assert (predicted == predicted0).float().mean().item() >= 0.95
