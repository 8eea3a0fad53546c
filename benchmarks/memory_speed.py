"""Activation memory and step time of MEFT against the usual ways to fine-tune, on one GPU,
plus the GPU correctness checks (bit-exact reconstruction with CUDA dropout replay, gradients
against plain autograd, determinism).

Run from the repository root on a CUDA machine (models are built from the configs in
tests/data/configs with random weights; the numbers do not depend on the weights):

    python benchmarks/memory_speed.py --out benchmarks/results/h200.json

Memory follows DESIGN §5: static = allocated once the model, the optimizer and one warm-up
step exist (grads set to None); peak = max allocated during one training step (forward,
backward, optimizer step); activation = peak − static. Time is the median of --steps steps,
measured with CUDA events after warm-up.

Llama-3-8B at batch 1 and long sequences (`--shapes llama-3-8b`) runs differently, to fit in a
few minutes: the 8B model's weights are built once on the GPU and shared by every arm (LoRA
wraps and unwraps them with peft, MEFT models are built on the meta device and take the same
tensors), each arm is built once for all of `--long-seqs` (one warm-up step at the shortest,
then --steps timed steps per length; peak = max over those steps), and a max-context search
finds the longest batch-1 sequence each arm of `--max-context-methods` trains within
`--memory-cap-gib` of GPU memory. `--time-budget` stops starting work that would not end in
time; the JSON is rewritten after every row, so a run cut short keeps what it measured:

    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True python benchmarks/memory_speed.py --shapes llama-3-8b \
        --skip-checks --depths --seq-lengths --steps 3 --long-seqs 8192 16384 32768 --time-budget 450 \
        --out benchmarks/results/h200-llama-3-8b.json
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import transformers

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from templates.adapters import MeftAdapter  # noqa: E402
from templates.configuration_meft import MEFT_SETTINGS, config_class_for  # noqa: E402
from templates.families import family_for  # noqa: E402
from templates.modeling_meft import freeze_plm, keep_trainable_in_float32, model_class_for  # noqa: E402
from templates.losses import ChunkedLossMixin  # noqa: E402
from templates.meft_table import VARIANTS, denominator_of, single_remainder_bits  # noqa: E402
from templates import fixed_point  # noqa: E402
from step_budget import is_device_work, labelled_layers, overhead, part_budget, step_part  # noqa: E402
from meft_convert.calibrate import share_replaced_modules  # noqa: E402

LOSS_CHUNK = 256  # tokens per chunk of the causal-LM loss (the converter's default)

SHAPES = {
    "opt-1.3b": dict(config="opt-1.3b", head="AutoModelForCausalLM", batch=8, seq=512, lora=["q_proj", "v_proj"], task_head=()),
    "opt-1.3b-long": dict(
        config="opt-1.3b", head="AutoModelForCausalLM", batch=4, seq=2048, lora=["q_proj", "v_proj"], task_head=()
    ),
    "bert-base": dict(
        config="bert-base-uncased", head="AutoModelForSequenceClassification", batch=32, seq=512,
        lora=["query", "value"], task_head=("classifier",),
    ),
    # batch 1 at long sequences (--long-seqs), one set of weights shared by every arm (`shared`),
    # no attention mask (one row, no padding: SDPA runs causal without a materialised mask)
    "llama-3-8b": dict(
        config="llama-3-8b", head="AutoModelForCausalLM", batch=1, seq=16384, lora=["q_proj", "v_proj"], task_head=(),
        shared=True, mask=False,
    ),
    "llama-3-70b": dict(
        config="llama-3-70b", head="AutoModelForCausalLM", batch=1, seq=16384, lora=["q_proj", "v_proj"], task_head=(),
        shared=True, mask=False,
    ),
}
# the frozen base of the shapes with shared weights (--base): 16-bit, or the layers' linear
# projections in 4 bits as BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=...,
# bnb_4bit_use_double_quant=..., bnb_4bit_compute_dtype=bf16) loads them (QLoRA's setting)
BASES = {"bf16": None, "nf4": dict(quant_type="nf4", double_quant=False), "nf4-double": dict(quant_type="nf4", double_quant=True)}
LEGACY_SHAPES = ["opt-1.3b", "opt-1.3b-long", "bert-base"]  # the default run, as before
LEGACY_METHODS = [
    "full", "lora", "lora-bf16", "lora+gc", "lora+gc+chunked-loss", "head-only",
    "meft1", "meft2", "meft3", "meft1-compiled", "meft2-compiled", "meft3-compiled",
    "meft1-float", "meft2-float", "meft3-float", "meft3-vanilla",
]
OFFLOAD_GC = "lora+offload-gc+chunked-loss"
METHODS = LEGACY_METHODS + [OFFLOAD_GC, "frozen-layer", "meft1+offload", "meft2+offload", "meft3+offload"] + [
    # the attention block whole in training, as before the families described its parts; or with
    # its core a chunk of queries at a time too (chunk_attention_queries)
    f"{variant}-{mode}{offload}" for variant in ("meft1", "meft2", "meft3") for offload in ("", "+offload")
    for mode in ("whole", "queries")
] + [  # other recompute chunks than the run's --recompute-chunk-tokens
    f"{variant}{mode}{offload}@{chunk}" for variant in ("meft1", "meft2", "meft3") for mode in ("", "-queries")
    for offload in ("", "+offload") for chunk in (1024, 2048, 8192)
]
# the arms of a shape with shared weights (the others train or copy the PLM's weights)
SHARED_METHODS = ["frozen-layer", "lora+gc+chunked-loss", OFFLOAD_GC] + [
    m for m in METHODS if m.startswith("meft") and not m.endswith("vanilla")
]
LONG_METHODS = [
    "frozen-layer", "lora+gc+chunked-loss", OFFLOAD_GC, "meft1", "meft2", "meft3", "meft3-float",
    "meft1+offload", "meft3+offload",
]
LONG_SEQS = [8192, 16384, 32768]
# in order of interest: a run out of time drops the last
MAX_CONTEXT_METHODS = ["lora+gc+chunked-loss", OFFLOAD_GC, "meft1+offload", "meft1", "meft3+offload", "meft3"]
# what the depth and sequence-length sweeps run (OPT-1.3b width)
SWEEP_METHODS = ["lora+gc", "meft1", "meft2", "meft3", "meft3-float"]
DEPTHS = [6, 12, 24, 48]
SEQ_LENGTHS = [256, 512, 1024, 2048]  # OPT's position embeddings end at 2048

# MEFT settings of a run (main() sets them from the command line). "paper": the variants' and the
# engine's defaults (λ, β = 0.1; int64 streams), as the earlier runs measured. "llm": the λ and β that keep
# a real model's starting point (2^-8 on MEFT1's/MEFT2's scaled stream, 2^-10 on both of MEFT3's),
# int32 streams with 18 fractional bits (|x| < 8192: bf16 residual streams), the position-wise
# blocks recomputed `recompute_chunk_tokens` tokens at a time.
RUN = dict(profile="paper", recompute_chunk_tokens=4096)
LLM_SCALES = {"meft1": (2.0**-8, 1.0), "meft2": (1.0, 2.0**-8), "meft3": (2.0**-10, 2.0**-10)}


def parse_meft(method: str) -> dict:
    """'meft3-float+offload' -> variant meft3, exact False, offload True, compiled False;
    'meft1+offload@2048': recompute_chunk_tokens 2048 instead of the run's."""
    method, _, chunk = method.partition("@")
    base, _, extra = method.partition("+")
    variant, _, mode = base.partition("-")
    return dict(variant=variant, exact=mode not in ("float",), compiled=mode == "compiled",
                vanilla=mode == "vanilla", offload=extra == "offload", whole_attention=mode == "whole",
                chunk_queries=mode == "queries",
                chunk_tokens=int(chunk) if chunk else None)


def meft_settings(method: str, profile: str | None = None) -> dict:
    """The MEFT config settings of an arm. Settings this engine's config does not know are set as
    attributes after it is built (meft_config): an engine that ignores them still runs."""
    arm, profile = parse_meft(method), profile or RUN["profile"]
    settings = dict(variant=arm["variant"], exact=arm["exact"], loss_chunk_size=LOSS_CHUNK, compile_blocks=arm["compiled"])
    if profile == "llm":
        settings["lambda_"], settings["beta"] = LLM_SCALES[arm["variant"]]
        settings.update(stream_bits=32, frac_bits=18, recompute_chunk_tokens=arm["chunk_tokens"] or RUN["recompute_chunk_tokens"])
    if arm["offload"] or profile == "llm":
        settings["offload_remainders"] = arm["offload"]
    if arm["chunk_queries"]:
        settings["chunk_attention_queries"] = True
    return settings


def arm_settings(methods: list[str]) -> dict:
    """What each MEFT arm of a run is asked for, and the remainder bits that costs (known before
    any model is built, so that it is in the results even for an arm that fails)."""
    arms = {}
    for method in methods:
        if not method.startswith("meft"):
            continue
        settings = meft_settings(method)
        variant = VARIANTS[settings["variant"]]
        scales = settings.get("lambda_", variant.lambda_), settings.get("beta", variant.beta)
        bits = _remainder_bits(scales) if settings["exact"] else 0
        arms[method] = dict(settings, lambda_=scales[0], beta=scales[1], remainder_bits_per_element_per_layer=bits)
    return arms


