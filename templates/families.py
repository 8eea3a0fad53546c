"""What MEFT needs to know about each model family, in one table.

A family description says where the layers are (one stack, or two for an encoder-decoder),
how one layer splits into an attention block and an MLP block (each with its residual
connection and norm), where adapters go, and which task heads exist. The blocks themselves,
which call the PLM's own submodules in the order the library's layer does, are in
family_kernels.py; the table names them, and they are imported when a block first runs. The
converter reads this table without torch, and the checkpoint's code reads it too; adding a
family means adding one description here and its blocks there.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import torch
    from torch import nn


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

    def head_for(self, auto_class: str) -> Head:
        """The head of the Auto class `auto_class` ("AutoModelForCausalLM"); KeyError naming the
        family's heads if it has none."""
        try:
            return self.heads[auto_class]
        except KeyError:
            heads = ", ".join(f"{name} ({head.library_class})" for name, head in self.heads.items())
            raise KeyError(f"{self.model_type} models have no {auto_class} head; their heads: {heads}") from None

    def auto_class_of(self, library_class: str) -> str | None:
        """The Auto class whose head is the transformers class `library_class` ("OPTForCausalLM"),
        or None if no head of the family is."""
        return next((name for name, head in self.heads.items() if head.library_class == library_class), None)


def _block(name: str) -> Callable:
    """The function `name` of family_kernels.py (its BLOCKS), looked up when called: the blocks
    run in a model, with torch, and the converter reads this table without it."""

    def run(*args, **kwargs):
        # `from .<module> import` is the form transformers finds to copy a checkpoint's modules
        from .family_kernels import BLOCKS

        return BLOCKS[name](*args, **kwargs)

    run.__name__ = run.__qualname__ = name
    return run


# ------------------------------------------------------------------------------------ BERT


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
                "encoder.layer", _block("bert_attention"), _block("bert_mlp"),
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


OPT = Family(
    model_type="opt",
    config_class="OPTConfig",
    stacks=(
        Stack(
            "decoder.layers", _block("opt_attention"), _block("opt_mlp"), fsdp_units=("self_attn", "fc1", "fc2"),
            attention_parts=AttentionParts(
                _block("opt_attention_inputs"), _block("opt_attention_core"), _block("opt_attention_finish"),
                causal=_block("opt_attention_chunk"),
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


BART = Family(
    model_type="bart",
    config_class="BartConfig",
    stacks=(
        Stack(
            "encoder.layers", _block("bart_encoder_attention"), _block("bart_encoder_mlp"), name="encoder",
            fsdp_units=("self_attn", "fc1", "fc2"),
        ),
        Stack(
            "decoder.layers", _block("bart_decoder_attention"), _block("bart_ffn"), name="decoder",
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


def _mixed_layer_types(config):
    # the model builds one mask per layer type, but MEFT runs all layers as one: they must agree
    types = set(getattr(config, "layer_types", None) or ())
    if len(types) > 1:
        return f"layers of different attention types ({', '.join(sorted(types))}) are not supported"
    return None


def _llama_like(model_type: str, prefix: str, sliding_window: Callable | None = None) -> Family:
    # sliding_window(attention module): the window its attention passes on, as the library's does
    core = functools.partial(_block("llama_attention_core"), sliding_window=sliding_window)
    parts = AttentionParts(
        _block("llama_attention_inputs"), core, _block("llama_attention_finish"), causal=_block("llama_attention_chunk")
    )
    return Family(
        model_type=model_type,
        config_class=f"{prefix}Config",
        stacks=(
            Stack(
                "layers", _block("llama_attention"), _block("llama_mlp"), fsdp_units=("self_attn", "mlp"),
                attention_parts=parts,
            ),
        ),
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


def _gpt2_unsupported(config):
    if getattr(config, "add_cross_attention", False):
        return "GPT-2 with cross-attention (add_cross_attention) is not supported"
    return None


GPT2 = Family(
    model_type="gpt2",
    config_class="GPT2Config",
    stacks=(Stack("h", _block("gpt2_attention"), _block("gpt2_mlp"), fsdp_units=("attn", "mlp")),),
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


def config_class_name(family: Family) -> str:
    """The name of the MEFT config class of `family` (configuration_meft.py builds it)."""
    return "Meft" + family.config_class


def auto_map_for(family: Family, auto_classes: list[str]) -> dict[str, str]:
    """The `auto_map` a converted checkpoint's config.json carries: the one place it is built."""
    auto_map = {"AutoConfig": f"configuration_meft.{config_class_name(family)}"}
    for auto_class in auto_classes:
        auto_map[auto_class] = f"modeling_meft.Meft{family.head_for(auto_class).library_class}"
    return auto_map
