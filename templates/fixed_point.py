"""The fixed-point format of the exact streams, the packing of remainders, and the fused kernels.

A stream holds integers with K fractional bits, fix(t) = round(t·2^K), in int64 or, for 16-bit
models, int32. A half-step divides a stream's integers by m (a scale 1/m) and keeps the
remainders as the only per-layer state, packed into a plane per whole byte and, for the bits left
over, eight at a time; `RemainderStore` keeps them on the device or in pinned host memory. The
three kernels (a stream's start, one coupling, its inverse) run fused through torch.compile on
CUDA, decided once per process.

Everything here is integer arithmetic on tensors: no blocks, no autograd.
"""

from __future__ import annotations

import os
import warnings
from typing import Sequence

import torch

from .labels import labelled
from .meft_table import remainder_layout


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


def _pack_bits(v: torch.Tensor, bits: int) -> tuple[torch.Tensor, ...]:
    """Values in [0, 2^bits) → uint8 planes, each its own tensor (joining them would cost a
    copy): a plane of n bytes per whole byte of the values, one pass each; then the bits left over
    (r = bits % 8) eight values at a time, as one number of 8·r bits split into r planes of ⌈n/8⌉
    bytes. So each value costs exactly `bits` bits (packed_remainder_bytes counts them)."""
    flat = v.reshape(-1)
    whole, rest = divmod(bits, 8)
    planes = [((flat >> (8 * i)) & 255).to(torch.uint8) for i in range(whole)]
    if rest:
        top = torch.nn.functional.pad(flat >> (8 * whole), (0, (-flat.numel()) % 8)).view(-1, 8).to(torch.int64)
        word = (top << (rest * torch.arange(8, dtype=torch.int64, device=v.device))).sum(1)  # 8·r ≤ 56 bits
        planes += [((word >> (8 * j)) & 255).to(torch.uint8) for j in range(rest)]
    return tuple(planes)