def remainder_bits(config) -> int:
    """Bits per stream element each exact layer keeps for its inverse: ⌈log2 m⌉ per scaled stream."""
    if not config.exact:
        return 0
    return _remainder_bits((config.lambda_, config.beta))


def _remainder_bits(scales) -> int:
    return sum(single_remainder_bits(denominator_of(scale)) for scale in scales)


def meft_config(plm, method: str, attention: str = "sdpa"):
    values = plm.to_dict()
    for key in ("model_type", "transformers_version", "architectures"):
        values.pop(key, None)
    settings = meft_settings(method)
    known = {k: v for k, v in settings.items() if k in MEFT_SETTINGS}
    values.update(known)
    config = config_class_for(family_for(plm.model_type))(**values)
    for key, value in settings.items():
        if key not in known:
            setattr(config, key, value)
    config._attn_implementation = attention
    return config


def plm_config(shape: dict, **overrides) -> transformers.PretrainedConfig:
    values = json.loads((ROOT / "tests" / "data" / "configs" / f"{shape['config']}.json").read_text())
    values.pop("_name_or_path", None)
    values.update(shape.get("overrides", {}))
    values.update(overrides)
    return transformers.AutoConfig.for_model(values.pop("model_type"), **values)


def _with_chunked_loss(auto, config):
    """The library's causal LM with MEFT's chunked loss and nothing else: LoRA + checkpointing
    with the same loss, so that the comparison is like for like."""
    library_class = auto._model_mapping[type(config)]
    config.loss_chunk_size = LOSS_CHUNK
    return type("Chunked" + library_class.__name__, (ChunkedLossMixin, library_class), {})(config)


# --- LoRA + offloaded checkpointing --------------------------------------------------------
# The recipe Unsloth, torchtune and transformers' `offload=True` ship: a checkpointed layer keeps
# its input in pinned host memory, not on the GPU, and gets it back for its recompute in backward.
# Written here as one autograd Function that transformers' layers call through their
# checkpointing hook (GradientCheckpointingLayer calls `_gradient_checkpointing_func(
# partial(forward, layer, **kwargs), *args)`: the hidden states positionally, the rest bound).

OFFLOADED = {"current": 0, "peak": 0}  # bytes of layer inputs held on the host


class _OffloadedCheckpoint(torch.autograd.Function):
    """forward: copy the tensor inputs to (pinned) host buffers, run the layer without a graph;
    backward: copy them back, rerun the layer with a graph, backpropagate through it. Parameter
    gradients accumulate into .grad inside (as reentrant checkpointing does); the inputs'
    gradients are returned. Bound (keyword) inputs are constants of the recompute. The RNG
    states are replayed, so dropout draws the same masks."""

    @staticmethod
    def forward(ctx, run, *args):
        ctx.run = run
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state() if any(torch.is_tensor(a) and a.is_cuda for a in args) else None
        saved = []
        for a in args:
            if torch.is_tensor(a):
                host = torch.empty(a.shape, dtype=a.dtype, pin_memory=a.is_cuda)
                host.copy_(a, non_blocking=a.is_cuda)
                OFFLOADED["current"] += host.numel() * host.element_size()
                OFFLOADED["peak"] = max(OFFLOADED["peak"], OFFLOADED["current"])
                saved.append((host, a.device, a.requires_grad))
            else:
                saved.append(a)
        ctx.saved = saved
        with torch.no_grad():
            return run(*args)

    @staticmethod
    def backward(ctx, *grads):
        inputs = []
        for s in ctx.saved:
            if isinstance(s, tuple):
                host, device, requires_grad = s
                inputs.append(host.to(device, non_blocking=True).requires_grad_(requires_grad))
                OFFLOADED["current"] -= host.numel() * host.element_size()
            else:
                inputs.append(s)
        ctx.saved = None
        devices = [torch.cuda.current_device()] if ctx.cuda_rng is not None else []
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng)
            outputs = ctx.run(*inputs)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        pairs = [(o, g) for o, g in zip(outputs, grads) if torch.is_tensor(o) and o.requires_grad and g is not None]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        return (None, *(i.grad if torch.is_tensor(i) and i.requires_grad else None for i in inputs))


def offloaded_checkpoint(function, *args, **kwargs):
    """A checkpoint function for transformers' layers (`_set_gradient_checkpointing(
    gradient_checkpointing_func=offloaded_checkpoint)`); keyword arguments are bound first."""
    if kwargs:
        function = _bind(function, kwargs)
    if not any(torch.is_tensor(a) and a.requires_grad for a in args):
        raise ValueError("offloaded_checkpoint: no positional input requires grad (hidden states passed by keyword?)")
    return _OffloadedCheckpoint.apply(function, *args)


def _bind(function, kwargs):
    return lambda *args: function(*args, **kwargs)


def enable_offloaded_checkpointing(model) -> None:
    """Checkpointing with each layer's input in pinned host memory, installed through the
    library's own hook (so the layers also drop their caches as under plain checkpointing)."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=offloaded_checkpoint)


def decoder_layers(model) -> torch.nn.ModuleList:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.base_model.get_submodule(family_for(base.config.model_type).stacks[0].layers)


# --- building arms --------------------------------------------------------------------------


def build(shape: dict, method: str, device, dtype, layers: int | None = None, attention: str = "sdpa"):
    overrides = {} if layers is None else {"num_hidden_layers": layers}
    config = plm_config(shape, attn_implementation=attention, **overrides)
    auto = getattr(transformers, shape["head"])
    with torch.device(device):
        if method.startswith("meft"):
            meft = meft_config(config, method, attention)
            model = model_class_for(family_for(config.model_type), shape["head"])(meft)
        elif method.endswith("chunked-loss"):
            model = _with_chunked_loss(auto, config)
        else:
            model = auto.from_config(config)
    model.to(dtype)
    if method.startswith("meft"):
        # MEFT freezes the PLM itself; its adapters stay float32, as from_pretrained gives them
        keep_trainable_in_float32(model, model._meft_trainable_modules)
    elif method == "full":
        model.requires_grad_(True)
    elif method == "frozen-layer":
        model.requires_grad_(False)
    elif method == "head-only":
        model.requires_grad_(False)
        if not shape["task_head"]:
            # an LM head tied to the input embeddings would send gradients through the whole
            # backbone: train an untied copy, the input embeddings stay frozen
            head = model.get_output_embeddings()
            head.weight = torch.nn.Parameter(head.weight.detach().clone())
        for name in shape["task_head"] or ("lm_head",):
            model.get_submodule(name).requires_grad_(True)
    elif method.startswith("lora"):
        model = _lora(model, shape, method)
    model.train()
    return model


def _lora(model, shape: dict, method: str):
    import peft

    lora = peft.LoraConfig(r=8, lora_alpha=16, target_modules=shape["lora"], modules_to_save=list(shape["task_head"]) or None)
    # peft keeps adapters in float32 by default; lora-bf16 keeps them in the model's dtype
    model = peft.get_peft_model(model, lora, autocast_adapter_dtype=method != "lora-bf16")
    if method == OFFLOAD_GC:
        enable_offloaded_checkpointing(model)
    elif "+gc" in method:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def _no_init_weights():
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:  # initialising on the GPU is fast too
            return contextlib.nullcontext()
    return no_init_weights()


def _draw_weights(model, generator) -> None:
    """N(0, 0.02²) matrices, unit norm weights, zero biases."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.02, generator=generator)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)


def build_plain(shape: dict, device, dtype, attention: str = "sdpa", base: str = "bf16"):
    """The PLM every arm of a shared shape uses: built once on `device` in `dtype`, the library's
    initialisation skipped, weights drawn once (_draw_weights); with a 4-bit `base` (BASES) the
    layers' linear projections are quantized, a layer at a time (build_quantized_layers).
    A causal LM carries the chunked loss (the plain library forward where the loss is not asked for)."""
    config = plm_config(shape, attn_implementation=attention)
    layers = config.num_hidden_layers
    if BASES[base] is not None:
        config.num_hidden_layers = 0  # the layers come one by one, quantized
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device), _no_init_weights():
            if shape["head"] == "AutoModelForCausalLM":
                model = _with_chunked_loss(transformers.AutoModelForCausalLM, config)
            else:
                model = getattr(transformers, shape["head"]).from_config(config)
    finally:
        torch.set_default_dtype(previous)
    g = torch.Generator(device=device).manual_seed(0)
    _draw_weights(model, g)
    model.to(dtype)
    if BASES[base] is not None:
        config.num_hidden_layers = layers
        build_quantized_layers(model, config, device, dtype, g, **BASES[base])
    model.requires_grad_(False)
    model.train()
    return model


