"""What MEFT needs to know about each model family, in one table.

A family description says where the layers are (one stack, or two for an encoder-decoder),
how one layer splits into an attention block and an MLP block (each with its residual
connection and norm), where adapters go, and which task heads exist. The blocks call the PLM's own submodules in the order the
library's layer does, so with adapters off `mlp(attention(x))` is the library layer
bit for bit (tests check this). The converter and the checkpoint's code read this same
table; adding a family means adding one description here.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Callable


class _TorchOnFirstUse:
    """torch (or its submodule `name`), imported when one of its attributes is first read: the
    converter reads this table without torch; only the blocks, which run in a model, use it."""

    def __init__(self, name: str | None = None):
        self._name = name

    def __getattr__(self, attribute: str):
        import torch

        return getattr(getattr(torch, self._name) if self._name else torch, attribute)


torch, nn = _TorchOnFirstUse(), _TorchOnFirstUse("nn")


@dataclass(frozen=True)
class Head:
    """A task head: the transformers class that has it and the modules MEFT trains with the adapters."""

    library_class: str
    trainable: tuple[str, ...] = ()
    # listed in a converted checkpoint only if the original's tensors include this prefix
    requires_keys: str | None = None


@dataclass(frozen=True)
class AttentionParts:
    """The attention block in three parts, for training on long sequences: all but the core act
    on each position alone, so the engine runs them a chunk of tokens at a time and only the
    core sees the whole sequence. With adapters off, finish(core(inputs(x))) is `attention(x)`."""

    # inputs(layer, x, layer_args, rows): the core's inputs for x's positions (norm, q/k/v
    # projections, rotary embedding); `rows.take(t)` cuts x's rows out of a per-position argument
    inputs: Callable[[nn.Module, torch.Tensor, dict, object], tuple]
    # core(layer, inputs over the whole sequence, layer_args): attention proper, heads merged
    core: Callable[[nn.Module, tuple, dict], torch.Tensor]
    # finish(layer, core output, x, adapter): output projection, `adapter`, residual
    finish: Callable[[nn.Module, torch.Tensor, torch.Tensor, nn.Module | None], torch.Tensor]
    # causal(layer, queries, context, layer_args, rows): the core for one chunk of query rows
    # (the chunk's `inputs` outside `context`), reading the keys and values (`context`, on the
    # rows rows.context) of their sequences' earlier positions; (chunk rows, hidden)
    causal: Callable[[nn.Module, tuple, tuple, dict, object], torch.Tensor] | None = None
    context: tuple[int, ...] = (1, 2)  # which outputs of `inputs` are keys and values

    def causal_core(self, layer: nn.Module) -> Callable | None:
        """`causal` where the layer's attention runs through SDPA, whose kernels it calls."""
        config = getattr(getattr(layer, "self_attn", None), "config", None)
        if self.causal is None or getattr(config, "_attn_implementation", None) != "sdpa":
            return None
        return self.causal


@dataclass(frozen=True)
class Stack:
    """One list of layers and how each of its layers splits into two blocks."""

    layers: str  # path of the layer list inside the base model
    # attention(layer, x, layer_args, adapter): the attention block output, residual and norm included;
    # `adapter` (or None) is applied to the attention sublayer output, before the residual
    attention: Callable[[nn.Module, torch.Tensor, dict, nn.Module | None], torch.Tensor]
    # mlp(layer, x, adapter): the MLP block output; `adapter` (or None) runs parallel to the FFN
    mlp: Callable[[nn.Module, torch.Tensor, nn.Module | None], torch.Tensor]
    name: str = ""  # to tell the stacks of an encoder-decoder apart in messages ("encoder")
    # submodules of a layer (dotted paths) that the blocks call as modules and that hold its
    # weight matrices: FSDP2 can shard each as a unit of its own (MeftModelMixin.fsdp_units)
    fsdp_units: tuple[str, ...] = ()
    # `attention` in parts, where the family describes them (training uses them; evaluation and
    # generation, with their caches, call the library's attention through `attention`)
    attention_parts: AttentionParts | None = None


