"""Exact reversible coupling: the engine every MEFT checkpoint carries.

A reversible layer keeps two streams and couples them with two blocks F and G:

    y1 = λ·x1 + F(x2)            inverse:  x2 = (y2 − G(y1)) / β
    y2 = β·x2 + G(y1)                      x1 = (y1 − F(x2)) / λ

Because each layer's input can be recomputed from its output, training keeps only the
last layer's output instead of every layer's activations.

In floating point the inverse divides by λ and β at every layer, so rounding errors are
multiplied layer after layer (with λ = 0.1, the rebuilt input of a 6-layer BERT is off by
14 to 19%, and by a factor of hundreds for MEFT3).
This engine makes the inverse exact. The streams are fixed-point integers (int64, or int32
for 16-bit models) with K fractional bits, fix(t) = round(t·2^K), and λ = 1/m for a
positive integer m:

    forward:  q1, r1 = divmod(x1, m)       y1 = q1 + fix(F(x2))
    inverse:  x1 = m·(y1 − fix(F(x2))) + r1

Integer arithmetic has no rounding, so the inverse reproduces every bit provided F is
recomputed bit-identically: same input (the dequantised integers), same dropout masks
(the RNG state is recorded before each block and replayed), same kernels (the forward
runs each block exactly as the recompute does). The remainders r are the only per-layer
state: a few remainders share one number below m^k, packed into bit planes, so each takes
about log2 m bits (3.33 for m = 10, 8 for m = 256, none for m = 1).

Gradients follow the real-valued coupling (dx1 = λ·dy1 + ..., fix and the integer
division count as identity), so they equal plain autograd through the same forward.

Memory. A block is the part that mixes positions (attention) followed by a part that acts
on each position alone (an MLP block, an adapter). The position-wise part runs, in forward
and in the recompute, a chunk of tokens at a time (`chunk_tokens`), so the MLP's wide
intermediates cost a chunk, not the sequence; the coupling arithmetic is chunked alike.
A block may also start with a position-wise part (`before`: a norm and the attention's
input projections), so that only the attention core sees the whole sequence at once.
Streams are rebuilt in place: two stream-integer tensors are alive at a time. The packed
remainders can live in pinned host memory (`offload_remainders`), copied out on a side
stream in forward and fetched one layer ahead in backward.

This module knows nothing about transformers: it sees F, G, λ, β and tensors.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch.utils.checkpoint import get_device_states, set_device_states

# the remainders' sizes, read by the converter too (without torch); importable from here as well
from .meft_table import denominator_of, packed_remainder_bytes, remainder_bits, remainder_layout  # noqa: F401

# The part of a block that mixes positions: (stream value, routed layer arguments) -> tensor;
# after a `before` part it gets that part's outputs instead of the stream value.
Mixing = Callable[[Any, dict], torch.Tensor]
# The part that acts on each position alone: tensor (any leading shape) -> tensor; after a
# `before` part, (mixing output, block input) -> tensor, so that it can add the residual.
Positionwise = Callable[..., torch.Tensor]
# A position-wise part ahead of the mixing one: (block input, routed arguments, Rows) -> tensors.
Before = Callable[[torch.Tensor, dict, "Rows"], tuple]
# Causal attention of one chunk of query rows: (the chunk's `before` outputs other than the
# context, the context outputs on the rows Rows.context, routed arguments, Rows) -> (rows, width).
CausalRun = Callable[[tuple, tuple, dict, "Rows"], torch.Tensor]


class ReconstructionError(RuntimeError):
    """A layer's input, recomputed in backward, differs from the one seen in forward."""


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


