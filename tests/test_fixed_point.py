"""The fixed-point format on its own: remainder packing, scales, the fused kernels and the compile decision."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from meft_convert.templates import arithmetic as A
from meft_convert.templates import fixed_point as FP
from meft_convert.templates import meft_table as T
from meft_convert.templates import reversible as R
from tests.test_reversible import D, ToyBlock, couplings


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("m", [1, 2, 3, 10, 255, 256, 1024, 4096, 65536, 1000003])
def test_remainders_pack_into_about_log2_m_bits(m, dtype):
    r = torch.randint(0, m, (3, 37), generator=torch.Generator().manual_seed(m), dtype=dtype)
    r[0, :2] = torch.tensor([0, m - 1])  # both ends of the range
    packed = FP.pack_remainders(r, m)
    assert all(p.dtype == torch.uint8 for p in packed)
    assert sum(p.numel() for p in packed) == T.packed_remainder_bytes(m, r.numel())
    k, bits = T.remainder_layout(m)
    if m > 1:
        unpacked = FP.unpack_remainders(packed, m, r)
        assert unpacked.dtype == dtype and torch.equal(unpacked, r)
        assert math.log2(m) <= bits / k <= math.ceil(math.log2(m))  # never more than one at a time
    else:
        assert packed == ()


def test_whole_bytes_of_a_remainder_are_planes_of_their_own():
    # 8-bit remainders (MEFT1's default scale on 16-bit models, 1/256) are one byte each, in order
    r = torch.tensor([0, 1, 200, 255, 7])
    [plane] = FP.pack_remainders(r, 256)
    assert torch.equal(plane, r.to(torch.uint8))
    # 12 bits: the low byte of every value, then the high 4 bits of eight values in a 32-bit number, its bytes
    # four planes (here five values, padded with zeros)
    r = torch.tensor([0x0AB, 0xF12, 0x800, 0x001, 0x3CD])
    low, *high = FP.pack_remainders(r, 4096)
    assert low.tolist() == [0xAB, 0x12, 0x00, 0x01, 0xCD]
    assert [p.tolist() for p in high] == [[0xF0], [0x08], [0x03], [0x00]]  # 0x0003_08F0: nibbles 0, F, 8, 0, 3


def test_remainder_layout_packs_groups():
    assert T.remainder_layout(10) == (3, 10)  # 10^3 = 1000 < 2^10: 3.33 bits per remainder
    assert T.remainder_layout(3) == (5, 8)  # 3^5 = 243 < 2^8: 1.6 bits
    assert T.remainder_layout(1024) == (1, 10) and T.remainder_layout(2) == (1, 1) and T.remainder_layout(1) == (1, 0)
    # extremes of each digit survive the round trip
    r = torch.tensor([[9, 0, 9, 9, 9, 0, 0, 9]])
    assert torch.equal(FP.unpack_remainders(FP.pack_remainders(r, 10), 10, r), r)


def test_scales_must_be_reciprocals_of_integers():
    assert T.denominator_of(0.1) == 10 and T.denominator_of(1.0) == 1 and T.denominator_of(2.0**-10) == 1024
    for bad in (0.3, 2.0, 0.0, -0.1):
        with pytest.raises(ValueError):
            T.denominator_of(bad)


@pytest.mark.slow
def test_compiled_half_steps_give_the_eager_bits():
    """On CUDA the half-steps run through torch.compile; their integers must be the eager ones,
    for remainders in groups (m = 10), in a byte (256), a byte and bit planes (2048) and a byte
    and 4-bit fields (4096)."""
    compiled_couple = torch.compile(FP._couple, dynamic=True)
    compiled_uncouple = torch.compile(FP._uncouple, dynamic=True)
    g = torch.Generator().manual_seed(0)
    x = FP.to_fixed(torch.randn(3, 41, D, generator=g) * 50, 32)
    out = (torch.randn(3, 41, D, generator=g) * 3).to(torch.bfloat16)
    for m in (10, 256, 2048, 4096):
        eager = FP._couple(x, out, m, 32, torch.float32)
        fused = compiled_couple(x, out, m, 32, torch.float32)
        for i in (0, 3, 4):  # integers, flag, sum
            assert torch.equal(eager[i], fused[i]), m
        assert len(eager[2]) == len(fused[2]) and all(map(torch.equal, eager[2], fused[2])), m  # remainders
        back = compiled_uncouple(fused[0], out, fused[2], m, 32, torch.float32)
        assert torch.equal(back[0], x) and torch.equal(back[2], x.sum()), m


def test_compiler_is_decided_once_and_later_errors_propagate(monkeypatch):
    """A compiler that fails on the probe turns compiling off once, with one warning, before
    any value is computed; once compiling is on, an error in a compiled kernel (out of memory
    first) propagates instead of switching to the eager kernels mid-run."""
    monkeypatch.setitem(FP._COMPILE, "enabled", None)

    def broken_compile(*args, **kwargs):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(torch, "compile", broken_compile)
    with pytest.warns(UserWarning, match="does not work here"):
        assert FP._compiler_works(torch.device("cpu")) is False
    assert FP._compiler_works(torch.device("cpu")) is False  # decided: no second probe, no warning

    def out_of_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setitem(FP._COMPILE, "enabled", True)
    monkeypatch.setattr(FP, "_use_compiler", lambda t: True)
    monkeypatch.setitem(FP._COMPILED, FP._couple, out_of_memory)
    monkeypatch.setitem(FP._COMPILED, FP._start, FP._start)
    torch.manual_seed(0)
    blocks = nn.ModuleList([ToyBlock() for _ in range(4)])
    with pytest.raises(torch.OutOfMemoryError):
        R.run_stack(torch.randn(2, 3, D, requires_grad=True), couplings(blocks), A.CouplingSettings(0.1, 0.1, False), {})
    assert FP._COMPILE["enabled"] is True


_COMPILED_ON_CPU = """
import torch
from meft_convert.templates import arithmetic as A, fixed_point as FP, reversible as R
from tests.test_reversible import D, ToyBlock, couplings

assert FP._use_compiler(torch.zeros(1))
torch.manual_seed(0)
blocks = torch.nn.ModuleList([ToyBlock() for _ in range(3)])
settings = A.CouplingSettings(0.1, 0.1, False)
x = torch.randn(2, 5, D)
grads = []
for mode in ("reversible", "vanilla"):
    torch.manual_seed(1)  # the same dropout masks in both
    blocks.zero_grad()
    h = x.clone().requires_grad_()
    y1, y2 = R.run_stack(h, couplings(blocks), settings, {}, mode=mode)
    (y1 * 1.5 + y2).sum().backward()
    grads.append([h.grad] + [p.grad for p in blocks.parameters()])
assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(*grads))
print("compiled", len(FP._COMPILED))
"""


@pytest.mark.slow
def test_meft_compile_all_runs_the_compiled_kernels_on_the_cpu_too():
    """MEFT_COMPILE=all (the host-work benchmark's setting): the stream arithmetic compiled on the
    CPU, the reversible gradients still plain autograd's bit for bit."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    run = subprocess.run([sys.executable, "-c", _COMPILED_ON_CPU], cwd=root, capture_output=True, text=True,
                         env={**os.environ, "MEFT_COMPILE": "all", "PYTHONPATH": str(root)})
    assert run.returncode == 0, run.stderr[-2000:]
    assert int(run.stdout.split()[-1]) >= 2  # the coupling and its inverse, at least
