"""MEFT models built from configs: gradients, paths, freezing, the layer list's two faces."""

from __future__ import annotations

import copy
import gc
import inspect
import pickle
import weakref

import pytest
import torch
import transformers

from meft_convert.templates.adapters import MeftAdapter
from meft_convert.templates.configuration_meft import config_class_for
from meft_convert.templates.families import family_for
from meft_convert.templates.modeling_meft import MeftLayers, model_class_for
from meft_convert.templates.meft_table import packed_remainder_bytes
from tests.conftest import real_config
from tests.test_reversible import _SavedTracker, kept_bytes

HEADS = {
    "bert": ("bert-base-uncased", ["AutoModel", "AutoModelForSequenceClassification", "AutoModelForMaskedLM",
                                   "AutoModelForQuestionAnswering"]),
    "roberta": ("roberta-base", ["AutoModel", "AutoModelForSequenceClassification", "AutoModelForMaskedLM",
                                 "AutoModelForQuestionAnswering"]),
    "bart": ("bart-base", ["AutoModel", "AutoModelForSeq2SeqLM", "AutoModelForSequenceClassification",
                           "AutoModelForQuestionAnswering"]),
    "opt-125m": ("opt-125m", ["AutoModel", "AutoModelForCausalLM", "AutoModelForSequenceClassification"]),
    "opt-350m": ("opt-350m", ["AutoModelForCausalLM"]),
    "llama": ("tinyllama-1.1b", ["AutoModel", "AutoModelForCausalLM", "AutoModelForSequenceClassification"]),
    "mistral": ("mistral-7b-v0.1", ["AutoModelForCausalLM"]),
    "qwen2": ("qwen2-0.5b", ["AutoModelForCausalLM", "AutoModelForSequenceClassification"]),
    "gpt2": ("gpt2", ["AutoModel", "AutoModelForCausalLM", "AutoModelForSequenceClassification"]),
}


def build(config_name: str, auto_class: str, seed: int = 0, dtype=torch.float32, **settings):
    plm_config = real_config(config_name, **settings.pop("plm", {}))
    family = family_for(plm_config.model_type)
    values = plm_config.to_dict()
    for key in ("model_type", "transformers_version", "architectures"):
        values.pop(key, None)
    config = config_class_for(family)(**values, **settings)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = model_class_for(family, auto_class)(config)
    return model.to(dtype)


def batch(vocab: int = 1000):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    ids[0, 8], ids[1, 5], ids[2, 2] = 2, 2, 2  # one end-of-sequence token per row: BART's classifier reads it
    return ids, mask


def loss_of(model, auto_class, ids, mask):
    if auto_class in ("AutoModelForCausalLM", "AutoModelForSeq2SeqLM"):
        return model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
    if auto_class == "AutoModelForQuestionAnswering":
        positions = torch.tensor([1, 2, 0], device=ids.device)
        return model(input_ids=ids, attention_mask=mask, start_positions=positions, end_positions=positions + 1).loss
    if auto_class == "AutoModelForSequenceClassification":
        return model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1, 1], device=ids.device)).loss
    if auto_class == "AutoModelForMaskedLM":
        return model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
    out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(out.device, out.dtype)
    return (out * weights * mask[..., None]).sum()


def gradients(model, auto_class, mode, seed=5):
    model.train()
    model.zero_grad(set_to_none=True)
    ids, mask = batch()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        with model.meft_backward(mode):
            loss = loss_of(model, auto_class, ids, mask)
        loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


CASES = [(name, auto) for name, (_, autos) in HEADS.items() for auto in autos]


def assert_reversible_equals_plain_autograd(model, auto_class) -> dict:
    """Same loss and the same gradients, bit for bit, from the reversible backward and plain
    autograd through the same couplings; returns the reversible gradients."""
    loss_v, vanilla = gradients(model, auto_class, "vanilla")
    loss_r, reversible = gradients(model, auto_class, "reversible")
    assert torch.equal(loss_v, loss_r)
    assert set(vanilla) == set(reversible) and len(reversible) >= 4
    for key in vanilla:
        assert torch.equal(vanilla[key], reversible[key]), key
    return reversible


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("variant", ["meft1", "meft2", "meft3"])
@pytest.mark.parametrize("name,auto_class", CASES)
def test_reversible_gradients_equal_plain_autograd(name, auto_class, variant, dtype):
    # decoder-only classifiers find each row's last token through the pad token; LLaMA-like
    # configs ship without dropout, which is switched on here so that its replay is tested
    plm = {"pad_token_id": 0, **({"attention_dropout": 0.1} if name in ("llama", "mistral", "qwen2") else {})}
    model = build(HEADS[name][0], auto_class, dtype=dtype, variant=variant, plm=plm)
    reversible = assert_reversible_equals_plain_autograd(model, auto_class)
    # dropout was on: another seed gives other gradients
    other = gradients(model, auto_class, "reversible", seed=6)[1]
    assert any(not torch.equal(other[key], reversible[key]) for key in reversible)