def build_quantized_layers(model, config, device, dtype, generator, quant_type: str, double_quant: bool) -> None:
    """Fills the model's (empty) layer list with its config's layers, each drawn in `dtype` on the
    device and its linear projections quantized there to bitsandbytes Linear4bit (`quant_type`,
    `double_quant`: bnb_4bit_use_double_quant; compute dtype `dtype`), as transformers' 4-bit
    loading leaves them: at most one layer is ever in 16 bits, so a model too large for the GPU in
    16 bits (Llama-3-70B) is built on it in 4."""
    import bitsandbytes as bnb

    layer_list = decoder_layers(model)
    with torch.device("meta"):
        layer_class = type(decoder_layers(type(model)(_with_layers(config, 1)))[0])
    previous = torch.get_default_dtype()
    for index in range(config.num_hidden_layers):
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device), _no_init_weights():
                layer = layer_class(config, layer_idx=index)
        finally:
            torch.set_default_dtype(previous)
        _draw_weights(layer, generator)
        for name, linear in [(n, m) for n, m in layer.named_modules() if type(m) is torch.nn.Linear]:
            quantized = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                          compute_dtype=dtype, compress_statistics=double_quant, quant_type=quant_type,
                                          device="meta")
            quantized.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, compress_statistics=double_quant,
                                                 quant_type=quant_type, module=quantized).to(device)
            if linear.bias is not None:
                quantized.bias = linear.bias
            layer.set_submodule(name, quantized)
        layer_list.append(layer.to(device))
    model.meft_base = dict(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double_quant,
                           bnb_4bit_compute_dtype=str(dtype).removeprefix("torch."))


def _with_layers(config, layers: int):
    import copy

    config = copy.deepcopy(config)
    config.num_hidden_layers = layers
    return config


def _share_meta_tensors(model, plain) -> None:
    """What load_state_dict leaves on the meta device besides the adapters: non-persistent
    buffers (rotary inv_freq) and tensor attributes of the same modules, taken from `plain`."""
    plain_modules = dict(plain.named_modules())
    for name, module in model.named_modules():
        source = plain_modules.get(name)
        if source is None:
            continue
        for key, buffer in list(module._buffers.items()):
            if buffer is not None and buffer.is_meta and key in source._buffers:
                module._buffers[key] = source._buffers[key]
        for key, value in list(vars(module).items()):
            if torch.is_tensor(value) and value.is_meta and torch.is_tensor(getattr(source, key, None)):
                setattr(module, key, getattr(source, key))


def build_shared(plain, shape: dict, method: str, device, dtype, attention: str = "sdpa"):
    """An arm on `plain`'s weights, without copying them. Returns (model, undo): undo() gives
    `plain` back as it was (LoRA unwrapped, checkpointing off)."""
    if method not in SHARED_METHODS:
        raise ValueError(f"{method} does not run on shared weights; arms: {', '.join(SHARED_METHODS)}")
    if method == "frozen-layer":
        return plain, lambda: None
    if method.startswith("lora"):
        model = _lora(plain, shape, method)
        model.train()

        def undo():
            base = model.get_base_model()
            base.gradient_checkpointing_disable()
            if hasattr(base, "disable_input_require_grads"):
                base.disable_input_require_grads()
            model.unload()
            for attribute in ("peft_config", "_hf_peft_config_loaded"):
                if attribute in vars(base):
                    delattr(base, attribute)
            base.requires_grad_(False)
        return model, undo
    config = meft_config(plain.config, method, attention)
    with torch.device("meta"):
        model = model_class_for(family_for(plain.config.model_type), shape["head"])(config)
    # a 4-bit base: its quantized layers are taken whole, the rest tensor by tensor
    replaced = tuple(name + "." for name in share_replaced_modules(model, plain))
    state = {key: t for key, t in plain.state_dict().items() if not key.startswith(replaced)}
    result = model.load_state_dict(state, assign=True, strict=False)
    if result.unexpected_keys:
        raise RuntimeError(f"the MEFT model lacks the PLM's {result.unexpected_keys[:3]}")
    _share_meta_tensors(model, plain)
    for module in model.modules():
        if isinstance(module, MeftAdapter):
            module.to_empty(device=device)
            module.reset_parameters()
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"not materialised: {left[:3]}")
    if not replaced:  # a quantized layer's packed weights must keep their dtype
        model.to(dtype)
    freeze_plm(model, model._meft_trainable_modules)  # also keeps the adapters float32
    if parse_meft(method)["whole_attention"]:
        for layers in model.meft_stacks:
            whole = layers.couplings
            layers.couplings = lambda compiled=False, split=False, whole=whole: whole(compiled=compiled, split=False)
    model.train()
    return model, lambda: None


def make_batch(shape: dict, config, device, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, config.vocab_size, (shape["batch"], shape["seq"]), generator=g)
    mask = torch.ones_like(ids)
    mask[1::2, shape["seq"] * 3 // 4 :] = 0  # padding in every other row
    batch = {"input_ids": ids, "attention_mask": mask}
    if shape["head"] == "AutoModelForCausalLM":
        batch["labels"] = ids.masked_fill(mask == 0, -100)
    else:
        batch["labels"] = torch.randint(0, 2, (shape["batch"],), generator=g)
    if not shape.get("mask", True):
        del batch["attention_mask"]
    return {k: v.to(device) for k, v in batch.items()}


def train_step(model, batch, optimizer, mode: str = "reversible"):
    context = model.meft_backward(mode) if hasattr(model, "meft_backward") else contextlib.nullcontext()
    with context, step_part("model"):
        loss = model(**batch).loss
    with step_part("backward"):
        loss.backward()
    with step_part("optimizer"):
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss.detach()


class FrozenLayer:
    """The `frozen-layer` arm: the model's first decoder layer alone, frozen, forward and backward
    with its input requiring grad (the gradient from above given): what one layer's recompute
    and backward cost, the floor of any method that recomputes layers."""

    def __init__(self, model, shape: dict, device, dtype):
        self.layer = decoder_layers(model)[0]
        self.layer.requires_grad_(False)
        base = (model.get_base_model() if hasattr(model, "get_base_model") else model).base_model
        self.rotary = getattr(base, "rotary_emb", None)
        self.hidden_size, self.batch_size, self.device, self.dtype = model.config.hidden_size, shape["batch"], device, dtype

    def batch(self, seq: int) -> dict:
        g = torch.Generator(device=self.device).manual_seed(0)
        hidden = torch.randn(self.batch_size, seq, self.hidden_size, device=self.device, dtype=self.dtype, generator=g)
        kwargs = {"position_ids": torch.arange(seq, device=self.device).expand(self.batch_size, -1)}
        if self.rotary is not None:
            kwargs["position_embeddings"] = self.rotary(hidden, kwargs["position_ids"])
        return dict(hidden=hidden.requires_grad_(True), kwargs=kwargs, grad=torch.randn_like(hidden) * 1e-3)

    def step(self, batch: dict):
        out = self.layer(batch["hidden"], attention_mask=None, **batch["kwargs"])
        out = out[0] if isinstance(out, tuple) else out
        torch.autograd.backward(out, batch["grad"])
        batch["hidden"].grad = None
        return None


class Arm:
    """One arm ready to step: its model, optimizer (AdamW on the trainable parameters) and step."""

    def __init__(self, model, shape: dict, method: str, device, dtype, undo=lambda: None):
        self.model, self.shape, self.method, self.device, self.undo = model, shape, method, device, undo
        self.mode = "vanilla" if method.endswith("vanilla") else "reversible"
        self.frozen = FrozenLayer(model, shape, device, dtype) if method == "frozen-layer" else None
        if method == OFFLOAD_GC:
            OFFLOADED.update(current=0, peak=0)
        self.params = [] if self.frozen else [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-5) if self.params else None
        self.static = None  # allocated after the warm-up step (measure_arm)

    def batch(self, seq: int) -> dict:
        if self.frozen:
            return self.frozen.batch(seq)
        return make_batch(dict(self.shape, seq=seq), self.model.config, self.device)

    def step(self, batch: dict):
        if self.frozen:
            return self.frozen.step(batch)
        return train_step(self.model, batch, self.optimizer, self.mode)

    def describe(self) -> dict:
        info = dict(trainable=sum(p.numel() for p in self.params), layers=self.model.config.num_hidden_layers)
        config = self.model.config
        if self.method.startswith("meft"):
            info["meft"] = {k: getattr(config, k, None) for k in (
                "variant", "exact", "lambda_", "beta", "stream_bits", "frac_bits", "recompute_chunk_tokens", "offload_remainders")}
            info["remainder_bits_per_element_per_layer"] = remainder_bits(config)
        return info

    def close(self) -> None:
        self.optimizer = self.params = self.frozen = None
        self.undo()
        self.model = None


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        if hasattr(torch._C, "_host_emptyCache"):
            torch._C._host_emptyCache()  # the pinned buffers offloading cached


def _host_stats() -> dict:
    if not (torch.cuda.is_available() and hasattr(torch.cuda, "host_memory_stats")):
        return {}
    stats = torch.cuda.host_memory_stats()
    return {k: v for k, v in stats.items() if "bytes" in k}


def _reset_peaks() -> None:
    OFFLOADED["peak"] = OFFLOADED["current"]
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        if hasattr(torch.cuda, "reset_peak_host_memory_stats"):
            torch.cuda.reset_peak_host_memory_stats()


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(arm: Arm, batch: dict) -> tuple[float, object]:
    if torch.cuda.is_available():
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        loss = arm.step(batch)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end), loss
    start = time.perf_counter()
    loss = arm.step(batch)
    return (time.perf_counter() - start) * 1000, loss


