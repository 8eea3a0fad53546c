"""The MEFT variants and settings, in one table that needs only the standard library.

This module owns:

- the variants (VARIANTS): for each, which blocks F and G are, whether the streams swap, the
  adapters a layer carries, the stream that follows the PLM, the streams it scales and the
  paper's λ and β;
- the MEFT settings of a converted model (ModelSettings): their names, defaults (written once,
  there or in the constants it uses), documentation and checks; the converter's options, the
  config classes, the memory estimate and the engine take them from there (MEFT_SETTINGS,
  RUNTIME_SETTINGS: those that only change how training runs, validate_meft_settings);
- the arithmetic of exact mode's scales: denominator_of, and the packing of the remainders
  (remainder_layout, remainder_bits, packed_remainder_bytes, single_remainder_bits);
- the initial values of fresh adapters (adapter_generator, draw_adapter), in numpy, which only
  those functions import.

The checkpoint's code (configuration_meft.py, modeling_meft.py, reversible.py, adapters.py)
imports it, and so does the converter, which reads it without torch or transformers: nothing
here imports them, or a sibling module that does.
"""

from __future__ import annotations

import functools
import math
import textwrap
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np


@dataclass(frozen=True)
class Variant:
    F: str  # "layer", "adapter" or "attention"
    G: str  # "layer", "adapter" or "mlp"
    swap: bool  # swap the streams after each layer
    adapters: tuple[str, ...]  # the adapters each layer carries
    plm_stream: int  # which final stream (0 = x1, 1 = x2) holds the PLM path's output
    # the streams it scales, by the setting of their scale: "lambda_" (x1), "beta" (x2); the
    # scale of any other stream stays 1
    scaled: tuple[str, ...]
    lambda_: float  # the paper's λ
    beta: float  # the paper's β


VARIANTS = {
    # with the swap, F's output y1 becomes the next layer's x2 and G's output y2 its x1
    "meft1": Variant(F="layer", G="adapter", swap=True, adapters=("ffn", "coupling"), plm_stream=1,
                     scaled=("lambda_",), lambda_=0.1, beta=1.0),
    "meft2": Variant(F="adapter", G="layer", swap=True, adapters=("coupling", "ffn"), plm_stream=0,
                     scaled=("beta",), lambda_=1.0, beta=0.1),
    "meft3": Variant(F="attention", G="mlp", swap=False, adapters=("attn", "ffn"), plm_stream=1,
                     scaled=("lambda_", "beta"), lambda_=0.1, beta=0.1),
}
OUTPUT_STREAMS = ("plm", "mean")
ADAPTER_INITS = ("paper", "zero")

# the defaults that the converter's options and the memory estimate take up too
DEFAULT_VARIANT = "meft3"
ADAPTER_DIM = 8
ADAPTER_INIT_STD = 0.02
LOSS_CHUNK_SIZE = 256
RECOMPUTE_CHUNK_TOKENS = 4096
FRAC_BITS = 32  # fractional bits of 64-bit streams, and of the streams a model gets by default


# ------------------------------------------------------------------ exact mode's remainders


def denominator_of(scale: float) -> int:
    """m such that scale == 1/m; ValueError if scale is not of that form."""
    if not scale > 0:
        raise ValueError(f"scale factors must be > 0, got {scale}")
    m = round(1.0 / scale)
    if m < 1 or abs(m * scale - 1.0) > 1e-9:
        raise ValueError(f"{scale} is not 1/m for a positive integer m")
    return m


def single_remainder_bits(m: int) -> int:
    """Bits of one remainder modulo m stored on its own: ⌈log2 m⌉ (0 for m = 1)."""
    return (m - 1).bit_length()


def remainder_layout(m: int) -> tuple[int, int]:
    """(k, bits): k remainders modulo m are stored together as one number below m^k in `bits`
    bits, k ≤ 8 chosen for the fewest bits per remainder. m = 10: three remainders in 10 bits
    (3.33 bits each, where one at a time would take 4); m = 2^j: one in j bits; m = 1: none."""
    if m == 1:
        return 1, 0
    best_k, best_bits = 1, single_remainder_bits(m)
    for k in range(2, 9):
        if m**k > 2**62:
            break
        bits = (m**k - 1).bit_length()
        if bits * best_k < best_bits * k:
            best_k, best_bits = k, bits
    return best_k, best_bits


