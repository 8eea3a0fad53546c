"""Data-parallel fine-tuning of a converted OPT: MEFT3 against LoRA under torch DDP or FSDP2.

Run with torchrun from the repository root, one process per GPU (CPU with gloo works too):

    torchrun --nproc-per-node 2 benchmarks/distributed.py --engine ddp fsdp fsdp-blocks --data-dir shared-data \\
        --out benchmarks/results/h200x2-distributed.json

Rank 0 builds an OPT (tests/data/configs/<shape>.json, random weights, --dtype), saves it and
converts it to MEFT3 with meft_convert's Python API; LoRA (peft, r = 8 on q_proj and v_proj)
trains the same saved model. For each engine and method:

- gradient check: before the model is wrapped, every rank computes the single-process gradient of
  the step's global batch (each rank's rows in turn, with the dropout seed that rank will use);
  after the first data-parallel step it compares its gradients with it (‖a − b‖ / ‖b‖ per tensor).
  On CUDA both run with math attention and deterministic kernels (see checked_step);
- --steps training steps (AdamW) on byte-level tokens of Tiny Shakespeare: loss of the global
  batch per step, non-finite losses, tokens/s over the steps from the third on (the first runs
  the gradient check with deterministic kernels, the second compiles the engine's half-steps
  again for the fast kernels), every step's time;
- per rank: static memory (model, optimizer state, after one step with gradients freed), peak
  memory over the training steps and activation memory = peak − static (CUDA only). Under FSDP
  the peak also holds the root unit's gathered (unsharded) parameters: their size is measured on
  its own (unshard() then reshard() before training) and subtracted in
  `activation_gib_less_gathered`.

Engines: `ddp`; `fsdp`, FSDP2 with the whole model as one unit (`fully_shard(model)`), gathered
for the whole step; `fsdp-blocks`, a unit per block first, then the model: MEFT3 shards
`model.fsdp_units()` (each layer's attention and MLP modules), LoRA each decoder layer;
`fsdp-layers`, a unit per decoder layer for both methods (the usual FSDP recipe; a MEFT stack
gathers each layer around its work, as it never calls a layer's own forward). Trainable parameters are in the model's dtype for
both methods (peft's float32 upcast of adapters is off), so that each FSDP unit has one dtype.
"""

from __future__ import annotations

import os

# NVLink multicast (NVLS) stays off on the machines this runs on; set before NCCL starts
os.environ["NCCL_NVLS_ENABLE"] = "0"
os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
# deterministic cuBLAS for the gradient check's step (see checked_step)
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import contextlib
import json
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import transformers

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from meft_convert.convert import ConvertOptions, convert

# fsdp: the whole model one FSDP2 unit; fsdp-blocks: a unit per block first (MEFT: the layers'
# attention and MLP modules, model.fsdp_units(); LoRA: each decoder layer), then the model;
# fsdp-layers: a unit per decoder layer first, for both methods
ENGINES = ("ddp", "fsdp", "fsdp-blocks", "fsdp-layers")
METHODS = ("meft3", "lora")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# relative gradient difference allowed against the single-process run: reduction order only
GRAD_TOLERANCE = {"fp32": 1e-5, "bf16": 1e-2}
TEXT = Path("text") / "tinyshakespeare" / "input.txt"
BYTE_OFFSET = 4  # byte b is token b + 4: OPT's ids 0-3 are its special tokens
LORA_TARGETS = ["q_proj", "v_proj"]


# ------------------------------------------------------------------------------ set-up


def log(message: str) -> None:
    if dist.get_rank() == 0:
        print(message, flush=True)


def opt_config(shape: str, overrides: dict) -> transformers.PretrainedConfig:
    path = ROOT / "tests" / "data" / "configs" / f"{shape}.json"
    if not path.is_file():
        raise SystemExit(f"no config {path}")
    values = json.loads(path.read_text())
    values.pop("_name_or_path", None)
    values.update(overrides)
    if values.get("model_type") != "opt":
        raise SystemExit(f"{shape} is not an OPT config")
    return transformers.AutoConfig.for_model(values.pop("model_type"), **values)


