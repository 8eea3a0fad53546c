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
state: a few remainders share one number below m^k, packed into byte planes, so each takes
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

The engine knows nothing about transformers: it sees F, G, λ, β and tensors. Its files, each
importing only those before it: labels.py (the parts' names in a profiler's trace),
fixed_point.py (the integer format, remainder packing, the fused kernels), blocks.py (what F and
G are, rows and chunks), arithmetic.py (exact and float coupling), recompute.py (a part run in
forward as backward recomputes it, RNG and autocast replay, gradients), plans.py (how a block
runs: one graph, part by part, causal query chunks), and this file: the half-steps, which own
their inverse, and three short loops over them (the autograd Function's forward and backward,
and the vanilla path).
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from .arithmetic import CouplingSettings, Stream, arithmetic_for
from .blocks import Block, Mixing, as_block
from .fixed_point import RemainderStore
from .labels import labelled
from .plans import plan_for, run_block
from .recompute import (
    _at,
    _AutocastState,
    _block_input,
    _Gradients,
    _grad_paths,
    _HalfRecord,
    _leaf_routed,
    _per_layer_views,
    _RngState,
)


class ReconstructionError(RuntimeError):
    """A layer's input, recomputed in backward, differs from the one seen in forward."""


@dataclass
class Coupling:
    """One reversible layer as the model describes it: its two blocks and the trainable tensors
    they read. Built once per model; each run of the stack makes its own ReversibleLayer of it."""

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


# ------------------------------------------------------------------------------ half-steps


class HalfStep:
    """One half of a reversible layer: the stream it updates becomes scale·itself plus its block
    of the other stream.

        F half:  y1 = λ·x1 + F(x2)        inverse:  x1 = (y1 − F(x2)) / λ
        G half:  y2 = β·x2 + G(y1)        inverse:  x2 = (y2 − G(y1)) / β

    Gradients follow the real-valued coupling (fix and the integer division count as identity):
    for the F half dx1 = λ·dy1 and dx2 = dy2 + (∂F/∂x2)ᵀ·dy1; for the G half dx2 = β·dy2 and
    dx1 = dy1 + (∂G/∂y1)ᵀ·dy2. A half-step holds its block, its scale, the RNG states its forward
    recorded and the slot of its remainders; its plan (plans.py) does the work.
    """

    def __init__(self, run: StackRun, block: Block, scale: float, *, updates: int, slot: int, name: str, params: list,
                 keeps_rebuilt_value: bool, input_read_below: bool):
        # weakly: the run owns its half-steps, and a reference back would make a cycle that keeps
        # every finished run (and its routed tensors: a mask, rotary tables) alive until the
        # garbage collector next runs, in the middle of a later step
        self.run = weakref.proxy(run)
        self.block, self.scale = block, scale
        self.factor = run.arithmetic.factor(scale)  # m of scale = 1/m in exact mode, the scale itself in float mode
        self.updates = updates  # 0: x1 (the F half), 1: x2 (the G half)
        self.slot, self.name, self.params = slot, name, params
        # in backward, in exact mode: whether the stream this half rebuilds, and the one it reads,
        # are read again by a block of the layer below (their values are dropped otherwise)
        self.keeps_rebuilt_value, self.input_read_below = keeps_rebuilt_value, input_read_below
        self.record = _HalfRecord()

    def _split(self, a1, a2) -> tuple:
        """(the updated stream's, the other's) of a pair."""
        return (a1, a2) if self.updates == 0 else (a2, a1)

    def _join(self, updated, other) -> tuple:
        return (updated, other) if self.updates == 0 else (other, updated)

    def forward(self, x1: Stream, x2: Stream) -> tuple[Stream, Stream]:
        run = self.run
        x, other = self._split(x1, x2)
        flags = len(run.flags)
        y = plan_for(self.block, other.value, run.settings.chunk_tokens).forward(self, other.value, x)
        run.flag_names += [self.name] * (len(run.flags) - flags)
        return self._join(y, other)

    def backward_pass(self, y1: Stream, y2: Stream, dy1: torch.Tensor | None, dy2: torch.Tensor | None):
        """-> (x1, x2, dx1, dx2): the half's input rebuilt (in place of y's integers) and its gradients."""
        run = self.run
        y, other = self._split(y1, y2)
        dy, d_other = self._split(dy1, dy2)
        # offloaded remainders travel back one half-step ahead, while the one before computes
        packed = run.remainders.take(self.slot)
        run.remainders.prefetch(self.slot - 1)
        inp = other.value
        x, d_other, dx = plan_for(self.block, inp, run.settings.chunk_tokens).backward(
            self, inp, y, packed, dy, d_other, writable=_writable(d_other, dy, run.upstream),
            keep_value=self.keeps_rebuilt_value,
        )
        if not self.input_read_below:
            run.arithmetic.drop_value(other)
        return (*self._join(x, other), *self._join(dx, d_other))

    def vanilla(self, x1: Stream, x2: Stream, routed: dict) -> tuple[Stream, Stream]:
        """The same half-step under ordinary autograd (activations stored)."""
        run = self.run
        x, other = self._split(x1, x2)
        out = run_block(self.block, _block_input(other.value, run.compute_dtype), routed, run.settings.chunk_tokens)
        flags = len(run.flags)
        y = run.arithmetic.vanilla_couple(x, out, self.scale, run.flags)
        run.flag_names += [self.name] * (len(run.flags) - flags)
        return self._join(y, other)


