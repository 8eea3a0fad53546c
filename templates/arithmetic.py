"""The two arithmetics of a coupling, exact and float, and the settings they follow.

`ExactArithmetic` keeps the streams as fixed-point integers and inverts a half-step exactly from
its remainders; `FloatArithmetic` is the paper's float coupling, inverted approximately by
dividing. Each says how a stream starts, how a chunk of rows is coupled and uncoupled, and where
a half-step's output lands (`_HalfStepOutput`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .blocks import _part, _row_slices
from .fixed_point import (
    _couple,
    _int_dtype,
    _run_kernel,
    _start,
    _uncouple,
    denominator_of,
    max_stream_value,
    stream_dtype_for,
)

@dataclass(frozen=True)
class CouplingSettings:
    """How the two streams are coupled; the same for every layer of a stack.

    lambda_ and beta scale x1 and x2. In exact mode they must be 1/m for positive
    integers m, given as lambda_m and beta_m; in float mode any positive value works.
    """

    lambda_: float
    beta: float
    swap: bool  # swap the two streams after every layer (MEFT1 and MEFT2 do)
    exact: bool = True
    frac_bits: int = 32
    audit: bool = True
    stream_bits: int = 64  # width of the stream integers: 64, or 32 for 16-bit models
    chunk_tokens: int = 0  # tokens per chunk of position-wise work and coupling arithmetic (0: all)
    offload_remainders: bool = False  # keep the packed remainders in pinned host memory (CUDA)

    @property
    def lambda_m(self) -> int:
        return denominator_of(self.lambda_)

    @property
    def beta_m(self) -> int:
        return denominator_of(self.beta)


@dataclass
class Stream:
    """One of the two streams.

    ints: its fixed-point integers (exact mode; None in float mode, where the value is the
    stream); value: its real value in the dtype the blocks read; checksum: the sum of its
    integers, which the audit compares with the rebuilt stream's."""

    ints: torch.Tensor | None
    value: torch.Tensor
    checksum: torch.Tensor | None = None


class ExactArithmetic:
    """Integer streams: y = floor(x / m) + fix(out), inverted exactly with the remainder."""

    exact = True

    def __init__(self, settings: CouplingSettings, value_dtype: torch.dtype):
        self.frac_bits, self.value_dtype = settings.frac_bits, value_dtype
        self.int_dtype = _int_dtype(settings.stream_bits)
        self.chunk_tokens = settings.chunk_tokens

    def factor(self, scale: float) -> int:
        return denominator_of(scale)

    def start(self, x: torch.Tensor) -> tuple[Stream, torch.Tensor]:
        """The stream x starts, a chunk of rows at a time: the conversion's wide temporaries
        cost a chunk, not the sequence."""
        x = x.detach().contiguous()
        slices = _row_slices(x, self.chunk_tokens)
        if len(slices) == 1:
            ints, value, total, flag = _run_kernel(_start, x, self.frac_bits, self.int_dtype, self.value_dtype)
            return Stream(ints, value, total), flag
        ints = torch.empty(x.shape, dtype=self.int_dtype, device=x.device)
        value = torch.empty(x.shape, dtype=self.value_dtype, device=x.device)
        total = flag = None
        for sl in slices:
            part_ints, part_value, part_sum, part_flag = _run_kernel(_start, _part(x, sl), self.frac_bits, self.int_dtype,
                                                                     self.value_dtype)
            _part(ints, sl).copy_(part_ints)
            _part(value, sl).copy_(part_value)
            total = part_sum if total is None else total + part_sum
            flag = part_flag if flag is None else flag | part_flag
        return Stream(ints, value, total), flag

    def couple(self, x_part: torch.Tensor, out: torch.Tensor, m: int):
        """-> (y integers, y value, packed remainders, range flag, checksum) of one chunk."""
        return _run_kernel(_couple, x_part, out, m, self.frac_bits, self.value_dtype)

    def uncouple(self, y_part: torch.Tensor, out: torch.Tensor, packed, m: int):
        """-> (x integers, x value, checksum) of one chunk."""
        return _run_kernel(_uncouple, y_part, out, packed, m, self.frac_bits, self.value_dtype)


