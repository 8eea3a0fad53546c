"""Adapter-only saves, their loading onto the converted base, and the trainable-parameter summary."""

from __future__ import annotations

import json
import re

import pytest
import torch
import transformers

from meft_convert.templates.modeling_meft import ADAPTERS_CONFIG_NAME, ADAPTERS_WEIGHTS_NAME

AUTO = transformers.AutoModelForSequenceClassification


def load(folder, seed: int, **kwargs):
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # the new classifier's initialisation
        return AUTO.from_pretrained(folder, trust_remote_code=True, num_labels=2, **kwargs)


def fine_tune(model, steps: int = 2) -> None:
    """A few real optimizer steps, so that adapters and classifier differ from their start."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(1000, 20000, (4, 12), generator=torch.Generator().manual_seed(0))
    model.train()
    for _ in range(steps):
        model(input_ids=ids, labels=torch.tensor([0, 1, 1, 0])).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def outputs(model, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1000, 20000, (3, 10), generator=torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        plain = model(input_ids=ids).logits
    model.train()
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # the same dropout masks
        trained = model(input_ids=ids, labels=torch.tensor([0, 1, 0])).loss.detach()
    return plain, trained


@pytest.fixture(scope="module")
def minilm_meft3(converted):
    return converted("minilm", "meft3")[0]


@pytest.fixture(scope="module")
def fine_tuned(minilm_meft3, tmp_path_factory):
    model = load(minilm_meft3, seed=0)
    fine_tune(model)
    folder = tmp_path_factory.mktemp("adapters")
    model.save_pretrained(folder, adapters_only=True)
    return model, folder


def test_adapters_only_save_holds_adapters_and_classifier_only(fine_tuned, minilm_meft3):
    model, folder = fine_tuned
    assert sorted(p.name for p in folder.iterdir()) == [ADAPTERS_CONFIG_NAME, ADAPTERS_WEIGHTS_NAME]
    description = json.loads((folder / ADAPTERS_CONFIG_NAME).read_text())
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert description["tensors"] == trainable
    assert all(".meft." in n or n.startswith("classifier.") for n in trainable)
    assert sum(".meft." in n for n in trainable) == 6 * 2 * 4  # 6 layers, attention and FFN adapters, 4 tensors
    assert description["meft_settings"]["variant"] == "meft3"
    size = (folder / ADAPTERS_WEIGHTS_NAME).stat().st_size
    full = sum(f.stat().st_size for f in minilm_meft3.glob("*.safetensors"))
    trainable_bytes = 4 * model.get_nb_trainable_parameters()[0]
    # 79,202 float32 parameters: 0.3 MB against the 91 MB checkpoint
    assert trainable_bytes <= size < trainable_bytes + 16_384
    assert size < full / 200


def test_loading_adapters_restores_the_fine_tuned_model_bit_exactly(fine_tuned, minilm_meft3):
    model, folder = fine_tuned
    base = load(minilm_meft3, seed=1)  # another classifier initialisation
    differing = [n for n, t in base.state_dict().items() if not torch.equal(t, model.state_dict()[n])]
    assert differing and all(".meft." in n or n.startswith("classifier.") for n in differing)
    base.load_adapters(folder)
    reference = model.state_dict()
    restored = base.state_dict()
    assert restored.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(restored[name], tensor), name
    for a, b in zip(outputs(model), outputs(base)):
        assert torch.equal(a, b)
    # only what fine-tuning changed trains, as before
    assert {n for n, p in base.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad
    }


def test_from_pretrained_with_adapters(fine_tuned, minilm_meft3):
    model, folder = fine_tuned
    restored = load(minilm_meft3, seed=2, adapters=folder)
    for name, tensor in model.state_dict().items():
        assert torch.equal(restored.state_dict()[name], tensor), name
    assert restored.config.id2label == model.config.id2label


def test_loading_refuses_adapters_of_another_model(fine_tuned, converted, tmp_path):
    _, folder = fine_tuned
    other_variant = load(converted("minilm", "meft1")[0], seed=0)
    with pytest.raises(ValueError, match="variant: saved 'meft3', this model 'meft1'"):
        other_variant.load_adapters(folder)
    with pytest.raises(FileNotFoundError, match="adapters_only=True"):
        other_variant.load_adapters(tmp_path)
    three_labels = AUTO.from_pretrained(converted("minilm", "meft3")[0], trust_remote_code=True, num_labels=3)
    with pytest.raises(ValueError, match=r"classifier.bias has shape \(2,\) in .* but \(3,\) in this model"):
        three_labels.load_adapters(folder)
    with pytest.raises(TypeError, match="adapters_only=True"):
        three_labels.save_pretrained(tmp_path / "x", adapters_only=True, push_to_hub=True)
    # how training runs (chunked loss, compiled blocks, the audit) is no reason to refuse
    runtime = AUTO.from_pretrained(
        converted("minilm", "meft3")[0], trust_remote_code=True, compile_blocks=True, loss_chunk_size=0, audit=False
    )
    runtime.load_adapters(folder)
    assert runtime.config.compile_blocks and not runtime.config.audit


def test_print_trainable_parameters(fine_tuned, capsys):
    model, _ = fine_tuned
    model.print_trainable_parameters()
    line = capsys.readouterr().out.strip()
    match = re.fullmatch(r"trainable params: ([\d,]+) \|\| all params: ([\d,]+) \|\| trainable%: ([\d.]+)", line)
    assert match, line
    trainable, total = (int(match[i].replace(",", "")) for i in (1, 2))
    assert (trainable, total) == model.get_nb_trainable_parameters()
    # MiniLM: 12 adapters of 384·8 + 8 + 8·384 + 384 parameters and a 384 → 2 classifier; 22.8M in all
    assert trainable == 12 * (384 * 8 + 8 + 8 * 384 + 384) + 384 * 2 + 2 == 79_202
    assert total == sum(p.numel() for p in model.parameters())
    assert float(match[3]) == pytest.approx(100 * trainable / total, abs=1e-4)
