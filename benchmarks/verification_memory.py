"""Peak memory of a default conversion (calibration and verification on) against the checkpoint.

Builds a checkpoint of a config in tests/data/configs (default: OPT-1.3b in fp16, as
benchmarks/conversion_speed.py does) with random weights in a scratch folder and runs the README's main command on it under /usr/bin/time -v:
all defaults, so the `auto` settings are calibrated and the result is verified. Records the
peak RSS against the checkpoint's size (target: at most 1.29x), the wall time and what the
verification checked.

    python benchmarks/verification_memory.py --out benchmarks/results/verification-memory.json
    python benchmarks/verification_memory.py --config tinyllama-1.1b --dtype bf16 \
        --out benchmarks/results/verification-memory-tinyllama.json
    python benchmarks/verification_memory.py --config llama-3-8b --dtype bf16 \
        --out benchmarks/results/verification-memory-llama-3-8b.json   # 16 GB on disk, twice
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch  # noqa: E402
import transformers  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conversion_speed import ROOT, timed  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def build_checkpoint(folder: Path, config_name: str, dtype: torch.dtype) -> int:
    """A model of tests/data/configs/<config_name>.json with random weights, saved in `dtype`."""
    values = json.loads((ROOT / "tests" / "data" / "configs" / f"{config_name}.json").read_text())
    values.pop("_name_or_path", None)
    config = transformers.AutoConfig.for_model(values.pop("model_type"), **values)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = getattr(transformers, config.architectures[0])(config)
    # Materialised in `dtype` directly: an 8B model in float32 would not fit beside its copy.
    model.to(dtype).to_empty(device="cpu")
    model.init_weights()
    model.save_pretrained(folder, max_shard_size="1GB")
    del model
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--variant", default="meft3")
    parser.add_argument("--config", default="opt-1.3b", help="a config in tests/data/configs")
    parser.add_argument("--dtype", default="fp16", choices=tuple(DTYPES))
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="meft-verification-"))
    try:
        source = scratch / f"{args.config}-shaped"
        checkpoint_bytes = build_checkpoint(source, args.config, DTYPES[args.dtype])
        output = scratch / "meft"
        command = [str(Path(sys.executable).parent / "meft-convert"), str(source), "--output", str(output), "--variant", args.variant]
        run = timed(command)
        report = json.loads((output / "meft_report.json").read_text())
        config = json.loads((output / "config.json").read_text())
        result = {
            "date": time.strftime("%Y-%m-%d"),
            "command": " ".join(sys.argv),
            "measured_with": "/usr/bin/time -v " + " ".join(["meft-convert", "CHECKPOINT", "--output", "OUT", "--variant", args.variant]),
            "machine": "the project's CPU machine (2 cores, 24 GiB)",
            "checkpoint": f"{args.config} config, random {args.dtype} weights, 1 GB safetensors shards",
            "checkpoint_bytes": checkpoint_bytes,
            "seconds": run["seconds"],
            "max_rss_bytes": run["max_rss_bytes"],
            "rss_over_checkpoint": run["max_rss_bytes"] / checkpoint_bytes,
            "target_rss_over_checkpoint": 1.29,
            "verified": {
                "dtype": report["dtype"],
                "fidelity_tokens": report["tokens"],
                "reversible_layers_rebuilt": len(report["reconstruction"]),
                "differing_elements": sum(r["differing_elements"] for r in report["reconstruction"]),
                "gradients": report["gradients"],
                "passed": report["passed"],
                "problems": report["problems"],
            },
            "settings": {k: config[k] for k in ("variant", "lambda_", "beta", "adapter_init", "stream_bits", "frac_bits")},
            "calibration_trials": len(config["meft_calibration"]["trials"]),
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps(result, indent=1))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
