"""Fine-tune a MEFT model on a GLUE task with the transformers Trainer.

A converted checkpoint (the output of `meft-convert`):

    python examples/finetune_glue.py --model all-MiniLM-L6-v2-meft3 --task rte \\
        --data-dir ../shared/data/glue/RTE --max-steps 300 --output-dir runs/rte

A model of a given shape with random weights, built from a config.json and converted here with
meft_convert's Python API (to check that training runs at full size, e.g. on a GPU):

    python examples/finetune_glue.py --from-config tests/data/configs/opt-125m.json --task rte \\
        --data-dir ../shared/data/glue/RTE --bf16 --max-steps 200 --log-json opt-125m-rte.json

On several GPUs the Trainer runs DistributedDataParallel when started with torchrun (one
process per GPU; --batch-size is per GPU; the main process writes the log and the adapters):

    torchrun --nproc-per-node 2 examples/finetune_glue.py --from-config tests/data/configs/opt-125m.json \
        --task rte --data-dir ../shared/data/glue/RTE --bf16 --max-steps 200 --log-json opt-125m-ddp.json

The data folder holds the task's train.tsv and dev.tsv as GLUE distributes them (split on tabs
only; MRPC's files start with a byte-order mark; CoLA's have no header).

Tokenizer: a converted checkpoint's own. A model built from a config has random weights, so
its token ids mean nothing yet and any fixed map from words to ids serves: unless --tokenizer
names one, words are hashed into the config's vocabulary (HashingTokenizer), which needs no
vocabulary file and works for every family.

The run logs the loss every --logging-steps steps, evaluates on the dev set before and after
training, saves the trained adapters (save_pretrained(..., adapters_only=True)) under
--output-dir and writes everything to --log-json. It exits with 1 if the loss or the gradient
norm becomes NaN or infinite (or the model reports values out of its range), 2 on bad usage.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import math
import re
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------ data


@dataclass(frozen=True)
class Task:
    text_columns: tuple[str, ...]  # one sentence or a pair
    label_column: str
    labels: tuple[str, ...] | None  # None: regression (STS-B)
    metric: str
    header: bool = True


TASKS = {
    "rte": Task(("sentence1", "sentence2"), "label", ("entailment", "not_entailment"), "accuracy"),
    "mrpc": Task(("#1 String", "#2 String"), "Quality", ("0", "1"), "f1"),
    "sst2": Task(("sentence",), "label", ("0", "1"), "accuracy"),
    "stsb": Task(("sentence1", "sentence2"), "score", None, "pearson"),
    # GLUE's CoLA files have no header: source, label, original label, sentence
    "cola": Task(("3",), "1", ("0", "1"), "matthews", header=False),
}


@dataclass(frozen=True)
class Example:
    texts: tuple[str, ...]
    label: int | float


def read_glue(data_dir: Path, task: str, split: str) -> list[Example]:
    """Rows of `<data_dir>/<split>.tsv`. Fields are split on tabs only: GLUE's sentences hold
    unbalanced quotes that a CSV reader would join across lines."""
    spec = TASKS[task]
    path = Path(data_dir) / f"{split}.tsv"
    lines = path.read_text(encoding="utf-8-sig").splitlines()  # utf-8-sig: MRPC's byte-order mark
    if spec.header:
        header, rows = lines[0].split("\t"), lines[1:]
        missing = [c for c in (*spec.text_columns, spec.label_column) if c not in header]
        if missing:
            raise ValueError(f"{path} has no column {missing[0]!r} (columns: {', '.join(header)}); is it {task}'s file?")
        columns = [header.index(c) for c in spec.text_columns], header.index(spec.label_column)
    else:
        rows = lines
        columns = [int(c) for c in spec.text_columns], int(spec.label_column)
    examples = []
    for number, line in enumerate(rows, start=2 if spec.header else 1):
        if not line:
            continue
        fields = line.split("\t")
        if len(fields) <= max(*columns[0], columns[1]):
            raise ValueError(f"{path}:{number} has {len(fields)} fields, fewer than {task} needs")
        raw_label = fields[columns[1]]
        if spec.labels is None:
            label: int | float = float(raw_label)
        elif raw_label in spec.labels:
            label = spec.labels.index(raw_label)
        else:
            raise ValueError(f"{path}:{number}: label {raw_label!r} is not one of {', '.join(spec.labels)}")
        examples.append(Example(tuple(fields[i].strip() for i in columns[0]), label))
    if not examples:
        raise ValueError(f"{path} holds no examples")
    return examples


class HashingTokenizer:
    """Lower-cased words and punctuation → ids by CRC-32, for models with random weights.

    Ids below `reserved` are kept for the special tokens (the config's pad, bos and eos ids
    where it has them); every word maps to one id in [reserved, vocab_size)."""

    def __init__(self, config, reserved: int = 1000):
        if config.vocab_size <= reserved:
            raise ValueError(f"vocab_size {config.vocab_size} leaves no ids for words above the {reserved} reserved ones")
        self.vocab_size, self.reserved = config.vocab_size, reserved
        taken = [i for i in (config.pad_token_id, config.bos_token_id, config.eos_token_id) if i is not None]
        free = iter(i for i in range(reserved) if i not in taken)
        self.pad_token_id = config.pad_token_id if config.pad_token_id is not None else next(free)
        self.start_id = config.bos_token_id if config.bos_token_id is not None else next(free)
        self.sep_id = config.eos_token_id if config.eos_token_id is not None else next(free)

    def word_ids(self, text: str) -> list[int]:
        words = re.findall(r"\w+|[^\w\s]", text.lower())
        return [self.reserved + zlib.crc32(w.encode()) % (self.vocab_size - self.reserved) for w in words]

    def __call__(self, *texts: str, truncation: bool = True, max_length: int = 128) -> dict:
        ids, type_ids = [self.start_id], [0]
        for segment, text in enumerate(texts):
            words = self.word_ids(text) + [self.sep_id]
            ids += words
            type_ids += [segment] * len(words)
        return {"input_ids": ids[:max_length], "token_type_ids": type_ids[:max_length]}


def encode(examples: list[Example], tokenizer, seq_len: int, with_type_ids: bool) -> list[dict]:
    features = []
    for example in examples:
        encoded = tokenizer(*example.texts, truncation=True, max_length=seq_len)
        feature = {"input_ids": list(encoded["input_ids"]), "labels": example.label}
        if with_type_ids:
            feature["token_type_ids"] = list(encoded.get("token_type_ids") or [0] * len(feature["input_ids"]))
        features.append(feature)
    return features


class Collator:
    """Pads a batch to its longest row (on the right: decoder classifiers read the last
    non-pad token) and builds the attention mask."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict]) -> dict:
        length = max(len(f["input_ids"]) for f in features)
        batch = {
            "input_ids": torch.full((len(features), length), self.pad_token_id, dtype=torch.long),
            "attention_mask": torch.zeros(len(features), length, dtype=torch.long),
        }
        if "token_type_ids" in features[0]:
            batch["token_type_ids"] = torch.zeros(len(features), length, dtype=torch.long)
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            batch["input_ids"][row, :n] = torch.tensor(f["input_ids"])
            batch["attention_mask"][row, :n] = 1
            if "token_type_ids" in batch:
                batch["token_type_ids"][row, :n] = torch.tensor(f["token_type_ids"])
        labels = [f["labels"] for f in features]
        batch["labels"] = torch.tensor(labels, dtype=torch.float32 if isinstance(labels[0], float) else torch.long)
        return batch


