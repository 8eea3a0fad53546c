"""`meft-convert check`: is a converted checkpoint's code ours, and does the model still verify?

The code files are compared byte for byte with what this version of meft_convert ships
(provenance.py). Only when they are identical is the checkpoint loaded, which runs that code,
and verified again against its original: fidelity, bit-exact reconstruction, gradients.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import BadInputError
from .hub import resolve_model
from .provenance import CodeCheck, check_code

if TYPE_CHECKING:
    from .verify import VerificationReport

REPORT_FILE = "meft_report.json"
CODE_CHECK_FILES = ["config.json", "*.py"]
# fidelity figures re-measured here against those recorded at conversion: equal on the same
# software and hardware, close elsewhere
FIGURE_TOLERANCE = 1e-4


@dataclass
class CheckResult:
    folder: Path
    code: CodeCheck
    report: VerificationReport | None = None  # None: not verified (code differs, or --no-verify)
    figure_differences: dict[str, tuple[float, float]] | None = None  # name -> (recorded, now)

    @property
    def passed(self) -> bool:
        return self.code.identical and (self.report is None or self.report.passed)


def _read_meft_config(folder: Path) -> dict:
    from .convert import read_config_json  # torch and transformers only when a check runs

    config = read_config_json(folder)
    if not str(config.get("model_type", "")).startswith("meft_"):
        raise BadInputError(f"{folder} is not a MEFT checkpoint (model_type {config.get('model_type')!r})")
    return config


def _original_of(config: dict) -> tuple[str, str | None]:
    """The model the checkpoint was converted from, and its revision, as recorded."""
    base = config.get("meft_base_model")
    if not base:
        raise BadInputError("the checkpoint does not record its original model; give it with --original")
    if Path(base).expanduser().exists():  # a local folder (whose name may hold an "@")
        return base, None
    if config.get("meft_base_model_local"):  # only the folder's name is recorded, never its path
        raise BadInputError(
            f"the checkpoint was converted from a local folder named {base!r}; give its path with --original PATH "
            "to verify it (the code is checked first either way; --no-verify checks only the code)"
        )
    model, _, revision = base.rpartition("@") if "@" in base else (base, "", "")
    return model, revision or None


def _compare_figures(recorded: dict, report: VerificationReport) -> dict[str, tuple[float, float]]:
    now = report.to_dict()["fidelity"]
    differences = {}
    for name, then in recorded.get("fidelity", {}).items():
        if then is None or now.get(name) is None:
            continue
        # a figure, or a list of them (the original's perplexities under noise)
        pairs = zip(then, now[name]) if isinstance(then, list) else [(then, now[name])]
        if any(abs(b - a) > FIGURE_TOLERANCE for a, b in pairs):
            differences[name] = (then, now[name])
    return differences


def check_checkpoint(
    checkpoint: str,
    *,
    revision: str | None = None,
    original: str | None = None,
    verify: bool = True,
    seed: int = 0,
    token: str | None = None,
    log: Callable[[str], None] = print,
) -> CheckResult:
    """Checks a local folder or a hub repository (downloaded through the Hugging Face cache)."""
    # from a hub repository: everything to verify, else only what the code check reads
    folder = resolve_model(checkpoint, revision, patterns=None if verify else CODE_CHECK_FILES, token=token)
    config = _read_meft_config(folder)
    result = CheckResult(folder=folder, code=check_code(folder))
    log(result.code.to_text())
    if not result.code.identical:
        log("The checkpoint's code differs from this version's: it is not loaded (loading would run it).")
        return result
    if not verify:
        return result
    if original is not None:
        source = resolve_model(original, token=token)
        name = original
    else:
        name, original_revision = _original_of(config)
        try:
            source = resolve_model(name, original_revision, token=token)
        except BadInputError as e:
            raise BadInputError(f"{e} (the original recorded at conversion; give another with --original)") from None
    from .verify import verify_conversion  # torch and transformers: only to verify

    log(f"Verifying against {name} ...")
    result.report = verify_conversion(source, folder, model_name=name, seed=seed, reference=False)
    log(result.report.to_text())
    recorded = folder / REPORT_FILE
    if recorded.is_file():
        result.figure_differences = _compare_figures(json.loads(recorded.read_text()), result.report)
        if result.figure_differences:
            for key, (then, now) in result.figure_differences.items():
                log(f"  note: {key} was {then:.6g} at conversion, now {now:.6g}")
        else:
            log(f"  fidelity figures equal those recorded at conversion (within {FIGURE_TOLERANCE:g})")
    return result
