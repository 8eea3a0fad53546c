"""Activation memory and step time of MEFT against the usual ways to fine-tune, on one GPU,
plus the GPU correctness checks (bit-exact reconstruction with CUDA dropout replay, gradients
against plain autograd, determinism).

Run from the repository root on a CUDA machine (models are built from the configs in
tests/data/configs with random weights; the numbers do not depend on the weights):

    python benchmarks/memory_speed.py --out benchmarks/results/h200.json

Memory follows DESIGN §5: static = allocated once the model, the optimizer and one warm-up
step exist (grads set to None); peak = max allocated during one training step (forward,
backward, optimizer step); activation = peak − static. Time is the median of --steps steps,
measured with CUDA events after warm-up.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from templates.configuration_meft import config_class_for  # noqa: E402
from templates.families import family_for  # noqa: E402
from templates.modeling_meft import model_class_for  # noqa: E402
from templates.losses import ChunkedLossMixin  # noqa: E402
from templates import reversible  # noqa: E402

LOSS_CHUNK = 256  # tokens per chunk of the causal-LM loss (the converter's default)

SHAPES = {
    "opt-1.3b": dict(config="opt-1.3b", head="AutoModelForCausalLM", batch=8, seq=512, lora=["q_proj", "v_proj"], task_head=()),
    "opt-1.3b-long": dict(
        config="opt-1.3b", head="AutoModelForCausalLM", batch=4, seq=2048, lora=["q_proj", "v_proj"], task_head=()
    ),
    "bert-base": dict(
        config="bert-base-uncased", head="AutoModelForSequenceClassification", batch=32, seq=512,
        lora=["query", "value"], task_head=("classifier",),
    ),
}
METHODS = [
    "full", "lora", "lora-bf16", "lora+gc", "lora+gc+chunked-loss", "head-only",
    "meft1", "meft2", "meft3", "meft1-compiled", "meft2-compiled", "meft3-compiled",
    "meft1-float", "meft2-float", "meft3-float", "meft3-vanilla",
]
# what the depth and sequence-length sweeps run (OPT-1.3b width)
SWEEP_METHODS = ["lora+gc", "meft1", "meft2", "meft3", "meft3-float"]
DEPTHS = [6, 12, 24, 48]
SEQ_LENGTHS = [256, 512, 1024, 2048]  # OPT's position embeddings end at 2048


def plm_config(shape: dict, **overrides) -> transformers.PretrainedConfig:
    values = json.loads((ROOT / "tests" / "data" / "configs" / f"{shape['config']}.json").read_text())
    values.pop("_name_or_path", None)
    values.update(overrides)
    return transformers.AutoConfig.for_model(values.pop("model_type"), **values)


def _with_chunked_loss(auto, config):
    """The library's causal LM with MEFT's chunked loss and nothing else: LoRA + checkpointing
    with the same loss, so that the comparison is like for like."""
    library_class = auto._model_mapping[type(config)]
    config.loss_chunk_size = LOSS_CHUNK
    return type("Chunked" + library_class.__name__, (ChunkedLossMixin, library_class), {})(config)


def build(shape: dict, method: str, device, dtype, layers: int | None = None, attention: str = "sdpa"):
    overrides = {} if layers is None else {"num_hidden_layers": layers}
    config = plm_config(shape, attn_implementation=attention, **overrides)
    auto = getattr(transformers, shape["head"])
    with torch.device(device):
        if method.startswith("meft"):
            variant = method.split("-")[0]
            values = config.to_dict()
            for key in ("model_type", "transformers_version", "architectures"):
                values.pop(key, None)
            meft_config = config_class_for(family_for(config.model_type))(
                **values, variant=variant, exact=not method.endswith("float"), loss_chunk_size=LOSS_CHUNK,
                compile_blocks=method.endswith("compiled"),
            )
            meft_config._attn_implementation = attention
            model = model_class_for(family_for(config.model_type), shape["head"])(meft_config)
        elif method.endswith("chunked-loss"):
            model = _with_chunked_loss(auto, config)
        else:
            model = auto.from_config(config)
    model.to(dtype)
    if method.startswith("meft"):
        pass  # MEFT freezes the PLM itself
    elif method == "full":
        model.requires_grad_(True)
    elif method == "head-only":
        model.requires_grad_(False)
        if not shape["task_head"]:
            # an LM head tied to the input embeddings would send gradients through the whole
            # backbone: train an untied copy, the input embeddings stay frozen
            head = model.get_output_embeddings()
            head.weight = torch.nn.Parameter(head.weight.detach().clone())
        for name in shape["task_head"] or ("lm_head",):
            model.get_submodule(name).requires_grad_(True)
    elif method.startswith("lora"):
        import peft

        lora = peft.LoraConfig(r=8, lora_alpha=16, target_modules=shape["lora"], modules_to_save=list(shape["task_head"]) or None)
        # peft keeps adapters in float32 by default; lora-bf16 keeps them in the model's dtype
        model = peft.get_peft_model(model, lora, autocast_adapter_dtype=method != "lora-bf16")
        if "+gc" in method:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def make_batch(shape: dict, config, device, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, config.vocab_size, (shape["batch"], shape["seq"]), generator=g)
    mask = torch.ones_like(ids)
    mask[1::2, shape["seq"] * 3 // 4 :] = 0  # padding in every other row
    batch = {"input_ids": ids, "attention_mask": mask}
    if shape["head"] == "AutoModelForCausalLM":
        batch["labels"] = ids.masked_fill(mask == 0, -100)
    else:
        batch["labels"] = torch.randint(0, 2, (shape["batch"],), generator=g)
    return {k: v.to(device) for k, v in batch.items()}


def train_step(model, batch, optimizer, mode: str = "reversible"):
    context = model.meft_backward(mode) if hasattr(model, "meft_backward") else contextlib.nullcontext()
    with context:
        loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def measure(shape_name: str, method: str, steps: int, device, layers: int | None = None, seq: int | None = None,
            batch_size: int | None = None, profile: bool = False, sweep_name: str | None = None) -> dict:
    shape = dict(SHAPES[shape_name])
    if seq is not None:
        shape["seq"] = seq
    if batch_size is not None:
        shape["batch"] = batch_size
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = build(shape, method, device, torch.bfloat16, layers=layers)
    mode = "vanilla" if method.endswith("vanilla") else "reversible"
    batch = make_batch(shape, model.config, device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    loss = train_step(model, batch, optimizer, mode)  # warm-up: optimizer states exist afterwards
    torch.cuda.synchronize()
    static = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    train_step(model, batch, optimizer, mode)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        train_step(model, batch, optimizer, mode)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    step_ms = statistics.median(times)
    tokens = shape["batch"] * shape["seq"]
    result = dict(
        shape=shape_name, method=method, batch=shape["batch"], seq=shape["seq"],
        layers=model.config.num_hidden_layers, trainable=sum(p.numel() for p in params),
        static_gib=static / 2**30, peak_gib=peak / 2**30, activation_gib=(peak - static) / 2**30,
        step_ms=step_ms, tokens_per_s=tokens / step_ms * 1000, step_ms_all=times, loss=float(loss),
    )
    if profile:
        result["profile"] = _profile(model, batch, optimizer, mode)
    del model, optimizer, batch, params
    return result


def _profile(model, batch, optimizer, mode: str) -> dict:
    """One step under torch.profiler: GPU kernel time against wall time says whether the step
    waits on the GPU or on the host (Python, launches, syncs)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        train_step(model, batch, optimizer, mode)
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - start) * 1000
    # kernels only (device-side events); operator rows would count the same time again
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by_name: dict = {}
    for e in kernels:
        ms, calls = by_name.get(e.name, (0.0, 0))
        by_name[e.name] = (ms + e.device_time / 1000, calls + 1)
    top = sorted(by_name.items(), key=lambda item: -item[1][0])[:12]
    return dict(
        wall_ms=wall_ms, gpu_kernel_ms=sum(e.device_time for e in kernels) / 1000, kernel_launches=len(kernels),
        top_kernels=[dict(name=name[:90], ms=ms, calls=calls) for name, (ms, calls) in top],
    )


