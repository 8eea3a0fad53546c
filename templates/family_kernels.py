"""How each family's layer computes its two blocks: the code that runs on a layer's modules and
tensors, and imports torch. families.py describes the families and names these functions
(BLOCKS) in its table.

A block calls the PLM's own submodules in the order the library's layer does, so with adapters
off `mlp(attention(x))` is the library layer bit for bit (tests check this). Where a family's
attention block comes in parts (families.AttentionParts), its causal core can run a chunk of
queries at a time (_causal_attention); the gated MLP's product runs through SiluProduct, which
keeps fewer tensors for backward.
"""

from __future__ import annotations

import functools
import inspect
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

if TYPE_CHECKING:
    from .reversible import Rows

Tensors = tuple[torch.Tensor, ...]  # the outputs of an attention's `inputs` part, or some of them

# the functions families.py names in its table (families._block), by name: each runs one block
# of a layer, or one part of its attention block
BLOCKS: dict[str, Callable] = {}


def _registered(function: Callable) -> Callable:
    BLOCKS[function.__name__] = function
    return function


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


@_registered
def bert_attention(layer: nn.Module, x: torch.Tensor, args: dict, adapter: nn.Module | None) -> torch.Tensor:
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


@_registered
def bert_mlp(layer: nn.Module, x: torch.Tensor, adapter: nn.Module | None) -> torch.Tensor:
    h = layer.output.dropout(layer.output.dense(layer.intermediate(x)))
    if adapter is not None:
        h = h + adapter(x)  # parallel to the FFN: it reads the FFN's input
    return layer.output.LayerNorm(h + x)



# ------------------------------------------------------------------------------------- OPT
# Pre-LN (x + dropout(sublayer(LN(x)))), except OPT-350m, which normalises after the
# residual like BERT: `do_layer_norm_before` tells them apart, as in OPTDecoderLayer.


@_registered
def opt_attention(layer: nn.Module, x: torch.Tensor, args: dict, adapter: nn.Module | None) -> torch.Tensor:
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


@_registered
def opt_attention_inputs(layer: nn.Module, x: torch.Tensor, args: dict, rows: Rows) -> Tensors:
    attn = layer.self_attn
    h = layer.self_attn_layer_norm(x) if layer.do_layer_norm_before else x
    # scaled before the attention, as the library's OPT does (and then asks for no scaling)
    return attn.q_proj(h) * attn.scaling, attn.k_proj(h), attn.v_proj(h)


@_registered
def opt_attention_core(layer: nn.Module, inputs: Tensors, args: dict) -> torch.Tensor:
    attn = layer.self_attn
    q, k, v = (t.view(*t.shape[:-1], attn.num_heads, attn.head_dim).transpose(1, 2) for t in inputs)
    interface = _attention_interface(attn)
    kwargs = _without(args, "use_cache", "cache", "past_key_values", "attention_mask", "output_attentions")
    h, _ = interface(
        attn, q, k, v, args.get("attention_mask"), dropout=0.0 if not attn.training else attn.dropout, scaling=1.0,
        **kwargs,
    )
    return h.reshape(*h.shape[:2], -1).contiguous()


@_registered
def opt_attention_chunk(layer: nn.Module, queries: Tensors, context: Tensors, args: dict, rows: Rows) -> torch.Tensor:
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


@_registered
def opt_attention_finish(layer: nn.Module, h: torch.Tensor, x: torch.Tensor, adapter: nn.Module | None) -> torch.Tensor:
    return _opt_attention_residual(layer, layer.self_attn.out_proj(h), x, adapter)


@_registered
def opt_mlp(layer: nn.Module, x: torch.Tensor, adapter: nn.Module | None) -> torch.Tensor:
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


@_registered
def bart_encoder_attention(layer: nn.Module, x: torch.Tensor, args: dict, adapter: nn.Module | None) -> torch.Tensor:
    h, _ = layer.self_attn(x, attention_mask=args.get("attention_mask"), **_bart_extra_args(args))
    h = nn.functional.dropout(h, p=layer.dropout, training=layer.training)
    if adapter is not None:
        h = h + adapter(h)
    return layer.self_attn_layer_norm(x + h)


