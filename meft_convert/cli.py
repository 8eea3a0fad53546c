"""The `meft-convert` command: a group whose default command converts, beside `push` and `check`.
Each builds its inputs, calls one library function and maps errors to exit codes.

Exit codes: 0 success; 2 bad usage or input (nothing written); 1 a conversion, its
verification, an upload or a check failed. Tracebacks only with --verbose.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import json
import os
import re
import sys
import traceback
from pathlib import Path

import click

from . import __version__
from .errors import BadInputError, MeftConvertError, VerificationError
from .hub import push_to_hub
from .templates.meft_table import RECOMPUTE_CHUNK_TOKENS, VARIANTS

# torch and transformers load only once a command runs that needs them (convert, check with
# verification): arguments are parsed first, so that the help and usage errors answer at once

GROUP_HELP = """Convert pretrained transformers models into exact-reversible MEFT checkpoints,
publish them and check them.

\b
    meft-convert MODEL -o OUTPUT [--variant meft3 ...] [--push-to-hub ORG/NAME]
        convert MODEL (a folder or a hub id); the default command, also
        spelled `meft-convert convert MODEL ...`: see `meft-convert convert --help`
    meft-convert push OUTPUT ORG/NAME [--private] [--revision BRANCH]
        upload a converted folder to the Hugging Face Hub
    meft-convert check OUTPUT_OR_REPO [--revision COMMIT]
        tell whether a checkpoint's code is byte-identical to what this
        version ships, and verify the model again
    meft-convert estimate MODEL --batch-size B --seq-len S [--json]
        estimate the training memory of MEFT, LoRA and checkpointing from
        MODEL's config alone, before converting (a quantized base:
        --load-in-4bit or --load-in-8bit)

The result loads anywhere with transformers and trust_remote_code=True:

\b
    meft-convert facebook/opt-1.3b --variant meft3 -o opt-1.3b-meft3
    python -c "from transformers import AutoModelForCausalLM as A; \\
      m = A.from_pretrained('opt-1.3b-meft3', trust_remote_code=True)"

The hub token comes from --token, else HF_TOKEN, else the stored login; it is never printed
or written.
"""

HELP = """Convert MODEL into an exact-reversible MEFT checkpoint in OUTPUT.

MODEL is a local folder or a Hugging Face model id, resolved through the Hugging Face
cache (set HF_HUB_OFFLINE=1 to use only the cache). Supported model types: {families}.
A checkpoint published in bitsandbytes 4-bit (*-bnb-4bit) converts as it is stored and
loads back in 4 bits (calibrating and verifying it needs bitsandbytes).

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
    """A coupling scale: auto (measured at conversion), 0.1, 1/1024 or 2^-10."""

    name = "SCALE"

    def convert(self, value, param, ctx):
        if isinstance(value, float):
            return value
        text = str(value).strip()
        if text.lower() == "auto":
            return "auto"
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
            self.fail(f"{value!r} is not auto, a number, a fraction like 1/1024 or a power like 2^-10", param, ctx)


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
    from .convert import option_fields

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


# glibc's M_MMAP_THRESHOLD and its starting value
_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES = -3, 128 * 1024


def return_freed_memory_promptly() -> bool:
    """Fixes glibc's mmap threshold at its starting value, for this process.

    glibc serves an allocation below the threshold from its heap, which it rarely gives back to
    the system, and raises the threshold (up to 32 MiB) each time a larger mapped block is freed.
    Calibration and verification compute the original in float32 one module's weights at a time,
    so after the first large block the per-module copies land in the heap and stay in RSS once
    freed: an OPT-1.3b-shaped bf16 conversion peaked at 1.50x the checkpoint's size instead of
    1.25x. A fixed threshold maps every large block and unmaps it when freed. Only the CLI does
    this (a library call leaves the caller's process alone), and not where the user has set
    MALLOC_MMAP_THRESHOLD_. Returns whether the threshold was set."""
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):  # not glibc
        return False


def _run(verbose: bool, **kwargs) -> None:
    def run():
        from . import convert as conversion

        return_freed_memory_promptly()

        return conversion.convert(conversion.ConvertOptions(**kwargs), log=click.echo)

    output = _guarded(verbose, run)
    click.echo(f"Wrote {output}")


