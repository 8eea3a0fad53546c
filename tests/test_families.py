"""Each family description splits the library's own layer into blocks that recompose it bit for bit."""

from __future__ import annotations

import inspect

import pytest
import torch
import transformers

from meft_convert.templates.families import FAMILIES, family_for
from meft_convert.templates.blocks import Rows
from tests.conftest import real_config

CASES = {
    "bert": ("bert-base-uncased", "BertModel"),
    "opt-125m (pre-LN)": ("opt-125m", "OPTModel"),
    "opt-350m (post-LN)": ("opt-350m", "OPTModel"),
    "llama": ("tinyllama-1.1b", "LlamaModel"),
    "mistral (sliding window)": ("mistral-7b-v0.1", "MistralModel"),
    "qwen2": ("qwen2-0.5b", "Qwen2Model"),
    "gpt2": ("gpt2", "GPT2Model"),
    "roberta": ("roberta-base", "RobertaModel"),
    "bart (encoder and decoder)": ("bart-base", "BartModel"),
}


def _layer_call(base, family, layers, padded: bool = True):
    """Runs the base model once, recording the arguments its loop passes to layer 0."""
    captured = {}

    def hook(module, args, kwargs):
        captured["args"], captured["kwargs"] = args, kwargs

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    ids = torch.randint(3, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1] * 8, [1] * 6 + [0] * 2] if padded else [[1] * 8] * 2)
    with torch.random.fork_rng():
        torch.manual_seed(1)
        base(input_ids=ids, attention_mask=mask)
    handle.remove()
    bound = inspect.signature(layers[0].forward).bind(*captured["args"], **captured["kwargs"]).arguments
    hidden = bound.pop("hidden_states")
    extra = bound.pop("kwargs", {})
    args = {**bound, **extra}
    # the loop's cache was filled by that run; the layers are called again below
    return hidden, {k: None if isinstance(v, transformers.Cache) else v for k, v in args.items()}


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train-with-dropout"])
@pytest.mark.parametrize("case", list(CASES))
def test_blocks_recompose_the_library_layer_bitwise(case, training):
    config_name, base_class = CASES[case]
    config = real_config(config_name, architectures=[base_class])
    torch.manual_seed(0)
    base = getattr(transformers, base_class)(config)
    base.train(training)
    family = family_for(config.model_type)
    for stack in family.stacks:
        layers = base.get_submodule(stack.layers)
        hidden, args = _layer_call(base, family, layers)
        for layer in layers:
            with torch.random.fork_rng():
                torch.manual_seed(7)
                expected = layer(hidden, **args)
            with torch.random.fork_rng():
                torch.manual_seed(7)
                got = stack.mlp(layer, stack.attention(layer, hidden, args, None), None)
            assert torch.equal(expected, got)
            if stack.attention_parts is not None:
                parts, whole = stack.attention_parts, Rows(slice(None), tuple(hidden.shape[:-1]))
                with torch.random.fork_rng():
                    torch.manual_seed(7)
                    core = parts.core(layer, parts.inputs(layer, hidden, args, whole), args)
                    got = stack.mlp(layer, parts.finish(layer, core, hidden, None), None)
                assert torch.equal(expected, got)
            hidden = expected


@pytest.mark.parametrize("case", ["llama", "mistral (sliding window)", "qwen2", "opt-125m (pre-LN)", "opt-350m (post-LN)"])
def test_attention_inputs_computed_a_few_rows_at_a_time_are_the_whole_sequence(case):
    config_name, base_class = CASES[case]
    config = real_config(config_name, architectures=[base_class], sliding_window=5) if "mistral" in case else real_config(
        config_name, architectures=[base_class]
    )
    torch.manual_seed(0)
    base = getattr(transformers, base_class)(config).double().eval()
    stack = family_for(config.model_type).stacks[0]
    layer = base.get_submodule(stack.layers)[0]
    hidden, args = _layer_call(base, family_for(config.model_type), base.get_submodule(stack.layers))
    hidden = hidden.double()
    if "position_embeddings" in args:
        args["position_embeddings"] = tuple(t.double() for t in args["position_embeddings"])
    lead = tuple(hidden.shape[:-1])
    whole = stack.attention_parts.inputs(layer, hidden, args, Rows(slice(None), lead))
    rows = hidden.reshape(-1, hidden.shape[-1])
    for chunk in (slice(0, 3), slice(3, 11), slice(11, 16)):  # 2 x 8 positions; the second crosses sequences
        part = stack.attention_parts.inputs(layer, rows[chunk], args, Rows(chunk, lead))
        for got, expected in zip(part, whole):
            assert torch.allclose(got, expected.reshape(-1, expected.shape[-1])[chunk], rtol=1e-12, atol=1e-12)


