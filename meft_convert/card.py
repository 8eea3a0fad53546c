"""The model card (README.md) written into every converted checkpoint.

YAML front matter the Hub reads (base model, license, pipeline, tags), then what a user needs
before trusting the checkpoint: the settings, what trains, the verification figures measured
at conversion (the same numbers as meft_report.json), how to load it with a pinned revision,
how to fine-tune it (snippets that run as written, for the head it declares), its activation memory
as `meft_convert.estimate` puts it for a stated shape beside LoRA + checkpointing, and where the
code came from. A local original is named by its folder's name only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__

if TYPE_CHECKING:  # verify.py imports torch, which a card written without verification does not need
    from .verify import VerificationReport

PIPELINE_TAGS = {
    "AutoModel": "feature-extraction",
    "AutoModelForSequenceClassification": "text-classification",
    "AutoModelForQuestionAnswering": "question-answering",
    "AutoModelForMaskedLM": "fill-mask",
    "AutoModelForCausalLM": "text-generation",
    "AutoModelForSeq2SeqLM": "text2text-generation",
}
# the shape the card's memory estimate is stated for (cut to the model's positions): one long
# sequence for causal LMs, a batch of 512-token sequences for other models
CAUSAL_LM_SHAPE = (1, 4096)
OTHER_SHAPE = (32, 512)
CITATION = """@inproceedings{liao2023make,
  title     = {Make Pre-trained Model Reversible: From Parameter to Memory Efficient Fine-Tuning},
  author    = {Liao, Baohao and Tan, Shaomu and Monz, Christof},
  booktitle = {Advances in Neural Information Processing Systems},
  year      = {2023}
}"""


@dataclass
class CardFacts:
    """What the card states, gathered by convert()."""

    name: str  # how the snippets refer to the model: the hub repository or the folder's name
    source: str  # the model converted, as the user gave it
    base_model: str | None  # its hub id, if it came from the hub
    license: str | None  # the base model's, from its own card
    auto_class: str  # e.g. "AutoModelForCausalLM"
    model_type: str  # the PLM's, e.g. "opt"
    settings: dict  # MEFT settings, as in config.json
    num_layers: int
    trainable: int
    total: int
    report: VerificationReport | None
    calibration: dict | None = None  # config.json's meft_calibration, when conversion measured settings
    plm_config: dict | None = None  # the original's config.json, for the memory estimate ...
    dtype: str | None = None  # ... in the dtype of its layers ("fp32", "fp16", "bf16")


def base_model_license(folder: Path) -> str | None:
    """The license the original model's card declares, if it has a card."""
    readme = Path(folder) / "README.md"
    if not readme.is_file():
        return None
    from huggingface_hub import ModelCard  # a few tenths of a second to import: only for a card to read

    try:
        return ModelCard.load(readme).data.license
    except Exception:  # noqa: BLE001 (a malformed card upstream: no license to copy, not a failed conversion)
        return None


def _project_url(label: str) -> str | None:
    try:
        urls = metadata.metadata("meft-convert").get_all("Project-URL") or []
    except metadata.PackageNotFoundError:
        return None
    for entry in urls:
        name, _, url = entry.partition(",")
        if name.strip().lower() == label:
            return url.strip()
    return None


def _front_matter(facts: CardFacts) -> list[str]:
    lines = ["---"]
    if facts.base_model:
        lines.append(f"base_model: {facts.base_model}")
    if facts.license:
        lines.append(f"license: {facts.license}")
    lines += [
        "library_name: transformers",
        f"pipeline_tag: {PIPELINE_TAGS[facts.auto_class]}",
        "tags:",
        "- meft",
        "- reversible",
        f"- {facts.settings['variant']}",
        f"- {facts.model_type}",
        "---",
    ]
    return lines


def _settings_table(facts: CardFacts) -> list[str]:
    s = facts.settings
    layers = facts.num_layers if s["reversible_layers"] is None else s["reversible_layers"]
    rows = [
        ("variant", s["variant"].upper()),
        ("λ (scale of x1)", _scale(s["lambda_"]) + _measured(facts, "lambda_")),
        ("β (scale of x2)", _scale(s["beta"]) + _measured(facts, "beta")),
        ("adapter size r", s["adapter_dim"]),
        ("adapter init", f"{s['adapter_init']} (σ = {s['adapter_init_std']:g})" + _measured(facts, "adapter_init")),
        ("output stream", s["output_stream"]),
        ("inverse", f"exact ({s['stream_bits']}-bit fixed point, {s['frac_bits']} fractional bits)" + _measured(facts, "stream_bits")
         if s["exact"] else "float (the paper's; approximate)"),
        ("reversible layers", f"{layers} of {facts.num_layers}"),
    ]
    return ["| setting | value |", "|---|---|", *[f"| {key} | {value} |" for key, value in rows]]