@dataclass(frozen=True)
class Rows:
    """The positions one chunk covers: a range of the block input's (batch × sequence) rows.
    A `before` part cuts the same rows out of routed tensors that go with positions (rotary
    embeddings) with `take`."""

    rows: slice
    lead: tuple[int, ...]  # the block input's leading shape, e.g. (batch, sequence)

    def take(self, t: torch.Tensor) -> torch.Tensor:
        """The chunk's rows of t, whose leading dimensions broadcast to the block input's."""
        if self.rows == slice(None):
            return t
        return t.expand(*self.lead, t.shape[-1]).reshape(-1, t.shape[-1])[self.rows]

    def _bounds(self) -> tuple[int, int, int]:
        length = self.lead[-1]  # positions per sequence: the lead is (batch, sequence)
        total = 1
        for n in self.lead:
            total *= n
        start, stop, _ = self.rows.indices(total)
        return start, stop, length

    @property
    def context(self) -> slice:
        """The rows whose keys and values the chunk's queries may read: from the start of its
        first sequence to the chunk's end (causal attention reads no later position)."""
        start, stop, length = self._bounds()
        return slice(start // length * length, stop)

    def sequences(self) -> list["QueryGroup"]:
        """The chunk's queries as groups that one attention call serves each: a run of whole
        sequences, or the part of one sequence the chunk holds (at most three groups)."""
        start, stop, length = self._bounds()
        first = self.context.start
        groups, row = [], start
        while row < stop:
            batch, position = divmod(row, length)
            if position == 0 and stop - row >= length:
                count = (stop - row) // length
                end, keys = length, slice(row - first, row - first + count * length)
            else:
                count, end = 1, min(length, position + stop - row)
                keys = slice(batch * length - first, batch * length - first + end)
            size = count * (end - position)
            groups.append(QueryGroup(slice(row - start, row - start + size), keys, slice(batch, batch + count), position, end))
            row += size
        return groups


@dataclass(frozen=True)
class QueryGroup:
    """Queries of `batch` (sequences of the batch) at positions [start, stop), which read the
    keys at positions [0, stop) of the same sequences: `queries` are their rows in the chunk,
    `keys` the rows of those keys in the chunk's context (Rows.context)."""

    queries: slice
    keys: slice
    batch: slice
    start: int
    stop: int


@dataclass(frozen=True)
class CausalCore:
    """The mixing part as causal attention, a chunk of queries at a time: a chunk's queries read
    the keys and values (the `context`) of their own and earlier positions only. With it the
    whole block runs chunk by chunk; only the context and its gradient cover the whole
    sequence (with grouped-query attention a fraction of the hidden size), not the queries, the
    attention output or their gradients."""

    run: CausalRun
    context: tuple[int, ...]  # which of the `before` part's outputs are the context

    def queries(self, outs: Sequence) -> tuple:
        """The `before` part's outputs that are not context: what each chunk reads of itself alone."""
        return tuple(t for j, t in enumerate(outs) if j not in self.context)


@dataclass(frozen=True)
class Block:
    """F or G: optionally `before` (position-wise: a norm and attention's input projections),
    `mixing` (attention; None if the block has none) and then `positionwise` (an output
    projection and residual, an MLP block, an adapter; None if none). The position-wise parts
    may run a chunk of tokens at a time; a block with `before` has all three parts. With
    `causal` as well, the mixing part runs a chunk of queries at a time whenever the block runs
    in several chunks (`mixing` serves a single chunk)."""

    mixing: Mixing | None = None
    positionwise: Positionwise | None = None
    before: Before | None = None
    causal: CausalCore | None = None

    def __post_init__(self):
        if self.before is not None and (self.mixing is None or self.positionwise is None):
            raise ValueError("a block with a `before` part needs a mixing and a position-wise part")
        if self.causal is not None and self.before is None:
            raise ValueError("a block with a causal core needs a `before` part (its queries and context)")

    def __call__(self, x: torch.Tensor, routed: dict, chunk_tokens: int = 0) -> torch.Tensor:
        """The block under ordinary autograd, chunked as the reversible path chunks it."""
        slices = _row_slices(x, chunk_tokens)
        if self.before is not None:
            # each position-wise part reads the input through a view of its own, so that a row's
            # gradient is one sum per part and then the sum of the two, as the reversible
            # backward forms it
            x_rows = [x] if len(slices) == 1 else torch.split(_rows(x), chunk_tokens)
            lead = tuple(x.shape[:-1])
            parts = [self.before(r.view_as(r), routed, Rows(sl, lead)) for r, sl in zip(x_rows, slices)]
            if _runs_causally(self, slices):
                return torch.cat(self._causal_chunks(parts, x_rows, slices, lead, routed)).view(*x.shape[:-1], -1)
            h = self.mixing(_joined(parts, lead), routed)
        else:
            h = self.mixing(x, routed) if self.mixing is not None else x
        if self.positionwise is None:
            return h
        h_rows = [h] if len(slices) == 1 else torch.split(_rows(h), chunk_tokens)
        if self.before is not None:
            outs = [self.positionwise(a, b.view_as(b)) for a, b in zip(h_rows, x_rows)]
        else:
            outs = [self.positionwise(a) for a in h_rows]
        return outs[0] if len(slices) == 1 else torch.cat(outs).view(*h.shape[:-1], -1)

    def _causal_chunks(self, parts: list, x_rows: list, slices: list, lead: tuple, routed: dict) -> list:
        context = [torch.cat([p[j] for p in parts]) for j in self.causal.context]
        outs = []
        for p, r, sl in zip(parts, x_rows, slices):
            rows = Rows(sl, lead)
            h = self.causal.run(self.causal.queries(p), tuple(c[rows.context] for c in context), routed, rows)
            outs.append(self.positionwise(h, r.view_as(r)))
        return outs


def _runs_causally(block: Block, slices: list) -> bool:
    return block.causal is not None and len(slices) > 1


def _joined(parts: list, lead: tuple[int, ...]) -> tuple:
    """The `before` part's outputs of every chunk, joined into tensors shaped (*lead, width)."""
    if len(parts) == 1:
        return tuple(parts[0])
    return tuple(torch.cat(column).view(*lead, -1) for column in zip(*parts))


def as_block(block: Block | Mixing) -> Block:
    """A plain callable (x, routed) -> tensor is a block that mixes positions."""
    return block if isinstance(block, Block) else Block(mixing=block)


@dataclass
class Coupling:
    """One reversible layer: its two blocks and the trainable tensors they read."""

    F: Block | Mixing
    G: Block | Mixing
    params: tuple[torch.Tensor, ...]  # trainable parameters used by F or G
    name: str  # e.g. "layer 3", used in error messages
    # entered around everything the layer computes with its weights: in forward, and in backward
    # around the recompute and its gradients (an FSDP unit gathers its shards here)
    gathered: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    # False when the weights are there only inside `gathered`: plain autograd, whose backward
    # runs later, cannot train such a layer
    autograd_ok: bool = True

    def __post_init__(self):
        self.F, self.G = as_block(self.F), as_block(self.G)


# ----------------------------------------------------------------------------- fixed point


def stream_dtype_for(compute_dtype: torch.dtype) -> torch.dtype:
    """Float-mode streams are kept in at least float32, even for 16-bit models."""
    return torch.promote_types(compute_dtype, torch.float32)


def _int_dtype(stream_bits: int) -> torch.dtype:
    return torch.int32 if stream_bits == 32 else torch.int64


def _wide_float(int_dtype: torch.dtype) -> torch.dtype:
    # float32 holds every fix() of a 16-bit value exactly and is enough for int32 streams;
    # int64 streams with K = 32 need float64 to scale without loss
    return torch.float32 if int_dtype == torch.int32 else torch.float64


def _limit(int_dtype: torch.dtype) -> float:
    # |floor(x/m)| and |fix(out)| each below a quarter of the range: their sum cannot wrap
    return 2.0 ** (30 if int_dtype == torch.int32 else 62)


def to_fixed(t: torch.Tensor, frac_bits: int, int_dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """round(t · 2^K) as integers (exact: 2^K scaling only moves the exponent)."""
    return (t.to(_wide_float(int_dtype)) * (2.0**frac_bits)).round().to(int_dtype)


def from_fixed(i: torch.Tensor, frac_bits: int, dtype: torch.dtype) -> torch.Tensor:
    return (i.to(_wide_float(i.dtype)) * (2.0**-frac_bits)).to(dtype)


def max_stream_value(frac_bits: int, stream_bits: int) -> float:
    """The largest magnitude a stream or block output may reach in this fixed-point format."""
    return _limit(_int_dtype(stream_bits)) * 2.0**-frac_bits


def _pack_bits(v: torch.Tensor, bits: int) -> torch.Tensor:
    """Values in [0, 2^bits) → uint8 bit planes of shape (bits, ⌈n/8⌉): plane j holds bit j of
    eight values per byte, so each value costs exactly `bits` bits."""
    flat = torch.nn.functional.pad(v, (0, (-v.numel()) % 8)).reshape(-1, 8)
    weights = 1 << torch.arange(8, dtype=torch.uint8, device=v.device)  # 1, 2, ..., 128
    return torch.stack([(((flat >> j) & 1).to(torch.uint8) * weights).sum(1, dtype=torch.uint8) for j in range(bits)])


def _unpack_bits(planes: torch.Tensor, bits: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    shifts = torch.arange(8, dtype=torch.uint8, device=planes.device)
    v = torch.zeros(planes.shape[1] * 8, dtype=dtype, device=planes.device)
    for j in range(bits):
        v = v | (((planes[j].view(-1, 1) >> shifts) & 1).view(-1).to(dtype) << j)
    return v


def _pack(r: torch.Tensor, m: int) -> torch.Tensor:
    """Remainders modulo m (m > 1) → bit planes of their groups of k (remainder_layout)."""
    k, bits = remainder_layout(m)
    if k == 1:
        return _pack_bits(r.reshape(-1), bits)
    groups = torch.nn.functional.pad(r.reshape(-1).to(torch.int64), (0, (-r.numel()) % k)).view(-1, k)
    value = groups[:, k - 1]
    for i in range(k - 2, -1, -1):  # Horner: r0 + m·(r1 + m·(r2 + ...))
        value = value * m + groups[:, i]
    return _pack_bits(value, bits)


def _unpack(planes: torch.Tensor, m: int, like: torch.Tensor) -> torch.Tensor:
    k, bits = remainder_layout(m)
    if k == 1:
        return _unpack_bits(planes, bits, like.dtype)[: like.numel()].view(like.shape)
    value = _unpack_bits(planes, bits)
    digits = []
    for _ in range(k):
        digits.append(value % m)
        value = value // m
    return torch.stack(digits, dim=1).reshape(-1)[: like.numel()].view(like.shape).to(like.dtype)


def pack_remainders(r: torch.Tensor, m: int) -> torch.Tensor:
    """Remainders modulo m → uint8 bit planes (remainder_layout); empty for m = 1."""
    return _pack(r, m) if m > 1 else torch.empty(0, dtype=torch.uint8)


def unpack_remainders(planes: torch.Tensor, m: int, like: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_remainders: remainders shaped (and typed) like `like`."""
    return _unpack(planes, m, like)


# --------------------------------------------------------------- the exact kernels (fused)


def _value_of(ints: torch.Tensor, frac_bits: int, value_dtype: torch.dtype) -> torch.Tensor:
    """A stream's real value: the input its next block sees."""
    return from_fixed(ints, frac_bits, value_dtype)


def _start(x: torch.Tensor, frac_bits: int, int_dtype: torch.dtype, value_dtype: torch.dtype):
    """A stream's start: its integers, their value, their sum and a flag for values out of range."""
    scaled = x.to(_wide_float(int_dtype)) * (2.0**frac_bits)
    out_of_range = ~(scaled.abs() < _limit(int_dtype)).all()
    ints = scaled.round().to(int_dtype)
    return ints, _value_of(ints, frac_bits, value_dtype), ints.sum(dtype=torch.int64), out_of_range


def _couple(x: torch.Tensor, block_out: torch.Tensor, m: int, frac_bits: int, value_dtype: torch.dtype):
    """One exact half-step: y = floor(x / m) + fix(block_out), on the integers of x's width.

    Returns y, its value (the next block's input), the remainders x mod m packed into bit
    planes (None for m = 1), a flag for a block output or a stream out of range (or NaN),
    and the wrapping sum of y, the audit's fingerprint. One function, so that it compiles to
    few fused kernels."""
    limit = _limit(x.dtype)
    scaled = block_out.to(_wide_float(x.dtype)) * (2.0**frac_bits)
    if m == 1:
        q, packed = x, None
    else:
        q = torch.div(x, m, rounding_mode="floor")
        packed = _pack(x - q * m, m)
    # `not (|v| < limit)` is also true for NaN
    out_of_range = ~((scaled.abs() < limit).all() & (q.abs() < limit).all())
    y = q + scaled.round().to(x.dtype)
    return y, _value_of(y, frac_bits, value_dtype), packed, out_of_range, y.sum(dtype=torch.int64)


def _uncouple(y: torch.Tensor, block_out: torch.Tensor, packed, m: int, frac_bits: int, value_dtype: torch.dtype):
    """Inverse of _couple: x = m·(y − fix(block_out)) + r; returns x, its value and its sum."""
    x = (y - (block_out.to(_wide_float(y.dtype)) * (2.0**frac_bits)).round().to(y.dtype)) * m
    if packed is not None:
        x = x + _unpack(packed, m, y)
    return x, _value_of(x, frac_bits, value_dtype), x.sum(dtype=torch.int64)


# On CUDA the kernels above run fused by torch.compile (eager, each is about fifteen passes
# over the stream); elsewhere they run eagerly. Integer results are the same either way,
# but float values can differ in rounding ties between the two, so a run never mixes them.
# Whether the compiler works is decided once per process, on a tiny tensor, before any value
# of a run is computed; after that every error (out of memory first) propagates.
# MEFT_COMPILE=0 turns compiling off.
_COMPILE: dict = {"enabled": None if os.environ.get("MEFT_COMPILE", "1") != "0" else False}
_COMPILED: dict = {}


def _compiler_works(device: torch.device) -> bool:
    if _COMPILE["enabled"] is None:
        try:
            probe = torch.zeros(4, 8, dtype=torch.int32, device=device)
            compiled = torch.compile(_couple, dynamic=True)
            compiled(probe, torch.zeros(4, 8, dtype=torch.bfloat16, device=device), 2, 8, torch.bfloat16)
            _COMPILE["enabled"] = True
        except Exception as e:  # no working compiler here: the eager kernels compute the same integers
            _COMPILE["enabled"] = False
            warnings.warn(
                f"MEFT: torch.compile does not work here ({type(e).__name__}: {e}); the stream arithmetic "
                "runs as slower eager kernels for the rest of this process",
                stacklevel=3,
            )
    return _COMPILE["enabled"]


def _use_compiler(t: torch.Tensor) -> bool:
    return t.is_cuda and _compiler_works(t.device)


def _run_kernel(fn, *args):
    """fn(*args), through torch.compile when its tensors live on a CUDA device."""
    if _use_compiler(args[0]):
        if fn not in _COMPILED:
            # dynamic: one kernel for all sequence lengths; m and the dtypes add a few variants
            _COMPILED[fn] = torch.compile(fn, dynamic=True)
        return _COMPILED[fn](*args)
    return fn(*args)


# ---------------------------------------------------------------- streams and arithmetic


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


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t as (tokens, hidden): chunks are ranges of rows."""
    return t.reshape(-1, t.shape[-1])


def _row_slices(t: torch.Tensor, chunk_tokens: int) -> list[slice]:
    rows = t.numel() // t.shape[-1] if t.dim() else 1
    if chunk_tokens <= 0 or rows <= chunk_tokens:
        return [slice(None)]
    return [slice(start, min(start + chunk_tokens, rows)) for start in range(0, rows, chunk_tokens)]


def _part(t: torch.Tensor, sl: slice) -> torch.Tensor:
    """One chunk of t; the whole tensor, shape and all, when there is a single chunk."""
    return t if sl == slice(None) else _rows(t)[sl]


# ---------------------------------------------------------------------- RNG and autocast


@dataclass
class _RngState:
    """CPU and device generator states before a block, as torch.utils.checkpoint records them."""

    cpu: torch.Tensor
    device_ids: list
    device_states: list

    @classmethod
    def capture(cls, *tensors: torch.Tensor) -> "_RngState":
        device_ids, device_states = get_device_states(*tensors)
        return cls(torch.get_rng_state(), device_ids, device_states)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.device_ids:
            set_device_states(self.device_ids, self.device_states)

    def nbytes(self) -> int:
        return self.cpu.numel() + sum(s.numel() * s.element_size() for s in self.device_states)


@dataclass(frozen=True)
class _AutocastState:
    device_type: str
    device_enabled: bool
    device_dtype: torch.dtype
    cpu_enabled: bool
    cpu_dtype: torch.dtype
    cache_enabled: bool

    @classmethod
    def capture(cls, device_type: str) -> "_AutocastState":
        return cls(
            device_type,
            torch.is_autocast_enabled(device_type),
            torch.get_autocast_dtype(device_type),
            torch.is_autocast_enabled("cpu"),
            torch.get_autocast_dtype("cpu"),
            torch.is_autocast_cache_enabled(),
        )

    @contextlib.contextmanager
    def active(self):
        with contextlib.ExitStack() as stack:
            if self.device_type != "cpu":
                stack.enter_context(
                    torch.autocast(
                        self.device_type, dtype=self.device_dtype, enabled=self.device_enabled, cache_enabled=self.cache_enabled
                    )
                )
            stack.enter_context(
                torch.autocast("cpu", dtype=self.cpu_dtype, enabled=self.cpu_enabled, cache_enabled=self.cache_enabled)
            )
            yield


# ------------------------------------------------------------------- routed arguments


def _map_tensors(obj, fn, path=()):
    """obj with every tensor inside dicts, lists and tuples replaced by fn(tensor, path)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj, path)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn, path + (k,)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(_map_tensors(v, fn, path + (i,)) for i, v in enumerate(obj))
    if isinstance(obj, tuple):  # a named tuple
        return type(obj)(*(_map_tensors(v, fn, path + (i,)) for i, v in enumerate(obj)))
    return obj


def _grad_paths(routed: dict) -> list[tuple]:
    """Where the routed tensors that require grad sit, however deep in dicts, lists and tuples."""
    paths: list = []
    _map_tensors(routed, lambda t, p: paths.append(p) if t.requires_grad else None)
    return paths


def _at(obj, path: tuple):
    for key in path:
        obj = obj[key]
    return obj


def _leaf_routed(routed: dict) -> dict:
    """Routed arguments with tensors cut from the outer graph; grad-requiring ones stay leaves."""
    return _map_tensors(routed, lambda t, p: t.detach().requires_grad_(t.requires_grad))


def _per_layer_views(routed: dict) -> dict:
    """Routed tensors that need gradients, seen by each layer through its own view: the layer's
    uses are summed first, then layer by layer from the top, the order the reversible
    backward sums them in, so both give the same bits."""
    return _map_tensors(routed, lambda t, p: t.view_as(t) if t.requires_grad else t)


# ------------------------------------------------------------------ remainders, kept state


class _Remainders:
    """The packed remainders of every half-step, chunk by chunk: on the device (handed to
    save_for_backward, so saved-tensor hooks see them), or in pinned host memory."""

    def __init__(self, offload: bool, device: torch.device):
        self.offload = offload and device.type == "cuda"
        self.device = device
        self.parts: list[list] = []  # per half-step: its chunks' packed tensors (None for m = 1)
        self._copies = torch.cuda.Stream(device) if self.offload else None
        self._fetched: dict[int, list] = {}

    def add(self, chunks: list) -> None:
        if self.offload:
            chunks = [self._to_host(t) for t in chunks]
        self.parts.append(chunks)

    def _to_host(self, t: torch.Tensor | None):
        if t is None:
            return None
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        self._copies.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._copies):
            host.copy_(t, non_blocking=True)
        t.record_stream(self._copies)  # its memory is reused only once the copy is done
        return host

    def device_tensors(self) -> list[torch.Tensor]:
        """What save_for_backward keeps (nothing when offloaded)."""
        return [] if self.offload else [t for chunks in self.parts for t in chunks if t is not None]

    def restore(self, saved: Sequence[torch.Tensor]) -> None:
        if self.offload:
            return
        it = iter(saved)
        self.parts = [[None if t is None else next(it) for t in chunks] for chunks in self.parts]

    def prefetch(self, index: int) -> None:
        """Starts copying half-step `index`'s remainders back to the device."""
        if not self.offload or index < 0 or index in self._fetched:
            return
        self._copies.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._copies):
            self._fetched[index] = [None if t is None else t.to(self.device, non_blocking=True) for t in self.parts[index]]

    def take(self, index: int) -> list:
        if not self.offload:
            chunks, self.parts[index] = self.parts[index], []
            return chunks
        self.prefetch(index)
        torch.cuda.current_stream(self.device).wait_stream(self._copies)
        chunks = self._fetched.pop(index)
        for t in chunks:
            if t is not None:
                t.record_stream(torch.cuda.current_stream(self.device))
        self.parts[index] = []
        return chunks

    def host_bytes(self) -> int:
        if not self.offload:
            return 0
        return sum(t.numel() * t.element_size() for chunks in self.parts for t in chunks if t is not None)


@dataclass
class _HalfRecord:
    """RNG states of one half-step: before each chunk of the `before` part, before the mixing
    part (or each chunk of a causal core), and before each chunk of the position-wise part."""

    mixing: _RngState | None = None
    chunks: list = field(default_factory=list)
    before: list = field(default_factory=list)
    cores: list = field(default_factory=list)  # before each chunk of a causal core


@dataclass
class _LayerRecord:
    """What the reversible forward keeps per layer besides its remainders."""

    F: _HalfRecord = field(default_factory=_HalfRecord)
    G: _HalfRecord = field(default_factory=_HalfRecord)
    checksum: torch.Tensor | None = None  # sums of the layer's two input streams


@dataclass
class StackRun:
    """Everything one call of the stack needs; lives on the autograd context until backward."""

    couplings: Sequence[Coupling]
    settings: CouplingSettings
    routed: dict
    compute_dtype: torch.dtype
    record_rng: bool = True
    trace: list | None = None  # when a list, inputs seen in forward and rebuilt in backward go here
    records: list = field(default_factory=list)
    autocast: _AutocastState | None = None
    routed_grad_paths: list = field(default_factory=list)
    param_list: list = field(default_factory=list)
    final_streams: list | None = None  # the top layer's output streams, until backward consumes them
    remainders: _Remainders | None = None
    arithmetic: Any = None
    flags: list = field(default_factory=list)  # out-of-range flags, checked once per forward
    flag_names: list = field(default_factory=list)
    rng_device: torch.Tensor | None = None

    def grad_inputs(self) -> list[torch.Tensor]:
        """Tensors the stack differentiates with respect to, besides the two streams."""
        self.routed_grad_paths = _grad_paths(self.routed)
        self.param_list = list({id(p): p for c in self.couplings for p in c.params}.values())
        return [_at(self.routed, p) for p in self.routed_grad_paths] + self.param_list

    def capture_rng(self) -> _RngState | None:
        return _RngState.capture(self.rng_device) if self.record_rng else None

    def kept_bytes(self) -> int:
        """Bytes held for backward beside the saved tensors: the final streams, RNG states,
        checksums and any remainders in host memory."""
        total = 0
        for stream in self.final_streams or ():
            for t in (stream.ints, stream.value):
                total += 0 if t is None else t.numel() * t.element_size()
        for rec in self.records:
            for half in (rec.F, rec.G):
                for rng in (half.mixing, *half.chunks, *half.before, *half.cores):
                    total += 0 if rng is None else rng.nbytes()
            total += 0 if rec.checksum is None else rec.checksum.numel() * 8
        return total + (self.remainders.host_bytes() if self.remainders else 0)


def _raise_if_out_of_range(flags: list, names: list[str], settings: CouplingSettings, couplings: Sequence[Coupling] = ()) -> None:
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


def _block_names(couplings: Sequence[Coupling]) -> list[str]:
    return [f"{c.name} ({half})" for c in couplings for half in ("F", "G")]


def _block_input(x: torch.Tensor, compute_dtype: torch.dtype) -> torch.Tensor:
    """A stream as F or G receive it. When no cast is needed a view still adds one autograd
    node, so that the gradients a block sends to its input are summed inside the block before
    they meet the coupling's own: the same order as the reversible backward, hence the same bits."""
    return x.to(compute_dtype) if x.dtype != compute_dtype else x.view_as(x)


def _add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    """Sum of gradient contributions, None standing for 'none arrived'."""
    if a is None or b is None:
        return b if a is None else a
    return a + b


def _scaled(d: torch.Tensor | None, scale: float) -> torch.Tensor | None:
    return d if d is None or scale == 1 else d * scale


def _part_input(leaf: torch.Tensor, reads_stream: bool, compute_dtype: torch.dtype) -> torch.Tensor:
    # a part that reads a stream gets it as blocks do; one that reads the mixing part's output
    # gets that tensor's values as they are, through a view: autocast caches its casts of leaves
    # that require grad, and one cached cast would sum its users' gradients in 16 bits where
    # plain autograd, whose tensor is no leaf, casts for each user and sums in float32
    return _block_input(leaf, compute_dtype) if reads_stream else leaf.view_as(leaf)


def _leaves(x):
    """Detached copies that require grad, of a tensor or a tuple of tensors."""
    if isinstance(x, tuple):
        return tuple(t.detach().requires_grad_() for t in x)
    return x.detach().requires_grad_()


def _inputs_of(leaves, reads_stream: bool, compute_dtype: torch.dtype):
    if isinstance(leaves, tuple):
        return tuple(_part_input(t, reads_stream, compute_dtype) for t in leaves)
    return _part_input(leaves, reads_stream, compute_dtype)


def _detached_output(fn, x, run: StackRun, *args, reads_stream: bool = True, stream_part=None):
    """Runs a block part in forward exactly as backward recomputes it: grad enabled, inputs
    leaves that require grad. Kernels can pick different paths when inputs require grad (SDPA
    backends do); running both passes the same way rules that out. The graph built here is
    dropped as soon as the output is detached, so it costs one part's activations at most.
    `stream_part` is the block input's chunk a position-wise part after `before` also reads."""
    leaf = _leaves(x)
    with torch.enable_grad():
        inputs = _inputs_of(leaf, reads_stream, run.compute_dtype)
        if stream_part is None:
            out = fn(inputs, *args)
        else:
            out = fn(inputs, _block_input(stream_part.detach().requires_grad_(), run.compute_dtype))
    return tuple(t.detach() for t in out) if isinstance(out, tuple) else out.detach()


# ------------------------------------------------------------------ one coupling, both ways


class _Gradients:
    """The parameter and routed-tensor gradients a backward pass collects."""

    def __init__(self, run: StackRun, routed: dict):
        self.routed_leaves = [_at(routed, p) for p in run.routed_grad_paths]
        self.routed = [None] * len(self.routed_leaves)
        self.index = {id(p): i for i, p in enumerate(run.param_list)}
        self.params: list = [None] * len(run.param_list)
        self.layer_routed: list = []

    def start_layer(self) -> None:
        # a routed tensor's gradient is summed within the layer first, then across layers,
        # as plain autograd sums it (through one view of it per layer)
        self.layer_routed = [None] * len(self.routed_leaves)

    def end_layer(self) -> None:
        self.routed = [_add(total, g) for total, g in zip(self.routed, self.layer_routed)]

    def of(self, out, leaf, grad_out, params, routed: bool = True):
        """Pushes grad_out through a recomputed part: parameter gradients are accumulated,
        routed ones collected for the layer, and the gradient of the part's input returned.
        `out`, `leaf` and `grad_out` may be tuples (a part with several inputs or outputs)."""
        outs, grad_outs = (out, grad_out) if isinstance(out, tuple) else ((out,), (grad_out,))
        inputs = leaf if isinstance(leaf, tuple) else (leaf,)
        leaves = self.routed_leaves if routed else []
        grads = torch.autograd.grad(
            outs, [*inputs, *leaves, *params], [g.to(o.dtype) for o, g in zip(outs, grad_outs)], allow_unused=True
        )
        n = len(inputs)
        for i, g in enumerate(grads[n : n + len(leaves)]):
            self.layer_routed[i] = _add(self.layer_routed[i], g)
        for p, g in zip(params, grads[n + len(leaves) :]):
            j = self.index[id(p)]
            self.params[j] = _add(self.params[j], g)
        return tuple(grads[:n]) if isinstance(leaf, tuple) else grads[0]


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


def _couple_rows(run: StackRun, y: _HalfStepOutput, x: Stream, sl: slice, out: torch.Tensor, factor, packed: list) -> None:
    """Rows sl of y = scale·x + out (the block output of those rows); their remainders go to `packed`."""
    stream_part = y.part(x, sl)
    y_ints, y_value, r, flag, part_sum = run.arithmetic.couple(stream_part, out, factor)
    y.put(sl, stream_part, y_ints, y_value, part_sum)
    y.let_go_of(x)
    if run.arithmetic.exact:
        run.flags.append(flag)
    packed.append(r)


def _uncouple_rows(run: StackRun, x: _HalfStepOutput, y: Stream, sl: slice, out: torch.Tensor, packed, factor) -> None:
    """Rows sl of x = (y − out) / scale, exactly from the rows' remainders `packed` in exact mode."""
    stream_part = x.part(y, sl)
    x_ints, x_value, part_sum = run.arithmetic.uncouple(stream_part, out, packed, factor)
    x.put(sl, stream_part, x_ints, x_value, part_sum)
    x.let_go_of(y)


def _mixing_input(run: StackRun, block: Block, inp: torch.Tensor, routed, states: list, replay: bool):
    """What the mixing part reads: the block input, or the `before` part's outputs over the
    whole sequence, computed a chunk at a time (the RNG state before each chunk recorded in
    forward, replayed in backward's recompute)."""
    if block.before is None:
        return inp
    slices = _row_slices(inp, run.settings.chunk_tokens)
    lead = tuple(inp.shape[:-1])
    columns = None
    for i, sl in enumerate(slices):
        _record_or_restore(run, states, i, replay)
        with run.autocast.active() if replay else contextlib.nullcontext():
            outs = _detached_output(block.before, _part(inp, sl), run, routed, Rows(sl, lead))
        if len(slices) == 1:
            return tuple(outs)
        if columns is None:
            rows = inp.numel() // inp.shape[-1]
            columns = [torch.empty((rows, o.shape[-1]), dtype=o.dtype, device=o.device) for o in outs]
        for column, o in zip(columns, outs):
            column[sl].copy_(o)
        del outs
    return tuple(column.view(*lead, -1) for column in columns)


def _backward_before(run: StackRun, block: Block, inp: torch.Tensor, d_parts: tuple, d_inp: torch.Tensor, chunked: bool,
                     record: _HalfRecord, routed, params, grads: _Gradients) -> torch.Tensor:
    """d_inp (the position-wise part's share) plus (∂before/∂inp)ᵀ·d_parts, the `before` part
    recomputed and differentiated a chunk at a time, from the last."""
    slices = _row_slices(inp, run.settings.chunk_tokens)
    lead = tuple(inp.shape[:-1])
    wanted = [j for j, d in enumerate(d_parts) if d is not None]  # outputs the core used
    if not wanted:
        return d_inp
    d_parts = tuple(d_parts[j].contiguous() for j in wanted)
    for i in reversed(range(len(slices))):
        sl = slices[i]
        if record.before and record.before[i] is not None:
            record.before[i].restore()
        leaf = _part(inp, sl).detach().requires_grad_()
        with torch.enable_grad(), run.autocast.active():
            outs = tuple(block.before(_block_input(leaf, run.compute_dtype), routed, Rows(sl, lead)))
        outs = tuple(outs[j] for j in wanted)
        g = grads.of(outs, leaf, tuple(_part(d, sl) for d in d_parts), params)
        del outs
        if g is None:
            continue
        if chunked:  # d_inp is this function's own buffer
            _part(d_inp, sl).add_(g)
        else:  # d_inp may be the very tensor the coupling's gradient still needs
            d_inp = d_inp + g
    return d_inp


def _forward_half(run: StackRun, block: Block, inp: torch.Tensor, x: Stream, scale: float, record: _HalfRecord, routed):
    """y = scale·x + block(inp), chunk by chunk; with several chunks y's integers overwrite x's
    (one chunk: the kernels' own outputs are kept, two fewer passes). Returns y."""
    arith, s = run.arithmetic, run.settings
    if _runs_causally(block, _row_slices(inp, s.chunk_tokens)):
        return _forward_causal_half(run, block, inp, x, scale, record, routed)
    factor = arith.factor(scale)
    if _in_one_graph(block, inp, s.chunk_tokens):
        leaf = inp.detach().requires_grad_()
        return _coupled(run, x, [slice(None)], factor,
                        lambda sl: _whole_block(run, block, leaf, record, routed, replay=False).detach())
    if block.mixing is not None:
        mixing_input = _mixing_input(run, block, inp, routed, record.before, replay=False)
        record.mixing = run.capture_rng()
        h = _detached_output(block.mixing, mixing_input, run, routed, reads_stream=block.before is None)
        del mixing_input
    else:
        h = inp
    slices = _row_slices(h, s.chunk_tokens)
    if len(slices) > 1:
        h = h.contiguous()

    def out_of(sl: slice) -> torch.Tensor:
        if block.positionwise is None:
            return _part(h, sl)
        record.chunks.append(run.capture_rng())
        return _detached_output(block.positionwise, _part(h, sl), run, reads_stream=block.mixing is None,
                                stream_part=_part(inp, sl) if block.before is not None else None)

    return _coupled(run, x, slices, factor, out_of)


def _coupled(run: StackRun, x: Stream, slices: list[slice], factor, out_of) -> Stream:
    """y = scale·x + out for each chunk of rows, out_of(sl) giving the block output of rows sl (one
    chunk's alive at a time); with several chunks y's integers overwrite x's. The remainders are
    kept for backward."""
    y = _HalfStepOutput(run.arithmetic, x, x.value.shape, x.value.device, len(slices))
    packed = []
    for sl in slices:
        out = out_of(sl)
        _couple_rows(run, y, x, sl, out, factor, packed)
        del out
    run.remainders.add(packed if run.arithmetic.exact else [])
    return y.stream()


def _backward_half(run: StackRun, block: Block, inp: torch.Tensor, y: Stream, packed: list, scale: float, dy,
                   record: _HalfRecord, routed, params, grads: _Gradients, value_needed: bool = True,
                   d_other: torch.Tensor | None = None, writable: bool = False):
    """For y = scale·x + block(inp): recompute the block as in forward, rebuild x (in place of
    y's integers) and return x, d_other + (∂block/∂inp)ᵀ·dy and ∂y/∂x·dy = scale·dy. d_other
    is the gradient inp already has (None: none); `writable`: it may be summed into in place.
    In exact mode x's value is kept only if `value_needed` (it is a block's input further down)."""
    s = run.settings
    if _runs_causally(block, _row_slices(inp, s.chunk_tokens)):
        return _backward_causal_half(run, block, inp, y, packed, scale, dy, record, routed, params, grads, value_needed,
                                     d_other, writable)
    x, d_inp, dx = _backward_whole_core_half(run, block, inp, y, packed, scale, dy, record, routed, params, grads,
                                             value_needed)
    return x, _add(d_other, d_inp), dx


def _backward_whole_core_half(run: StackRun, block: Block, inp: torch.Tensor, y: Stream, packed: list, scale: float, dy,
                              record: _HalfRecord, routed, params, grads: _Gradients, value_needed: bool):
    """_backward_half for a block whose mixing part sees the whole sequence at once."""
    arith, s = run.arithmetic, run.settings
    factor = arith.factor(scale)
    if _in_one_graph(block, inp, s.chunk_tokens):
        x, d_inp = _backward_in_one_graph(run, block, inp, y, packed, factor, dy, record, routed, params, grads,
                                          value_needed)
        return x, d_inp, _scaled(dy, scale)
    # only the recompute runs under the forward's autocast; the gradients are computed outside
    # it, as loss.backward() computes plain autograd's (autocast would also apply to the
    # backward's own kernels and change their rounding)
    if block.mixing is not None:
        leaf = _leaves(_mixing_input(run, block, inp, routed, record.before, replay=True))
        if record.mixing is not None:
            record.mixing.restore()
        with torch.enable_grad(), run.autocast.active():
            h = block.mixing(_inputs_of(leaf, block.before is None, run.compute_dtype), routed)
        h_detached = h.detach()
    else:
        leaf, h, h_detached = None, None, inp
    d_inp = None
    if block.positionwise is None and dy is not None:
        # the mixing part's gradients first: its graph is freed before x's value is allocated
        d_inp = grads.of(h, leaf, dy, params)
        h = leaf = None
    slices = _row_slices(h_detached, s.chunk_tokens)
    chunked = len(slices) > 1
    if chunked:
        h_detached = h_detached.contiguous()
        dy = None if dy is None else dy.contiguous()
    # values as the kernel computes them (a value computed apart can differ in rounding from the
    # forward's), kept only where a block reads them
    x = _HalfStepOutput(arith, y, inp.shape, inp.device, len(slices), keep_values=value_needed or not arith.exact)
    d_h = d_direct = None  # gradients of the mixing output and, after `before`, of the residual
    if chunked and dy is not None and block.positionwise is not None:
        d_h = torch.empty(h_detached.shape, dtype=h_detached.dtype, device=h_detached.device)
        if block.before is not None:
            d_direct = torch.empty(inp.shape, dtype=inp.dtype, device=inp.device)
    # chunks from the last: plain autograd sums a parameter's per-chunk gradients in that order
    for i in reversed(range(len(slices))):
        sl = slices[i]
        if block.positionwise is not None:
            if record.chunks and record.chunks[i] is not None:
                record.chunks[i].restore()
            part_leaf = _part(h_detached, sl).detach().requires_grad_()
            with torch.enable_grad(), run.autocast.active():
                h_part = _part_input(part_leaf, block.mixing is None, run.compute_dtype)
                if block.before is None:
                    part_out = block.positionwise(h_part)
                else:
                    stream_leaf = _part(inp, sl).detach().requires_grad_()
                    part_out = block.positionwise(h_part, _block_input(stream_leaf, run.compute_dtype))
                    part_leaf = (part_leaf, stream_leaf)
            out = part_out.detach()
        else:
            out = _part(h_detached, sl)
        _uncouple_rows(run, x, y, sl, out, packed[i] if packed else None, factor)
        if dy is not None and block.positionwise is not None:
            g = grads.of(part_out, part_leaf, _part(dy, sl), params, routed=False)
            g, g_direct = g if block.before is not None else (g, None)
            if not chunked:
                d_h, d_direct = g, g_direct
            else:
                _put_rows(d_h, sl, g)
                if block.before is not None:
                    _put_rows(d_direct, sl, g_direct)
        del out
    if dy is not None and block.positionwise is not None:
        if block.before is not None:
            d_parts = grads.of(h, leaf, d_h, params)
            h = leaf = d_h = None  # the attention core's graph goes before `before` is recomputed
            if d_direct is None:
                d_direct = torch.zeros_like(inp)
            d_inp = _backward_before(run, block, inp, d_parts, d_direct, chunked, record, routed, params, grads)
        else:
            d_inp = grads.of(h, leaf, d_h, params) if block.mixing is not None else d_h
    return x.stream(), d_inp, _scaled(dy, scale)


def _in_one_graph(block: Block, inp: torch.Tensor, chunk_tokens: int) -> bool:
    """Whether a block with several parts runs in one chunk: then forward and backward run it as
    one graph (_whole_block) rather than part by part."""
    return block.mixing is not None and block.positionwise is not None and len(_row_slices(inp, chunk_tokens)) == 1


def _whole_block(run: StackRun, block: Block, leaf: torch.Tensor, record: _HalfRecord, routed, replay: bool):
    """The block's parts on `leaf` as one graph, as plain autograd builds it (each part reading the
    stream through a view of its own). In forward the RNG state before each part is recorded, in
    backward's recompute it is restored."""
    cd = run.compute_dtype
    with torch.enable_grad():
        if block.before is not None:
            _record_or_restore(run, record.before, 0, replay)
            h = tuple(block.before(_block_input(leaf, cd), routed, Rows(slice(None), tuple(leaf.shape[:-1]))))
        else:
            h = _block_input(leaf, cd)
        if not replay:
            record.mixing = run.capture_rng()
        elif record.mixing is not None:
            record.mixing.restore()
        h = block.mixing(h, routed)
        _record_or_restore(run, record.chunks, 0, replay)
        return block.positionwise(h) if block.before is None else block.positionwise(h, _block_input(leaf, cd))


def _backward_in_one_graph(run: StackRun, block: Block, inp: torch.Tensor, y: Stream, packed: list, factor, dy,
                           record: _HalfRecord, routed, params, grads: _Gradients, value_needed: bool):
    """A block in one chunk: its parts recomputed as one graph, as plain autograd builds it, and
    differentiated by one call. No part is recomputed twice (`before`, whose outputs the
    chunked path keeps only detached) and the host makes one autograd call, not three."""
    arith = run.arithmetic
    leaf = inp.detach().requires_grad_()
    with run.autocast.active():
        out = _whole_block(run, block, leaf, record, routed, replay=True)
    x = _HalfStepOutput(arith, y, inp.shape, inp.device, 1, keep_values=value_needed or not arith.exact)
    _uncouple_rows(run, x, y, slice(None), out.detach(), packed[0] if packed else None, factor)
    return x.stream(), None if dy is None else grads.of(out, leaf, dy, params)


class _Context:
    """A causal core's context (keys and values) over the whole sequence, (rows, width) each,
    filled a chunk at a time, and in backward its gradient, summed over the chunks that read it."""

    def __init__(self, core: CausalCore, inp: torch.Tensor):
        self.core, self.index = core, core.context
        self.rows = inp.numel() // inp.shape[-1]
        self.columns: list | None = None
        self.grads: list | None = None

    def fill(self, sl: slice, outs: tuple) -> tuple:
        """Stores the chunk's context outputs; returns the others (the queries)."""
        if self.columns is None:
            self.columns = [torch.empty((self.rows, outs[j].shape[-1]), dtype=outs[j].dtype, device=outs[j].device)
                            for j in self.index]
        for column, j in zip(self.columns, self.index):
            column[sl].copy_(outs[j])
        return self.core.queries(outs)

    def at(self, rows: Rows) -> tuple:
        return tuple(column[rows.context] for column in self.columns)

    def add_grads(self, rows: Rows, grads: Sequence[torch.Tensor | None]) -> None:
        if self.grads is None:
            self.grads = [torch.zeros_like(column) for column in self.columns]
        for total, g in zip(self.grads, grads):
            if g is not None:
                total[rows.context].add_(g)

    def grads_of(self, outs: tuple, d_queries: tuple, sl: slice) -> tuple:
        """The gradients of a chunk's `before` outputs: the queries' own, the context's summed."""
        d_queries, d_context = iter(d_queries), iter(self.grads)
        return tuple(next(d_context)[sl] if j in self.index else next(d_queries) for j in range(len(outs)))


def _restore(states: list, i: int) -> None:
    if states and states[i] is not None:
        states[i].restore()


def _record_or_restore(run: StackRun, states: list, i: int, replay: bool) -> None:
    """Forward records the RNG state before a part's chunk i; backward's recompute restores it."""
    if replay:
        _restore(states, i)
    else:
        states.append(run.capture_rng())


def _forward_causal_half(run: StackRun, block: Block, inp: torch.Tensor, x: Stream, scale: float, record: _HalfRecord,
                         routed) -> Stream:
    """_forward_half for a block with a causal core: before, core and position-wise part run a
    chunk at a time, the chunks in order, each reading the context of the chunks up to itself."""
    arith, s = run.arithmetic, run.settings
    factor = arith.factor(scale)
    slices = _row_slices(inp, s.chunk_tokens)
    lead = tuple(inp.shape[:-1])
    context = _Context(block.causal, inp)

    def out_of(sl: slice) -> torch.Tensor:
        rows = Rows(sl, lead)
        record.before.append(run.capture_rng())
        queries = context.fill(sl, _detached_output(block.before, _part(inp, sl), run, routed, rows))
        record.cores.append(run.capture_rng())
        n = len(queries)
        h = _detached_output(lambda parts, routed: block.causal.run(parts[:n], parts[n:], routed, rows),
                             (*queries, *context.at(rows)), run, routed, reads_stream=False)
        del queries
        record.chunks.append(run.capture_rng())
        return _detached_output(block.positionwise, h, run, reads_stream=False, stream_part=_part(inp, sl))

    return _coupled(run, x, slices, factor, out_of)


@dataclass
class _CausalChunk:
    """One chunk of a block with a causal core, recomputed with its graph: `before` from its
    input rows, the core from the queries and the context, the position-wise part from the
    core's output and the input rows."""

    before_leaf: torch.Tensor
    outs: tuple  # the `before` part's outputs, graph attached
    query_leaves: tuple
    context_leaves: tuple
    h: torch.Tensor  # the core's output, graph attached
    h_leaf: torch.Tensor
    stream_leaf: torch.Tensor
    out: torch.Tensor  # the block's output rows, graph attached

    @classmethod
    def recompute(cls, run: StackRun, block: Block, inp: torch.Tensor, i: int, rows: Rows, context: _Context,
                  record: _HalfRecord, routed) -> "_CausalChunk":
        cd = run.compute_dtype
        _restore(record.before, i)
        before_leaf = _part(inp, rows.rows).detach().requires_grad_()
        with torch.enable_grad(), run.autocast.active():
            outs = tuple(block.before(_block_input(before_leaf, cd), routed, rows))
        query_leaves = _leaves(block.causal.queries(outs))
        context_leaves = _leaves(context.at(rows))
        _restore(record.cores, i)
        with torch.enable_grad(), run.autocast.active():
            h = block.causal.run(_inputs_of(query_leaves, False, cd), _inputs_of(context_leaves, False, cd), routed, rows)
        h_leaf, stream_leaf = h.detach().requires_grad_(), _part(inp, rows.rows).detach().requires_grad_()
        _restore(record.chunks, i)
        with torch.enable_grad(), run.autocast.active():
            out = block.positionwise(_part_input(h_leaf, False, cd), _block_input(stream_leaf, cd))
        return cls(before_leaf, outs, query_leaves, context_leaves, h, h_leaf, stream_leaf, out)

    def input_gradient(self, d_out: torch.Tensor, rows: Rows, context: _Context, params, grads: _Gradients):
        """The chunk's input gradient, position-wise part, core and `before` differentiated in
        turn (the core's context gradient summed into `context`); the graph goes with it."""
        d_h, d_direct = grads.of(self.out, (self.h_leaf, self.stream_leaf), d_out, params, routed=False)
        self.out = self.h_leaf = None
        n = len(self.query_leaves)
        d_core = grads.of(self.h, (*self.query_leaves, *self.context_leaves), d_h, params)
        self.h = d_h = None
        context.add_grads(rows, d_core[n:])
        d_outs = context.grads_of(self.outs, d_core[:n], rows.rows)
        wanted = [j for j, d in enumerate(d_outs) if d is not None]
        d_before = None
        if wanted:
            d_before = grads.of(tuple(self.outs[j] for j in wanted), self.before_leaf, tuple(d_outs[j] for j in wanted),
                                params)
        self.outs = None
        return _add(d_direct, d_before)


def _backward_causal_half(run: StackRun, block: Block, inp: torch.Tensor, y: Stream, packed: list, scale: float, dy,
                          record: _HalfRecord, routed, params, grads: _Gradients, value_needed: bool,
                          d_other: torch.Tensor | None, writable: bool):
    """_backward_half for a block with a causal core. The context is recomputed over the whole
    sequence first; then each chunk, from the last, recomputes its `before` part, core and
    position-wise part and differentiates them in that order. A chunk's context gradient is
    complete once the chunks after it are done, which is when its `before` part needs it.
    Each chunk's input gradient is summed into d_other's rows where that may be done in place
    (one hidden-sized tensor fewer), as d_other + (the chunk's sum): the same bits."""
    arith = run.arithmetic
    factor = arith.factor(scale)
    slices = _row_slices(inp, run.settings.chunk_tokens)
    lead = tuple(inp.shape[:-1])
    context = _Context(block.causal, inp)
    for i in reversed(range(len(slices))):
        _restore(record.before, i)
        with run.autocast.active():
            context.fill(slices[i], _detached_output(block.before, _part(inp, slices[i]), run, routed, Rows(slices[i], lead)))
    x = _HalfStepOutput(arith, y, inp.shape, inp.device, len(slices), keep_values=value_needed or not arith.exact)
    in_place = writable and d_other is not None and d_other.is_contiguous() and d_other.dtype == inp.dtype
    d_inp = None
    if dy is not None:
        d_inp = d_other if in_place else torch.empty(inp.shape, dtype=inp.dtype, device=inp.device)
        dy = dy.contiguous()
    for i in reversed(range(len(slices))):
        rows = Rows(slices[i], lead)
        chunk = _CausalChunk.recompute(run, block, inp, i, rows, context, record, routed)
        _uncouple_rows(run, x, y, rows.rows, chunk.out.detach(), packed[i] if packed else None, factor)
        if dy is None:
            continue
        d_rows = chunk.input_gradient(_part(dy, rows.rows), rows, context, params, grads)
        del chunk
        if not in_place:
            _put_rows(d_inp, rows.rows, d_rows)
        elif d_rows is not None:
            _part(d_inp, rows.rows).add_(d_rows)
    if dy is None:
        return x.stream(), d_other, None
    return x.stream(), d_inp if in_place else _add(d_other, d_inp), _scaled(dy, scale)


def _writable(d: torch.Tensor | None, other: torch.Tensor | None, upstream: list) -> bool:
    """Whether a stream gradient is the engine's own, so that a half-step may sum into it in
    place: not a tensor autograd handed in, nor the same tensor as the other stream's."""
    return d is not None and d is not other and all(d is not t for t in upstream)


def _put_rows(buffer: torch.Tensor, sl: slice, g: torch.Tensor | None) -> None:
    if g is None:
        _part(buffer, sl).zero_()
    else:
        _part(buffer, sl).copy_(g)


def _swap_if(settings: CouplingSettings, a, b):
    # MEFT1/2 swap the streams after every layer so that the PLM path alternates between them
    return (b, a) if settings.swap else (a, b)


class _ReversibleStack(torch.autograd.Function):
    """Runs the couplings forward keeping only final streams and remainders; rebuilds in backward."""

    @staticmethod
    def forward(ctx, run: StackRun, x1v: torch.Tensor, x2v: torch.Tensor, *grad_inputs: torch.Tensor):
        s = run.settings
        run.autocast = _AutocastState.capture(x1v.device.type)
        run.rng_device = torch.empty(0, device=x1v.device)  # where RNG states are recorded
        run.arithmetic = arith = arithmetic_for(s, run.compute_dtype)
        run.remainders = _Remainders(s.offload_remainders, x1v.device)
        routed = _leaf_routed(run.routed)
        x1, flag = arith.start(x1v)
        if flag is not None:
            run.flags.append(flag)
            run.flag_names.append("the stack input")
        # both streams start at the same point; each gets its own integers, overwritten in place
        x2 = Stream(x1.ints.clone(), x1.value, x1.checksum) if arith.exact else Stream(None, x1.value)
        for c in run.couplings:
            rec = _LayerRecord()
            if arith.exact and s.audit:
                rec.checksum = torch.stack([x1.checksum, x2.checksum])
            if run.trace is not None:
                run.trace.append(("forward", c.name, *(t.clone() for t in _stream_state(x1, x2))))
            names_before = len(run.flags)
            with c.gathered():
                y1 = _forward_half(run, c.F, x2.value, x1, s.lambda_, rec.F, routed)  # y1 = λ·x1 + F(x2)
                n_f = len(run.flags) - names_before
                y2 = _forward_half(run, c.G, y1.value, x2, s.beta, rec.G, routed)  # y2 = β·x2 + G(y1)
            run.flag_names += [f"{c.name} (F)"] * n_f + [f"{c.name} (G)"] * (len(run.flags) - names_before - n_f)
            run.records.append(rec)
            x1, x2 = _swap_if(s, y1, y2)
        if arith.exact:
            _raise_if_out_of_range(run.flags, run.flag_names, s, run.couplings)
        values = (x1.value, x2.value)
        run.flags, run.flag_names = [], []
        # the final streams stay outside save_for_backward: backward turns them into the layers'
        # inputs one layer at a time, in place. Of their values only the top G's input (the
        # output y1 became) is needed again, and it is the very tensor returned to the caller
        if arith.exact and run.couplings:
            g_input = y1.value
            x1, x2 = (Stream(t.ints, t.value if t.value is g_input else None, t.checksum) for t in (x1, x2))
        run.final_streams = [x1, x2]
        ctx.save_for_backward(*run.remainders.device_tensors())
        ctx.run = run
        # an output nobody used gets None, not zeros: its blocks then contribute no gradient,
        # and parameters only it reaches keep grad None, as under plain autograd
        ctx.set_materialize_grads(False)
        if arith.exact:
            ctx.mark_non_differentiable(x1.ints, x2.ints)
            return values[0], values[1], x1.ints, x2.ints
        return values[0], values[1], None, None

    @staticmethod
    def backward(ctx, dy1: torch.Tensor | None, dy2: torch.Tensor | None, _di1=None, _di2=None):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "MEFT: the reversible backward cannot be differentiated again (create_graph=True, as gradient "
                "penalties and double backward need). Train such a loss with plain autograd through the same "
                "model: `with model.meft_backward(\"vanilla\"): ...` (activations are stored)."
            )
        run: StackRun = ctx.run
        s = run.settings
        if run.final_streams is None:
            raise RuntimeError(
                "MEFT: backward through the same reversible forward a second time is not supported; its streams "
                "were consumed by the first backward (retain_graph=True cannot keep them). Run the forward again."
            )
        (y1, y2), run.final_streams = run.final_streams, None
        upstream = [t for t in (dy1, dy2) if t is not None]  # autograd's tensors: never written to
        run.remainders.restore(ctx.saved_tensors)
        routed = _leaf_routed(run.routed)
        grads = _Gradients(run, routed)
        checksums = []
        device_ids = [run.rng_device.device.index] if run.record_rng and run.rng_device.is_cuda else []
        fork = torch.random.fork_rng(devices=device_ids, enabled=run.record_rng, device_type=run.rng_device.device.type
                                     if run.rng_device.is_cuda else "cuda")
        with fork:
            for idx in reversed(range(len(run.couplings))):
                c, rec = run.couplings[idx], run.records[idx]
                y1, y2 = _swap_if(s, y1, y2)  # undo the swap that followed this layer
                dy1, dy2 = _swap_if(s, dy1, dy2)
                params = list(c.params)
                grads.start_layer()
                with c.gathered():
                    # y2 = β·x2 + G(y1): rebuild x2, then dy1 += (∂G/∂y1)ᵀ·dy2; offloaded remainders
                    # travel back one half-step ahead, while the one before computes
                    packed_g = run.remainders.take(2 * idx + 1)
                    run.remainders.prefetch(2 * idx)
                    x2, dy1, dx2 = _backward_half(
                        run, c.G, y1.value, y2, packed_g, s.beta, dy2, rec.G, routed, params, grads,
                        d_other=dy1, writable=_writable(dy1, dy2, upstream),
                    )
                    del dy2
                    if run.arithmetic.exact:
                        y1.value = None  # G's input, needed no more (in float mode it is the stream)
                    # y1 = λ·x1 + F(x2): rebuild x1, then dx2 += (∂F/∂x2)ᵀ·dy1 and dx1 = λ·dy1
                    packed_f = run.remainders.take(2 * idx)
                    run.remainders.prefetch(2 * idx - 1)
                    # x1's value is G's input in the layer below only without the swap
                    x1, dx2, dx1 = _backward_half(
                        run, c.F, x2.value, y1, packed_f, s.lambda_, dy1, rec.F, routed, params, grads,
                        value_needed=not s.swap, d_other=dx2, writable=_writable(dx2, dy1, upstream),
                    )
                del dy1
                # only the value of the stream that is G's input in the layer below is read again
                if run.arithmetic.exact:
                    (x1 if s.swap else x2).value = None
                grads.end_layer()
                if run.trace is not None:
                    run.trace.append(("backward", c.name, *(t.clone() for t in _stream_state(x1, x2))))
                if rec.checksum is not None:
                    checksums.append((idx, rec.checksum, torch.stack([x1.checksum, x2.checksum])))
                y1, y2, dy1, dy2 = x1, x2, dx1, dx2
        if checksums:
            saved = torch.stack([c[1] for c in checksums])
            rebuilt = torch.stack([c[2] for c in checksums])
            if not torch.equal(saved, rebuilt):
                # errors propagate downwards: the highest mismatching layer is where it started
                bad = next(idx for idx, a, b in checksums if not torch.equal(a, b))
                raise ReconstructionError(
                    f"MEFT audit: the input of {run.couplings[bad].name}, rebuilt in backward, differs from the "
                    "forward pass, so its gradients would be wrong. A kernel in this layer is not deterministic "
                    "(try torch.use_deterministic_algorithms(True) and CUBLAS_WORKSPACE_CONFIG=:4096:8), or the "
                    "model or its inputs were modified between forward and backward."
                )
        return (None, dy1, dy2, *grads.routed, *grads.params)


