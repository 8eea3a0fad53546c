"""benchmarks/glue.py: its data reading and metrics, and one tiny end-to-end run on the CPU."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import SHARED_DATA, needs_full_data

ROOT = Path(__file__).resolve().parent.parent
DATA = SHARED_DATA / "glue"

_spec = importlib.util.spec_from_file_location("glue_benchmark", ROOT / "benchmarks" / "glue.py")
glue = importlib.util.module_from_spec(_spec)
sys.modules["glue_benchmark"] = glue  # dataclasses look their module up by name
_spec.loader.exec_module(glue)



def test_spearman_with_ties_matches_the_definition():
    # ranks with ties averaged: x → 1, 2.5, 2.5, 4, 5; y → 2, 1, 3, 5, 4
    x, y = [1.0, 2.0, 2.0, 3.0, 7.0], [0.2, 0.1, 0.3, 0.9, 0.5]
    assert glue.ranks(x) == [1.0, 2.5, 2.5, 4.0, 5.0]
    rx, ry = [1, 2.5, 2.5, 4, 5], [2, 1, 3, 5, 4]
    mx, my = sum(rx) / 5, sum(ry) / 5
    expected = sum((a - mx) * (b - my) for a, b in zip(rx, ry)) / math.sqrt(
        sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)
    )
    assert glue.spearman(x, y) == pytest.approx(expected, abs=1e-12)
    assert glue.spearman(x, [-v for v in x]) == pytest.approx(-1.0)
    assert glue.spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]) == 0.0  # a collapsed regressor


def test_f1_and_accuracy():
    predictions, labels = [1, 1, 0, 0, 1], [1, 0, 0, 1, 1]
    # true positives 2, predicted positives 3, actual positives 3
    assert glue.f1_score(predictions, labels) == pytest.approx(2 * 2 / (3 + 3))
    assert glue.accuracy(predictions, labels) == pytest.approx(3 / 5)
    assert glue.f1_score([0, 0], [1, 1]) == 0.0


@needs_full_data
def test_reads_every_task_with_its_quirks():
    expected_rows = {"rte": (2490, 277), "mrpc": (3668, 408), "stsb": (5749, 1500), "sst2": (67349, 872)}
    for name, task in glue.TASKS.items():
        for split, rows in zip(("train", "dev"), expected_rows[name]):
            texts, labels = glue.read_tsv(DATA / task.folder / f"{split}.tsv", task)
            assert len(texts) == len(labels) == rows
            assert all(len(t) == len(task.text_columns) and all(t) for t in texts)
            if task.labels is None:
                assert 0.0 <= min(labels) and max(labels) <= 5.0
            else:
                assert set(labels) == {0.0, 1.0}
    # MRPC's byte-order mark is not part of its label column's name, and the first pair is a paraphrase
    texts, labels = glue.read_tsv(DATA / "MRPC" / "train.tsv", glue.TASKS["mrpc"])
    assert labels[0] == 1.0 and texts[0][0].startswith("Amrozi accused his brother")


def test_bad_input_is_named(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_text("sentence\tlabel\nfine\t1\nbroken\t7\n")
    with pytest.raises(ValueError, match=r"line 3: label '7'"):
        glue.read_tsv(path, glue.TASKS["sst2"])
    path.write_text("text\tlabel\nfine\t1\n")
    with pytest.raises(ValueError, match="no column 'sentence'"):
        glue.read_tsv(path, glue.TASKS["sst2"])
    with pytest.raises(FileNotFoundError, match="--data-dir"):
        glue.read_tsv(tmp_path / "missing.tsv", glue.TASKS["sst2"])


def test_subsample_is_fixed_and_documented_by_its_seed():
    first = glue.subsample(67349, 2500)
    assert first == glue.subsample(67349, 2500) and len(set(first)) == 2500
    assert first != glue.subsample(67349, 2500, seed=1)
    assert glue.subsample(100, 2500) == list(range(100))


def test_summary_picks_the_learning_rate_with_the_best_mean():
    runs = [
        {"task": "rte", "method": "full", "lr": lr, "seed": seed, "status": "ok", "metric": metric}
        for lr, seed, metric in [(1e-4, 0, 0.60), (1e-4, 1, 0.70), (2e-5, 0, 0.64), (2e-5, 1, 0.64)]
    ] + [{"task": "rte", "method": "full", "lr": 5e-5, "seed": 0, "status": "failed", "error": "x"}]
    cell = glue.summarise(runs)["rte"]["full"]
    assert cell["best_lr"] == 1e-4 and cell["seeds"] == 2
    assert cell["mean"] == pytest.approx(65.0) and cell["std"] == pytest.approx(math.sqrt(50.0))
    assert set(cell["by_lr"]) == {"0.0001", "2e-05"}


@pytest.mark.slow
def test_runs_end_to_end_on_a_tiny_subset(tmp_path, minilm, session_dir):
    out = tmp_path / "glue"
    command = [
        sys.executable, str(ROOT / "benchmarks" / "glue.py"),
        "--data-dir", str(DATA), "--model", str(minilm), "--out", str(out),
        "--tasks", "sst2", "stsb", "--methods", "lora", "meft3", "--seeds", "0", "--lrs", "1e-3",
        "--max-steps", "2", "--batch-size", "4", "--max-train-examples", "8", "--max-eval-examples", "16",
        "--workers", "0", "--device", "cpu",
    ]  # fmt: skip
    # one thread: batches of 4 short sentences gain nothing from more, and on a busy machine
    # threads that wait for each other make the run ten times slower
    env = dict(os.environ, HF_MODULES_CACHE=str(session_dir / "glue-modules"), OMP_NUM_THREADS="1")
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    results = json.loads((out / "glue.json").read_text())
    runs = results["runs"]
    assert [(r["task"], r["method"]) for r in runs] == [("sst2", "lora"), ("sst2", "meft3"), ("stsb", "lora"), ("stsb", "meft3")]
    for run in runs:
        assert run["status"] == "ok", run.get("traceback")
        assert run["steps"] == 2 and run["lr"] == 1e-3 and run["seed"] == 0
        assert math.isfinite(run["final_loss"]) and run["seconds"] > 0 and run["device"] == "cpu"
        if run["task"] == "stsb":
            assert -1.0 <= run["metrics"]["spearman"] <= 1.0 and -1.0 <= run["metrics"]["pearson"] <= 1.0
        else:
            # 16 dev sentences: the accuracy is a whole number of 16ths
            assert 0.0 <= run["metric"] <= 1.0 and (16 * run["metric"]) == pytest.approx(round(16 * run["metric"]))
    trainable = {r["method"]: r["trainable_params"] for r in runs if r["task"] == "sst2"}
    # LoRA r=8 on query and value (6 layers × 2 × 8 × (384 + 384)) plus the classifier (384 × 2 + 2);
    # MEFT3: two adapters per layer (6 × 2 × (384 × 8 + 8 + 8 × 384 + 384)) plus the classifier
    assert trainable == {"lora": 6 * 2 * 8 * 768 + 770, "meft3": 6 * 2 * (2 * 384 * 8 + 8 + 384) + 770}
    assert results["settings"]["train_examples"] == {"sst2": 8, "stsb": 8}

    table = (out / "glue.md").read_text()
    assert "| lora | " in table and "| meft3 | " in table and "Runs: 4 finished, 0 failed, 0 not started." in table
    assert (out / "glue.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the report is rebuilt from the JSON alone
    (out / "glue.md").unlink()
    (out / "glue.png").unlink()
    assert glue.main(["--report", str(out)]) == 0
    assert (out / "glue.md").read_text() == table and (out / "glue.png").is_file()

    # a resumed command keeps the finished runs and runs only what is missing: here nothing
    resumed = tmp_path / "resumed"
    again = [*command[2:command.index("--out")], "--out", str(resumed), *command[command.index("--out") + 2 :]]
    assert glue.main([*again, "--resume", str(out / "glue.json"), "--compile"]) == 0
    resumed_results = json.loads((resumed / "glue.json").read_text())
    assert resumed_results["runs"] == runs
    assert [c["command"] for c in resumed_results["earlier_commands"]] == [results["command"]]
    # runs of another budget are not mixed in
    longer = [*again, "--epochs", "5", "--out", str(tmp_path / "other"), "--resume", str(out / "glue.json")]
    with pytest.raises(SystemExit, match="other --epochs"):
        glue.main(longer)


def test_plan_counts_the_runs(capsys):
    assert glue.main(["--plan", "--data-dir", str(DATA), "--tasks", "rte", "--methods", "full", "meft1", "--seeds", "0", "1"]) == 0
    printed = capsys.readouterr().out
    # two methods × three learning rates × two seeds
    assert "12 runs" in printed and "2 conversions" in printed


def test_float_tensors_go_to_float16_and_back(tmp_path, minilm):
    from safetensors.torch import load_file

    glue.export_model(minilm, tmp_path / "half")
    half = load_file(tmp_path / "half" / "model.safetensors")
    original = load_file(minilm / "model.safetensors")
    assert {k: t.dtype for k, t in half.items() if t.is_floating_point()} == {
        k: torch.float16 for k, t in original.items() if t.is_floating_point()
    }
    source = glue.prepare_source(tmp_path / "half", tmp_path / "work")
    widened = load_file(source / "model.safetensors")
    for key, tensor in original.items():
        assert widened[key].dtype == tensor.dtype
        if tensor.is_floating_point():
            # within fp16's rounding, relative 2^-11, except values in fp16's subnormal range
            limit = tensor.abs() * 2.0**-11 + 2.0**-24
            assert bool(((widened[key] - tensor).abs() <= limit).all()), key
        else:
            assert torch.equal(widened[key], tensor)
    assert glue.prepare_source(minilm, tmp_path / "work2") == minilm  # float32 already: used as it is


def test_regression_targets_are_standardized_and_the_metrics_do_not_change(minilm):
    tokens = glue.tokenize_task("stsb", DATA, minilm, max_train=64, max_eval=32)
    train = torch.tensor(tokens["train"]["labels"], dtype=torch.float64)
    assert abs(train.mean().item()) < 1e-12 and abs(train.std(unbiased=False).item() - 1.0) < 1e-12
    scale = tokens["target_scale"]
    _, raw_dev = glue.read_tsv(DATA / "STS-B" / "dev.tsv", glue.TASKS["stsb"])
    raw_dev = [raw_dev[i] for i in glue.subsample(len(raw_dev), 32)]
    dev = tokens["dev"]["labels"]
    assert max(abs(d * scale["std"] + scale["mean"] - r) for d, r in zip(dev, raw_dev)) < 1e-12
    # Spearman and Pearson of predictions against standardized targets equal those against raw ones
    predictions = [[0.3 * r + (i % 5) * 0.1] for i, r in enumerate(raw_dev)]
    standardized = glue.task_metrics(glue.TASKS["stsb"], predictions, dev)
    raw = glue.task_metrics(glue.TASKS["stsb"], predictions, raw_dev)
    assert standardized["spearman"] == pytest.approx(raw["spearman"], abs=1e-12)
    assert standardized["pearson"] == pytest.approx(raw["pearson"], abs=1e-12)
    # classification labels stay class indices
    assert set(glue.tokenize_task("rte", DATA, minilm, max_train=16, max_eval=8)["train"]["labels"]) <= {0.0, 1.0}


def test_a_run_on_cpu_uses_one_device():
    assert glue.run_devices("cpu") == ["cpu"]
    assert glue.run_devices("cuda:1") == ["cuda:1"]
