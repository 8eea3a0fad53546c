"""The command line: options become ConvertOptions, errors become exit codes and one line."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from meft_convert import cli
from meft_convert import convert as conversion
from meft_convert.convert import ConvertOptions
from meft_convert.errors import BadInputError, MeftConvertError, VerificationError


@pytest.fixture
def calls(monkeypatch, tmp_path):
    """Replaces convert() and records the options it was called with."""
    recorded = []

    def fake_convert(options, log=print):
        recorded.append(options)
        return Path(options.output)

    monkeypatch.setattr(conversion, "convert", fake_convert)
    return recorded


def invoke(*args):
    return CliRunner().invoke(cli.main, [str(a) for a in args])


def test_defaults(calls):
    result = invoke("some/model", "-o", "out")
    assert result.exit_code == 0, result.output
    assert calls == [ConvertOptions(model="some/model", output=Path("out"))]
    # measured at conversion unless given
    assert (calls[0].lambda_, calls[0].beta, calls[0].adapter_init, calls[0].stream_bits) == ("auto",) * 4
    assert "Wrote out" in result.output


def test_every_option_reaches_convert(calls):
    result = invoke(
        "facebook/opt-1.3b", "--output", "o", "--variant", "meft1", "--task", "sequence-classification",
        "--num-labels", 3, "--adapter-dim", 16, "--lambda", "1/1024",
        "--beta", "2^-6", "--init-std", 0.01, "--adapter-init", "zero", "--reversible-layers", 3,
        "--output-stream", "mean", "--no-exact", "--stream-bits", "32", "--allow-low-fidelity",
        "--revision", "v1", "--seed", 7, "--force", "--no-verify",
        "--push-to-hub", "me/opt-meft", "--private", "--push-revision", "v2", "--commit-message", "MEFT3 of OPT",
        "--token", "hf_secret",
    )
    assert result.exit_code == 0, result.output
    assert calls == [
        ConvertOptions(
            model="facebook/opt-1.3b", output=Path("o"), variant="meft1", task="sequence-classification", num_labels=3,
            adapter_dim=16, lambda_=1 / 1024, beta=2.0**-6,
            init_std=0.01, adapter_init="zero", reversible_layers=3, output_stream="mean", exact=False,
            stream_bits="32", allow_low_fidelity=True, revision="v1",
            seed=7, force=True, verify=False, push_to_hub="me/opt-meft", private=True, push_revision="v2",
            commit_message="MEFT3 of OPT", token="hf_secret",
        )
    ]
    assert "hf_secret" not in repr(calls[0])


def test_the_explicit_convert_command_is_the_default_one(calls):
    assert invoke("convert", "m", "-o", "o", "--variant", "meft1").exit_code == 0
    assert invoke("m", "-o", "o", "--variant", "meft1").exit_code == 0
    assert calls[0] == calls[1] == ConvertOptions(model="m", output=Path("o"), variant="meft1")


@pytest.mark.parametrize(
    "text,value",
    [("0.1", 0.1), ("1/10", 0.1), ("1 / 1024", 1 / 1024), ("2^-10", 2**-10), ("1", 1.0), ("auto", "auto"), ("AUTO", "auto")],
)
def test_scales_accept_fractions_and_powers(calls, text, value):
    assert invoke("m", "-o", "o", "--lambda", text).exit_code == 0
    assert calls[-1].lambda_ == value


@pytest.mark.parametrize(
    "args",
    [
        ("-o", "out"),  # no MODEL
        ("m",),  # no --output
        ("m", "-o", "o", "--variant", "meft4"),
        ("m", "-o", "o", "--lambda", "a tenth"),
        ("m", "-o", "o", "--lambda", "1/0"),
        ("m", "-o", "o", "--reversible-layers", "-1"),
        ("m", "-o", "o", "--task", "translation"),
        ("m", "-o", "o", "--num-labels", "0"),
        ("m", "-o", "o", "--output-stream", "x1"),
        ("m", "-o", "o", "--no-such-flag"),
        ("m", "-o", "o", "--allow-pickle"),  # removed: pickle weights are never read
    ],
)
def test_usage_errors_exit_2(calls, args):
    result = invoke(*args)
    assert result.exit_code == 2 and not calls


@pytest.mark.parametrize(
    "error,code",
    [(BadInputError("bad model"), 2), (MeftConvertError("writing failed"), 1), (VerificationError("gradients differ"), 1)],
)
def test_errors_become_one_line_and_exit_codes(monkeypatch, error, code):
    def failing(options, log=print):
        raise error

    monkeypatch.setattr(conversion, "convert", failing)
    result = invoke("m", "-o", "o")
    assert result.exit_code == code
    assert result.output.strip().splitlines() == [f"Error: {error}"]
    assert "Traceback" not in result.output


def test_unexpected_errors_show_a_traceback_only_with_verbose(monkeypatch):
    def broken(options, log=print):
        raise KeyError("surprise")

    monkeypatch.setattr(conversion, "convert", broken)
    quiet = invoke("m", "-o", "o")
    assert quiet.exit_code == 1 and "Traceback" not in quiet.output and "--verbose" in quiet.output
    loud = invoke("m", "-o", "o", "--verbose")
    assert loud.exit_code == 1 and "Traceback" in loud.output


def test_interrupt_exits_130(monkeypatch):
    def interrupted(options, log=print):
        raise KeyboardInterrupt

    monkeypatch.setattr(conversion, "convert", interrupted)
    result = invoke("m", "-o", "o")
    assert result.exit_code == 130 and "nothing was written" in result.output


def test_help_teaches():
    result = invoke("--help")
    assert result.exit_code == 0
    for text in ("meft-convert MODEL -o OUTPUT", "meft-convert push OUTPUT ORG/NAME", "meft-convert check OUTPUT_OR_REPO",
                 "trust_remote_code=True", "HF_TOKEN", "convert --help"):
        assert text in result.output
    assert invoke().output == result.output  # no arguments: the same help
    result = invoke("convert", "--help")
    assert result.exit_code == 0
    for text in ("trust_remote_code=True", "--variant", "meft1", "--lambda", "1/1024", "HF_HUB_OFFLINE", "bart, bert, gpt2, llama, mistral, opt, qwen2, roberta", "--force", "--task", "--push-to-hub", "--push-revision", "--commit-message", "--token"):
        assert text in result.output
    assert invoke("some/model", "--help").output == result.output
    for command, texts in {"push": ("--private", "--revision BRANCH", "--commit-message", "--token"),
                           "check": ("--revision", "--original", "--no-verify", "byte for byte")}.items():
        result = invoke(command, "--help")
        assert result.exit_code == 0 and all(text in result.output for text in texts)


def test_real_bad_input_exits_2_with_one_line(tmp_path):
    """Not mocked: a real conversion refusing a missing folder."""
    result = invoke("./does/not/exist", "-o", tmp_path / "out")
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == ["Error: no such folder: ./does/not/exist"]
    assert not (tmp_path / "out").exists()


def test_real_conversion_exits_0(tiny_checkpoints, tmp_path):
    result = invoke(tiny_checkpoints["opt-125m"], "-o", tmp_path / "out", "--variant", "meft2")
    assert result.exit_code == 0, result.output
    assert "bit-exact" in result.output and "passed" in result.output and (tmp_path / "out" / "config.json").is_file()


def test_real_lost_starting_point_exits_1_unless_allowed(minilm, tmp_path):
    """Not mocked: the paper's λ = β = 0.1 and init on the real MiniLM miss the target."""
    paper = ("--variant", "meft3", "--lambda", "0.1", "--beta", "1/10", "--adapter-init", "paper")
    result = invoke(minilm, "-o", tmp_path / "out", *paper)
    assert result.exit_code == 1 and not (tmp_path / "out").exists()
    error = result.output.strip().splitlines()[-1]
    assert error.startswith("Error: verification failed: the starting point is lost: cosine similarity to the original 0.")
    assert "--lambda auto" in error and "--allow-low-fidelity" in error
    kept = invoke(minilm, "-o", tmp_path / "kept", *paper, "--allow-low-fidelity")
    assert kept.exit_code == 0, kept.output
    assert "kept anyway   the starting point is lost" in kept.output and (tmp_path / "kept" / "config.json").is_file()