# the memory-saving engine: int32 streams, and position-wise parts and stream arithmetic run
# 5 tokens at a time (the batch has 27), so every block is chunked
CHUNKED_INT32 = dict(stream_bits=32, frac_bits=20, recompute_chunk_tokens=5)
NO_DROPOUT = {
    "bert": dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
    "llama": {},
    "bart": dict(dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, classifier_dropout=0.0),
}


# every family with its richest head (the engine does not see heads), in bf16, the 16-bit
# models' dtype; fp32 for one encoder, one decoder and the encoder-decoder
CHUNKED_CASES = [(name, autos[1] if len(autos) > 1 else autos[0], torch.bfloat16) for name, (_, autos) in HEADS.items()] + [
    ("bert", "AutoModelForSequenceClassification", torch.float32), ("llama", "AutoModelForCausalLM", torch.float32),
    ("bart", "AutoModelForSeq2SeqLM", torch.float32),
]


# the families whose attention core can run a chunk of queries at a time (chunk_attention_queries)
QUERY_CHUNKS = ("opt-125m", "opt-350m", "llama", "mistral", "qwen2")


@pytest.mark.parametrize("variant", ["meft1", "meft2", "meft3"])
@pytest.mark.parametrize("name,auto_class,dtype,queries", [
    *((*case, False) for case in CHUNKED_CASES), *((*case, True) for case in CHUNKED_CASES if case[0] in QUERY_CHUNKS),
])
def test_chunked_int32_gradients_equal_plain_autograd(name, auto_class, variant, dtype, queries):
    plm = {"pad_token_id": 0, **({"attention_dropout": 0.1} if name in ("llama", "mistral", "qwen2") else {})}
    model = build(HEADS[name][0], auto_class, dtype=dtype, variant=variant, plm=plm, chunk_attention_queries=queries,
                  **CHUNKED_INT32)
    [stack] = model.meft_stacks if name != "bart" else model.meft_stacks[:1]
    causal = [b.causal for c in stack.couplings(split=True) for b in (c.F, c.G) if b.before is not None]
    assert len(causal) == (len(stack) if name in QUERY_CHUNKS else 0)
    assert all((core is not None) == queries for core in causal)
    assert_reversible_equals_plain_autograd(model, auto_class)
    # without dropout (whose masks depend on how the tokens are split), chunking changes only
    # the order of sums: the same gradients as all tokens at once, in fp32
    if dtype == torch.float32:
        no_dropout = dict(pad_token_id=0, **NO_DROPOUT[name])
        chunked, whole = (
            build(HEADS[name][0], auto_class, variant=variant, plm=no_dropout, chunk_attention_queries=queries,
                  **dict(CHUNKED_INT32, recompute_chunk_tokens=n))
            for n in (5, 0)
        )
        loss_r, reversible = gradients(chunked, auto_class, "reversible")
        loss_w, unchunked = gradients(whole, auto_class, "reversible")
        assert torch.allclose(loss_w, loss_r, rtol=1e-6, atol=0)
        # relative to each tensor's size, or to the largest gradient where one sums to almost nothing
        largest = max(g.abs().max() for g in unchunked.values())
        for key in unchunked:
            scale = max(unchunked[key].abs().max(), 1e-3 * largest)
            assert (unchunked[key] - reversible[key]).abs().max() <= 1e-5 * scale, key


