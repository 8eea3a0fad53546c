"""The two arithmetics of a coupling, exact and float, and the settings they follow.

`ExactArithmetic` keeps the streams as fixed-point integers and inverts a half-step exactly from
its remainders; `FloatArithmetic` is the paper's float coupling, inverted approximately by
dividing. Every difference between the two lives here: how a stream starts and what it holds,
how a chunk of rows is coupled and uncoupled and where the result lands (`HalfStepOutput`), what
a half-step keeps for backward, which values may be dropped, the range check and the audit, and
the same coupling under plain autograd (the vanilla path).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .blocks import _part, _row_slices
from .labels import labelled
from .meft_table import ModelSettings, denominator_of
from .fixed_point import (
    _couple,
    _int_dtype,
    _run_kernel,
    _start,
    _uncouple,
    max_stream_value,
    stream_dtype_for,
)


@dataclass(frozen=True)
class CouplingSettings:
    """How the two streams are coupled; the same for every layer of a stack.

    lambda_ and beta scale x1 and x2. In exact mode they must be 1/m for positive
    integers m (denominator_of); in float mode any positive value works.
    """

    lambda_: float
    beta: float
    swap: bool  # swap the two streams after every layer (MEFT1 and MEFT2 do)
    # the defaults of a converted model's settings (meft_table.ModelSettings)
    exact: bool = ModelSettings.exact
    frac_bits: int = ModelSettings.frac_bits
    audit: bool = ModelSettings.audit
    stream_bits: int = ModelSettings.stream_bits  # width of the stream integers: 64, or 32 for 16-bit models
    chunk_tokens: int = 0  # tokens per chunk of position-wise work and coupling arithmetic (0: all)
    offload_remainders: bool = False  # keep the packed remainders in pinned host memory (CUDA)


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

    def __init__(self, settings: CouplingSettings, value_dtype: torch.dtype):
        self.settings = settings
        self.frac_bits, self.value_dtype = settings.frac_bits, value_dtype
        self.int_dtype = _int_dtype(settings.stream_bits)
        self.chunk_tokens = settings.chunk_tokens

    def factor(self, scale: float) -> int:
        return denominator_of(scale)

    def stream_input(self, x: torch.Tensor) -> torch.Tensor:
        """The stack input as the streams start from it: exact streams read it in its own dtype."""
        return x

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

    def twin(self, x: Stream) -> Stream:
        """The second stream, starting where x starts: integers of its own, overwritten in place."""
        return Stream(x.ints.clone(), x.value, x.checksum)

    def couple(self, x_part: torch.Tensor, out: torch.Tensor, m: int):
        """-> (y integers, y value, packed remainders, range flag, checksum) of one chunk."""
        return _run_kernel(_couple, x_part, out, m, self.frac_bits, self.value_dtype)

    def uncouple(self, y_part: torch.Tensor, out: torch.Tensor, packed, m: int):
        """-> (x integers, x value, checksum) of one chunk."""
        return _run_kernel(_uncouple, y_part, out, packed, m, self.frac_bits, self.value_dtype)

    def output(self, source: Stream, shape, device, chunks: int, keep_values: bool = True,
               flags: list | None = None) -> "HalfStepOutput":
        """Where a half-step made from `source` lands; range flags go to `flags`."""
        return _ExactOutput(self, source, shape, device, chunks, keep_values, flags)

    def kept_remainders(self, packed: list) -> list:
        """What a half-step keeps for backward: its chunks' packed remainders."""
        return packed

    def keeps_value(self, needed: bool) -> bool:
        """Whether a rebuilt stream keeps its value: only where a block reads it again."""
        return needed

    def drop_value(self, stream: Stream) -> None:
        """Lets go of a stream's value once no block reads it (its integers are the stream)."""
        stream.value = None

    def for_backward(self, streams: tuple[Stream, Stream], g_input: torch.Tensor) -> list[Stream]:
        """The final streams as backward needs them: of their values only the top G's input,
        which is also the tensor returned to the caller."""
        return [Stream(t.ints, t.value if t.value is g_input else None, t.checksum) for t in streams]

    @labelled("checksums")
    def checksums(self, x1: Stream, x2: Stream) -> torch.Tensor | None:
        """The audit's fingerprint of a layer's two input streams (None: no audit)."""
        return torch.stack([x1.checksum, x2.checksum]) if self.settings.audit else None

    def trace_state(self, x1: Stream, x2: Stream) -> tuple[torch.Tensor, torch.Tensor]:
        """What a trace records of a layer's input: the integers."""
        return x1.ints, x2.ints

    def check_range(self, flags: list, names: list[str], couplings: Sequence = ()) -> None:
        _raise_if_out_of_range(flags, names, self.settings, couplings)

    # the same arithmetic under plain autograd: the vanilla path, and the reversible path's oracle

    def vanilla_start(self, h: torch.Tensor, flags: list) -> Stream:
        value, ints = _Start.apply(h, self, flags)
        return Stream(ints, value)

    def vanilla_couple(self, x: Stream, block_out: torch.Tensor, scale: float, flags: list) -> Stream:
        value, ints = _ExactCouple.apply(x.value, block_out, x.ints, scale, self, self.chunk_tokens, flags)
        return Stream(ints, value)