def test_real_missing_head_exits_2(tiny_checkpoints, tmp_path):
    result = invoke(tiny_checkpoints["opt-125m"], "-o", tmp_path / "out", "--task", "masked-lm")
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "Error: opt models have no masked-lm head; their tasks: base, sequence-classification, causal-lm"
    ]
    assert not (tmp_path / "out").exists()


def test_interrupt_during_start_up_exits_130(monkeypatch):
    """Ctrl-C while the command is being built (before convert() runs) exits as any interrupt does."""

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.delitem(cli.main.commands, "convert", raising=False)  # built again, on first use
    monkeypatch.setattr(conversion, "option_fields", interrupted)
    result = invoke("m", "-o", "o")
    assert result.exit_code == 130 and "Interrupted" in result.output and "Aborted!" not in result.output


# runs the CLI with the given arguments and reports its exit code and the heavy modules it imported
PROBE = """
import json, sys
from meft_convert.cli import main
sys.argv = ["meft-convert", *sys.argv[1:]]
try:
    main()
except SystemExit as e:
    code = e.code
print(json.dumps({"code": code, "heavy": sorted({m.split(".")[0] for m in sys.modules} & {"torch", "transformers"})}), file=sys.stderr)
"""


@pytest.mark.parametrize(
    "args,code",
    [
        (["--help"], 0),
        (["--version"], 0),
        (["push", "--help"], 0),
        (["check", "--help"], 0),
        (["some/model"], 2),  # no --output
        (["some/model", "-o", "out", "--variant", "meft4"], 2),
        (["some/model", "-o", "out", "--no-such-flag"], 2),
    ],
)
def test_help_and_usage_errors_do_not_import_torch(tmp_path, args, code):
    import json
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    report = json.loads(result.stderr.strip().splitlines()[-1])
    assert report == {"code": code, "heavy": []}, result.stdout + result.stderr


