"""Exact reversible coupling: the engine every MEFT checkpoint carries.

A reversible layer keeps two streams and couples them with two functions F and G:

    y1 = λ·x1 + F(x2)            inverse:  x2 = (y2 − G(y1)) / β
    y2 = β·x2 + G(y1)                      x1 = (y1 − F(x2)) / λ

Because each layer's input can be recomputed from its output, training keeps only the
last layer's output instead of every layer's activations.

In floating point the inverse divides by λ and β at every layer, so rounding errors are
multiplied layer after layer (with λ = 0.1, the rebuilt input of a 6-layer BERT is off by
14 to 19%, and by a factor of hundreds for MEFT3).
This engine makes the inverse exact. The streams are int64 fixed-point numbers with K
fractional bits, fix(t) = round(t·2^K), and λ = 1/m for a positive integer m:

    forward:  q1, r1 = divmod(x1, m)       y1 = q1 + fix(F(x2))
    inverse:  x1 = m·(y1 − fix(F(x2))) + r1

Integer arithmetic has no rounding, so the inverse reproduces every bit provided F is
recomputed bit-identically: same input (the dequantised integers), same dropout masks
(the RNG state is recorded before each block and replayed), same kernels (the forward
runs each block exactly as the recompute does). The remainders r are the only per-layer
state: a few remainders share one number below m^k, packed into bit planes, so each takes
about log2 m bits (3.33 for m = 10, 10 for m = 1024, none for m = 1).

Gradients follow the real-valued coupling (dx1 = λ·dy1 + ..., fix and the integer
division count as identity), so they equal plain autograd through the same forward.

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

# A block maps a stream (in the compute dtype) and the routed layer arguments to a tensor.
Block = Callable[[torch.Tensor, dict], torch.Tensor]

# Block outputs must stay below 2^(RANGE_BITS − K) in magnitude: int64 streams then have
# room for the sum of 2^(63 − RANGE_BITS) = 128 such outputs before they could overflow.
RANGE_BITS = 56


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

    @property
    def lambda_m(self) -> int:
        return denominator_of(self.lambda_)

    @property
    def beta_m(self) -> int:
        return denominator_of(self.beta)


def denominator_of(scale: float) -> int:
    """m such that scale == 1/m; ValueError if scale is not of that form."""
    if not scale > 0:
        raise ValueError(f"scale factors must be > 0, got {scale}")
    m = round(1.0 / scale)
    if m < 1 or abs(m * scale - 1.0) > 1e-9:
        raise ValueError(f"{scale} is not 1/m for a positive integer m")
    return m


@dataclass
class Coupling:
    """One reversible layer: its two blocks and the trainable tensors they read."""

    F: Block
    G: Block
    params: tuple[torch.Tensor, ...]  # trainable parameters used by F or G
    name: str  # e.g. "layer 3", used in error messages
    # entered around everything the layer computes with its weights: in forward, and in backward
    # around the recompute and its gradients (an FSDP unit gathers its shards here)
    gathered: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    # False when the weights are there only inside `gathered`: plain autograd, whose backward
    # runs later, cannot train such a layer
    autograd_ok: bool = True


# ----------------------------------------------------------------------------- fixed point


def stream_dtype_for(compute_dtype: torch.dtype) -> torch.dtype:
    """Streams and their gradients are kept in at least float32, even for 16-bit models."""
    return torch.promote_types(compute_dtype, torch.float32)


def to_fixed(t: torch.Tensor, frac_bits: int) -> torch.Tensor:
    """round(t · 2^K) as int64 (exact through float64: 2^K scaling only moves the exponent)."""
    return (t.to(torch.float64) * (2.0**frac_bits)).round().to(torch.int64)


def from_fixed(i: torch.Tensor, frac_bits: int, dtype: torch.dtype) -> torch.Tensor:
    return (i.to(torch.float64) * (2.0**-frac_bits)).to(dtype)


def _out_of_range(t: torch.Tensor, frac_bits: int) -> torch.Tensor:
    # `not (|v| < limit)` is also true for NaN: one flag per block, all checked once per stack
    return ~((t.to(torch.float64) * (2.0**frac_bits)).abs() < 2.0**RANGE_BITS).all()


def remainder_layout(m: int) -> tuple[int, int]:
    """(k, bits): k remainders modulo m are stored together as one number below m^k in `bits`
    bits, k ≤ 8 chosen for the fewest bits per remainder. m = 10: three remainders in 10 bits
    (3.33 bits each, where one at a time would take 4); m = 2^j: one in j bits; m = 1: none."""
    if m == 1:
        return 1, 0
    best_k, best_bits = 1, (m - 1).bit_length()
    for k in range(2, 9):
        if m**k > 2**62:
            break
        bits = (m**k - 1).bit_length()
        if bits * best_k < best_bits * k:
            best_k, best_bits = k, bits
    return best_k, best_bits


def packed_remainder_bytes(m: int, count: int) -> int:
    """Bytes that `count` remainders modulo m take once packed."""
    k, bits = remainder_layout(m)
    return bits * (-(-(-(-count // k)) // 8))


def _pack_bits(v: torch.Tensor, bits: int) -> torch.Tensor:
    """Values in [0, 2^bits) → uint8 bit planes of shape (bits, ⌈n/8⌉): plane j holds bit j of
    eight values per byte, so each value costs exactly `bits` bits."""
    flat = torch.nn.functional.pad(v, (0, (-v.numel()) % 8)).reshape(-1, 8)
    weights = 1 << torch.arange(8, dtype=torch.uint8, device=v.device)  # 1, 2, ..., 128
    return torch.stack([(((flat >> j) & 1).to(torch.uint8) * weights).sum(1, dtype=torch.uint8) for j in range(bits)])


def _unpack_bits(planes: torch.Tensor, bits: int) -> torch.Tensor:
    shifts = torch.arange(8, dtype=torch.uint8, device=planes.device)
    v = torch.zeros(planes.shape[1] * 8, dtype=torch.int64, device=planes.device)
    for j in range(bits):
        v = v | (((planes[j].view(-1, 1) >> shifts) & 1).view(-1).to(torch.int64) << j)
    return v


def _pack(r: torch.Tensor, m: int) -> torch.Tensor:
    """Remainders modulo m (m > 1) → bit planes of their groups of k (remainder_layout)."""
    k, bits = remainder_layout(m)
    groups = torch.nn.functional.pad(r.reshape(-1), (0, (-r.numel()) % k)).view(-1, k)
    value = groups[:, k - 1]
    for i in range(k - 2, -1, -1):  # Horner: r0 + m·(r1 + m·(r2 + ...))
        value = value * m + groups[:, i]
    return _pack_bits(value, bits)


def _unpack(planes: torch.Tensor, m: int, like: torch.Tensor) -> torch.Tensor:
    k, bits = remainder_layout(m)
    value = _unpack_bits(planes, bits)
    digits = []
    for _ in range(k):
        digits.append(value % m)
        value = value // m
    return torch.stack(digits, dim=1).reshape(-1)[: like.numel()].view(like.shape)


def _value_of(ints: torch.Tensor, frac_bits: int, dtype: torch.dtype) -> torch.Tensor:
    """A stream's real value: the input its next block sees."""
    return from_fixed(ints, frac_bits, dtype)


