"""Data-parallel training of a converted model in 2 CPU processes (gloo): torch DDP, accelerate
and FSDP2 give every rank the gradient a single process computes on the whole batch.

Each test starts two processes with torch.multiprocessing. Every process also keeps a plain,
unwrapped copy of the model and computes the single-process reference on the global batch
itself, so the comparison needs no extra communication. Workers save their measurements and
the assertions run here, in the test process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.conftest import SHARED_DATA

WORLD_SIZE = 2
ROWS_PER_RANK, SEQ = 2, 12
STEPS = 3
DROPOUT_OFF = {"dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0}
# the paper's adapter init, not the default zero one: every trainable tensor then gets a nonzero
# gradient in the first step (a zero up-projection passes none to its down-projection), which the
# gradient comparisons below divide by; random tiny models have no starting point to keep
PAPER_INIT = {"adapter_init": "paper", "allow_low_fidelity": True}
ROOT = Path(__file__).resolve().parent.parent
# FSDP2 on the CPU (gloo) is right from torch 2.9: 2.6's all-gather needs CUDA stream events, and
# 2.7 and 2.8 sum the ranks' gradients instead of averaging them (a plain nn.Linear shows it too)
FSDP2_ON_CPU = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 9)
needs_fsdp2_on_cpu = pytest.mark.skipif(
    not FSDP2_ON_CPU, reason=f"FSDP2 on the CPU needs torch 2.9 or newer (this is {torch.__version__})"
)


# ------------------------------------------------------------------ worker side (each rank)


def _load(folder: str, **config_overrides):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, trust_remote_code=True, dtype=torch.float32, **config_overrides
    )
    return model.train()


def _global_batch(vocab_size: int, step: int) -> torch.Tensor:
    """WORLD_SIZE × ROWS_PER_RANK rows without padding, so that every rank's mean loss averages
    as many tokens and the average of the ranks' means is the mean over the global batch."""
    generator = torch.Generator().manual_seed(100 + step)
    return torch.randint(4, vocab_size, (WORLD_SIZE * ROWS_PER_RANK, SEQ), generator=generator)


def _rank_rows(batch: torch.Tensor, rank: int) -> torch.Tensor:
    return batch[rank * ROWS_PER_RANK : (rank + 1) * ROWS_PER_RANK]


def _loss(model, ids: torch.Tensor, seed: int | None = None) -> torch.Tensor:
    """Causal-LM loss; with a seed, dropout draws from a generator state that depends on the
    micro-batch only, so a rank and the single process draw the same masks for it."""
    if seed is not None:
        torch.manual_seed(seed)
    return model(input_ids=ids, labels=ids).loss


def _trainable(model) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP2's sharded parameters and gradients) gathered into a full tensor."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _relative_differences(model, reference, what: str = "grad") -> dict[str, float]:
    """‖a − b‖ / ‖b‖ per trainable tensor: `what` is "grad" or "param"."""
    result = {}
    for name, ref in _trainable(reference).items():
        p = dict(model.named_parameters())[name]
        a = _full(p.grad if what == "grad" else p.detach())
        b = ref.grad if what == "grad" else ref.detach()
        result[name] = ((a - b).norm() / b.norm()).item()
    return result


def _grads_equal_across_ranks(model) -> bool:
    """Every rank holds the same gradients, bit for bit."""
    for p in _trainable(model).values():
        g = _full(p.grad)
        gathered = [torch.empty_like(g) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, g.contiguous())
        if not all(torch.equal(gathered[0], other) for other in gathered[1:]):
            return False
    return True


def _train_against_reference(wrapped, model, reference, rank: int) -> dict:
    """STEPS SGD steps of `wrapped` (DDP or FSDP around `model`) on this rank's rows, each checked
    against `reference` stepping on the whole global batch in this process."""
    steps = []
    optimizer = torch.optim.SGD(_trainable(model).values(), lr=0.1)
    reference_optimizer = torch.optim.SGD(_trainable(reference).values(), lr=0.1)
    for step in range(STEPS):
        batch = _global_batch(model.config.vocab_size, step)
        optimizer.zero_grad(set_to_none=True)
        _loss(wrapped, _rank_rows(batch, rank)).backward()
        _reference_step(reference, reference_optimizer, batch)
        steps.append(max(_relative_differences(model, reference).values()))
        optimizer.step()
        reference_optimizer.step()
    return {"steps": steps, "params_after": max(_relative_differences(model, reference, "param").values())}


