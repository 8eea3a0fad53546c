"""How much GPU memory one training step takes, estimated from a model's config alone.

For a batch of T = batch × seq tokens, hidden size H, L layers, FFN width I and vocabulary V,
`estimate_memory` gives, for each way to fine-tune (an *arm*):

- static: what stays allocated between steps (weights in the model's dtype, or the layers'
  linear projections quantized as bitsandbytes stores them, the trainable parameters and their
  AdamW states), as DESIGN §5 measures it (gradients set to None);
- activation: peak − static during one step (forward, backward, optimizer step), the part that
  grows with the batch and the sequence;
- host: host memory the arm keeps (offloaded checkpoints or remainders); host_pinned: what
  torch's pinned allocator reserves for them (each buffer rounded up to a power of two).

The formulas follow what the engine (templates/reversible.py) and the benchmarked baselines
(benchmarks/memory_speed.py) allocate, in units of one T × H or T × I tensor. How many such
tensors a layer's backward holds depends on the architecture and on autograd's bookkeeping;
those counts are the named constants below, fitted to the GPU figures in benchmarks/results
(tests/test_estimate.py checks every measured arm and shape within 15%). The peak of a step is
the largest of its phases (the loss and its logits, a layer's backward, the optimizer step).

Nothing here imports torch: the CLI answers `meft-convert estimate` at once.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from .errors import BadInputError
from .templates.meft_table import (
    ADAPTER_DIM,
    LOSS_CHUNK_SIZE,
    RECOMPUTE_CHUNK_TOKENS,
    VARIANTS,
    denominator_of,
    packed_remainder_bytes,
    remainder_bits,
    remainder_layout,  # noqa: F401 (the engine's layout, read from here too)
)
from .weights import is_bnb_4bit

GIB = 2**30
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
# (λ, β) assumed when none is given: the benchmark's starting points, 2^-8 on the scaled stream
# of a variant that scales one (MEFT1, MEFT2), 2^-10 on both of one that scales two (MEFT3); 1 on
# a stream it does not scale. The converter calibrates λ and β per model (--lambda auto,
# typically 2^-8 to 2^-12); a converted model's config.json holds them.
ASSUMED_SCALE = {1: 2**-8, 2: 2**-10}  # by how many streams the variant scales
ASSUMED_SCALES = {
    name: tuple(ASSUMED_SCALE[len(v.scaled)] if stream in v.scaled else 1.0 for stream in ("lambda_", "beta"))
    for name, v in VARIANTS.items()
}
LORA_RANK = 8  # the LoRA baselines: r = 8 on the query and value projections (peft, float32 adapters)
LORA_TARGETS = {"gpt2": ("c_attn",), "bert": ("query", "value"), "roberta": ("query", "value")}

# --- fitted constants (counts of tensors of the named size; see the module docstring) --------
# Where a comment says "fitted", the number is what makes the estimate meet the measured figure
# (benchmarks/results); the named tensors are the likely content, not an inventory.
#
# Allocated by the first step whatever the arm (CUDA/cuBLAS workspaces): the measured static
# minus weights and optimizer states, 64 MiB on every shape measured.
RUNTIME_OVERHEAD_BYTES = 64 * 2**20
# One layer recomputed and differentiated over the whole sequence, per MLP kind, as
# (T×H-sized, T×I-sized) tensors. Gated (SwiGLU): fitted to Llama-3-8B's frozen-layer arm
# (1 × 8k–32k, linear in T); gate, up, their product and the gradients of each. Plain (ReLU or
# GELU, I = 4H): fitted to OPT-1.3b's LoRA + checkpointing with the chunked loss.
LAYER_WORKING_SET = {"gated": (7.6, 6.0), "plain": (8.0, 3.0)}
# Tensors the frozen-layer arm itself holds besides the working set: its input and the
# gradient handed to it (T×H each).
FROZEN_LAYER_INPUTS_TH = 2.0
# Gradient checkpointing (non-reentrant) beside its L checkpoints and the working set: the
# gradient flowing down, the recomputed layer's output, LoRA's float32 inputs (T×H-sized;
# fitted to Llama-3-8B, and meets OPT-1.3b within 1%).
CHECKPOINTING_EXTRA_TH = 4.0
# Offloaded checkpointing beside the working set: the layer input fetched back from the host,
# the gradient flowing down, the layer output, LoRA's float32 inputs (T×H-sized; fitted to
# Llama-3-8B).
OFFLOADED_CHECKPOINTING_EXTRA_TH = 7.1
# Full fine-tuning and plain LoRA keep every layer's activations: per layer (T×H-sized,
# T×I-sized). Plain: fitted to OPT-1.3b (full fine-tuning 8 × 512). Gated: not measured; the
# plain counts with SwiGLU's third T×I tensor.
FULL_LAYER_SAVED = {"gated": (5.0, 3.0), "plain": (4.9, 2.0)}
# LoRA keeps in addition, per layer, float32 copies of its two projections' inputs and their
# outputs (T×H-sized in the model's dtype; fitted to OPT-1.3b's plain LoRA).
LORA_LAYER_EXTRA_TH = 2.4
# The library's (unchunked) causal-LM loss at its peak, bytes per logit: 16-bit logits, their
# float32 copy, the float32 gradient and its 16-bit cast (12), fitted to 12.3 on OPT-1.3b.
UNCHUNKED_LOSS_BYTES_PER_LOGIT = 12.3
# MEFT's chunked loss (templates/losses.py, LOSS_CHUNK_SIZE tokens at a time): a chunk's
# float32 logits and their gradient.
CHUNKED_LOSS_LOGIT_COPIES = 2
# AdamW's step: the gradients plus temporaries of the same size (foreach).
OPTIMIZER_STEP_COPIES = 2
# MEFT (exact), beside the stream integers and the remainders: a layer's backward has two
# phases and the peak is the larger, as (T×H-sized, c×I-sized) tensors with c =
# recompute_chunk_tokens, per MLP kind. The mixing phase (the attention core over the whole
# sequence) holds stream values, stream gradients, the core's inputs, output and gradients; the
# position-wise phase the full-sequence tensors that outlive the core plus the MLP's working
# set over one chunk. MEFT1: F is a whole layer (attention, MLP, adapter) and G an adapter;
# MEFT2 the other way round; MEFT3: F = attention, G = MLP.
# Gated: fitted to Llama-3-8B at 1 × 4k–32k with the attention in parts (families.py's
# AttentionParts), first on benchmarks/results/h200-llama-3-8b-attention-parts*.json, then moved
# to the current engine's runs (h200-llama-3-8b-stream-release.json, -one-graph.json): the stack
# input is no longer held (1 T×H fewer for MEFT1/MEFT2; MEFT3's mixing phase measured 2.2 fewer).
# MEFT1/MEFT2 peak in the position-wise phase at 16k and in the mixing phase at 32k; MEFT1 and
# MEFT2 measured alike; MEFT3 from its offloaded rows. The c×I count is the census of a 16k step
# (h200-llama-3-8b-query-chunks.json): four 112 MiB chunk intermediates, SwiGLU's gate and up and
# two gradients (family_kernels.py's SiluProduct; autograd held six), 4.4 with rounding.
# Plain: fitted to OPT-1.3b at 8 × 512 (h200-opt-1.3b-llm-kept-couplings.json, -one-graph.json),
# where c = T and the position-wise phase peaks: its c×I count (3: the first projection's output,
# its activation and a gradient, I = 4H) is taken, not fitted, and the T×H counts are fitted
# (a one-chunk half-step lets go of its input stream, and the stack input is not held: 5.9 T×H
# fewer for MEFT1 than the engine before). The mixing phase is not measured apart (it never peaks
# while T ≤ c); its counts are moved down with the position-wise ones, and meet the 1024-token
# chunks' row (T > c) within 3%.
MEFT_MIXING_PHASE = {
    "gated": {"meft1": (14.65, 0.0), "meft2": (14.65, 0.0), "meft3": (15.9, 0.2)},
    "plain": {"meft1": (13.9, 1.6), "meft2": (13.9, 1.6), "meft3": (15.9, 0.2)},
}
MEFT_POSITIONWISE_PHASE = {
    "gated": {"meft1": (10.2, 4.4), "meft2": (10.2, 4.4), "meft3": (9.9, 4.4)},
    "plain": {"meft1": (12.2, 3.0), "meft2": (13.1, 3.0), "meft3": (7.3, 3.0)},
}
# Remainders on the GPU when offloaded: the layer in use and the one fetched ahead.
OFFLOADED_REMAINDER_LAYERS_ON_GPU = 2
# Float mode (the paper's): no integers and no remainders, but T×H-sized float tensors beyond
# the exact layer's backward (fitted to OPT-1.3b's float MEFT3 at 8 × 512, the current engine,
# h200-opt-1.3b-llm-one-graph.json; MEFT1/MEFT2 float and the gated kind assumed alike).
MEFT_FLOAT_EXTRA_TH = 12.5

# --- a quantized frozen base (bitsandbytes through transformers' BitsAndBytesConfig) ------
# Bytes per weight of a quantized linear layer. 4 bits (NF4 and FP4 alike): half a byte per
# weight plus its absmax scales, one float32 per block of 64 weights (bitsandbytes'
# quantize_4bit, blocksize 64): 0.5 + 4/64 = 0.5625. With double quantization
# (bnb_4bit_use_double_quant, bitsandbytes' compress_statistics) the float32 scales are
# themselves quantized to 8 bits in blocks of 256, each block with one float32 scale
# (QLoRA, arXiv 2305.14314 §3: 32/64 = 0.5 bit per weight becomes 8/64 + 32/(64·256) ≈ 0.127
# bit): 0.5 + 1/64 + 4/(64·256). The per-tensor constants (the 16-value NF4 code, the 256-value
# second-level code, the offset) are a few KiB per matrix and left out.
BYTES_PER_4BIT_WEIGHT = {False: 0.5 + 4 / 64, True: 0.5 + 1 / 64 + 4 / (64 * 256)}  # by double_quant
# LLM.int8 (bitsandbytes' Linear8bitLt, frozen): one int8 per weight plus a float32 scale per
# output row.
BYTES_PER_8BIT_WEIGHT, BYTES_PER_8BIT_ROW = 1, 4


@dataclass(frozen=True)
class Quantization:
    """How the frozen PLM's linear layers are stored: 4 bits (NF4 or FP4, with or without
    double quantization) or 8 bits (LLM.int8). Everything else stays in the model's dtype."""

    bits: int
    double_quant: bool = False

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise BadInputError(f"a quantized base has 4 or 8 bits, got {self.bits}")
        if self.double_quant and self.bits != 4:
            raise BadInputError("double quantization is a 4-bit setting (bnb_4bit_use_double_quant)")

    def linear_bytes(self, weights: int, rows: int) -> float:
        """Bytes of `weights` quantized weights in matrices of `rows` output rows in all."""
        if self.bits == 4:
            return weights * BYTES_PER_4BIT_WEIGHT[self.double_quant]
        return weights * BYTES_PER_8BIT_WEIGHT + rows * BYTES_PER_8BIT_ROW

    def describe(self) -> str:
        if self.bits == 8:
            return "LLM.int8 (8-bit)"
        return f"NF4/FP4 (4-bit), double quant {'on' if self.double_quant else 'off'}"