def test_every_block_the_table_names_is_a_kernel():
    """The table names its blocks (families._block); family_kernels.py defines them."""
    from meft_convert.templates import families
    from meft_convert.templates.family_kernels import BLOCKS

    for family in FAMILIES.values():
        for stack in family.stacks:
            parts = stack.attention_parts
            named = [stack.attention, stack.mlp]
            if parts is not None:
                named += [parts.inputs, getattr(parts.core, "func", parts.core), parts.finish, parts.causal]
            for block in named:
                if block is not None:
                    assert BLOCKS[block.__name__].__name__ == block.__name__, (family.model_type, block.__name__)
    with pytest.raises(KeyError, match="no_such_block"):
        families._block("no_such_block")()


def test_unknown_model_type_lists_the_supported_ones():
    with pytest.raises(ValueError, match="supported: " + ", ".join(sorted(FAMILIES))):
        family_for("gpt_neox")


def test_heads_are_found_by_auto_class_or_library_class():
    opt = family_for("opt")
    assert opt.head_for("AutoModelForCausalLM").library_class == "OPTForCausalLM"
    with pytest.raises(KeyError, match=r"opt models have no AutoModelForMaskedLM head; their heads: AutoModel \(OPTModel\)"):
        opt.head_for("AutoModelForMaskedLM")
    assert opt.auto_class_of("OPTForSequenceClassification") == "AutoModelForSequenceClassification"
    assert opt.auto_class_of("BertModel") is None


def test_bert_decoder_is_refused():
    config = real_config("bert-base-uncased", is_decoder=True)
    assert "decoder" in family_for("bert").unsupported(config)


def test_mixed_attention_layer_types_are_refused():
    """Qwen2 with sliding windows on some layers only: MEFT runs all layers with one mask."""
    config = real_config("qwen2-0.5b", use_sliding_window=True, sliding_window=4, max_window_layers=1)
    assert set(config.layer_types) == {"full_attention", "sliding_attention"}
    assert "different attention types" in family_for("qwen2").unsupported(config)
    assert family_for("qwen2").unsupported(real_config("qwen2-0.5b")) is None


@pytest.mark.parametrize("case", list(CASES))
def test_fsdp_units_hold_every_weight_matrix_and_are_called_as_modules(case):
    """What FSDP2 needs of a unit: the blocks call it as a module, once per block run (its hooks
    gather its shards), and no weight matrix of the layer is used outside the units."""
    config_name, base_class = CASES[case]
    config = real_config(config_name, architectures=[base_class])
    torch.manual_seed(0)
    base = getattr(transformers, base_class)(config).train()
    for stack in family_for(config.model_type).stacks:
        assert stack.fsdp_units
        layers = base.get_submodule(stack.layers)
        hidden, args = _layer_call(base, family_for(config.model_type), layers)
        for layer in layers:
            units = [layer.get_submodule(path) for path in stack.fsdp_units]
            in_units = {id(p) for unit in units for p in unit.parameters()}
            matrices = [name for name, p in layer.named_parameters() if p.dim() >= 2]
            assert matrices and all(id(layer.get_parameter(name)) in in_units for name in matrices), matrices
            calls = [0] * len(units)
            handles = [unit.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1)) for i, unit in enumerate(units)]
            stack.mlp(layer, stack.attention(layer, hidden, args, None), None)
            for handle in handles:
                handle.remove()
            assert calls == [1] * len(units), dict(zip(stack.fsdp_units, calls))


