"""config.json records the meft_convert version and each code file's sha256; check_code compares
a checkpoint's code with what this version ships."""

from __future__ import annotations

import hashlib
import json
import shutil
from importlib import resources

import pytest

from meft_convert import __version__
from meft_convert.convert import TEMPLATE_FILES
from meft_convert.provenance import HASHES_KEY, VERSION_KEY, check_code


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def checkpoint(converted, tmp_path):
    folder, _ = converted("opt-125m", "meft3")
    return shutil.copytree(folder, tmp_path / "checkpoint")


def test_config_records_the_version_and_the_code_written(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    assert config[VERSION_KEY] == __version__
    shipped = resources.files("meft_convert.templates")
    assert config[HASHES_KEY] == {name: _sha256(shipped.joinpath(name).read_bytes()) for name in TEMPLATE_FILES}
    assert config[HASHES_KEY] == {name: _sha256((checkpoint / name).read_bytes()) for name in TEMPLATE_FILES}


def test_unchanged_code_is_identical(checkpoint):
    check = check_code(checkpoint)
    assert check.identical and check.written_by == __version__
    assert sorted(f.name for f in check.files) == sorted(TEMPLATE_FILES)
    assert "byte-identical" in check.to_text()


@pytest.mark.parametrize("name", TEMPLATE_FILES)
def test_one_changed_byte_is_detected(checkpoint, name):
    data = bytearray((checkpoint / name).read_bytes())
    data[len(data) // 2] ^= 0x01
    (checkpoint / name).write_bytes(bytes(data))
    check = check_code(checkpoint)
    assert not check.identical
    assert [(f.name, f.describe()) for f in check.files if not f.identical] == [(name, "changed since conversion")]
    assert "NOT what this version ships" in check.to_text()


def test_rewriting_the_recorded_hash_too_is_still_detected(checkpoint):
    (checkpoint / "reversible.py").write_text((checkpoint / "reversible.py").read_text() + "\nimport socket\n")
    config = json.loads((checkpoint / "config.json").read_text())
    config[HASHES_KEY]["reversible.py"] = _sha256((checkpoint / "reversible.py").read_bytes())
    (checkpoint / "config.json").write_text(json.dumps(config))
    [changed] = [f for f in check_code(checkpoint).files if not f.identical]
    assert changed.name == "reversible.py" and changed.describe() == "differs from this version's"


def test_added_files_missing_files_and_foreign_code_are_detected(checkpoint):
    (checkpoint / "extra.py").write_text("print('hello')\n")
    (checkpoint / "adapters.py").unlink()
    config = json.loads((checkpoint / "config.json").read_text())
    config["auto_map"]["AutoModel"] = "someone/code--modeling_other.OtherModel"
    (checkpoint / "config.json").write_text(json.dumps(config))
    problems = {f.name: f.describe() for f in check_code(checkpoint).files if not f.identical}
    assert problems == {
        "extra.py": "not a file meft-convert writes",
        "adapters.py": "missing from the checkpoint",
        "someone/code--modeling_other.py": "code from another repository (auto_map)",
    }