def _reference_step(reference, optimizer, batch: torch.Tensor) -> None:
    """The single-process run: one forward of the whole global batch."""
    optimizer.zero_grad(set_to_none=True)
    _loss(reference, batch).backward()


def _reference_accumulated(reference, micro_batches: list[torch.Tensor], seeds: list[int]) -> None:
    """The single-process run of a global batch split into micro-batches (gradient accumulation),
    each with its own dropout seed."""
    reference.zero_grad(set_to_none=True)
    for ids, seed in zip(micro_batches, seeds):
        (_loss(reference, ids, seed) / len(micro_batches)).backward()


def _check_ddp(rank: int, folder: str) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model, reference = _load(folder, **DROPOUT_OFF), _load(folder, **DROPOUT_OFF)
    ddp = DDP(model, find_unused_parameters=False)
    results = _train_against_reference(ddp, model, reference, rank)

    # dropout on, two micro-batches per rank, the first under no_sync: one all-reduce per step
    model, reference = _load(folder), _load(folder)
    assert model.config.dropout > 0
    ddp = DDP(model, find_unused_parameters=False)
    batch = _global_batch(model.config.vocab_size, STEPS)
    micro = [batch[i : i + 1] for i in range(len(batch))]  # global micro-batch i
    seeds = [1000 + i for i in range(len(micro))]
    mine = [rank * ROWS_PER_RANK + k for k in range(ROWS_PER_RANK)]
    with ddp.no_sync():
        (_loss(ddp, micro[mine[0]], seeds[mine[0]]) / ROWS_PER_RANK).backward()
    results["unsynced_differ_across_ranks"] = not _grads_equal_across_ranks(model)
    for i in mine[1:]:
        (_loss(ddp, micro[i], seeds[i]) / ROWS_PER_RANK).backward()
    _reference_accumulated(reference, micro, seeds)
    results["accumulated_dropout"] = max(_relative_differences(model, reference).values())
    results["equal_across_ranks"] = _grads_equal_across_ranks(model)
    with torch.no_grad():  # dropout really draws masks: two seeds, two outputs
        torch.manual_seed(1)
        a = reference(input_ids=micro[0]).logits
        torch.manual_seed(2)
        b = reference(input_ids=micro[0]).logits
        results["dropout_changes_logits"] = ((a - b).norm() / a.norm()).item()
    return results


def _check_ddp_two_steps(rank: int, folder: str) -> float:
    """Two DDP backward passes of another variant (MEFT1 and MEFT2 swap the streams after every
    layer); a parameter without gradient in the first would make DDP raise in the second."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    model, reference = _load(folder, **DROPOUT_OFF), _load(folder, **DROPOUT_OFF)
    ddp = DDP(model, find_unused_parameters=False)
    worst = 0.0
    for step in range(2):
        batch = _global_batch(model.config.vocab_size, step)
        model.zero_grad(set_to_none=True)
        reference.zero_grad(set_to_none=True)
        _loss(ddp, _rank_rows(batch, rank)).backward()
        _loss(reference, batch).backward()
        worst = max(worst, *_relative_differences(model, reference).values())
    return worst


def _check_accelerate(rank: int, folder: str, accelerator) -> dict:
    results: dict = {"steps": []}
    model, reference = _load(folder, **DROPOUT_OFF), _load(folder, **DROPOUT_OFF)
    optimizer = torch.optim.SGD(_trainable(model).values(), lr=0.1)
    prepared, optimizer = accelerator.prepare(model, optimizer)
    results["wrapper"] = type(prepared).__name__
    results["find_unused_parameters"] = getattr(prepared, "find_unused_parameters", None)
    reference_optimizer = torch.optim.SGD(_trainable(reference).values(), lr=0.1)
    for step in range(STEPS):
        batch = _global_batch(model.config.vocab_size, step)
        rows = _rank_rows(batch, rank)
        # gradient accumulation over this rank's rows; accelerate syncs on the last one
        for k in range(ROWS_PER_RANK):
            with accelerator.accumulate(prepared):
                accelerator.backward(_loss(prepared, rows[k : k + 1]))
                if accelerator.sync_gradients:
                    # one-row micro-batches: the mean of their means is the global batch's mean
                    reference_optimizer.zero_grad(set_to_none=True)
                    _loss(reference, batch).backward()
                    results["steps"].append(max(_relative_differences(model, reference).values()))
                    reference_optimizer.step()
                optimizer.step()
                optimizer.zero_grad()
    results["params_after"] = max(_relative_differences(model, reference, "param").values())
    return results


def _check_fsdp(rank: int, folder: str) -> dict:
    from torch.distributed.fsdp import fully_shard

    model, reference = _load(folder, **DROPOUT_OFF), _load(folder, **DROPOUT_OFF)
    # one FSDP unit for the whole model: the reversible stack runs all layers in one call, so
    # the layers' own forward (where per-layer units gather their shards) never runs
    fully_shard(model)
    sharded = all(type(p).__name__ == "DTensor" for p in model.parameters())
    results = {"sharded": sharded, **_train_against_reference(model, model, reference, rank)}
    results["frozen_without_grad"] = all(p.grad is None for p in model.parameters() if not p.requires_grad)
    return results


def _without_dropout(folder: str) -> dict:
    """Config overrides that switch off every dropout a family's config names."""
    config = json.loads(Path(folder, "config.json").read_text())
    return {k: 0.0 for k, v in config.items() if isinstance(v, float) and ("dropout" in k or "pdrop" in k)}