def _writable(d: torch.Tensor | None, other: torch.Tensor | None, upstream: list) -> bool:
    """Whether a stream gradient is the engine's own, so that a half-step may sum into it in
    place: not a tensor autograd handed in, nor the same tensor as the other stream's."""
    return d is not None and d is not other and all(d is not t for t in upstream)


class ReversibleLayer:
    """One coupling in a run: its half-steps F then G, and the swap after them."""

    def __init__(self, coupling: Coupling, run: StackRun, index: int):
        self.coupling, self.name, self.swaps = coupling, coupling.name, run.settings.swap
        s, params = run.settings, list(coupling.params)
        # in backward the layer below reads, as its G's input, the stream of this layer's rebuilt
        # input that becomes its y1: x1 without the swap, x2 with it. F's input x2 is G's output;
        # G's input y1 is read by no block once G is rebuilt
        below = 1 if self.swaps else 0
        self.F = HalfStep(run, coupling.F, s.lambda_, updates=0, slot=2 * index, name=f"{coupling.name} (F)",
                          params=params, keeps_rebuilt_value=below == 0, input_read_below=below == 1)
        self.G = HalfStep(run, coupling.G, s.beta, updates=1, slot=2 * index + 1, name=f"{coupling.name} (G)",
                          params=params, keeps_rebuilt_value=True, input_read_below=False)
        self.halves = (self.F, self.G)
        self.checksum: torch.Tensor | None = None  # the audit's sums of the layer's two input streams

    def swap(self, a1, a2, *grads) -> tuple:
        """The streams (and their gradients) as the next layer sees them. MEFT1 and MEFT2 swap
        them after every layer, so that the PLM path alternates between them; the swap is its
        own inverse, so backward undoes it with the same call."""
        if not self.swaps:
            return (a1, a2, *grads)
        return (a2, a1, *grads[::-1])


# --------------------------------------------------------------------------------- the run


@dataclass
class StackRun:
    """Everything one call of the stack needs; lives on the autograd context until backward."""

    couplings: Sequence[Coupling]
    settings: CouplingSettings
    routed: dict
    compute_dtype: torch.dtype
    record_rng: bool = True
    trace: list | None = None  # when a list, inputs seen in forward and rebuilt in backward go here
    autocast: _AutocastState | None = None
    routed_grad_paths: list = field(default_factory=list)
    param_list: list = field(default_factory=list)
    final_streams: list | None = None  # the top layer's output streams, until backward consumes them
    remainders: RemainderStore | None = None
    flags: list = field(default_factory=list)  # out-of-range flags, checked once per forward
    flag_names: list = field(default_factory=list)
    rng_device: torch.device | None = None  # where RNG states are recorded
    routed_leaves: dict | None = None  # the routed arguments as the blocks see them, in forward or backward
    grads: _Gradients | None = None  # what a backward collects
    upstream: list = field(default_factory=list)  # the stream gradients autograd handed to backward

    def __post_init__(self):
        self.arithmetic = arithmetic_for(self.settings, self.compute_dtype)
        self.layers = [ReversibleLayer(c, self, i) for i, c in enumerate(self.couplings)]

    def grad_inputs(self) -> list[torch.Tensor]:
        """Tensors the stack differentiates with respect to, besides the two streams."""
        self.routed_grad_paths = _grad_paths(self.routed)
        self.param_list = list({id(p): p for c in self.couplings for p in c.params}.values())
        return [_at(self.routed, p) for p in self.routed_grad_paths] + self.param_list

    def capture_rng(self) -> _RngState | None:
        return _RngState.capture(self.rng_device) if self.record_rng else None

    def record_input(self, layer: ReversibleLayer, x1: Stream, x2: Stream) -> None:
        """What forward keeps of a layer's input: the audit's checksums, and the trace's copy."""
        layer.checksum = self.arithmetic.checksums(x1, x2)
        self._trace("forward", layer, x1, x2)

    def check_rebuilt_input(self, layer: ReversibleLayer, x1: Stream, x2: Stream, audits: list) -> None:
        """The rebuilt input's checksums, compared with forward's once the backward is done."""
        self._trace("backward", layer, x1, x2)
        if layer.checksum is not None:
            audits.append((layer, layer.checksum, self.arithmetic.checksums(x1, x2)))

    def _trace(self, phase: str, layer: ReversibleLayer, x1: Stream, x2: Stream) -> None:
        if self.trace is not None:
            self.trace.append((phase, layer.name, *(t.clone() for t in self.arithmetic.trace_state(x1, x2))))