def _grads(model, batch, mode: str, seed: int) -> dict:
    model.zero_grad(set_to_none=True)
    with torch.random.fork_rng(devices=[torch.cuda.current_device()]):
        torch.manual_seed(seed)
        with model.meft_backward(mode):
            loss = model(**batch).loss
        loss.backward()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def _compare(a: dict, b: dict) -> dict:
    equal = sum(int(torch.equal(a[n], b[n])) for n in a)
    worst = max(((a[n] - b[n]).norm() / a[n].norm().clamp_min(1e-30)).item() for n in a)
    return {"tensors": len(a), "bitwise_equal": equal, "max_relative_difference": worst}


def check(shape_name: str, device, dtype, autocast: bool = False, layers: int | None = None, attention: str = "sdpa") -> list[dict]:
    """Reconstruction, gradients and determinism for each variant at the full shape."""
    shape = SHAPES[shape_name]
    rows = []
    for variant in ("meft1", "meft2", "meft3"):
        torch.cuda.empty_cache()
        model = build(shape, variant, device, dtype, layers=layers, attention=attention)
        batch = make_batch(shape, model.config, device, seed=1)
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        meft_layers = model.meft_layers
        with amp:
            meft_layers.trace = []
            reversible = _grads(model, batch, "reversible", seed=3)
            trace, meft_layers.trace = meft_layers.trace, None
            forward = {name: (a, b) for kind, name, a, b in trace if kind == "forward"}
            differing = sum(
                int((forward[name][0] != a).sum() + (forward[name][1] != b).sum()) for kind, name, a, b in trace if kind == "backward"
            )
            max_stream = max(max(a.abs().max().item(), b.abs().max().item()) for a, b in forward.values()) / 2.0**32
            del trace, forward
            again = _grads(model, batch, "reversible", seed=3)
            vanilla = _grads(model, batch, "vanilla", seed=3)
            vanilla_again = _grads(model, batch, "vanilla", seed=3)
        rows.append(dict(
            shape=shape_name, variant=variant, dtype=str(dtype), autocast=autocast, layers=len(meft_layers),
            attention=attention,
            reconstruction_differing_elements=differing, largest_stream_value=max_stream,
            reversible_vs_vanilla=_compare(vanilla, reversible),
            reversible_vs_reversible=_compare(reversible, again),
            vanilla_vs_vanilla=_compare(vanilla, vanilla_again),
        ))
        print(json.dumps(rows[-1]), flush=True)
        del model, batch, reversible, again, vanilla, vanilla_again
    return rows