def _shard_units(model) -> list[torch.nn.Module]:
    """model.fsdp_units(): each layer's attention and MLP modules."""
    return model.fsdp_units()


def _shard_no_split_modules(model) -> list[torch.nn.Module]:
    """Whole layers, picked as accelerate's FSDP plugin and the Trainer's fsdp option pick them by
    default: every module whose class the model names in _no_split_modules."""
    names = set(model._no_split_modules)
    return [m for m in model.modules() if type(m).__name__ in names]


def _check_fsdp_blocks(rank: int, families: dict[str, tuple[str, str]]) -> dict:
    """FSDP2 with a unit per attention and MLP module (model.fsdp_units()), or per whole layer,
    and the rest of the model as the root unit: gradients against one process over STEPS
    steps, and every unit's parameters sharded again once the forward is done."""
    import transformers
    from torch.distributed.fsdp import fully_shard

    results = {}
    # each family; OPT once more with compiled blocks (the reference stays eager); whole layers
    # for a decoder, an encoder-decoder and a LLaMA-family model
    cases = [(name, folder, auto_class, {}, _shard_units) for name, (folder, auto_class) in families.items()]
    cases.append(("opt-125m compile_blocks", *families["opt-125m"], {"compile_blocks": True}, _shard_units))
    for name in ("opt-125m", "bart", "llama"):
        cases.append((f"{name} whole layers", *families[name], {}, _shard_no_split_modules))
    for name, folder, auto_class, overrides, pick_units in cases:
        load = getattr(transformers, auto_class).from_pretrained
        model, reference = (
            load(folder, trust_remote_code=True, dtype=torch.float32, **_without_dropout(folder), **extra).train()
            for extra in (overrides, {})
        )
        units = pick_units(model)
        for unit in units:
            fully_shard(unit)
        fully_shard(model)
        optimizer = torch.optim.SGD(_trainable(model).values(), lr=0.1)
        reference_optimizer = torch.optim.SGD(_trainable(reference).values(), lr=0.1)
        steps, resharded = [], True
        for step in range(STEPS):
            batch = _global_batch(model.config.vocab_size, step)
            optimizer.zero_grad(set_to_none=True)
            loss = _loss(model, _rank_rows(batch, rank))
            resharded &= all(type(p).__name__ == "DTensor" for unit in units for p in unit.parameters())
            loss.backward()
            _reference_step(reference, reference_optimizer, batch)
            steps.append(max(_relative_differences(model, reference).values()))
            optimizer.step()
            reference_optimizer.step()
        results[name] = {"units": len(units), "resharded_after_forward": resharded, "steps": steps}
        results[name]["frames_compiled"] = torch._dynamo.utils.counters["frames"]["ok"]
        if name == "opt-125m whole layers":
            # evaluation gathers each layer around its forward, as training does
            ids = _rank_rows(_global_batch(model.config.vocab_size, STEPS), rank)
            with torch.no_grad():
                logits, reference_logits = (m.eval()(input_ids=ids).logits for m in (model, reference))
            results["eval_logits_difference"] = (logits - reference_logits).abs().max().item()
            model.train()
            # plain autograd would run its backward after the layers' weights are freed: refused
            try:
                with model.meft_backward("vanilla"):
                    _loss(model, _rank_rows(_global_batch(model.config.vocab_size, 0), rank))
                results["vanilla_error"] = None
            except RuntimeError as e:
                results["vanilla_error"] = str(e)
    return results