def memory_census(step, top: int = 14, device: str = "cuda") -> dict:
    """What is alive at the peak of one step, measured: the allocator's history of that step
    replayed up to its highest point, the tensors alive there grouped by size (at 1 x 16384 on
    Llama-3-8B, 128 MiB is one bf16 hidden state, 256 MiB an int32 stream, 112 MiB a 4096-token
    chunk of the MLP's intermediate). Only what the step allocated counts (the model and the
    optimizer are static). On the CPU the history is the profiler's memory events: the same
    tensors, without the CUDA kernels' workspaces."""
    events = _cuda_allocations(step) if device == "cuda" else _cpu_allocations(step)
    highest, _, alive = replay_to_peak(events)
    return {"peak_gib": highest / 2**30,
            **grouped([(events[i][2], dict(where=f"tensors of {events[i][2] / 2**20:.0f} MiB")) for i in alive], top)}


def replay_to_peak(events: list, may_peak=None) -> tuple[int, int, list[int]]:
    """(allocated?, address, bytes) events in order, replayed: the highest total (counting only
    the moments i where may_peak(i) holds, if given), the index of that moment, and the indices
    of the allocations alive then."""
    total, highest, at, sizes = 0, 0, -1, {}
    for i, (alloc, addr, size) in enumerate(events):
        if alloc:
            sizes[addr] = size
            total += size
        else:
            total -= sizes.pop(addr, 0)
        if total > highest and (may_peak is None or may_peak(i)):
            highest, at = total, i
    alive: dict = {}
    for i, (alloc, addr, _) in enumerate(events[: at + 1]):
        if alloc:
            alive[addr] = i
        else:
            alive.pop(addr, None)
    return highest, at, list(alive.values())


def grouped(tensors: list[tuple[int, dict]], top: int) -> dict:
    """(bytes, label fields) of the tensors alive at a peak, summed per label, largest first."""
    groups: dict = {}
    for size, label in tensors:
        g = groups.setdefault(tuple(label.items()), [0, 0])
        g[0] += size
        g[1] += 1
    ranked = sorted(groups.items(), key=lambda kv: -kv[1][0])
    return {"groups": [dict(label, gib=v[0] / 2**30, tensors=v[1]) for label, v in ranked[:top]],
            "rest_gib": sum(v[0] for _, v in ranked[top:]) / 2**30}


def _cuda_allocations(step) -> list[tuple[bool, int, int]]:
    """(allocated?, address, bytes) of every allocation and free one step makes on the GPU."""
    # sizes only: recording Python stacks made cross_entropy fail on the H200 (torch 2.11), and
    # a failed step's graph, kept by its traceback, inflated the steps measured after it
    torch.cuda.synchronize()
    torch.cuda.memory._record_memory_history(max_entries=2_000_000, context=None)
    try:
        step()
        torch.cuda.synchronize()
        snapshot = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    events = snapshot["device_traces"][torch.cuda.current_device()]
    return [(e["action"] == "alloc", e["addr"], e["size"]) for e in events if e["action"] in ("alloc", "free_completed")]


def _cpu_allocations(step) -> list[tuple[bool, int, int]]:
    """The same on the CPU, from the profiler's memory events (a free is a negative size)."""
    return as_allocations(cpu_memory_trace(step)[0])


def as_allocations(memory: list[dict]) -> list[tuple[bool, int, int]]:
    """The profiler's memory events as (allocated?, address, bytes)."""
    return [(e["args"]["Bytes"] > 0, e["args"]["Addr"], abs(e["args"]["Bytes"])) for e in memory]


def cpu_memory_trace(step, with_stack: bool = False) -> tuple[list[dict], list[dict]]:
    """One step under the profiler with its memory events: the CPU's memory events in the order
    they happened, and every event of the trace (chrome format)."""
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, with_stack=with_stack) as prof:
        step()
    with tempfile.TemporaryDirectory() as folder:
        trace = Path(folder) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    memory = [e for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0]
    memory.sort(key=lambda e: (e["ts"], e["args"].get("Ev Idx", 0)))
    return memory, events


def measure_arm(arm: Arm, shape_name: str, seqs: list[int], steps: int, warmup_seq: int | None = None,
                peak_step: bool = False, on_row=None, budget=None, census_seqs: tuple = (),
                profile_seqs: tuple = ()) -> list[dict]:
    """DESIGN §5 for one built arm at each of `seqs`: one warm-up step (at `warmup_seq`, default the
    shortest), static = allocated afterwards; per length `steps` timed steps (CUDA events), peak =
    max allocated over them (or over one untimed step before them with `peak_step`). At the
    lengths in `census_seqs` one more step is recorded for a census of its peak (memory_census), at
    those in `profile_seqs` one more under torch.profiler (_profile)."""
    cuda = torch.cuda.is_available()
    if arm.static is None:  # once per arm
        batch = arm.batch(warmup_seq or min(seqs))
        arm.step(batch)  # warm-up: optimizer states exist afterwards
        del batch
        _sync()
        arm.static = torch.cuda.memory_allocated() if cuda else 0
    static = arm.static
    rows = []
    for seq in seqs:
        if budget is not None and not budget.allows(arm.method, seq, steps + peak_step):
            row = dict(shape=shape_name, method=arm.method, batch=arm.shape["batch"], seq=seq, error="skipped: time budget")
        else:
            batch = arm.batch(seq)
            _reset_peaks()
            if peak_step:
                arm.step(batch)
                _sync()
            times, loss = [], None
            for _ in range(steps):
                ms, loss = _timed(arm, batch)
                times.append(ms)
            peak = torch.cuda.max_memory_allocated() if cuda else 0
            host = _host_stats()
            del batch
            step_ms = statistics.median(times)
            tokens = arm.shape["batch"] * seq
            row = dict(
                shape=shape_name, method=arm.method, batch=arm.shape["batch"], seq=seq, **arm.describe(),
                static_gib=static / 2**30, peak_gib=peak / 2**30, activation_gib=(peak - static) / 2**30,
                step_ms=step_ms, tokens_per_s=tokens / step_ms * 1000, step_ms_all=times,
                loss=None if loss is None else float(loss),
            )
            if arm.method == OFFLOAD_GC:
                row["offloaded_checkpoints_gib"] = OFFLOADED["peak"] / 2**30
            if "offload" in arm.method and host:
                row["pinned_host"] = host
                # owned by the pinned allocator (in use + cached), and in use, at the peak of these steps
                for key, name in (("allocated_bytes.peak", "pinned_host_peak_gib"),
                                  ("active_bytes.peak", "pinned_host_in_use_peak_gib")):
                    if key in host:
                        row[name] = host[key] / 2**30
            if budget is not None:
                budget.record(arm.method, seq, step_ms)
            if seq in census_seqs and cuda:
                batch = arm.batch(seq)
                try:
                    row["census"] = memory_census(lambda: arm.step(batch))
                except Exception as e:  # a census is extra: the measured row stands without it
                    row["census"] = {"error": _error_text(e)}
                del batch
            if seq in profile_seqs:
                batch = arm.batch(seq)
                try:
                    row["profile"] = _profile(lambda: arm.step(batch), top=40, model=arm.model)
                except Exception as e:  # extra, like the census
                    row["profile"] = {"error": _error_text(e)}
                del batch
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows


def measure(shape_name: str, method: str, steps: int, device, layers: int | None = None, seq: int | None = None,
            batch_size: int | None = None, profile: bool = False, sweep_name: str | None = None) -> dict:
    shape = dict(SHAPES[shape_name])
    if seq is not None:
        shape["seq"] = seq
    if batch_size is not None:
        shape["batch"] = batch_size
    free()
    _reset_peaks()
    model = build(shape, method, device, torch.bfloat16, layers=layers)
    arm = Arm(model, shape, method, device, torch.bfloat16)
    # warm-up, one step for the peak, then the timed steps, all at the shape's length
    result = measure_arm(arm, shape_name, [shape["seq"]], steps, warmup_seq=shape["seq"], peak_step=True)[0]
    if profile and not arm.frozen:
        batch = make_batch(shape, model.config, device)
        result["profile"] = _profile(lambda: train_step(model, batch, arm.optimizer, arm.mode), model=model)
        del batch
    arm.close()
    del model, arm
    return result