def test_plm_is_frozen_and_adapters_and_new_heads_train():
    model = build("bert-base-uncased", "AutoModelForSequenceClassification", variant="meft1", adapter_dim=4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    # MEFT1 returns the PLM stream: the top layer's G adapter writes the dropped one and stays frozen
    top = f"bert.encoder.layer.{len(model.meft_layers) - 1}.meft.coupling"
    assert trainable == {n for n, m in model.named_modules() if isinstance(m, MeftAdapter) and n != top for n in
                         (f"{n}.down_proj.weight", f"{n}.down_proj.bias", f"{n}.up_proj.weight", f"{n}.up_proj.bias")} | {
        "classifier.weight", "classifier.bias"}
    assert all(".meft.ffn." in n or ".meft.coupling." in n or n.startswith("classifier") for n in trainable)
    n_trainable, total = model.get_nb_trainable_parameters()
    assert n_trainable == sum(p.numel() for n, p in model.named_parameters() if n in trainable) and total > n_trainable
    lm = build("opt-125m", "AutoModelForCausalLM")
    assert not lm.lm_head.weight.requires_grad  # tied to the frozen embeddings


def test_layer_list_is_an_ordinary_list_outside_its_owners_forward():
    model = build("opt-125m", "AutoModelForCausalLM")
    layers = model.model.decoder.layers
    assert isinstance(layers, MeftLayers) and len(layers) == 2
    assert [type(layer).__name__ for layer in layers] == ["OPTDecoderLayer"] * 2
    assert type(layers[0:1]).__name__ == "ModuleList" and len(layers[0:1]) == 1
    names = [n for n, _ in model.named_parameters()]
    assert "model.decoder.layers.1.fc1.weight" in names and "model.decoder.layers.1.meft.attn.up_proj.weight" in names


def test_eval_and_no_grad_use_the_plain_float_coupling():
    model = build("bert-base-uncased", "AutoModel", variant="meft3")
    ids, mask = batch()
    model.train()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model.eval()
        with torch.no_grad():
            plain = model(input_ids=ids, attention_mask=mask).last_hidden_state
        model.train()
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        for layer in model.encoder.layer:
            layer.attention.self.dropout.p = 0.0
        model.config.attention_probs_dropout_prob = 0.0
        exact = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert exact.grad_fn is not None
    assert (exact - plain).abs().max() < 1e-5


@pytest.mark.parametrize("copier", [copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m))], ids=["deepcopy", "pickle"])
def test_copies_keep_working(copier):
    model = build("opt-125m", "AutoModelForCausalLM")
    clone = copier(model)
    ids, mask = batch()
    clone.eval()
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, clone(input_ids=ids, attention_mask=mask).logits)
    clone.train()
    loss_of(clone, "AutoModelForCausalLM", ids, mask).backward()  # its own hooks, its own stack
    assert all(p.grad is not None for n, p in clone.named_parameters() if ".meft.attn." in n)


def test_couplings_are_built_once_and_again_when_what_trains_changes(monkeypatch):
    """A training step reuses the layers' couplings (building them is host time); freezing a
    parameter builds them again without it, and a dropped model takes its couplings with it."""
    model = build("opt-125m", "AutoModelForCausalLM")
    stack = model.meft_layers
    built = []
    build_couplings = type(stack)._build_couplings
    monkeypatch.setattr(type(stack), "_build_couplings", lambda self, *a: built.append(a) or build_couplings(self, *a))
    ids, mask = batch()
    model.train()
    for _ in range(3):
        loss_of(model, "AutoModelForCausalLM", ids, mask).backward()
    assert built == [(False, True)]
    trained = stack.couplings(split=True)
    assert stack.couplings(split=True) is trained and len(trained) == len(stack)
    frozen = next(p for n, p in model.named_parameters() if n.endswith("layers.0.meft.attn.up_proj.weight"))
    assert any(q is frozen for q in trained[0].params)
    frozen.requires_grad_(False)
    rebuilt = stack.couplings(split=True)
    assert len(built) == 2 and not any(q is frozen for q in rebuilt[0].params) and len(rebuilt[0].params) == len(trained[0].params) - 1
    dropped = weakref.ref(stack)
    del model, stack, trained, rebuilt, frozen
    gc.collect()
    assert dropped() is None


@pytest.mark.parametrize("k", [0, 1])
def test_hybrid_reversible_layers(k):
    model = build("opt-125m", "AutoModelForCausalLM", reversible_layers=k)
    loss_v, vanilla = gradients(model, "AutoModelForCausalLM", "vanilla")
    loss_r, hybrid = gradients(model, "AutoModelForCausalLM", "reversible")
    assert torch.equal(loss_v, loss_r)
    for key in vanilla:
        assert torch.equal(vanilla[key], hybrid[key])