def _measured(facts: CardFacts, name: str) -> str:
    calibration = facts.calibration or {}
    if name not in calibration.get("auto", ()):
        return ""
    return " (auto: measured at conversion)" if name in ("lambda_", "beta") else " (auto)"


def _scale(value: float) -> str:
    """0.000488281 = 2^-11: the power of two, where it is one."""
    exponent = math.log2(value) if value > 0 else 0.0
    return f"{value:g}" + (f" = 2^{round(exponent)}" if exponent < 0 and exponent == round(exponent) else "")


def _describe(figures: dict) -> str:
    if "perplexity" in figures:
        ppl32 = figures.get("original_float32_perplexity")
        in_float32 = "" if ppl32 is None else f" ({ppl32:.4g} in float32)"
        return (f"perplexity {figures['perplexity']:.4g} against the original's {figures['original_perplexity']:.4g}{in_float32}, "
                f"next-token top-1 agreement {100 * figures['top1_agreement']:.1f}%")
    return f"cosine similarity to the original {figures['cosine_min']:.6f} on the worst token (mean {figures['cosine_mean']:.6f})"


def calibration_lines(calibration: dict | None) -> list[str]:
    """Why the settings are what they are: what `auto` measured, and the paper's init's cost."""
    if not calibration or not calibration.get("auto"):
        return []
    c = calibration
    bits = c["remainder_bits"]
    other = next((key for key in c if key.endswith("_init_figures")), None)
    lines = [
        "## Starting point",
        "",
        (f"Measured at conversion on {c['tokens']} tokens of public-domain English (`{c['text']}` of meft-convert), in "
         f"{c['dtype']}, for the settings left to `auto` ({', '.join(c['auto'])}). The target: {c['target']}. Each scaled "
         "stream gets the largest scale 1/2^k that meets it: its remainders take k bits per element per layer in training, "
         "so a smaller scale than needed only costs memory."),
        "",
        (f"Chosen: λ = {_scale(c['lambda_'])} ({bits['lambda_']} remainder bits), β = {_scale(c['beta'])} ({bits['beta']} bits), "
         f"adapter init {c['adapter_init']}: {_describe(c['figures'])}"
         + ("." if c["meets_target"] else " — **this misses the target**.")),
    ]
    if other:
        lines.append(f"The {other.split('_')[0]} init of the adapters at the same scales: {_describe(c[other])}.")
    if "stream_range" in c:
        r = c["stream_range"]
        lines.append(
            f"Largest |hidden state| of the streams: {r['max_abs']:.4g} ({r['layer']}); the exact streams are "
            f"{c['stream_bits']}-bit with {c['frac_bits']} fractional bits."
        )
    return [*lines, ""]


def verification_rows(report: VerificationReport) -> list[tuple[str, str]]:
    """The figures the card shows, from the verification report (as measured at conversion)."""
    f = report.fidelity
    rows = [
        ("tokens compared", str(report.tokens)),
        ("cosine similarity to the original, mean", f"{f.cosine_mean:.6f}"),
        ("cosine similarity to the original, min", f"{f.cosine_min:.6f}"),
    ]
    if f.perplexity is not None:
        rows.append(("perplexity (original's)", f"{f.perplexity:.4g} ({f.original_perplexity:.4g})"))
        if f.original_float32_perplexity is not None:
            rows.append(("original's perplexity computed in float32", f"{f.original_float32_perplexity:.4g}"))
        if f.original_perturbed_perplexities:
            rows.append(("original's perplexity with its embeddings scaled by 1 ± 2^-16",
                         ", ".join(f"{p:.4g}" for p in f.original_perturbed_perplexities)))
    if f.top1_agreement is not None:
        rows.append(("top-1 prediction agreement", f"{100 * f.top1_agreement:.2f}%"))
        rows.append(("KL divergence original → converted", f"{f.kl_mean:.3e}"))
    if report.reconstruction:
        if report.settings["exact"]:
            differing = sum(r["differing_elements"] for r in report.reconstruction)
            rows.append(("reconstructed layer inputs: differing elements", str(differing)))
        else:
            worst = max(r["relative_error"] for r in report.reconstruction)
            rows.append(("reconstructed layer inputs: worst relative error", f"{worst:.3e}"))
        rows.append(("reversible layers checked", str(len(report.reconstruction))))
    if report.gradients:
        g = report.gradients
        rows.append(("gradients bitwise equal to plain autograd", f"{g['bitwise_equal']}/{g['tensors']} tensors"))
        rows.append(("gradients, max relative difference", f"{g['max_relative_difference']:.3e}"))
    if report.scope:
        rows.append(("checked", report.scope))
    if not report.passed:
        verdict = "FAILED: " + "; ".join(report.problems)
    elif report.accepted_losses:
        verdict = "kept with --allow-low-fidelity: fidelity was lost (below)"
    else:
        verdict = "passed"
    rows.append(("result", verdict))
    return rows