def metrics_for(task: str):
    spec = TASKS[task]

    def compute(prediction: transformers.EvalPrediction) -> dict:
        logits = torch.as_tensor(prediction.predictions).float()
        labels = torch.as_tensor(prediction.label_ids)
        if spec.labels is None:
            scores = torch.stack([logits.reshape(-1), labels.float()])
            return {"pearson": float(torch.corrcoef(scores)[0, 1])}
        predicted = logits.argmax(-1)
        result = {"accuracy": float((predicted == labels).float().mean())}
        tp = int(((predicted == 1) & (labels == 1)).sum())
        fp, fn = int(((predicted == 1) & (labels == 0)).sum()), int(((predicted == 0) & (labels == 1)).sum())
        tn = len(labels) - tp - fp - fn
        if spec.metric == "f1":
            result["f1"] = 2 * tp / max(2 * tp + fp + fn, 1)
        if spec.metric == "matthews":
            denominator = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
            result["matthews"] = (tp * tn - fp * fn) / denominator if denominator else 0.0
        return result

    return compute


# ----------------------------------------------------------------------------------- model


def _converter():
    """meft_convert's convert(); from this source checkout when the package is not installed
    (the checkout's templates/ is the package meft_convert.templates, as pyproject.toml maps it)."""
    try:
        from meft_convert.convert import ConvertOptions, convert
    except ModuleNotFoundError:
        sys.path.insert(0, str(ROOT))
        spec = importlib.util.spec_from_file_location(
            "meft_convert.templates", ROOT / "templates" / "__init__.py", submodule_search_locations=[str(ROOT / "templates")]
        )
        templates = importlib.util.module_from_spec(spec)
        sys.modules["meft_convert.templates"] = templates
        spec.loader.exec_module(templates)
        from meft_convert.convert import ConvertOptions, convert
    return ConvertOptions, convert


