"""`meft-convert check`: code compared byte for byte with this version's, then verified again."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from meft_convert.cli import main


@pytest.fixture
def checkpoint(converted, tmp_path):
    folder, _ = converted("opt-125m", "meft3")
    return shutil.copytree(folder, tmp_path / "checkpoint")


def invoke(*args):
    return CliRunner().invoke(main, ["check", *map(str, args)])


def test_an_untouched_checkpoint_passes_and_verifies_again(checkpoint, tiny_checkpoints):
    result = invoke(checkpoint, "--original", tiny_checkpoints["opt-125m"])
    assert result.exit_code == 0, result.output
    assert "the code is byte-identical to what this version ships" in result.output
    assert "(bit-exact)" in result.output and "result        passed" in result.output
    assert "fidelity figures equal those recorded at conversion" in result.output
    assert result.output.strip().endswith("Check passed")


def test_one_changed_byte_fails_and_the_code_is_not_run(checkpoint):
    data = bytearray((checkpoint / "families.py").read_bytes())
    data[100] ^= 0x20
    (checkpoint / "families.py").write_bytes(bytes(data))
    result = invoke(checkpoint)
    assert result.exit_code == 1
    assert "DIFF families.py" in result.output and "changed since conversion" in result.output
    assert "it is not loaded" in result.output and "Verifying" not in result.output


def test_added_code_is_never_executed(checkpoint, tmp_path):
    marker = tmp_path / "code-ran"
    with open(checkpoint / "modeling_meft.py", "a") as f:
        f.write(f"\nopen({str(marker)!r}, 'w').close()\n")
    result = invoke(checkpoint)
    assert result.exit_code == 1 and "DIFF modeling_meft.py" in result.output
    assert not marker.exists()


def test_code_only_check_skips_loading(checkpoint):
    result = invoke(checkpoint, "--no-verify")
    assert result.exit_code == 0 and "Verifying" not in result.output


def test_an_original_that_cannot_be_found_is_bad_input(checkpoint, tmp_path):
    config = json.loads((checkpoint / "config.json").read_text())
    config["meft_base_model"] = str(tmp_path / "moved-away")
    del config["meft_base_model_local"]  # as written before local originals were recorded by name
    (checkpoint / "config.json").write_text(json.dumps(config))
    result = invoke(checkpoint)
    assert result.exit_code == 2 and "give another with --original" in result.output


def test_a_local_original_is_named_not_located(checkpoint, tiny_checkpoints):
    """config.json records a local original by its folder's name only (no path of the converting
    machine): check asks for its path."""
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["meft_base_model"] == tiny_checkpoints["opt-125m"].name and config["meft_base_model_local"] is True
    result = invoke(checkpoint)
    assert result.exit_code == 2 and "--original PATH" in result.output


def test_a_folder_that_is_not_a_meft_checkpoint_is_bad_input(tiny_checkpoints):
    result = invoke(tiny_checkpoints["opt-125m"])
    assert result.exit_code == 2 and "is not a MEFT checkpoint" in result.output
