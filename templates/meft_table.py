"""The MEFT variants and settings, in one table that needs only the standard library.

This module owns:

- the variants (VARIANTS): for each, which blocks F and G are, whether the streams swap, the
  adapters a layer carries, the stream that follows the PLM, the streams it scales and the
  paper's λ and β;
- the MEFT settings: their defaults, written once (the signature of validate_meft_settings and
  the constants it uses), their checks (validate_meft_settings), their names (MEFT_SETTINGS),
  which of them only change how training runs (RUNTIME_SETTINGS), and the values some of them
  take (OUTPUT_STREAMS, ADAPTER_INITS);
- the arithmetic of exact mode's scales: denominator_of, and the packing of the remainders
  (remainder_layout, remainder_bits, packed_remainder_bytes, single_remainder_bits);
- the initial values of fresh adapters (adapter_generator, draw_adapter), in numpy, which only
  those functions import.

The checkpoint's code (configuration_meft.py, modeling_meft.py, reversible.py, adapters.py)
imports it, and so does the converter, which reads it without torch or transformers: nothing
here imports them, or a sibling module that does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
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
    """Bytes that `count` remainders modulo m take once packed."""
    k, bits = remainder_layout(m)
    return bits * (-(-(-(-count // k)) // 8))


# ------------------------------------------------------------------------------ the settings


def validate_meft_settings(
    variant: str = DEFAULT_VARIANT,
    lambda_: float | None = None,
    beta: float | None = None,
    adapter_dim: int = ADAPTER_DIM,
    adapter_init: str = "paper",
    adapter_init_std: float = ADAPTER_INIT_STD,
    reversible_layers: int | None = None,
    output_stream: str = "plm",
    exact: bool = True,
    frac_bits: int = 32,
    stream_bits: int = 64,
    audit: bool = True,
    loss_chunk_size: int = LOSS_CHUNK_SIZE,
    compile_blocks: bool = False,
    recompute_chunk_tokens: int = RECOMPUTE_CHUNK_TOKENS,
    offload_remainders: bool | str = "auto",
    chunk_attention_queries: bool = False,
) -> dict:
    """Checks MEFT settings and fills λ and β from the variant; returns them as a dict.
    Raises ValueError with a message meant for the user."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    lambda_ = VARIANTS[variant].lambda_ if lambda_ is None else float(lambda_)
    beta = VARIANTS[variant].beta if beta is None else float(beta)
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
    if compile_blocks and chunk_attention_queries:
        # compiled, an attention block is one function; query chunks need its parts
        raise ValueError("compile_blocks keeps every attention block whole, so chunk_attention_queries cannot apply; "
                         "turn one of them off")
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