def convert_from_config(config_path: Path, folder: Path, variant: str, num_labels: int, seed: int, verify: bool) -> Path:
    """Builds the base model of `config_path` with random weights, saves it and converts it."""
    values = json.loads(Path(config_path).read_text())
    values.pop("_name_or_path", None)
    if "model_type" not in values:
        raise ValueError(f"{config_path} has no model_type; is it a transformers config.json?")
    config = transformers.AutoConfig.for_model(values.pop("model_type"), **values)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        plm = transformers.AutoModel.from_config(config)
    plm.save_pretrained(folder / "plm")
    del plm
    ConvertOptions, convert = _converter()
    options = ConvertOptions(
        model=str(folder / "plm"),
        output=folder / f"meft-{variant}",
        variant=variant,
        task="sequence-classification",
        num_labels=num_labels,
        seed=seed,
        verify=verify,
        show_progress=False,
    )
    return convert(options, log=lambda line: print(line, flush=True))


class NonFiniteLoss(RuntimeError):
    pass


class RunLog(transformers.TrainerCallback):
    """Keeps every log line; stops training at the first NaN or infinite loss or gradient norm
    (the Trainer's logging_nan_inf_filter would otherwise hide it)."""

    def __init__(self):
        self.history: list[dict] = []
        self.non_finite: dict | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        entry = {"step": state.global_step, **(logs or {})}
        self.history.append(entry)
        for key in ("loss", "grad_norm", "eval_loss"):
            value = entry.get(key)
            if isinstance(value, float) and not math.isfinite(value) and self.non_finite is None:
                self.non_finite = entry
                control.should_training_stop = True