def build_checkpoints(config, dtype: torch.dtype, device: torch.device, work: Path, seed: int) -> tuple[Path, Path]:
    """Rank 0 saves a random OPT and its MEFT3 conversion; returns (plm folder, meft3 folder)."""
    plm, meft3 = work / "plm", work / "meft3"
    if dist.get_rank() == 0:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.device(device):
            torch.manual_seed(seed)
            model = transformers.OPTForCausalLM(config)
        model.to(dtype).save_pretrained(plm)
        del model
        # no verification: it compares two float32 copies on the CPU, and these weights are random
        convert(ConvertOptions(model=str(plm), output=meft3, variant="meft3", verify=False, show_progress=False), log=log)
    dist.barrier()
    return plm, meft3


def load(method: str, plm: Path, meft3: Path, dtype: torch.dtype, device: torch.device, seed: int):
    if method == "meft3":
        # MEFT freezes the PLM itself: only its adapters train
        model = transformers.AutoModelForCausalLM.from_pretrained(meft3, trust_remote_code=True, dtype=dtype)
    else:
        import peft

        model = transformers.AutoModelForCausalLM.from_pretrained(plm, dtype=dtype)
        lora = peft.LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS)
        # the same LoRA initialisation on every rank: FSDP shards each rank's own copy
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = peft.get_peft_model(model, lora, autocast_adapter_dtype=False)
    return model.to(device).train()


def load_in_turn(method: str, plm: Path, meft3: Path, dtype: torch.dtype, device: torch.device, seed: int):
    """Rank 0 first: it writes the checkpoint's modeling code into the modules cache that the
    other ranks then read."""
    model = None
    if dist.get_rank() == 0:
        model = load(method, plm, meft3, dtype, device, seed)
    dist.barrier()
    return model if model is not None else load(method, plm, meft3, dtype, device, seed)


class ByteText:
    """A text file as byte-level tokens; each step reads the same global batch on every rank."""

    def __init__(self, path: Path, rows_per_rank: int, seq: int, seed: int):
        if not path.is_file():
            raise SystemExit(f"{path} not found: --data-dir must hold {TEXT}")
        self.tokens = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8).to(torch.int64) + BYTE_OFFSET
        self.rows_per_rank, self.seq, self.seed = rows_per_rank, seq, seed

    def global_batch(self, step: int) -> torch.Tensor:
        """(world size × rows per rank, seq) windows at random places; no padding, so every rank
        averages its loss over as many tokens and the mean of the ranks' means is the global mean."""
        rows = dist.get_world_size() * self.rows_per_rank
        generator = torch.Generator().manual_seed(self.seed * 100_003 + step)
        starts = torch.randint(0, len(self.tokens) - self.seq, (rows,), generator=generator)
        return torch.stack([self.tokens[s : s + self.seq] for s in starts.tolist()])

    def rank_rows(self, batch: torch.Tensor, rank: int) -> torch.Tensor:
        return batch[rank * self.rows_per_rank : (rank + 1) * self.rows_per_rank]


def dropout_seed(seed: int, step: int, rank: int) -> int:
    """Dropout seed of one rank's rows at one step: the single-process reference draws the same
    masks for those rows, so gradients compare with dropout on."""
    return seed * 1_000_003 + step * 1009 + rank


# ------------------------------------------------------------------- gradient check