@dataclass(frozen=True)
class Family:
    model_type: str  # the PLM's config.model_type
    config_class: str  # its transformers config class
    stacks: tuple[Stack, ...]  # one for encoders and decoders, two for encoder-decoders
    norm: str  # "pre" or "post": where the layer normalises (documentation and reports)
    activation: Callable[[object], str]  # the PLM's activation name, used by its adapters
    dropout: Callable[[object], float]  # the PLM's hidden dropout, used by its adapters
    heads: dict[str, Head] = field(default_factory=dict)  # Auto class name -> head
    # returns why a config cannot be converted, or None
    unsupported: Callable[[object], str | None] = lambda config: None
    # the norm the base model applies after its last layer, to each position alone, where the
    # chunked loss runs it with the LM head a chunk at a time (an RMSNorm's float32 work)
    final_norm: str | None = None


def _without(args: dict, *names: str) -> dict:
    return {k: v for k, v in args.items() if k not in names}


def _library_function(attn: nn.Module, name: str):
    """A function of the modeling module the attention comes from (its own rotary embedding)."""
    return getattr(inspect.getmodule(type(attn)), name)


def _attention_interface(attn: nn.Module):
    """The attention kernel the library's attention module calls (SDPA, eager, flash, ...)."""
    functions = _library_function(attn, "ALL_ATTENTION_FUNCTIONS")
    return functions.get_interface(attn.config._attn_implementation, _library_function(attn, "eager_attention_forward"))


# ------------------------------------------------------------------------------------ BERT
# Post-LN: each sublayer is LayerNorm(x + dropout(sublayer(x))).


def _bert_attention(layer, x, args, adapter):
    attention = layer.attention
    # the cache (named `cache` or `past_key_values`, by transformers version) and any
    # attention kwargs pass through unchanged, as BertLayer passes them
    context, _ = attention.self(
        x,
        attention_mask=args.get("attention_mask"),
        **_without(args, "attention_mask", "encoder_hidden_states", "encoder_attention_mask"),
    )
    h = attention.output.dropout(attention.output.dense(context))
    if adapter is not None:
        h = h + adapter(h)
    return attention.output.LayerNorm(h + x)


def _bert_mlp(layer, x, adapter):
    h = layer.output.dropout(layer.output.dense(layer.intermediate(x)))
    if adapter is not None:
        h = h + adapter(x)  # parallel to the FFN: it reads the FFN's input
    return layer.output.LayerNorm(h + x)


def _bert_unsupported(config):
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        return "BERT used as a decoder (is_decoder / add_cross_attention) is not supported"
    return None


def _bert_like(model_type: str, prefix: str, mlm_keys: str) -> Family:
    return Family(
        model_type=model_type,
        config_class=f"{prefix}Config",
        stacks=(
            Stack(
                "encoder.layer", _bert_attention, _bert_mlp,
                fsdp_units=("attention.self", "attention.output.dense", "intermediate", "output.dense"),
            ),
        ),
        norm="post",
        activation=lambda config: config.hidden_act,
        dropout=lambda config: config.hidden_dropout_prob,
        heads={
            "AutoModel": Head(f"{prefix}Model"),
            "AutoModelForSequenceClassification": Head(f"{prefix}ForSequenceClassification", trainable=("classifier",)),
            "AutoModelForQuestionAnswering": Head(f"{prefix}ForQuestionAnswering", trainable=("qa_outputs",)),
            "AutoModelForMaskedLM": Head(f"{prefix}ForMaskedLM", requires_keys=mlm_keys),
        },
        unsupported=_bert_unsupported,
    )