def _raise_if_rebuilt_inputs_differ(audits: list) -> None:
    if not audits:
        return
    saved = torch.stack([a[1] for a in audits])
    rebuilt = torch.stack([a[2] for a in audits])
    if not torch.equal(saved, rebuilt):
        # errors propagate downwards: the highest mismatching layer is where it started
        bad = next(layer for layer, a, b in audits if not torch.equal(a, b))
        raise ReconstructionError(
            f"MEFT audit: the input of {bad.name}, rebuilt in backward, differs from the "
            "forward pass, so its gradients would be wrong. A kernel in this layer is not deterministic "
            "(try torch.use_deterministic_algorithms(True) and CUBLAS_WORKSPACE_CONFIG=:4096:8), or the "
            "model or its inputs were modified between forward and backward."
        )


# ------------------------------------------------------------------- the autograd Function

_top_saved_tensors_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)


def _as_is(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _own_saved_tensors():
    """Saved-tensor hooks the caller installed (TRL's activation offloading, torch's save_on_cpu)
    are for the caller's graph. The graphs the engine builds in forward and drops (blocks run with
    grad on, so that forward and recompute pick the same kernels) and the recompute it
    differentiates at once in backward stay out of them: moving those to the host is copies for
    nothing, and the forward's are never unpacked, so an offloader's record of them would never
    empty. Innermost pass-through hooks keep them as plain autograd does; none are added when the
    caller has none."""
    if _top_saved_tensors_hooks is not None and _top_saved_tensors_hooks(False) is None:
        return contextlib.nullcontext()
    return torch.autograd.graph.saved_tensors_hooks(_as_is, _as_is)



class _ReversibleStack(torch.autograd.Function):
    """Runs the half-steps forward keeping only final streams and remainders; rebuilds in backward."""

    @staticmethod
    @labelled("forward")
    def forward(ctx, run: StackRun, x1v: torch.Tensor, x2v: torch.Tensor, *grad_inputs: torch.Tensor):
        run.autocast = _AutocastState.capture(x1v.device.type)
        run.rng_device = x1v.device
        run.remainders = RemainderStore(run.settings.offload_remainders, x1v.device)
        run.routed_leaves = _leaf_routed(run.routed)
        arith = run.arithmetic
        x1, flag = arith.start(x1v)
        if flag is not None:
            run.flags.append(flag)
            run.flag_names.append("the stack input")
        x2 = arith.twin(x1)  # both streams start at the same point
        with _own_saved_tensors():
            for layer in run.layers:
                run.record_input(layer, x1, x2)
                with layer.coupling.gathered():
                    for half in layer.halves:
                        x1, x2 = half.forward(x1, x2)
                x1, x2 = layer.swap(x1, x2)
        arith.check_range(run.flags, run.flag_names, run.couplings)
        run.flags, run.flag_names, run.routed_leaves = [], [], None
        # the final streams stay outside save_for_backward: backward turns them into the layers'
        # inputs one layer at a time, in place. Of their values only the top G's input (its y1) is
        # needed again, and it is the very tensor returned to the caller
        values = (x1.value, x2.value)
        run.final_streams = arith.for_backward((x1, x2), run.layers[-1].swap(x1, x2)[0].value) if run.layers else [x1, x2]
        ctx.save_for_backward(*run.remainders.device_tensors())
        ctx.run = run
        # an output nobody used gets None, not zeros: its blocks then contribute no gradient,
        # and parameters only it reaches keep grad None, as under plain autograd
        ctx.set_materialize_grads(False)
        ints = (x1.ints, x2.ints)
        ctx.mark_non_differentiable(*(t for t in ints if t is not None))
        return (*values, *ints)

    @staticmethod
    @labelled("backward")
    def backward(ctx, dy1: torch.Tensor | None, dy2: torch.Tensor | None, _di1=None, _di2=None):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "MEFT: the reversible backward cannot be differentiated again (create_graph=True, as gradient "
                "penalties and double backward need). Train such a loss with plain autograd through the same "
                "model: `with model.meft_backward(\"vanilla\"): ...` (activations are stored)."
            )
        run: StackRun = ctx.run
        if run.final_streams is None:
            raise RuntimeError(
                "MEFT: backward through the same reversible forward a second time is not supported; its streams "
                "were consumed by the first backward (retain_graph=True cannot keep them). Run the forward again."
            )
        (y1, y2), run.final_streams = run.final_streams, None
        run.upstream = [t for t in (dy1, dy2) if t is not None]  # autograd's tensors: never written to
        run.remainders.restore(ctx.saved_tensors)
        run.routed_leaves = _leaf_routed(run.routed)
        run.grads = _Gradients(run, run.routed_leaves)
        audits: list = []
        on_cuda = run.rng_device.type == "cuda"
        device_ids = [run.rng_device.index] if run.record_rng and on_cuda else []
        fork = torch.random.fork_rng(devices=device_ids, enabled=run.record_rng, device_type="cuda")
        with fork, _own_saved_tensors():
            for layer in reversed(run.layers):
                y1, y2, dy1, dy2 = layer.swap(y1, y2, dy1, dy2)  # undo the swap that followed this layer
                run.grads.start_layer()
                with layer.coupling.gathered():
                    for half in reversed(layer.halves):  # G, then F
                        y1, y2, dy1, dy2 = half.backward_pass(y1, y2, dy1, dy2)
                run.grads.end_layer()
                run.check_rebuilt_input(layer, y1, y2, audits)
        _raise_if_rebuilt_inputs_differ(audits)
        grads, run.grads, run.upstream, run.routed_leaves = run.grads, None, [], None
        return (None, dy1, dy2, *grads.routed, *grads.params)