def _couple(x: torch.Tensor, block_out: torch.Tensor, m: int, frac_bits: int, value_dtype: torch.dtype):
    """One exact half-step on int64 streams: y = floor(x / m) + fix(block_out).

    Returns y, its value (the next block's input), the remainders x mod m packed into bit
    planes (None for m = 1), a flag for block outputs out of range, and the wrapping sum of
    y, the audit's fingerprint. One function, so that it compiles to few fused kernels."""
    scaled = block_out.to(torch.float64) * (2.0**frac_bits)
    out_of_range = ~(scaled.abs() < 2.0**RANGE_BITS).all()
    if m == 1:
        q, packed = x, None
    else:
        q = torch.div(x, m, rounding_mode="floor")
        packed = _pack(x - q * m, m)
    y = q + scaled.round().to(torch.int64)
    return y, _value_of(y, frac_bits, value_dtype), packed, out_of_range, y.sum()


def _uncouple(y: torch.Tensor, block_out: torch.Tensor, packed, m: int, frac_bits: int, value_dtype: torch.dtype):
    """Inverse of _couple: x = m·(y − fix(block_out)) + r; returns x, its value and its sum."""
    x = (y - (block_out.to(torch.float64) * (2.0**frac_bits)).round().to(torch.int64)) * m
    if packed is not None:
        x = x + _unpack(packed, m, y)
    return x, _value_of(x, frac_bits, value_dtype), x.sum()