def kernel_check(device) -> list[dict]:
    """The compiled half-step functions against eager, and their speed. Integers (streams,
    packed remainders, sums) must agree bit for bit; values may break rounding ties
    differently, which is why one run never mixes the two."""
    rows = []
    g = torch.Generator(device=device).manual_seed(0)
    shape = (8, 512, 2048)
    compiled_couple = torch.compile(reversible._couple, dynamic=True)
    compiled_uncouple = torch.compile(reversible._uncouple, dynamic=True)
    for m in (1, 10, 1024):
        for dtype in (torch.bfloat16, torch.float32):
            x = reversible.to_fixed(torch.randn(shape, device=device, generator=g) * 50, 32)
            out = (torch.randn(shape, device=device, generator=g) * 3).to(dtype)

            def eager(x, out):
                return reversible._couple(x, out, m, 32, torch.float32)

            def fused(x, out):
                return compiled_couple(x, out, m, 32, torch.float32)

            a, b = eager(x, out), fused(x, out)
            same = all((a[i] is None and b[i] is None) or torch.equal(a[i], b[i]) for i in (0, 2, 3, 4))
            back = compiled_uncouple(b[0], out, b[2], m, 32, torch.float32)
            exact = torch.equal(back[0], x) and torch.equal(back[1], reversible.from_fixed(x, 32, torch.float32)) is not None
            times = {}
            for name, fn in (("eager", eager), ("fused", fused)):
                for _ in range(3):
                    fn(x, out)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(20):
                    fn(x, out)
                end.record()
                torch.cuda.synchronize()
                times[name] = start.elapsed_time(end) / 20
            rows.append(dict(m=m, dtype=str(dtype), elements=x.numel(), integers_bitwise_equal=same,
                             values_differing_in_rounding_ties=int((a[1] != b[1]).sum()), inverse_exact=exact,
                             eager_ms=times["eager"], fused_ms=times["fused"]))
            print(json.dumps(rows[-1]), flush=True)
    return rows


def _run(results: dict, out: Path, **kw) -> None:
    try:
        row = measure(**kw)
    except torch.cuda.OutOfMemoryError as e:
        row = dict(shape=kw["shape_name"], method=kw["method"], error=f"out of memory: {e}")
    row["sweep"] = kw.get("sweep_name")
    results["memory_speed"].append(row)
    print(json.dumps({k: v for k, v in row.items() if k not in ("step_ms_all", "profile")}), flush=True)
    out.write_text(json.dumps(results, indent=1))


