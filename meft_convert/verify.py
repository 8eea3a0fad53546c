"""Checks a converted checkpoint against its original, side by side.

Three things are measured on a few sentences:

- starting-point fidelity: cosine similarity, per real token, of the last hidden states of
  the original and the converted model (mean and min); for language-model heads also the
  top-1 agreement of the predicted tokens and the KL divergence original → converted;
- reconstruction: every reversible layer's input, rebuilt in backward, against the one seen
  in forward (bit-exact in exact mode; the relative error in float mode);
- gradients: the trainable parameters' gradients of the reversible backward against plain
  autograd through the same model, with dropout on.

The report also gives the fidelity of every variant at the paper's default settings.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import transformers

from .templates.configuration_meft import VARIANT_DEFAULTS
from .templates.families import family_for

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Reversible networks recompute activations instead of storing them.",
    "Fine-tuning large language models needs a lot of memory on small GPUs, and activations take most of it.",
    "Hello world!",
]
GRADIENT_TOLERANCE = 1e-6  # relative, for exact mode; summation order may differ in some kernels
LM_HEADS = ("AutoModelForCausalLM", "AutoModelForMaskedLM", "AutoModelForSeq2SeqLM")


@dataclass
class Fidelity:
    cosine_mean: float
    cosine_min: float
    top1_agreement: float | None = None
    kl_mean: float | None = None


@dataclass
class VerificationReport:
    model: str
    architecture: str
    settings: dict
    tokens: int
    fidelity: Fidelity
    reconstruction: list[dict] = field(default_factory=list)
    gradients: dict = field(default_factory=dict)
    reference: list[dict] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}

    def save(self, folder: Path) -> None:
        (folder / "meft_report.json").write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def to_text(self) -> str:
        s = self.settings
        f = self.fidelity
        lines = [
            f"MEFT verification: {self.model} -> {self.architecture}",
            f"  settings      {s['variant']}, lambda={s['lambda_']:g}, beta={s['beta']:g}, adapter_dim={s['adapter_dim']}, "
            f"init={s['adapter_init']}, output_stream={s['output_stream']}, exact={s['exact']}, "
            f"reversible_layers={'all' if s['reversible_layers'] is None else s['reversible_layers']}",
            f"  fidelity      cosine mean {f.cosine_mean:.6f}, min {f.cosine_min:.6f} over {self.tokens} tokens",
        ]
        if f.top1_agreement is not None:
            lines.append(f"                top-1 agreement {100 * f.top1_agreement:.2f}%, KL {f.kl_mean:.3e}")
        if self.reconstruction:
            if s["exact"]:
                differing = sum(r["differing_elements"] for r in self.reconstruction)
                lines.append(
                    f"  reconstruction {len(self.reconstruction)} reversible layers, {differing} differing elements"
                    + (" (bit-exact)" if differing == 0 else "")
                )
            else:
                worst = max(r["relative_error"] for r in self.reconstruction)
                lines.append(f"  reconstruction {len(self.reconstruction)} reversible layers, worst relative error {worst:.3e} (float mode)")
        if self.gradients:
            g = self.gradients
            lines.append(
                f"  gradients     {g['bitwise_equal']}/{g['tensors']} tensors bitwise equal to plain autograd, "
                f"max relative difference {g['max_relative_difference']:.3e}"
            )
        if self.reference:
            lines.append("  each variant at the paper's defaults (cosine mean / min):")
            for r in self.reference:
                lines.append(
                    f"    {r['variant']}  lambda={r['lambda_']:g} beta={r['beta']:g}  "
                    f"plm stream {r['plm'][0]:.4f} / {r['plm'][1]:.4f}   mean of streams {r['mean'][0]:.4f} / {r['mean'][1]:.4f}"
                )
        lines.append("  result        " + ("passed" if self.passed else "FAILED: " + "; ".join(self.problems)))
        return "\n".join(lines)


@contextlib.contextmanager
def quiet_transformers():
    previous = transformers.logging.get_verbosity()
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(previous)
        if bars:
            transformers.utils.logging.enable_progress_bar()


@contextlib.contextmanager
def _seeded(seed: int):
    """Reproducible randomness without disturbing the caller's generators."""
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
        torch.manual_seed(seed)
        yield


