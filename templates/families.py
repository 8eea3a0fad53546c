"""What MEFT needs to know about each model family, in one table.

A family description says where the layers are (one stack, or two for an encoder-decoder),
how one layer splits into an attention block and an MLP block (each with its residual
connection and norm), where adapters go, and which task heads exist. The blocks call the PLM's own submodules in the order the
library's layer does, so with adapters off `mlp(attention(x))` is the library layer
bit for bit (tests check this). The converter and the checkpoint's code read this same
table; adding a family means adding one description here.
"""

from __future__ import annotations

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


def _without(args: dict, *names: str) -> dict:
    return {k: v for k, v in args.items() if k not in names}


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
    residual = x
    h = layer.self_attn_layer_norm(x) if layer.do_layer_norm_before else x
    h, _ = layer.self_attn(hidden_states=h, **_without(args, "use_cache"))
    h = nn.functional.dropout(h, p=layer.dropout, training=layer.training)
    if adapter is not None:
        h = h + adapter(h)
    h = residual + h
    if not layer.do_layer_norm_before:
        h = layer.self_attn_layer_norm(h)
    return h


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
    stacks=(Stack("decoder.layers", _opt_attention, _opt_mlp, fsdp_units=("self_attn", "fc1", "fc2")),),
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
    if adapter is not None:
        h = h + adapter(h)
    return x + h


def _llama_mlp(layer, x, adapter):
    normed = layer.post_attention_layernorm(x)
    h = layer.mlp(normed)
    if adapter is not None:
        h = h + adapter(normed)
    return x + h


def _mixed_layer_types(config):
    # the model builds one mask per layer type, but MEFT runs all layers as one: they must agree
    types = set(getattr(config, "layer_types", None) or ())
    if len(types) > 1:
        return f"layers of different attention types ({', '.join(sorted(types))}) are not supported"
    return None


def _llama_like(model_type: str, prefix: str) -> Family:
    return Family(
        model_type=model_type,
        config_class=f"{prefix}Config",
        stacks=(Stack("layers", _llama_attention, _llama_mlp, fsdp_units=("self_attn", "mlp")),),
        norm="pre",
        activation=lambda config: config.hidden_act,
        dropout=lambda config: 0.0,  # these models train without hidden dropout
        heads={
            "AutoModel": Head(f"{prefix}Model"),
            "AutoModelForCausalLM": Head(f"{prefix}ForCausalLM"),
            "AutoModelForSequenceClassification": Head(f"{prefix}ForSequenceClassification", trainable=("score",)),
        },
        unsupported=_mixed_layer_types,
    )


LLAMA = _llama_like("llama", "Llama")
MISTRAL = _llama_like("mistral", "Mistral")
QWEN2 = _llama_like("qwen2", "Qwen2")


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