# ------------------------------------------------------------ plain-autograd (vanilla) path


def _vanilla_layers(run: StackRun, x1: Stream, x2: Stream) -> tuple[Stream, Stream]:
    """The same half-steps under ordinary autograd (activations stored). Exact mode computes the
    identical integer forward, chunked the same way, so its gradients are the reversible path's
    oracle."""
    for layer in run.layers:
        if not layer.coupling.autograd_ok and torch.is_grad_enabled():
            raise RuntimeError(
                f"MEFT: {layer.name} has its weights only while it runs (a whole layer as an FSDP unit), so plain "
                "autograd cannot train it: its backward would run after the weights are freed. Train it with the "
                "reversible backward over every layer (the default: backward mode \"reversible\", "
                "reversible_layers=None), under torch.no_grad() for evaluation, or shard model.fsdp_units() "
                "instead of whole layers."
            )
        routed = _per_layer_views(run.routed)
        with layer.coupling.gathered():
            for half in layer.halves:
                x1, x2 = half.vanilla(x1, x2, routed)
        x1, x2 = layer.swap(x1, x2)
    run.arithmetic.check_range(run.flags, run.flag_names, run.couplings)
    return x1, x2


def _float_settings(settings: CouplingSettings) -> CouplingSettings:
    """The paper's float coupling with the same scales and swap (evaluation, inference)."""
    return CouplingSettings(settings.lambda_, settings.beta, settings.swap, exact=False)


def run_float_layer(x1: torch.Tensor, x2: torch.Tensor, coupling: Coupling, settings: CouplingSettings, routed: dict,
                    compute_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """One coupling in float arithmetic, from two given streams (evaluation layer by layer)."""
    run = StackRun([coupling], _float_settings(settings), routed, compute_dtype)
    y1, y2 = _vanilla_layers(run, Stream(None, x1), Stream(None, x2))
    return y1.value, y2.value


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
        run = StackRun(couplings, _float_settings(settings), routed, cd)
        h = run.arithmetic.stream_input(x)
        x1, x2 = _vanilla_layers(run, Stream(None, h), Stream(None, h))
        return x1.value, x2.value
    if mode not in ("reversible", "vanilla"):
        raise ValueError(f"unknown mode {mode!r}")
    n_rev = 0 if mode == "vanilla" else (len(couplings) if reversible_layers is None else reversible_layers)
    lower = StackRun(couplings[:n_rev], settings, routed, cd, record_rng=record_rng, trace=trace)
    upper = StackRun(couplings[n_rev:], settings, routed, cd)
    h = lower.arithmetic.stream_input(x)
    if not h.requires_grad and not lower.layers:
        # layers under autograd see inputs that require grad, as the reversible recompute's
        # blocks do, so both paths run the same kernels even when the embeddings are frozen.
        # The reversible stack makes its own leaves in backward: a leaf here would only keep
        # the stack input alive (its AccumulateGrad holds it) for a gradient nobody reads
        h = h.detach().requires_grad_()
    if lower.layers:
        x1v, x2v, x1i, x2i = _ReversibleStack.apply(lower, h, h, *lower.grad_inputs())
        x1, x2 = Stream(x1i, x1v), Stream(x2i, x2v)
    else:
        flags: list = []
        x1, x2 = lower.arithmetic.vanilla_start(h, flags), lower.arithmetic.vanilla_start(h, flags)
        lower.arithmetic.check_range(flags, ["the stack input"] * 2)
    if upper.layers:
        x1, x2 = _vanilla_layers(upper, x1, x2)
    return x1.value, x2.value