# On CUDA the half-steps run as kernels fused by torch.compile (eager, each is about fifteen
# passes over 8-byte tensors); elsewhere, or if compiling fails, they run eagerly. Integer
# results are the same either way, but float values can differ in rounding ties between the
# two, so a run never mixes them: every value comes through _run_kernel. MEFT_COMPILE=0
# turns compiling off.
_COMPILE = {"enabled": os.environ.get("MEFT_COMPILE", "1") != "0"}
_COMPILED: dict = {}


def _run_kernel(fn, *args):
    """fn(*args), through torch.compile when its tensors live on a CUDA device."""
    if _COMPILE["enabled"] and args[0].is_cuda:
        try:
            if fn not in _COMPILED:
                # dynamic: one kernel for all sequence lengths; m and the dtypes add a few variants
                _COMPILED[fn] = torch.compile(fn, dynamic=True)
            return _COMPILED[fn](*args)
        except Exception as e:  # no working compiler here: the eager path computes the same integers
            _COMPILE["enabled"] = False
            warnings.warn(
                f"MEFT: torch.compile failed ({type(e).__name__}: {e}); using the slower eager kernels", stacklevel=2
            )
    return fn(*args)


def pack_remainders(r: torch.Tensor, m: int) -> torch.Tensor:
    """Remainders modulo m → uint8 bit planes (remainder_layout); empty for m = 1."""
    return _pack(r, m) if m > 1 else torch.empty(0, dtype=torch.uint8)