def _stream_state(x1: Stream, x2: Stream) -> tuple[torch.Tensor, torch.Tensor]:
    """What the trace records of a layer's input: integers in exact mode, values in float mode."""
    return (x1.ints, x2.ints) if x1.ints is not None else (x1.value, x2.value)


# ------------------------------------------------------------ plain-autograd (vanilla) path


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


def _vanilla_layers(couplings, s: CouplingSettings, routed_for_all, cd, x1v, x2v, x1i=None, x2i=None):
    """The same couplings under ordinary autograd (activations stored). Exact mode computes
    the identical integer forward, chunked the same way, so its gradients are the reversible
    path's oracle."""
    arith = arithmetic_for(s, cd)
    flags: list = []
    names: list = []
    for c in couplings:
        if not c.autograd_ok and torch.is_grad_enabled():
            raise RuntimeError(
                f"MEFT: {c.name} has its weights only while it runs (a whole layer as an FSDP unit), so plain "
                "autograd cannot train it: its backward would run after the weights are freed. Train it with the "
                "reversible backward over every layer (the default: backward mode \"reversible\", "
                "reversible_layers=None), under torch.no_grad() for evaluation, or shard model.fsdp_units() "
                "instead of whole layers."
            )
        routed = _per_layer_views(routed_for_all)
        with c.gathered():
            before = len(flags)
            f = c.F(_block_input(x2v, cd), routed, s.chunk_tokens)
            if s.exact:
                y1v, y1i = _ExactCouple.apply(x1v, f, x1i, s.lambda_, arith, s.chunk_tokens, flags)
            else:
                y1v, y1i = x1v * s.lambda_ + f.to(x1v.dtype), None
            n_f = len(flags) - before
            g = c.G(_block_input(y1v, cd), routed, s.chunk_tokens)
            if s.exact:
                y2v, y2i = _ExactCouple.apply(x2v, g, x2i, s.beta, arith, s.chunk_tokens, flags)
            else:
                y2v, y2i = x2v * s.beta + g.to(x2v.dtype), None
            names += [f"{c.name} (F)"] * n_f + [f"{c.name} (G)"] * (len(flags) - before - n_f)
        (x1v, x1i), (x2v, x2i) = _swap_if(s, (y1v, y1i), (y2v, y2i))
    if s.exact:
        _raise_if_out_of_range(flags, names, s, couplings)
    return x1v, x2v, x1i, x2i


