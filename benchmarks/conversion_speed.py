"""Conversion time and peak memory against copying the checkpoint's files, and start-up time.

Builds an OPT-1.3b-shaped checkpoint (random fp16 weights, 1 GB safetensors shards) in a
scratch folder (or uses --checkpoint), then times, with /usr/bin/time -v, `cp -r` of it and
`meft-convert` of it, alternating, each output removed and `sync` run before the next command,
so that one run's writes do not slow the next. The conversion is the one that needs no model: no verification (which loads
both models and is a separate step) and every setting given (CONVERT_SETTINGS; `auto` ones are
measured on the model), so it imports neither torch nor transformers: the shards are copied by
the kernel, the plan comes from their headers and the original's config.json, and the adapters
are the only tensors it creates. One more run under `python -X importtime` records where its
start-up goes. It also times `meft-convert --help` and a usage error (a missing --output),
which must not wait for torch.

    python benchmarks/conversion_speed.py --out benchmarks/results/conversion.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# settings that need no calibration: given, not `auto`, and 64-bit streams (32-bit ones are sized
# from hidden states measured on the model)
CONVERT_SETTINGS = ["--variant", "meft3", "--lambda", "2^-8", "--beta", "2^-8", "--stream-bits", "64", "--adapter-init", "zero",
                    "--no-verify"]


def build_checkpoint(folder: Path) -> int:
    import torch
    import transformers

    values = json.loads((ROOT / "tests" / "data" / "configs" / "opt-1.3b.json").read_text())
    values.pop("_name_or_path", None)
    config = transformers.AutoConfig.for_model(values.pop("model_type"), **values)
    torch.manual_seed(0)
    model = transformers.OPTForCausalLM(config).to(torch.float16)
    model.save_pretrained(folder, max_shard_size="1GB")
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def timed(command: list[str], expect: int = 0, cwd: Path | None = None) -> dict:
    """Wall time and peak RSS of a command, as /usr/bin/time -v reports them."""
    subprocess.run(["sync"], check=True)
    result = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True, cwd=cwd)
    if result.returncode != expect:
        raise RuntimeError(f"{command} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    wall = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", result.stderr)
    hours, minutes, seconds = (float(g) if g else 0.0 for g in wall.groups())
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr).group(1))
    return {"command": " ".join(command), "seconds": hours * 3600 + minutes * 60 + seconds, "max_rss_bytes": rss_kb * 1024}


def import_times(command: list[str], cwd: Path | None = None, top: int = 12) -> dict:
    """The modules a command imports (python -X importtime): whether torch or transformers is
    among them, the total, and the `top` slowest imported directly by the command's own code."""
    subprocess.run(["sync"], check=True)
    result = subprocess.run([sys.executable, "-X", "importtime", *command], capture_output=True, text=True, cwd=cwd)
    if result.returncode != 0:
        raise RuntimeError(f"{command} failed:\n{result.stderr[-2000:]}")
    rows = [re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line) for line in result.stderr.splitlines()]
    rows = [(int(r[2]), len(r[3]), r[4]) for r in rows if r]
    outermost = min(depth for _, depth, _ in rows)
    direct = sorted(((us, name) for us, depth, name in rows if depth == outermost), reverse=True)
    return {
        "command": " ".join(["python", "-X", "importtime", *command]),
        "imports_torch": any(name.split(".")[0] == "torch" for _, _, name in rows),
        "imports_transformers": any(name.split(".")[0] == "transformers" for _, _, name in rows),
        "total_import_seconds": sum(us for us, _ in direct) / 1e6,
        "slowest_direct_imports_seconds": {name: us / 1e6 for us, name in direct[:top]},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each command; the median is reported")
    parser.add_argument("--checkpoint", type=Path, help="an OPT-1.3b-shaped checkpoint built before (default: build one)")
    parser.add_argument(
        "--baseline", type=Path,
        help="a folder holding another version's meft_convert package with its templates inside it as "
        "meft_convert/templates (`git archive COMMIT meft_convert templates | tar -x -C DIR && mv DIR/templates "
        "DIR/meft_convert/`), timed the same way, interleaved, through PYTHONPATH",
    )
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="meft-conversion-"))
    meft_convert = str(Path(sys.executable).parent / "meft-convert")
    try:
        source = args.checkpoint or scratch / "opt-1.3b-shaped"
        if args.checkpoint is None:
            build_checkpoint(source)
        checkpoint_bytes = sum(f.stat().st_size for f in source.glob("*.safetensors"))
        runs: dict[str, list[dict]] = {"copy": [], "convert": [], "help": [], "usage_error": [], "convert_help": []}
        for i in range(args.repeats):
            runs["help"].append(timed([meft_convert, "--help"]))
            runs["usage_error"].append(timed([meft_convert, str(source)], expect=2))
            # lists the supported model types, read from the family table (which loads torch only in a model)
            runs["convert_help"].append(timed([meft_convert, "convert", "--help"]))
            if args.baseline is not None:
                # from the scratch folder, so that this checkout's meft_convert is not on the path
                baseline = ["env", f"PYTHONPATH={args.baseline.absolute()}", sys.executable, "-m", "meft_convert"]
                runs.setdefault("baseline_help", []).append(timed([*baseline, "--help"], cwd=scratch))
                runs.setdefault("baseline_convert", []).append(timed(
                    [*baseline, str(source), "--output", str(scratch / f"baseline-{i}"), *CONVERT_SETTINGS], cwd=scratch,
                ))
                shutil.rmtree(scratch / f"baseline-{i}")
            # each output is removed before the next command: a checkpoint-sized folder just written
            # (synced or not) slows the next large write on this machine several times over
            runs["copy"].append(timed(["cp", "-r", str(source), str(scratch / f"copy-{i}")]))
            shutil.rmtree(scratch / f"copy-{i}")
            runs["convert"].append(timed([meft_convert, str(source), "--output", str(scratch / f"meft-{i}"), *CONVERT_SETTINGS]))
            shutil.rmtree(scratch / f"meft-{i}")
        imports = import_times(["-m", "meft_convert", str(source), "--output", str(scratch / "meft-imports"), *CONVERT_SETTINGS])
        shutil.rmtree(scratch / "meft-imports")
        median = {k: sorted(v, key=lambda r: r["seconds"])[len(v) // 2] for k, v in runs.items()}
        result = {
            "date": time.strftime("%Y-%m-%d"),
            "command": " ".join(sys.argv),
            "machine": "the project's CPU machine (2 cores)",
            "checkpoint": "OPT-1.3b config, random fp16 weights, 1 GB safetensors shards",
            "checkpoint_bytes": checkpoint_bytes,
            "shards": len(list(source.glob("*.safetensors"))),
            "runs": runs,
            "median_seconds": {k: r["seconds"] for k, r in median.items()},
            "baseline": None if args.baseline is None else str(args.baseline),
            "load_average_after": os.getloadavg(),
            "convert_over_copy_time": median["convert"]["seconds"] / median["copy"]["seconds"],
            "convert_rss_over_checkpoint": median["convert"]["max_rss_bytes"] / checkpoint_bytes,
            "convert_settings": CONVERT_SETTINGS,
            "convert_imports": imports,
        }
        if args.baseline is not None:
            result["baseline_convert_over_copy_time"] = median["baseline_convert"]["seconds"] / median["copy"]["seconds"]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