def stored_quantization(config: dict) -> Quantization | None:
    """How a checkpoint published quantized (*-bnb-4bit) stores its layers, from config.json's
    quantization_config: bitsandbytes 4-bit, with or without double quantization; None otherwise."""
    q = config.get("quantization_config")
    if is_bnb_4bit(q):
        return Quantization(4, bool(q.get("bnb_4bit_use_double_quant")))
    return None


ARM_LABELS = {
    "full": "full fine-tuning",
    "lora": "LoRA (r=8, q and v)",
    "lora+gc": "LoRA + gradient checkpointing",
    "lora+gc+chunked-loss": "LoRA + checkpointing + chunked loss",
    "lora+offload-gc+chunked-loss": "LoRA + offloaded checkpointing + chunked loss",
    "head-only": "frozen backbone, head only",
    "lora+offload-gc": "LoRA + offloaded checkpointing",
}


# --- what the config says ---------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """What the estimate reads from a config."""

    model_type: str
    hidden: int
    layers: int
    ffn: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int
    gated: bool
    causal_lm: bool
    params: int
    head_params: int  # the head head-only trains: the LM head (tied or not), else a classifier
    tied: bool
    lora_params: int
    dtype: str | None
    # the layers' linear projections (attention and MLP), what a quantized base quantizes:
    # their weights, their output rows in all, and the largest one matrix of a layer has
    linear_weights: int = 0
    linear_rows: int = 0
    largest_linear: int = 0