def run_float_layer(x1: torch.Tensor, x2: torch.Tensor, coupling: Coupling, settings: CouplingSettings, routed: dict,
                    compute_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """One coupling in float arithmetic, from two given streams (evaluation layer by layer)."""
    float_settings = CouplingSettings(settings.lambda_, settings.beta, settings.swap, exact=False)
    return _vanilla_layers([coupling], float_settings, routed, compute_dtype, x1, x2)[:2]


# ---------------------------------------------------------------------------- entry point


def run_stack(
    x: torch.Tensor,
    couplings: Sequence[Coupling],
    settings: CouplingSettings,
    routed: dict[str, Any],
    *,
    mode: str = "reversible",
    reversible_layers: int | None = None,
    record_rng: bool = True,
    trace: list | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs the two streams, both starting at x, through the couplings.

    mode:
      "float":      plain float coupling (eval, inference, no_grad); autograd if grad is on.
      "reversible": the lowest `reversible_layers` couplings (all when None) keep only the
                    final streams and remainders and rebuild inputs in backward; the layers
                    above run under ordinary autograd (the paper's hybrid).
      "vanilla":    every coupling under ordinary autograd: the oracle and a debug path.

    Returns the final streams' values (x1, x2): in the compute dtype in exact mode, in at
    least float32 in float mode.
    """
    cd = x.dtype
    if mode == "float":
        float_settings = CouplingSettings(settings.lambda_, settings.beta, settings.swap, exact=False)
        h = x.to(stream_dtype_for(cd))
        return _vanilla_layers(couplings, float_settings, routed, cd, h, h)[:2]
    if mode not in ("reversible", "vanilla"):
        raise ValueError(f"unknown mode {mode!r}")
    h = x.to(stream_dtype_for(cd)) if not settings.exact else x
    n_rev = 0 if mode == "vanilla" else (len(couplings) if reversible_layers is None else reversible_layers)
    lower, upper = couplings[:n_rev], couplings[n_rev:]
    if not h.requires_grad and not lower:
        # layers under autograd see inputs that require grad, as the reversible recompute's
        # blocks do, so both paths run the same kernels even when the embeddings are frozen.
        # The reversible stack makes its own leaves in backward: a leaf here would only keep
        # the stack input alive (its AccumulateGrad holds it) for a gradient nobody reads
        h = h.detach().requires_grad_()
    x1i = x2i = None
    if lower:
        run = StackRun(lower, settings, routed, cd, record_rng=record_rng, trace=trace)
        x1v, x2v, x1i, x2i = _ReversibleStack.apply(run, h, h, *run.grad_inputs())
    elif settings.exact:
        flags: list = []
        arith = arithmetic_for(settings, cd)
        (x1v, x1i), (x2v, x2i) = _Start.apply(h, arith, flags), _Start.apply(h, arith, flags)
        _raise_if_out_of_range(flags, ["the stack input"] * 2, settings)
    else:
        x1v, x2v = h, h
    if upper:
        x1v, x2v, _, _ = _vanilla_layers(upper, settings, routed, cd, x1v, x2v, x1i, x2i)
    return x1v, x2v
