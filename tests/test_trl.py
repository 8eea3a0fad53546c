"""TRL's SFTTrainer on a converted model, as LLM users fine-tune: its default config (gradient
checkpointing on), packed rows and padding-free batches. Two steps of each train the adapters
exactly as the plain-autograd oracle does, and the first loss is the original model's."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import transformers

pytestmark = pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="needs trl (pip install -e '.[test]')")

CONFIGS = {
    "default": {},
    "packing": dict(packing=True),
    "padding-free": dict(padding_free=True, max_length=None),  # TRL enforces no max_length without packing
}


@pytest.fixture(scope="module")
def data():
    from datasets import Dataset

    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(10, 40, (8,), generator=g).tolist()
    return Dataset.from_list([{"input_ids": torch.randint(3, 1000, (n,), generator=g).tolist()} for n in lengths])


def _train(model, data, tokenizer, tmp_path, mode: str = "reversible", **config) -> tuple[list[float], dict]:
    """Two SGD steps of SFTTrainer; the logged losses and the trained parameters."""
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir=str(tmp_path / "sft"), per_device_train_batch_size=2, max_steps=2, learning_rate=1e-2,
                     optim="sgd", use_cpu=True, report_to=[], logging_steps=1, save_strategy="no", seed=0,
                     **{"max_length": 64, **config})
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    context = model.meft_backward(mode) if hasattr(model, "meft_backward") else torch.enable_grad()
    with context:
        trainer.train()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    return losses, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_sft_trainer_trains_a_converted_model_exactly(converted, tiny_checkpoints, minilm, data, tmp_path, config):
    folder, _ = converted("llama", "meft1")
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm)  # any tokenizer: the rows are token ids

    def load():
        return transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)

    model = load()
    head_calls, backbone_calls = [], []
    model.get_output_embeddings().register_forward_hook(lambda *_: head_calls.append(1))
    model.base_model.register_forward_hook(lambda *_: backbone_calls.append(1))
    losses, trained = _train(model, data, tokenizer, tmp_path, **CONFIGS[config])
    assert model.is_gradient_checkpointing  # SFTConfig's default, which the reversible layers need not
    # TRL's own chunked loss: the backbone (model.base_model) and the head's weight, never the head's forward
    assert len(backbone_calls) == 2 and not head_calls
    oracle_losses, oracle = _train(load(), data, tokenizer, tmp_path, mode="vanilla", **CONFIGS[config])
    assert losses == oracle_losses and len(losses) == 2
    assert trained.keys() == oracle.keys() and all(torch.equal(trained[n], oracle[n]) for n in trained)
    assert any(".meft." in n for n in trained)
    # the first step starts where the original does (zero-initialised adapters, calibrated scales)
    original = transformers.AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"], dtype=torch.float32)
    original_losses, _ = _train(original, data, tokenizer, tmp_path, **CONFIGS[config])
    assert abs(losses[0] - original_losses[0]) <= 1e-3 * original_losses[0], (losses[0], original_losses[0])


@pytest.fixture(scope="module")
def llama_30k(tmp_path_factory, minilm):
    """A tiny LLaMA with the MiniLM tokenizer's vocabulary (DPO tokenizes text), float32,
    converted as MEFT1 with every default but verification."""
    from meft_convert.convert import ConvertOptions, convert
    from tests.conftest import build_checkpoint, real_config

    folder = tmp_path_factory.mktemp("dpo")
    source = build_checkpoint(folder / "llama", real_config("tinyllama-1.1b", vocab_size=30522), torch.float32)
    out = convert(ConvertOptions(model=str(source), output=folder / "meft1", variant="meft1", verify=False,
                                 show_progress=False), log=lambda _: None)
    return source, out


def _dpo(model, tokenizer, tmp_path, mode: str = "reversible"):
    """Two SGD steps of DPOTrainer with the reference log-probabilities computed up front by the
    model itself (precompute_ref_log_probs): no second copy of the PLM."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    pairs = [dict(prompt=f"question {i}:", chosen=f"a good answer number {i}", rejected=f"bad {i} bad") for i in range(8)]
    args = DPOConfig(output_dir=str(tmp_path / "dpo"), per_device_train_batch_size=2, max_steps=2, learning_rate=1e-2,
                     optim="sgd", use_cpu=True, report_to=[], logging_steps=1, save_strategy="no", seed=0,
                     precompute_ref_log_probs=True)
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(pairs), processing_class=tokenizer)
    assert trainer.ref_model is None
    context = model.meft_backward(mode) if hasattr(model, "meft_backward") else torch.enable_grad()
    with context:
        trainer.train()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    reference = torch.tensor([*trainer.train_dataset["ref_chosen_logps"], *trainer.train_dataset["ref_rejected_logps"]])
    return losses, reference, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_dpo_trains_a_converted_model_exactly_with_no_second_model(llama_30k, minilm, tmp_path):
    """The reference is the model before training (zero-initialised adapters: the original up to
    the starting-point error), its log-probabilities computed once; the first loss is ln 2 and two
    steps train the adapters exactly as the plain-autograd oracle does."""
    source, folder = llama_30k
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm)
    tokenizer.eos_token = "[SEP]"  # DPO ends each completion with it

    def load():
        return transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)

    losses, reference, trained = _dpo(load(), tokenizer, tmp_path)
    oracle_losses, oracle_reference, oracle = _dpo(load(), tokenizer, tmp_path, mode="vanilla")
    assert abs(losses[0] - 0.6931471805599453) < 1e-6 and losses == oracle_losses
    assert torch.equal(reference, oracle_reference)
    assert trained.keys() == oracle.keys() and all(torch.equal(trained[n], oracle[n]) for n in trained)
    original = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    _, original_reference, _ = _dpo(original, tokenizer, tmp_path)
    # sequence log-probabilities of about -50 to -70 nats: the calibrated start moves them by 0.0093 at most
    assert (reference - original_reference).abs().max() <= 0.02, (reference - original_reference).abs().max()