BERT = _bert_like("bert", "Bert", "cls.predictions.")
# RoBERTa: BERT's layers under other class names; its position ids (offset by the padding
# index) are made by its embeddings, which MEFT leaves alone
ROBERTA = _bert_like("roberta", "Roberta", "lm_head.")


# ------------------------------------------------------------------------------------- OPT
# Pre-LN (x + dropout(sublayer(LN(x)))), except OPT-350m, which normalises after the
# residual like BERT: `do_layer_norm_before` tells them apart, as in OPTDecoderLayer.


def _opt_attention(layer, x, args, adapter):
    h = layer.self_attn_layer_norm(x) if layer.do_layer_norm_before else x
    h, _ = layer.self_attn(hidden_states=h, **_without(args, "use_cache"))
    return _opt_attention_residual(layer, h, x, adapter)


def _opt_attention_residual(layer, h, x, adapter):
    """From the attention sublayer's output h on: dropout, adapter, residual, post-LN norm."""
    h = nn.functional.dropout(h, p=layer.dropout, training=layer.training)
    if adapter is not None:
        h = h + adapter(h)
    h = x + h
    if not layer.do_layer_norm_before:
        h = layer.self_attn_layer_norm(h)
    return h


def _opt_attention_inputs(layer, x, args, rows):
    attn = layer.self_attn
    h = layer.self_attn_layer_norm(x) if layer.do_layer_norm_before else x
    # scaled before the attention, as the library's OPT does (and then asks for no scaling)
    return attn.q_proj(h) * attn.scaling, attn.k_proj(h), attn.v_proj(h)


def _opt_attention_core(layer, inputs, args):
    attn = layer.self_attn
    q, k, v = (t.view(*t.shape[:-1], attn.num_heads, attn.head_dim).transpose(1, 2) for t in inputs)
    interface = _attention_interface(attn)
    kwargs = _without(args, "use_cache", "cache", "past_key_values", "attention_mask", "output_attentions")
    h, _ = interface(
        attn, q, k, v, args.get("attention_mask"), dropout=0.0 if not attn.training else attn.dropout, scaling=1.0,
        **kwargs,
    )
    return h.reshape(*h.shape[:2], -1).contiguous()


def _opt_attention_chunk(layer, queries, context, args, rows):
    attn = layer.self_attn
    dropout = attn.dropout if attn.training else 0.0
    # q is scaled in `inputs`, as the library's OPT scales it
    return _causal_attention(*queries, *context, args.get("attention_mask"), rows, attn.head_dim, 1.0, dropout)


