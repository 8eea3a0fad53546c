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


# ---------------------------------------------------------------------------- every snippet runs


def _python_snippets(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", text, re.MULTILINE | re.DOTALL)


def _with_tokenizer(folder, tmp_path):
    """A copy of a converted checkpoint that lacks a tokenizer, with a small word-level one
    whose ids fit its vocabulary (as a real checkpoint would have its own)."""
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers

    copy = shutil.copytree(folder, tmp_path / folder.name)
    words = "MEFT keeps the pretrained model frozen . Only small adapters learn".split()
    vocab = {token: i for i, token in enumerate(["<pad>", "<unk>", "</s>", *words])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<pad>", eos_token="</s>")
    fast.save_pretrained(copy)
    return copy


@pytest.mark.parametrize("name,auto_class", [
    ("minilm", "AutoModel"),  # a base model: the loss is computed from last_hidden_state
    pytest.param("bert", "AutoModelForMaskedLM", marks=pytest.mark.slow),  # 8-10 s each
    pytest.param("opt-125m", "AutoModelForCausalLM", marks=pytest.mark.slow),
])
def test_every_python_snippet_runs_as_written(converted, tmp_path, name, auto_class):
    """The card's snippets, in order, in one fresh process without meft_convert, with only the
    repository id replaced by the local folder; the fine-tuning step must change the weights
    that the card says train."""
    from tests.conftest import run_without_meft_convert

    out, _ = converted(name, "meft3")
    if not (out / "tokenizer_config.json").is_file():
        out = _with_tokenizer(out, tmp_path)
    text = (out / "README.md").read_text()
    snippets = _python_snippets(text)
    assert len(snippets) == 2 and f"{auto_class}.from_pretrained(" in snippets[0]
    assert ".loss" not in snippets[1] or auto_class != "AutoModel"  # a base model has no loss
    code = "\n".join(snippets).replace(f'"{out.name}"', repr(str(out)))
    assert repr(str(out)) in code
    check = (
        "\nimport math\n"
        "assert math.isfinite(loss.item())\n"
        "trained = [n for n, p in model.named_parameters() if p.requires_grad]\n"
        "assert trained and all('meft.' in n for n in trained), trained\n"
        "print('SNIPPETS-RAN', type(model).__name__)\n"
    )
    stdout = run_without_meft_convert(code + check, cwd=tmp_path)
    assert "SNIPPETS-RAN Meft" in stdout and "trainable params:" in stdout


def test_the_tokenizer_snippet_trusts_remote_code_and_the_head_that_trains_is_named(converted):
    out, _ = converted("minilm", "meft3")
    text = (out / "README.md").read_text()
    assert re.search(r"AutoTokenizer\.from_pretrained\([^)]*trust_remote_code=True", text)
    assert "only the adapters train" in text
    from meft_convert.card import CardFacts, model_card

    facts = CardFacts(
        name="me/bert-meft3", source="bert-base-uncased", base_model="bert-base-uncased", license=None,
        auto_class="AutoModelForSequenceClassification", model_type="bert",
        settings=transformers.AutoConfig.from_pretrained(out, trust_remote_code=True).meft_settings(),
        num_layers=6, trainable=1, total=2, report=None,
    )
    card = model_card(facts)
    assert "the adapters and the task head (`classifier`) train" in card
    assert "labels=torch.tensor([0, 1])).loss" in card


# ---------------------------------------------------------------------------- memory, estimated


@pytest.mark.parametrize("name,shape", [("opt-125m", (1, 64)), ("minilm", (32, 512))])
def test_the_memory_line_is_the_estimate_for_a_stated_shape(converted, tiny_checkpoints, minilm, name, shape):
    """No measured saving is claimed: the figure is meft_convert.estimate's for this model's
    settings at the stated shape (causal LMs 1 × 4096, others 32 × 512, cut to the model's
    positions), beside LoRA + checkpointing's, and the verdict follows the estimate."""
    import json

    from meft_convert.estimate import estimate_memory, memory_line

    out, _ = converted(name, "meft3")
    text = (out / "README.md").read_text()
    assert "63–71%" not in text
    section = text.split("## Memory\n", 1)[1].split("\n## ", 1)[0]
    config = transformers.AutoConfig.from_pretrained(out, trust_remote_code=True)
    from tests.conftest import source

    plm = json.loads((source(name, tiny_checkpoints, minilm) / "config.json").read_text())
    dtype = {"opt-125m": "fp16", "minilm": "fp32"}[name]
    given = dict(stream_bits=config.stream_bits, dtype=dtype, lambda_=config.lambda_, beta=config.beta)
    assert memory_line(plm, *shape, "meft3", **given) in section
    assert f"at batch {shape[0]} × {shape[1]} tokens" in section and "not measured" in section
    arms = estimate_memory(plm, *shape, variants=("meft3",), **given)["arms"]
    gc = arms.get("lora+gc+chunked-loss", arms.get("lora+gc"))["activation_gib"]
    if arms["meft3"]["activation_gib"] < gc:
        assert "less than LoRA + gradient checkpointing" in section
    else:
        assert "LoRA + gradient checkpointing keeping less activation memory than MEFT" in section


# ---------------------------------------------------------------------------- no local paths


@pytest.mark.parametrize("name", ["opt-125m", "minilm"])
def test_no_path_of_this_machine_is_written(converted, tiny_checkpoints, minilm, session_dir, name):
    """The card, meft_report.json and config.json name a local original by its folder's name:
    they are pushed and shared, and a path of the converting machine means nothing elsewhere."""
    import json
    import os
    import tempfile
    from pathlib import Path

    from tests.conftest import source

    out, _ = converted(name, "meft3")
    original = source(name, tiny_checkpoints, minilm)
    machine = {str(original), str(original.resolve()), str(session_dir), str(out), tempfile.gettempdir() + os.sep,
               str(Path.home()) + os.sep, os.getcwd() + os.sep}
    written = [p for p in out.iterdir() if p.suffix in (".json", ".md", ".txt", ".jinja")]
    assert {"README.md", "meft_report.json", "config.json"} <= {p.name for p in written}
    for path in written:
        text = path.read_text()
        leaked = sorted(m for m in machine if m in text)
        assert not leaked, f"{path.name} holds {leaked}"
    config = json.loads((out / "config.json").read_text())
    assert config["meft_base_model"] == original.name and config["meft_base_model_local"] is True
    assert json.loads((out / "meft_report.json").read_text())["model"] == original.name
