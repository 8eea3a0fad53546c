"""MeftSettings: the MEFT options of a conversion, one definition for `meft-convert` (whose
ConvertOptions extends it) and for `get_meft_model` (meft_convert/api.py), and what calibration
of them measures.

Each field carries its help text (the CLI's option help) in its metadata. Nothing here imports
torch: the CLI answers --help without it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields

from .errors import BadInputError
from .templates.meft_table import (
    ADAPTER_INITS,
    FRAC_BITS,
    OUTPUT_STREAMS,
    VARIANTS,
    ModelSettings,
    validate_meft_settings,
)

# fractional bits of 64-bit exact streams (and of float32 checkpoints' streams, which calibration
# does not size): the table's default
FRAC_BITS_64 = FRAC_BITS


def _option(help: str, **extra) -> dict:
    return {"help": help, **extra}


@dataclass
class MeftSettings:
    """How a pretrained model becomes a MEFT model: the variant, its scales, the adapters and
    the arithmetic of the reversible layers. `auto` values are measured on the model
    (meft_convert/calibrate.py) when it is converted."""

    variant: str = field(
        default=ModelSettings.variant,
        metadata=_option(
            "meft1: F = PLM layer, G = adapter (β = 1). meft2: F = adapter, G = PLM layer (λ = 1). "
            "meft3: F = attention block, G = MLP block. The scaled streams' λ, β: --lambda, --beta.",
            choices=tuple(VARIANTS),
        ),
    )
    adapter_dim: int = field(
        default=ModelSettings.adapter_dim, metadata=_option("Bottleneck width r of the adapters (d → r → d).")
    )
    lambda_: float | str | None = field(
        default="auto",
        metadata=_option(
            "Scale λ of stream x1. auto: measured at conversion, the largest 2^-k that keeps the starting point "
            "(MEFT1 and MEFT3; 1 in MEFT2). Or a value used as given; exact mode needs 1/m: 0.1, 1/1024, 2^-10.",
            flags=("--lambda",),
            scale=True,
        ),
    )
    beta: float | str | None = field(
        default="auto",
        metadata=_option("Scale β of stream x2 (auto: measured, in MEFT2 and MEFT3; 1 in MEFT1); like --lambda.", scale=True),
    )
    init_std: float = field(
        default=ModelSettings.adapter_init_std, metadata=_option("σ of the adapters' N(0, σ²) initialisation.")
    )
    adapter_init: str = field(
        default="auto",
        metadata=_option(
            "paper: both projections N(0, σ²). zero: the up-projection starts at zero, so adapters output exactly 0. "
            "auto: zero, which keeps the starting point exactly; the paper init's cost is measured and reported.",
            choices=("auto", *ADAPTER_INITS),
        ),
    )
    stream_bits: str = field(
        default="auto",
        metadata=_option(
            "Width of the exact streams' integers. auto: 32 for fp16/bf16 checkpoints (fractional bits from the "
            "hidden-state range measured at conversion, with a 16x margin), 64 for float32 (32 fractional bits).",
            choices=("auto", "32", "64"),
        ),
    )
    allow_low_fidelity: bool = field(
        default=False,
        metadata=_option(
            "Keep a conversion whose verification misses the starting-point target or, in float mode, the "
            "reconstruction and gradient bounds; the model card states what was lost.",
            flag_only=True,
        ),
    )
    reversible_layers: int | None = field(
        default=ModelSettings.reversible_layers,
        metadata=_option("Only the lowest K layers recompute activations; the rest store them (default: all).", metavar="K"),
    )
    output_stream: str = field(
        default=ModelSettings.output_stream,
        metadata=_option(
            "plm: return the stream that follows the pretrained layers (best starting point). "
            "mean: the paper's (x1 + x2) / 2.",
            choices=OUTPUT_STREAMS,
        ),
    )
    exact: bool = field(
        default=ModelSettings.exact,
        metadata=_option("Exact fixed-point reconstruction (default), or the paper's approximate float one."),
    )
    seed: int = field(default=0, metadata=_option("Seed of the adapters' initialisation."))

    def __post_init__(self):
        # the CLI gives the stream width as text (a choice); Python callers may give a number
        if isinstance(self.stream_bits, int) and not isinstance(self.stream_bits, bool):
            self.stream_bits = str(self.stream_bits)

    @classmethod
    def help(cls, name: str) -> str:
        """The help text of field `name` (the CLI's option help)."""
        return next(f.metadata["help"] for f in fields(cls) if f.name == name)

    def requested(self) -> dict:
        """The settings calibration decides, as given: "auto" or a value (None counts as auto)."""
        values = {"lambda_": self.lambda_, "beta": self.beta, "adapter_init": self.adapter_init, "stream_bits": self.stream_bits}
        return {key: "auto" if value is None else value for key, value in values.items()}

    def meft_settings(self, resolved: dict | None = None) -> dict:
        """The MEFT settings; `auto` ones take `resolved` (calibration's choice) or, before
        calibration, a stand-in that passes the checks."""
        requested = {**self.requested(), **(resolved or {})}
        # an unknown variant fails the checks below, by name
        scaled = VARIANTS[self.variant].scaled if self.variant in VARIANTS else ()
        scales = {
            key: (2.0**-10 if key in scaled else 1.0) if requested[key] == "auto" else requested[key] for key in ("lambda_", "beta")
        }
        stream_bits = 64 if requested["stream_bits"] == "auto" else int(requested["stream_bits"])
        try:
            return validate_meft_settings(
                variant=self.variant,
                lambda_=scales["lambda_"],
                beta=scales["beta"],
                adapter_dim=self.adapter_dim,
                adapter_init="zero" if requested["adapter_init"] == "auto" else requested["adapter_init"],
                adapter_init_std=self.init_std,
                reversible_layers=self.reversible_layers,
                output_stream=self.output_stream,
                exact=self.exact,
                stream_bits=stream_bits,
                frac_bits=resolved.get("frac_bits", FRAC_BITS_64) if resolved else (FRAC_BITS_64 if stream_bits == 64 else 16),
            )
        except ValueError as e:
            raise setting_error(e) from None

    def measured(self, sixteen_bit: bool) -> bool:
        """Whether calibration measures anything on the model (in fp16/bf16 if `sixteen_bit`):
        a setting left to auto, or the range that 32-bit exact streams are sized from."""
        requested = self.requested()
        stream_bits = requested["stream_bits"]
        needs_range = self.exact and (stream_bits == "32" or (stream_bits == "auto" and sixteen_bit))
        return "auto" in (requested["lambda_"], requested["beta"], requested["adapter_init"]) or needs_range

    def unmeasured(self) -> dict | None:
        """What calibration resolves where it measures nothing (measured() is false): nothing
        (None), unless allow_low_fidelity is set, which the record then states."""
        if not self.allow_low_fidelity:
            return None
        requested = self.requested()
        stream_bits = "64" if requested["stream_bits"] == "auto" else requested["stream_bits"]
        calibration = {"measured": False, "allow_low_fidelity": True}
        return {**requested, "stream_bits": stream_bits, "frac_bits": FRAC_BITS_64, "calibration": calibration}


# the names validate_meft_settings and the config classes use in their messages, and the flags
# they are set with on the command line
_SETTING_FLAGS = [
    (r"\(exact=False\)", "(--no-exact)"),
    (r"\bexact=False\b", "--no-exact"),
    (r"\b(lambda|beta)=", r"--\1 "),
    (r"^(lambda|beta|variant)\b", r"--\1"),
    (r"\badapter_dim\b", "--adapter-dim"),
    (r"\badapter_init\b", "--adapter-init"),
    (r"\bthe adapters' init std\b", "--init-std"),
    (r"\breversible_layers=", "--reversible-layers "),
    (r"\breversible_layers\b", "--reversible-layers"),
    (r"\boutput_stream\b", "--output-stream"),
]


def setting_error(error: ValueError) -> BadInputError:
    """A settings check's message as BadInputError, with its command line version: flags, not fields."""
    message = cli_message = str(error)
    for pattern, flag in _SETTING_FLAGS:
        cli_message = re.sub(pattern, flag, cli_message)
    return BadInputError(message, cli_message=cli_message)