def _causal_attention(q, k, v, mask, rows, head_dim: int, scaling: float, dropout: float):
    """SDPA for a chunk of query rows q (rows, heads·head_dim) over the keys and values k, v of
    rows.context, each query reading its sequence's positions up to its own: one call per
    group of rows.sequences(), causal from the group's first position on (aligned to the lower
    right), or through the model's mask cut to the same rows and keys."""
    from torch.nn.attention.bias import causal_lower_right

    outs = []
    for g in rows.sequences():
        count = g.batch.stop - g.batch.start
        qg = q[g.queries].view(count, g.stop - g.start, -1, head_dim).transpose(1, 2)
        kg, vg = (t[g.keys].view(count, g.stop, -1, head_dim).transpose(1, 2) for t in (k, v))
        grouped = qg.shape[1] != kg.shape[1]
        if mask is None:
            causal = g.start == 0
            bias = None if causal else causal_lower_right(g.stop - g.start, g.stop)
        else:
            causal = False
            bias = mask[g.batch if mask.shape[0] > 1 else slice(None), :, g.start : g.stop, : g.stop]
            if grouped:  # as the library does with a mask: memory-efficient kernels take no groups
                kg, vg = (t.repeat_interleave(qg.shape[1] // t.shape[1], dim=1) for t in (kg, vg))
                grouped = False
        # the split pays where chunks are long; cuDNN refuses some tiny ones (one query, one key)
        long = min(g.start, g.stop - g.start) >= _SPLIT_CAUSAL_MIN_TOKENS
        if bias is not None and dropout == 0.0 and long and _split_causal_runs(qg, kg):  # bias: lower-right, no mask
            h = _split_causal().apply(qg, kg, vg, g.start, scaling, _cudnn_attention, _cudnn_attention_backward)
        else:
            h = nn.functional.scaled_dot_product_attention(
                qg, kg, vg, attn_mask=bias, dropout_p=dropout, is_causal=causal, scale=scaling, enable_gqa=grouped,
            )
        outs.append(h.transpose(1, 2).reshape(-1, qg.shape[1] * head_dim))
    return outs[0] if len(outs) == 1 else torch.cat(outs)


@functools.cache
def _split_causal() -> type:
    class SplitCausalAttention(torch.autograd.Function):
        """Causal attention of the queries q at positions [start, start + c) over the keys of
        positions [0, start + c), as two kernel calls merged by their log-sum-exps: the keys before
        the chunk (nothing masked) and the chunk's own (a square, where upper-left and lower-right
        causal masks agree). Kernels whose causal mask is upper-left only (cuDNN's) can then serve
        a lower-right chunk. Backward runs each call's backward kernel on the merged output and
        log-sum-exp, which gives exactly the merged attention's gradients for that call's keys."""

        @staticmethod
        def halves(start: int) -> tuple:
            """(keys, causal) of the two calls: the keys before the chunk, then the chunk's own."""
            return (slice(None, start), False), (slice(start, None), True)

        @staticmethod
        def forward(ctx, q, k, v, start, scale, kernel, kernel_backward):
            halves = SplitCausalAttention.halves(start)
            (o1, l1, state1), (o2, l2, state2) = (kernel(q, k[:, :, keys], v[:, :, keys], causal, scale)
                                                  for keys, causal in halves)
            lse = torch.logaddexp(l1, l2)
            wide = torch.promote_types(o1.dtype, torch.float32)  # the merge in float32 at least
            merged = sum(o.to(wide) * torch.exp(lo - lse).unsqueeze(-1) for o, lo in ((o1, l1), (o2, l2)))
            out = torch.empty_like(o1).copy_(merged)  # o1's layout: the one its backward kernel expects
            ctx.save_for_backward(q, k, v, out, lse)
            ctx.start, ctx.scale, ctx.states, ctx.kernel_backward = start, scale, (state1, state2), kernel_backward
            return out

        @staticmethod
        def backward(ctx, grad):
            q, k, v, out, lse = ctx.saved_tensors
            if grad.stride() != out.stride():
                grad = torch.empty_like(out).copy_(grad)
            dk, dv = torch.empty_like(k), torch.empty_like(v)
            dq = None
            for (keys, causal), state in zip(SplitCausalAttention.halves(ctx.start), ctx.states):
                dq_part, dk[:, :, keys], dv[:, :, keys] = ctx.kernel_backward(
                    grad, q, k[:, :, keys], v[:, :, keys], out, lse, state, causal, ctx.scale)
                dq = dq_part if dq is None else dq + dq_part
            return dq, dk, dv, None, None, None, None

    return SplitCausalAttention


def _cudnn_attention(q, k, v, causal: bool, scale: float):
    out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q, k, v, None, True, 0.0, causal, False, scale=scale)
    return out, lse.view(*lse.shape[:3]), (seed, offset, cum_q, cum_k, max_q, max_k, lse.shape)


def _cudnn_attention_backward(grad, q, k, v, out, lse, state, causal: bool, scale: float):
    seed, offset, cum_q, cum_k, max_q, max_k, lse_shape = state
    return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        grad, q, k, v, out, lse.reshape(lse_shape), seed, offset, None,
        cum_q, cum_k, max_q, max_k, 0.0, causal, scale=scale)


_SPLIT_CAUSAL_CHECKED: dict = {}
_SPLIT_CAUSAL_MIN_TOKENS = 64


