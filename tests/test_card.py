"""The model card: front matter the Hub reads, and figures equal to the verification report's."""

from __future__ import annotations

import re

import pytest
import torch
import transformers
from huggingface_hub import ModelCard

from meft_convert.card import CITATION, PIPELINE_TAGS


def _table(text: str, heading: str) -> dict[str, str]:
    section = text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (.+?) \| (.+?) \|$", section, re.MULTILINE)
    return {key: value for key, value in rows if set(value) != {"-"} and key != "measure"}


@pytest.mark.parametrize("name,auto_class,license", [("opt-125m", "AutoModelForCausalLM", None), ("minilm", "AutoModel", "apache-2.0")])
def test_front_matter_parses_and_describes_the_model(converted, name, auto_class, license):
    out, _ = converted(name, "meft3")
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == PIPELINE_TAGS[auto_class]
    assert card.data.license == license  # the base model's, from its own card
    assert {"meft", "reversible", "meft3"} <= set(card.data.tags)
    assert card.data.base_model is None  # a local folder has no hub id to name
    assert f"{auto_class}.from_pretrained(" in card.text and "trust_remote_code=True" in card.text
    assert 'revision="COMMIT"' in card.text and CITATION in card.text


@pytest.mark.parametrize("name", ["opt-125m", "minilm"])
def test_figures_equal_the_verification_report(converted, name):
    out, report = converted(name, "meft3")
    figures = _table((out / "README.md").read_text(), "Verification at conversion")
    fidelity = report["fidelity"]
    assert int(figures["tokens compared"]) == report["tokens"]
    assert abs(float(figures["cosine similarity to the original, mean"]) - fidelity["cosine_mean"]) <= 5e-7
    assert abs(float(figures["cosine similarity to the original, min"]) - fidelity["cosine_min"]) <= 5e-7
    if fidelity["top1_agreement"] is not None:
        assert abs(float(figures["top-1 prediction agreement"].rstrip("%")) - 100 * fidelity["top1_agreement"]) <= 0.005
        assert float(figures["KL divergence original → converted"]) == pytest.approx(fidelity["kl_mean"], rel=1e-3, abs=1e-12)
    else:
        assert "top-1 prediction agreement" not in figures
    assert int(figures["reconstructed layer inputs: differing elements"]) == sum(
        r["differing_elements"] for r in report["reconstruction"]
    ) == 0
    assert int(figures["reversible layers checked"]) == len(report["reconstruction"])
    gradients = report["gradients"]
    assert figures["gradients bitwise equal to plain autograd"] == f"{gradients['bitwise_equal']}/{gradients['tensors']} tensors"
    assert float(figures["gradients, max relative difference"]) == pytest.approx(gradients["max_relative_difference"], rel=1e-3, abs=1e-12)
    assert figures["result"] == "passed" and report["passed"]


def test_settings_and_trainable_parameters_are_the_model_s(converted):
    out, _ = converted("opt-125m", "meft3")
    text = (out / "README.md").read_text()
    settings = _table(text, "Settings")
    config = transformers.AutoConfig.from_pretrained(out, trust_remote_code=True)
    calibration = config.meft_calibration  # all defaults: λ, β, the init and the stream format were measured
    bits = calibration["remainder_bits"]
    assert settings["variant"] == "MEFT3"
    assert settings["λ (scale of x1)"] == f"{config.lambda_:g} = 2^-{bits['lambda_']} (auto: measured at conversion)"
    assert config.lambda_ == calibration["lambda_"] == 2.0 ** -bits["lambda_"]
    assert settings["β (scale of x2)"] == f"{config.beta:g} = 2^-{bits['beta']} (auto: measured at conversion)"
    assert int(settings["adapter size r"]) == config.adapter_dim and settings["adapter init"] == "zero (σ = 0.02) (auto)"
    assert settings["reversible layers"] == f"{config.num_hidden_layers} of {config.num_hidden_layers}"
    # an fp16 checkpoint: 32-bit streams, fractional bits from the measured range
    assert settings["output stream"] == config.output_stream
    assert settings["inverse"] == f"exact (32-bit fixed point, {config.frac_bits} fractional bits) (auto)"
    starting_point = text.split("## Starting point")[1].split("## ")[0]
    assert f"Chosen: λ = {config.lambda_:g} = 2^-{bits['lambda_']} ({bits['lambda_']} remainder bits)" in starting_point
    assert "The paper init of the adapters at the same scales: " in starting_point
    model = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32)
    trainable, total = model.get_nb_trainable_parameters()
    assert f"Trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.4f}%)" in text