def memory_shape(facts: CardFacts) -> tuple[int, int]:
    """(batch, sequence length) the memory estimate is stated for."""
    batch, seq_len = CAUSAL_LM_SHAPE if facts.auto_class == "AutoModelForCausalLM" else OTHER_SHAPE
    positions = next(
        (facts.plm_config[k] for k in ("max_position_embeddings", "n_positions")
         if isinstance((facts.plm_config or {}).get(k), int) and facts.plm_config[k] > 0),
        None,
    )
    if positions is not None and positions < seq_len:
        seq_len = positions - 2 if facts.model_type == "roberta" else positions  # RoBERTa's start after the padding index
    return batch, seq_len


def memory_lines(facts: CardFacts) -> list[str]:
    """The estimated activation memory at a stated shape, from `meft_convert.estimate` (the
    settings of this checkpoint), beside LoRA + checkpointing's for the same shape; which of
    the two keeps less is said as the estimate has it."""
    if not facts.plm_config:
        return []
    from .errors import BadInputError
    from .estimate import estimate_memory, memory_line

    s = facts.settings
    batch, seq_len = memory_shape(facts)
    scales = {"lambda_": s["lambda_"], "beta": s["beta"]}
    given = {"stream_bits": s["stream_bits"] if s["exact"] else None, "dtype": facts.dtype, **scales}
    try:
        line = memory_line(facts.plm_config, batch, seq_len, s["variant"], exact=s["exact"], **given)
        arms = estimate_memory(facts.plm_config, batch, seq_len, variants=(s["variant"],), **given)["arms"]
    except BadInputError:  # a config the estimate cannot read: no figure rather than a wrong one
        return []
    mine = arms[s["variant"] if s["exact"] else s["variant"] + "-float"]["activation_gib"]
    gc = arms.get("lora+gc+chunked-loss", arms["lora+gc"])["activation_gib"]
    if mine < gc:
        verdict = f"At this shape the estimate has MEFT keeping {100 * (1 - mine / gc):.0f}% less than LoRA + gradient checkpointing."
    else:
        verdict = "At this shape the estimate has LoRA + gradient checkpointing keeping less activation memory than MEFT."
    benchmark = _project_url("benchmarks")
    where = f"[the benchmarks]({benchmark})" if benchmark else "`benchmarks/README.md` of meft-convert"
    return [
        "## Memory",
        "",
        f"{line} {verdict} Measured figures for other models and shapes: {where}.",
        "",
    ]


def _example_inputs(auto_class: str) -> list[str]:
    """The lines of the fine-tuning snippet that make a batch and its loss, for the checkpoint's head."""
    batch = 'batch = tokenizer(["MEFT keeps the pretrained model frozen.", "Only small adapters learn."], return_tensors="pt", padding=True)'
    if auto_class in ("AutoModelForCausalLM", "AutoModelForMaskedLM", "AutoModelForSeq2SeqLM"):
        # the LM heads compute their own loss from labels (padding excluded with -100)
        return [
            batch,
            'labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)',
            "loss = model(**batch, labels=labels).loss",
        ]
    if auto_class == "AutoModelForSequenceClassification":
        return [batch, "loss = model(**batch, labels=torch.tensor([0, 1])).loss"]
    if auto_class == "AutoModelForQuestionAnswering":
        return [batch, "loss = model(**batch, start_positions=torch.tensor([1, 2]), end_positions=torch.tensor([3, 4])).loss"]
    # a base model has no loss: e.g. train its mean-pooled sentence embeddings to be similar
    return [
        batch,
        "hidden = model(**batch).last_hidden_state                  # (batch, tokens, hidden)",
        'mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)',
        "embeddings = (hidden * mask).sum(1) / mask.sum(1)           # mean over each sentence's tokens",
        "loss = 1 - torch.nn.functional.cosine_similarity(embeddings[0], embeddings[1], dim=0)",
    ]


def _what_trains(facts: CardFacts) -> str:
    from .templates.families import family_for

    try:
        head = family_for(facts.model_type).head_for(facts.auto_class).trainable
    except (ValueError, KeyError):
        head = ()
    if head:
        return f"the adapters and the task head ({', '.join(f'`{m}`' for m in head)}) train"
    return "only the adapters train"