def _guarded(verbose: bool, action, interrupted: str = "Interrupted: nothing was written."):
    """Runs `action`; errors become one message on stderr and an exit code."""
    try:
        return action()
    except MeftConvertError as e:
        if verbose:
            traceback.print_exc()
        if isinstance(e, VerificationError) and e.report is not None:
            click.echo(e.report.to_text(), err=True)
        click.echo(f"Error: {e.cli_message or e}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo(interrupted, err=True)
        sys.exit(130)
    except Exception as e:
        if verbose:
            traceback.print_exc()
        click.echo(f"Error: {type(e).__name__}: {e} (run with --verbose for the traceback)", err=True)
        sys.exit(1)


CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
VERBOSE = click.option("--verbose", "-v", is_flag=True, help="Show tracebacks of errors.")
TOKEN = click.option(
    "--token", metavar="TOKEN", default=None,
    help="Hugging Face token (default: HF_TOKEN, else the stored login). Never printed or written.",
)


class DefaultGroup(click.Group):
    """A group that runs `default` when the first argument names none of its commands, so
    that `meft-convert MODEL ...` keeps working beside `meft-convert push ...`. (A local
    folder named like a command is reached as ./push, or with `meft-convert convert push`.)
    Commands in `lazy` are built on first use."""

    def __init__(self, *args, default: str, lazy: dict, **kwargs):
        super().__init__(*args, **kwargs)
        self.default = default
        self.lazy = lazy

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(self.commands) | set(self.lazy))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.lazy and name not in self.commands:
            self.add_command(self.lazy[name](), name)
        return super().get_command(ctx, name)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.list_commands(ctx) and args[0] not in (*ctx.help_option_names, "--version"):
            args = [self.default, *args]
        return super().parse_args(ctx, args)

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        """Click's standalone mode, except that Ctrl-C anywhere (parsing, building a command,
        importing torch) exits 130 like an interrupted conversion, not 1 with "Aborted!"."""
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            result = super().main(*args, standalone_mode=False, **kwargs)
        except click.ClickException as e:
            e.show()
            sys.exit(e.exit_code)
        except click.Abort as e:
            if isinstance(e.__cause__, KeyboardInterrupt):
                click.echo("Interrupted: nothing was written.", err=True)
                sys.exit(130)
            click.echo("Aborted!", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("Interrupted: nothing was written.", err=True)
            sys.exit(130)
        except OSError as e:
            if e.errno == errno.EPIPE:  # output piped into a command that stopped reading (head)
                sys.exit(1)
            raise
        sys.exit(result if isinstance(result, int) else 0)


class ConvertCommand(click.Command):
    """The convert command; its help lists the supported model types, read from the family
    table only when the help is shown."""

    def format_help_text(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        from .templates.families import FAMILIES

        self.help = HELP.format(families=", ".join(sorted(FAMILIES)))
        super().format_help_text(ctx, formatter)


def _convert_command() -> click.Command:
    return ConvertCommand(
        "convert",
        params=_params(),
        callback=_run,
        help=HELP,
        short_help="Convert MODEL into a MEFT checkpoint (the default command).",
        context_settings=CONTEXT,
    )


main = DefaultGroup("meft-convert", default="convert", lazy={"convert": _convert_command}, help=GROUP_HELP, context_settings=CONTEXT, no_args_is_help=True)
main = click.version_option(__version__, "--version", prog_name="meft-convert")(main)


def _meft_folder(folder: Path) -> Path:
    try:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type", "")
    except (OSError, ValueError):
        model_type = ""
    if not str(model_type).startswith("meft_"):
        raise BadInputError(f"{folder} is not a converted MEFT checkpoint (no config.json with a meft_* model_type)")
    return folder


@main.command("push", context_settings=CONTEXT, short_help="Upload a converted folder to the hub.")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path), metavar="OUTPUT")
@click.argument("repo_id", metavar="ORG/NAME")
@click.option("--private", is_flag=True, help="Create the repository as private.")
@click.option("--revision", metavar="BRANCH", default=None, help="Branch to push to (created from main if missing).")
@click.option("--commit-message", metavar="TEXT", default=None, help="Commit message of the upload.")
@TOKEN
@VERBOSE
def push(folder: Path, repo_id: str, private: bool, revision, commit_message, token, verbose: bool) -> None:
    """Upload a converted folder OUTPUT to the hub repository ORG/NAME (created if needed).

    The folder is only read. A failed upload exits 1 and names its cause; run the same
    command again to retry.
    """

    def upload() -> str:
        return push_to_hub(
            _meft_folder(folder), repo_id, private=private, revision=revision, commit_message=commit_message, token=token
        )

    url = _guarded(verbose, upload, interrupted="Interrupted: the upload did not complete; run the command again.")
    click.echo(f"Pushed to {url}")


