"""Calibration: the settings `auto` stands for, chosen by measuring the converted model.

One pass over a short English text shipped with the package (data/calibration.txt, the
Gettysburg Address, public domain) decides three things:

- λ and β. Each stream a variant scales (MEFT1: λ, MEFT2: β, MEFT3: both) gets the largest
  scale 1/2^k, k = 1..16, that keeps the starting point within TARGET of the original:
  causal LMs keep their perplexity within 1% (16-bit checkpoints: of the original's in its
  dtype or in float32, computed a module at a time) and agree with the original's next-token
  prediction on at least 95% of the tokens (90% in 16 bits); every other model keeps a cosine similarity of at
  least 0.999 to the original's last hidden state on every token. The largest scale, not the
  smallest: the exact inverse keeps k bits of remainder per element per layer for a scale of
  1/2^k, and those are memory. The stream a variant does not scale stays at 1.
- the adapter initialisation: "zero" (the adapters output exactly 0, so only the scales move
  the starting point); what the paper's N(0, σ²) init costs at the chosen scales is measured
  and recorded.
- the fixed-point format of the exact streams, from the largest |stream value| of every layer
  on the same text: 16-bit checkpoints get 32-bit streams with a 16× margin on that range,
  float32 checkpoints 64-bit streams with 32 fractional bits.

The search runs in memory, on one model: the original is loaded once in its own dtype, the
MEFT model shares its tensors (nothing is copied), and each candidate only replaces the
coupling settings of the model's MEFT stacks before the next eval forward.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
import transformers

from .errors import BadInputError
from .quiet import quiet_transformers
from .settings import FRAC_BITS_64
from .templates.adapters import MeftAdapter
from .templates.meft_table import VARIANTS, adapter_generator, denominator_of, single_remainder_bits
from .templates.modeling_meft import model_class_for
from .templates.plans import run_block

# the starting point a conversion must keep (README "Defaults"); verify.py judges by the same
PERPLEXITY_TOLERANCE = 0.01  # causal LMs: perplexity at most 1% above (or below) the original's
# ... or, for fp16/bf16 checkpoints, within 1% of the original's with the same weights computed in
# float32: the streams are exact fixed point, so a converted 16-bit model rounds less than its
# original, whose bf16 residual adds alone move SmolLM2-135M's perplexity by 1.1%
# (16.74 in bf16 against 16.92 in float32 on the calibration text)
# ... or within 1% of the original's own perplexity with its input embeddings scaled by 1 ± 2^-16
# (NOISE_FACTORS): where 16-bit multiplies make a model that sensitive, an exact inverse whose
# scaled stream adds about that much cannot be judged more finely. SmolLM2-135M published in NF4
# (float32 norms, bf16 compute) measured 37.65 and 37.24 so, around its own 37.41 on the
# calibration text (and 37.18 at 1 + 2^-20).
NOISE_FACTORS = (1 + 2.0**-16, 1 - 2.0**-16)
TOP1_MIN = 0.95  # causal LMs: next-token top-1 agreement with the original
# ... in fp16/bf16, where rounding alone moves more than 5% of the predictions: SmolLM2-135M in
# bf16 agrees with the same weights in float32 on 93.4% of the calibration text's tokens
TOP1_MIN_16_BIT = 0.90
COSINE_MIN = 0.999  # other models: cosine similarity to the original, every token
TARGET = (
    f"causal LMs: perplexity within {100 * PERPLEXITY_TOLERANCE:g}% of the original's (for fp16/bf16 checkpoints: of "
    f"the original's in its dtype, in float32 or with its embeddings scaled by 1 ± 2^-16) and next-token top-1 agreement >= {100 * TOP1_MIN:g}% "
    f"({100 * TOP1_MIN_16_BIT:g}% for fp16/bf16 checkpoints); other models: cosine similarity "
    f">= {COSINE_MIN} on every token"
)


def top1_min_for(dtype: torch.dtype) -> float:
    return TOP1_MIN_16_BIT if dtype in (torch.float16, torch.bfloat16) else TOP1_MIN
MAX_SCALE_BITS = 16  # the smallest scale tried: 2^-16
CALIBRATION_TOKENS = 256
# 32-bit streams: 31 bits for magnitude and fraction, RANGE_MARGIN_BITS of them kept free above
# the largest value measured (a 16× margin for what training and other text may reach)
RANGE_MARGIN_BITS = 4
MIN_FRAC_BITS, MAX_FRAC_BITS_32 = 8, 27
# the engine's int64 streams hold block outputs below 2^(RANGE_BITS − K) (templates/reversible.py)
RANGE_BITS_64 = 56
CAUSAL_LM = "AutoModelForCausalLM"
# the torch dtypes of safetensors' float dtype names (weights.layer_dtype gives one)
TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def calibration_text() -> str:
    return resources.files("meft_convert").joinpath("data/calibration.txt").read_text(encoding="utf-8")


def max_positions(config) -> int | None:
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def text_inputs(
    source: Path | None, config, text: str | None = None, tokens: int = CALIBRATION_TOKENS, tokenizer=None
) -> dict[str, torch.Tensor]:
    """`text` (default: the calibration text) as one sequence of at most `tokens` tokens, cut to
    what the model's position embeddings hold, tokenised by `tokenizer` or else the original's
    (in `source`); a fixed random sequence for checkpoints without a tokenizer (tiny test models)."""
    limit = tokens
    positions = max_positions(config)
    if positions is not None:
        limit = min(limit, positions - 2)  # RoBERTa's positions start after the padding index
    vocab_size = config.vocab_size
    has_files = source is not None and any(
        (source / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json")
    )
    if tokenizer is not None or has_files:
        try:
            if tokenizer is None:
                with quiet_transformers():
                    tokenizer = transformers.AutoTokenizer.from_pretrained(source)
            ids = tokenizer(text or calibration_text(), return_tensors="pt", truncation=True, max_length=limit)["input_ids"]
            if ids.numel() and int(ids.max()) < vocab_size:
                return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        except Exception:  # noqa: BLE001 (an unusable tokenizer: fall back to random tokens, as verification does)
            pass
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab_size, (1, min(limit, 64)), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


# ---------------------------------------------------------------------------- fidelity


def measure(model, inputs: dict, causal: bool) -> dict:
    """What the starting point is judged on: the causal LM's logits, or the last hidden state."""
    with torch.no_grad():
        if causal:
            return {"logits": model(**inputs).logits[0].float()}
        return {"hidden": model.base_model(**inputs).last_hidden_state[0].float()}