def _inputs(source: Path, vocab_size: int, sentences: list[str]) -> dict[str, torch.Tensor]:
    """The sentences, tokenised with the original's tokenizer; random tokens if it has none."""
    if any((source / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json")):
        try:
            with quiet_transformers():
                tokenizer = transformers.AutoTokenizer.from_pretrained(source)
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
            encoded = dict(tokenizer(sentences, return_tensors="pt", padding=True))
            if encoded["input_ids"].numel() and int(encoded["input_ids"].max()) < vocab_size:
                return {k: encoded[k] for k in ("input_ids", "attention_mask")}
        except Exception:
            pass
    # random tokens of different lengths, so that padding is exercised all the same
    generator = torch.Generator().manual_seed(0)
    lengths = [min(8 + 5 * i, 24) for i in range(len(sentences))]
    ids = torch.randint(5, vocab_size, (len(sentences), max(lengths)), generator=generator)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _auto_class_for(family, architecture: str) -> str:
    for auto_class, head in family.heads.items():
        if head.library_class == architecture or "Meft" + head.library_class == architecture:
            return auto_class
    return "AutoModel"


def _forward(model, inputs, lm: bool):
    base = model.base_model(**inputs)
    logits = model(**inputs).logits if lm else None
    return base.last_hidden_state.float(), logits


def _fidelity(reference, converted, mask: torch.Tensor) -> Fidelity:
    (h0, logits0), (h1, logits1) = reference, converted
    real = mask.bool()
    cosine = torch.nn.functional.cosine_similarity(h0, h1, dim=-1)[real]
    fidelity = Fidelity(cosine.mean().item(), cosine.min().item())
    if logits0 is not None:
        l0, l1 = logits0.float()[real], logits1.float()[real]
        fidelity.top1_agreement = (l0.argmax(-1) == l1.argmax(-1)).float().mean().item()
        log_p, log_q = l0.log_softmax(-1), l1.log_softmax(-1)
        fidelity.kl_mean = (log_p.exp() * (log_p - log_q)).sum(-1).mean().item()
    return fidelity


def _training_loss(model, inputs, lm_auto_class: str | None, seed: int) -> torch.Tensor:
    if lm_auto_class in ("AutoModelForCausalLM", "AutoModelForSeq2SeqLM"):
        labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
        return model(**inputs, labels=labels).loss
    hidden = model.base_model(**inputs).last_hidden_state
    weights = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(seed + 1)).to(hidden.dtype)
    return (hidden * weights * inputs["attention_mask"][..., None]).sum() / inputs["attention_mask"].sum()


def _gradients(model, inputs, lm_auto_class, mode: str, seed: int) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    with _seeded(seed), model.meft_backward(mode):
        _training_loss(model, inputs, lm_auto_class, seed).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def _compare_gradients(reversible: dict, vanilla: dict) -> dict:
    worst, equal = 0.0, 0
    for name, ref in vanilla.items():
        got = reversible.get(name)
        if got is None:
            worst = math.inf
            continue
        equal += int(torch.equal(got, ref))
        denominator = ref.norm().item()
        difference = (got - ref).norm().item()
        worst = max(worst, difference / denominator if denominator > 0 else difference)
    return {"tensors": len(vanilla), "bitwise_equal": equal, "max_relative_difference": worst,
            "missing": sorted(set(vanilla) - set(reversible))}


def _reconstruction(trace: list, exact: bool) -> list[dict]:
    forward = {name: (x1, x2) for kind, name, x1, x2 in trace if kind == "forward"}
    rows = []
    for kind, name, x1, x2 in trace:
        if kind != "backward":
            continue
        f1, f2 = forward[name]
        if exact:
            rows.append({"layer": name, "differing_elements": int((f1 != x1).sum() + (f2 != x2).sum())})
        else:
            error = (torch.cat([f1 - x1, f2 - x2]).norm() / torch.cat([f1, f2]).norm()).item()
            rows.append({"layer": name, "relative_error": error})
    return sorted(rows, key=lambda r: (r["layer"].rsplit(" ", 1)[0], int(r["layer"].rsplit(" ", 1)[1])))


def verify_conversion(
    original: Path,
    converted: Path,
    *,
    model_name: str | None = None,
    sentences: list[str] | None = None,
    seed: int = 0,
    reference: bool = True,
) -> VerificationReport:
    """Loads both checkpoints (the converted one through the Auto classes and its own code)
    and measures fidelity, reconstruction and gradients; see the module docstring."""
    original, converted = Path(original), Path(converted)
    sentences = sentences or SENTENCES
    with quiet_transformers():
        config = transformers.AutoConfig.from_pretrained(converted, trust_remote_code=True)
        family = family_for(config.plm_model_type)
        architecture = (config.architectures or ["Meft" + family.heads["AutoModel"].library_class])[0]
        auto_class_name = _auto_class_for(family, architecture)
        auto_class = getattr(transformers, auto_class_name)
        lm = auto_class_name in LM_HEADS
        plm = auto_class.from_pretrained(original, dtype=torch.float32).eval()
        meft = auto_class.from_pretrained(converted, dtype=torch.float32, trust_remote_code=True).eval()
    inputs = _inputs(original, config.vocab_size, sentences)
    with torch.no_grad():
        reference_out = _forward(plm, inputs, lm)
        fidelity = _fidelity(reference_out, _forward(meft, inputs, lm), inputs["attention_mask"])
    settings = config.meft_settings()
    report = VerificationReport(
        model=model_name or str(original),
        architecture=architecture,
        settings=settings,
        tokens=int(inputs["attention_mask"].sum()),
        fidelity=fidelity,
    )

    # reconstruction and gradients, in training mode with dropout on
    meft.train()
    stacks = meft.meft_stacks
    for stack in stacks:
        stack.trace = []
    lm_auto_class = auto_class_name if lm else None
    try:
        reversible_grads = _gradients(meft, inputs, lm_auto_class, "reversible", seed)
    except (RuntimeError, FloatingPointError) as e:  # the audit, or values out of range
        report.problems.append(str(e))
        return report
    finally:
        report.reconstruction = _reconstruction([entry for stack in stacks for entry in stack.trace], settings["exact"])
        for stack in stacks:
            stack.trace = None
    vanilla_grads = _gradients(meft, inputs, lm_auto_class, "vanilla", seed)
    report.gradients = _compare_gradients(reversible_grads, vanilla_grads)
    meft.eval()

    if settings["exact"]:
        differing = sum(r["differing_elements"] for r in report.reconstruction)
        if differing:
            report.problems.append(f"reconstruction differs in {differing} elements")
        g = report.gradients
        if g["missing"] or not g["max_relative_difference"] <= GRADIENT_TOLERANCE:
            report.problems.append(
                f"reversible gradients differ from plain autograd (max relative {g['max_relative_difference']:.3e})"
            )
    if reference:
        report.reference = _reference_fidelity(converted, auto_class, inputs, reference_out, lm, seed)
    return report


def _reference_fidelity(converted: Path, auto_class, inputs, reference_out, lm: bool, seed: int) -> list[dict]:
    """Fidelity of every variant at the paper's defaults (fresh adapters, both output streams)."""
    rows = []
    for variant, scales in VARIANT_DEFAULTS.items():
        with quiet_transformers():
            config = transformers.AutoConfig.from_pretrained(converted, trust_remote_code=True)
            config.variant, config.lambda_, config.beta = variant, scales["lambda_"], scales["beta"]
            config.adapter_dim, config.adapter_init, config.adapter_init_std = 8, "paper", 0.02
            config.reversible_layers = None
            with _seeded(seed):
                model = auto_class.from_pretrained(
                    converted, config=config, dtype=torch.float32, trust_remote_code=True, ignore_mismatched_sizes=True
                )
        model.eval()
        row = {"variant": variant, **scales}
        for stream in ("plm", "mean"):
            for stack in model.meft_stacks:
                stack.output_stream = stream
            with torch.no_grad():
                f = _fidelity(reference_out, _forward(model, inputs, lm), inputs["attention_mask"])
            row[stream] = (f.cosine_mean, f.cosine_min)
        rows.append(row)
        del model
    return rows
