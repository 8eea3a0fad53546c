"""The exact stream arithmetic of one half-step, timed alone: `_couple` (floor division, fixed
point, remainders packed, checksum) and its inverse `_uncouple`, eager and through torch.compile,
on streams of the given shape, for each scale's denominator m. What a half-step's arithmetic costs
once the blocks are taken away (on an H100 at Llama-3-8B, 16k tokens, the coupling took 2.9 ms of GPU
time a layer and its inverse 2.1: benchmarks/README.md).

    python benchmarks/stream_arithmetic.py --rows 2048 --m 256 2048 4096 --out results/stream-arithmetic-cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from templates import fixed_point as FP  # noqa: E402


def _median_ms(fn, *args, repeats: int) -> float:
    fn(*args)  # warm-up (and, compiled, the compilation)
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available() and args[0].is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn(*args)
        if torch.cuda.is_available() and args[0].is_cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2048, help="tokens of the stream")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--m", type=int, nargs="+", default=[256, 2048, 4096], help="denominators of the scales")
    parser.add_argument("--frac-bits", type=int, default=18)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-2**24, 2**24, (args.rows, args.hidden), generator=g, dtype=torch.int32).to(args.device)
    out = torch.randn(args.rows, args.hidden, generator=g).to(torch.bfloat16).to(args.device)
    rows = []
    for mode in args.modes:
        couple = FP._couple if mode == "eager" else torch.compile(FP._couple, dynamic=True)
        uncouple = FP._uncouple if mode == "eager" else torch.compile(FP._uncouple, dynamic=True)
        for m in args.m:
            y, _, packed, _, _ = couple(x, out, m, args.frac_bits, torch.bfloat16)
            back = uncouple(y, out, packed, m, args.frac_bits, torch.bfloat16)[0]
            assert torch.equal(back, x), f"the inverse did not rebuild the stream (m = {m})"
            row = dict(mode=mode, m=m, couple_ms=_median_ms(couple, x, out, m, args.frac_bits, torch.bfloat16,
                                                              repeats=args.repeats),
                       uncouple_ms=_median_ms(uncouple, y, out, packed, m, args.frac_bits, torch.bfloat16,
                                              repeats=args.repeats))
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = dict(command=" ".join(["python", "benchmarks/stream_arithmetic.py", *(argv or sys.argv[1:])]),
                  torch=torch.__version__, machine=platform.machine(), threads=torch.get_num_threads(),
                  device=args.device, rows=args.rows, hidden=args.hidden, results=rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