def _split_causal_runs(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether SplitCausalAttention on cuDNN serves this kind of chunk: CUDA, 16-bit, cuDNN's
    attention enabled, and a small chunk through it matching SDPA's lower-right causal attention
    (output and gradients) the first time each kind is seen; else SDPA's own kernels run."""
    if not q.is_cuda or q.dtype not in (torch.bfloat16, torch.float16) or not torch.backends.cuda.cudnn_sdp_enabled():
        return False
    kind = (q.device, q.dtype, q.shape[1], k.shape[1], q.shape[-1])
    if kind not in _SPLIT_CAUSAL_CHECKED:
        _SPLIT_CAUSAL_CHECKED[kind] = _split_causal_matches_sdpa(*kind)
    return _SPLIT_CAUSAL_CHECKED[kind]


def _split_causal_matches_sdpa(device, dtype, heads: int, kv_heads: int, head_dim: int) -> bool:
    from torch.nn.attention.bias import causal_lower_right

    try:
        with torch.enable_grad():
            gen = torch.Generator(device=device).manual_seed(0)
            start, count = 256, 128
            q = torch.randn(1, heads, count, head_dim, device=device, dtype=dtype, generator=gen).requires_grad_()
            k, v = (torch.randn(1, kv_heads, start + count, head_dim, device=device, dtype=dtype, generator=gen).requires_grad_()
                    for _ in range(2))
            grad = torch.randn(1, heads, count, head_dim, device=device, dtype=dtype, generator=gen)
            scale = head_dim**-0.5
            got = _split_causal().apply(q, k, v, start, scale, _cudnn_attention, _cudnn_attention_backward)
            got_grads = torch.autograd.grad(got, (q, k, v), grad)
            want = nn.functional.scaled_dot_product_attention(
                q.float(), k.float(), v.float(), attn_mask=causal_lower_right(count, start + count), scale=scale,
                enable_gqa=heads != kv_heads)
            want_grads = torch.autograd.grad(want, (q, k, v), grad.float())
        return all((a.float() - b).abs().max().item() <= 0.02 * b.abs().max().item() + 1e-3
                   for a, b in zip((got, *got_grads), (want, *want_grads)))
    except (RuntimeError, TypeError):  # no cuDNN attention for this kind
        return False


def _opt_attention_finish(layer, h, x, adapter):
    return _opt_attention_residual(layer, layer.self_attn.out_proj(h), x, adapter)


def _opt_mlp(layer, x, adapter):
    shape = x.shape
    x = x.reshape(-1, x.size(-1))  # OPTDecoderLayer runs its FFN on (tokens, hidden)
    residual = x
    h = layer.final_layer_norm(x) if layer.do_layer_norm_before else x
    ffn_input = h
    h = layer.fc2(layer.activation_fn(layer.fc1(h)))
    h = nn.functional.dropout(h, p=layer.dropout, training=layer.training)
    if adapter is not None:
        h = h + adapter(ffn_input)
    h = (residual + h).view(shape)
    if not layer.do_layer_norm_before:
        h = layer.final_layer_norm(h)
    return h


OPT = Family(
    model_type="opt",
    config_class="OPTConfig",
    stacks=(
        Stack(
            "decoder.layers", _opt_attention, _opt_mlp, fsdp_units=("self_attn", "fc1", "fc2"),
            attention_parts=AttentionParts(
                _opt_attention_inputs, _opt_attention_core, _opt_attention_finish, causal=_opt_attention_chunk
            ),
        ),
    ),
    norm="pre",
    activation=lambda config: config.activation_function,
    dropout=lambda config: config.dropout,
    heads={
        "AutoModel": Head("OPTModel"),
        "AutoModelForCausalLM": Head("OPTForCausalLM"),
        "AutoModelForSequenceClassification": Head("OPTForSequenceClassification", trainable=("score",)),
    },
)


# ------------------------------------------------------------------------------------ BART
# Encoder-decoder, post-LN, both stacks reversible. A decoder layer's attention block is its
# self-attention and then its cross-attention (each with residual, dropout and norm); the
# adapter of MEFT3 sits on the last of them. The encoder's output reaches every decoder
# layer as a routed argument, so the decoder's backward hands its gradient to the encoder.


def _cache_args(args: dict) -> dict:
    return {k: v for k, v in args.items() if k in ("cache", "past_key_values")}


def _bart_extra_args(args: dict) -> dict:
    return _without(
        args, "attention_mask", "encoder_hidden_states", "encoder_attention_mask", "use_cache", "cache", "past_key_values"
    )


def _bart_encoder_attention(layer, x, args, adapter):
    h, _ = layer.self_attn(x, attention_mask=args.get("attention_mask"), **_bart_extra_args(args))
    h = nn.functional.dropout(h, p=layer.dropout, training=layer.training)
    if adapter is not None:
        h = h + adapter(h)
    return layer.self_attn_layer_norm(x + h)


def _bart_ffn(layer, x, adapter):
    h = nn.functional.dropout(layer.activation_fn(layer.fc1(x)), p=layer.activation_dropout, training=layer.training)
    h = nn.functional.dropout(layer.fc2(h), p=layer.dropout, training=layer.training)
    if adapter is not None:
        h = h + adapter(x)
    return layer.final_layer_norm(x + h)


def _bart_encoder_mlp(layer, x, adapter):
    h = _bart_ffn(layer, x, adapter)
    if h.dtype == torch.float16 and not torch.isfinite(h).all():  # as BartEncoderLayer does
        clamp = torch.finfo(h.dtype).max - 1000
        h = torch.clamp(h, min=-clamp, max=clamp)
    return h


def _bart_decoder_attention(layer, x, args, adapter):
    cache, extra = _cache_args(args), _bart_extra_args(args)
    h, _ = layer.self_attn(x, attention_mask=args.get("attention_mask"), **cache, **extra)
    h = nn.functional.dropout(h, p=layer.dropout, training=layer.training)
    encoder_states = args.get("encoder_hidden_states")
    if encoder_states is None:
        if adapter is not None:
            h = h + adapter(h)
        return layer.self_attn_layer_norm(x + h)
    h = layer.self_attn_layer_norm(x + h)
    c, _ = layer.encoder_attn(
        h, key_value_states=encoder_states, attention_mask=args.get("encoder_attention_mask"), **cache, **extra
    )
    c = nn.functional.dropout(c, p=layer.dropout, training=layer.training)
    if adapter is not None:
        c = c + adapter(c)
    return layer.encoder_attn_layer_norm(h + c)


BART = Family(
    model_type="bart",
    config_class="BartConfig",
    stacks=(
        Stack(
            "encoder.layers", _bart_encoder_attention, _bart_encoder_mlp, name="encoder",
            fsdp_units=("self_attn", "fc1", "fc2"),
        ),
        Stack(
            "decoder.layers", _bart_decoder_attention, _bart_ffn, name="decoder",
            fsdp_units=("self_attn", "encoder_attn", "fc1", "fc2"),
        ),
    ),
    norm="post",
    activation=lambda config: config.activation_function,
    dropout=lambda config: config.dropout,
    heads={
        "AutoModel": Head("BartModel"),
        "AutoModelForSeq2SeqLM": Head("BartForConditionalGeneration"),
        "AutoModelForSequenceClassification": Head("BartForSequenceClassification", trainable=("classification_head",)),
        "AutoModelForQuestionAnswering": Head("BartForQuestionAnswering", trainable=("qa_outputs",)),
    },
)


# ------------------------------------------------------------------- LLaMA, Mistral, Qwen2
# Pre-RMSNorm, rotary position embeddings (routed to every layer as `position_embeddings`),
# grouped-query attention and a gated MLP; no dropout around the sublayers. Mistral's and
# Qwen2's sliding windows live in the attention mask their model builds.


def _llama_attention(layer, x, args, adapter):
    h, _ = layer.self_attn(hidden_states=layer.input_layernorm(x), **args)
    return _llama_attention_residual(h, x, adapter)


def _llama_attention_residual(h, x, adapter):
    if adapter is not None:
        h = h + adapter(h)
    return x + h


def _llama_attention_inputs(layer, x, args, rows):
    attn = layer.self_attn
    normed = layer.input_layernorm(x)
    heads = (*x.shape[:-1], -1, attn.head_dim)
    q, k, v = attn.q_proj(normed).view(heads), attn.k_proj(normed).view(heads), attn.v_proj(normed)
    rotary = _library_function(attn, "apply_rotary_pos_emb")
    cos, sin = (rows.take(t) for t in args["position_embeddings"])
    # heads stay beside the positions here, so cos and sin go in front of the head dimension
    q, k = rotary(q, k, cos, sin, unsqueeze_dim=-2)
    return q.flatten(-2), k.flatten(-2), v


def _llama_attention_core(layer, inputs, args, sliding_window=None):
    attn = layer.self_attn
    q, k, v = (t.view(*t.shape[:-1], -1, attn.head_dim).transpose(1, 2) for t in inputs)
    interface = _attention_interface(attn)
    extra = {} if sliding_window is None else {"sliding_window": sliding_window(attn)}
    kwargs = _without(args, "position_embeddings", "attention_mask", "cache", "past_key_values")
    h, _ = interface(
        attn, q, k, v, args.get("attention_mask"), dropout=0.0 if not attn.training else attn.attention_dropout,
        scaling=attn.scaling, **extra, **kwargs,
    )
    return h.reshape(*h.shape[:2], -1).contiguous()


def _llama_attention_chunk(layer, queries, context, args, rows):
    attn = layer.self_attn
    dropout = attn.attention_dropout if attn.training else 0.0
    return _causal_attention(*queries, *context, args.get("attention_mask"), rows, attn.head_dim, attn.scaling, dropout)


def _llama_attention_finish(layer, h, x, adapter):
    return _llama_attention_residual(layer.self_attn.o_proj(h), x, adapter)


@functools.cache
def _silu_product() -> type:
    class SiluProduct(torch.autograd.Function):
        """silu(gate) · up, as the gated MLP computes it, with autograd's very gradient kernels:
        backward lets go of each input once it is used and recomputes silu(gate), so it holds
        four FFN-wide tensors at most where autograd holds six (training with frozen weights)."""

        @staticmethod
        def forward(ctx, gate, up):
            ctx.inputs = [gate, up]  # not saved tensors: backward drops them one by one
            return nn.functional.silu(gate) * up

        @staticmethod
        def backward(ctx, grad):
            gate, up = ctx.inputs
            ctx.inputs = None
            d_silu = grad * up
            del up
            d_gate = torch.ops.aten.silu_backward(d_silu, gate)
            del d_silu
            silu = nn.functional.silu(gate)
            del gate
            return d_gate, grad * silu

    return SiluProduct


def _gated_mlp(mlp, x):
    """The library's gated MLP, down(silu(gate(x)) · up(x)), through SiluProduct when training;
    the module itself where anything hooks it (FSDP2 gathers its shards in a hook) or it is not SiLU."""
    plain = not torch.is_grad_enabled() or mlp._forward_hooks or mlp._forward_pre_hooks or hasattr(mlp, "_hf_hook")
    # SiLU is nn.SiLU or, in newer transformers, its own SiLUActivation
    if plain or type(getattr(mlp, "act_fn", None)).__name__ not in ("SiLU", "SiLUActivation"):
        return mlp(x)
    return mlp.down_proj(_silu_product().apply(mlp.gate_proj(x), mlp.up_proj(x)))


def _llama_mlp(layer, x, adapter):
    normed = layer.post_attention_layernorm(x)
    h = _gated_mlp(layer.mlp, normed)
    if adapter is not None:
        h = h + adapter(normed)
    return x + h


def _mixed_layer_types(config):
    # the model builds one mask per layer type, but MEFT runs all layers as one: they must agree
    types = set(getattr(config, "layer_types", None) or ())
    if len(types) > 1:
        return f"layers of different attention types ({', '.join(sorted(types))}) are not supported"
    return None


def _llama_like(model_type: str, prefix: str, sliding_window: Callable | None = None) -> Family:
    # sliding_window(attention module): the window its attention passes on, as the library's does
    core = functools.partial(_llama_attention_core, sliding_window=sliding_window)
    parts = AttentionParts(_llama_attention_inputs, core, _llama_attention_finish, causal=_llama_attention_chunk)
    return Family(
        model_type=model_type,
        config_class=f"{prefix}Config",
        stacks=(Stack("layers", _llama_attention, _llama_mlp, fsdp_units=("self_attn", "mlp"), attention_parts=parts),),
        norm="pre",
        activation=lambda config: config.hidden_act,
        dropout=lambda config: 0.0,  # these models train without hidden dropout
        heads={
            "AutoModel": Head(f"{prefix}Model"),
            "AutoModelForCausalLM": Head(f"{prefix}ForCausalLM"),
            "AutoModelForSequenceClassification": Head(f"{prefix}ForSequenceClassification", trainable=("score",)),
        },
        unsupported=_mixed_layer_types,
        final_norm="norm",
    )


LLAMA = _llama_like("llama", "Llama")
MISTRAL = _llama_like("mistral", "Mistral", sliding_window=lambda attn: getattr(attn.config, "sliding_window", None))
QWEN2 = _llama_like("qwen2", "Qwen2", sliding_window=lambda attn: attn.sliding_window)


# ----------------------------------------------------------------------------------- GPT-2
# Pre-LN; Conv1D projections; the residual dropout sits inside GPT2Attention and GPT2MLP.


def _gpt2_attention(layer, x, args, adapter):
    h, _ = layer.attn(layer.ln_1(x), **_without(args, "encoder_hidden_states", "encoder_attention_mask"))
    if adapter is not None:
        h = h + adapter(h)
    return h + x


def _gpt2_mlp(layer, x, adapter):
    normed = layer.ln_2(x)
    h = layer.mlp(normed)
    if adapter is not None:
        h = h + adapter(normed)
    return x + h


def _gpt2_unsupported(config):
    if getattr(config, "add_cross_attention", False):
        return "GPT-2 with cross-attention (add_cross_attention) is not supported"
    return None


GPT2 = Family(
    model_type="gpt2",
    config_class="GPT2Config",
    stacks=(Stack("h", _gpt2_attention, _gpt2_mlp, fsdp_units=("attn", "mlp")),),
    norm="pre",
    activation=lambda config: config.activation_function,
    dropout=lambda config: config.resid_pdrop,
    heads={
        "AutoModel": Head("GPT2Model"),
        "AutoModelForCausalLM": Head("GPT2LMHeadModel"),
        "AutoModelForSequenceClassification": Head("GPT2ForSequenceClassification", trainable=("score",)),
    },
    unsupported=_gpt2_unsupported,
)


FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> None:
    if family.model_type in FAMILIES:
        raise ValueError(f"family {family.model_type!r} is already registered")
    FAMILIES[family.model_type] = family


for _family in (BERT, ROBERTA, BART, OPT, LLAMA, MISTRAL, QWEN2, GPT2):
    register_family(_family)


def family_for(model_type: str) -> Family:
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise ValueError(
            f"model type {model_type!r} is not supported; supported: {', '.join(sorted(FAMILIES))}"
        ) from None
