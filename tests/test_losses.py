"""The chunked causal-LM loss: the library's loss and gradients, without the full logits."""

from __future__ import annotations

import inspect

import pytest
import torch
import transformers

from meft_convert.templates.losses import chunked_causal_lm_loss

DECODERS = ["opt-125m", "opt-350m", "llama", "mistral", "qwen2", "gpt2"]


def _batch(model, seed: int = 0, seq: int = 24):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (3, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[1, seq * 2 // 3 :] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[2, :5] = -100  # a prompt without labels
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def _loss_and_grads(model, batch, chunk: int, **kwargs):
    model.config.loss_chunk_size = chunk
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # dropout
    out = model(**batch, **kwargs)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("name", DECODERS)
def test_chunked_loss_and_gradients_equal_the_library_loss(converted, name):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        converted(name, "meft3")[0], dtype=torch.float32, trust_remote_code=True
    ).train()
    assert model.config.loss_chunk_size == 256  # the default written at conversion
    # the library forward's signature, which generate() reads
    assert {"labels", "position_ids", "attention_mask"} <= set(inspect.signature(model.forward).parameters)
    batch = _batch(model)
    whole, whole_grads = _loss_and_grads(model, batch, chunk=0)
    # LLaMA-like models' final RMSNorm runs with the head, a chunk at a time (forward and recompute)
    norm = model.meft_final_norm()
    assert (norm is not None) == (name in ("llama", "mistral", "qwen2"))
    rows = []
    handle = norm.register_forward_hook(lambda m, args, out: rows.append(args[0].shape)) if norm is not None else None
    head = model.get_output_embeddings()
    chunked, chunked_grads = _loss_and_grads(model, batch, chunk=7)  # 7 does not divide the 52 labelled tokens
    # the stand-ins are gone: the model holds its own head and norm again
    assert model.get_output_embeddings() is head and model.meft_final_norm() is norm
    if handle is not None:
        handle.remove()
        # the norm never sees the whole sequence (a stand-in passes it on in the model's own
        # call): its work is in the chunks, each once in forward and once in its recompute
        labelled = int((batch["labels"][:, 1:] != -100).sum())
        assert len(rows) == 2 * -(-labelled // 7)
        assert all(shape[0] <= 7 and len(shape) == 2 for shape in rows)
    assert whole.logits is not None and chunked.logits is None
    assert abs(chunked.loss.item() - whole.loss.item()) <= 1e-6 * whole.loss.item()
    assert whole_grads.keys() == chunked_grads.keys() and len(whole_grads) > 0
    for n, g in whole_grads.items():
        assert (chunked_grads[n] - g).norm() <= 1e-5 * g.norm(), n


def test_chunked_loss_follows_num_items_in_batch_and_shift_labels(converted):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        converted("llama", "meft1")[0], dtype=torch.float32, trust_remote_code=True
    ).train()
    batch = _batch(model, seed=1)
    items = torch.tensor(40)
    whole, _ = _loss_and_grads(model, batch, chunk=0, num_items_in_batch=items)
    chunked, _ = _loss_and_grads(model, batch, chunk=5, num_items_in_batch=items)
    assert abs(chunked.loss.item() - whole.loss.item()) <= 1e-6 * whole.loss.item()
    # tuples, as return_dict=False asks, and eval mode computes logits as the library does
    model.config.loss_chunk_size = 5
    as_tuple = model(**batch, return_dict=False)
    assert torch.is_tensor(as_tuple[0]) and as_tuple[0].ndim == 0
    model.eval()
    assert model(**batch).logits.shape == (3, 24, model.config.vocab_size)


def test_chunk_loss_function_against_cross_entropy():
    torch.manual_seed(0)
    hidden = torch.randn(2, 9, 16, requires_grad=True)
    head = torch.nn.Linear(16, 50, bias=False)
    labels = torch.randint(0, 50, (2, 9))
    labels[0, 3] = -100
    shift = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
    expected = torch.nn.functional.cross_entropy(head(hidden).reshape(-1, 50).float(), shift.reshape(-1))
    got = chunked_causal_lm_loss(hidden, head, labels, chunk_tokens=4)
    assert abs(got.item() - expected.item()) < 1e-6
    grad_expected, w_expected = torch.autograd.grad(expected, [hidden, head.weight])
    (grad_got,) = torch.autograd.grad(chunked_causal_lm_loss(hidden, head, labels, 4), hidden)
    assert (grad_got - grad_expected).abs().max() < 1e-7
    # the head's own weights get their gradient too (a trainable LM head)
    (w_got,) = torch.autograd.grad(chunked_causal_lm_loss(hidden, head, labels, 3), head.weight)
    assert (w_got - w_expected).abs().max() < 1e-7