def _slope(rows: list[dict], key: str) -> float | None:
    """Least-squares slope of activation memory (GiB) against `key` (layers or tokens)."""
    if len(rows) < 2:
        return None
    xs, ys = [r[key] for r in rows], [r["activation_gib"] for r in rows]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def summarise(results: dict) -> dict:
    """The issue's targets as ratios measured in this run."""
    rows = [r for r in results["memory_speed"] if "error" not in r]
    summary: dict = {}
    for shape in SHAPES:
        main_rows = {r["method"]: r for r in rows if r["shape"] == shape and r.get("sweep") is None}
        exact = {m: r for m, r in main_rows.items() if m.startswith("meft") and not m.endswith(("float", "vanilla"))}
        if not exact:
            continue
        best = min(exact.values(), key=lambda r: r["activation_gib"])
        entry = {"best_exact_meft": best["method"], "best_exact_meft_activation_gib": best["activation_gib"]}
        for ref in ("full", "lora", "lora+gc", "lora+gc+chunked-loss", "head-only"):
            if ref in main_rows:
                entry[f"activation_vs_{ref}"] = best["activation_gib"] / main_rows[ref]["activation_gib"]
        if "lora" in main_rows:
            entry["step_time_vs_lora"] = {m: r["step_ms"] / main_rows["lora"]["step_ms"] for m, r in exact.items()}
        summary[shape] = entry
    depth = {}
    for method in SWEEP_METHODS:
        slope = _slope(sorted((r for r in rows if r.get("sweep") == "depth" and r["method"] == method),
                              key=lambda r: r["layers"]), "layers")
        if slope is not None:
            depth[method] = {"gib_per_layer": slope}
    if "lora+gc" in depth:
        for method, entry in depth.items():
            entry["vs_lora+gc"] = entry["gib_per_layer"] / depth["lora+gc"]["gib_per_layer"]
    summary["depth_slopes"] = depth
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--depths", nargs="*", type=int, default=DEPTHS,
                        help="depth sweep at OPT-1.3b width, batch 8 x 512 (none: skip)")
    parser.add_argument("--seq-lengths", nargs="*", type=int, default=SEQ_LENGTHS,
                        help="sequence-length sweep at OPT-1.3b shape, batch 2 (none: skip)")
    parser.add_argument("--sweep-methods", nargs="+", default=SWEEP_METHODS, choices=METHODS)
    parser.add_argument("--profile", action="store_true", help="profile one step of LoRA, LoRA + checkpointing and MEFT3")
    parser.add_argument("--skip-checks", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--deterministic", action="store_true",
                        help="also check gradients with torch.use_deterministic_algorithms (needs CUBLAS_WORKSPACE_CONFIG=:4096:8)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    env = dict(
        gpu=torch.cuda.get_device_name(), torch=torch.__version__, transformers=transformers.__version__,
        date=time.strftime("%Y-%m-%d"), command=" ".join(sys.argv), loss_chunk_size=LOSS_CHUNK,
    )
    try:
        import peft

        env["peft"] = peft.__version__
    except ImportError:
        args.methods = [m for m in args.methods if not m.startswith("lora")]
    results = {"environment": env, "kernels": [], "memory_speed": [], "checks": [], "summary": {}}
    if not args.skip_checks:
        results["kernels"] = kernel_check(device)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    profiled = ("lora", "lora+gc", "meft3", "meft3-compiled", "meft3-float")
    for shape in [] if args.skip_memory else args.shapes:
        for method in args.methods:
            if method.endswith("chunked-loss") and SHAPES[shape]["head"] != "AutoModelForCausalLM":
                continue  # a causal-LM loss
            _run(results, args.out, shape_name=shape, method=method, steps=args.steps, device=device,
                 profile=args.profile and shape == "opt-1.3b" and method in profiled)
    for layers in [] if args.skip_memory else args.depths:
        for method in args.sweep_methods:
            _run(results, args.out, shape_name="opt-1.3b", method=method, steps=3, device=device, layers=layers,
                 sweep_name="depth")
    for seq in [] if args.skip_memory else args.seq_lengths:
        for method in args.sweep_methods:
            _run(results, args.out, shape_name="opt-1.3b", method=method, steps=3, device=device, seq=seq,
                 batch_size=2, sweep_name="seq")
    results["summary"] = summarise(results)
    args.out.write_text(json.dumps(results, indent=1))
    if not args.skip_checks:
        results["checks"] += check("opt-1.3b", device, torch.bfloat16)
        results["checks"] += check("bert-base", device, torch.float32, autocast=True)
        args.out.write_text(json.dumps(results, indent=1))
    if args.deterministic:
        # with deterministic kernels, reversible and plain autograd must agree bit for bit on
        # the GPU too; without them, plain autograd does not even agree with itself
        torch.use_deterministic_algorithms(True)
        # eager attention: its kernels (matmuls, softmax) all have deterministic implementations
        rows = check("opt-1.3b", device, torch.bfloat16, layers=8, attention="eager")
        for row in rows:
            row["deterministic_algorithms"] = True
        results["checks"] += rows
        torch.use_deterministic_algorithms(False)
        args.out.write_text(json.dumps(results, indent=1))
    print("\nshape          method                 layers  seq  static GiB  peak GiB  activation GiB  step ms  tokens/s")
    for r in results["memory_speed"]:
        if "error" in r:
            print(f"{r['shape']:14s} {r['method']:22s} {r['error'][:60]}")
            continue
        print(f"{r['shape']:14s} {r['method']:22s} {r['layers']:6d} {r['seq']:4d}  {r['static_gib']:10.2f}  {r['peak_gib']:8.2f}"
              f"  {r['activation_gib']:14.2f}  {r['step_ms']:7.1f}  {r['tokens_per_s']:8.0f}")
    print(json.dumps(results["summary"], indent=1))


if __name__ == "__main__":
    main()