def _profile(step, top: int = 12, model=None) -> dict:
    """One step under torch.profiler: GPU kernel time against wall time says whether the step
    waits on the GPU or on the host (Python, launches, syncs); the top kernels say where the GPU's
    time goes; `budget` splits the step into the engine's parts (step_budget.py), and for a model
    without the engine labels each decoder layer, whose forward in backward is the recompute."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    engine = model is None or hasattr(model, "meft_backward")
    layers = contextlib.nullcontext() if engine else labelled_layers(decoder_layers(model))
    _sync()
    with layers, profile(activities=activities) as prof:
        start = time.perf_counter()
        step()
        _sync()
        wall_ms = (time.perf_counter() - start) * 1000
    # kernels only (device-side events); operator rows would count the same time again
    kernels = [e for e in prof.events() if is_device_work(e)]
    by_name: dict = {}
    for e in kernels:
        ms, calls = by_name.get(e.name, (0.0, 0))
        by_name[e.name] = (ms + e.device_time / 1000, calls + 1)
    ranked = sorted(by_name.items(), key=lambda item: -item[1][0])[:top]
    # operators (aten and the engine's own), by the host time they take themselves and by how
    # many calls they make: a host-bound step shows where its launches come from
    ops = [o for o in prof.key_averages() if o.device_type != torch.autograd.DeviceType.CUDA and o.count]
    def op_row(o):
        return dict(name=o.key[:60], calls=o.count, self_cpu_ms=o.self_cpu_time_total / 1000,
                    self_gpu_ms=getattr(o, "self_device_time_total", 0) / 1000)
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None) or 1
    return dict(
        budget=part_budget(prof.events(), wall_ms, n_layers),
        wall_ms=wall_ms, gpu_kernel_ms=sum(e.device_time for e in kernels) / 1000, kernel_launches=len(kernels),
        top_kernels=[dict(name=name[:90], ms=ms, calls=calls) for name, (ms, calls) in ranked],
        top_ops_by_calls=[op_row(o) for o in sorted(ops, key=lambda o: -o.count)[:top]],
        top_ops_by_host_time=[op_row(o) for o in sorted(ops, key=lambda o: -o.self_cpu_time_total)[:top]],
    )


def _grads(model, batch, mode: str, seed: int) -> dict:
    model.zero_grad(set_to_none=True)
    with torch.random.fork_rng(devices=[torch.cuda.current_device()]):
        torch.manual_seed(seed)
        with model.meft_backward(mode):
            loss = model(**batch).loss
        loss.backward()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def _compare(a: dict, b: dict) -> dict:
    equal = sum(int(torch.equal(a[n], b[n])) for n in a)
    worst = max(((a[n] - b[n]).norm() / a[n].norm().clamp_min(1e-30)).item() for n in a)
    return {"tensors": len(a), "bitwise_equal": equal, "max_relative_difference": worst}


def check(shape_name: str, device, dtype, autocast: bool = False, layers: int | None = None, attention: str = "sdpa") -> list[dict]:
    """Reconstruction, gradients and determinism for each variant at the full shape."""
    shape = SHAPES[shape_name]
    rows = []
    for variant in ("meft1", "meft2", "meft3"):
        torch.cuda.empty_cache()
        model = build(shape, variant, device, dtype, layers=layers, attention=attention)
        batch = make_batch(shape, model.config, device, seed=1)
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        meft_layers = model.meft_layers
        with amp:
            meft_layers.trace = []
            reversible = _grads(model, batch, "reversible", seed=3)
            trace, meft_layers.trace = meft_layers.trace, None
            forward = {name: (a, b) for kind, name, a, b in trace if kind == "forward"}
            differing = sum(
                int((forward[name][0] != a).sum() + (forward[name][1] != b).sum()) for kind, name, a, b in trace if kind == "backward"
            )
            max_stream = max(max(a.abs().max().item(), b.abs().max().item()) for a, b in forward.values()) / 2.0**32
            del trace, forward
            again = _grads(model, batch, "reversible", seed=3)
            vanilla = _grads(model, batch, "vanilla", seed=3)
            vanilla_again = _grads(model, batch, "vanilla", seed=3)
        rows.append(dict(
            shape=shape_name, variant=variant, dtype=str(dtype), autocast=autocast, layers=len(meft_layers),
            attention=attention,
            reconstruction_differing_elements=differing, largest_stream_value=max_stream,
            reversible_vs_vanilla=_compare(vanilla, reversible),
            reversible_vs_reversible=_compare(reversible, again),
            vanilla_vs_vanilla=_compare(vanilla, vanilla_again),
        ))
        print(json.dumps(rows[-1]), flush=True)
        del model, batch, reversible, again, vanilla, vanilla_again
    return rows


def kernel_check(device) -> list[dict]:
    """The compiled half-step functions against eager, and their speed. Integers (streams,
    packed remainders, sums) must agree bit for bit; values may break rounding ties
    differently, which is why one run never mixes the two."""
    rows = []
    g = torch.Generator(device=device).manual_seed(0)
    shape = (8, 512, 2048)
    compiled_couple = torch.compile(fixed_point._couple, dynamic=True)
    compiled_uncouple = torch.compile(fixed_point._uncouple, dynamic=True)
    for m in (1, 10, 1024):
        for dtype in (torch.bfloat16, torch.float32):
            x = fixed_point.to_fixed(torch.randn(shape, device=device, generator=g) * 50, 32)
            out = (torch.randn(shape, device=device, generator=g) * 3).to(dtype)

            def eager(x, out):
                return fixed_point._couple(x, out, m, 32, torch.float32)

            def fused(x, out):
                return compiled_couple(x, out, m, 32, torch.float32)

            a, b = eager(x, out), fused(x, out)
            same = all((a[i] is None and b[i] is None) or torch.equal(a[i], b[i]) for i in (0, 2, 3, 4))
            back = compiled_uncouple(b[0], out, b[2], m, 32, torch.float32)
            exact = torch.equal(back[0], x) and torch.equal(back[1], fixed_point.from_fixed(x, 32, torch.float32)) is not None
            times = {}
            for name, fn in (("eager", eager), ("fused", fused)):
                for _ in range(3):
                    fn(x, out)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(20):
                    fn(x, out)
                end.record()
                torch.cuda.synchronize()
                times[name] = start.elapsed_time(end) / 20
            rows.append(dict(m=m, dtype=str(dtype), elements=x.numel(), integers_bitwise_equal=same,
                             values_differing_in_rounding_ties=int((a[1] != b[1]).sum()), inverse_exact=exact,
                             eager_ms=times["eager"], fused_ms=times["fused"]))
            print(json.dumps(rows[-1]), flush=True)
    return rows


def _run(results: dict, out: Path, **kw) -> None:
    try:
        row = measure(**kw)
    except torch.cuda.OutOfMemoryError as e:
        row = dict(shape=kw["shape_name"], method=kw["method"], error=f"out of memory: {e}")
    except Exception as e:  # one broken arm must not end the run
        traceback.print_exc()
        row = dict(shape=kw["shape_name"], method=kw["method"], error=f"{type(e).__name__}: {e}")
    row["sweep"] = kw.get("sweep_name")
    results["memory_speed"].append(row)
    print(json.dumps({k: v for k, v in row.items() if k not in ("step_ms_all", "profile")}), flush=True)
    _print_profile(row)
    out.write_text(json.dumps(results, indent=1))


def _slope(rows: list[dict], key: str) -> float | None:
    """Least-squares slope of activation memory (GiB) against `key` (layers or tokens)."""
    if len(rows) < 2:
        return None
    xs, ys = [r[key] for r in rows], [r["activation_gib"] for r in rows]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def summarise(results: dict) -> dict:
    """The issue's targets as ratios measured in this run."""
    rows = [r for r in results["memory_speed"] if "error" not in r]
    summary: dict = {}
    for shape in SHAPES:
        if SHAPES[shape].get("shared"):
            continue  # summarise_long
        main_rows = {r["method"]: r for r in rows if r["shape"] == shape and r.get("sweep") is None}
        exact = {m: r for m, r in main_rows.items() if m.startswith("meft") and not m.endswith(("float", "vanilla"))}
        if not exact:
            continue
        best = min(exact.values(), key=lambda r: r["activation_gib"])
        entry = {"best_exact_meft": best["method"], "best_exact_meft_activation_gib": best["activation_gib"]}
        for ref in ("full", "lora", "lora+gc", "lora+gc+chunked-loss", OFFLOAD_GC, "head-only", "frozen-layer"):
            if ref in main_rows and main_rows[ref]["activation_gib"] > 0:
                entry[f"activation_vs_{ref}"] = best["activation_gib"] / main_rows[ref]["activation_gib"]
        if "lora" in main_rows:
            entry["step_time_vs_lora"] = {m: r["step_ms"] / main_rows["lora"]["step_ms"] for m, r in exact.items()}
        if "lora+gc+chunked-loss" in main_rows:
            reference = main_rows["lora+gc+chunked-loss"]["step_ms"]
            entry["step_time_vs_lora+gc+chunked-loss"] = {m: r["step_ms"] / reference for m, r in exact.items()}
        summary[shape] = entry
    depth = {}
    for method in SWEEP_METHODS:
        slope = _slope(sorted((r for r in rows if r.get("sweep") == "depth" and r["method"] == method),
                              key=lambda r: r["layers"]), "layers")
        if slope is not None:
            depth[method] = {"gib_per_layer": slope}
    if "lora+gc" in depth:
        for method, entry in depth.items():
            entry["vs_lora+gc"] = entry["gib_per_layer"] / depth["lora+gc"]["gib_per_layer"]
    summary["depth_slopes"] = depth
    return summary


# --- long sequences on shared weights ---------------------------------------------------------


class Budget:
    """Wall-clock budget of a run: work whose predicted time does not fit is not started.
    Step time at a length is predicted from the arm's measured steps, t = a·s + b·s² (a, b ≥ 0),
    or from the longest measured step scaled by (s/s0)^1.5."""

    def __init__(self, seconds: float | None, reserve: float = 15.0):
        self.start, self.seconds, self.reserve = time.perf_counter(), seconds, reserve
        self.times: dict[str, dict[int, float]] = {}

    def left(self) -> float:
        if self.seconds is None:
            return math.inf
        return self.seconds - (time.perf_counter() - self.start)

    def record(self, method: str, seq: int, ms: float) -> None:
        self.times.setdefault(method, {})[seq] = ms

    def predict_s(self, method: str, seq: int) -> float:
        # an arm not measured yet: the others' times (one layer alone says nothing of a whole model)
        known = self.times.get(method) or {
            s: ms for m, times in self.times.items() if m != "frozen-layer" for s, ms in times.items()}
        if not known:
            return 0.0
        if len(known) >= 2:
            a, b = _fit_linear_quadratic(list(known.items()))
            return (a * seq + b * seq * seq) / 1000
        s0, t0 = max(known.items())
        return t0 * (seq / s0) ** 1.5 / 1000

    def allows(self, method: str, seq: int, steps: int = 1) -> bool:
        return self.predict_s(method, seq) * steps + self.reserve < self.left()


