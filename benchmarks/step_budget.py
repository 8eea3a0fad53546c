"""A training step's time, part by part, from one step under torch.profiler.

The engine labels its parts (templates/labels.py: a block's work, its gradients, the coupling and
its inverse, the remainders' copies, the checksums, the RNG records, the adapters) inside two
phases, its forward and its backward. The benchmark labels the step around them (`step_part`:
the model's forward with its loss, the backward, the optimizer) and, for arms without the engine, the
decoder layers' parts (`layer`), which a checkpointed backward runs again as its recompute.

`part_budget` gives, for each (phase, part), the GPU kernel time its operators launched and the
host time spent in it (Python and operators alike, each event's own time; `python_ms`: the labels'
own time, the Python run between operators), plus how busy the GPU was over the step. An event belongs to its innermost label; a phase is the innermost phase label
around it, or, for the autograd engine's own thread (which runs backward outside the labels of
the thread that called it), the step label whose time span holds it.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from templates.labels import PARTS, PHASES, PREFIX  # noqa: E402

STEP_PREFIX = "step:"
STEP_PHASES = ("model", "backward", "optimizer")
STEP_PARTS = ("layer",)
SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
# the MEFT parts that a checkpointed step has no counterpart of
OVERHEAD_PARTS = tuple(p for p in PARTS if p not in ("block", "gradients"))


def step_part(name: str) -> contextlib.AbstractContextManager:
    """The benchmark's own labels, only while a profiler records."""
    if name not in STEP_PHASES + STEP_PARTS:
        raise ValueError(f"unknown step part {name!r}")
    if not getattr(torch.autograd.profiler, "_is_profiler_enabled", True):
        return contextlib.nullcontext()
    return torch.profiler.record_function(STEP_PREFIX + name)


@contextlib.contextmanager
def labelled_layers(layers):
    """Each decoder layer's parts (its direct submodules: norms, attention, MLP) inside the `layer`
    label for the duration of the with-block, arms without the engine. The parts, not the layer:
    a checkpointed layer's recompute calls the layer's own forward function, not its module, but
    its submodules through their modules."""
    modules = [child for layer in layers for child in layer.children()]
    own = [m.__dict__.get("forward") for m in modules]  # a forward set on the instance (hooks)
    for module in modules:
        forward = module.forward

        def labelled_forward(*args, _forward=forward, **kwargs):
            with step_part("layer"):
                return _forward(*args, **kwargs)

        module.forward = labelled_forward
    try:
        yield
    finally:
        for module, forward in zip(modules, own):
            if forward is None:
                del module.forward  # the class's forward again
            else:
                module.forward = forward


def _label_of(event) -> tuple[str | None, str | None]:
    """(phase, part) named by an event, if it is one of the labels."""
    name = event.name
    if name.startswith(PREFIX):
        tail = name[len(PREFIX):]
        return (tail, None) if tail in PHASES else (None, tail)
    if name.startswith(STEP_PREFIX):
        tail = name[len(STEP_PREFIX):]
        return (tail, None) if tail in STEP_PHASES else (None, tail)
    return None, None


def is_device_work(event) -> bool:
    """A kernel, copy or memset on the device; not the device-side span the profiler draws for a
    label (a user annotation), which covers the kernels under it and the gaps between them."""
    return (event.device_type != torch.autograd.DeviceType.CPU and not getattr(event, "is_user_annotation", False)
            and not event.name.startswith((PREFIX, STEP_PREFIX)))


def _is_host(event) -> bool:
    return event.device_type == torch.autograd.DeviceType.CPU and not getattr(event, "is_async", False)


def _union_ms(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total / 1000


def phase_at(spans: list[tuple[float, float, str]], t: float) -> str:
    """The phase of the innermost (start, end, phase) span that holds time t ("outside" if none)."""
    inside = [(end - start, phase) for start, end, phase in spans if start <= t <= end]
    return min(inside)[1] if inside else "outside"


def part_budget(events, wall_ms: float, layers: int) -> dict:
    """{"parts": {"phase/part": {device_ms, host_ms, python_ms, kernels, aten_ops}}, "gpu_busy_ms", "gpu_busy_share",
    "sync_ms", "wall_ms", "layers"} of one profiled step's events (torch.profiler's `events()`).
    Phases: model, backward, optimizer (the step's), forward and backward (the engine's, which
    replace model and backward where the engine runs); parts: the engine's and `layer`, else other."""
    host = [e for e in events if _is_host(e)]
    spans = [(e.time_range.start, e.time_range.end, _label_of(e)[0]) for e in host
             if e.name.startswith(STEP_PREFIX) and _label_of(e)[0] is not None]

    parts: dict[str, dict] = {}
    sync_ms = 0.0
    for e in host:
        phase = part = None
        node = e
        while node is not None and phase is None:
            p, q = _label_of(node)
            if part is None and q is not None:
                part = q
            phase = p
            node = node.cpu_parent
        if phase is None:
            phase = phase_at(spans, e.time_range.start)
        if phase == "backward" and e.name == STEP_PREFIX + "backward":
            continue  # the calling thread waits here while the autograd engine's thread works
        key = f"{phase}/{part or 'other'}"
        row = parts.setdefault(key, dict(device_ms=0.0, host_ms=0.0, python_ms=0.0, kernels=0, aten_ops=0))
        row["host_ms"] += e.self_cpu_time_total / 1000
        row["aten_ops"] += e.name.startswith("aten::")
        if any(_label_of(e)):  # a label's own time: the Python it ran between operators
            row["python_ms"] += e.self_cpu_time_total / 1000
        for k in e.kernels:
            if k.name.startswith((PREFIX, STEP_PREFIX)):
                continue  # a label's device-side span, not work
            row["device_ms"] += k.duration / 1000
            row["kernels"] += 1
        if e.name in SYNCS:
            sync_ms += (e.time_range.end - e.time_range.start) / 1000
    device = [e for e in events if is_device_work(e)]
    busy = _union_ms([(e.time_range.start, e.time_range.end) for e in device])
    return dict(
        parts=dict(sorted(parts.items(), key=lambda kv: -kv[1]["device_ms"] - kv[1]["host_ms"])),
        wall_ms=wall_ms, layers=layers, gpu_busy_ms=busy, gpu_busy_share=busy / wall_ms if wall_ms else None,
        sync_ms=sync_ms,
    )


def overhead(meft: dict, base: dict, meft_step_ms: float, base_step_ms: float) -> dict:
    """What the engine's own parts cost beyond a checkpointed step: each MEFT-only part's GPU and
    host time, and each as a share of the step-time gap (a step waits on the GPU or on the host:
    which share explains the gap says which). Both budgets from part_budget."""
    gap = meft_step_ms - base_step_ms
    rows = {}
    for part in (*OVERHEAD_PARTS, "other"):
        device = sum(v["device_ms"] for k, v in meft["parts"].items() if k.split("/")[1] == part
                     and k.split("/")[0] in PHASES)
        host_ms = sum(v["host_ms"] for k, v in meft["parts"].items() if k.split("/")[1] == part
                      and k.split("/")[0] in PHASES)
        rows[part] = dict(device_ms=device, host_ms=host_ms, device_share_of_gap=device / gap if gap > 0 else None,
                          host_share_of_gap=host_ms / gap if gap > 0 else None)
    return dict(gap_ms=gap, ratio=meft_step_ms / base_step_ms if base_step_ms else None, parts=rows,
                gpu_busy_share=meft.get("gpu_busy_share"), base_gpu_busy_share=base.get("gpu_busy_share"))