def mean_of_window(losses: list[float], first: bool) -> float | None:
    if not losses:
        return None
    window = max(1, len(losses) // 10)
    part = losses[:window] if first else losses[-window:]
    return sum(part) / len(part)


def _loss(metrics: dict | None, prefix: str) -> float | None:
    return None if metrics is None else metrics[f"{prefix}_loss"]


# ------------------------------------------------------------------------------------- run


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a converted MEFT folder (the output of meft-convert)")
    source.add_argument("--from-config", type=Path, help="a transformers config.json: random weights, converted here")
    parser.add_argument("--data-dir", type=Path, required=True, help="folder with the task's train.tsv and dev.tsv")
    parser.add_argument("--task", choices=sorted(TASKS), default="rte")
    parser.add_argument("--variant", choices=("meft1", "meft2", "meft3"), default="meft3", help="with --from-config")
    parser.add_argument("--no-verify", action="store_true", help="with --from-config: skip the converter's checks")
    parser.add_argument("--tokenizer", help="a tokenizer folder or id (default: the model's, or hashing for --from-config)")
    parser.add_argument("--output-dir", type=Path, help="Trainer output and the saved adapters (default: a temporary folder)")
    parser.add_argument("--log-json", type=Path, help="write the run's log here")
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--gradient-accumulation-steps", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-3, help="adapters train with larger rates than full fine-tuning")
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--warmup-steps", type=int, default=0)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--seq-len", type=int, default=128, help="longest tokenised pair; longer ones are truncated")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (the Trainer's bf16=True)")
    parser.add_argument("--max-train-samples", type=int, help="use only the first N training rows")
    parser.add_argument("--max-eval-samples", type=int, help="evaluate on the first N dev rows only")
    parser.add_argument(
        "--eval-train-samples", type=int, default=0,
        help="also evaluate on the first N training rows before and after training (how well the run fits)",
    )
    parser.add_argument("--logging-steps", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("max_steps", "batch_size", "gradient_accumulation_steps", "seq_len", "logging_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if not (args.data_dir / "train.tsv").is_file():
        parser.error(f"{args.data_dir} has no train.tsv")
    if args.from_config is not None and not args.from_config.is_file():
        parser.error(f"{args.from_config} is not a file")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.time()
    spec = TASKS[args.task]
    num_labels = 1 if spec.labels is None else len(spec.labels)
    with tempfile.TemporaryDirectory(prefix="meft-finetune-") as scratch:
        scratch = Path(scratch)
        output_dir = args.output_dir or scratch / "run"
        if args.from_config is not None:
            model_path = convert_from_config(
                args.from_config, scratch, args.variant, num_labels, args.seed, verify=not args.no_verify
            )
        else:
            model_path = Path(args.model)
        labels = {} if spec.labels is None else {
            "id2label": dict(enumerate(spec.labels)),
            "label2id": {label: i for i, label in enumerate(spec.labels)},
        }
        transformers.set_seed(args.seed)  # the new task head's initialisation
        # float32 weights whatever the checkpoint holds (OPT's are float16): the optimizer
        # updates them in float32, and --bf16 runs the computation under autocast
        model = transformers.AutoModelForSequenceClassification.from_pretrained(
            model_path, trust_remote_code=True, num_labels=num_labels, dtype=torch.float32, **labels
        )
        if args.tokenizer is None and args.from_config is not None:
            tokenizer = HashingTokenizer(model.config)
        else:
            tokenizer = transformers.AutoTokenizer.from_pretrained(args.tokenizer or model_path)
        pad_token_id = tokenizer.pad_token_id
        if pad_token_id is None:
            pad_token_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
        # decoder classifiers find each row's last token through the pad id
        model.config.pad_token_id = pad_token_id
        with_type_ids = "token_type_ids" in inspect.signature(model.forward).parameters

        train = read_glue(args.data_dir, args.task, "train")[: args.max_train_samples]
        dev = read_glue(args.data_dir, args.task, "dev")[: args.max_eval_samples] if (args.data_dir / "dev.tsv").is_file() else []
        train_features = encode(train, tokenizer, args.seq_len, with_type_ids)
        dev_features = encode(dev, tokenizer, args.seq_len, with_type_ids)

        trainable, total = model.get_nb_trainable_parameters()
        model.print_trainable_parameters()
        training_args = transformers.TrainingArguments(
            output_dir=str(output_dir),
            max_steps=args.max_steps,
            per_device_train_batch_size=args.batch_size,
            per_device_eval_batch_size=args.batch_size,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            learning_rate=args.lr,
            weight_decay=args.weight_decay,
            warmup_steps=args.warmup_steps,
            max_grad_norm=args.max_grad_norm,
            bf16=args.bf16,
            use_cpu=not torch.cuda.is_available(),  # bf16 on the CPU too (autocast)
            logging_steps=args.logging_steps,
            logging_nan_inf_filter=False,
            eval_strategy="no",
            save_strategy="no",
            report_to="none",
            seed=args.seed,
            dataloader_num_workers=0,
            dataloader_pin_memory=torch.cuda.is_available(),
            remove_unused_columns=False,
            disable_tqdm=True,
        )
        run_log = RunLog()
        trainer = transformers.Trainer(
            model=model,
            args=training_args,
            train_dataset=train_features,
            eval_dataset=dev_features or None,
            data_collator=Collator(pad_token_id),
            compute_metrics=metrics_for(args.task),
            callbacks=[run_log],
        )
        fit_features = train_features[: args.eval_train_samples]
        eval_before = trainer.evaluate() if dev_features else None
        fit_before = trainer.evaluate(fit_features, metric_key_prefix="train_eval") if fit_features else None
        error = None
        try:
            trainer.train()
        except FloatingPointError as e:  # the engine's range check: NaN, inf or overflow in a layer
            error = str(e)
        finished = error is None and run_log.non_finite is None
        eval_after = trainer.evaluate() if dev_features and finished else None
        fit_after = trainer.evaluate(fit_features, metric_key_prefix="train_eval") if fit_features and finished else None
        adapters_dir = output_dir / "adapters"
        main_process = trainer.is_world_process_zero()  # under torchrun, one process writes
        if finished and main_process:
            model.save_pretrained(adapters_dir, adapters_only=True)

    losses = [e["loss"] for e in run_log.history if "loss" in e]
    failed = error is not None or run_log.non_finite is not None
    summary = {
        "task": args.task,
        "model": args.model,
        "from_config": str(args.from_config) if args.from_config else None,
        "variant": model.config.variant,
        "device": str(model.device) + (f" ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else ""),
        "bf16": args.bf16,
        "world_size": training_args.world_size,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "arguments": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "train_examples": len(train_features),
        "eval_examples": len(dev_features),
        "trainable_params": trainable,
        "all_params": total,
        "steps_run": trainer.state.global_step,
        "loss_first": mean_of_window(losses, first=True),
        "loss_last": mean_of_window(losses, first=False),
        "eval_before": eval_before,
        "eval_after": eval_after,
        "train_eval_before": fit_before,
        "train_eval_after": fit_after,
        "non_finite": run_log.non_finite,
        "error": error,
        "adapters_dir": str(adapters_dir) if args.output_dir and not failed else None,
        "runtime_s": round(time.time() - started, 1),
        "history": run_log.history,
    }
    if args.log_json and main_process:
        args.log_json.parent.mkdir(parents=True, exist_ok=True)
        args.log_json.write_text(json.dumps(summary, indent=1) + "\n")
    print(
        f"loss: first {summary['loss_first']} -> last {summary['loss_last']} over {summary['steps_run']} steps; "
        f"dev loss {_loss(eval_before, 'eval')} -> {_loss(eval_after, 'eval')}; "
        f"loss on {len(fit_features)} training rows {_loss(fit_before, 'train_eval')} -> {_loss(fit_after, 'train_eval')}"
    )
    if failed:
        print(f"error: training stopped: {error or f'non-finite value logged: {run_log.non_finite}'}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