def remainder_bits(m: int) -> float:
    """Bits per element that one stream scaled by 1/m keeps per layer."""
    k, bits = remainder_layout(m)
    return bits / k


def packed_remainder_bytes(m: int, count: int) -> int:
    """Bytes that `count` remainders modulo m take once packed (fixed_point._pack_bits): their
    groups of k, a byte plane per whole byte of `bits`, then eight groups' leftover bits (bits %
    8 each) to every `bits % 8` bytes."""
    k, bits = remainder_layout(m)
    groups = -(-count // k)
    return bits // 8 * groups + bits % 8 * -(-groups // 8)


# ------------------------------------------------------------------------------ the settings


def _setting(default, doc: str, runtime: bool = False):
    """A field of ModelSettings: its default, its documentation (MeftConfig's docstring and the
    options that set it) and whether it only changes how training runs (RUNTIME_SETTINGS)."""
    return field(default=default, metadata={"doc": doc, "runtime": runtime})


@dataclass(frozen=True)
class ModelSettings:
    """The MEFT settings of a converted model, as its config.json holds them: the one definition
    of their names, defaults, documentation and checks. Building one checks the values (ValueError
    with a message meant for the user) and fills λ and β from the variant."""

    variant: str = _setting(
        DEFAULT_VARIANT,
        '"meft1" (F = PLM layer, G = adapter), "meft2" (F = adapter, G = PLM layer) or "meft3" (F = attention '
        "block, G = MLP block).")
    lambda_: float | None = _setting(
        None,
        "Scale of x1 in the coupling; None takes the paper's default for the variant. Exact mode needs 1/m for "
        "a positive integer m.")
    beta: float | None = _setting(None, "Scale of x2 in the coupling; like lambda_.")
    adapter_dim: int = _setting(ADAPTER_DIM, "Bottleneck width r of every adapter.")
    adapter_init: str = _setting("paper", '"paper" (both projections N(0, σ²)) or "zero" (up-projection 0).')
    adapter_init_std: float = _setting(
        ADAPTER_INIT_STD, "σ of the adapter initialisation (named so as not to clash with OPT's own `init_std`).")
    reversible_layers: int | None = _setting(
        None,
        "How many of the lowest layers recompute their inputs in backward; None means all. The layers above "
        "store activations as usual (the paper's hybrid).")
    output_stream: str = _setting(
        "plm", '"plm", the stream that follows the pretrained layers, or "mean", the paper\'s (x1 + x2) / 2.')
    exact: bool = _setting(
        True,
        "int64 fixed-point streams with an exact inverse (default), or the paper's float reconstruction, which "
        "is approximate.")
    frac_bits: int = _setting(FRAC_BITS, "Fractional bits K of the fixed-point streams.")
    stream_bits: int = _setting(
        64,
        "Width of the stream integers, 64 (int64) or 32 (int32: half the memory; the streams then hold values "
        "below 2^(31 - frac_bits) in magnitude). Conversion picks both from the hidden-state range it measures.")
    audit: bool = _setting(
        True, "Compare a checksum of every layer's input with its reconstruction in backward.", runtime=True)
    loss_chunk_size: int = _setting(
        LOSS_CHUNK_SIZE,
        "Causal LMs only: in training, the LM head and its loss run on this many tokens at a time, so the full "
        "logits never exist (0: the library's loss, all at once).",
        runtime=True)
    compile_blocks: bool = _setting(
        False,
        "In training, run each attention/MLP block through torch.compile (one compiled function shared by all "
        "layers; the first steps compile). On an H200, OPT-1.3b shape: 8% less activation memory for MEFT1/2 "
        "and 10% fewer kernel launches; the step time did not improve (benchmarks/README.md). Not with "
        "chunk_attention_queries.",
        runtime=True)
    recompute_chunk_tokens: int = _setting(
        RECOMPUTE_CHUNK_TOKENS,
        "In training, the position-wise parts of every block (MLP blocks, adapters; in LLaMA, Mistral and Qwen2 "
        "also the attention's norm, q/k/v and output projections and rotary embedding, so that only its core "
        "sees the whole sequence) and the stream arithmetic run this many tokens at a time, in forward and in "
        "the backward recompute, so one layer's working set stops growing with sequence x FFN width (0: all "
        "tokens at once). Gradients equal plain autograd's through the same chunks. With compile_blocks, or "
        "FSDP2 sharding the attention's modules (fsdp_units), the attention block stays whole.",
        runtime=True)
    offload_remainders: bool | str = _setting(
        "auto",
        "In training on CUDA, keep the packed remainders in pinned host memory, copied on a side stream and "
        "fetched one half-step ahead in backward, so the GPU memory of exact MEFT stops growing with depth. "
        '"auto" (default): on for steps of at least OFFLOAD_MIN_TOKENS tokens, where an H200 measured it at '
        "under 1% of step time (Llama-3-8B, 8k-32k tokens; benchmarks/README.md); off for shorter ones, whose "
        "steps wait on the host.",
        runtime=True)
    chunk_attention_queries: bool = _setting(
        False,
        "In training, causal attention through SDPA (LLaMA, Mistral, Qwen2, OPT) runs recompute_chunk_tokens "
        "queries at a time as well, each chunk reading the keys and values up to its end, so the whole attention "
        "block, not only its position-wise parts, works a chunk at a time: only keys and values (with "
        "grouped-query attention a quarter of the hidden size or less) and their gradients cover the whole "
        "sequence. Gradients equal plain autograd's through the same chunks. A chunk past a sequence's first "
        "is aligned to the lower right of its keys, which cuDNN's causal mask is not: on CUDA in 16-bit it runs "
        "as two cuDNN calls (the keys before the chunk, and the chunk's own square) merged by their "
        "log-sum-exps, checked against SDPA once per kind of chunk, else on SDPA's flash kernel. On an H200 "
        "(Llama-3-8B, 16k tokens, MEFT1) it saved 0.49 GiB (11%) of activation memory on the GPU and cost 4.6% "
        "of step time (benchmarks/README.md). Off by default; turn it on for the longest sequences a memory "
        "cap allows. Not with compile_blocks, which keeps every attention block whole.",
        runtime=True)

    def __post_init__(self):
        variant, exact, stream_bits = self.variant, self.exact, self.stream_bits
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
        # frozen: the scales the variant fills in, and the normalised values, are set once here
        set_value = functools.partial(object.__setattr__, self)
        set_value("lambda_", VARIANTS[variant].lambda_ if self.lambda_ is None else float(self.lambda_))
        set_value("beta", VARIANTS[variant].beta if self.beta is None else float(self.beta))
        for name, value in (("lambda", self.lambda_), ("beta", self.beta)):
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
        if not (isinstance(self.adapter_dim, int) and self.adapter_dim > 0):
            raise ValueError(f"adapter_dim must be a positive integer, got {self.adapter_dim!r}")
        if self.adapter_init not in ADAPTER_INITS:
            raise ValueError(f"adapter_init must be one of {', '.join(ADAPTER_INITS)}, got {self.adapter_init!r}")
        if not (math.isfinite(self.adapter_init_std) and self.adapter_init_std >= 0):
            raise ValueError(f"the adapters' init std must be >= 0, got {self.adapter_init_std}")
        layers = self.reversible_layers
        if layers is not None and not (isinstance(layers, int) and layers >= 0):
            raise ValueError(f"reversible_layers must be a non-negative integer or None (all), got {layers!r}")
        if self.output_stream not in OUTPUT_STREAMS:
            raise ValueError(f"output_stream must be one of {', '.join(OUTPUT_STREAMS)}, got {self.output_stream!r}")
        if stream_bits not in (32, 64):
            raise ValueError(f"stream_bits must be 32 or 64, got {stream_bits!r}")
        # at least 4 integer bits: the streams must hold values of magnitude 8 and more
        max_frac = 27 if stream_bits == 32 else 48
        if not (isinstance(self.frac_bits, int) and 4 <= self.frac_bits <= max_frac):
            raise ValueError(
                f"frac_bits must be an integer in [4, {max_frac}] for {stream_bits}-bit streams, got {self.frac_bits!r}")
        if not (isinstance(self.loss_chunk_size, int) and self.loss_chunk_size >= 0):
            raise ValueError(f"loss_chunk_size must be a non-negative integer (0: off), got {self.loss_chunk_size!r}")
        if self.offload_remainders not in (True, False, "auto"):
            raise ValueError(f"offload_remainders must be true, false or \"auto\", got {self.offload_remainders!r}")
        chunk = self.recompute_chunk_tokens
        if not (isinstance(chunk, int) and chunk >= 0):
            raise ValueError(f"recompute_chunk_tokens must be a non-negative integer (0: off), got {chunk!r}")
        if not isinstance(self.chunk_attention_queries, bool):
            raise ValueError(f"chunk_attention_queries must be true or false, got {self.chunk_attention_queries!r}")
        if self.compile_blocks and self.chunk_attention_queries:
            # compiled, an attention block is one function; query chunks need its parts
            raise ValueError("compile_blocks keeps every attention block whole, so chunk_attention_queries cannot apply; "
                             "turn one of them off")
        for name in ("adapter_init_std",):
            set_value(name, float(getattr(self, name)))
        for name in ("exact", "audit", "compile_blocks"):
            set_value(name, bool(getattr(self, name)))

    @classmethod
    def documentation(cls, indent: str = "    ", width: int = 100) -> str:
        """The settings as the "Args:" section of a docstring (MeftConfig's)."""
        lines = ["Args:"]
        for f in fields(cls):
            lines += textwrap.wrap(f"{f.name}: {f.metadata['doc']}", width, initial_indent=indent,
                                   subsequent_indent=indent * 2)
        return "\n".join(lines)


def validate_meft_settings(**settings) -> dict:
    """Checks MEFT settings (ModelSettings' names) and fills λ and β from the variant; returns them
    all, defaults included, as a dict. Raises ValueError with a message meant for the user, and
    TypeError for a name that is no setting."""
    return asdict(ModelSettings(**settings))


MEFT_SETTINGS = tuple(f.name for f in fields(ModelSettings))
# settings that change how training runs, not what the model computes: adapters trained under
# one value load under another
RUNTIME_SETTINGS = tuple(f.name for f in fields(ModelSettings) if f.metadata["runtime"])


# -------------------------------------------------------------------- fresh adapters' values


def adapter_generator(seed: int) -> np.random.Generator:
    """The random generator fresh adapters are drawn from: one per conversion, seeded by its `seed`."""
    import numpy as np  # here, not at the top: loading a checkpoint never draws adapters

    return np.random.Generator(np.random.PCG64(seed))


def draw_adapter(
    generator: np.random.Generator, hidden_size: int, adapter_dim: int, init: str, init_std: float
) -> dict[str, np.ndarray]:
    """The float32 tensors of one fresh adapter, by parameter name in the adapter's order:
    N(0, σ²) projection weights (a zero up-projection for init "zero") and zero biases, drawn
    in float64 and rounded to float32. Plain numpy, so that a conversion that builds no model
    draws the same adapters as one that does."""
    import numpy as np

    def normal(shape: tuple[int, int]) -> np.ndarray:
        return generator.normal(0.0, init_std, size=shape).astype(np.float32)

    down = normal((adapter_dim, hidden_size))
    up = np.zeros((hidden_size, adapter_dim), np.float32) if init == "zero" else normal((hidden_size, adapter_dim))
    return {
        "down_proj.weight": down,
        "down_proj.bias": np.zeros(adapter_dim, np.float32),
        "up_proj.weight": up,
        "up_proj.bias": np.zeros(hidden_size, np.float32),
    }