def test_messages_name_flags_not_fields(tiny_checkpoints, tmp_path):
    """Not mocked: the settings checks speak of Python fields; the CLI shows the flags."""
    result = invoke("m", "-o", tmp_path / "o", "--lambda", "0.3")
    assert result.exit_code == 2
    assert result.output.strip() == (
        "Error: --lambda 0.3 is not 1/m for a positive integer m, which exact mode needs (e.g. 1, 0.1 = 1/10, "
        "1/1024); use the float mode (--no-exact) for other values"
    )
    result = invoke("m", "-o", tmp_path / "o", "--adapter-dim", 0)
    assert result.exit_code == 2 and result.output.strip() == "Error: --adapter-dim must be a positive integer, got 0"
    result = invoke(tiny_checkpoints["opt-125m"], "-o", tmp_path / "o", "--reversible-layers", 5)
    assert result.exit_code == 2 and result.output.strip() == "Error: --reversible-layers 5 exceeds the model's 2 layers"
    # the Python API keeps its own names
    with pytest.raises(BadInputError, match=r"use the float mode \(exact=False\)"):
        conversion.convert(ConvertOptions(model="m", output=tmp_path / "o", lambda_=0.3))
    with pytest.raises(BadInputError, match="^adapter_dim must be a positive integer"):
        conversion.convert(ConvertOptions(model="m", output=tmp_path / "o", adapter_dim=0))
    assert not (tmp_path / "o").exists()


def test_num_labels_needs_a_classification_head(tiny_checkpoints, tmp_path):
    import json

    result = invoke(tiny_checkpoints["opt-125m"], "-o", tmp_path / "o", "--num-labels", 3, "--no-verify")
    assert result.exit_code == 2 and not (tmp_path / "o").exists()
    assert result.output.strip() == (
        "Error: --num-labels sets the labels of a sequence-classification head, but the result's head is causal-lm "
        "(the original's, OPTForCausalLM); add --task sequence-classification, or leave out --num-labels"
    )
    result = invoke(tiny_checkpoints["bert"], "-o", tmp_path / "o", "--task", "question-answering", "--num-labels", 3)
    assert result.exit_code == 2 and "head is question-answering (from --task question-answering)" in result.output
    result = invoke(
        tiny_checkpoints["opt-125m"], "-o", tmp_path / "o", "--num-labels", 3, "--task", "sequence-classification", "--no-verify"
    )
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "o" / "config.json").read_text())
    assert config["architectures"] == ["MeftOPTForSequenceClassification"] and len(config["id2label"]) == 3


_FREED_MEMORY = """
import sys
from meft_convert.cli import return_freed_memory_promptly
if sys.argv[1] == "fixed":
    assert return_freed_memory_promptly()
import torch

def rss_mib():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS")) / 1024

big = torch.ones(16 << 20, dtype=torch.uint8)
del big  # freeing a 16 MiB mapped block raises glibc's threshold to 16 MiB, unless it is fixed
start = rss_mib()
blocks = [torch.ones(4 << 20, dtype=torch.uint8) for _ in range(64)]  # 256 MiB
del blocks[:-1]  # the last one stays: the freed ones are not at the top of the heap
print(rss_mib() - start)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator")
def test_the_cli_gives_freed_blocks_back_to_the_system(monkeypatch):
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)

    def kept_mib(mode: str) -> float:
        run = subprocess.run([sys.executable, "-c", _FREED_MEMORY, mode], capture_output=True, text=True, check=True)
        return float(run.stdout.split()[-1])

    assert kept_mib("default") > 200  # glibc's heap keeps what was freed
    assert kept_mib("fixed") < 16  # one 4 MiB block, and noise
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert not cli.return_freed_memory_promptly()  # the user's own setting stands