def test_small_scales_and_zero_adapters_keep_the_starting_point():
    ids, mask = batch()
    torch.manual_seed(0)
    plm_config = real_config("opt-125m")
    original = transformers.OPTForCausalLM(plm_config).eval()
    for variant, scales in {"meft1": (2**-16, 2**-16), "meft2": (1.0, 2**-16), "meft3": (2**-16, 2**-16)}.items():
        model = build("opt-125m", "AutoModelForCausalLM", variant=variant, lambda_=scales[0], beta=scales[1], adapter_init="zero")
        model.load_state_dict(original.state_dict(), strict=False)
        model.eval()
        with torch.no_grad():
            a = original(input_ids=ids, attention_mask=mask).logits
            b = model(input_ids=ids, attention_mask=mask).logits
        assert torch.equal(a.argmax(-1), b.argmax(-1))
        assert (a - b).abs().max() < 1e-5, variant  # measured 5.0e-7 to 1.8e-6; the largest logit is 0.055


def test_output_stream_mean_is_the_average_of_the_streams():
    plm = build("bert-base-uncased", "AutoModel", output_stream="plm").eval()
    mean = build("bert-base-uncased", "AutoModel", output_stream="mean").eval()
    ids, mask = batch()
    with torch.no_grad():
        a = plm(input_ids=ids, attention_mask=mask).last_hidden_state
        b = mean(input_ids=ids, attention_mask=mask).last_hidden_state
    assert not torch.allclose(a, b)


def test_a_filled_cache_cannot_be_trained_on():
    model = build("opt-125m", "AutoModelForCausalLM").eval()
    ids, mask = batch()
    # the cache argument is `cache` from transformers 5.2x, `past_key_values` before
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
    cache = out[name] if name in out else out["past_key_values"]
    assert cache.get_seq_length() == ids.shape[1]
    model.train()
    with pytest.raises(ValueError, match="KV cache"):
        model(input_ids=ids[:, :1], use_cache=True, **{name: cache})