def _worker(rank: int, folders: dict[str, str], port: int, out_dir: str, families: dict) -> None:
    """All three engines in one pair of processes: starting processes costs more than the checks."""
    import time

    from accelerate import Accelerator

    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD_SIZE), LOCAL_WORLD_SIZE=str(WORLD_SIZE),
    )
    # accelerate starts the gloo process group from the environment; DDP and FSDP use it too
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=ROWS_PER_RANK)
    results = {"backend": dist.get_backend(), "world_size": dist.get_world_size(), "seconds": {}}
    folder = folders["meft3"]
    for engine, check in (
        ("accelerate", lambda: _check_accelerate(rank, folder, accelerator)),
        ("ddp", lambda: _check_ddp(rank, folder)),
        ("fsdp", lambda: _check_fsdp(rank, folder)),
        ("fsdp_blocks", lambda: _check_fsdp_blocks(rank, families)),
        ("ddp_other_variants", lambda: {v: _check_ddp_two_steps(rank, folders[v]) for v in ("meft1", "meft2")}),
    ):
        if engine.startswith("fsdp") and not FSDP2_ON_CPU:
            continue
        start = time.perf_counter()
        results[engine] = check()
        results["seconds"][engine] = time.perf_counter() - start
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


# -------------------------------------------------------------------------- test side


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def opt_folders(converted) -> dict[str, str]:
    """Converted tiny OPTs by variant."""
    folders = {variant: str(converted("opt-125m", variant, **PAPER_INIT)[0]) for variant in ("meft1", "meft2", "meft3")}
    for folder in folders.values():
        _load(folder)  # writes the remote code into the modules cache once, before the workers read it
    return folders


# a model of each family with the head its tiny checkpoint has, for FSDP2 with a unit per block
FSDP_FAMILIES = {
    "opt-125m": "AutoModelForCausalLM", "llama": "AutoModelForCausalLM", "gpt2": "AutoModelForCausalLM",
    "bert": "AutoModelForMaskedLM", "bart": "AutoModelForSeq2SeqLM",
}


@pytest.fixture(scope="module")
def ranks(opt_folders, converted, tmp_path_factory) -> list[dict]:
    """What each of the two ranks measured."""
    import transformers

    out = tmp_path_factory.mktemp("ranks")
    families = {}
    for name, auto_class in FSDP_FAMILIES.items():
        folder = str(converted(name, "meft3", **PAPER_INIT)[0])
        getattr(transformers, auto_class).from_pretrained(folder, trust_remote_code=True)  # the modules cache, once
        families[name] = (folder, auto_class)
    mp.start_processes(
        _worker, args=(opt_folders, _free_port(), str(out), families), nprocs=WORLD_SIZE, start_method="spawn"
    )
    results = [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(WORLD_SIZE)]
    for r in results:
        assert (r["backend"], r["world_size"]) == ("gloo", WORLD_SIZE)
    return results


# all-reduce sums in another order than one process does: float32 rounding, no more
TOLERANCE = 1e-6


@pytest.mark.parametrize("output_stream", ["plm", "mean"])
@pytest.mark.parametrize("variant", ["meft1", "meft2", "meft3"])
def test_every_trainable_parameter_gets_a_gradient(converted, variant, output_stream):
    """What DDP with find_unused_parameters=False and FSDP need: each step gives every trainable
    parameter a gradient. Adapters whose output is dropped (MEFT1/2, PLM stream) are frozen."""
    folder, _ = converted("opt-125m", variant, **PAPER_INIT)
    model = _load(str(folder), output_stream=output_stream)
    ids = _global_batch(model.config.vocab_size, 0)
    model(input_ids=ids, labels=ids).loss.backward()
    trainable = _trainable(model)
    assert trainable and all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.values())
    # the checkpoint's own MeftAdapter class, loaded as remote code
    adapters = {n: m for n, m in model.named_modules() if type(m).__name__ == "MeftAdapter"}
    frozen = [n for n, m in adapters.items() if not m.up_proj.weight.requires_grad]
    top = f"model.decoder.layers.{model.config.num_hidden_layers - 1}.meft.coupling"
    assert frozen == ([top] if variant != "meft3" and output_stream == "plm" else [])


