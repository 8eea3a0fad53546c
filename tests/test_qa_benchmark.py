"""benchmarks/qa.py: its data, the scoring of each choice by log-likelihood on the real SmolLM2, and
one short run of every arm end to end on the CPU."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import transformers

from tests.conftest import needs_full_data

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
_spec = importlib.util.spec_from_file_location("qa_benchmark", ROOT / "benchmarks" / "qa.py")
qa = importlib.util.module_from_spec(_spec)
sys.modules["qa_benchmark"] = qa  # dataclasses look their module up by name
_spec.loader.exec_module(qa)


@needs_full_data
def test_piqa_is_split_once_and_for_all_into_train_and_test():
    rows = qa.read_piqa()
    assert len(rows) == 1838 and sum(r.label for r in rows) == 928
    train, test = qa.load_task("piqa")
    assert (len(train), len(test)) == (1338, 500)
    assert qa.load_task("piqa") == (train, test)  # the same split every time
    assert not set(train) & set(test)
    first = rows[0]
    assert first.prompt.startswith("Question: ") and first.prompt.endswith("\nAnswer:")
    assert all(c.startswith(" ") for c in first.choices)


@needs_full_data
def test_rte_and_sst2_become_two_choice_prompts_with_glues_labels():
    rte_train, rte_test = qa.load_task("rte")
    assert (len(rte_train), len(rte_test)) == (2490, 277)
    # GLUE's RTE label 0 is entailment: the first choice, " True"
    assert rte_test[0].choices == (" True", " False") and sum(e.label == 0 for e in rte_test) == 146
    sst_train, sst_test = qa.load_task("sst2")
    assert (len(sst_train), len(sst_test)) == (67349, 872)
    assert sst_test[0].choices == (" negative", " positive") and sum(e.label for e in sst_test) == 444


@pytest.fixture(scope="module")
def smol(smollm2):
    return (transformers.AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32),
            transformers.AutoTokenizer.from_pretrained(smollm2))


def test_a_choice_is_scored_by_the_log_probabilities_of_its_own_tokens(smol):
    model, tokenizer = smol
    examples = [qa.Example("Question: How do you boil an egg?\nAnswer:", (" Put it in boiling water.", " Freeze it."), 0),
                qa.Example("The film was a delight.\nQuestion: Is this review positive or negative?\nAnswer:",
                           (" negative", " positive"), 1)]
    scores = qa.choice_log_likelihoods(model, tokenizer, examples, batch=4, max_tokens=64, device="cpu")
    # each row alone, without padding, by hand
    for example, row in zip(examples, scores):
        for choice, score in zip(example.choices, row):
            ids, n = qa.encode(tokenizer, example.prompt, choice, 64)
            assert tokenizer.decode(ids[-n:]) == choice
            with torch.no_grad():
                log_probs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
            expected = sum(log_probs[len(ids) - n - 1 + k, ids[len(ids) - n + k]].item() for k in range(n))
            assert score == pytest.approx(expected, abs=1e-4)  # padded batch against a lone row
    # summed, a short choice is favoured ("Freeze it."); per character, the sensible one wins
    assert qa.accuracy(examples[:1], scores[:1]) == {"acc": 0.0, "acc_norm": 1.0}
    sky = qa.Example("Question: What color is the sky on a clear day?\nAnswer:", (" Blue.", " Green."), 0)
    [[blue, green]] = qa.choice_log_likelihoods(model, tokenizer, [sky], batch=2, max_tokens=64, device="cpu")
    assert blue - green > 1.0  # measured 1.48 nats


def test_a_long_prompt_is_cut_from_the_left_and_the_choice_kept(smol):
    _, tokenizer = smol
    ids, n = qa.encode(tokenizer, "word " * 100 + "\nAnswer:", " yes", max_tokens=16)
    assert len(ids) == 16 and tokenizer.decode(ids[-n:]) == " yes"
    assert tokenizer.decode(ids[:-n]).endswith("\nAnswer:")


def test_training_reads_only_the_correct_choices_tokens():
    batch = qa.batch_rows([([5, 6, 7, 8], 2), ([9, 10], 1)], pad_id=0, device="cpu")
    assert batch["labels"].tolist() == [[-100, -100, 7, 8], [-100, 10, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]


def test_the_summary_compares_meft_with_the_best_lora():
    runs = [dict(task="piqa", arm=arm, lr=1e-4, seed=s, scored_on="test", acc=acc + 0.01 * s, acc_norm=acc)
            for arm, acc in (("meft1", 0.70), ("lora-qv", 0.69), ("lora-all", 0.72)) for s in range(3)]
    runs.append(dict(task="piqa", arm="meft1", lr=1e-3, seed=0, scored_on="dev", acc=0.1, acc_norm=0.1))
    summary = qa.summarise(runs)["piqa"]
    assert summary["meft1"]["acc_mean"] == pytest.approx(0.71) and summary["meft1"]["seeds"] == 3
    assert summary["meft1"]["acc_std"] == pytest.approx(0.01)
    assert summary["meft1"]["acc_vs_best_lora_points"] == pytest.approx(-2.0)
    assert "| piqa | " in qa.markdown(qa.summarise(runs))


@pytest.mark.slow  # 190 s: two conversions of the real SmolLM2, six arms
@needs_full_data
def test_every_arm_runs_end_to_end(smollm2, tmp_path):
    out = tmp_path / "qa.json"
    qa.main(["--model", str(smollm2), "--tasks", "piqa", "--steps", "2", "--batch", "2", "--seeds", "0", "1",
             "--rates", "1e-4", "3e-4", "--dev-rows", "4", "--max-test", "8", "--device", "cpu", "--out", str(out)])
    results = json.loads(out.read_text())
    assert results["data"]["piqa"] == {"train": 1334, "dev": 4, "test": 8}
    summary = results["summary"]["piqa"]
    assert set(summary) == set(qa.ARMS)
    for arm in qa.ARMS[1:]:
        sweep = [r for r in results["runs"] if r["arm"] == arm and r["scored_on"] == "dev"]
        assert [r["lr"] for r in sweep] == [1e-4, 3e-4]
        assert summary[arm]["seeds"] == 2 and summary[arm]["lr"] in (1e-4, 3e-4)
    assert summary["zero-shot"]["acc_std"] == 0.0
    assert results["meft_settings"]["meft3"]["variant"] == "meft3"
    assert out.with_suffix(".md").read_text().startswith("| task |")


@pytest.mark.parametrize("bad", ["full", "full=fast", "zero-shot=1e-4", "nobody=1e-4"])
def test_a_fixed_rate_names_a_trained_arm_and_a_number(bad, tmp_path, capsys):
    with pytest.raises(SystemExit):
        qa.main(["--rate-of", bad, "--out", str(tmp_path / "qa.json")])
    assert "--rate-of" in capsys.readouterr().err
    assert not (tmp_path / "qa.json").exists()


@needs_full_data
def test_a_resumed_run_keeps_what_was_run_and_runs_only_the_rest(smollm2, tmp_path, capsys):
    out = tmp_path / "qa.json"
    common = ["--model", str(smollm2), "--tasks", "piqa", "--steps", "1", "--batch", "1", "--seeds", "0",
              "--rates", "1e-4", "--dev-rows", "2", "--max-test", "2", "--device", "cpu", "--out", str(out)]
    qa.main(common + ["--arms", "zero-shot", "lora-qv"])
    first = json.loads(out.read_text())["runs"]
    assert sorted(r["arm"] for r in first) == ["lora-qv", "zero-shot"]
    # more arms, resumed: the two runs are kept as they were, only the new arm runs
    qa.main(common + ["--arms", "zero-shot", "lora-qv", "lora-all", "--resume"])
    runs = json.loads(out.read_text())["runs"]
    assert "resuming: 2 runs kept" in capsys.readouterr().out
    assert runs[:2] == first and [r["arm"] for r in runs[2:]] == ["lora-all"]
    # other settings than the file's: refused by name, the file left as it is
    before = out.read_text()
    with pytest.raises(SystemExit, match="other settings \\(steps\\)"):
        qa.main([*common[:4], "--steps", "2", *common[6:], "--arms", "lora-qv", "--resume"])
    assert out.read_text() == before