def saved_bytes(layers: int) -> tuple[int, int]:
    model = build("bert-base-uncased", "AutoModel", plm={"num_hidden_layers": layers, "hidden_dropout_prob": 0.1})
    model.train()
    tracker = _SavedTracker(model.parameters())
    ids = torch.randint(3, 1000, (4, 64), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(tracker.pack, tracker.unpack):
        out = model(input_ids=ids).last_hidden_state
    node = next(n for n in _graph(out.grad_fn) if type(n).__name__ == "_ReversibleStackBackward")
    return tracker.live_bytes(), kept_bytes(node.run)


def _graph(node, seen=None):
    seen = set() if seen is None else seen
    if node is None or node in seen:
        return
    seen.add(node)
    yield node
    for next_node, _ in node.next_functions:
        yield from _graph(next_node, seen)


def test_saved_bytes_grow_with_depth_by_the_remainders_only():
    saved2, kept2 = saved_bytes(2)
    saved8, kept8 = saved_bytes(8)
    remainders_per_layer = 2 * packed_remainder_bytes(10, 4 * 64 * 32)
    assert saved8 - saved2 == 6 * remainders_per_layer
    assert (kept8 - kept2) / 6 <= 16 * 1024  # RNG states and a checksum per layer, whatever the batch


def test_eval_mode_with_gradients_keeps_the_exact_reversible_path():
    """model.eval() with gradients on (dropout off, as some training loops do) trains through the
    exact reversible layers: the same gradients as plain autograd, bit for bit."""
    model = build("tinyllama-1.1b", "AutoModelForCausalLM", variant="meft3", adapter_init="paper")
    model.eval()
    ids, mask = batch()
    grads = {}
    for mode in ("vanilla", "reversible"):
        model.zero_grad(set_to_none=True)
        with model.meft_backward(mode):
            loss_of(model, "AutoModelForCausalLM", ids, mask).backward()
        grads[mode] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads["vanilla"].keys() == grads["reversible"].keys() and len(grads["vanilla"]) >= 4
    assert all(torch.equal(grads["vanilla"][n], grads["reversible"][n]) for n in grads["vanilla"])
    layer = model.model.layers
    assert layer.training is False


@pytest.mark.parametrize("name,auto_class", [("llama", "AutoModelForCausalLM"), ("bert", "AutoModel"), ("opt-125m", "AutoModel")])
def test_output_hidden_states_in_evaluation_and_refused_in_training(name, auto_class):
    model = build(HEADS[name][0], auto_class, variant="meft3", adapter_init="zero", lambda_=2.0**-16, beta=2.0**-16)
    model.eval()
    ids, mask = batch()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        plain = model(input_ids=ids, attention_mask=mask)
    # the original model with the same weights returns the same per-layer states (the adapters
    # start at zero and λ = β = 2^-16 keep the starting point)
    original = getattr(transformers, auto_class).from_config(real_config(HEADS[name][0])).float()
    original.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        expected = original.eval()(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    assert len(out.hidden_states) == len(expected) == len(model.meft_layers) + 1
    for ours, theirs in zip(out.hidden_states, expected):
        assert ours.shape == theirs.shape
        cosine = torch.nn.functional.cosine_similarity(ours[mask.bool()], theirs[mask.bool()], dim=-1)
        assert cosine.min() > 0.9999
    assert all(not torch.equal(a, b) for a, b in zip(out.hidden_states[:-1], out.hidden_states[1:-1]))
    # the run with hidden states computes what the plain run does
    final = out.logits if auto_class == "AutoModelForCausalLM" else out.last_hidden_state
    assert torch.equal(final, plain.logits if auto_class == "AutoModelForCausalLM" else plain.last_hidden_state)
    model.train()
    with pytest.raises(ValueError, match="output_hidden_states=True while training"):
        model(input_ids=ids, attention_mask=mask, output_hidden_states=True)


def test_device_map_that_splits_the_reversible_layers_is_refused(tmp_path):
    model = build("tinyllama-1.1b", "AutoModelForCausalLM", variant="meft3")
    model.save_pretrained(tmp_path / "model")
    cls = type(model)
    split = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": "cpu",
             "model.rotary_emb": "cpu", "lm_head": "cpu"}
    with pytest.raises(ValueError, match=r"several devices .*device_map=\{'': 0\}"):
        cls.from_pretrained(tmp_path / "model", device_map=split, offload_folder=str(tmp_path / "offload"))
    loaded = cls.from_pretrained(tmp_path / "model", device_map={"": "cpu"})
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}


def test_offloading_remainders_is_decided_by_the_step_size():
    from meft_convert.templates.modeling_meft import OFFLOAD_MIN_TOKENS, offload_wanted

    assert offload_wanted("auto", OFFLOAD_MIN_TOKENS, on_cuda=True)
    assert not offload_wanted("auto", OFFLOAD_MIN_TOKENS - 1, on_cuda=True)
    assert not offload_wanted("auto", 10**6, on_cuda=False) and not offload_wanted(True, 10**6, on_cuda=False)
    assert offload_wanted(True, 1, on_cuda=True) and not offload_wanted(False, 10**6, on_cuda=True)
    model = build("tinyllama-1.1b", "AutoModelForCausalLM", variant="meft3")
    assert model.config.offload_remainders == "auto" and model.meft_layers.offload_remainders == "auto"


@pytest.mark.parametrize("name,variant", [("llama", "meft1"), ("opt-125m", "meft2"), ("gpt2", "meft3")])
def test_disable_adapter_gives_the_model_with_silent_adapters_exactly(converted, name, variant):
    """Inside disable_adapter() every adapter outputs zeros: the logits are bit for bit those of
    the same model with its up-projections zeroed (adapters that output exactly zero), and outside
    they are the trained adapters' again."""
    folder, _ = converted(name, variant, adapter_init="paper", allow_low_fidelity=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    ids = torch.randint(4, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with_adapters = model(input_ids=ids).logits
        with model.disable_adapter():
            with model.disable_adapter():  # nested: restores what it found
                pass
            disabled = model(input_ids=ids).logits
        again = model(input_ids=ids).logits
        ups = [m.up_proj for m in model.modules() if type(m).__name__ == "MeftAdapter"]
        assert ups and all(p.abs().sum() > 0 for p in (u.weight for u in ups))
        for up in ups:
            up.weight.zero_()
            up.bias.zero_()
        silent = model(input_ids=ids).logits
    assert torch.equal(disabled, silent)
    assert torch.equal(again, with_adapters) and not torch.equal(with_adapters, disabled)