def _fit_linear_quadratic(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least squares t = a·s + b·s² with a, b ≥ 0."""
    sxx = sum(s**2 for s, _ in points)
    sx3 = sum(s**3 for s, _ in points)
    sx4 = sum(s**4 for s, _ in points)
    sxy = sum(s * t for s, t in points)
    sx2y = sum(s * s * t for s, t in points)
    det = sxx * sx4 - sx3 * sx3
    a, b = ((sxy * sx4 - sx3 * sx2y) / det, (sxx * sx2y - sx3 * sxy) / det) if det else (0.0, -1.0)
    if a < 0 or b < 0:  # one term alone
        a, b = (sxy / sxx, 0.0) if b < 0 else (0.0, sx2y / sx4)
    return a, b


def _fit_line(points: list[tuple[int, float]]) -> tuple[float, float] | None:
    if len(points) < 2:
        return None
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


def _close(arm: Arm | None) -> None:
    """Closes an arm (LoRA: unwraps the shared model); a failure there is reported, not raised."""
    if arm is None:
        return
    try:
        arm.close()
    except Exception:
        traceback.print_exc()


def _print_profile(row: dict) -> None:
    p = row.get("profile") or {}
    if "wall_ms" not in p:
        return
    print(f"#   profile wall {p['wall_ms']:.0f} ms, kernels {p['gpu_kernel_ms']:.0f} ms, {p['kernel_launches']} launches", flush=True)
    for k in p["top_kernels"][:25]:
        print(f"#   {k['ms']:8.1f} ms {k['calls']:6d}  {k['name']}", flush=True)
    for title in ("calls", "host_time"):
        print(f"#   operators by {title.replace('_', ' ')}: calls, own host ms, own GPU ms", flush=True)
        for o in p.get(f"top_ops_by_{title}", [])[:20]:
            print(f"#   {o['calls']:7d} {o['self_cpu_ms']:8.1f} {o['self_gpu_ms']:8.1f}  {o['name']}", flush=True)


def _error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def run_shared(results: dict, out: Path, plain, shape_name: str, methods: list[str], seqs: list[int], steps: int,
               device, dtype, budget: Budget, census_seqs: tuple = (), profile_seqs: tuple = ()) -> None:
    """Every arm on `plain`'s weights at every length: one build and warm-up per arm."""
    shape = SHAPES[shape_name]

    def on_row(row):
        results["memory_speed"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("step_ms_all", "pinned_host", "meft", "census", "profile")}), flush=True)
        _print_profile(row)
        for group in row.get("census", {}).get("groups", []):
            print(f"#   census {group['gib']:7.3f} GiB  {group['tensors']:5d}  {group['where']}", flush=True)
        out.write_text(json.dumps(results, indent=1))

    for method in methods:
        if not budget.allows(method, min(seqs), steps + 1):
            for seq in seqs:
                on_row(dict(shape=shape_name, method=method, batch=shape["batch"], seq=seq, error="skipped: time budget"))
            continue
        print(f"# {shape_name} {method}: building ({budget.left():.0f} s left)", flush=True)
        free()
        arm = None
        done = set()
        try:
            model, undo = build_shared(plain, shape, method, device, dtype)
            arm = Arm(model, shape, method, device, dtype, undo)
            del model
            for seq in seqs:
                # each length on its own, so that an OOM at the longest keeps the shorter ones
                try:
                    measure_arm(arm, shape_name, [seq], steps, warmup_seq=min(seqs), on_row=on_row, budget=budget,
                                census_seqs=census_seqs, profile_seqs=profile_seqs)
                except torch.cuda.OutOfMemoryError as e:
                    on_row(dict(shape=shape_name, method=method, batch=shape["batch"], seq=seq, error=f"out of memory: {_error_text(e)}"))
                    free()
                done.add(seq)
        except Exception as e:  # a broken arm must not end the run
            traceback.print_exc()
            for seq in seqs:
                if seq not in done:
                    on_row(dict(shape=shape_name, method=method, batch=shape["batch"], seq=seq, error=_error_text(e)))
        finally:
            _close(arm)
            del arm
            free()