@_registered
def bart_ffn(layer: nn.Module, x: torch.Tensor, adapter: nn.Module | None) -> torch.Tensor:
    h = nn.functional.dropout(layer.activation_fn(layer.fc1(x)), p=layer.activation_dropout, training=layer.training)
    h = nn.functional.dropout(layer.fc2(h), p=layer.dropout, training=layer.training)
    if adapter is not None:
        h = h + adapter(x)
    return layer.final_layer_norm(x + h)


@_registered
def bart_encoder_mlp(layer: nn.Module, x: torch.Tensor, adapter: nn.Module | None) -> torch.Tensor:
    h = bart_ffn(layer, x, adapter)
    if h.dtype == torch.float16 and not torch.isfinite(h).all():  # as BartEncoderLayer does
        clamp = torch.finfo(h.dtype).max - 1000
        h = torch.clamp(h, min=-clamp, max=clamp)
    return h


@_registered
def bart_decoder_attention(layer: nn.Module, x: torch.Tensor, args: dict, adapter: nn.Module | None) -> torch.Tensor:
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



# ------------------------------------------------------------------- LLaMA, Mistral, Qwen2
# Pre-RMSNorm, rotary position embeddings (routed to every layer as `position_embeddings`),
# grouped-query attention and a gated MLP; no dropout around the sublayers. Mistral's and
# Qwen2's sliding windows live in the attention mask their model builds.


@_registered
def llama_attention(layer: nn.Module, x: torch.Tensor, args: dict, adapter: nn.Module | None) -> torch.Tensor:
    h, _ = layer.self_attn(hidden_states=layer.input_layernorm(x), **args)
    return _llama_attention_residual(h, x, adapter)


def _llama_attention_residual(h, x, adapter):
    if adapter is not None:
        h = h + adapter(h)
    return x + h


@_registered
def llama_attention_inputs(layer: nn.Module, x: torch.Tensor, args: dict, rows: Rows) -> Tensors:
    attn = layer.self_attn
    normed = layer.input_layernorm(x)
    heads = (*x.shape[:-1], -1, attn.head_dim)
    q, k, v = attn.q_proj(normed).view(heads), attn.k_proj(normed).view(heads), attn.v_proj(normed)
    rotary = _library_function(attn, "apply_rotary_pos_emb")
    cos, sin = (rows.take(t) for t in args["position_embeddings"])
    # heads stay beside the positions here, so cos and sin go in front of the head dimension
    q, k = rotary(q, k, cos, sin, unsqueeze_dim=-2)
    return q.flatten(-2), k.flatten(-2), v


@_registered
def llama_attention_core(
    layer: nn.Module,
    inputs: Tensors,
    args: dict,
    sliding_window: Callable[[nn.Module], int | None] | None = None,
) -> torch.Tensor:
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


@_registered
def llama_attention_chunk(layer: nn.Module, queries: Tensors, context: Tensors, args: dict, rows: Rows) -> torch.Tensor:
    attn = layer.self_attn
    dropout = attn.attention_dropout if attn.training else 0.0
    return _causal_attention(*queries, *context, args.get("attention_mask"), rows, attn.head_dim, attn.scaling, dropout)


@_registered
def llama_attention_finish(
    layer: nn.Module, h: torch.Tensor, x: torch.Tensor, adapter: nn.Module | None
) -> torch.Tensor:
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


@_registered
def llama_mlp(layer: nn.Module, x: torch.Tensor, adapter: nn.Module | None) -> torch.Tensor:
    normed = layer.post_attention_layernorm(x)
    h = _gated_mlp(layer.mlp, normed)
    if adapter is not None:
        h = h + adapter(normed)
    return x + h



# ----------------------------------------------------------------------------------- GPT-2
# Pre-LN; Conv1D projections; the residual dropout sits inside GPT2Attention and GPT2MLP.


@_registered
def gpt2_attention(layer: nn.Module, x: torch.Tensor, args: dict, adapter: nn.Module | None) -> torch.Tensor:
    h, _ = layer.attn(layer.ln_1(x), **_without(args, "encoder_hidden_states", "encoder_attention_mask"))
    if adapter is not None:
        h = h + adapter(h)
    return h + x


@_registered
def gpt2_mlp(layer: nn.Module, x: torch.Tensor, adapter: nn.Module | None) -> torch.Tensor:
    normed = layer.ln_2(x)
    h = layer.mlp(normed)
    if adapter is not None:
        h = h + adapter(normed)
    return x + h
