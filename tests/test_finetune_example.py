"""examples/finetune_glue.py: GLUE parsing, the hashing tokenizer, and short runs of main()."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import transformers

from tests.conftest import needs_full_data, real_config
from tests.test_distributed import _free_port
from tests.test_training import GLUE, ROOT, example_module


@pytest.fixture(scope="module")
def example():
    return example_module()


# rows and label counts as listed in the data's README
@pytest.mark.parametrize(
    "task,folder,rows,label_counts",
    [
        ("rte", "RTE", 2490, {0: 1249, 1: 1241}),  # 0 = entailment
        ("mrpc", "MRPC", 3668, {1: 2474, 0: 1194}),  # the files start with a byte-order mark
        ("sst2", "SST-2", 67349, {1: 37569, 0: 29780}),
        ("stsb", "STS-B", 5749, None),
    ],
)
@needs_full_data
def test_read_glue_reads_every_row(example, task, folder, rows, label_counts):
    examples = example.read_glue(GLUE / folder, task, "train")
    assert len(examples) == rows
    if label_counts is None:
        scores = [e.label for e in examples]
        assert min(scores) == 0.0 and max(scores) == 5.0
    else:
        assert {label: sum(e.label == label for e in examples) for label in label_counts} == label_counts
    # quotes stay inside their field: no row swallowed the next one
    assert max(len(t) for e in examples for t in e.texts) < 2000


def test_read_glue_rejects_another_tasks_file(example):
    with pytest.raises(ValueError, match="no column 'sentence1'.*is it rte's file"):
        example.read_glue(GLUE / "SST-2", "rte", "dev")


def test_hashing_tokenizer(example):
    config = real_config("opt-125m")  # pad 1, bos 2, eos 2, vocabulary 50272
    tokenizer = example.HashingTokenizer(config)
    encoded = tokenizer("A man is playing.", "Nobody plays", max_length=64)
    ids = encoded["input_ids"]
    assert len(ids) == 10 and ids[0] == ids[6] == ids[9] == 2  # start, "a man is playing .", separator, ...
    assert all(1000 <= i < 50272 for i in ids[1:6] + ids[7:9])
    assert encoded["token_type_ids"] == [0] * 7 + [1] * 3
    assert tokenizer("a MAN")["input_ids"][1:3] == ids[1:3]  # lower-cased, the same ids every run
    assert len(tokenizer("word " * 100, max_length=16)["input_ids"]) == 16
    bert = example.HashingTokenizer(real_config("bert-base-uncased"))  # pad 0 only: start and separator are picked
    assert (bert.pad_token_id, bert.start_id, bert.sep_id) == (0, 1, 2)


def run(example, tmp_path, *arguments: str) -> tuple[int, dict]:
    log = tmp_path / "log.json"
    code = example.main([*arguments, "--log-json", str(log), "--output-dir", str(tmp_path / "run")])
    return code, json.loads(log.read_text())


@pytest.mark.slow
def test_finetunes_a_converted_model(example, converted, tmp_path):
    folder = converted("minilm", "meft3")[0]
    code, log = run(
        example, tmp_path, "--model", str(folder), "--data-dir", str(GLUE / "MRPC"), "--task", "mrpc",
        "--max-steps", "3", "--batch-size", "4", "--seq-len", "32", "--max-train-samples", "12", "--max-eval-samples", "8",
    )
    assert code == 0 and log["error"] is None and log["non_finite"] is None
    assert log["steps_run"] == 3 and log["trainable_params"] == 79_202
    losses = [e["loss"] for e in log["history"] if "loss" in e]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert {"eval_loss", "eval_accuracy", "eval_f1"} <= set(log["eval_after"])
    # the trained adapters, saved on their own, load back onto the converted base
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        folder, trust_remote_code=True, num_labels=2, adapters=log["adapters_dir"]
    )
    assert model.config.id2label == {0: "0", 1: "1"}


@pytest.mark.slow
@pytest.mark.parametrize("config_name", ["opt-125m", "bert-base-uncased"])
def test_trains_a_model_built_from_a_config_in_bf16(example, config_name, tmp_path):
    config_file = tmp_path / "config.json"
    real_config(config_name).to_json_file(config_file)  # the real config at tiny sizes
    code, log = run(
        example, tmp_path, "--from-config", str(config_file), "--data-dir", str(GLUE / "RTE"), "--bf16",
        "--max-steps", "3", "--batch-size", "4", "--seq-len", "24", "--max-train-samples", "12", "--max-eval-samples", "8",
        "--eval-train-samples", "8",
    )
    assert code == 0 and log["bf16"] and log["variant"] == "meft3"
    assert math.isfinite(log["train_eval_before"]["train_eval_loss"]) and math.isfinite(log["train_eval_after"]["train_eval_loss"])
    losses = [e["loss"] for e in log["history"] if "loss" in e]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert math.isfinite(log["eval_after"]["eval_loss"])


def test_a_diverging_run_exits_with_1(example, tmp_path):
    config_file = tmp_path / "config.json"
    real_config("bert-base-uncased").to_json_file(config_file)
    code, log = run(
        example, tmp_path, "--from-config", str(config_file), "--data-dir", str(GLUE / "RTE"), "--no-verify",
        "--lr", "1e30", "--max-steps", "4", "--batch-size", "2", "--seq-len", "16", "--max-train-samples", "8",
        "--max-eval-samples", "2",
    )
    assert code == 1
    assert log["steps_run"] < 4 and (log["non_finite"] is not None or "NaN, inf" in log["error"])
    assert log["adapters_dir"] is None


def test_bad_usage_exits_with_2(example, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        example.main(["--model", "x", "--data-dir", str(tmp_path)])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        example.main(["--model", "x", "--data-dir", str(GLUE / "RTE"), "--max-steps", "0"])
    assert exit_info.value.code == 2
    torch.manual_seed(0)  # nothing above touched the global RNG state in a way later tests see


@pytest.mark.slow
def test_runs_under_torchrun_with_two_processes(tmp_path, session_dir):
    """The Trainer's DDP on 2 CPU processes (gloo): one log and one adapters folder, written by rank 0."""
    config_file = tmp_path / "config.json"
    real_config("opt-125m").to_json_file(config_file)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
        str(ROOT / "examples" / "finetune_glue.py"), "--from-config", str(config_file), "--data-dir", str(GLUE / "RTE"), "--no-verify",
        "--max-steps", "3", "--batch-size", "2", "--seq-len", "16", "--max-train-samples", "12",
        "--max-eval-samples", "4", "--output-dir", str(tmp_path / "run"), "--log-json", str(tmp_path / "log.json"),
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    log = json.loads((tmp_path / "log.json").read_text())
    assert log["world_size"] == 2 and log["steps_run"] == 3
    losses = [e["loss"] for e in log["history"] if "loss" in e]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert sorted(p.name for p in (tmp_path / "run" / "adapters").iterdir()) == ["meft_adapters.json", "meft_adapters.safetensors"]