# a float32 copy of a weight larger than this is made a slice of rows at a time (a vocabulary's head)
FLOAT32_COPY_BYTES = 64 * 2**20


def _linear_in_row_chunks(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear in float32 with at most FLOAT32_COPY_BYTES of the weight cast up at a time."""
    rows = max(1, FLOAT32_COPY_BYTES // (4 * weight.shape[1]))
    parts = [torch.nn.functional.linear(x, weight[i : i + rows].float(), None if bias is None else bias[i : i + rows].float())
             for i in range(0, weight.shape[0], rows)]
    return torch.cat(parts, dim=-1)


@contextlib.contextmanager
def computed_in_float32(model: torch.nn.Module):
    """Runs `model`'s forwards inside it in float32, one module at a time: each module's own
    floating-point tensors are replaced by float32 copies as it starts and get their own storage
    back as it ends, and its floating-point inputs are cast up. The weights (and any model
    sharing them) end as they were, in the same memory. The extra memory is one module's float32
    copy, and no more than FLOAT32_COPY_BYTES of it for the largest: an embedding's lookup is its
    16-bit rows cast up (no copy of the table), and a linear layer whose weight would exceed it
    (a vocabulary's head) multiplies a slice of rows at a time."""

    def own_tensors(module):
        tables = (module._parameters, module._buffers)
        return [t for table in tables for t in table.values() if t is not None and t.is_floating_point()]

    def in_row_chunks(module) -> bool:
        return type(module) is torch.nn.Linear and module.weight.is_floating_point() and module.weight.numel() * 4 > FLOAT32_COPY_BYTES

    stored = {}  # module -> its tensors' own data, while it runs
    computing = {}  # a 4-bit layer -> its compute dtype, while it runs in float32
    chunked_inputs = {}  # a large linear layer -> its float32 input, while it runs

    def restore(module):
        for t, data in zip(own_tensors(module), stored.pop(module)):
            t.data = data
        if module in computing:
            module.compute_dtype = computing.pop(module)

    def up(module, args, kwargs):
        if type(module) is torch.nn.Embedding:
            return None
        if in_row_chunks(module):  # its own forward runs on no rows; `down` gives its output
            chunked_inputs[module] = args[0].float()
            return (args[0].new_empty((0, args[0].shape[-1]), dtype=module.weight.dtype), *args[1:]), kwargs
        tensors = own_tensors(module)
        stored[module] = [t.data for t in tensors]
        for t in tensors:
            t.data = t.data.float()
        if isinstance(getattr(module, "compute_dtype", None), torch.dtype):  # a 4-bit layer's matmul
            computing[module] = module.compute_dtype
            module.compute_dtype = torch.float32
        cast = lambda x: x.float() if torch.is_tensor(x) and x.is_floating_point() else x  # noqa: E731
        return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}

    def down(module, args, output):
        if type(module) is torch.nn.Embedding:
            return output.float()
        if module in chunked_inputs:
            return _linear_in_row_chunks(chunked_inputs.pop(module), module.weight, module.bias)
        restore(module)
        return None

    holders = [m for m in model.modules() if own_tensors(m) or isinstance(getattr(m, "compute_dtype", None), torch.dtype)]
    handles = [h for m in holders for h in (m.register_forward_pre_hook(up, with_kwargs=True), m.register_forward_hook(down))]
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()
        chunked_inputs.clear()
        for module in list(stored):  # a forward that raised midway
            restore(module)


def computing_dtype(model: torch.nn.Module, dtype: torch.dtype) -> torch.dtype:
    """The dtype `model` computes in, which its targets are set by: the compute dtype of its
    4-bit layers where it has 16-bit ones (a *-bnb-4bit checkpoint may keep its norms in float32
    while every projection multiplies in bfloat16), else `dtype`, that of its layers."""
    for module in model.modules():
        compute = getattr(module, "compute_dtype", None)
        if compute in (torch.float16, torch.bfloat16):
            return compute
    return dtype


def float32_logits(original, inputs: dict, causal: bool, dtype: torch.dtype) -> torch.Tensor | None:
    """A 16-bit causal LM's logits computed in float32 (measure()'s), the second reference its
    perplexity target allows (PERPLEXITY_TOLERANCE); None for other models."""
    if not (causal and dtype in (torch.float16, torch.bfloat16)):
        return None
    with computed_in_float32(original):
        return measure(original, inputs, causal)["logits"]


def perturbed_logits(original, inputs: dict, causal: bool, dtype: torch.dtype) -> list[torch.Tensor] | None:
    """A 16-bit causal LM's logits with its input embeddings scaled by each of NOISE_FACTORS
    (measure()'s): the spread its perplexity target allows besides (PERPLEXITY_TOLERANCE); None
    for other models."""
    if not (causal and dtype in (torch.float16, torch.bfloat16)):
        return None
    logits = []
    for factor in NOISE_FACTORS:
        handle = original.get_input_embeddings().register_forward_hook(lambda module, args, output: output * factor)
        try:
            logits.append(measure(original, inputs, causal)["logits"])
        finally:
            handle.remove()
    return logits


def reference_outputs(original, inputs: dict, causal: bool, dtype: torch.dtype) -> dict:
    """measure() of the original, with its float32_logits and perturbed_logits where there are any."""
    reference = measure(original, inputs, causal)
    in_float32 = float32_logits(original, inputs, causal, dtype)
    if in_float32 is not None:
        reference["float32_logits"] = in_float32
    perturbed = perturbed_logits(original, inputs, causal, dtype)
    if perturbed is not None:
        reference["perturbed_logits"] = perturbed
    return reference


def perplexity(logits: torch.Tensor, ids: torch.Tensor) -> float:
    return math.exp(torch.nn.functional.cross_entropy(logits[:-1], ids[1:]).item())


def figures(reference: dict, converted: dict, ids: torch.Tensor, top1_min: float = TOP1_MIN) -> dict:
    """Fidelity of `converted` against `reference` (outputs of reference_outputs() or measure())
    on the token ids; causal LMs' figures carry the top-1 agreement they are judged by
    (top1_min_for the dtype), and for 16-bit checkpoints the original's float32 perplexity."""
    if "logits" in reference:
        ppl0, ppl1 = perplexity(reference["logits"], ids[0]), perplexity(converted["logits"], ids[0])
        top1 = (reference["logits"].argmax(-1) == converted["logits"].argmax(-1)).float().mean().item()
        fig = {"perplexity": ppl1, "original_perplexity": ppl0, "perplexity_change": ppl1 / ppl0 - 1, "top1_agreement": top1,
               "top1_target": top1_min}
        if "float32_logits" in reference:
            fig["original_float32_perplexity"] = perplexity(reference["float32_logits"], ids[0])
        if "perturbed_logits" in reference:
            fig["original_perturbed_perplexities"] = [perplexity(logits, ids[0]) for logits in reference["perturbed_logits"]]
        return fig
    cosine = torch.nn.functional.cosine_similarity(reference["hidden"], converted["hidden"], dim=-1)
    return {"cosine_mean": cosine.mean().item(), "cosine_min": cosine.min().item()}


def shortfall(fig: dict) -> str | None:
    """Why `fig` misses the target, naming the figure; None if it meets it."""
    if "perplexity" in fig:
        ppl, ppl0, ppl32 = fig["perplexity"], fig["original_perplexity"], fig.get("original_float32_perplexity")
        noisy = fig.get("original_perturbed_perplexities") or []
        refs = [ref for ref in (ppl0, ppl32, *noisy) if ref is not None]
        near = [ref for ref in refs if abs(ppl / ref - 1) <= PERPLEXITY_TOLERANCE]
        if not math.isfinite(ppl) or not near:
            in_float32 = "" if ppl32 is None else f" and {ppl32:.4g} in float32 ({100 * (ppl / ppl32 - 1):+.1f}%)"
            with_noise = f", {' and '.join(f'{p:.4g}' for p in noisy)} with its embeddings scaled by 1 ± 2^-16" if noisy else ""
            of = {1: "", 2: " of either"}.get(len(refs), " of any")
            return (
                f"perplexity {ppl:.4g} against the original's {ppl0:.4g} ({100 * (ppl / ppl0 - 1):+.1f}%){in_float32}"
                f"{with_noise}, target within {100 * PERPLEXITY_TOLERANCE:g}%{of}"
            )
        top1_min = fig.get("top1_target", TOP1_MIN)
        if not fig["top1_agreement"] >= top1_min:
            return f"next-token top-1 agreement {100 * fig['top1_agreement']:.1f}% (target >= {100 * top1_min:g}%)"
        return None
    if not fig["cosine_min"] >= COSINE_MIN:
        return f"cosine similarity to the original {fig['cosine_min']:.4f} on its worst token (target >= {COSINE_MIN})"
    return None


def describe(fig: dict) -> str:
    if "perplexity" in fig:
        ppl32 = fig.get("original_float32_perplexity")
        originals = f"{fig['original_perplexity']:.4g}" + ("" if ppl32 is None else f", {ppl32:.4g} in float32")
        return f"perplexity {fig['perplexity']:.4g} (original {originals}), top-1 {100 * fig['top1_agreement']:.1f}%"
    return f"cosine min {fig['cosine_min']:.6f}, mean {fig['cosine_mean']:.6f}"


# ---------------------------------------------------------------------------- the model


def share_replaced_modules(target: torch.nn.Module, source: torch.nn.Module) -> list[str]:
    """Puts into `target` every leaf module of `source` whose class differs from the one `target`
    has by that name: layers a quantizer replaced (bitsandbytes' Linear4bit, Linear8bitLt), whose
    packed integer weights and quantization state only their own class computes with. Returns
    their names."""
    replaced = []
    for name, module in list(target.named_modules()):
        if not name or next(module.children(), None) is not None:
            continue
        try:
            counterpart = source.get_submodule(name)
        except AttributeError:
            continue
        if type(counterpart) is not type(module) and next(counterpart.children(), None) is None:
            target.set_submodule(name, counterpart)
            replaced.append(name)
    return replaced


def share_tensors(target: torch.nn.Module, source: torch.nn.Module, skip: type | None = None) -> list[str]:
    """Makes every parameter and buffer of `target` (built on the meta device) the tensor of the
    same name in `source`, so that both models use one copy; quantized layers are shared whole
    (share_replaced_modules). Submodules of type `skip` are left alone; returns the names
    `source` lacks."""
    share_replaced_modules(target, source)
    missing = []
    skipped = tuple(name for name, m in target.named_modules() if skip is not None and isinstance(m, skip))
    for name, module in target.named_modules():
        if skipped and any(name == s or name.startswith(s + ".") for s in skipped):
            continue
        try:
            counterpart = source.get_submodule(name)
        except AttributeError:
            counterpart = None
        for table in ("_parameters", "_buffers"):
            own = getattr(module, table)
            for key in list(own):
                theirs = getattr(counterpart, table).get(key) if counterpart is not None else None
                if theirs is None:
                    if own[key] is not None:
                        missing.append(f"{name}.{key}" if name else key)
                    continue
                own[key] = theirs
    return missing


@dataclass
class _Model:
    original: torch.nn.Module
    meft: torch.nn.Module
    adapters: list[MeftAdapter]
    causal: bool


def _build(family, config, source: Path | None, auto_class: str, dtype: torch.dtype, seed: int, original=None) -> _Model:
    """The original in its own dtype (loaded from `source`, or `original`, a model in memory:
    the causal LM, else its base model), and the MEFT model on the same tensors plus fresh adapters."""
    causal = auto_class == CAUSAL_LM
    head = family.head_for(CAUSAL_LM if causal else "AutoModel")
    with quiet_transformers():
        if original is None:
            original = getattr(transformers, head.library_class).from_pretrained(source, dtype=dtype)
        original = original.eval()
        with torch.device("meta"):
            meft = model_class_for(family, CAUSAL_LM if causal else "AutoModel")(config)
    missing = share_tensors(meft, original, skip=MeftAdapter)
    if missing:
        raise RuntimeError(f"the MEFT model has tensors the original lacks: {missing[:3]}")
    adapters = [m for m in meft.modules() if isinstance(m, MeftAdapter)]
    # drawn as convert() draws them: those measured are those written
    generator = adapter_generator(seed)
    for adapter in adapters:
        adapter.to_empty(device="cpu")
        adapter.reset_parameters(generator)
        adapter.to(dtype)
    return _Model(original, meft.eval(), adapters, causal)


def _set_scales(model: _Model, lambda_: float, beta: float) -> None:
    for stack in model.meft.meft_stacks:
        stack.coupling = dataclasses.replace(stack.coupling, lambda_=lambda_, beta=beta)


@torch.no_grad()
def _set_init(model: _Model, init: str, std: float, seed: int) -> None:
    generator = adapter_generator(seed)
    for adapter in model.adapters:
        adapter.up_proj._meft_init = (std, init == "zero")
        adapter.down_proj._meft_init = (std, False)
        adapter.init, adapter.init_std = init, std
        adapter.reset_parameters(generator)


@contextlib.contextmanager
def stream_ranges(meft):
    """Records the largest |value| of both streams at every layer during the forwards run inside
    it: {layer name: max}. The couplings' blocks are wrapped for the time being; F sees x2, G
    sees y1, and y2 = β·x2 + G(y1) is formed here as the coupling forms it."""
    ranges: dict[str, float] = {}

    def wrapped(stack):
        original_couplings = type(stack).couplings

        def couplings(compiled: bool = False):
            result = []
            for c in original_couplings(stack, compiled):
                seen: dict = {}

                def F(x, args, c=c, seen=seen):
                    seen["x2"] = x
                    return run_block(c.F, x, args)

                def G(y1, args, c=c, seen=seen):
                    g = run_block(c.G, y1, args)
                    y2 = stack.coupling.beta * seen["x2"].float() + g.float()
                    top = max(seen["x2"].abs().max().item(), y1.abs().max().item(), y2.abs().max().item())
                    ranges[c.name] = max(ranges.get(c.name, 0.0), top)
                    return g

                result.append(dataclasses.replace(c, F=F, G=G))
            return result

        return couplings

    stacks = meft.meft_stacks
    for stack in stacks:
        stack.couplings = wrapped(stack)  # an instance attribute, in front of the method
    try:
        yield ranges
    finally:
        for stack in stacks:
            del stack.couplings


def stream_format(ranges: dict[str, float], dtype: torch.dtype, stream_bits: str | int) -> dict:
    """stream_bits and frac_bits for the measured ranges; BadInputError naming the layer if the
    chosen width cannot hold them."""
    layer, top = max(ranges.items(), key=lambda item: item[1]) if ranges else ("", 0.0)
    bits = int(stream_bits) if stream_bits != "auto" else (32 if dtype in (torch.float16, torch.bfloat16) else 64)
    if not math.isfinite(top):
        raise BadInputError(f"the hidden states of {layer} are not finite on the calibration text; the model cannot be converted")
    if bits == 64:
        if top * 2**RANGE_MARGIN_BITS >= 2.0 ** (RANGE_BITS_64 - FRAC_BITS_64):
            raise BadInputError(
                f"the hidden states of {layer} reach {top:.4g} on the calibration text, beyond what 64-bit streams with "
                f"{FRAC_BITS_64} fractional bits hold with a 16x margin ({2.0 ** (RANGE_BITS_64 - FRAC_BITS_64 - RANGE_MARGIN_BITS):g}); "
                "convert with --no-exact"
            )
        return {"stream_bits": 64, "frac_bits": FRAC_BITS_64}
    integer_bits = math.ceil(math.log2(top)) if top > 0 else -math.inf
    frac = 31 - integer_bits - RANGE_MARGIN_BITS
    if frac < MIN_FRAC_BITS:
        raise BadInputError(
            f"the hidden states of {layer} reach {top:.4g} on the calibration text: 32-bit streams would keep "
            f"{frac} fractional bits with a 16x margin, fewer than {MIN_FRAC_BITS}; convert with --stream-bits 64"
        )
    return {"stream_bits": 32, "frac_bits": int(min(frac, MAX_FRAC_BITS_32))}


# ---------------------------------------------------------------------------- the search


def calibrate(
    *,
    family,
    config,
    source: Path | None,
    auto_class: str,
    dtype: torch.dtype,
    seed: int,
    requested: dict,
    log=print,
    original=None,
    tokenizer=None,
) -> dict:
    """Resolves the `auto` settings in `requested` (keys lambda_, beta, adapter_init,
    stream_bits; each "auto" or the value given) by measurement; returns the calibration record
    written to config.json as `meft_calibration`: the settings chosen, the figures of every
    candidate tried and the measured stream range. `original` and `tokenizer`: a model (see
    _build) and its tokenizer in memory, used instead of loading them from `source`."""
    variant, exact = config.variant, config.exact
    model = _build(family, config, source, auto_class, dtype, seed, original)
    inputs = text_inputs(source, config, tokenizer=tokenizer)
    ids = inputs["input_ids"]
    judged = computing_dtype(model.original, dtype)
    reference = reference_outputs(model.original, inputs, model.causal, judged)
    trials: list[dict] = []
    seen: dict[tuple, dict] = {}

    def evaluate(lambda_: float, beta: float, init: str) -> dict:
        if (lambda_, beta, init) not in seen:
            _set_scales(model, lambda_, beta)
            fig = figures(reference, measure(model.meft, inputs, model.causal), ids, top1_min_for(judged))
            trials.append({"lambda_": lambda_, "beta": beta, "adapter_init": init, **fig, "meets_target": shortfall(fig) is None})
            seen[lambda_, beta, init] = fig
        return seen[lambda_, beta, init]

    scales = {}
    for name in ("lambda_", "beta"):
        value = requested[name]
        scales[name] = None if value == "auto" else float(value)
        if value == "auto" and name not in VARIANTS[variant].scaled:
            scales[name] = 1.0
    searched = [name for name in ("lambda_", "beta") if scales[name] is None]
    init = "zero" if requested["adapter_init"] == "auto" else requested["adapter_init"]
    _set_init(model, init, config.adapter_init_std, seed)

    bits = {}
    if searched:
        # the same k for every searched stream, the smallest that meets the target: 1, 2, 4, ...
        # until one does, then bisection below it (closer scales keep the start better)
        def meets(k: int) -> bool:
            values = {name: scales[name] if scales[name] is not None else 2.0**-k for name in ("lambda_", "beta")}
            return shortfall(evaluate(values["lambda_"], values["beta"], init)) is None

        passing, failing, k = None, 0, 1
        while k <= MAX_SCALE_BITS:
            if meets(k):
                passing = k
                break
            failing, k = k, min(2 * k, MAX_SCALE_BITS) if k < MAX_SCALE_BITS else MAX_SCALE_BITS + 1
        found = passing is not None
        if not found:
            passing = MAX_SCALE_BITS  # nothing meets the target: the closest start; verification says so
        else:
            low, high = failing, passing
            while high - low > 1:
                middle = (low + high) // 2
                low, high = (low, middle) if meets(middle) else (middle, high)
            passing = high
        bits = {name: passing for name in searched}
        # MEFT3: then each stream on its own, as few bits as still meet the target
        if found and len(searched) == 2 and passing > 1:
            for name in searched:
                other = next(n for n in searched if n != name)
                while bits[name] > 1:
                    trial = {name: 2.0 ** -(bits[name] - 1), other: 2.0 ** -bits[other]}
                    if shortfall(evaluate(trial["lambda_"], trial["beta"], init)) is not None:
                        break
                    bits[name] -= 1
        for name in searched:
            scales[name] = 2.0 ** -bits[name]
    chosen = evaluate(scales["lambda_"], scales["beta"], init)

    # the other init at the same scales, measured for the record (what the paper's init costs).
    # `auto` is zero: zero adapters add exactly nothing, so the scales alone move the start, and
    # the paper's init can only add to that; where it seems to do better (16-bit checkpoints,
    # whose rounding flips a few predictions either way) that is noise, not a reason to choose it
    other_init = "paper" if init == "zero" else "zero"
    _set_init(model, other_init, config.adapter_init_std, seed)
    other = evaluate(scales["lambda_"], scales["beta"], other_init)
    _set_init(model, init, config.adapter_init_std, seed)
    _set_scales(model, scales["lambda_"], scales["beta"])

    with stream_ranges(model.meft) as ranges:
        measure(model.meft, inputs, model.causal)
    layer, top = max(ranges.items(), key=lambda item: item[1])
    stream = stream_format(ranges, dtype, requested["stream_bits"]) if exact else {"stream_bits": 64, "frac_bits": FRAC_BITS_64}

    record = {
        "text": "meft_convert/data/calibration.txt",
        "tokens": int(ids.shape[1]),
        "target": TARGET,
        "dtype": str(dtype).removeprefix("torch."),
        "auto": sorted(name for name, value in requested.items() if value == "auto"),
        "lambda_": scales["lambda_"],
        "beta": scales["beta"],
        # ⌈log2 m⌉ per stream scaled by 1/m: one remainder stored on its own (the engine packs them tighter)
        "remainder_bits": {
            name: single_remainder_bits(denominator_of(scales[name])) if exact else 0 for name in ("lambda_", "beta")
        },
        "adapter_init": init,
        **stream,
        "figures": chosen,
        "meets_target": shortfall(chosen) is None,
        f"{other_init}_init_figures": other,
        "stream_range": {"max_abs": top, "layer": layer, "per_layer": ranges},
        "trials": trials,
    }
    log(
        f"Calibrated on {record['tokens']} tokens: lambda={scales['lambda_']:g} beta={scales['beta']:g} "
        f"init={init} ({describe(chosen)}); streams {stream['stream_bits']}-bit with {stream['frac_bits']} fractional "
        f"bits (largest |hidden state| {top:.4g}, {layer})"
    )
    del model
    return record


def auto_class_of(family, config) -> str:
    library_class = config.architectures[0].removeprefix("Meft")
    return family.auto_class_of(library_class) or "AutoModel"


def _calibrate_and_free(**kwargs) -> dict:
    """calibrate(), then the model it loaded is gone before anything else is loaded (the modules'
    hooks and closures form reference cycles that only the collector frees)."""
    try:
        return calibrate(**kwargs)
    finally:
        gc.collect()


def calibrate_plan(options, plan, source: Path, weights, log=print) -> dict | None:
    """What convert() calls: calibrate_settings() for the checkpoint in `source`."""
    dtype = TORCH_DTYPES[plan.adapter_dtype]
    return calibrate_settings(options, plan.family, plan.config, dtype, source=source, log=log)


def calibrate_settings(settings, family, config, dtype: torch.dtype, *, source: Path | None = None, original=None,
                       tokenizer=None, log=print) -> dict | None:
    """The settings `settings` (a MeftSettings) leaves to measurement, resolved on the model of
    `config` in `dtype`, and the calibration record under "calibration"; None when every setting
    was given and there is nothing to record. The original is loaded from `source`, or is
    `original` in memory (then nothing is read from disk but `source`'s tokenizer, if given)."""
    if not settings.measured(sixteen_bit=dtype in (torch.float16, torch.bfloat16)):
        return settings.unmeasured()
    requested = settings.requested()
    log("Calibrating the auto settings on the calibration text ...")
    record = _calibrate_and_free(
        family=family,
        config=config,
        source=source,
        auto_class=auto_class_of(family, config),
        dtype=dtype,
        seed=settings.seed,
        requested=requested,
        log=log,
        original=original,
        tokenizer=tokenizer,
    )
    record["allow_low_fidelity"] = bool(settings.allow_low_fidelity)
    return {
        "lambda_": record["lambda_"],
        "beta": record["beta"],
        "adapter_init": record["adapter_init"],
        "stream_bits": str(record["stream_bits"]),
        "frac_bits": record["frac_bits"],
        "calibration": record,
    }
