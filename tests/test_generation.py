"""Decoders after conversion: next-token agreement with the original and generate() with a KV cache."""

from __future__ import annotations

import pytest
import torch
import transformers

from meft_convert.convert import ConvertOptions, convert

DECODERS = ["opt-125m", "opt-350m", "llama", "mistral", "qwen2", "gpt2"]
# scales that keep the starting point: both small, except MEFT2's λ, which scales the
# stream its PLM layer reads and has to stay 1
TINY_SCALES = {"meft1": (2**-16, 2**-16), "meft2": (1.0, 2**-16), "meft3": (2**-16, 2**-16)}


@pytest.fixture(scope="module")
def near_identity(tiny_checkpoints, session_dir):
    """(checkpoint, variant) -> (original, converted) causal LMs, eval mode, fp32."""
    cache = {}

    def get(name, variant):
        if (name, variant) not in cache:
            lambda_, beta = TINY_SCALES[variant]
            out = convert(
                ConvertOptions(
                    model=str(tiny_checkpoints[name]), output=session_dir / "near-identity" / f"{name}-{variant}",
                    variant=variant, lambda_=lambda_, beta=beta, adapter_init="zero", output_stream="plm",
                    verify=False, show_progress=False,
                ),
                log=lambda _: None,
            )
            auto = transformers.AutoModelForCausalLM
            original = auto.from_pretrained(tiny_checkpoints[name], dtype=torch.float32).eval()
            converted = auto.from_pretrained(out, dtype=torch.float32, trust_remote_code=True).eval()
            cache[name, variant] = original, converted
        return cache[name, variant]

    return get


def left_padded_prompts(vocab: int = 1000, pad: int = 0):
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(5, vocab, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    mask[2, :9] = 0
    return ids.masked_fill(mask == 0, pad), mask


@pytest.mark.parametrize("variant", list(TINY_SCALES))
@pytest.mark.parametrize("name", DECODERS)
def test_next_token_top1_agrees_on_every_position(near_identity, name, variant):
    original, converted = near_identity(name, variant)
    ids = torch.randint(5, 1000, (5, 60), generator=torch.Generator().manual_seed(1))  # 300 positions
    with torch.no_grad():
        a, b = original(input_ids=ids).logits, converted(input_ids=ids).logits
    assert torch.equal(a.argmax(-1), b.argmax(-1))
    # measured 1.5e-8 (OPT-350m, MEFT1) to 2.0e-5 (Mistral, MEFT3), the largest logits 0.06 to 0.9
    assert (a - b).abs().max() < 1e-4


@pytest.mark.parametrize("variant", list(TINY_SCALES))
@pytest.mark.parametrize("name", DECODERS)
def test_greedy_generation_reproduces_the_original_with_and_without_cache(near_identity, name, variant):
    original, converted = near_identity(name, variant)
    pad = original.config.pad_token_id if original.config.pad_token_id is not None else original.config.eos_token_id
    ids, mask = left_padded_prompts(pad=pad)
    settings = dict(attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=pad)
    expected = original.generate(ids, **settings)
    cached = converted.generate(ids, **settings)
    uncached = converted.generate(ids, use_cache=False, **settings)
    assert expected.shape[1] == ids.shape[1] + 16
    assert torch.equal(cached, expected)
    assert torch.equal(uncached, cached)


@pytest.mark.parametrize("name", ["opt-125m", "llama", "gpt2"])
def test_sampling_is_reproducible(near_identity, name):
    _, converted = near_identity(name, "meft3")
    ids, mask = left_padded_prompts(pad=converted.config.eos_token_id)
    runs = []
    for _ in range(2):
        with torch.random.fork_rng():
            torch.manual_seed(3)
            runs.append(converted.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=True, top_k=20,
                                           pad_token_id=converted.config.eos_token_id))
    assert torch.equal(runs[0], runs[1]) and runs[0].shape == (3, 20)


@pytest.fixture(scope="module")
def near_identity_bart(tiny_checkpoints, session_dir):
    cache = {}

    def get(variant):
        if variant not in cache:
            lambda_, beta = TINY_SCALES[variant]
            out = convert(
                ConvertOptions(
                    model=str(tiny_checkpoints["bart"]), output=session_dir / "near-identity" / f"bart-{variant}",
                    variant=variant, lambda_=lambda_, beta=beta, adapter_init="zero", task="seq2seq-lm",
                    verify=False, show_progress=False,
                ),
                log=lambda _: None,
            )
            auto = transformers.AutoModelForSeq2SeqLM
            original = auto.from_pretrained(tiny_checkpoints["bart"], dtype=torch.float32).eval()
            converted = auto.from_pretrained(out, dtype=torch.float32, trust_remote_code=True).eval()
            cache[variant] = original, converted
        return cache[variant]

    return get


@pytest.mark.parametrize("variant", list(TINY_SCALES))
def test_bart_teacher_forced_loss_matches_the_original(near_identity_bart, variant):
    original, converted = near_identity_bart(variant)
    ids, mask = left_padded_prompts(pad=original.config.pad_token_id)
    labels = torch.randint(5, 1000, (3, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a = original(input_ids=ids, attention_mask=mask, labels=labels).loss
        b = converted(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert abs(a - b) <= 1e-4 * abs(a)


@pytest.mark.parametrize("variant", list(TINY_SCALES))
def test_bart_greedy_generation_reproduces_the_original(near_identity_bart, variant):
    original, converted = near_identity_bart(variant)
    ids, mask = left_padded_prompts(pad=original.config.pad_token_id)
    # a random model says end-of-sequence early: ask for all twelve tokens
    settings = dict(attention_mask=mask, max_new_tokens=12, min_new_tokens=12, do_sample=False, num_beams=1)
    expected = original.generate(ids, **settings)
    cached = converted.generate(ids, **settings)
    uncached = converted.generate(ids, use_cache=False, **settings)
    assert expected.shape[1] >= 12
    assert torch.equal(cached, expected) and torch.equal(uncached, cached)


def test_bart_sampling_runs_with_the_cache(near_identity_bart):
    _, converted = near_identity_bart("meft3")
    ids, mask = left_padded_prompts(pad=converted.config.pad_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        out = converted.generate(ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=True,
                                 num_beams=1, top_k=20)
    assert out.shape[0] == 3 and out.shape[1] >= 6