def _get(config: dict, *keys, default=None):
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    return default


def read_shape(config: dict, layers: int | None = None) -> Shape:
    """The sizes `estimate_memory` needs, from a transformers config (as a dict)."""
    if isinstance(config.get("text_config"), dict):
        config = {**config["text_config"], "model_type": config["text_config"].get("model_type", config.get("model_type"))}
    model_type = str(config.get("model_type", ""))
    h = _get(config, "hidden_size", "n_embd", "d_model")
    n = layers or _get(config, "num_hidden_layers", "n_layer", "num_layers")
    if model_type == "bart" and layers is None:
        n = config.get("encoder_layers", 6) + config.get("decoder_layers", 6)
    v = _get(config, "vocab_size")
    if not all(isinstance(x, int) and x > 0 for x in (h, n, v)):
        raise BadInputError(f"the config lacks a hidden size, a layer count or a vocabulary size (model_type {model_type!r})")
    heads = _get(config, "num_attention_heads", "n_head", "encoder_attention_heads", default=max(1, h // 64))
    kv = _get(config, "num_key_value_heads", default=heads)
    hd = _get(config, "head_dim", default=h // heads)
    i = _get(config, "intermediate_size", "ffn_dim", "n_inner", "encoder_ffn_dim", default=4 * h)
    gated = model_type in ("llama", "mistral", "qwen2") or str(config.get("hidden_act", "")) == "silu" and "intermediate_size" in config
    positions = _get(config, "max_position_embeddings", "n_positions", default=0)
    q_out, kv_out = heads * hd, kv * hd
    attn_bias = model_type in ("opt", "gpt2", "bert", "roberta", "bart")
    extra_weights = extra_rows = 0  # linear weights beside the n layers' own (BART's cross-attention)
    if gated:
        bias = model_type == "qwen2" or bool(config.get("attention_bias"))
        # q, k, v, o and gate, up, down
        linear_weights, linear_rows = h * (q_out + 2 * kv_out) + q_out * h + 3 * h * i, q_out + 2 * kv_out + h + 2 * i + h
        largest = max(h * i, h * q_out)
        per_layer = linear_weights + (q_out + 2 * kv_out if bias else 0) + 2 * h
        params = v * h + n * per_layer + h
        tied = bool(config.get("tie_word_embeddings", False))
    else:
        # q, k, v, out (GPT-2's fused c_attn the same) and the MLP's two
        linear_weights, linear_rows, largest = 4 * h * h + 2 * h * i, 4 * h + i + h, max(h * i, h * h)
        attention = 4 * h * h + (4 * h if attn_bias else 0)
        mlp = 2 * h * i + i + h
        per_layer = attention + mlp + 4 * h
        params = n * per_layer
        if model_type == "opt":
            proj = _get(config, "word_embed_proj_dim", default=h)
            params += v * proj + (positions + 2) * h + (2 * h * proj if proj != h else 0) + 2 * h
        elif model_type == "bart":
            decoder = config.get("decoder_layers", n // 2) if layers is None else n // 2
            params += decoder * (attention + 2 * h) + v * h + 2 * (positions + 2) * h + 4 * h + v
            extra_weights, extra_rows = decoder * 4 * h * h, decoder * 4 * h
        elif model_type in ("bert", "roberta"):
            params += v * h + positions * h + config.get("type_vocab_size", 2) * h + 2 * h + h * h + h
        else:
            params += v * h + positions * h + 2 * h
        tied = bool(config.get("tie_word_embeddings", True))
    causal = model_type in ("llama", "mistral", "qwen2", "opt", "gpt2") or any(
        str(a).endswith("ForCausalLM") or str(a).endswith("LMHeadModel") for a in config.get("architectures") or ())
    if causal and not tied:
        params += v * h
    targets = LORA_TARGETS.get(model_type, ("q_proj", "v_proj"))
    lora_per_layer = LORA_RANK * (h + 3 * h) if targets == ("c_attn",) else LORA_RANK * (h + q_out) + LORA_RANK * (h + kv_out)
    dtype = _get(config, "torch_dtype", "dtype")
    # the head that trains in head-only: the LM head of a causal LM, else a classifier
    labels = _get(config, "num_labels", default=len(config.get("id2label") or {}) or 2)
    head = v * h if causal else h * labels + labels
    return Shape(model_type, h, n, i, v, heads, kv, hd, gated, causal, params, head, tied and causal, n * lora_per_layer,
                 {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(str(dtype)),
                 linear_weights=n * linear_weights + extra_weights, linear_rows=n * linear_rows + extra_rows,
                 largest_linear=largest)


# --- the engine's accounting ------------------------------------------------------------


def _pinned(nbytes: float) -> int:
    """What torch's pinned host allocator reserves for one buffer: the next power of two."""
    return 1 << max(0, math.ceil(nbytes) - 1).bit_length()


def _denominator(scale: float, name: str = "lambda_") -> int:
    """m such that scale == 1/m (exact mode's scales); BadInputError naming the setting `name`."""
    try:
        return denominator_of(scale)
    except ValueError:
        why = "is not 1/m for a positive integer m, which exact mode needs (e.g. 1, 0.1 = 1/10, 2^-10)"
        flag = "--lambda" if name == "lambda_" else "--beta"
        raise BadInputError(f"{name}={scale} {why}", cli_message=f"{flag} {scale} {why}") from None


@dataclass(frozen=True)
class Step:
    """One training step's sizes: tokens, bytes per element, and the engine settings."""

    s: Shape
    tokens: int
    dtype_bytes: int
    stream_bits: int
    chunk_tokens: int  # recompute_chunk_tokens (0: the whole sequence)
    loss_chunk: int = LOSS_CHUNK_SIZE
    quantization: Quantization | None = None  # a quantized frozen base; None: all in the model's dtype

    def frozen_weight_bytes(self) -> float:
        """The PLM's weights, as every arm holds them. Quantized, only the layers' linear
        projections are: embeddings, the LM head (transformers leaves it out), norms and biases
        stay in the model's dtype."""
        if self.quantization is None:
            return self.s.params * self.dtype_bytes
        rest = self.s.params - self.s.linear_weights
        return rest * self.dtype_bytes + self.quantization.linear_bytes(self.s.linear_weights, self.s.linear_rows)

    def dequantized_weight(self) -> float:
        """A quantized layer computes in the model's dtype through its weight dequantised (an
        assumption: bitsandbytes' path above 1536 rows dequantizes the matrix and calls
        cuBLAS, and LLM.int8's backward dequantizes it too): one layer's largest matrix,
        transient, on top of any arm's peak."""
        return self.s.largest_linear * self.dtype_bytes if self.quantization else 0.0

    @property
    def th(self) -> float:  # one T × H tensor in the model's dtype
        return self.tokens * self.s.hidden * self.dtype_bytes

    @property
    def ti(self) -> float:  # one T × I tensor
        return self.tokens * self.s.ffn * self.dtype_bytes

    @property
    def chunk_ti(self) -> float:  # one c × I tensor, c = the recompute chunk
        c = min(self.chunk_tokens or self.tokens, self.tokens)
        return c * self.s.ffn * self.dtype_bytes

    def working_set(self) -> float:
        """One layer recomputed and differentiated over the whole sequence (its MLP unchunked)."""
        n_th, n_ti = LAYER_WORKING_SET["gated" if self.s.gated else "plain"]
        return n_th * self.th + n_ti * self.ti

    def unchunked_loss(self) -> float:
        return UNCHUNKED_LOSS_BYTES_PER_LOGIT * self.tokens * self.s.vocab if self.s.causal_lm else 0.0

    def chunked_loss(self) -> float:
        if not self.s.causal_lm:
            return 0.0
        return CHUNKED_LOSS_LOGIT_COPIES * min(self.loss_chunk, self.tokens) * self.s.vocab * 4 + self.th

    def optimizer_step(self, trainable_bytes: float) -> float:
        return OPTIMIZER_STEP_COPIES * trainable_bytes


def _static(step: Step, trainable: int, trainable_bytes: int, copies_of_weights: int = 0) -> float:
    """The frozen weights (in the model's dtype, or quantized), the trainable parameters (their
    own copy where they are float32 adapters) and two AdamW states each, plus the runtime's workspaces."""
    return step.frozen_weight_bytes() + copies_of_weights + trainable * trainable_bytes * 3 + RUNTIME_OVERHEAD_BYTES


def arm_full(step: Step) -> dict:
    """Every parameter trains in the model's dtype (AdamW states in that dtype, as the benchmark
    runs it); every layer's activations are kept, the loss unchunked."""
    n_th, n_ti = FULL_LAYER_SAVED["gated" if step.s.gated else "plain"]
    kept = step.s.layers * (n_th * step.th + n_ti * step.ti)
    grads = step.s.params * step.dtype_bytes
    head_grad = step.s.head_params * step.dtype_bytes
    peak = max(kept + step.unchunked_loss() + head_grad, step.optimizer_step(grads))
    return dict(static=_static(step, 0, 0) + 2 * grads, activation=peak, host=0)


def _lora_static(step: Step) -> float:
    return _static(step, step.s.lora_params, 4)  # float32 adapters: weights and two states


def arm_lora(step: Step) -> dict:
    """LoRA keeps every layer's activations, plus its float32 inputs; the library's loss."""
    n_th, n_ti = FULL_LAYER_SAVED["gated" if step.s.gated else "plain"]
    kept = step.s.layers * ((n_th + LORA_LAYER_EXTRA_TH) * step.th + n_ti * step.ti)
    return dict(static=_lora_static(step), activation=kept + step.unchunked_loss(), host=0)


def _checkpointed(step: Step, chunked_loss: bool, offloaded: bool) -> dict:
    checkpoints = step.s.layers * step.th  # one 16-bit layer input per layer
    loss = step.chunked_loss() if chunked_loss else step.unchunked_loss()
    if offloaded:
        layer = OFFLOADED_CHECKPOINTING_EXTRA_TH * step.th + step.working_set()
        peak = max(layer, loss)
        return dict(static=_lora_static(step), activation=peak, host=checkpoints,
                    pinned=step.s.layers * _pinned(step.th))
    layer = checkpoints + CHECKPOINTING_EXTRA_TH * step.th + step.working_set()
    peak = max(layer, checkpoints + loss)
    return dict(static=_lora_static(step), activation=peak, host=0)


def arm_lora_gc(step: Step) -> dict:
    """LoRA + checkpointing: L layer inputs kept, one layer's full working set at a time."""
    return _checkpointed(step, chunked_loss=False, offloaded=False)


def arm_lora_gc_chunked(step: Step) -> dict:
    return _checkpointed(step, chunked_loss=True, offloaded=False)


def arm_lora_offload_gc(step: Step) -> dict:
    """LoRA + checkpointing with the layer inputs in pinned host memory (reported as host)."""
    return _checkpointed(step, chunked_loss=True, offloaded=True)


def arm_head_only(step: Step) -> dict:
    """Frozen backbone, the output head trains (an untied copy when it is tied)."""
    head = step.s.head_params * step.dtype_bytes
    copy = head if step.s.tied else 0
    peak = max(step.unchunked_loss() + head + step.th, step.optimizer_step(head))
    return dict(static=_static(step, 0, 0, copies_of_weights=copy) + 2 * head, activation=peak, host=0)


def meft_trainable(s: Shape, variant: str) -> int:
    """Adapters d → r → d with biases: two per layer, the top one of MEFT1/MEFT2 frozen."""
    count = 2 * s.layers - (0 if variant == "meft3" else 1)
    return count * (2 * ADAPTER_DIM * s.hidden + ADAPTER_DIM + s.hidden)


def meft_layer_backward(step: Step, variant: str) -> float:
    """One MEFT layer's backward: the larger of its mixing and position-wise phases."""
    kind = "gated" if step.s.gated else "plain"
    mix_th, mix_ci = MEFT_MIXING_PHASE[kind][variant]
    pos_th, pos_ci = MEFT_POSITIONWISE_PHASE[kind][variant]
    return max(mix_th * step.th + mix_ci * step.chunk_ti, pos_th * step.th + pos_ci * step.chunk_ti)


def meft_remainder_bits(lambda_: float, beta: float) -> float:
    """Remainder bits per element per layer, both streams: log2(m) for each scale 1/m (2^-j)."""
    return remainder_bits(_denominator(lambda_, "lambda_")) + remainder_bits(_denominator(beta, "beta"))


def _meft(step: Step, variant: str, layer: float, kept: float, host: float = 0, pinned: float = 0) -> dict:
    """A MEFT arm's peak: what it keeps across the step beside the larger of one layer's
    backward and the chunked loss."""
    peak = max(kept + layer, kept + step.chunked_loss())
    return dict(static=_static(step, meft_trainable(step.s, variant), 4), activation=peak, host=host, pinned=pinned)


def _stream_integers(step: Step) -> float:
    return 2 * step.tokens * step.s.hidden * step.stream_bits / 8


def _remainders_per_layer(step: Step, lambda_: float, beta: float) -> float:
    return step.tokens * step.s.hidden * meft_remainder_bits(lambda_, beta) / 8


def arm_meft_exact(step: Step, variant: str, lambda_: float, beta: float) -> dict:
    """Exact MEFT: the stream integers and every layer's remainders on the GPU."""
    kept = _stream_integers(step) + step.s.layers * _remainders_per_layer(step, lambda_, beta)
    return _meft(step, variant, meft_layer_backward(step, variant), kept)


def arm_meft_offload(step: Step, variant: str, lambda_: float, beta: float) -> dict:
    """Exact MEFT with the remainders in pinned host memory: two layers' of them on the GPU."""
    per_layer = _remainders_per_layer(step, lambda_, beta)
    kept = _stream_integers(step) + min(OFFLOADED_REMAINDER_LAYERS_ON_GPU, step.s.layers) * per_layer
    # one packed buffer per scaled stream and layer, each rounded up by the pinned allocator
    elements = step.tokens * step.s.hidden
    pinned = step.s.layers * sum(_pinned(packed_remainder_bytes(_denominator(x), elements))
                                 for x in (lambda_, beta) if _denominator(x) > 1)
    return _meft(step, variant, meft_layer_backward(step, variant), kept, host=step.s.layers * per_layer,
                 pinned=pinned)


def arm_meft_float(step: Step, variant: str) -> dict:
    """The paper's float MEFT: no integers, no remainders, float stream tensors instead."""
    return _meft(step, variant, meft_layer_backward(step, variant) + MEFT_FLOAT_EXTRA_TH * step.th, 0)


def frozen_layer(step: Step) -> float:
    """Activation memory of one frozen layer's forward and backward alone (the floor of any
    method that recomputes layers)."""
    return step.working_set() + FROZEN_LAYER_INPUTS_TH * step.th


# --- the entry point --------------------------------------------------------------------


def estimate_memory(
    config: dict,
    batch_size: int,
    seq_len: int,
    *,
    dtype: str | None = None,
    variants: tuple[str, ...] = tuple(VARIANTS),
    lambda_: float | None = None,
    beta: float | None = None,
    stream_bits: int | None = None,
    recompute_chunk_tokens: int = RECOMPUTE_CHUNK_TOKENS,
    loss_chunk_size: int = LOSS_CHUNK_SIZE,
    layers: int | None = None,
    variant_scales: dict | None = None,
    quantization: Quantization | None = None,
) -> dict:
    """Estimated memory of one training step at `batch_size` × `seq_len`, for each arm.

    `config` is a transformers config as a dict (config.json). Returns a dict with the model's
    sizes, the settings assumed, and `arms`: name → {static_gib, activation_gib, peak_gib,
    host_gib, host_pinned_gib, gradients_gib, label}, MEFT arms also
    remainder_bits_per_element_per_layer (0 in float mode). lambda_/beta override every
    variant's scales (default ASSUMED_SCALES: 2^-8 on MEFT1/MEFT2's scaled stream, 2^-10 on
    MEFT3's; a converted model's config.json holds its calibrated ones), or per variant through
    variant_scales {variant: (λ, β)}; `layers` overrides the config's depth; stream_bits defaults to 32 for 16-bit models, 64 for fp32.
    `quantization` stores the PLM's linear layers in 4 or 8 bits (a QLoRA-style base, computing
    in `dtype`): full fine-tuning, which trains those weights, is then left out. A checkpoint
    published in 4 bits (config.json's quantization_config) is taken as it is stored unless
    `quantization` says otherwise."""
    if not (isinstance(batch_size, int) and batch_size > 0 and isinstance(seq_len, int) and seq_len > 0):
        raise BadInputError(f"batch size and sequence length must be positive integers, got {batch_size} and {seq_len}")
    s = read_shape(config, layers)
    dtype = dtype or s.dtype or "bf16"
    if dtype not in DTYPE_BYTES:
        raise BadInputError(f"dtype must be one of {', '.join(DTYPE_BYTES)}, got {dtype!r}")
    for v in variants:
        if v not in VARIANTS:
            raise BadInputError(f"variant must be one of {', '.join(VARIANTS)}, got {v!r}")
    bits = stream_bits or (64 if dtype == "fp32" else 32)
    quantization = quantization or stored_quantization(config)
    step = Step(s, batch_size * seq_len, DTYPE_BYTES[dtype], bits, recompute_chunk_tokens, loss_chunk_size, quantization)
    arms = {} if quantization else {"full": arm_full(step)}  # quantized weights cannot train
    arms |= {
        "lora": arm_lora(step),
        "lora+gc": arm_lora_gc(step),
        "lora+gc+chunked-loss": arm_lora_gc_chunked(step),
        "lora+offload-gc+chunked-loss": arm_lora_offload_gc(step),
        "head-only": arm_head_only(step),
    }
    if not s.causal_lm:  # the chunked loss is the causal LM's
        del arms["lora+gc+chunked-loss"]
        del arms["lora+offload-gc+chunked-loss"]
        arms["lora+offload-gc"] = _checkpointed(step, chunked_loss=False, offloaded=True)
    scales = {}
    for variant in variants:
        lam, bet = (variant_scales or {}).get(variant, ASSUMED_SCALES[variant])
        scaled = VARIANTS[variant].scaled  # the other stream keeps 1 (MEFT1's β, MEFT2's λ)
        if lambda_ is not None and "lambda_" in scaled:
            lam = lambda_
        if beta is not None and "beta" in scaled:
            bet = beta
        scales[variant] = (lam, bet)
        arms[variant] = arm_meft_exact(step, variant, lam, bet)
        arms[variant + "+offload"] = arm_meft_offload(step, variant, lam, bet)
        arms[variant + "-float"] = arm_meft_float(step, variant)
    out = {}
    for name, arm in arms.items():
        variant = name.split("+")[0].split("-")[0]
        activation = arm["activation"] + step.dequantized_weight()
        out[name] = dict(
            label=ARM_LABELS.get(name) or _meft_label(name, *scales.get(variant, (1, 1))),
            static_gib=arm["static"] / GIB,
            activation_gib=activation / GIB,
            peak_gib=(arm["static"] + activation) / GIB,
            host_gib=arm["host"] / GIB,
            host_pinned_gib=arm.get("pinned", 0) / GIB,
            gradients_gib=_gradient_bytes(step, name) / GIB,
        )
        if variant in scales:
            out[name]["remainder_bits_per_element_per_layer"] = (
                0.0 if name.endswith("-float") else meft_remainder_bits(*scales[variant]))
    return dict(
        model_type=s.model_type, batch_size=batch_size, seq_len=seq_len, tokens=step.tokens, dtype=dtype,
        hidden_size=s.hidden, layers=s.layers, intermediate_size=s.ffn, vocab_size=s.vocab, parameters=s.params,
        quantization=dict(bits=quantization.bits, double_quant=quantization.double_quant) if quantization else None,
        quantized_parameters=s.linear_weights if quantization else 0, frozen_weights_gib=step.frozen_weight_bytes() / GIB,
        settings=dict(stream_bits=bits, recompute_chunk_tokens=recompute_chunk_tokens, loss_chunk_size=loss_chunk_size,
                      lora_rank=LORA_RANK, adapter_dim=ADAPTER_DIM,
                      scales={v: dict(lambda_=lam, beta=bet, remainder_bits_per_element_per_layer=meft_remainder_bits(lam, bet))
                              for v, (lam, bet) in scales.items()}),
        frozen_layer_gib=(frozen_layer(step) + step.dequantized_weight()) / GIB,
        arms=out,
    )


def _gradient_bytes(step: Step, arm: str) -> float:
    """The trainable parameters' gradients: allocated in backward and freed after the optimizer
    step (set to None), so part of the activation figure, not of static (DESIGN §5)."""
    if arm == "full":
        return step.s.params * step.dtype_bytes
    if arm == "head-only":
        return step.s.head_params * step.dtype_bytes
    if arm.startswith("lora"):
        return step.s.lora_params * 4
    return meft_trainable(step.s, arm.split("+")[0].split("-")[0]) * 4


def memory_line(config: dict, batch_size: int, seq_len: int, variant: str, *, exact: bool = True, **settings) -> str:
    """One sentence for a model card: the estimated activation memory of `variant` at a stated
    shape beside LoRA + checkpointing (offloaded or not) and full fine-tuning."""
    result = estimate_memory(config, batch_size, seq_len, variants=(variant,), **settings)
    arms = result["arms"]
    gc, offloaded = ("lora+gc+chunked-loss", "lora+offload-gc+chunked-loss") if "lora+gc+chunked-loss" in arms else (
        "lora+gc", "lora+offload-gc")
    name = variant if exact else variant + "-float"
    mine = f"{variant.upper()} {'exact' if exact else 'float'} {arms[name]['activation_gib']:.2f} GiB"
    if exact:
        mine += f" ({arms[variant + '+offload']['activation_gib']:.2f} GiB with its remainders in host memory)"
    return (
        f"Estimated activation memory of one training step at batch {batch_size} × {seq_len} tokens "
        f"({result['dtype']}): {mine}; LoRA + gradient checkpointing {arms[gc]['activation_gib']:.2f} GiB, "
        f"with the checkpoints offloaded to host memory {arms[offloaded]['activation_gib']:.2f} GiB"
        + (f"; full fine-tuning {arms['full']['activation_gib']:.2f} GiB" if "full" in arms else "")
        + ". Weights and optimizer states: "
        f"{arms[name]['static_gib']:.2f} GiB. Estimated from the config (`meft-convert estimate`), not measured."
    )


def _meft_label(name: str, lambda_: float, beta: float) -> str:
    variant = name.split("+")[0].split("-")[0].upper()
    if name.endswith("-float"):
        return f"{variant} float (paper's inverse, approximate)"
    bits = meft_remainder_bits(lambda_, beta)
    where = ", remainders on host" if name.endswith("+offload") else ""
    return f"{variant} exact ({bits:.3g} bits per element per layer{where})"


def load_config(model: str, revision: str | None = None, token: str | None = None) -> dict:
    """config.json of `model`: a config file, a folder, or a hub id (read from the Hugging Face
    cache, downloading config.json only unless HF_HUB_OFFLINE=1)."""
    path = Path(model).expanduser()
    if path.is_file():
        file = path
    else:
        from .hub import resolve_model

        file = resolve_model(model, revision, patterns=["config.json"], token=token) / "config.json"
    try:
        config = json.loads(file.read_text())
    except FileNotFoundError:
        raise BadInputError(f"{model} has no config.json") from None
    except (OSError, ValueError) as e:
        raise BadInputError(f"cannot read {file}: {e}") from None
    if not isinstance(config, dict):
        raise BadInputError(f"{file} is not a transformers config (a JSON object)")
    return config


def _gib(value: float) -> str:
    return f"{value:.2f}" if value >= 1 else f"{value:.3f}"


def _power(scale: float) -> str:
    """A scale as 2^-j where it is one, else as given."""
    j = -math.log2(scale) if scale > 0 else 0
    return "1" if scale == 1 else f"2^-{round(j)}" if j == round(j) else f"{scale:g}"


def format_table(result: dict) -> str:
    """The estimate as a text table (GiB)."""
    head = (f"{result['model_type']}: {result['parameters'] / 1e9:.2f}B parameters, {result['layers']} layers, "
            f"hidden {result['hidden_size']}, FFN {result['intermediate_size']}, vocabulary {result['vocab_size']}\n"
            f"batch {result['batch_size']} × seq {result['seq_len']} = {result['tokens']} tokens, {result['dtype']}, "
            f"int{result['settings']['stream_bits']} streams, MLP recomputed {result['settings']['recompute_chunk_tokens']} "
            f"tokens at a time, loss in {result['settings']['loss_chunk_size']}-token chunks (MEFT)\n")
    if result["quantization"]:
        head += (f"frozen base: {Quantization(**result['quantization']).describe()} for the layers' linear projections "
                 f"({result['quantized_parameters'] / 1e9:.2f}B weights); frozen weights {_gib(result['frozen_weights_gib'])} GiB\n"
                 f"  embeddings, LM head, norms, biases, adapters and trained heads unquantized; "
                 f"full fine-tuning left out (quantized weights do not train)\n")
    rows = [("arm", "static", "activation", "peak", "host", "")]
    for name, arm in result["arms"].items():
        rows.append((name, _gib(arm["static_gib"]), _gib(arm["activation_gib"]), _gib(arm["peak_gib"]),
                     _gib(arm["host_gib"]) if arm["host_gib"] else "-", arm["label"]))
    width = max(len(r[0]) for r in rows)
    lines = [f"{r[0]:<{width}}  {r[1]:>7}  {r[2]:>10}  {r[3]:>7}  {r[4]:>6}  {r[5]}".rstrip() for r in rows]
    lines.insert(1, "-" * max(len(line) for line in lines))
    scales = result["settings"]["scales"]
    if scales:
        head += "MEFT scales (--lambda/--beta; a converted model's config.json holds its calibrated ones):\n" + "".join(
            f"  {v.upper()} λ={_power(x['lambda_'])} β={_power(x['beta'])}: "
            f"{x['remainder_bits_per_element_per_layer']:.3g} remainder bits per element per layer\n"
            for v, x in scales.items())
    tail = (f"\nGiB. One frozen layer alone, forward + backward (the floor of any method that recomputes layers): "
            f"{_gib(result['frozen_layer_gib'])}.\nEstimates from the config, not measurements: see --help for what they assume.")
    return head + "\n".join(lines) + tail

