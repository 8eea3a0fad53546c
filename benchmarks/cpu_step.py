"""One training step of memory_speed.py's arms, measured on the CPU: what is alive at its peak (a
census from the profiler's memory events) and the host work it does (Python function calls and
aten operator calls, counts that do not depend on how busy the machine is).

The census needs no GPU and finds the same tensors: at OPT-1.3b 8 x 512 (2 layers), with the
engine one H200 measured, it put offloaded checkpointing at 439 MiB and MEFT1 + offload at 551 MiB
where the H200 had 421 and 541 (24 layers; on the CPU the remainders are not offloaded, 8 MiB a
layer there). It also says where each tensor alive at the peak was allocated. The host
counts are taken at the shape's depth with tiny widths, where a step is all host work: the part
of a GPU step that waits on Python and launches.

    python benchmarks/cpu_step.py --shape opt-1.3b --census-layers 2 --methods lora+offload-gc+chunked-loss \\
        meft1+offload meft1+offload@1024 --out results/cpu-opt-1.3b.json
"""

from __future__ import annotations

import argparse
import cProfile
import json
import platform
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import memory_speed as ms  # noqa: E402

# the host counts' widths: every matrix tiny, so that the step is Python, dispatch and launches
TINY_WIDTHS = {
    "opt-1.3b": dict(hidden_size=64, ffn_dim=256, num_attention_heads=4, word_embed_proj_dim=64, vocab_size=512),
    "llama-3-8b": dict(hidden_size=64, intermediate_size=224, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                       vocab_size=512),
}


