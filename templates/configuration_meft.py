"""Configuration of a MEFT checkpoint: the PLM's own config plus the MEFT settings.

Each family gets one config class, `Meft<PLMConfig>` (e.g. MeftBertConfig), that is the
PLM's transformers config class with MeftConfig mixed in. Its model_type is
"meft_<plm type>", so a converted checkpoint is never mistaken for the original, and all
of the PLM's fields, defaults and aliases keep working for the PLM's own modules.
"""

from __future__ import annotations

import math

import transformers

from .adapters import ADAPTER_INITS
from .families import FAMILIES, Family, family_for
from .reversible import denominator_of

# λ and β of each variant in the paper, and which blocks F and G are
VARIANT_DEFAULTS = {
    "meft1": {"lambda_": 0.1, "beta": 1.0},
    "meft2": {"lambda_": 1.0, "beta": 0.1},
    "meft3": {"lambda_": 0.1, "beta": 0.1},
}
OUTPUT_STREAMS = ("plm", "mean")


def validate_meft_settings(
    variant: str = "meft3",
    lambda_: float | None = None,
    beta: float | None = None,
    adapter_dim: int = 8,
    adapter_init: str = "paper",
    adapter_init_std: float = 0.02,
    reversible_layers: int | None = None,
    output_stream: str = "plm",
    exact: bool = True,
    frac_bits: int = 32,
    stream_bits: int = 64,
    audit: bool = True,
    loss_chunk_size: int = 256,
    compile_blocks: bool = False,
    recompute_chunk_tokens: int = 4096,
    offload_remainders: bool | str = "auto",
    chunk_attention_queries: bool = False,
) -> dict:
    """Checks MEFT settings and fills λ and β from the variant; returns them as a dict.
    Raises ValueError with a message meant for the user."""
    if variant not in VARIANT_DEFAULTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANT_DEFAULTS)}, got {variant!r}")
    lambda_ = VARIANT_DEFAULTS[variant]["lambda_"] if lambda_ is None else float(lambda_)
    beta = VARIANT_DEFAULTS[variant]["beta"] if beta is None else float(beta)
    for name, value in (("lambda", lambda_), ("beta", beta)):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a positive number, got {value}")
        if exact:
            try:
                denominator_of(value)
            except ValueError:
                raise ValueError(
                    f"{name}={value} is not 1/m for a positive integer m, which exact mode needs "
                    f"(e.g. 1, 0.1 = 1/10, 1/1024); use the float mode (exact=False) for other values"
                ) from None
    if not (isinstance(adapter_dim, int) and adapter_dim > 0):
        raise ValueError(f"adapter_dim must be a positive integer, got {adapter_dim!r}")
    if adapter_init not in ADAPTER_INITS:
        raise ValueError(f"adapter_init must be one of {', '.join(ADAPTER_INITS)}, got {adapter_init!r}")
    if not (math.isfinite(adapter_init_std) and adapter_init_std >= 0):
        raise ValueError(f"the adapters' init std must be >= 0, got {adapter_init_std}")
    if reversible_layers is not None and not (isinstance(reversible_layers, int) and reversible_layers >= 0):
        raise ValueError(f"reversible_layers must be a non-negative integer or None (all), got {reversible_layers!r}")
    if output_stream not in OUTPUT_STREAMS:
        raise ValueError(f"output_stream must be one of {', '.join(OUTPUT_STREAMS)}, got {output_stream!r}")
    if stream_bits not in (32, 64):
        raise ValueError(f"stream_bits must be 32 or 64, got {stream_bits!r}")
    # at least 4 integer bits: the streams must hold values of magnitude 8 and more
    max_frac = 27 if stream_bits == 32 else 48
    if not (isinstance(frac_bits, int) and 4 <= frac_bits <= max_frac):
        raise ValueError(f"frac_bits must be an integer in [4, {max_frac}] for {stream_bits}-bit streams, got {frac_bits!r}")
    if not (isinstance(loss_chunk_size, int) and loss_chunk_size >= 0):
        raise ValueError(f"loss_chunk_size must be a non-negative integer (0: off), got {loss_chunk_size!r}")
    if offload_remainders not in (True, False, "auto"):
        raise ValueError(f"offload_remainders must be true, false or \"auto\", got {offload_remainders!r}")
    if not (isinstance(recompute_chunk_tokens, int) and recompute_chunk_tokens >= 0):
        raise ValueError(f"recompute_chunk_tokens must be a non-negative integer (0: off), got {recompute_chunk_tokens!r}")
    if not isinstance(chunk_attention_queries, bool):
        raise ValueError(f"chunk_attention_queries must be true or false, got {chunk_attention_queries!r}")
    return dict(
        variant=variant,
        lambda_=lambda_,
        beta=beta,
        adapter_dim=adapter_dim,
        adapter_init=adapter_init,
        adapter_init_std=float(adapter_init_std),
        reversible_layers=reversible_layers,
        output_stream=output_stream,
        exact=bool(exact),
        frac_bits=frac_bits,
        stream_bits=stream_bits,
        audit=bool(audit),
        loss_chunk_size=loss_chunk_size,
        compile_blocks=bool(compile_blocks),
        recompute_chunk_tokens=recompute_chunk_tokens,
        offload_remainders=offload_remainders,
        chunk_attention_queries=chunk_attention_queries,
    )