class FloatArithmetic:
    """The paper's float coupling: y = scale·x + out, inverted approximately by dividing."""

    exact = False

    def __init__(self, settings: CouplingSettings, value_dtype: torch.dtype):
        self.value_dtype = value_dtype

    def factor(self, scale: float) -> float:
        return scale

    def start(self, x: torch.Tensor) -> tuple[Stream, None]:
        return Stream(None, x.detach().to(self.value_dtype)), None

    def couple(self, x_part: torch.Tensor, out: torch.Tensor, scale: float):
        y = x_part * scale + out.to(x_part.dtype)
        return None, y, None, None, None

    def uncouple(self, y_part: torch.Tensor, out: torch.Tensor, packed, scale: float):
        return None, (y_part - out.to(y_part.dtype)) / scale, None


def arithmetic_for(settings: CouplingSettings, compute_dtype: torch.dtype):
    # exact streams hand blocks values in the compute dtype; float streams stay in float32
    if settings.exact:
        return ExactArithmetic(settings, compute_dtype)
    return FloatArithmetic(settings, stream_dtype_for(compute_dtype))


def _raise_if_out_of_range(flags: list, names: list[str], settings: CouplingSettings, couplings: Sequence = ()) -> None:
    if flags and bool(torch.stack(flags).any()):
        first = next(i for i, f in enumerate(flags) if bool(f))
        broken = [c.name for c in couplings if any(not bool(torch.isfinite(p).all()) for p in c.params)]
        if broken:
            cause = (
                f"the trainable parameters of {', '.join(broken[:3])} hold NaN or inf: an optimizer step diverged "
                "(a learning rate too high, or 16-bit trainable weights: keep them in float32, as from_pretrained does)"
            )
        else:
            cause = (
                "usual causes: fp16 overflow, fully masked attention rows, a diverged training run, or hidden states "
                "larger than the conversion measured (convert again with more integer bits: --stream-bits 64)"
            )
        limit = max_stream_value(settings.frac_bits, settings.stream_bits)
        raise FloatingPointError(
            f"{names[first]} produced NaN, inf or values of magnitude >= {limit:g}, outside the exact fixed-point "
            f"range ({settings.stream_bits}-bit streams, frac_bits={settings.frac_bits}); {cause}."
        )


class _HalfStepOutput:
    """Where a half-step's chunks land. One chunk: the kernels' own output tensors are kept (two
    passes fewer). Several: the integers overwrite the input stream's in place (two stream-integer
    tensors alive, not three) and the values fill one new tensor. Without `keep_values` the
    values are dropped (exact mode: a rebuilt stream no block reads again)."""

    def __init__(self, arith, stream: Stream, shape, device, chunks: int, keep_values: bool = True):
        self.arith, self.single, self.keep_values = arith, chunks == 1, keep_values
        self.ints = stream.ints
        self.value = None if self.single or not keep_values else torch.empty(shape, dtype=arith.value_dtype, device=device)
        self.checksum = None

    def part(self, stream: Stream, sl: slice) -> torch.Tensor:
        """The chunk of the input stream the arithmetic reads: its integers, or in float mode its value."""
        return _part(stream.ints if self.arith.exact else stream.value, sl)

    def put(self, sl: slice, stream_part: torch.Tensor, ints, value, part_sum) -> None:
        if self.single:
            self.ints, self.value = ints, value if self.keep_values else None
        else:
            if self.arith.exact:
                stream_part.copy_(ints)
            if self.keep_values:
                _part(self.value, sl).copy_(value)
        if self.arith.exact:
            self.checksum = part_sum if self.checksum is None else self.checksum + part_sum

    def let_go_of(self, stream: Stream) -> None:
        """Drops the integers of the stream this output was made from: in one chunk the output
        has integers of its own, and the caller's reference to the input must not keep a third
        stream alive for the rest of the layer (several chunks write in place: nothing to drop)."""
        if self.single and self.arith.exact:
            stream.ints = None

    def stream(self) -> Stream:
        return Stream(self.ints if self.arith.exact else None, self.value, self.checksum)
