"""Configuration of a MEFT checkpoint: the PLM's own config plus the MEFT settings.

Each family has one config class, `Meft<PLMConfig>` (e.g. MeftBertConfig), declared at the end
of this file: the PLM's transformers config class with MeftConfig mixed in. Its model_type is
"meft_<plm type>", so a converted checkpoint is never mistaken for the original, and all
of the PLM's fields, defaults and aliases keep working for the PLM's own modules.
"""

from __future__ import annotations

import transformers

from .families import FAMILIES, Family, auto_map_for, config_class_name, family_for
from .meft_table import MEFT_SETTINGS, validate_meft_settings


class MeftConfig:
    """The MEFT settings a converted checkpoint carries, on top of its PLM's config.

    Args:
        variant: "meft1" (F = PLM layer, G = adapter), "meft2" (F = adapter, G = PLM layer)
            or "meft3" (F = attention block, G = MLP block).
        lambda_, beta: scale of x1 and x2 in the coupling; None takes the paper's default
            for the variant. Exact mode needs 1/m for a positive integer m.
        adapter_dim: bottleneck width r of every adapter.
        adapter_init: "paper" (both projections N(0, σ²)) or "zero" (up-projection 0).
        adapter_init_std: σ of the adapter initialisation (named so as not to clash with
            OPT's own `init_std`).
        reversible_layers: how many of the lowest layers recompute their inputs in backward;
            None means all. The layers above store activations as usual (the paper's hybrid).
        output_stream: "plm", the stream that follows the pretrained layers, or "mean", the
            paper's (x1 + x2) / 2.
        exact: int64 fixed-point streams with an exact inverse (default), or the paper's
            float reconstruction, which is approximate.
        frac_bits: fractional bits K of the fixed-point streams.
        stream_bits: width of the stream integers, 64 (int64) or 32 (int32: half the memory; the
            streams then hold values below 2^(31 - frac_bits) in magnitude). Conversion picks both
            from the hidden-state range it measures.
        audit: compare a checksum of every layer's input with its reconstruction in backward.
        loss_chunk_size: causal LMs only: in training, the LM head and its loss run on this many
            tokens at a time, so the full logits never exist (0: the library's loss, all at once).
        compile_blocks: in training, run each attention/MLP block through torch.compile (one
            compiled function shared by all layers; the first steps compile). On an H200, OPT-1.3b
            shape: 8% less activation memory for MEFT1/2 and 10% fewer kernel launches; the step
            time did not improve (benchmarks/README.md).
        recompute_chunk_tokens: in training, the position-wise parts of every block (MLP blocks,
            adapters; in LLaMA, Mistral and Qwen2 also the attention's norm, q/k/v and output
            projections and rotary embedding, so that only its core sees the whole sequence) and
            the stream arithmetic run this many tokens at a time, in forward and in the backward
            recompute, so one layer's working set stops growing with sequence x FFN width (0: all
            tokens at once). Gradients equal plain autograd's through the same chunks. With
            compile_blocks, or FSDP2 sharding the attention's modules (fsdp_units), the attention
            block stays whole.
        chunk_attention_queries: in training, causal attention through SDPA (LLaMA, Mistral, Qwen2,
            OPT) runs recompute_chunk_tokens queries at a time as well, each chunk reading the keys
            and values up to its end, so the whole attention block, not only its position-wise parts,
            works a chunk at a time: only keys and values (with grouped-query attention a quarter of
            the hidden size or less) and their gradients cover the whole sequence. Gradients equal
            plain autograd's through the same chunks. A chunk past a sequence's first is aligned to
            the lower right of its keys, which cuDNN's causal mask is not: on CUDA in 16-bit it runs
            as two cuDNN calls (the keys before the chunk, and the chunk's own square) merged by
            their log-sum-exps, checked against SDPA once per kind of chunk, else on SDPA's flash
            kernel. On an H200 (Llama-3-8B, 16k tokens, MEFT1) it saved 0.49 GiB (11%) of
            activation memory on the GPU and cost 4.6% of step time (benchmarks/README.md). Off
            by default; turn it on for the longest sequences a memory cap allows. Not with compile_blocks,
            which keeps every attention block whole.
        offload_remainders: in training on CUDA, keep the packed remainders in pinned host memory,
            copied on a side stream and fetched one half-step ahead in backward, so the GPU memory of
            exact MEFT stops growing with depth. "auto" (default): on for steps of at least
            OFFLOAD_MIN_TOKENS tokens, where an H200 measured it at under 1% of step time (Llama-3-8B,
            8k-32k tokens; benchmarks/README.md); off for shorter ones, whose steps wait on the host.
    """

    _plm_config_class: type = None  # the PLM's config class, which each family's class extends

    def __init_subclass__(cls, **kwargs):
        # transformers makes each config class a dataclass and keeps an __init__ only if the class
        # defines one itself: so every family's class gets this one, and its PLM config class
        cls.__init__ = MeftConfig.__init__
        cls._plm_config_class = cls.__bases__[-1]
        if cls.__doc__ is None:
            cls.__doc__ = f"{cls._plm_config_class.__name__} with MEFT settings.\n\n{MeftConfig.__doc__}"
        super().__init_subclass__(**kwargs)

    def __init__(self, **kwargs):
        # the MEFT settings (defaults and checks: validate_meft_settings); the rest is the PLM's
        settings = validate_meft_settings(**{key: kwargs.pop(key) for key in MEFT_SETTINGS if key in kwargs})
        for key, value in settings.items():
            setattr(self, key, value)
        self._plm_config_class.__init__(self, **kwargs)
        layers = self.num_hidden_layers
        if self.reversible_layers is not None and self.reversible_layers > layers:
            raise ValueError(f"reversible_layers={self.reversible_layers} exceeds the model's {layers} layers")

    @property
    def plm_model_type(self) -> str:
        return self._plm_config_class.model_type

    def meft_settings(self) -> dict:
        return {key: getattr(self, key) for key in MEFT_SETTINGS}

    def to_diff_dict(self) -> dict:
        # MEFT settings are always written, default or not, so config.json shows them all
        output = super().to_diff_dict()
        output.update(self.meft_settings())
        return output


# One class per family, named as families.config_class_name names it (auto_map's "AutoConfig").
class MeftBertConfig(MeftConfig, transformers.BertConfig):
    model_type = "meft_bert"


class MeftRobertaConfig(MeftConfig, transformers.RobertaConfig):
    model_type = "meft_roberta"


class MeftBartConfig(MeftConfig, transformers.BartConfig):
    model_type = "meft_bart"


class MeftOPTConfig(MeftConfig, transformers.OPTConfig):
    model_type = "meft_opt"


class MeftLlamaConfig(MeftConfig, transformers.LlamaConfig):
    model_type = "meft_llama"


class MeftMistralConfig(MeftConfig, transformers.MistralConfig):
    model_type = "meft_mistral"


class MeftQwen2Config(MeftConfig, transformers.Qwen2Config):
    model_type = "meft_qwen2"


class MeftGPT2Config(MeftConfig, transformers.GPT2Config):
    model_type = "meft_gpt2"


def config_class_for(family: Family) -> type[MeftConfig]:
    """The MEFT config class of `family`."""
    return globals()[config_class_name(family)]


__all__ = ["MeftConfig", "auto_map_for", "config_class_for", "family_for", "validate_meft_settings"] + [
    config_class_name(family) for family in FAMILIES.values()
]