def trainable(model) -> dict[str, torch.Tensor]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def full(t: torch.Tensor) -> torch.Tensor:
    """FSDP2's sharded DTensors gathered into full tensors (a collective: every rank calls it)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


@contextlib.contextmanager
def checked_step(device: torch.device):
    """The gradient check's step runs with math attention and deterministic kernels, so that the
    single-process and the data-parallel gradients differ only in how they are reduced: SDPA's
    fused backward kernels accumulate atomically, and two plain runs of OPT-1.3b in bf16 differ by
    up to 2% (benchmarks/README.md, GPU correctness). The other steps use the fast kernels."""
    if device.type != "cuda":
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.use_deterministic_algorithms(before)


def reference_gradients(model, data: ByteText, seed: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Single-process gradient of step 0's global batch, rank by rank as micro-batches, summed in
    float32: d(mean over ranks of each rank's mean loss)."""
    world = dist.get_world_size()
    batch = data.global_batch(0)
    params = trainable(model)
    total = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    for rank in range(world):
        ids = data.rank_rows(batch, rank).to(device)
        torch.manual_seed(dropout_seed(seed, 0, rank))
        loss = model(input_ids=ids, labels=ids).loss / world
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for (name, _), g in zip(params.items(), grads):
            if g is not None:
                total[name] += g.float()
    return total


def compare_gradients(model, reference: dict[str, torch.Tensor]) -> dict:
    """Largest ‖a − b‖ / ‖b‖ over tensors, across all ranks. Tensors whose reference is exactly
    zero (LoRA's A before B has moved) must be exactly zero too."""
    worst, zero_mismatch, missing = 0.0, 0, 0
    for name, p in trainable(model).items():
        if p.grad is None:
            missing += 1
            continue
        a, b = full(p.grad).float(), reference[name]
        b_norm = b.norm().item()
        if b_norm == 0:
            zero_mismatch += int(a.norm().item() != 0)
        else:
            worst = max(worst, ((a - b).norm() / b_norm).item())
    stats = torch.tensor([worst, zero_mismatch, missing], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(stats, op=dist.ReduceOp.MAX)
    return {
        "max_relative_difference": stats[0].item(),
        "tensors": len(reference),
        "zero_reference_but_nonzero": int(stats[1].item()),
        "without_gradient": int(stats[2].item()),
    }


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


# ----------------------------------------------------------------------------- training


def block_units(model, method: str, engine: str = "fsdp-blocks") -> list[torch.nn.Module]:
    if method == "lora":
        return list(model.get_base_model().model.decoder.layers)  # LoRA's layers run their own forward
    if engine == "fsdp-layers":
        return list(model.model.decoder.layers)
    return model.fsdp_units()


def wrap(model, engine: str, method: str, device: torch.device):
    if engine == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # every trainable parameter gets its gradient in every step: no search for unused ones
        return DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=False
        )
    from torch.distributed.fsdp import fully_shard

    if engine in ("fsdp-blocks", "fsdp-layers"):
        for unit in block_units(model, method, engine):
            fully_shard(unit)
    return fully_shard(model)


def gathered_parameter_bytes(wrapped, device: torch.device) -> int:
    """Memory that FSDP2's all-gather of the root unit takes on this rank, measured: the root holds
    these full-size parameters from its forward until its backward has run (unshard() is not
    recursive: block units gather theirs only while they run)."""
    if device.type != "cuda":
        # no allocator to ask: count the storages behind the parameters that unshard() made full
        # (block units' parameters stay sharded DTensors); a census of every live tensor would
        # also count all-gather buffers whose lifetime varies between torch builds and machines
        from torch.distributed.tensor import DTensor

        wrapped.unshard()
        storages = {
            p.untyped_storage().data_ptr(): p.untyped_storage().nbytes()
            for p in wrapped.parameters()
            if not isinstance(p, DTensor)
        }
        wrapped.reshard()
        return sum(storages.values())
    synchronize(device)
    before = torch.cuda.memory_allocated(device)
    wrapped.unshard()
    synchronize(device)
    gathered = torch.cuda.memory_allocated(device) - before
    wrapped.reshard()
    synchronize(device)
    return gathered