class FloatArithmetic:
    """The paper's float coupling: y = scale·x + out, inverted approximately by dividing."""

    def __init__(self, settings: CouplingSettings, value_dtype: torch.dtype):
        self.settings = settings
        self.value_dtype = value_dtype

    def factor(self, scale: float) -> float:
        return scale

    def stream_input(self, x: torch.Tensor) -> torch.Tensor:
        """Float streams are kept in at least float32."""
        return x.to(self.value_dtype)

    def start(self, x: torch.Tensor) -> tuple[Stream, None]:
        return Stream(None, x.detach().to(self.value_dtype)), None

    def twin(self, x: Stream) -> Stream:
        return Stream(None, x.value)

    def couple(self, x_part: torch.Tensor, out: torch.Tensor, scale: float):
        y = x_part * scale + out.to(x_part.dtype)
        return None, y, None, None, None

    def uncouple(self, y_part: torch.Tensor, out: torch.Tensor, packed, scale: float):
        return None, (y_part - out.to(y_part.dtype)) / scale, None

    def output(self, source: Stream, shape, device, chunks: int, keep_values: bool = True,
               flags: list | None = None) -> "HalfStepOutput":
        return _FloatOutput(self, source, shape, device, chunks, keep_values)

    def kept_remainders(self, packed: list) -> list:
        return []  # the float inverse divides: nothing to keep

    def keeps_value(self, needed: bool) -> bool:
        return True  # the value is the stream

    def drop_value(self, stream: Stream) -> None:
        pass

    def for_backward(self, streams: tuple[Stream, Stream], g_input: torch.Tensor) -> list[Stream]:
        return list(streams)

    def checksums(self, x1: Stream, x2: Stream) -> None:
        return None  # rebuilt values differ by rounding: there is nothing exact to audit

    def trace_state(self, x1: Stream, x2: Stream) -> tuple[torch.Tensor, torch.Tensor]:
        return x1.value, x2.value

    def check_range(self, flags: list, names: list[str], couplings: Sequence = ()) -> None:
        pass

    def vanilla_start(self, h: torch.Tensor, flags: list) -> Stream:
        return Stream(None, h)

    def vanilla_couple(self, x: Stream, block_out: torch.Tensor, scale: float, flags: list) -> Stream:
        return Stream(None, x.value * scale + block_out.to(x.value.dtype))


def arithmetic_for(settings: CouplingSettings, compute_dtype: torch.dtype) -> ExactArithmetic | FloatArithmetic:
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