MEFT_SETTINGS = tuple(validate_meft_settings())
# settings that change how training runs, not what the model computes: adapters trained under
# one value load under another
RUNTIME_SETTINGS = ("audit", "loss_chunk_size", "compile_blocks", "recompute_chunk_tokens", "offload_remainders",
                    "chunk_attention_queries")


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
            by default; turn it on for the longest sequences a memory cap allows.
        offload_remainders: in training on CUDA, keep the packed remainders in pinned host memory,
            copied on a side stream and fetched one half-step ahead in backward, so the GPU memory of
            exact MEFT stops growing with depth. "auto" (default): on for steps of at least
            OFFLOAD_MIN_TOKENS tokens, where an H200 measured it at under 1% of step time (Llama-3-8B,
            8k-32k tokens; benchmarks/README.md); off for shorter ones, whose steps wait on the host.
    """

    _plm_config_class: type = None  # set on each family's class

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


_CONFIG_CLASSES: dict[str, type] = {}


def config_class_name(family: Family) -> str:
    return "Meft" + family.config_class


def config_class_for(family: Family) -> type:
    name = config_class_name(family)
    if name not in _CONFIG_CLASSES:
        plm_config_class = getattr(transformers, family.config_class)
        _CONFIG_CLASSES[name] = type(
            name,
            (MeftConfig, plm_config_class),
            {
                # defined on the class itself so that transformers' dataclass machinery keeps it
                "__init__": MeftConfig.__init__,
                "model_type": "meft_" + family.model_type,
                "_plm_config_class": plm_config_class,
                "__module__": __name__,
                "__doc__": f"{plm_config_class.__name__} with MEFT settings.\n\n{MeftConfig.__doc__}",
            },
        )
    return _CONFIG_CLASSES[name]


def auto_map_for(family: Family, auto_classes: list[str]) -> dict[str, str]:
    """The `auto_map` a converted checkpoint's config.json carries: the one place it is built."""
    auto_map = {"AutoConfig": f"configuration_meft.{config_class_name(family)}"}
    for auto_class in auto_classes:
        auto_map[auto_class] = f"modeling_meft.Meft{family.head_for(auto_class).library_class}"
    return auto_map


def __getattr__(name: str):
    # `configuration_meft.MeftBertConfig` in auto_map resolves here
    for family in FAMILIES.values():
        if config_class_name(family) == name:
            return config_class_for(family)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["MeftConfig", "auto_map_for", "config_class_for", "family_for", "validate_meft_settings"]