def live_tensor_bytes() -> int:
    """Bytes of every live tensor storage in this process, each storage once (a DTensor counts
    its local shard): the memory figure of CPU runs, where no allocator reports one."""
    import gc

    gc.collect()
    seen, total = set(), 0
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor):
            local = getattr(obj, "_local_tensor", obj)
            try:
                storage = local.untyped_storage()
            except (RuntimeError, NotImplementedError):  # tensors without storage (meta, fake)
                continue
            if storage.data_ptr() and storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(method: str, engine: str, args, paths, data: ByteText, device: torch.device) -> dict:
    dtype = DTYPES[args.dtype]
    rank, world = dist.get_rank(), dist.get_world_size()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    model = load_in_turn(method, *paths, dtype, device, args.seed)
    n_trainable = sum(p.numel() for p in trainable(model).values())
    n_total = sum(p.numel() for p in model.parameters())
    # distinct parameters that block units would shard (the rest belongs to the root unit)
    in_units = {id(p): p.numel() for unit in block_units(model, method, engine) for p in unit.parameters()}
    n_in_units = sum(in_units.values())
    with checked_step(device):
        reference = reference_gradients(model, data, args.seed, device)
    model.zero_grad(set_to_none=True)
    wrapped = wrap(model, engine, method, device)
    # the root unit's parameters stay gathered for the whole step (block units only while they run)
    gathered = gathered_parameter_bytes(wrapped, device) if engine != "ddp" else 0
    optimizer = torch.optim.AdamW(list(trainable(model).values()), lr=args.lr, weight_decay=0.0)
    losses, step_seconds, gradient_check = [], [], None
    static = peak = None
    for step in range(args.steps):
        ids = data.rank_rows(data.global_batch(step), rank).to(device)
        if step == 1:
            # after one step: optimizer state exists, gradients are freed
            synchronize(device)
            static = torch.cuda.memory_allocated(device) if device.type == "cuda" else live_tensor_bytes()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
        synchronize(device)
        start = time.perf_counter()
        torch.manual_seed(dropout_seed(args.seed, step, rank))
        with checked_step(device) if step == 0 else contextlib.nullcontext():
            loss = wrapped(input_ids=ids, labels=ids).loss
            if step == 1 and device.type != "cuda":
                peak = live_tensor_bytes()  # saved activations and gathered parameters coexist here
            loss.backward()
        if step == 0:
            gradient_check = compare_gradients(model, reference)
            del reference
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        step_seconds.append(time.perf_counter() - start)
        global_loss = loss.detach().float().clone()
        dist.all_reduce(global_loss)  # the mean over ranks is the global batch's mean loss
        losses.append(global_loss.item() / world)
        log(f"{engine} {method} step {step}: loss {losses[-1]:.4f}, {step_seconds[-1] * 1000:.0f} ms")
    if device.type == "cuda" and static is not None:
        peak = torch.cuda.max_memory_allocated(device)
    timed = step_seconds[2:] or step_seconds
    tokens_per_step = world * args.batch * args.seq
    mine = {
        "rank": rank,
        "device": str(device),
        "static_gib": None if static is None else static / 2**30,
        "peak_gib": None if peak is None else peak / 2**30,
        "activation_gib": None if peak is None else (peak - static) / 2**30,
        "memory": "CUDA allocator, peak over steps 2 to N" if device.type == "cuda"
        else "live tensor storages, between the forward and the backward of step 2",
        "gathered_parameters_gib": gathered / 2**30,
        "activation_gib_less_gathered": None if peak is None else (peak - static - gathered) / 2**30,
        "step_ms_median": statistics.median(timed) * 1000,
        "step_ms": [round(t * 1000, 2) for t in step_seconds],
    }
    per_rank: list = [None] * world
    dist.all_gather_object(per_rank, mine)
    window = max(1, min(5, len(losses) // 2))  # the first and the last five steps
    head, tail = losses[:window], losses[-window:]
    non_finite = [i for i, value in enumerate(losses) if not torch.isfinite(torch.tensor(value))]
    result = {
        "engine": engine,
        "method": method,
        "trainable_parameters": n_trainable,
        "parameters": n_total,
        "parameters_in_block_units": n_in_units,
        "gradient_check": dict(gradient_check, tolerance=GRAD_TOLERANCE[args.dtype],
                               passed=gradient_check["max_relative_difference"] <= GRAD_TOLERANCE[args.dtype]
                               and gradient_check["zero_reference_but_nonzero"] == 0
                               and gradient_check["without_gradient"] == 0),
        "losses": losses,
        "loss_first_mean": statistics.mean(head),
        "loss_last_mean": statistics.mean(tail),
        "loss_falling": statistics.mean(tail) < statistics.mean(head),
        "non_finite_steps": non_finite,
        "tokens_per_second": tokens_per_step * len(timed) / sum(timed),
        "step_ms_median": statistics.median(timed) * 1000,
        "per_rank": per_rank,
    }
    del wrapped, model, optimizer
    return result


# --------------------------------------------------------------------------------- main


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", nargs="+", choices=ENGINES, required=True, help="one or more, run in turn")
    parser.add_argument("--method", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--shape", default="opt-1.3b", help="an OPT config in tests/data/configs")
    parser.add_argument("--config-overrides", type=json.loads, default={},
                        help='JSON of config fields to change, e.g. \'{"num_hidden_layers": 2}\'')
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=8, help="rows per rank")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", type=Path, required=True, help=f"a folder holding {TEXT}")
    parser.add_argument("--work-dir", type=Path, default=None, help="where the checkpoints are written (default: a temporary folder)")
    parser.add_argument("--out", type=Path, required=True, help="results JSON (written by rank 0)")
    args = parser.parse_args(argv)
    if args.steps < 3:
        parser.error("--steps must be at least 3 (the first two steps compile and are not timed)")
    return args


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> None:
    args = parse_args(argv)
    if "RANK" not in os.environ:  # started without torchrun: one process
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 gradient checks compare fp32 arithmetic
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    data = ByteText(args.data_dir / TEXT, args.batch, args.seq, args.seed)
    config = opt_config(args.shape, args.config_overrides)
    work_holder = [None]
    if dist.get_rank() == 0:
        work_holder[0] = str(args.work_dir or tempfile.mkdtemp(prefix="meft-distributed-"))
    dist.broadcast_object_list(work_holder)
    work = Path(work_holder[0])
    try:
        paths = build_checkpoints(config, DTYPES[args.dtype], device, work, args.seed)
        env = {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "backend": dist.get_backend(),
            "world_size": dist.get_world_size(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "date": time.strftime("%Y-%m-%d"),
            "command": " ".join(["torchrun", f"--nproc-per-node {dist.get_world_size()}"] + sys.argv),
            "shape": args.shape,
            "config_overrides": args.config_overrides,
            "dtype": args.dtype,
            "rows_per_rank": args.batch,
            "seq": args.seq,
            "steps": args.steps,
            "lr": args.lr,
            "lora_targets": LORA_TARGETS,
        }
        if "lora" in args.method:
            import peft

            env["peft"] = peft.__version__
        results = {"environment": env, "runs": []}
        for engine in args.engine:
            for method in args.method:
                results["runs"].append(run(method, engine, args, paths, data, device))
                if dist.get_rank() == 0:
                    args.out.parent.mkdir(parents=True, exist_ok=True)
                    args.out.write_text(json.dumps(results, indent=1))
        log("\nengine method  grad rel diff  loss first→last   tokens/s   " + "  ".join(
            f"rank{r} static/peak/act(/act less gathered) GiB" for r in range(dist.get_world_size())))
        for r in results["runs"]:
            memory = "  ".join(
                "n/a" if m["peak_gib"] is None else f"{m['static_gib']:.2f}/{m['peak_gib']:.2f}/{m['activation_gib']:.2f}"
                + (f"/{m['activation_gib_less_gathered']:.2f}" if r["engine"] != "ddp" else "")
                for m in r["per_rank"]
            )
            log(f"{r['engine']:6s} {r['method']:6s} {r['gradient_check']['max_relative_difference']:13.2e}  "
                f"{r['loss_first_mean']:6.3f}→{r['loss_last_mean']:6.3f}  {r['tokens_per_second']:9.0f}   {memory}")
    finally:
        dist.barrier()
        if dist.get_rank() == 0 and args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # everything is written and the process group is gone: leave without the interpreter's
    # teardown, where gloo's threads once aborted a CPU rank ("terminate called without an
    # active exception") after a complete run
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