@pytest.mark.slow
def test_ddp_gradients_equal_the_single_process_gradient(ranks):
    for rank, r in enumerate(r["ddp"] for r in ranks):
        assert max(r["steps"]) <= TOLERANCE, (rank, r["steps"])
        assert r["params_after"] <= TOLERANCE, (rank, r["params_after"])
        # dropout on: the masks differ between micro-batches, so they must really be replayed
        assert r["dropout_changes_logits"] > 1e-3
        assert r["unsynced_differ_across_ranks"]  # no_sync did not reduce
        assert r["accumulated_dropout"] <= TOLERANCE, (rank, r["accumulated_dropout"])
        assert r["equal_across_ranks"]


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["meft1", "meft2"])
def test_ddp_other_variants(ranks, variant):
    for rank, r in enumerate(r["ddp_other_variants"] for r in ranks):
        assert r[variant] <= TOLERANCE, (rank, variant, r[variant])


@pytest.mark.slow
def test_accelerate_gradient_accumulation(ranks):
    for rank, r in enumerate(r["accelerate"] for r in ranks):
        assert r["wrapper"] == "DistributedDataParallel" and r["find_unused_parameters"] is False
        assert len(r["steps"]) == STEPS
        assert max(r["steps"]) <= TOLERANCE, (rank, r["steps"])
        assert r["params_after"] <= TOLERANCE, (rank, r["params_after"])


@pytest.mark.slow
@needs_fsdp2_on_cpu
def test_fsdp2_with_a_unit_per_block(ranks):
    for rank, r in enumerate(r["fsdp_blocks"] for r in ranks):
        whole_layers = [f"{name} whole layers" for name in ("opt-125m", "bart", "llama")]
        for name in [*FSDP_FAMILIES, "opt-125m compile_blocks", *whole_layers]:
            assert r[name]["units"] > 0 and r[name]["resharded_after_forward"], (rank, name)
            assert max(r[name]["steps"]) <= TOLERANCE, (rank, name, r[name]["steps"])
        # the compiled case compiled its blocks (the eager cases before it compiled nothing)
        assert r["opt-125m"]["frames_compiled"] == 0 < r["opt-125m compile_blocks"]["frames_compiled"], rank
        # the tiny OPT has 2 layers; BART 2 encoder and 2 decoder layers
        assert r["opt-125m whole layers"]["units"] == 2 and r["bart whole layers"]["units"] == 4, rank
        assert "FSDP unit" in r["vanilla_error"] and "plain autograd cannot train it" in r["vanilla_error"]
        assert r["eval_logits_difference"] <= 1e-5, (rank, r["eval_logits_difference"])


@pytest.mark.slow
@needs_fsdp2_on_cpu
def test_fsdp2_gradients_equal_the_single_process_gradient(ranks):
    for rank, r in enumerate(r["fsdp"] for r in ranks):
        assert r["sharded"] and r["frozen_without_grad"]
        assert max(r["steps"]) <= TOLERANCE, (rank, r["steps"])
        assert r["params_after"] <= TOLERANCE, (rank, r["params_after"])


# ------------------------------------------------------- benchmarks/distributed.py, run by torchrun

# byte-level tokens need 260 ids; a small vocabulary lets the layers, not the embeddings, hold most
# weights, so the memory checks below compare figures far apart; with 6 layers, an all-gather
# buffer or two that a rank still holds mid-step (gloo's timing decides) cannot close the gap
TINY_OPT = {
    "hidden_size": 64, "num_attention_heads": 4, "ffn_dim": 256, "num_hidden_layers": 6, "word_embed_proj_dim": 64,
    "max_position_embeddings": 64, "vocab_size": 260,
}
ENGINES = ("ddp", "fsdp", "fsdp-blocks", "fsdp-layers") if FSDP2_ON_CPU else ("ddp",)


