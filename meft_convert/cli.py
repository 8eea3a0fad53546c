"""The `meft-convert` command: builds ConvertOptions, calls convert(), maps errors to exit codes.

Exit codes: 0 success; 2 bad usage or input (nothing written); 1 a conversion or its
verification failed (nothing written). Tracebacks only with --verbose.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import traceback
from pathlib import Path

import click

from . import __version__
from .convert import ConvertOptions, convert, option_fields
from .errors import MeftConvertError, VerificationError
from .templates.families import FAMILIES

HELP = """Convert MODEL into an exact-reversible MEFT checkpoint in OUTPUT.

MODEL is a local folder or a Hugging Face model id, resolved through the Hugging Face
cache (set HF_HUB_OFFLINE=1 to use only the cache). Supported model types: {families}.

The result loads anywhere with transformers and trust_remote_code=True:

\b
    meft-convert facebook/opt-1.3b --variant meft3 -o opt-1.3b-meft3
    python -c "from transformers import AutoModelForCausalLM as A; \\
      m = A.from_pretrained('opt-1.3b-meft3', trust_remote_code=True)"

Only the adapters (and a new task head) train; activations are recomputed in backward
instead of stored. By default the result is verified against the original: starting-point
fidelity, bit-exact reconstruction, gradients equal to plain autograd. The report is printed
and saved as OUTPUT/meft_report.json.
"""


class ScaleType(click.ParamType):
    """A coupling scale: 0.1, 1/1024 or 2^-10."""

    name = "SCALE"

    def convert(self, value, param, ctx):
        if isinstance(value, float):
            return value
        text = str(value).strip()
        try:
            if match := re.fullmatch(r"(\d+)\s*/\s*(\d+)", text):
                numerator, denominator = int(match[1]), int(match[2])
                if denominator == 0:
                    raise ZeroDivisionError
                return numerator / denominator
            if match := re.fullmatch(r"2\s*\^\s*(-?\d+)", text):
                return 2.0 ** int(match[1])
            return float(text)
        except (ValueError, ZeroDivisionError):
            self.fail(f"{value!r} is not a number, a fraction like 1/1024 or a power like 2^-10", param, ctx)


def _type_of(f):
    annotation = str(f.type)
    if f.metadata.get("choices"):
        return click.Choice(f.metadata["choices"])
    if f.metadata.get("scale"):
        return ScaleType()
    if annotation.startswith("int"):
        return {"reversible_layers": click.IntRange(min=0), "num_labels": click.IntRange(min=1)}.get(f.name, int)
    if annotation.startswith("float"):
        return float
    if annotation.startswith("Path"):
        return click.Path(path_type=Path)
    return str


def _params() -> list[click.Parameter]:
    params: list[click.Parameter] = []
    for f in option_fields():
        meta = f.metadata
        if meta.get("argument"):
            params.append(click.Argument([f.name], metavar=f.name.upper()))
            continue
        flag = "--" + f.name.replace("_", "-")
        decls = list(meta.get("flags", (flag,)))
        kwargs = dict(help=meta["help"], show_default=True)
        if str(f.type).startswith("bool"):
            if meta.get("flag_only"):
                kwargs.update(is_flag=True, default=f.default, show_default=False)
            else:
                decls = [f"{decls[0]}/--no-{decls[0][2:]}"]
                kwargs.update(default=f.default)
        else:
            kwargs.update(type=_type_of(f), metavar=meta.get("metavar"))
            if f.default is dataclasses.MISSING:
                kwargs["required"] = True
            else:
                kwargs.update(default=f.default, show_default=f.default is not None)
        params.append(click.Option([*decls, f.name], **kwargs))
    params.append(click.Option(["--verbose", "-v"], is_flag=True, help="Show tracebacks of errors."))
    return params


def _run(verbose: bool, **kwargs) -> None:
    try:
        output = convert(ConvertOptions(**kwargs), log=click.echo)
    except MeftConvertError as e:
        if verbose:
            traceback.print_exc()
        if isinstance(e, VerificationError) and e.report is not None:
            click.echo(e.report.to_text(), err=True)
        click.echo(f"Error: {e}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("Interrupted: nothing was written.", err=True)
        sys.exit(130)
    except Exception as e:
        if verbose:
            traceback.print_exc()
        click.echo(f"Error: {type(e).__name__}: {e} (run with --verbose for the traceback)", err=True)
        sys.exit(1)
    click.echo(f"Wrote {output}")


main = click.Command(
    "meft-convert",
    params=_params(),
    callback=_run,
    help=HELP.format(families=", ".join(sorted(FAMILIES))),
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
main = click.version_option(__version__, "--version", prog_name="meft-convert")(main)