@pytest.mark.parametrize("padded", [True, False], ids=["padding-mask", "no-mask"])
@pytest.mark.parametrize("case", ["llama", "mistral (sliding window)", "qwen2", "opt-125m (pre-LN)", "opt-350m (post-LN)"])
def test_causal_core_a_chunk_of_queries_at_a_time_is_the_whole_core(case, padded):
    config_name, base_class = CASES[case]
    extra = {"sliding_window": 5} if "mistral" in case else {}
    config = real_config(config_name, architectures=[base_class], **extra)
    torch.manual_seed(0)
    base = getattr(transformers, base_class)(config).double().eval()
    stack = family_for(config.model_type).stacks[0]
    parts = stack.attention_parts
    layer = base.get_submodule(stack.layers)[0]
    assert parts.causal_core(layer) is not None  # SDPA, the library's default
    hidden, args = _layer_call(base, family_for(config.model_type), base.get_submodule(stack.layers), padded)
    # without padding the model leaves causal masking to the kernel (no mask), except where a
    # sliding window shorter than the sequence needs one
    assert (args.get("attention_mask") is None) == (not padded and "mistral" not in case)
    hidden = hidden.double()
    if "position_embeddings" in args:
        args["position_embeddings"] = tuple(t.double() for t in args["position_embeddings"])
    lead = tuple(hidden.shape[:-1])
    whole_rows = Rows(slice(None), lead)
    inputs = parts.inputs(layer, hidden, args, whole_rows)
    expected = parts.core(layer, inputs, args).reshape(16, -1)
    flat = [t.reshape(16, -1) for t in inputs]
    queries = [t for j, t in enumerate(flat) if j not in parts.context]
    context = [flat[j] for j in parts.context]
    # 2 x 8 positions: chunks inside one sequence, across the two, and of both whole sequences
    for chunks in ([slice(0, 3), slice(3, 11), slice(11, 16)], [slice(0, 8), slice(8, 16)], [slice(0, 16)],
                   [slice(i, i + 1) for i in range(16)]):
        got = []
        for chunk in chunks:
            rows = Rows(chunk, lead)
            got.append(parts.causal(layer, tuple(t[chunk] for t in queries), tuple(t[rows.context] for t in context),
                                    args, rows))
        assert torch.allclose(torch.cat(got), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_mlp_in_training_is_the_library_mlp_bitwise_and_keeps_no_silu(dtype):
    from meft_convert.templates.family_kernels import _gated_mlp

    config = real_config("tinyllama-1.1b", hidden_size=64, intermediate_size=224)
    mlp = transformers.models.llama.modeling_llama.LlamaMLP(config).to(dtype).requires_grad_(False)
    x, grad = torch.randn(37, 64, dtype=dtype), torch.randn(37, 64, dtype=dtype)
    results = []
    for run in (mlp, lambda t: _gated_mlp(mlp, t)):
        leaf = x.clone().requires_grad_()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
            out = run(leaf)
        out.backward(grad)
        results.append((out, leaf.grad, [s for s in saved if s == (37, 224)]))
    (lib_out, lib_grad, lib_saved), (out, grad_in, ours_saved) = results
    assert torch.equal(out, lib_out) and torch.equal(grad_in, lib_grad)
    # autograd keeps gate, silu(gate) and up; SiluProduct keeps gate and up and lets go of them in backward
    assert len(lib_saved) == 3 and ours_saved == []
    # anything hooked (FSDP2 gathers a unit's shards in a forward pre-hook) gets the module called
    calls = []
    handle = mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    _gated_mlp(mlp, x.clone().requires_grad_())
    handle.remove()
    assert calls == [1]


def _math_kernel(q, k, v, causal, scale):
    """An attention kernel's contract (output, log-sum-exp, state), in plain maths."""
    k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    scores = q @ k.transpose(-1, -2) * scale
    if causal:  # upper-left, as cuDNN aligns it
        scores = scores.masked_fill(~torch.ones(scores.shape[-2:], dtype=torch.bool).tril(), float("-inf"))
    lse = scores.logsumexp(-1)
    return torch.exp(scores - lse[..., None]) @ v, lse, scores


def _math_kernel_backward(grad, q, k, v, out, lse, scores, causal, scale):
    """A flash-style backward from the output and log-sum-exp it is handed (the merged ones)."""
    group = q.shape[1] // k.shape[1]
    kr, vr = (t.repeat_interleave(group, dim=1) for t in (k, v))
    p = torch.exp(scores - lse[..., None])
    ds = p * (grad @ vr.transpose(-1, -2) - (grad * out).sum(-1, keepdim=True))
    unrepeat = lambda t: t.unflatten(1, (k.shape[1], group)).sum(2)  # noqa: E731
    return ds @ kr * scale, unrepeat(ds.transpose(-1, -2) @ q * scale), unrepeat(p.transpose(-1, -2) @ grad)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_split_causal_attention_is_lower_right_causal_attention_with_its_gradients(kv_heads):
    from torch.nn.attention.bias import causal_lower_right

    from meft_convert.templates.family_kernels import _split_causal

    gen = torch.Generator().manual_seed(0)
    start, count, heads, dim = 12, 5, 4, 8
    q = torch.randn(2, heads, count, dim, dtype=torch.float64, generator=gen, requires_grad=True)
    k, v = (torch.randn(2, kv_heads, start + count, dim, dtype=torch.float64, generator=gen, requires_grad=True)
            for _ in range(2))
    grad = torch.randn(2, heads, count, dim, dtype=torch.float64, generator=gen)
    got = _split_causal().apply(q, k, v, start, dim**-0.5, _math_kernel, _math_kernel_backward)
    got_grads = torch.autograd.grad(got, (q, k, v), grad)
    want = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=causal_lower_right(count, start + count), scale=dim**-0.5, enable_gqa=kv_heads != heads)
    want_grads = torch.autograd.grad(want, (q, k, v), grad)
    for a, b in zip((got, *got_grads), (want, *want_grads)):
        assert a.shape == b.shape
        assert (a - b).abs().max().item() < 1e-12
    assert (got - want.detach()).abs().max().item() < 1e-12
    from meft_convert.templates.family_kernels import _split_causal_runs

    assert not _split_causal_runs(q, k)  # CPU: SDPA's own kernels