@pytest.mark.slow
def test_distributed_benchmark_script(tmp_path):
    """The GPU benchmark's own code path, on 2 CPU processes: every engine (DDP only where FSDP2
    cannot run on the CPU), both methods, float32."""
    out = tmp_path / "result.json"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(WORLD_SIZE),
        "--master-port", str(_free_port()), str(ROOT / "benchmarks" / "distributed.py"),
        "--engine", *ENGINES, "--method", "meft3", "lora", "--shape", "opt-125m",
        "--config-overrides", json.dumps(TINY_OPT), "--dtype", "fp32", "--steps", "6", "--batch", "2", "--seq", "16",
        "--lr", "1e-2", "--data-dir", str(SHARED_DATA), "--out", str(out),
        "--work-dir", str(tmp_path / "work"),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(command, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["environment"]["world_size"] == WORLD_SIZE and result["environment"]["backend"] == "gloo"
    runs = {(r["engine"], r["method"]): r for r in result["runs"]}
    assert set(runs) == {(e, m) for e in ENGINES for m in ("meft3", "lora")}
    for key, r in runs.items():
        check = r["gradient_check"]
        assert check["passed"] and check["max_relative_difference"] <= 1e-5, (key, check)
        assert check["without_gradient"] == 0 and check["zero_reference_but_nonzero"] == 0
        assert len(r["losses"]) == 6 and not r["non_finite_steps"]
        assert r["loss_last_mean"] < r["loss_first_mean"], (key, r["losses"])
        assert r["tokens_per_second"] > 0 and len(r["per_rank"]) == WORLD_SIZE
        assert all(len(m["step_ms"]) == 6 and min(m["step_ms"]) > 0 for m in r["per_rank"])
    # MEFT3 trains only its adapters: 2 per layer, each d·r + r + r·d + d
    d, r, layers = TINY_OPT["hidden_size"], 8, TINY_OPT["num_hidden_layers"]
    assert runs["ddp", "meft3"]["trainable_parameters"] == layers * 2 * (2 * d * r + r + d)
    if FSDP2_ON_CPU:
        _check_fsdp_runs(runs)


def _check_fsdp_runs(runs: dict) -> None:
    # memory on the CPU, per rank (live tensor storages, the data's tokens included): at rest FSDP
    # keeps half of the float32 weights and DDP also its gradient bucket (one float32 copy of the
    # trainable weights); mid-step, the whole-model unit holds every gathered weight, units per
    # block or per layer only their root's
    memory = {key: r["per_rank"][0] for key, r in runs.items()}
    for method in ("meft3", "lora"):
        model_gib = runs["ddp", method]["parameters"] * 4 / 2**30
        expected_saving = (runs["ddp", method]["parameters"] / 2 + runs["ddp", method]["trainable_parameters"]) * 4 / 2**30
        for engine in ("fsdp", "fsdp-blocks", "fsdp-layers"):
            saved = memory["ddp", method]["static_gib"] - memory[engine, method]["static_gib"]
            assert abs(saved - expected_saving) < 0.05 * model_gib, (method, engine, saved, expected_saving)
        # one unit gathers every weight in float32
        whole = memory["fsdp", method]["gathered_parameters_gib"]
        assert whole == pytest.approx(model_gib, rel=1e-6), (method, whole, model_gib)
        for engine in ("fsdp-blocks", "fsdp-layers"):
            # the root gathers all but the units' weights (embeddings, head, final norm, and
            # with block units the adapters), which stay sharded
            unit_gib = runs[engine, method]["parameters_in_block_units"] * 4 / 2**30
            gathered = memory[engine, method]["gathered_parameters_gib"]
            assert gathered == pytest.approx(whole - unit_gib, rel=1e-6), (method, engine, gathered, whole, unit_gib)
            # mid-step, the units' weights are not held (a buffer of the root's would sit in both)
            mid_step, whole_mid_step = memory[engine, method]["activation_gib"], memory["fsdp", method]["activation_gib"]
            assert whole_mid_step - mid_step > 0.5 * unit_gib, (method, engine, mid_step, whole_mid_step, unit_gib)
    # the engines differ only in how they reduce: the same data and seeds give the same losses
    for method in ("meft3", "lora"):
        for engine in ("fsdp", "fsdp-blocks", "fsdp-layers"):
            assert runs["ddp", method]["losses"] == pytest.approx(runs[engine, method]["losses"], rel=1e-6)