class HalfStepOutput:
    """Where a half-step's chunks land. One chunk: the kernels' own output tensors are kept (two
    passes fewer). Several: the values fill one new tensor (and, in exact mode, the integers
    overwrite the input stream's in place: two stream-integer tensors alive, not three). Without
    `keep_values` the values are dropped (a rebuilt stream no block reads again)."""

    def __init__(self, arith, source: Stream, shape, device, chunks: int, keep_values: bool):
        self.arith, self.single, self.keep_values = arith, chunks == 1, keep_values
        self.value = None if self.single or not keep_values else torch.empty(shape, dtype=arith.value_dtype, device=device)

    @labelled("couple")
    def couple(self, sl: slice, x: Stream, out: torch.Tensor, factor):
        """Rows sl of y = scale·x + out (the block output of those rows); returns their packed remainders."""
        stream_part = self._part(x, sl)
        y_ints, y_value, packed, flag, part_sum = self.arith.couple(stream_part, out, factor)
        self._put(sl, stream_part, y_ints, y_value, part_sum)
        self._let_go_of(x)
        self._flag(flag)
        return packed

    @labelled("uncouple")
    def uncouple(self, sl: slice, y: Stream, out: torch.Tensor, packed, factor) -> None:
        """Rows sl of x = (y − out) / scale, exactly from the rows' remainders `packed` in exact mode."""
        stream_part = self._part(y, sl)
        x_ints, x_value, part_sum = self.arith.uncouple(stream_part, out, packed, factor)
        self._put(sl, stream_part, x_ints, x_value, part_sum)
        self._let_go_of(y)

    def _put_value(self, sl: slice, value: torch.Tensor) -> None:
        if self.single:
            self.value = value if self.keep_values else None
        elif self.keep_values:
            _part(self.value, sl).copy_(value)

    def _flag(self, flag) -> None:
        pass

    def _let_go_of(self, stream: Stream) -> None:
        pass


class _ExactOutput(HalfStepOutput):
    """Integers, their value and their checksum; range flags collected for the forward's check."""

    def __init__(self, arith, source: Stream, shape, device, chunks: int, keep_values: bool, flags: list | None):
        super().__init__(arith, source, shape, device, chunks, keep_values)
        self.ints, self.checksum, self.flags = source.ints, None, flags

    def _part(self, stream: Stream, sl: slice) -> torch.Tensor:
        return _part(stream.ints, sl)

    def _put(self, sl: slice, stream_part: torch.Tensor, ints, value, part_sum) -> None:
        if self.single:
            self.ints = ints
        else:
            stream_part.copy_(ints)
        self._put_value(sl, value)
        self.checksum = part_sum if self.checksum is None else self.checksum + part_sum

    def _flag(self, flag) -> None:
        self.flags.append(flag)

    def _let_go_of(self, stream: Stream) -> None:
        # in one chunk the output has integers of its own, and the caller's reference to the input
        # must not keep a third stream alive for the rest of the layer (several chunks write in place)
        if self.single:
            stream.ints = None

    def stream(self) -> Stream:
        return Stream(self.ints, self.value, self.checksum)


class _FloatOutput(HalfStepOutput):
    """Values only: the value is the stream."""

    def _part(self, stream: Stream, sl: slice) -> torch.Tensor:
        return _part(stream.value, sl)

    def _put(self, sl: slice, stream_part: torch.Tensor, ints, value, part_sum) -> None:
        self._put_value(sl, value)

    def stream(self) -> Stream:
        return Stream(None, self.value)


# ------------------------------------------------------------ the same under plain autograd


class _Start(torch.autograd.Function):
    """x → (value of fix(x), fix(x)); gradient is the identity."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, arith: ExactArithmetic, flags: list):
        stream, flag = arith.start(x)
        flags.append(flag)
        ctx.mark_non_differentiable(stream.ints)
        return stream.value, stream.ints

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _gi=None):
        return grad, None, None


class _ExactCouple(torch.autograd.Function):
    """y = floor(x / m) + fix(block_out) on the integers; gradient of the real coupling y = x/m + b."""

    @staticmethod
    def forward(ctx, x_value, block_out, x_int, scale: float, arith: ExactArithmetic, chunk_tokens: int, flags: list):
        m = arith.factor(scale)
        y = torch.empty_like(x_int)
        value = torch.empty(x_value.shape, dtype=arith.value_dtype, device=x_value.device)
        out = block_out.detach()
        for sl in _row_slices(out, chunk_tokens):
            y_part, v_part, _, flag, _ = arith.couple(_part(x_int, sl), _part(out, sl), m)
            _part(y, sl).copy_(y_part)
            _part(value, sl).copy_(v_part)
            flags.append(flag)
        ctx.scale, ctx.block_dtype = scale, block_out.dtype
        ctx.mark_non_differentiable(y)
        return value, y

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _gi=None):
        return grad * ctx.scale, grad.to(ctx.block_dtype), None, None, None, None, None