@main.command("check", context_settings=CONTEXT, short_help="Check a checkpoint's code and verify it again.")
@click.argument("checkpoint", metavar="OUTPUT_OR_REPO")
@click.option("--revision", metavar="REV", default=None, help="Branch, tag or commit of a hub repository.")
@click.option("--original", metavar="MODEL", default=None, help="The original model (default: the one config.json records).")
@click.option("--verify/--no-verify", default=True, show_default=True, help="Load the model and verify it again.")
@click.option("--seed", default=0, show_default=True, help="Seed of the verification's dropout.")
@TOKEN
@VERBOSE
def check(checkpoint: str, revision, original, verify: bool, seed: int, token, verbose: bool) -> None:
    """Check a converted checkpoint, a local folder or a hub repository.

    Its code files are compared byte for byte with what this version of meft-convert ships.
    Only if they are identical is the model loaded (which runs that code) and verified
    again against its original. Exit code 0: identical and verified; 1: it is not.
    """

    def run():
        from .check import check_checkpoint

        return_freed_memory_promptly()
        return check_checkpoint(
            checkpoint, revision=revision, original=original, verify=verify, seed=seed, token=token, log=click.echo
        )

    result = _guarded(verbose, run, interrupted="Interrupted.")
    if not result.passed:
        click.echo("Error: check failed", err=True)
        sys.exit(1)
    click.echo("Check passed")


ESTIMATE_HELP = """Estimate the GPU memory one training step of MODEL takes at a batch size and sequence length,
for MEFT and the usual alternatives. Reads only MODEL's config.json (a folder, a config file,
or a hub id from the Hugging Face cache; set HF_HUB_OFFLINE=1 to stay offline): no weights,
no torch, no GPU.

\b
    meft-convert estimate meta-llama/Meta-Llama-3-8B --batch-size 1 --seq-len 16384 \\
        --variant meft3 --lambda 2^-10 --beta 2^-10

Per arm (GiB): static = what stays allocated between steps (weights in --dtype, the trainable
parameters and their two AdamW states; full fine-tuning keeps them in --dtype, LoRA and MEFT
adapters in float32); activation = peak − static during one step (forward, backward,
optimizer step), the part that grows with batch × seq; host = pinned host memory an arm keeps
(offloaded layer inputs, offloaded MEFT remainders; --json also gives what torch's pinned
allocator reserves for them, each buffer rounded up to a power of two). Gradients are
allocated in backward and freed after the step, so they count in activation.

The arms: full fine-tuning and LoRA (r=8 on the query and value projections) keep every
layer's activations; gradient checkpointing keeps one tensor per layer (in --dtype) plus one
layer's full working set (offloaded: those tensors on the host). The baselines use the
library's loss unless named "+chunked-loss" (256-token chunks, what MEFT uses). Each MEFT
variant: exact (stream integers, stream values and gradients, one layer's backward with its
MLP recomputed --recompute-chunk-tokens at a time, and every layer's remainders:
log2(m) bits per element per scaled stream for λ or β = 1/m), the same with the remainders
in pinned host memory (+offload), and the paper's float mode (no remainders, approximate
inverse).

The engine settings assumed are the converter's: adapters of width 8 in float32, AdamW,
stream integers of --stream-bits, the causal-LM loss in 256-token chunks, the position-wise
recompute in --recompute-chunk-tokens chunks; SDPA attention.

These are estimates from the config, not measurements. The counts of tensors a layer's
backward holds are fitted to H200 measurements (bf16, torch 2.11, transformers 5.17; see
benchmarks/results): Llama-3-8B at batch 1 × 8k–32k (gated MLP) and OPT-1.3b at 8 × 512
(plain MLP), every arm. Expect them within about 15% of such runs; other architectures, shapes
and library versions are less sure. The MEFT scales assumed are the benchmark's starting
points (λ = 2^-8 for MEFT1, β = 2^-8 for MEFT2, λ = β = 2^-10 for MEFT3); the converter
calibrates them per model (--lambda auto, typically 2^-8 to 2^-12), and a converted model's
config.json holds the calibrated values to pass with --lambda and --beta. The table gives
each variant's remainder bits per element per layer. Allocator fragmentation,
the CUDA context and workspaces beyond 64 MiB are not included.

With --load-in-4bit or --load-in-8bit the frozen base is quantized as transformers' bitsandbytes
integration loads it: the layers' attention and MLP projections take 0.5625 byte per weight in
4 bits (0.5 plus a float32 scale per 64; double quantization about 0.516), 1 byte plus a float32
per row in 8 bits; embeddings, the LM head, norms, biases and every trained adapter or head stay
unquantized. Activations are those of --dtype, the compute dtype, plus one layer's largest
weight matrix dequantised to it (transient); full fine-tuning is left out.
"""