def _stored_quantization_lines(facts: CardFacts) -> list[str]:
    """For a checkpoint converted from one published in 4 bits: how its layers are stored and load."""
    q = (facts.plm_config or {}).get("quantization_config")
    from .weights import is_bnb_4bit

    if not is_bnb_4bit(q):
        return []
    details = [q.get("bnb_4bit_quant_type", "fp4").upper()]
    if q.get("bnb_4bit_use_double_quant"):
        details.append("double quantization")
    if q.get("bnb_4bit_compute_dtype"):
        details.append(f"computing in {q['bnb_4bit_compute_dtype']}")
    return [
        (f"The pretrained layers' linear projections are stored in 4 bits (bitsandbytes, {', '.join(details)}), as"
         f" in `{facts.source}`, and `config.json` keeps its `quantization_config`: the model loads in 4 bits as it"
         " is, without re-quantizing (`pip install bitsandbytes`); the adapters and any task head stay unquantized."),
        "",
    ]


def model_card(facts: CardFacts) -> str:
    """The README.md of a converted checkpoint."""
    s = facts.settings
    percent = 100 * facts.trainable / facts.total if facts.total else 0.0
    lines = [
        *_front_matter(facts),
        "",
        f"# {facts.name.split('/')[-1]}",
        "",
        (f"`{facts.source}` converted by meft-convert {__version__} into the {s['variant'].upper()} architecture of "
         "*Make Pre-trained Model Reversible: From Parameter to Memory Efficient Fine-Tuning* (Liao, Tan, Monz, "
         "NeurIPS 2023): bottleneck adapters on a frozen pretrained model whose layers are reversible, so that "
         "training recomputes each layer's input from its output instead of storing activations."),
        "",
        "## Settings",
        "",
        *_settings_table(facts),
        "",
        (f"Trainable parameters: {facts.trainable:,} of {facts.total:,} ({percent:.4f}%): {_what_trains(facts)};"
         " the pretrained weights are frozen and kept byte for byte."),
        "",
        *_stored_quantization_lines(facts),
        *calibration_lines(facts.calibration),
        "## Verification at conversion",
        "",
    ]
    if facts.report is None:
        lines += ["Not verified at conversion (`--no-verify`). `meft-convert check` verifies it."]
    else:
        lines += [
            (f"Measured on {facts.report.tokens} tokens against `{facts.report.model}` "
             "(also in `meft_report.json`):"),
            "",
            "| measure | value |",
            "|---|---|",
            *[f"| {key} | {value} |" for key, value in verification_rows(facts.report)],
        ]
        if facts.report.accepted_losses:
            lines += [
                "",
                ("**Starting-point fidelity was lost.** This checkpoint was kept with `--allow-low-fidelity`, although "
                 f"its verification missed the target ({facts.report.target}):"),
                "",
                *[f"- {loss}" for loss in facts.report.accepted_losses],
            ]
    lines += [
        "",
        "## Load",
        "",
        ("The checkpoint carries its own modeling code, so loading it needs `trust_remote_code=True`: that code"
         " runs on your machine. Pin the revision (commit) you reviewed, so that later pushes cannot change it:"),
        "",
        "```python",
        f"from transformers import {facts.auto_class}, AutoTokenizer",
        "",
        f'model = {facts.auto_class}.from_pretrained("{facts.name}", trust_remote_code=True, revision="COMMIT")',
        f'tokenizer = AutoTokenizer.from_pretrained("{facts.name}", trust_remote_code=True, revision="COMMIT")',
        "```",
        "",
        ("The code files (`*.py`) only define the model: they read no files (except the adapter-only save and load"
         " you call yourself, safetensors and JSON), open no connections and run no other programs. `config.json` records the meft-convert version that wrote them and each file's sha256;"
         f" `meft-convert check {facts.name}` tells whether they are byte-identical to what that version of"
         " meft-convert ships, and verifies the model again."),
        "",
        "## Fine-tune",
        "",
        (f"Train as usual (Trainer, accelerate or your own loop); {_what_trains(facts)}. One step on the model"
         " and tokenizer loaded above:"),
        "",
        "```python",
        "import torch",
        "",
        "if tokenizer.pad_token is None:",
        "    tokenizer.pad_token = tokenizer.eos_token",
        "model.print_trainable_parameters()",
        "optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)",
        "model.train()  # the reversible path: activations are recomputed in backward",
        *_example_inputs(facts.auto_class),
        "loss.backward()",
        "optimizer.step()",
        "optimizer.zero_grad()",
        "```",
        "",
        ("The exact inverse gives the same gradients as plain autograd, bit for bit."
         if s["exact"] else "The float inverse (the paper's) reconstructs each layer's input approximately."),
        "",
        *memory_lines(facts),
        "## Citation",
        "",
        "```bibtex",
        CITATION,
        "```",
    ]
    return "\n".join(lines) + "\n"