def _unpack_bits(planes: Sequence[torch.Tensor], bits: int, count: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """Inverse of _pack_bits: the first `count` values, as `dtype`."""
    whole, rest = divmod(bits, 8)
    v = torch.zeros(count, dtype=dtype, device=planes[0].device)
    for i in range(whole):
        v = v | (planes[i].to(dtype) << (8 * i))
    if rest:
        word = torch.zeros(planes[whole].shape, dtype=torch.int64, device=v.device)
        for j in range(rest):
            word = word | (planes[whole + j].to(torch.int64) << (8 * j))
        shifts = rest * torch.arange(8, dtype=torch.int64, device=v.device)
        top = ((word.view(-1, 1) >> shifts) & ((1 << rest) - 1)).view(-1)[:count]
        v = v | (top.to(dtype) << (8 * whole))
    return v


def pack_remainders(r: torch.Tensor, m: int) -> tuple[torch.Tensor, ...]:
    """Remainders modulo m → uint8 planes of their groups of k (remainder_layout); none for m = 1."""
    if m == 1:
        return ()
    k, bits = remainder_layout(m)
    if k == 1:
        return _pack_bits(r.reshape(-1), bits)
    groups = torch.nn.functional.pad(r.reshape(-1).to(torch.int64), (0, (-r.numel()) % k)).view(-1, k)
    value = groups[:, k - 1]
    for i in range(k - 2, -1, -1):  # Horner: r0 + m·(r1 + m·(r2 + ...))
        value = value * m + groups[:, i]
    return _pack_bits(value, bits)


def unpack_remainders(packed: Sequence[torch.Tensor], m: int, like: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_remainders: remainders shaped (and typed) like `like`."""
    k, bits = remainder_layout(m)
    if k == 1:
        return _unpack_bits(packed, bits, like.numel(), like.dtype).view(like.shape)
    value = _unpack_bits(packed, bits, -(-like.numel() // k))
    digits = []
    for _ in range(k):
        digits.append(value % m)
        value = value // m
    return torch.stack(digits, dim=1).reshape(-1)[: like.numel()].view(like.shape).to(like.dtype)


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
        packed = pack_remainders(x - q * m, m)
    # `not (|v| < limit)` is also true for NaN
    out_of_range = ~((scaled.abs() < limit).all() & (q.abs() < limit).all())
    y = q + scaled.round().to(x.dtype)
    return y, _value_of(y, frac_bits, value_dtype), packed, out_of_range, y.sum(dtype=torch.int64)


def _uncouple(y: torch.Tensor, block_out: torch.Tensor, packed, m: int, frac_bits: int, value_dtype: torch.dtype):
    """Inverse of _couple: x = m·(y − fix(block_out)) + r; returns x, its value and its sum."""
    x = (y - (block_out.to(_wide_float(y.dtype)) * (2.0**frac_bits)).round().to(y.dtype)) * m
    if packed is not None:
        x = x + unpack_remainders(packed, m, y)
    return x, _value_of(x, frac_bits, value_dtype), x.sum(dtype=torch.int64)


# On CUDA the kernels above run fused by torch.compile (eager, each is about fifteen passes
# over the stream); elsewhere they run eagerly. Integer results are the same either way,
# but float values can differ in rounding ties between the two, so a run never mixes them.
# Whether the compiler works is decided once per process, on a tiny tensor, before any value
# of a run is computed; after that every error (out of memory first) propagates.
# MEFT_COMPILE=0 turns compiling off; MEFT_COMPILE=all compiles on every device, the CPU too
# (benchmarks/cpu_step.py measures a GPU step's host work that way).
_COMPILE: dict = {"enabled": None if os.environ.get("MEFT_COMPILE", "1") != "0" else False,
                  "everywhere": os.environ.get("MEFT_COMPILE") == "all"}
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
    return (t.is_cuda or _COMPILE["everywhere"]) and _compiler_works(t.device)


def compiled_function(fn):
    """fn through torch.compile, one compiled function per fn for the process (the stream
    kernels here, and the blocks under compile_blocks). Dynamic: one kernel for all sequence
    lengths; arguments such as m and the dtypes add a few variants."""
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=True)
    return _COMPILED[fn]


def _run_kernel(fn, *args):
    """fn(*args), through torch.compile when its tensors live on a CUDA device."""
    if _use_compiler(args[0]):
        return compiled_function(fn)(*args)
    return fn(*args)


# ------------------------------------------------------------------ where remainders live


class RemainderStore:
    """The packed remainders of every half-step, chunk by chunk: on the device (handed to
    save_for_backward, so saved-tensor hooks see them), or in pinned host memory."""

    def __init__(self, offload: bool, device: torch.device):
        self.offload = offload and device.type == "cuda"
        self.device = device
        self.parts: list[list] = []  # per half-step: its chunks' packed planes (a tuple; None for m = 1)
        self._copies = torch.cuda.Stream(device) if self.offload else None
        self._fetched: dict[int, list] = {}

    @labelled("remainders")
    def add(self, chunks: list) -> None:
        if self.offload:
            chunks = [self._to_host(t) for t in chunks]
        self.parts.append(chunks)

    def _to_host(self, planes: tuple | None) -> tuple | None:
        if planes is None:
            return None
        hosts = tuple(torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in planes)
        self._copies.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._copies):
            for host, t in zip(hosts, planes):
                host.copy_(t, non_blocking=True)
                t.record_stream(self._copies)  # its memory is reused only once the copy is done
        return hosts

    def device_tensors(self) -> list[torch.Tensor]:
        """What save_for_backward keeps (nothing when offloaded)."""
        return [] if self.offload else [t for chunks in self.parts for planes in chunks if planes is not None
                                        for t in planes]

    def restore(self, saved: Sequence[torch.Tensor]) -> None:
        if self.offload:
            return
        it = iter(saved)
        self.parts = [[None if planes is None else tuple(next(it) for _ in planes) for planes in chunks]
                      for chunks in self.parts]

    @labelled("remainders")
    def prefetch(self, index: int) -> None:
        """Starts copying half-step `index`'s remainders back to the device."""
        if not self.offload or index < 0 or index in self._fetched:
            return
        self._copies.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._copies):
            self._fetched[index] = [None if planes is None else tuple(t.to(self.device, non_blocking=True) for t in planes)
                                    for planes in self.parts[index]]

    @labelled("remainders")
    def take(self, index: int) -> list:
        if not self.offload:
            chunks, self.parts[index] = self.parts[index], []
            return chunks
        self.prefetch(index)
        torch.cuda.current_stream(self.device).wait_stream(self._copies)
        chunks = self._fetched.pop(index)
        for planes in chunks:
            for t in planes or ():
                t.record_stream(torch.cuda.current_stream(self.device))
        self.parts[index] = []
        return chunks