def max_context(results: dict, out: Path, plain, shape_name: str, methods: list[str], device, dtype, cap_gib: float,
                limit: int, probes: int, budget: Budget, granule: int = 4096, start: int | None = None) -> None:
    """The longest batch-1 sequence (a multiple of `granule`) that one training step of each arm
    runs within `cap_gib` of GPU memory (torch.cuda.set_per_process_memory_fraction). The first probe
    is `start`, or else the length the arm's measured peaks predict (a line through peak against
    length, 3% under the cap); then up in steps that double, or down, and bisection. A probe fits if
    the step ends without OutOfMemoryError and the allocator reserved no more than the cap."""
    shape = SHAPES[shape_name]
    cuda = torch.cuda.is_available()
    cap = cap_gib * 2**30
    if cuda:
        free()
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), torch.device(device).index or 0)
    try:
        for method in methods:
            grid = [(r["seq"], r["peak_gib"] * 2**30) for r in results["memory_speed"]
                    if r["shape"] == shape_name and r["method"] == method and "error" not in r and r.get("sweep") is None]
            line = _fit_line(grid)
            if line and line[1] > 0:
                guess = (cap * 0.97 - line[0]) / line[1]
            else:
                guess = 32768
            guess = int(min(limit, max(granule, guess // granule * granule))) if start is None else start
            row = dict(shape=shape_name, method=method, cap_gib=cap_gib, limit=limit, predicted=guess, probes=[],
                       max_context=None, first_failing=None)
            results["max_context"].append(row)
            lo, hi, seq, step = 0, None, guess, None
            arm = None
            for _ in range(probes):
                if seq is None or not budget.allows(method, seq):
                    row["stopped"] = "time budget" if seq is not None else None
                    break
                print(f"# max context {method}: probe {seq} ({budget.left():.0f} s left)", flush=True)
                ok, error, t0 = True, None, time.perf_counter()
                try:
                    if arm is None:
                        model, undo = build_shared(plain, shape, method, device, dtype)
                        arm = Arm(model, shape, method, device, dtype, undo)
                        del model
                    batch = arm.batch(seq)
                    _reset_peaks()
                    arm.step(batch)
                    _sync()
                    del batch
                except torch.cuda.OutOfMemoryError as e:
                    ok, error = False, "out of memory"
                    del e
                except Exception as e:
                    traceback.print_exc()
                    ok, error = False, _error_text(e)
                    del e
                seconds = time.perf_counter() - t0
                peak = torch.cuda.max_memory_allocated() if cuda else 0
                reserved = torch.cuda.max_memory_reserved() if cuda else 0
                if ok and cuda and reserved > cap:
                    ok, error = False, "reserved more than the cap"
                host = _host_stats().get("allocated_bytes.peak")
                row["probes"].append(dict(seq=seq, fits=ok, seconds=seconds, peak_gib=peak / 2**30,
                                          reserved_gib=reserved / 2**30, error=error,
                                          host_gib=None if host is None else host / 2**30))
                print(json.dumps(row["probes"][-1]), flush=True)
                if ok:
                    budget.record(method, seq, seconds * 1000)
                    lo = seq
                else:
                    hi = seq
                    _close(arm)  # after a failed step, a fresh arm
                    arm = None
                    if error not in ("out of memory", "reserved more than the cap"):
                        row["stopped"] = error
                        break
                free()
                row.update(max_context=lo or None, first_failing=hi)
                out.write_text(json.dumps(results, indent=1))
                # next probe
                if hi is None:
                    if lo >= limit:
                        break
                    step = granule if step is None else step * 2
                    seq = min(limit, lo + step)
                elif lo == 0:
                    step = max(granule, (seq // 4) // granule * granule) if step is None else step * 2
                    seq = hi - step if hi - step >= granule else (granule if hi > granule else None)
                else:
                    if hi - lo <= granule:
                        break
                    seq = (lo + hi) // 2 // granule * granule
            _close(arm)
            del arm
            free()
            row.update(max_context=lo or None, first_failing=hi, resolution=None if hi is None or not lo else hi - lo)
            out.write_text(json.dumps(results, indent=1))
            print(json.dumps({k: v for k, v in row.items() if k != "probes"}), flush=True)
    finally:
        if cuda:
            torch.cuda.set_per_process_memory_fraction(1.0, torch.device(device).index or 0)


def measured_peaks(results: dict, shape_name: str, method: str) -> list[dict]:
    """Every step of an arm that ran to the end at a known length: the timed rows and the
    max-context probes that fit, each with its GPU peak and, offloaded, its pinned host memory."""
    points = [dict(seq=r["seq"], peak_gib=r["peak_gib"], host_gib=r.get("pinned_host_peak_gib"), source="step")
              for r in results["memory_speed"]
              if r["shape"] == shape_name and r["method"] == method and "error" not in r and r.get("sweep") is None]
    points += [dict(seq=p["seq"], peak_gib=p["peak_gib"], host_gib=p.get("host_gib"), source=f"probe at {r['cap_gib']:g} GiB")
               for r in results.get("max_context", []) if r["shape"] == shape_name and r["method"] == method
               for p in r["probes"] if p["fits"]]
    return sorted(points, key=lambda p: p["seq"])


def predict_context(points: list[dict], cap_gib: float, host_gib: float | None, granule: int = 4096) -> dict | None:
    """The longest length a line through the measured peaks (GPU memory against length) puts under
    `cap_gib`, with the line's worst miss on the measured points; offloaded arms also hold pinned
    host memory in proportion to length, so the host's `host_gib` is a second bound. Which of the
    two binds is named. A prediction, not a measurement: the JSON says which is which."""
    line = _fit_line([(p["seq"], p["peak_gib"]) for p in points])
    if not line or line[1] <= 0:
        return None
    intercept, slope = line
    misses = [p["peak_gib"] - (intercept + slope * p["seq"]) for p in points]
    entry = dict(cap_gib=cap_gib, points=len(points), longest_measured=points[-1]["seq"],
                 gib_per_1k_tokens=slope * 1024, intercept_gib=intercept,
                 fit_worst_miss_gib=max(misses, key=abs), fit_worst_miss_rel=max(
                     (m / p["peak_gib"] for m, p in zip(misses, points)), key=abs))
    gpu = int((cap_gib - intercept) / slope) // granule * granule
    entry["predicted_gpu_bound"] = gpu
    host = [p["host_gib"] / p["seq"] for p in points if p.get("host_gib")]
    if host and host_gib:
        per_token = max(host)
        entry["host_gib_per_1k_tokens"] = per_token * 1024
        entry["predicted_host_bound"] = int(host_gib / per_token) // granule * granule
    bounds = {"gpu": gpu, "host": entry.get("predicted_host_bound")}
    entry["binds"] = min((k for k in bounds if bounds[k] is not None), key=bounds.get)
    entry["predicted_max_context"] = bounds[entry["binds"]]
    return entry


def predictions(results: dict, shape_name: str, caps: list[float]) -> dict:
    """predict_context for every arm measured at a shape and every cap."""
    env = results.get("environment", {})
    host = env.get("host_gib")
    out: dict = {}
    methods = {r["method"] for r in results["memory_speed"] if r["shape"] == shape_name and "error" not in r}
    methods |= {r["method"] for r in results.get("max_context", []) if r["shape"] == shape_name}
    for method in sorted(methods):
        points = measured_peaks(results, shape_name, method)
        for cap in caps:
            entry = predict_context(points, cap, host)
            if entry:
                out.setdefault(method, {})[f"{cap:g}"] = entry
    return out


def summarise_long(results: dict, shape_name: str) -> dict:
    """The issue's targets at the long-sequence shape, as ratios measured in this run."""
    rows = [r for r in results["memory_speed"] if r["shape"] == shape_name and "error" not in r]
    entry: dict = {}
    for seq in sorted({r["seq"] for r in rows}):
        at = {r["method"]: r for r in rows if r["seq"] == seq}
        exact = {m: r for m, r in at.items() if m.startswith("meft") and parse_meft(m)["exact"]}
        on_gpu = {m: r for m, r in exact.items() if not parse_meft(m)["offload"]}
        e: dict = {}
        for name, group, ref in (("on_gpu", on_gpu, "lora+gc+chunked-loss"), ("offloaded", exact, OFFLOAD_GC)):
            if group:
                best = min(group.values(), key=lambda r: r["activation_gib"])
                e[f"best_exact_meft_{name}"] = best["method"]
                e[f"best_exact_meft_{name}_activation_gib"] = best["activation_gib"]
                if ref in at and at[ref]["activation_gib"] > 0:
                    e[f"best_exact_meft_{name}_activation_vs_{ref}"] = best["activation_gib"] / at[ref]["activation_gib"]
        if "lora+gc+chunked-loss" in at:
            e["step_time_vs_lora+gc+chunked-loss"] = {
                m: r["step_ms"] / at["lora+gc+chunked-loss"]["step_ms"] for m, r in at.items()}
        if "frozen-layer" in at:
            e["frozen_layer_activation_gib"] = at["frozen-layer"]["activation_gib"]
        entry[str(seq)] = e
    searches = [r for r in results.get("max_context", []) if r["shape"] == shape_name]
    caps = sorted({r["cap_gib"] for r in searches})
    for cap in caps:
        contexts = {r["method"]: r["max_context"] for r in searches if r["cap_gib"] == cap}
        # one cap: the keys as before; several: one entry per cap
        target = entry if len(caps) == 1 else entry.setdefault(f"cap_{cap:g}_gib", {})
        target["max_context"] = contexts
        exact = {m: c for m, c in contexts.items() if m.startswith("meft") and parse_meft(m)["exact"] and c}
        if exact:
            best = max(exact, key=exact.get)
            target["max_context_best_exact_meft"] = best
            for ref in ("lora+gc+chunked-loss", OFFLOAD_GC):
                if contexts.get(ref):
                    target[f"max_context_vs_{ref}"] = exact[best] / contexts[ref]
    return entry


def step_budgets(results: dict) -> dict:
    """Per shape and length, each profiled arm's step part by part (ms per layer of each phase's
    parts, GPU and host) and, for each MEFT arm, what its own parts cost beyond the checkpointed
    step (step_budget.overhead against lora+gc+chunked-loss, else lora+gc, at the same length)."""
    rows = [r for r in results["memory_speed"] if "error" not in r and "budget" in (r.get("profile") or {})]
    out: dict = {}
    for shape, seq in sorted({(r["shape"], r["seq"]) for r in rows}):
        at = {r["method"]: r for r in rows if r["shape"] == shape and r["seq"] == seq and r.get("sweep") is None}
        entry: dict = {}
        for method, r in at.items():
            b = r["profile"]["budget"]
            entry[method] = dict(
                step_ms=r["step_ms"], profiled_wall_ms=b["wall_ms"], gpu_busy_share=b["gpu_busy_share"], sync_ms=b["sync_ms"],
                per_layer_ms={k: dict(device=v["device_ms"] / b["layers"], host=v["host_ms"] / b["layers"],
                                      python=v["python_ms"] / b["layers"]) for k, v in b["parts"].items()})
        base = next((m for m in ("lora+gc+chunked-loss", "lora+gc") if m in at), None)
        if base is not None:
            for method, r in at.items():
                if method.startswith("meft"):
                    entry[method]["beyond_" + base] = overhead(r["profile"]["budget"], at[base]["profile"]["budget"],
                                                              r["step_ms"], at[base]["step_ms"])
        if entry:
            out[f"{shape} {at[next(iter(at))]['batch']}x{seq}"] = entry
    return out


def _print_step_budgets(budgets: dict) -> None:
    for where, arms in budgets.items():
        print(f"# step budget {where}: ms per layer, GPU / host, by phase and part", flush=True)
        for method, e in arms.items():
            busy = e["gpu_busy_share"]
            print(f"#   {method}: step {e['step_ms']:.1f} ms, GPU busy {busy if busy is None else round(busy, 3)}", flush=True)
            for part, v in e["per_layer_ms"].items():
                print(f"#     {part:22s} {v['device']:8.3f} {v['host']:8.3f}", flush=True)


def step_ratio_failures(summary: dict, max_ratio: float) -> list[str]:
    """Each exact MEFT arm whose step time is more than `max_ratio` times LoRA + checkpointing +
    chunked loss's in this run (summary from summarise and summarise_long), as one line each."""
    key = "step_time_vs_lora+gc+chunked-loss"
    found = []
    for shape, entry in summary.items():
        if not isinstance(entry, dict):
            continue
        groups = [(shape, entry)] + [(f"{shape} at {seq}", e) for seq, e in entry.items() if isinstance(e, dict)]
        for where, group in groups:
            for method, ratio in (group.get(key) or {}).items():
                arm = parse_meft(method) if method.startswith("meft") else None
                if arm and arm["exact"] and not arm["vanilla"] and ratio > max_ratio:
                    found.append(f"{where}: {method} takes {ratio:.2f}x LoRA + checkpointing's step (at most {max_ratio:g}x)")
    return found


def _cap(text: str) -> float | str:
    return text if text == "card" else float(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=LEGACY_SHAPES, choices=list(SHAPES))
    parser.add_argument("--methods", nargs="+", default=None, choices=METHODS,
                        help=f"default: {' '.join(LEGACY_METHODS)}; for llama-3-8b: {' '.join(LONG_METHODS)}")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--depths", nargs="*", type=int, default=DEPTHS,
                        help="depth sweep at OPT-1.3b width, batch 8 x 512 (none: skip)")
    parser.add_argument("--seq-lengths", nargs="*", type=int, default=SEQ_LENGTHS,
                        help="sequence-length sweep at OPT-1.3b shape, batch 2 (none: skip)")
    parser.add_argument("--sweep-methods", nargs="+", default=SWEEP_METHODS, choices=METHODS)
    parser.add_argument("--long-seqs", nargs="+", type=int, default=LONG_SEQS,
                        help="sequence lengths of the batch-1 shapes with shared weights (llama-3-8b)")
    parser.add_argument("--max-context-methods", nargs="*", default=MAX_CONTEXT_METHODS, choices=SHARED_METHODS,
                        help="arms of the max-context search at the shared shapes (none: skip it)")
    parser.add_argument("--base", choices=list(BASES), default="bf16",
                        help="frozen base of the shapes with shared weights: bf16, or its layers' linear projections in "
                             "4 bits (bitsandbytes NF4; nf4-double: with double quantization), built a layer at a time")
    parser.add_argument("--memory-cap-gib", type=_cap, nargs="+", default=[40.0],
                        help="GPU memory caps of the max-context search, one search per cap ('card': the whole card); "
                             "the summary also predicts each arm's longest context at each cap and on the whole card")
    parser.add_argument("--max-context-start", type=int, default=None,
                        help="first length the search tries (default: where a line through the arm's measured peaks "
                             "meets the cap)")
    parser.add_argument("--max-context-limit", type=int, default=262144, help="longest sequence the search tries")
    parser.add_argument("--max-probes", type=int, default=5, help="training steps the search tries per arm")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds: shared-shape work predicted to end later is skipped and marked so")
    parser.add_argument("--meft-profile", choices=("paper", "llm"), default=None,
                        help="MEFT settings: paper (λ, β 0.1, int64 streams) or llm (starting-point scales 2^-8 / 2^-10, "
                             "int32 streams, 18 fractional bits); default llm when a shared shape runs, else paper")
    parser.add_argument("--census-seqs", nargs="*", type=int, default=[],
                        help="lengths of the batch-1 shapes at which one more step is recorded for a census of its peak")
    parser.add_argument("--recompute-chunk-tokens", type=int, default=4096,
                        help="MEFT's recompute_chunk_tokens with --meft-profile llm")
    parser.add_argument("--profile", action="store_true", help="OPT-1.3b: profile one step of the LoRA, checkpointing and MEFT1/MEFT3 arms (kernels, operators)")
    parser.add_argument("--profile-seqs", nargs="*", type=int, default=[],
                        help="lengths at which every arm of a shared shape profiles one more step (top kernels)")
    parser.add_argument("--skip-checks", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--deterministic", action="store_true",
                        help="also check gradients with torch.use_deterministic_algorithms (needs CUBLAS_WORKSPACE_CONFIG=:4096:8)")
    parser.add_argument("--max-step-ratio", type=float, default=None,
                        help="exit 1 if an exact MEFT arm's step takes more than this many times LoRA + checkpointing + "
                             "chunked loss's in this run (a check against regressions; the targets are 1.05-1.15)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda", help="cpu runs the code paths without memory figures (tests)")
    args = parser.parse_args(argv)
    budget = Budget(args.time_budget)
    shared_shapes = [s for s in args.shapes if SHAPES[s].get("shared")]
    RUN["profile"] = args.meft_profile or ("llm" if shared_shapes else "paper")
    RUN["recompute_chunk_tokens"] = args.recompute_chunk_tokens
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.backends.cuda.matmul.allow_tf32 = False
    env = dict(
        gpu=torch.cuda.get_device_name() if cuda else "cpu", torch=torch.__version__, transformers=transformers.__version__,
        date=time.strftime("%Y-%m-%d"), command=" ".join(sys.argv), loss_chunk_size=LOSS_CHUNK,
        meft_profile=RUN["profile"], recompute_chunk_tokens=RUN["recompute_chunk_tokens"],
        alloc_conf=os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or os.environ.get("PYTORCH_ALLOC_CONF"),
        total_gpu_gib=torch.cuda.get_device_properties(device).total_memory / 2**30 if cuda else None,
        time_budget_s=args.time_budget, base=args.base,
        host_gib=os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30,
    )
    card_gib = env["total_gpu_gib"]
    caps = [card_gib if c == "card" else c for c in args.memory_cap_gib if c != "card" or card_gib]
    try:
        import peft

        env["peft"] = peft.__version__
    except ImportError:
        peft = None
    results = {"environment": env, "kernels": [], "memory_speed": [], "max_context": [], "checks": [], "summary": {}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if not args.skip_checks:
        results["kernels"] = kernel_check(device)
    profiled = ("lora", "lora+gc", "lora+gc+chunked-loss", "lora+offload-gc+chunked-loss", "meft1", "meft1+offload", "meft3",
                "meft3-compiled", "meft3-float")
    for shape in [] if args.skip_memory else args.shapes:
        methods = args.methods or (LONG_METHODS if SHAPES[shape].get("shared") else LEGACY_METHODS)
        if peft is None:
            methods = [m for m in methods if not m.startswith("lora")]
        results.setdefault("arms", {}).update(arm_settings(methods))
        if SHAPES[shape].get("shared"):
            print(f"# {shape}: building the shared weights", flush=True)
            t0 = time.perf_counter()
            plain = build_plain(SHAPES[shape], device, torch.bfloat16, base=args.base)
            _sync()
            env[f"{shape}_build_s"] = time.perf_counter() - t0
            env[f"{shape}_weights_gib"] = torch.cuda.memory_allocated() / 2**30 if cuda else None
            print(f"# built in {env[f'{shape}_build_s']:.1f} s, {env[f'{shape}_weights_gib']} GiB", flush=True)
            run_shared(results, args.out, plain, shape, [m for m in methods if m in SHARED_METHODS], args.long_seqs,
                       args.steps, device, torch.bfloat16, budget, census_seqs=tuple(args.census_seqs),
                       profile_seqs=tuple(args.profile_seqs))
            search = [m for m in args.max_context_methods if peft is not None or not m.startswith("lora")]
            for cap in caps if search else ():
                max_context(results, args.out, plain, shape, search, device, torch.bfloat16, cap,
                            args.max_context_limit, args.max_probes, budget, start=args.max_context_start)
            results["summary"][shape] = summarise_long(results, shape)
            results["summary"][shape]["predicted"] = predictions(results, shape, sorted({*caps, *([card_gib] if card_gib else [])}))
            args.out.write_text(json.dumps(results, indent=1))
            del plain
            free()
            continue
        for method in methods:
            if method.endswith("chunked-loss") and SHAPES[shape]["head"] != "AutoModelForCausalLM":
                continue  # a causal-LM loss
            _run(results, args.out, shape_name=shape, method=method, steps=args.steps, device=device,
                 profile=args.profile and shape == "opt-1.3b" and method in profiled)
    for layers in [] if args.skip_memory else args.depths:
        for method in args.sweep_methods:
            _run(results, args.out, shape_name="opt-1.3b", method=method, steps=3, device=device, layers=layers,
                 sweep_name="depth")
    for seq in [] if args.skip_memory else args.seq_lengths:
        for method in args.sweep_methods:
            _run(results, args.out, shape_name="opt-1.3b", method=method, steps=3, device=device, seq=seq,
                 batch_size=2, sweep_name="seq")
    results["summary"].update(summarise(results))
    results["summary"]["step_budget"] = step_budgets(results)
    _print_step_budgets(results["summary"]["step_budget"])
    env["wall_s"] = time.perf_counter() - budget.start
    args.out.write_text(json.dumps(results, indent=1))
    if not args.skip_checks:
        results["checks"] += check("opt-1.3b", device, torch.bfloat16)
        results["checks"] += check("bert-base", device, torch.float32, autocast=True)
        args.out.write_text(json.dumps(results, indent=1))
    if args.deterministic:
        # with deterministic kernels, reversible and plain autograd must agree bit for bit on
        # the GPU too; without them, plain autograd does not even agree with itself
        torch.use_deterministic_algorithms(True)
        # eager attention: its kernels (matmuls, softmax) all have deterministic implementations
        rows = check("opt-1.3b", device, torch.bfloat16, layers=8, attention="eager")
        for row in rows:
            row["deterministic_algorithms"] = True
        results["checks"] += rows
        torch.use_deterministic_algorithms(False)
        args.out.write_text(json.dumps(results, indent=1))
    print("\nshape          method                        layers    seq  static GiB  peak GiB  activation GiB  step ms  tokens/s")
    for r in results["memory_speed"]:
        if "error" in r:
            print(f"{r['shape']:14s} {r['method']:29s} {r.get('seq', '')!s:>13}  {r['error'][:60]}")
            continue
        print(f"{r['shape']:14s} {r['method']:29s} {r['layers']:6d} {r['seq']:6d}  {r['static_gib']:10.2f}  {r['peak_gib']:8.2f}"
              f"  {r['activation_gib']:14.2f}  {r['step_ms']:7.1f}  {r['tokens_per_s']:8.0f}")
    for r in results["max_context"]:
        print(f"max context {r['shape']} {r['method']:29s} {r['max_context']} (first failing {r['first_failing']}, "
              f"cap {r['cap_gib']} GiB)")
    print(json.dumps(results["summary"], indent=1), flush=True)
    if args.max_step_ratio is not None:
        failures = step_ratio_failures(results["summary"], args.max_step_ratio)
        for line in failures:
            print(f"step time check failed: {line}", flush=True)
        if failures:
            sys.exit(1)


if __name__ == "__main__":
    main()