class _CountOps(TorchDispatchMode):
    """Counts the aten operators that reach a kernel (views and metadata included: each is a call)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def _arm(shape: dict, method: str, layers: int | None):
    torch.manual_seed(0)
    model = ms.build(shape, method, "cpu", torch.bfloat16, layers=layers)
    arm = ms.Arm(model, shape, method, "cpu", torch.bfloat16)
    batch = arm.batch(shape["seq"])
    arm.step(batch)  # warm-up: the optimizer's states exist afterwards, as in memory_speed
    return arm, batch


# the exact stream arithmetic: fused into one kernel per call by torch.compile on CUDA, eager on
# the CPU, where its temporaries (a stream-sized tensor or more each) are allocations of their own
EAGER_ONLY = ("_start", "_couple", "_uncouple")


def census(step, top: int = 14) -> dict:
    """memory_census's figures on the CPU from one step, with where each tensor alive at the peak
    was allocated (the engine's innermost two frames and the operator), and the same at the peak
    of the moments outside the stream arithmetic (EAGER_ONLY): the one a GPU, where that
    arithmetic is fused, has."""
    memory, events = ms.cpu_memory_trace(step, with_stack=True)
    # the engine's frames, less the profiler labels' wrappers (templates/labels.py), which name no work
    frames = [e for e in events if e.get("ph") == "X" and e.get("cat") == "python_function" and "templates/" in e["name"]
              and "templates/labels.py" not in e["name"]]
    ops = [e for e in events if e.get("ph") == "X" and e.get("cat") == "cpu_op"]
    # one sweep over the timeline: the frames and the operator open at each memory event
    timeline = sorted([(e["ts"], 0, 0, "frame", e) for e in frames] + [(e["ts"], 0, 0, "op", e) for e in ops]
                      + [(e["ts"], 1, i, "memory", i) for i, e in enumerate(memory)], key=lambda t: t[:3])
    open_frames, open_ops, where, eager = [], [], {}, set()
    for ts, _, _, kind, item in timeline:
        open_frames = [f for f in open_frames if f["ts"] + f["dur"] >= ts]
        open_ops = [o for o in open_ops if o["ts"] + o["dur"] >= ts]
        if kind != "memory":
            (open_frames if kind == "frame" else open_ops).append(item)
            continue
        label = " < ".join(reversed([f["name"].split("templates/")[-1] for f in open_frames[-2:]]))
        where[item] = label + (" | " + open_ops[-1]["name"] if open_ops else "")
        if any(f["name"].split(": ")[-1] in EAGER_ONLY for f in open_frames):
            eager.add(item)
    allocations = ms.as_allocations(memory)

    def attributed(peak: int, at: int, alive: list[int]) -> dict:
        labelled = [(allocations[i][2], dict(size=f"{allocations[i][2] / 2**20:.0f} MiB", where=where[i])) for i in alive]
        return dict(peak_gib=peak / 2**30, at=where.get(at), **ms.grouped(labelled, top))

    peak, at, alive = ms.replay_to_peak(allocations)
    by_size = ms.grouped([(allocations[i][2], dict(where=f"tensors of {allocations[i][2] / 2**20:.0f} MiB")) for i in alive], top)
    return dict(peak_gib=peak / 2**30, **by_size, where=attributed(peak, at, alive),
                outside_stream_arithmetic=attributed(*ms.replay_to_peak(allocations, lambda i: i not in eager)))


def _census(shape: dict, method: str, layers: int, top: int = 12) -> dict:
    arm, batch = _arm(shape, method, layers)
    try:
        return dict(layers=layers, **census(lambda: arm.step(batch), top=top))
    finally:
        arm.close()


def host_counts(shape: dict, method: str) -> dict:
    """Python calls and aten calls of one step at the shape's depth and TINY_WIDTHS."""
    tiny = dict(shape, overrides={**shape.get("overrides", {}), **TINY_WIDTHS[shape["config"]]})
    arm, batch = _arm(tiny, method, None)
    try:
        arm.step(batch)
        profiler = cProfile.Profile()
        profiler.enable()
        arm.step(batch)
        profiler.disable()
        python_calls = sum(stat[1] for stat in pstats.Stats(profiler).stats.values())
        with _CountOps() as ops:
            arm.step(batch)
        wall = []
        for _ in range(5):
            start = time.perf_counter()
            arm.step(batch)
            wall.append((time.perf_counter() - start) * 1000)
        layers = arm.model.config.num_hidden_layers
        # where the host time goes, part by part (benchmarks/step_budget.py), per layer
        parts = ms._profile(lambda: arm.step(batch), model=arm.model)["budget"]["parts"]
        return dict(layers=layers, python_calls=python_calls, aten_calls=ops.calls, step_ms=statistics.median(wall),
                    per_layer={k: dict(host_ms=v["host_ms"] / layers, python_ms=v["python_ms"] / layers,
                                       aten_ops=v["aten_ops"] / layers) for k, v in parts.items()})
    finally:
        arm.close()


def host_times(shape: dict, methods: list[str], rounds: int) -> dict:
    """Median step time of each arm at the shape's depth and TINY_WIDTHS, where a step is all host
    work (Python, dispatch, autograd): what a GPU step that waits on the host takes. The arms step
    in turn, round after round, so that a machine's drift reaches every arm alike."""
    tiny = dict(shape, overrides={**shape.get("overrides", {}), **TINY_WIDTHS[shape["config"]]})
    arms = {m: _arm(tiny, m, None) for m in methods}
    times: dict = {m: [] for m in methods}
    try:
        for _ in range(rounds):
            for method, (arm, batch) in arms.items():
                start = time.perf_counter()
                arm.step(batch)
                times[method].append((time.perf_counter() - start) * 1000)
    finally:
        for arm, _ in arms.values():
            arm.close()
    medians = {m: statistics.median(t) for m, t in times.items()}
    first = medians[methods[0]]
    return {m: dict(step_ms=medians[m], vs_first=medians[m] / first, all_ms=times[m]) for m in methods}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="opt-1.3b", choices=sorted(TINY_WIDTHS))
    parser.add_argument("--methods", nargs="+", required=True, choices=ms.METHODS)
    parser.add_argument("--census-layers", type=int, default=2, help="layers of the census's model (0: no census)")
    parser.add_argument("--batch", type=int, default=None, help="rows per step (default: the shape's)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per row (default: the shape's)")
    parser.add_argument("--recompute-chunk-tokens", type=int, default=4096)
    parser.add_argument("--overrides", type=json.loads, default={},
                        help='config values for the census\'s model, as JSON, e.g. a narrower Llama: '
                             '\'{"hidden_size": 1024, "intermediate_size": 3584, "num_attention_heads": 8, "vocab_size": 32000}\'')
    parser.add_argument("--no-host-counts", action="store_true")
    parser.add_argument("--host-rounds", type=int, default=0,
                        help="time every arm's step this many times in turn at tiny widths (all host work); "
                             "the first method is the reference. With MEFT_COMPILE=all the stream arithmetic "
                             "runs compiled, as on a GPU")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    ms.RUN.update(profile="llm", recompute_chunk_tokens=args.recompute_chunk_tokens)
    shape = dict(ms.SHAPES[args.shape])
    shape["overrides"] = {**shape.get("overrides", {}), **args.overrides}
    for key in ("batch", "seq"):
        if getattr(args, key) is not None:
            shape[key] = getattr(args, key)
    results = dict(
        command=" ".join(sys.argv), shape=args.shape, batch=shape["batch"], seq=shape["seq"],
        environment=dict(torch=torch.__version__, python=platform.python_version(), machine=platform.machine()),
        meft=ms.arm_settings(args.methods), arms=[],
    )
    for method in args.methods:
        row = dict(method=method)
        start = time.perf_counter()
        if args.census_layers:
            row["census"] = _census(shape, method, args.census_layers)
            c = row["census"]
            print(f"{method}: peak {c['peak_gib'] * 1024:.1f} MiB at {args.census_layers} layers; outside the stream "
                  f"arithmetic {c['outside_stream_arithmetic']['peak_gib'] * 1024:.1f} MiB, at "
                  f"{c['outside_stream_arithmetic']['at']}", flush=True)
            for group in c["outside_stream_arithmetic"]["groups"]:
                print(f"    {group['gib'] * 1024:8.1f} MiB {group['tensors']:4d} x {group['size']:>7}  {group['where']}", flush=True)
        if not args.no_host_counts:
            row["host"] = host_counts(shape, method)
            h = row["host"]
            print(f"{method}: {h['python_calls']} Python calls, {h['aten_calls']} aten calls per step "
                  f"({h['layers']} layers, tiny widths), {h['step_ms']:.1f} ms", flush=True)
            for part, v in sorted(h["per_layer"].items(), key=lambda kv: -kv[1]["aten_ops"]):
                print(f"    {v['aten_ops']:7.1f} aten ops {v['host_ms']:8.3f} ms, Python {v['python_ms']:6.3f} ms per layer"
                      f"  {part}", flush=True)
        row["wall_s"] = time.perf_counter() - start
        results["arms"].append(row)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
    if args.host_rounds:
        results["host_times"] = host_times(shape, args.methods, args.host_rounds)
        results["compiled_arithmetic"] = ms.fixed_point._COMPILE["everywhere"]
        for method, t in results["host_times"].items():
            print(f"{method}: {t['step_ms']:.1f} ms per step, {t['vs_first']:.3f}x {args.methods[0]} "
                  f"(median of {args.host_rounds}, tiny widths)", flush=True)
        args.out.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
