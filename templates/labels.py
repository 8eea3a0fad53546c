"""Named ranges in torch.profiler's trace: what each part of a reversible step costs.

The engine marks its parts (a block's work, its gradients, the coupling and its inverse, the
remainders' copies, the checksums, the RNG records) with `labelled`; a profiled step can then sum
the kernel and host time under each name (benchmarks/step_budget.py, through memory_speed.py's
--profile and --profile-seqs). When no profiler runs, a label costs one flag test.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, TypeVar

import torch
from torch.autograd import profiler as _profiler

F = TypeVar("F", bound=Callable)

# the parts a step's time is split into, innermost label first; `forward` and `backward` enclose them
PARTS = ("adapter", "block", "gradients", "couple", "uncouple", "remainders", "checksums", "rng")
PHASES = ("forward", "backward")
PREFIX = "meft:"


def _checked(name: str) -> str:
    if name not in PARTS + PHASES:
        raise ValueError(f"unknown part {name!r}")
    return PREFIX + name


def _recording() -> bool:
    return getattr(_profiler, "_is_profiler_enabled", True)


def part(name: str) -> contextlib.AbstractContextManager:
    """The profiler range `meft:<name>` around a with-block while a profiler records."""
    label = _checked(name)
    return torch.profiler.record_function(label) if _recording() else contextlib.nullcontext()


def labelled(name: str) -> Callable[[F], F]:
    """The same around every call of the function it decorates."""
    label = _checked(name)

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            if not _recording():  # the common case, kept short
                return fn(*args, **kwargs)
            with torch.profiler.record_function(label):
                return fn(*args, **kwargs)

        return inner  # type: ignore[return-value]

    return wrap