@main.command("estimate", context_settings=CONTEXT, help=ESTIMATE_HELP,
              short_help="Estimate training memory from a config, before converting.")
@click.argument("model", metavar="MODEL")
@click.option("--batch-size", "-b", type=click.IntRange(min=1), required=True, help="Sequences per step.")
@click.option("--seq-len", "-s", type=click.IntRange(min=1), required=True, help="Tokens per sequence.")
@click.option("--json", "as_json", is_flag=True, help="Print the estimate as JSON.")
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]), default=None,
              help="Dtype of the weights and activations (default: the config's torch_dtype, else bf16); with a "
                   "quantized base, its compute dtype and that of what stays unquantized.")
@click.option("--variant", "variants", type=click.Choice(list(VARIANTS)), multiple=True,
              help="MEFT variants to estimate (repeatable; default: all three).")
@click.option("--lambda", "lambda_", type=ScaleType(), default=None,
              help="λ of MEFT1 and MEFT3 (default: the benchmark's starting point, 2^-8 for MEFT1, 2^-10 for MEFT3). "
                   "1/m costs log2(m) bits per element per layer. The converter calibrates λ and β per model "
                   "(--lambda auto): a converted model's config.json holds the values to pass here.")
@click.option("--beta", type=ScaleType(), default=None,
              help="β of MEFT2 and MEFT3 (default: 2^-8 for MEFT2, 2^-10 for MEFT3); like --lambda.")
@click.option("--stream-bits", type=click.Choice(["32", "64"]), default=None,
              help="Width of the stream integers (default: 32 for 16-bit models, 64 for fp32, as conversion picks).")
@click.option("--recompute-chunk-tokens", type=click.IntRange(min=0), default=RECOMPUTE_CHUNK_TOKENS, show_default=True,
              help="Tokens per chunk of MEFT's position-wise recompute (0: the whole sequence).")
@click.option("--load-in-4bit", is_flag=True,
              help="A 4-bit frozen base (bitsandbytes NF4 or FP4, the same size), as BitsAndBytesConfig(load_in_4bit=True) "
                   "loads it: the layers' linear projections quantized, the rest in --dtype.")
@click.option("--bnb-4bit-use-double-quant/--no-bnb-4bit-use-double-quant", "double_quant", default=None,
              help="With --load-in-4bit: its scales quantized too (default: off, as in transformers).")
@click.option("--load-in-8bit", is_flag=True, help="An 8-bit frozen base (LLM.int8, BitsAndBytesConfig(load_in_8bit=True)).")
@click.option("--revision", metavar="REV", default=None, help="Branch, tag or commit of a hub model.")
@TOKEN
@VERBOSE
def estimate(model: str, batch_size: int, seq_len: int, as_json: bool, dtype, variants, lambda_, beta, stream_bits,
             recompute_chunk_tokens: int, load_in_4bit: bool, double_quant: bool | None, load_in_8bit: bool, revision,
             token, verbose: bool) -> None:
    if load_in_4bit and load_in_8bit:
        raise click.UsageError("--load-in-4bit and --load-in-8bit exclude each other: give one")
    if double_quant and not load_in_4bit:
        raise click.UsageError("--bnb-4bit-use-double-quant needs --load-in-4bit")

    def run():
        from .estimate import Quantization, estimate_memory, load_config

        bits = 4 if load_in_4bit else 8 if load_in_8bit else None
        return estimate_memory(
            load_config(model, revision, token), batch_size, seq_len, dtype=dtype,
            variants=tuple(variants) or tuple(VARIANTS), lambda_=lambda_, beta=beta,
            stream_bits=int(stream_bits) if stream_bits else None, recompute_chunk_tokens=recompute_chunk_tokens,
            quantization=Quantization(bits, bool(double_quant)) if bits else None,
        )

    result = _guarded(verbose, run, interrupted="Interrupted.")
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        from .estimate import format_table

        click.echo(format_table(result))