def unpack_remainders(planes: torch.Tensor, m: int, like: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_remainders: int64 remainders shaped like `like`."""
    return _unpack(planes, m, like)


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


# -------------------------------------------------------------------- the stack's context


def _leaf_routed(routed: dict) -> dict:
    """Routed arguments with tensors cut from the outer graph; grad-requiring ones stay leaves."""
    return {
        k: (v.detach().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v) for k, v in routed.items()
    }


@dataclass
class _LayerRecord:
    """What the reversible forward keeps per layer besides its remainders (which go through
    save_for_backward, so that saved-tensor hooks such as CPU offloading see them)."""

    rng_f: _RngState | None = None
    rng_g: _RngState | None = None
    checksum: torch.Tensor | None = None


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
    routed_grad_keys: tuple = ()
    param_list: list = field(default_factory=list)
    final_streams: list | None = None  # the top layer's int64 outputs, until backward consumes them

    def grad_inputs(self) -> list[torch.Tensor]:
        """Tensors the stack differentiates with respect to, besides the two streams."""
        self.routed_grad_keys = tuple(
            k for k, v in self.routed.items() if isinstance(v, torch.Tensor) and v.requires_grad
        )
        params = list({id(p): p for c in self.couplings for p in c.params}.values())
        self.param_list = params
        return [self.routed[k] for k in self.routed_grad_keys] + params

    def kept_bytes(self) -> int:
        """Bytes held for backward beside the saved tensors: the final streams, RNG states and checksums."""
        total = sum(t.numel() * t.element_size() for t in self.final_streams or ())
        for rec in self.records:
            for rng in (rec.rng_f, rec.rng_g):
                if rng is not None:
                    total += rng.cpu.numel() + sum(s.numel() * s.element_size() for s in rng.device_states)
            if rec.checksum is not None:
                total += rec.checksum.numel() * 8
        return total


def _raise_if_out_of_range(flags: list, names: list[str], frac_bits: int, couplings: Sequence[Coupling] = ()) -> None:
    if flags and bool(torch.stack(flags).any()):
        first = next(i for i, f in enumerate(flags) if bool(f))
        broken = [c.name for c in couplings if any(not bool(torch.isfinite(p).all()) for p in c.params)]
        if broken:
            cause = (
                f"the trainable parameters of {', '.join(broken[:3])} hold NaN or inf: an optimizer step diverged "
                "(a learning rate too high, or 16-bit trainable weights: keep them in float32, as from_pretrained does)"
            )
        else:
            cause = "usual causes: fp16 overflow, fully masked attention rows, a diverged training run"
        raise FloatingPointError(
            f"{names[first]} produced NaN, inf or values of magnitude >= 2^{RANGE_BITS - frac_bits}, "
            f"outside the exact fixed-point range (frac_bits={frac_bits}); {cause}."
        )


def _block_names(couplings: Sequence[Coupling]) -> list[str]:
    return [f"{c.name} ({half})" for c in couplings for half in ("F", "G")]


# ------------------------------------------------------------------ exact reversible path


def _quantize(x: torch.Tensor, frac_bits: int, value_dtype: torch.dtype):
    """A stream's start: its integers, their value, their wrapping sum and a range flag."""
    ints = to_fixed(x, frac_bits)
    return ints, _run_kernel(_value_of, ints, frac_bits, value_dtype), ints.sum(), _out_of_range(x, frac_bits)


class _ReversibleStack(torch.autograd.Function):
    """Runs the couplings forward keeping only final streams and remainders; rebuilds in backward."""

    @staticmethod
    def forward(ctx, run: StackRun, x1v: torch.Tensor, x2v: torch.Tensor, *grad_inputs: torch.Tensor):
        s = run.settings
        sd = x1v.dtype  # stream dtype
        run.autocast = _AutocastState.capture(x1v.device.type)
        routed = _leaf_routed(run.routed)
        flags: list = []  # out-of-range flags, checked once at the end (one device sync)
        remainders: list = []  # packed (r1, r2) per layer
        if s.exact:
            # each stream: int64 fixed-point values, their real value (the next block's input)
            # and the wrapping sum the audit compares
            x1, v1, sum1, flag = _quantize(x1v, s.frac_bits, sd)
            x2, v2, sum2 = (x1, v1, sum1) if x2v is x1v else _quantize(x2v, s.frac_bits, sd)[:3]
            flags.append(flag)
        else:
            x1, x2 = x1v.detach(), x2v.detach()
            v1, v2 = x1, x2
        for c in run.couplings:
            rec = _LayerRecord()
            if s.exact and s.audit:
                rec.checksum = torch.stack([sum1, sum2])
            if run.trace is not None:
                run.trace.append(("forward", c.name, x1.clone(), x2.clone()))
            with c.gathered():
                rec.rng_f = _RngState.capture(x1v) if run.record_rng else None
                f = _run_block(c.F, v2, routed, run)
                rec.rng_g = _RngState.capture(x1v) if run.record_rng else None
                if s.exact:
                    # y1 = λ·x1 + F(x2) with λ = 1/m: floor-divide, keep the remainder for the inverse
                    y1, w1, r1, flag1, sum_y1 = _run_kernel(_couple, x1, f, s.lambda_m, s.frac_bits, sd)
                    del f
                    g = _run_block(c.G, w1, routed, run)
                    g_input = w1
                    y2, w2, r2, flag2, sum_y2 = _run_kernel(_couple, x2, g, s.beta_m, s.frac_bits, sd)
                    del g
                    remainders += [r1, r2]
                    flags += [flag1, flag2]
                else:
                    y1 = w1 = x1 * s.lambda_ + f.to(sd)
                    g = _run_block(c.G, w1, routed, run)
                    g_input = w1
                    y2 = w2 = x2 * s.beta + g.to(sd)
                    del f, g
                    sum_y1 = sum_y2 = None
            run.records.append(rec)
            # MEFT1/2 swap the streams so that the PLM path alternates between them
            if s.swap:
                x1, v1, sum1, x2, v2, sum2 = y2, w2, sum_y2, y1, w1, sum_y1
            else:
                x1, v1, sum1, x2, v2, sum2 = y1, w1, sum_y1, y2, w2, sum_y2
        if s.exact:
            _raise_if_out_of_range(flags, ["the stack input"] + _block_names(run.couplings), s.frac_bits, run.couplings)
        else:
            v1, v2 = x1, x2
        # the final streams stay outside save_for_backward: backward turns them into the layers'
        # inputs one layer at a time and lets go of each as soon as the one below is rebuilt
        run.final_streams = [x1, x2]
        # and the value the top layer's G saw: backward must feed it the very same one
        ctx.save_for_backward(g_input, *remainders)
        ctx.run = run
        ctx.stream_dtype = sd
        # an output nobody used gets None, not zeros: its blocks then contribute no gradient,
        # and parameters only it reaches keep grad None, as under plain autograd
        ctx.set_materialize_grads(False)
        if s.exact:
            ctx.mark_non_differentiable(x1, x2)
            return v1, v2, x1, x2
        return v1, v2, None, None

    @staticmethod
    def backward(ctx, dy1: torch.Tensor | None, dy2: torch.Tensor | None, _di1=None, _di2=None):
        run: StackRun = ctx.run
        s = run.settings
        if run.final_streams is None:
            raise RuntimeError(
                "MEFT: backward through the same reversible forward a second time is not supported; its streams "
                "were consumed by the first backward (retain_graph=True cannot keep them). Run the forward again."
            )
        (y1, y2), run.final_streams = run.final_streams, None
        g_input, *remainders = ctx.saved_tensors
        # the top layer's G input, placed where undoing the swap below expects it; the value of
        # y2 is never needed (F's input is rebuilt first)
        w1, w2 = (None, g_input) if s.swap else (g_input, None)
        remainders = remainders or [None] * (2 * len(run.couplings))  # float mode keeps none
        sd = ctx.stream_dtype
        routed = _leaf_routed(run.routed)
        routed_leaves = [routed[k] for k in run.routed_grad_keys]
        routed_grads: list = [None] * len(routed_leaves)
        param_index = {id(p): i for i, p in enumerate(run.param_list)}
        param_grads: list = [None] * len(run.param_list)
        checksums = []

        def grads_of(out, leaf, grad_out, params, layer_routed_grads):
            """Pushes grad_out through a recomputed block: parameter gradients are accumulated,
            routed ones collected for the layer, and the gradient of the block's input returned."""
            if grad_out is None:
                return None
            grads = torch.autograd.grad(out, [leaf, *routed_leaves, *params], grad_out.to(out.dtype), allow_unused=True)
            for i, g in enumerate(grads[1 : 1 + len(routed_leaves)]):
                layer_routed_grads[i] = _add(layer_routed_grads[i], g)
            for p, g in zip(params, grads[1 + len(routed_leaves) :]):
                j = param_index[id(p)]
                param_grads[j] = _add(param_grads[j], g)
            return grads[0]

        def undo_half_step(block, rng, block_input, y, packed, scale, dy, params, layer_routed_grads):
            """For y = scale·x + block(input): recompute the block as in forward, rebuild x, and
            return x, its value, its sum, (∂block/∂input)ᵀ·dy and ∂y/∂x·dy = scale·dy."""
            if rng is not None:
                rng.restore()
            leaf = block_input.detach().requires_grad_()
            # only the recompute runs under the forward's autocast; the gradients are computed
            # outside it, as loss.backward() computes plain autograd's (autocast would also
            # apply to the backward's own kernels and change their rounding)
            with torch.enable_grad(), run.autocast.active():
                out = block(_block_input(leaf, run.compute_dtype), routed)
            if s.exact:
                m = denominator_of(scale)
                x, value, total = _run_kernel(_uncouple, y, out.detach(), packed, m, s.frac_bits, sd)
            else:
                x = value = (y - out.detach().to(sd)) / scale
                total = None
            return x, value, total, grads_of(out, leaf, dy, params, layer_routed_grads), _scaled(dy, scale)

        device_ids = run.records[0].rng_f.device_ids if run.record_rng and run.records else []
        device_type = run.autocast.device_type if run.autocast.device_type != "cpu" else "cuda"
        fork = torch.random.fork_rng(devices=device_ids, enabled=run.record_rng, device_type=device_type)
        with fork:
            for idx in reversed(range(len(run.couplings))):
                c, rec = run.couplings[idx], run.records[idx]
                if s.swap:  # undo the swap that followed this layer
                    y1, w1, dy1, y2, w2, dy2 = y2, w2, dy2, y1, w1, dy1
                params = list(c.params)
                # a routed tensor's gradient is summed within the layer first, then across layers,
                # as plain autograd sums it (through one view of it per layer)
                layer_routed_grads: list = [None] * len(routed_leaves)
                with c.gathered():
                    # y2 = β·x2 + G(y1): rebuild x2, then dy1 += (∂G/∂y1)ᵀ·dy2
                    x2, v2, sum2, dy1_from_g, dx2 = undo_half_step(
                        c.G, rec.rng_g, w1, y2, remainders[2 * idx + 1], s.beta, dy2, params, layer_routed_grads
                    )
                    y2 = w2 = None  # rebuilt into x2: two int64 streams alive at a time, not four
                    dy1 = _add(dy1, dy1_from_g)
                    # y1 = λ·x1 + F(x2): rebuild x1, then dx2 = β·dy2 + (∂F/∂x2)ᵀ·dy1 and dx1 = λ·dy1
                    x1, v1, sum1, dx2_from_f, dx1 = undo_half_step(
                        c.F, rec.rng_f, v2, y1, remainders[2 * idx], s.lambda_, dy1, params, layer_routed_grads
                    )
                y1 = w1 = dy1 = dy2 = None
                dx2 = _add(dx2, dx2_from_f)
                routed_grads = [_add(total, g) for total, g in zip(routed_grads, layer_routed_grads)]
                if run.trace is not None:
                    run.trace.append(("backward", c.name, x1.clone(), x2.clone()))
                if rec.checksum is not None:
                    checksums.append((idx, rec.checksum, torch.stack([sum1, sum2])))
                y1, w1, dy1, y2, w2, dy2 = x1, v1, dx1, x2, v2, dx2
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
        return (None, dy1, dy2, *routed_grads, *param_grads)


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
    return None if d is None else d * scale


def _run_block(block: Block, value: torch.Tensor, routed: dict, run: StackRun) -> torch.Tensor:
    """Runs F or G in forward exactly as backward recomputes it: grad enabled, input a leaf
    that requires grad. Kernels can pick different paths when inputs require grad (SDPA
    backends do); running both passes the same way rules that out. The graph built here is
    dropped as soon as the output is detached, so it costs one block's activations at most."""
    leaf = value.detach().requires_grad_()
    with torch.enable_grad():
        out = block(_block_input(leaf, run.compute_dtype), routed)
    return out.detach()


# ------------------------------------------------------------ plain-autograd (vanilla) path


class _Quantize(torch.autograd.Function):
    """x → (value of fix(x), fix(x)); gradient is the identity."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, frac_bits: int, flags: list):
        ints, value, _, flag = _quantize(x, frac_bits, x.dtype)
        flags.append(flag)
        ctx.mark_non_differentiable(ints)
        return value, ints

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _gi=None):
        return grad, None, None


class _ExactCouple(torch.autograd.Function):
    """y = floor(x / m) + fix(block_out) on the integers; gradient of the real coupling y = x/m + b."""

    @staticmethod
    def forward(ctx, x_value, block_out, x_int, scale: float, m: int, frac_bits: int, flags: list):
        y, value, _, flag, _ = _run_kernel(_couple, x_int, block_out.detach(), m, frac_bits, x_value.dtype)
        flags.append(flag)
        ctx.scale, ctx.block_dtype = scale, block_out.dtype
        ctx.mark_non_differentiable(y)
        return value, y

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _gi=None):
        return grad * ctx.scale, grad.to(ctx.block_dtype), None, None, None, None, None


def _per_layer_views(routed: dict) -> dict:
    """Routed tensors that need gradients, seen by each layer through its own view: the layer's
    uses are summed first, then layer by layer from the top, the order the reversible
    backward sums them in, so both give the same bits."""
    return {k: (v.view_as(v) if isinstance(v, torch.Tensor) and v.requires_grad else v) for k, v in routed.items()}


def _vanilla_layers(couplings, s: CouplingSettings, routed_for_all, cd, x1v, x2v, x1i=None, x2i=None):
    """The same couplings under ordinary autograd (activations stored). Exact mode computes
    the identical integer forward, so its gradients are the reversible path's oracle."""
    flags: list = []
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
            f = c.F(_block_input(x2v, cd), routed)
            if s.exact:
                y1v, y1i = _ExactCouple.apply(x1v, f, x1i, s.lambda_, s.lambda_m, s.frac_bits, flags)
            else:
                y1v, y1i = x1v * s.lambda_ + f.to(x1v.dtype), None
            g = c.G(_block_input(y1v, cd), routed)
            if s.exact:
                y2v, y2i = _ExactCouple.apply(x2v, g, x2i, s.beta, s.beta_m, s.frac_bits, flags)
            else:
                y2v, y2i = x2v * s.beta + g.to(x2v.dtype), None
        if s.swap:
            x1v, x2v, x1i, x2i = y2v, y1v, y2i, y1i
        else:
            x1v, x2v, x1i, x2i = y1v, y2v, y1i, y2i
    if s.exact:
        _raise_if_out_of_range(flags, _block_names(couplings), s.frac_bits, couplings)
    return x1v, x2v, x1i, x2i


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

    Returns the final streams (x1, x2) in the stream dtype (float32 for 16-bit models).
    """
    cd = x.dtype
    h = x.to(stream_dtype_for(cd))
    if mode == "float":
        float_settings = CouplingSettings(settings.lambda_, settings.beta, settings.swap, exact=False)
        return _vanilla_layers(couplings, float_settings, routed, cd, h, h)[:2]
    if mode not in ("reversible", "vanilla"):
        raise ValueError(f"unknown mode {mode!r}")
    if not h.requires_grad:
        # F and G always see inputs that require grad, as in the reversible recompute, so
        # both paths run the same kernels even when the embeddings are frozen
        h = h.detach().requires_grad_()
    n_rev = 0 if mode == "vanilla" else (len(couplings) if reversible_layers is None else reversible_layers)
    lower, upper = couplings[:n_rev], couplings[n_rev:]
    x1i = x2i = None
    if lower:
        run = StackRun(lower, settings, routed, cd, record_rng=record_rng, trace=trace)
        x1v, x2v, x1i, x2i = _ReversibleStack.apply(run, h, h, *run.grad_inputs())
    elif settings.exact:
        flags: list = []
        (x1v, x1i), (x2v, x2i) = _Quantize.apply(h, settings.frac_bits, flags), _Quantize.apply(h, settings.frac_bits, flags)
        _raise_if_out_of_range(flags, ["the stack input"] * 2, settings.frac_bits)
    else:
        x1v, x2v = h, h
    if upper:
        x1v, x2v, _, _ = _vanilla_layers(upper, settings, routed, cd, x1v, x2v, x1i, x2i)
    return x1v, x2v
