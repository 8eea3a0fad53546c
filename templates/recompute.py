"""Running a block part in forward exactly as backward recomputes it, and collecting its gradients.

The recompute must see what the forward saw: the same RNG states (recorded before each part, as
torch.utils.checkpoint records them, and replayed without touching the global generator), the
same autocast state, inputs that require grad (kernels can pick other paths otherwise), and the
routed arguments cut from the outer graph. `_Gradients` pushes gradients through a recomputed
part and sums them in the order plain autograd does.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from .labels import labelled


@dataclass
class _RngState:
    """The CPU generator's state and the stack's device's before a block: what
    torch.utils.checkpoint records, read from the device's generator directly (its
    get_device_states walks its arguments twice, about 70 µs a call, several calls a layer)."""

    cpu: torch.Tensor
    device: torch.device | None  # None: a CPU stack, whose one generator is `cpu`
    device_state: torch.Tensor | None

    @classmethod
    @labelled("rng")
    def capture(cls, device: torch.device) -> "_RngState":
        if device.type in ("cpu", "meta"):
            return cls(torch.get_rng_state(), None, None)
        return cls(torch.get_rng_state(), device, getattr(torch, device.type).get_rng_state(device))

    @labelled("rng")
    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.device is not None:
            getattr(torch, self.device.type).set_rng_state(self.device_state, self.device)


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

    def active(self) -> contextlib.AbstractContextManager:
        """The recorded autocast state in effect inside the with-block (nothing to enter when it
        already is, as in a backward called where its forward ran)."""
        if self == _AutocastState.capture(self.device_type):
            return contextlib.nullcontext()
        return self._entered()

    @contextlib.contextmanager
    def _entered(self):
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


@dataclass
class _HalfRecord:
    """RNG states of one half-step: before each chunk of the `before` part, before the mixing
    part (or each chunk of a causal core), and before each chunk of the position-wise part."""

    mixing: _RngState | None = None
    chunks: list = field(default_factory=list)
    before: list = field(default_factory=list)
    cores: list = field(default_factory=list)  # before each chunk of a causal core


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


@labelled("block")
def _detached_output(fn, x, run, *args, reads_stream: bool = True, stream_part=None):
    """Runs a block part in forward exactly as backward recomputes it: grad enabled, inputs
    leaves that require grad. Kernels can pick different paths when inputs require grad (SDPA
    backends do); running both passes the same way rules that out. The graph built here is
    dropped as soon as the output is detached, so it costs one part's activations at most.
    `stream_part` is the block input's chunk a position-wise part after `before` also reads;
    `run` is the stack's run (reversible.StackRun), read for its compute dtype."""
    leaf = _leaves(x)
    with torch.enable_grad():
        inputs = _inputs_of(leaf, reads_stream, run.compute_dtype)
        if stream_part is None:
            out = fn(inputs, *args)
        else:
            out = fn(inputs, _block_input(stream_part.detach().requires_grad_(), run.compute_dtype))
    return tuple(t.detach() for t in out) if isinstance(out, tuple) else out.detach()


class _Gradients:
    """The parameter and routed-tensor gradients a backward pass collects."""

    def __init__(self, run, routed: dict):
        # run: the stack's run (reversible.StackRun): which routed tensors and parameters train
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

    @labelled("gradients")
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
