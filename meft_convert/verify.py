"""Checks a converted checkpoint against its original and gives a verdict.

Three things are measured:

- starting-point fidelity, on the calibration text (data/calibration.txt, up to 256 tokens):
  cosine similarity, per token, of the last hidden states of the original and the converted
  model (mean and min); for language-model heads also the top-1 agreement of the predicted
  tokens and the KL divergence original → converted, and for causal LMs the perplexity;
- reconstruction: every reversible layer's input, rebuilt in backward, against the one seen
  in forward (bit-exact in exact mode; the relative error in float mode), on a few sentences;
- gradients: the trainable parameters' gradients of the reversible backward against plain
  autograd through the same model, with dropout on, on the same sentences.

The verdict fails when the exact inverse is not exact, when the starting point misses the
target calibration uses (calibrate.TARGET), or, in float mode, when the rebuilt inputs or the
gradients are further off than FLOAT_RECONSTRUCTION_BOUND and FLOAT_GRADIENT_BOUND; each
message names the figure and the setting to change. `allow_low_fidelity` keeps a conversion
whose only problems are such losses, and lists them in `accepted_losses`.

Everything runs in the checkpoint's own dtype (the reversible and the plain gradients agree
bit for bit there too), and at conversion the original is the converted model's own PLM
tensors (written byte for byte from it) under the library's classes: one copy of the weights
in memory, not two in float32. A 16-bit causal LM's original also runs once computed in float32,
one module's weights cast up at a time (calibrate.computed_in_float32): the target's second
reference for such checkpoints.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import transformers

from . import calibrate
from .quiet import quiet_transformers
from .templates.families import family_for

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Reversible networks recompute activations instead of storing them.",
    "Fine-tuning large language models needs a lot of memory on small GPUs, and activations take most of it.",
    "Hello world!",
]
GRADIENT_TOLERANCE = 1e-6  # relative, for exact mode; summation order may differ in some kernels
# float mode (the paper's inverse) rebuilds inputs approximately; beyond these the gradients it
# trains with are not the model's
FLOAT_RECONSTRUCTION_BOUND = 1e-3  # relative error of the worst rebuilt layer input
FLOAT_GRADIENT_BOUND = 1e-2  # relative difference of the worst gradient from plain autograd
LM_HEADS = ("AutoModelForCausalLM", "AutoModelForMaskedLM", "AutoModelForSeq2SeqLM")
FIX = (
    "convert with the defaults (--lambda auto --beta auto --adapter-init auto), or smaller scales "
    "(e.g. --lambda 2^-10 --beta 2^-10) and --adapter-init zero; --allow-low-fidelity keeps it anyway"
)


@dataclass
class Fidelity:
    cosine_mean: float
    cosine_min: float
    top1_agreement: float | None = None
    kl_mean: float | None = None
    perplexity: float | None = None  # causal LMs: the converted model's, on the calibration text
    original_perplexity: float | None = None
    # fp16/bf16 causal LMs: the original's with its weights computed in float32 (calibrate.TARGET)
    original_float32_perplexity: float | None = None
    # ... and with its embeddings scaled by 1 ± 2^-16 (calibrate.NOISE_FACTORS, calibrate.TARGET)
    original_perturbed_perplexities: list | None = None


@dataclass
class VerificationReport:
    model: str
    architecture: str
    settings: dict
    tokens: int
    fidelity: Fidelity
    reconstruction: list[dict] = field(default_factory=list)
    gradients: dict = field(default_factory=dict)
    # the calibration's candidates (config.json's meft_calibration["trials"]), when it ran
    reference: list[dict] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    # losses of fidelity kept on purpose (allow_low_fidelity): what would otherwise be problems
    accepted_losses: list[str] = field(default_factory=list)
    target: str = calibrate.TARGET
    dtype: str = "float32"
    scope: str = ""  # what was checked, in words

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
            f"MEFT verification: {self.model} -> {self.architecture} ({self.dtype})",
            f"  settings      {s['variant']}, lambda={s['lambda_']:g}, beta={s['beta']:g}, adapter_dim={s['adapter_dim']}, "
            f"init={s['adapter_init']}, output_stream={s['output_stream']}, exact={s['exact']}"
            + (f" ({s['stream_bits']}-bit streams, {s['frac_bits']} fractional bits)" if s["exact"] else "")
            + f", reversible_layers={'all' if s['reversible_layers'] is None else s['reversible_layers']}",
            f"  fidelity      cosine mean {f.cosine_mean:.6f}, min {f.cosine_min:.6f} over {self.tokens} tokens",
        ]
        if f.perplexity is not None:
            in_float32 = "" if f.original_float32_perplexity is None else f", {f.original_float32_perplexity:.4g} in float32"
            lines.append(f"                perplexity {f.perplexity:.4g} (original {f.original_perplexity:.4g}{in_float32})")
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
            lines.append("  calibration   (lambda, beta, init: starting point)")
            for r in self.reference:
                lines.append(
                    f"    {r['lambda_']:<10g} {r['beta']:<10g} {r['adapter_init']:<5}  {calibrate.describe(r)}"
                    + ("" if r["meets_target"] else "  (misses the target)")
                )
        if self.scope:
            lines.append(f"  checked       {self.scope}")
        lines.append(f"  target        {self.target}")
        for loss in self.accepted_losses:
            lines.append(f"  kept anyway   {loss} (--allow-low-fidelity)")
        lines.append("  result        " + ("passed" if self.passed else "FAILED: " + "; ".join(self.problems)))
        return "\n".join(lines)


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
    """The Auto class of `architecture`, a library class or its MEFT class (Meft<class>)."""
    return family.auto_class_of(architecture.removeprefix("Meft")) or "AutoModel"


def _forward(model, inputs, lm: bool):
    base = model.base_model(**inputs)
    logits = model(**inputs).logits if lm else None
    return base.last_hidden_state.float(), logits


def _fidelity(reference, converted, mask: torch.Tensor, ids: torch.Tensor | None = None,
              reference_float32_logits: torch.Tensor | None = None,
              reference_perturbed_logits: list[torch.Tensor] | None = None) -> Fidelity:
    """Cosine per real token; for LM heads top-1 agreement and KL; with `ids` (a causal LM on
    one sequence) the perplexity of both, and of the original computed in float32 if given
    (calibrate.float32_logits)."""
    (h0, logits0), (h1, logits1) = reference, converted
    real = mask.bool()
    cosine = torch.nn.functional.cosine_similarity(h0, h1, dim=-1)[real]
    fidelity = Fidelity(cosine.mean().item(), cosine.min().item())
    if logits0 is not None:
        l0, l1 = logits0.float()[real], logits1.float()[real]
        fidelity.top1_agreement = (l0.argmax(-1) == l1.argmax(-1)).float().mean().item()
        log_p, log_q = l0.log_softmax(-1), l1.log_softmax(-1)
        fidelity.kl_mean = (log_p.exp() * (log_p - log_q)).sum(-1).mean().item()
        if ids is not None:
            fidelity.original_perplexity = calibrate.perplexity(l0, ids[0])
            fidelity.perplexity = calibrate.perplexity(l1, ids[0])
            if reference_float32_logits is not None:
                fidelity.original_float32_perplexity = calibrate.perplexity(reference_float32_logits, ids[0])
            if reference_perturbed_logits is not None:
                fidelity.original_perturbed_perplexities = [calibrate.perplexity(l, ids[0]) for l in reference_perturbed_logits]
    return fidelity


def _target_figures(fidelity: Fidelity, dtype: torch.dtype) -> dict:
    """The figures the target is stated in (calibrate.shortfall's)."""
    if fidelity.perplexity is not None:
        return {
            "perplexity": fidelity.perplexity,
            "original_perplexity": fidelity.original_perplexity,
            "perplexity_change": fidelity.perplexity / fidelity.original_perplexity - 1,
            "original_float32_perplexity": fidelity.original_float32_perplexity,
            "original_perturbed_perplexities": fidelity.original_perturbed_perplexities,
            "top1_agreement": fidelity.top1_agreement,
            "top1_target": calibrate.top1_min_for(dtype),
        }
    return {"cosine_min": fidelity.cosine_min, "cosine_mean": fidelity.cosine_mean}


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


def _original_sharing(meft, original: Path, auto_class_name: str, family, config):
    """The original model under the library's class, on the converted model's own PLM tensors."""
    with quiet_transformers():
        plm_config = transformers.AutoConfig.from_pretrained(original)
    plm_config.num_labels = config.num_labels
    plm_config.id2label, plm_config.label2id = config.id2label, config.label2id
    library_class = getattr(transformers, family.head_for(auto_class_name).library_class)
    with torch.device("meta"), quiet_transformers():
        plm = library_class(plm_config)
    missing = calibrate.share_tensors(plm, meft)
    if missing:
        raise RuntimeError(f"the converted model lacks tensors of the original: {missing[:3]}")
    return plm.eval()


def verify_conversion(
    original: Path,
    converted: Path,
    *,
    model_name: str | None = None,
    sentences: list[str] | None = None,
    seed: int = 0,
    reference: bool = True,
    share_plm: bool = False,
    allow_low_fidelity: bool | None = None,
) -> VerificationReport:
    """Loads the converted checkpoint (through the Auto classes and its own code) in its own
    dtype and measures fidelity, reconstruction and gradients; see the module docstring.

    share_plm: run the original on the converted model's PLM tensors instead of loading it
    (for a folder convert() has just written, whose PLM shards are byte copies of the
    original's): half the memory. reference: include the calibration's candidates.
    allow_low_fidelity: keep a conversion that only misses the fidelity target or the float
    bounds (default: what config.json's meft_calibration records)."""
    original, converted = Path(original), Path(converted)
    sentences = sentences or SENTENCES
    with quiet_transformers():
        config = transformers.AutoConfig.from_pretrained(converted, trust_remote_code=True)
        family = family_for(config.plm_model_type)
        architecture = (config.architectures or ["Meft" + family.head_for("AutoModel").library_class])[0]
        auto_class_name = _auto_class_for(family, architecture)
        auto_class = getattr(transformers, auto_class_name)
        lm = auto_class_name in LM_HEADS
        dtype = _checkpoint_dtype(converted, family)
        meft = auto_class.from_pretrained(converted, dtype=dtype, trust_remote_code=True).eval()
        if share_plm:
            plm = _original_sharing(meft, original, auto_class_name, family, config)
        else:
            plm = auto_class.from_pretrained(original, dtype=dtype).eval()
    calibration = getattr(config, "meft_calibration", None) or {}
    if allow_low_fidelity is None:
        allow_low_fidelity = bool(calibration.get("allow_low_fidelity", False))
    text = calibrate.text_inputs(original, config)
    causal = auto_class_name == calibrate.CAUSAL_LM
    judged = calibrate.computing_dtype(plm, dtype)  # a 4-bit original's compute dtype sets its targets
    with torch.no_grad():
        in_float32 = calibrate.float32_logits(plm, text, causal, judged)
        perturbed = calibrate.perturbed_logits(plm, text, causal, judged)
        fidelity = _fidelity(
            _forward(plm, text, lm), _forward(meft, text, lm), text["attention_mask"], text["input_ids"] if causal else None,
            in_float32, perturbed,
        )
    del plm
    settings = config.meft_settings()
    report = VerificationReport(
        model=model_name or str(original),
        architecture=architecture,
        settings=settings,
        tokens=int(text["attention_mask"].sum()),
        fidelity=fidelity,
        dtype=str(dtype).removeprefix("torch."),
    )
    losses = []
    missed = calibrate.shortfall(_target_figures(fidelity, judged))
    if missed:
        searched = {"lambda_", "beta"} & set(calibration.get("auto", ()))
        if calibration.get("meets_target") is False and searched:  # `auto` searched and found no scale that meets it
            init = calibration["adapter_init"]
            other = "paper" if init == "zero" else "zero"
            fix = (
                f"no scale down to 2^-{calibrate.MAX_SCALE_BITS} met the target on the calibration text in "
                f"{calibration['dtype']} with --adapter-init {init}"
            )
            other_figures = calibration.get(f"{other}_init_figures")
            if other_figures and calibrate.shortfall(other_figures) is None:
                fix += f" (--adapter-init {other} does there: {calibrate.describe(other_figures)})"
            fix += "; --allow-low-fidelity keeps it"
        else:
            fix = FIX
        losses.append(f"the starting point is lost: {missed}; {fix}")

    # reconstruction and gradients, in training mode with dropout on
    inputs = _inputs(original, config.vocab_size, sentences)
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
    report.scope = (
        f"in {report.dtype}: fidelity on {report.tokens} tokens of the calibration text against the original "
        + ("(the converted model's own PLM tensors under the library's classes)" if share_plm else "(loaded from its folder)")
        + f"; every reversible layer's rebuilt input ({len(report.reconstruction)}) and all {_tensor_count(report.gradients)} "
        f"trainable tensors' gradients on {len(sentences)} sentences ({int(inputs['attention_mask'].sum())} tokens), dropout on"
    )

    g = report.gradients
    if settings["exact"]:
        differing = sum(r["differing_elements"] for r in report.reconstruction)
        if differing:
            report.problems.append(f"reconstruction differs in {differing} elements")
        if g["missing"] or not g["max_relative_difference"] <= GRADIENT_TOLERANCE:
            report.problems.append(
                f"reversible gradients differ from plain autograd (max relative {g['max_relative_difference']:.3e})"
            )
    else:
        worst = max((r["relative_error"] for r in report.reconstruction), default=0.0)
        if not worst <= FLOAT_RECONSTRUCTION_BOUND:
            layer = max(report.reconstruction, key=lambda r: r["relative_error"])["layer"]
            losses.append(
                f"float mode rebuilt the input of {layer} with a relative error of {worst:.3e} "
                f"(bound {FLOAT_RECONSTRUCTION_BOUND:g}); drop --no-exact (the exact inverse), or use larger scales"
            )
        if g["missing"] or not g["max_relative_difference"] <= FLOAT_GRADIENT_BOUND:
            losses.append(
                f"float mode's gradients are {g['max_relative_difference']:.3e} off plain autograd (relative, bound "
                f"{FLOAT_GRADIENT_BOUND:g}); drop --no-exact (the exact inverse), or use larger scales"
            )
    if allow_low_fidelity:
        report.accepted_losses = losses
    else:
        report.problems.extend(losses)
    if reference:
        report.reference = list(calibration.get("trials", []))
    return report


def _tensor_count(gradients: dict) -> int:
    return gradients.get("tensors", 0)


def _checkpoint_dtype(folder: Path, family) -> torch.dtype:
    from .weights import find_weights, layer_dtype

    return calibrate.TORCH_DTYPES[layer_dtype(family, find_weights(folder).tensors)]
