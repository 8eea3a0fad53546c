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
from templates import reversible  # noqa: E402

SHAPES = {
    "opt-1.3b": dict(config="opt-1.3b", head="AutoModelForCausalLM", batch=8, seq=512, lora=["q_proj", "v_proj"], task_head=()),
    "bert-base": dict(
        config="bert-base-uncased", head="AutoModelForSequenceClassification", batch=32, seq=512,
        lora=["query", "value"], task_head=("classifier",),
    ),
}
METHODS = ["full", "lora", "lora+gc", "head-only", "meft1", "meft2", "meft3", "meft3-vanilla", "meft3-float"]


def plm_config(shape: dict, **overrides) -> transformers.PretrainedConfig:
    values = json.loads((ROOT / "tests" / "data" / "configs" / f"{shape['config']}.json").read_text())
    values.pop("_name_or_path", None)
    values.update(overrides)
    return transformers.AutoConfig.for_model(values.pop("model_type"), **values)


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
                **values, variant=variant, exact=not method.endswith("float")
            )
            meft_config._attn_implementation = attention
            model = model_class_for(family_for(config.model_type), shape["head"])(meft_config)
        else:
            model = auto.from_config(config)
    model.to(dtype)
    if method.startswith("meft"):
        pass  # MEFT freezes the PLM itself
    elif method == "full":
        model.requires_grad_(True)
    elif method == "head-only":
        model.requires_grad_(False)
        for name in shape["task_head"] or ("lm_head",):
            model.get_submodule(name).requires_grad_(True)
    elif method.startswith("lora"):
        import peft

        lora = peft.LoraConfig(r=8, lora_alpha=16, target_modules=shape["lora"], modules_to_save=list(shape["task_head"]) or None)
        model = peft.get_peft_model(model, lora)
        if method == "lora+gc":
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


def measure(shape_name: str, method: str, steps: int, device) -> dict:
    shape = SHAPES[shape_name]
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = build(shape, method, device, torch.bfloat16)
    mode = "vanilla" if method.endswith("vanilla") else "reversible"
    batch = make_batch(shape, model.config, device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    train_step(model, batch, optimizer, mode)  # warm-up: optimizer states exist afterwards
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
    result = dict(
        shape=shape_name, method=method, batch=shape["batch"], seq=shape["seq"],
        trainable=sum(p.numel() for p in params), static_gib=static / 2**30, peak_gib=peak / 2**30,
        activation_gib=(peak - static) / 2**30, step_ms=statistics.median(times), step_ms_all=times,
    )
    del model, optimizer, batch, params
    return result


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--steps", type=int, default=10)
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
        date=time.strftime("%Y-%m-%d"), command=" ".join(sys.argv),
    )
    try:
        import peft

        env["peft"] = peft.__version__
    except ImportError:
        args.methods = [m for m in args.methods if not m.startswith("lora")]
    results = {"environment": env, "kernels": [], "memory_speed": [], "checks": []}
    if not args.skip_checks:
        results["kernels"] = kernel_check(device)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for shape in [] if args.skip_memory else args.shapes:
        for method in args.methods:
            try:
                row = measure(shape, method, args.steps, device)
            except torch.cuda.OutOfMemoryError as e:
                row = dict(shape=shape, method=method, error=f"out of memory: {e}")
            results["memory_speed"].append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "step_ms_all"}), flush=True)
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
    print("\nshape      method          trainable  static GiB  peak GiB  activation GiB  step ms")
    for r in results["memory_speed"]:
        if "error" in r:
            print(f"{r['shape']:10s} {r['method']:14s} {r['error'][:60]}")
            continue
        print(f"{r['shape']:10s} {r['method']:14s} {r['trainable']:>10,}  {r['static_gib']:10.2f}  {r['peak_gib']:8.2f}"
              f"  {r['activation_gib']:14.2f}  {r['step_ms']:7.1f}")


if __name__ == "__main__":
    main()
