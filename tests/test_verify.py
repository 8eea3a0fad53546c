"""Verification on the real pretrained MiniLM: starting-point fidelity, and failures it must catch."""

from __future__ import annotations

import json
import shutil

import pytest

from meft_convert.convert import ConvertOptions, convert
from meft_convert.verify import verify_conversion

# the scale that must be small: both in MEFT1 and MEFT3; MEFT2's λ scales the stream that
# feeds its PLM layer (y1 = λ·x1 + adapter(x2)) and has to stay 1
SMALL = {"meft1": (1 / 1024, 1 / 1024), "meft2": (1.0, 1 / 1024), "meft3": (1 / 1024, 1 / 1024)}


@pytest.mark.parametrize("variant", list(SMALL))
def test_small_scales_keep_minilms_starting_point(minilm, tmp_path, variant):
    lambda_, beta = SMALL[variant]
    options = ConvertOptions(
        model=str(minilm), output=tmp_path / variant, variant=variant, lambda_=lambda_, beta=beta,
        adapter_init="zero", output_stream="plm", show_progress=False,
    )
    report = json.loads((convert(options, log=lambda _: None) / "meft_report.json").read_text())
    assert report["passed"]
    assert report["fidelity"]["cosine_min"] >= 0.9999, report["fidelity"]


def test_report_gives_every_variants_defaults(converted):
    _, report = converted("minilm", "meft3")
    rows = {row["variant"]: row for row in report["reference"]}
    assert set(rows) == {"meft1", "meft2", "meft3"}
    assert (rows["meft1"]["lambda_"], rows["meft1"]["beta"]) == (0.1, 1.0)
    for row in rows.values():
        plm_min, mean_min = row["plm"][1], row["mean"][1]
        assert 0.8 < plm_min < 1 and mean_min < plm_min  # why the default output stream is "plm"


def test_a_non_deterministic_layer_fails_verification(converted, tmp_path):
    """Tamper with the code in a converted folder: the audit must catch the wrong reconstruction."""
    folder, _ = converted("bert", "meft3")
    tampered = tmp_path / "tampered"
    shutil.copytree(folder, tampered)
    families = tampered / "families.py"
    code = families.read_text()
    # a different offset at every call: the recompute in backward never sees the forward's
    code = code.replace(
        "    return layer.output.LayerNorm(h + x)\n",
        "    return layer.output.LayerNorm(h + x) + next(_CALLS) * 1e-4\n",
    )
    families.write_text(code + "\nimport itertools\n\n_CALLS = itertools.count(1)\n")
    report = verify_conversion(folder.parent.parent / "tiny" / "bert", tampered, reference=False)
    assert not report.passed
    assert any("layer 1" in problem for problem in report.problems), report.problems
