"""MEFT models: a transformers model of a supported family, made reversible in place.

`Meft<LibraryClass>` (e.g. MeftOPTForCausalLM) is the library class itself with three
changes made after it is built:

1. every layer gets its MEFT adapters (`<layer>.meft.<name>`), so the PLM's tensors keep
   their names and FSDP or device maps that split by layer keep adapters with their layer;
2. the layer list is replaced by MeftLayers, the same list, which during its owner's forward
   presents itself as one layer that runs the whole reversible stack: embeddings, masks,
   caches, final norms, heads, losses and generate() stay the library's own code;
3. the PLM is frozen; adapters and new task heads train.

Each layer becomes one coupling of two streams (DESIGN: y1 = λ·x1 + F(x2), y2 = β·x2 + G(y1)):

    MEFT1: F = the PLM layer with an adapter parallel to its FFN, G = an adapter,   swap
    MEFT2: F = an adapter, G = the PLM layer with an adapter parallel to its FFN,   swap
    MEFT3: F = attention block, adapter on its output; G = MLP block with a parallel adapter

Both streams start as the embedding output. With λ, β small, one stream follows the PLM's
own chain of layers (the paper's starting point); `output_stream="plm"` returns it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import os
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.checkpoint import checkpoint

from .adapters import MeftAdapter, adapter_linear_names, init_adapter_projection, is_adapter_projection
from .configuration_meft import (
    MeftBartConfig,
    MeftBertConfig,
    MeftGPT2Config,
    MeftLlamaConfig,
    MeftMistralConfig,
    MeftOPTConfig,
    MeftQwen2Config,
    MeftRobertaConfig,
)
from .families import Family, Stack, family_for
from .losses import ChunkedLossMixin
from .arithmetic import CouplingSettings
from .blocks import Block, CausalCore
from .fixed_point import compiled_function, stream_dtype_for
from .meft_table import RUNTIME_SETTINGS, VARIANTS
from .plans import run_block
from .reversible import Coupling, run_float_layer, run_stack

BACKWARD_MODES = ("reversible", "vanilla")
# offload_remainders="auto" offloads from this many tokens per step (measured: under 1% of step time)
OFFLOAD_MIN_TOKENS = 8192


def _attention_block(attention, layer, adapter, x, args):
    return attention(layer, x, args, adapter)


def _mlp_block(mlp, layer, adapter, x):
    return mlp(layer, x, adapter)


def _make_block(kind: str, stack: Stack, layer: nn.Module, compiled: bool = False, split: bool = False,
                chunk_queries: bool = False) -> Block:
    """F or G of one layer: the attention part mixes positions, the MLP block and adapters act on
    each position alone (so the engine may run them a chunk of tokens at a time). `split`: the
    attention block in the family's parts where it has them, so that only its core sees the
    whole sequence (training; evaluation and generation call the library's attention);
    `chunk_queries`: with the core a chunk of queries at a time where the family has that too."""
    adapters = layer.meft
    # compile_blocks: one compiled function per kind of block, shared by all layers (the layer is
    # an argument, so its parameters are inputs of the graph, not constants of one layer's copy)
    run = compiled_function if compiled else (lambda fn: fn)
    attention, mlp = run(_attention_block), run(_mlp_block)
    # the parts call the attention's projections directly, so a projection's module that FSDP2
    # shards on its own (fsdp_units) would not gather its weights: such layers keep it whole
    sharded_inside = any(_is_fsdp_unit(m) for m in layer.modules() if m is not layer)
    parts = stack.attention_parts if split and not sharded_inside else None
    if parts is not None and kind in ("layer", "attention"):
        def finish(h, x):
            if kind == "attention":
                return parts.finish(layer, h, x, adapters["attn"])
            return mlp(stack.mlp, layer, adapters["ffn"], parts.finish(layer, h, x, None))

        chunked_core = parts.causal_core(layer) if chunk_queries else None
        causal = None if chunked_core is None else CausalCore(
            lambda queries, context, args, rows: chunked_core(layer, queries, context, args, rows), parts.context
        )
        return Block(
            before=lambda x, args, rows: parts.inputs(layer, x, args, rows),
            mixing=lambda inputs, args: parts.core(layer, inputs, args),
            positionwise=finish,
            causal=causal,
        )
    if kind == "layer":  # the whole PLM layer: mlp(attention(x)), the adapter parallel to its FFN
        return Block(
            mixing=lambda x, args: attention(stack.attention, layer, None, x, args),
            positionwise=lambda h: mlp(stack.mlp, layer, adapters["ffn"], h),
        )
    if kind == "adapter":
        return Block(positionwise=lambda x: adapters["coupling"](x))
    if kind == "attention":
        return Block(mixing=lambda x, args: attention(stack.attention, layer, adapters["attn"], x, args))
    if kind == "mlp":
        return Block(positionwise=lambda x: mlp(stack.mlp, layer, adapters["ffn"], x))
    raise ValueError(f"unknown block {kind!r}")


class MeftLayers(nn.ModuleList):
    """The PLM's layer list, unchanged for anyone who iterates or indexes it, except its owner's
    forward: while that runs, iterating the list yields one "layer", the list itself, whose
    forward runs all layers as reversible couplings. The owner's loop calls it with the
    arguments a layer takes; they are bound to the layer's signature and routed to every block.
    """

    def __init__(self, layers: nn.ModuleList, family: Family, stack_index: int, config):
        super().__init__(list(layers))
        variant = VARIANTS[config.variant]
        # names, not the description itself: the model stays picklable
        self.family_type, self.stack_index = family.model_type, stack_index
        self.variant = variant
        self.coupling = CouplingSettings(
            config.lambda_,
            config.beta,
            variant.swap,
            exact=config.exact,
            frac_bits=config.frac_bits,
            audit=config.audit,
            stream_bits=config.stream_bits,
            chunk_tokens=config.recompute_chunk_tokens,
        )
        self.offload_remainders = config.offload_remainders
        self.reversible_layers = config.reversible_layers
        self.output_stream = config.output_stream
        self.compile_blocks = config.compile_blocks
        self.chunk_attention_queries = config.chunk_attention_queries
        self.backward_mode = "reversible"
        # set by gradient_checkpointing_enable(): checkpoints the layers that store activations
        self.checkpoint_func = None
        self.checkpoint_every_n_layers = 1
        self.trace = None  # a list to record stream values per layer (diagnostics, tests)
        self._layer_signature = inspect.signature(self[0].forward)
        self._owner_calls = 0  # > 0 while the owner's forward runs
        self._ran = False
        self._wants_hidden_states = False  # the owner's call asked for output_hidden_states
        self._kept_couplings: dict = {}  # couplings(): key -> couplings

    def __getstate__(self):
        # the kept couplings close over these very layers: a copy builds its own
        return {**super().__getstate__(), "_kept_couplings": {}}

    @property
    def stack(self) -> Stack:
        return family_for(self.family_type).stacks[self.stack_index]

    # --- the owner's view -----------------------------------------------------------------
    def __iter__(self):
        if self._owner_calls:
            return iter((self,))
        return super().__iter__()

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            if self._owner_calls and range(len(self))[idx] == range(len(self)):
                return self
            return nn.ModuleList(list(self._modules.values())[idx])
        return super().__getitem__(idx)

    def _enter_owner(self, module, args):
        self._owner_calls += 1
        self._ran = False

    def _exit_owner(self, module, args, output):
        self._owner_calls -= 1
        if output is not None and not self._ran:
            raise RuntimeError(
                f"{type(module).__name__}.forward ran without calling its layers through their list; "
                f"this transformers version ({transformers.__version__}) lays out the layer loop in a way "
                "MEFT does not know, so the output would not be MEFT's"
            )

    def unreachable_adapters(self) -> list[nn.Module]:
        """Adapters whose output never reaches the returned stream. When MEFT1 or MEFT2 return
        only the PLM stream, the top layer's adapter block (G in MEFT1, F in MEFT2) writes the
        other, dropped stream: it can learn nothing and gets no gradient. It stays frozen, so that
        every trainable parameter gets a gradient in every step (DDP would otherwise hand it zeros
        where a single process has none, and weight decay would move it under DDP only)."""
        if self.output_stream != "plm" or not self.variant.swap:
            return []
        # after the last swap, stream x1 holds G's output and x2 holds F's
        dropped_block = self.variant.G if self.variant.plm_stream == 1 else self.variant.F
        top = list(self._modules.values())[-1]
        return [top.meft["coupling"]] if dropped_block == "adapter" else []

    # --- the stack ------------------------------------------------------------------------
    def couplings(self, compiled: bool = False, split: bool = False) -> list[Coupling]:
        """The layers as couplings of F and G blocks. Built once per kind and kept (deep copies
        and pickles of the model carry none: __getstate__) while the modules, which of their
        parameters train, and the settings the blocks depend on stay the same; building them
        costs more host time than a small step's GPU work."""
        modules = tuple(self.modules())[1:]
        # FSDP2's fully_shard changes a module's class in place and replaces its parameters
        key = (compiled, split, self.chunk_attention_queries, self.variant, modules, tuple(map(type, modules)),
               tuple((id(p), p.requires_grad) for m in modules for p in m._parameters.values() if p is not None))
        kept = self.__dict__.setdefault("_kept_couplings", {})  # a list unpickled from before it had one
        if key not in kept:
            if len(kept) >= 4:  # the model changed: what was kept is stale
                kept.clear()
            kept[key] = self._build_couplings(compiled, split)
        return kept[key]

    def _build_couplings(self, compiled: bool, split: bool) -> list[Coupling]:
        stack, result = self.stack, []
        prefix = f"{stack.name} " if stack.name else ""
        for index, layer in enumerate(self._modules.values()):
            name = f"{prefix}layer {index}"
            F = _make_block(self.variant.F, stack, layer, compiled, split, self.chunk_attention_queries)
            G = _make_block(self.variant.G, stack, layer, compiled, split, self.chunk_attention_queries)
            if _is_fsdp_unit(layer):
                # a whole layer as an FSDP2 unit: the stack never calls the layer's forward, where
                # FSDP would gather its shards, so the engine gathers them around the layer's work
                params, gathered = _fsdp_layer(layer, name)
                result.append(Coupling(F, G, params, name, gathered=gathered, autograd_ok=False))
            else:
                result.append(Coupling(F, G, _trainable_in(layer), name))
        return result

    def forward(self, *args, **kwargs) -> torch.Tensor:
        self._ran = True
        bound = self._layer_signature.bind(*args, **kwargs)
        arguments = dict(bound.arguments)
        hidden_states = arguments.pop(next(iter(self._layer_signature.parameters)))
        layer_args = {}
        for name, value in arguments.items():
            if self._layer_signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
                layer_args.update(value)
            else:
                layer_args[name] = value
        return self.run(hidden_states, layer_args)

    def run(self, hidden_states: torch.Tensor, layer_args: dict) -> torch.Tensor:
        # gradients wanted: the exact reversible path, in eval mode too (dropout is off there,
        # the gradients are still the exact ones); a filled cache means generation, which runs
        # the float coupling as evaluation does
        trains = (
            torch.is_grad_enabled()
            and (hidden_states.requires_grad or any(p.requires_grad for p in self.parameters()))
            and (self.training or not _has_filled_cache(layer_args))
        )
        if trains and self._wants_hidden_states:
            raise ValueError(
                "output_hidden_states=True while training a MEFT model: the reversible layers keep no per-layer "
                "hidden states (that is where the memory goes). Ask for them in evaluation (under torch.no_grad(), "
                "or with gradients off), where every layer's state of the stream that follows the PLM is returned."
            )
        if not trains and any(layer._forward_hooks for layer in self._modules.values()):
            return self._run_calling_layer_hooks(hidden_states, self.couplings(), layer_args)
        # training only: forward and recompute run the same compiled code, and evaluation and
        # generation (caches, changing shapes) stay eager; attention split into its parts where
        # the family has them, unless compiled: a compiled block is one function (so
        # chunk_attention_queries, which needs the parts, is refused with compile_blocks)
        couplings = self.couplings(compiled=self.compile_blocks, split=not self.compile_blocks) if trains else self.couplings()
        if trains:
            mode = self.backward_mode
            layer_args = _without_cache(layer_args)
            if self.checkpoint_func is not None:
                couplings = self._checkpointed(couplings, mode)
        else:
            mode = "float"
        tokens = hidden_states.numel() // hidden_states.shape[-1]
        offload = offload_wanted(self.offload_remainders, tokens, hidden_states.is_cuda)
        x1, x2 = run_stack(
            hidden_states,
            couplings,
            dataclasses.replace(self.coupling, offload_remainders=offload),
            layer_args,
            mode=mode,
            reversible_layers=self.reversible_layers,
            record_rng=self.training,
            trace=self.trace,
        )
        return self._output(x1, x2, hidden_states.dtype)

    def _output(self, x1: torch.Tensor, x2: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        out = (x1 + x2) / 2 if self.output_stream == "mean" else (x1, x2)[self.variant.plm_stream]
        return out.to(dtype)

    def _run_calling_layer_hooks(self, hidden_states: torch.Tensor, couplings: list[Coupling], layer_args: dict):
        """Evaluation when the layers carry forward hooks (transformers records output_hidden_states
        through them): the float coupling layer by layer, each layer's hooks called with the
        model's output stream before and after that layer, as if the library had called it."""
        dtype = hidden_states.dtype
        x1 = x2 = hidden_states.to(stream_dtype_for(dtype))
        before = hidden_states
        for layer, coupling in zip(self._modules.values(), couplings):
            x1, x2 = run_float_layer(x1, x2, coupling, self.coupling, layer_args, dtype)
            after = self._output(x1, x2, dtype)
            for hook in list(layer._forward_hooks.values()):
                hook(layer, (before,), (after,))
            before = after
        return self._output(x1, x2, dtype)

    def _checkpointed(self, couplings: list[Coupling], mode: str) -> list[Coupling]:
        """Gradient checkpointing for the layers that store activations: the ones above
        `reversible_layers` (all of them in the vanilla mode). Reversible layers already keep
        nothing but remainders, so they are left alone. Each PLM block is checkpointed on its
        own; a coupling's lone adapter (MEFT1's G, MEFT2's F) is too small to be worth it."""
        first = 0 if mode == "vanilla" else (len(couplings) if self.reversible_layers is None else self.reversible_layers)
        result = list(couplings[:first])
        for index, coupling in enumerate(couplings[first:]):
            if index % self.checkpoint_every_n_layers:
                result.append(coupling)
                continue
            F = coupling.F if self.variant.F == "adapter" else self._checkpoint_block(coupling.F)
            G = coupling.G if self.variant.G == "adapter" else self._checkpoint_block(coupling.G)
            result.append(dataclasses.replace(coupling, F=F, G=G))
        return result

    def _checkpoint_block(self, block):
        checkpoint_func = self.checkpoint_func
        # always non-reentrant: the routed arguments are a dict, and reentrant checkpointing
        # would not pass gradients to tensors inside it (BART's encoder output, for one)
        return lambda x, args: checkpoint_func(run_block, block, x, args, use_reentrant=False)


def offload_wanted(setting: bool | str, tokens: int, on_cuda: bool) -> bool:
    """Whether a step of `tokens` tokens keeps its remainders in host memory (CUDA only)."""
    if setting == "auto":
        return on_cuda and tokens >= OFFLOAD_MIN_TOKENS
    return bool(setting) and on_cuda


def _is_fsdp_unit(module: nn.Module) -> bool:
    """fully_shard() (FSDP2) gives the module a subclass with unshard() and reshard()."""
    return type(module).__name__.startswith("FSDP") and hasattr(module, "unshard") and hasattr(module, "reshard")


def _trainable_in(module: nn.Module) -> tuple[torch.Tensor, ...]:
    return tuple(p for p in module.parameters() if p.requires_grad)


def _fsdp_layer(layer: nn.Module, name: str):
    """The trainable parameters of a layer that is an FSDP2 unit, and a context that gathers it.

    Autograd must see the gathered (unsharded) parameters: their gradients are what FSDP
    reduce-scatters into the shards when the backward ends. FSDP keeps the same unsharded
    parameter objects from one gather to the next; they are read once, during one gather, and
    every later gather checks that they are still the ones the layer holds."""
    params = getattr(layer, "_meft_gathered_params", None)
    if params is None:
        layer.unshard()
        params = _trainable_in(layer)
        layer.reshard()
        layer._meft_gathered_params = params

    @contextlib.contextmanager
    def gathered():
        layer.unshard()
        try:
            held = _trainable_in(layer)
            if len(held) != len(params) or any(a is not b for a, b in zip(held, params)):
                raise RuntimeError(
                    f"MEFT: the gathered parameters of {name} (an FSDP unit) changed since the first step; "
                    "this torch release's FSDP does not keep them, so shard model.fsdp_units() instead of whole layers"
                )
            yield
        finally:
            layer.reshard()

    return params, gathered


def _has_filled_cache(layer_args: dict) -> bool:
    return any(isinstance(v, transformers.Cache) and v.get_seq_length() > 0 for v in layer_args.values())


def _without_cache(layer_args: dict) -> dict:
    """Training recomputes every layer, so a KV cache would be filled twice: layers get none."""
    result = {}
    for key, value in layer_args.items():
        if isinstance(value, transformers.Cache):
            if value.get_seq_length() > 0:
                raise ValueError("MEFT cannot train on top of a filled KV cache; pass no cache when training")
            value = None
        elif key == "use_cache":
            value = False
        result[key] = value
    return result


def _note_output_hidden_states(module, args, kwargs):
    """Whether this call of the base model asks for every layer's hidden states."""
    wanted = kwargs.get("output_hidden_states")
    if wanted is None:
        wanted = getattr(module.config, "output_hidden_states", False)
    for stack in module.modules():
        if isinstance(stack, MeftLayers):
            stack._wants_hidden_states = bool(wanted)


class _OwnerHook:
    """Forward hooks on the module that owns the layer list; found by attribute name, so
    deep copies of the model toggle their own list."""

    def __init__(self, attribute: str):
        self.attribute = attribute

    def enter(self, module, args):
        getattr(module, self.attribute)._enter_owner(module, args)

    def exit(self, module, args, output):
        getattr(module, self.attribute)._exit_owner(module, args, output)


def install_meft(model: nn.Module, config, trainable_modules: tuple[str, ...] = ()) -> None:
    """Adds adapters, makes the layers reversible and freezes the PLM, in place."""
    family = family_for(config.plm_model_type)
    variant = VARIANTS[config.variant]
    base = model.base_model
    for index, stack in enumerate(family.stacks):
        owner_path, attribute = stack.layers.rpartition(".")[::2]
        owner = base.get_submodule(owner_path) if owner_path else base
        layers = getattr(owner, attribute)
        for layer in layers:
            layer.meft = nn.ModuleDict(
                {
                    name: MeftAdapter(
                        config.hidden_size,
                        config.adapter_dim,
                        family.activation(config),
                        family.dropout(config),
                        init=config.adapter_init,
                        init_std=config.adapter_init_std,
                    )
                    for name in variant.adapters
                }
            )
        setattr(owner, attribute, MeftLayers(layers, family, index, config))
        hook = _OwnerHook(attribute)
        owner.register_forward_pre_hook(hook.enter)
        owner.register_forward_hook(hook.exit, always_call=True)
    base.register_forward_pre_hook(_note_output_hidden_states, with_kwargs=True)
    freeze_plm(model, trainable_modules)


def freeze_plm(model: nn.Module, trainable_modules: tuple[str, ...] = ()) -> None:
    """Freezes everything but the adapters (found by type, not by name) and the task head;
    adapters whose output never reaches the model's output stay frozen."""
    refuse_quantized_trainables(model, trainable_modules)
    model.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, MeftAdapter):
            module.requires_grad_(True)
    for stack in [m for m in model.modules() if isinstance(m, MeftLayers)]:
        for adapter in stack.unreachable_adapters():
            adapter.requires_grad_(False)
    for name in trainable_modules:
        model.get_submodule(name).requires_grad_(True)
    keep_trainable_in_float32(model, trainable_modules)


def refuse_quantized_trainables(model: nn.Module, trainable_modules: tuple[str, ...]) -> None:
    """Adapters and the task head MEFT trains need floating-point weights: a quantizer that
    replaced them (bitsandbytes packs weights into integers) leaves nothing to train. Converted
    checkpoints keep them out of quantization (unquantized_modules); a model quantized before
    MEFT was added (get_meft_model) may have quantized its head."""
    for name, module in model.named_modules():
        if not (isinstance(module, MeftAdapter) or name in trainable_modules):
            continue
        quantized = next(((n, p.dtype) for n, p in module.named_parameters() if not p.is_floating_point()), None)
        if quantized is not None:
            raise ValueError(
                f"{name}.{quantized[0]} is quantized ({quantized[1]}), but MEFT trains {name}: load the model with "
                f"{name!r} in llm_int8_skip_modules of its BitsAndBytesConfig (the modules listed there stay unquantized)"
            )


def keep_trainable_in_float32(model: nn.Module, trainable_modules: tuple[str, ...] = ()) -> None:
    """Adapters and the task head MEFT trains hold float32 weights whatever the model's dtype,
    as peft keeps its adapters: AdamW on fp16 weights turns them into NaN in one step (its eps
    of 1e-8 is zero in fp16). Adapters compute in the model's dtype (adapters.py); a trained
    head receives its input cast to its weights' dtype and returns float32 logits."""
    for module in model.modules():
        if isinstance(module, MeftAdapter):
            module.float()
    for name in trainable_modules:
        head = model.get_submodule(name)
        if any(p.is_floating_point() and p.dtype != torch.float32 for p in head.parameters()):
            head.float()
        if not getattr(head, "_meft_casts_inputs", False):
            head.register_forward_pre_hook(_inputs_to_weight_dtype)
            head._meft_casts_inputs = True


def _inputs_to_weight_dtype(module, args):
    # float32 unless the user cast the model since (model.to(torch.bfloat16) casts heads too)
    dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), None)
    if dtype is None:
        return None
    return tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def _refuse_split_stacks(model: nn.Module) -> None:
    """A reversible stack runs all its layers as one unit, on the device of its input: a device
    map that puts its layers on several devices (or leaves some on the meta device, offloaded)
    cannot run."""
    for stack in [m for m in model.modules() if isinstance(m, MeftLayers)]:
        devices = {p.device for p in stack.parameters()}
        if len(devices) > 1 or any(d.type == "meta" for d in devices):
            names = ", ".join(sorted(str(d) for d in devices))
            raise ValueError(
                f"the reversible layers ({stack.stack.layers}) were loaded onto several devices ({names}), as a "
                "device_map splits them or offloads some to the CPU or disk; a MEFT stack runs its layers as one "
                "unit and needs them on one device. Load with device_map={'': 0} (or one device of your choice), "
                "or shard the model with FSDP (model.fsdp_units()) to spread it over several GPUs."
            )


ADAPTERS_WEIGHTS_NAME = "meft_adapters.safetensors"
ADAPTERS_CONFIG_NAME = "meft_adapters.json"


_MODEL_CLASSES: dict[str, type] = {}  # the declared model classes, by name (they add themselves)


class MeftModelMixin:
    """What every Meft<LibraryClass> adds to its library class, the last of its bases."""

    _meft_trainable_modules: tuple[str, ...] = ()  # the task head MEFT trains (families.py: heads)
    _meft_family: str = ""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if MeftModelMixin not in cls.__bases__:
            return  # a subclass of a declared class (FSDP's, a user's) inherits what it needs
        library_class = cls.__bases__[-1]
        family = family_for(cls.config_class.model_type.removeprefix("meft_"))
        auto_class = family.auto_class_of(library_class.__name__)
        if auto_class is None or cls.__name__ != "Meft" + library_class.__name__:
            raise TypeError(f"{cls.__name__}: {library_class.__name__} is no head of {family.model_type} models (families.py)")
        if (auto_class == "AutoModelForCausalLM") != issubclass(cls, ChunkedLossMixin):
            raise TypeError(f"{cls.__name__}: causal LMs, and only they, compute their loss in chunks (ChunkedLossMixin)")
        head = family.heads[auto_class]
        cls._meft_family = family.model_type
        cls._meft_trainable_modules = head.trainable
        cls._keep_in_fp32_modules = unquantized_modules(library_class, head.trainable)
        _MODEL_CLASSES[cls.__name__] = cls
        if cls.__doc__ is None:
            cls.__doc__ = f"{library_class.__name__} with exact-reversible MEFT layers.\n\n{__doc__}"

    def __init__(self, config, *args, **kwargs):
        # some heads (LLaMA's classifier, for one) build their backbone with AutoModel.from_config:
        # for this config class that must give the family's plain base model, made reversible below
        backbone = getattr(transformers, family_for(self._meft_family).head_for("AutoModel").library_class)
        transformers.MODEL_MAPPING.register(type(config), backbone, exist_ok=True)
        super().__init__(config, *args, **kwargs)
        install_meft(self, config, self._meft_trainable_modules)

    @classmethod
    def from_pretrained(cls, *args, adapters: str | os.PathLike | None = None, **kwargs):
        """transformers' from_pretrained; `adapters`, a folder written by
        save_pretrained(..., adapters_only=True), is then loaded onto the converted model."""
        loaded = super().from_pretrained(*args, **kwargs)
        # loading replaces parameters by fresh ones that all require grad: freeze again
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        _refuse_split_stacks(model)
        freeze_plm(model, cls._meft_trainable_modules)
        if adapters is not None:
            model.load_adapters(adapters)
        return loaded

    def _init_weights(self, module):
        if is_adapter_projection(module):
            init_adapter_projection(module)
        elif not isinstance(module, MeftAdapter):
            super()._init_weights(module)

    @property
    def meft_stacks(self) -> list[MeftLayers]:
        """The reversible layer lists: one, or an encoder's and a decoder's."""
        return [m for m in self.modules() if isinstance(m, MeftLayers)]

    @property
    def meft_layers(self) -> MeftLayers:
        return self.meft_stacks[0]

    def meft_final_norm(self) -> nn.Module | None:
        """The norm the base model applies after its last layer, where the family runs it with
        the chunked loss (families.py: final_norm); None otherwise."""
        path = family_for(self._meft_family).final_norm
        return None if path is None else self.base_model.get_submodule(path)

    def fsdp_units(self) -> list[nn.Module]:
        """The frozen PLM blocks to shard one by one with FSDP2, before the whole model:

            for unit in model.fsdp_units():
                fully_shard(unit)
            fully_shard(model)

        A MEFT stack calls each layer's attention and MLP modules, never the layer itself.
        Units around these modules (the family's attention and MLP projections, families.py)
        gather theirs for each call, in forward and again when backward recomputes it, and free
        them after. The adapters, norms, embeddings and heads stay in the model's own unit.
        Whole layers as units work too (the usual recipe): the stack then gathers each layer
        around that layer's work itself, and only the reversible backward can train them."""
        return [
            layer.get_submodule(path)
            for stack in self.meft_stacks
            for layer in stack._modules.values()
            for path in stack.stack.fsdp_units
        ]

    @contextlib.contextmanager
    def disable_adapter(self):
        """Inside, every adapter outputs zeros (peft's name and meaning): the model is the
        converted PLM alone, its scaled streams included, as it was before any training with
        zero-initialised adapters. For a reference model that needs no second copy (DPO's):

            with torch.no_grad(), model.disable_adapter():
                reference_logits = model(**batch).logits

        A trained head stays as it is. Run a training step's forward and backward on one side of it."""
        adapters = [m for m in self.modules() if isinstance(m, MeftAdapter)]
        previous = [adapter.disabled for adapter in adapters]
        for adapter in adapters:
            adapter.disabled = True
        try:
            yield self
        finally:
            for adapter, disabled in zip(adapters, previous):
                adapter.disabled = disabled

    @contextlib.contextmanager
    def meft_backward(self, mode: str):
        """Temporarily train with `mode`: "reversible" (default) or "vanilla" (ordinary autograd
        through the same couplings: the reference for gradients, and a debugging aid)."""
        if mode not in BACKWARD_MODES:
            raise ValueError(f"mode must be one of {BACKWARD_MODES}, got {mode!r}")
        stacks = self.meft_stacks
        previous = [stack.backward_mode for stack in stacks]
        for stack in stacks:
            stack.backward_mode = mode
        try:
            yield self
        finally:
            for stack, mode_before in zip(stacks, previous):
                stack.backward_mode = mode_before

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, total) parameter counts."""
        trainable = total = 0
        for p in self.parameters():
            total += p.numel()
            trainable += p.numel() if p.requires_grad else 0
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")

    # --- gradient checkpointing -----------------------------------------------------------
    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func=None, **kwargs):
        """Reached from gradient_checkpointing_enable()/_disable() and from the Trainer's
        `gradient_checkpointing=True`. Reversible layers need no checkpointing and keep running
        as they do; the layers that store activations (above `reversible_layers`, or all of
        them under meft_backward("vanilla")) are checkpointed block by block."""
        if gradient_checkpointing_func is None:
            gradient_checkpointing_func = checkpoint
        # the library's own flags too, so that is_gradient_checkpointing and the Trainer see it;
        # the library layers are never called as a whole here, so the flags change nothing else
        super()._set_gradient_checkpointing(enable=enable, gradient_checkpointing_func=gradient_checkpointing_func, **kwargs)
        for stack in self.meft_stacks:
            stack.checkpoint_func = gradient_checkpointing_func if enable else None
            stack.checkpoint_every_n_layers = kwargs.get("every_n_layers", 1)

    # --- adapter-only saves ---------------------------------------------------------------
    def _meft_trained_modules(self) -> list[str]:
        """Names of the modules fine-tuning changes: every adapter and the task head MEFT trains."""
        return [
            name
            for name, module in self.named_modules()
            if isinstance(module, MeftAdapter) or name in self._meft_trainable_modules
        ]

    def adapters_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors an adapter-only save holds: the adapters, the task head MEFT trains, and
        any other parameter set to train. Everything else is the frozen converted base."""
        state = self.state_dict()
        names = {n for module in self._meft_trained_modules() for n in state if n.startswith(module + ".")}
        names.update(n for n, p in self.named_parameters() if p.requires_grad)
        return {n: state[n] for n in sorted(names)}

    def save_pretrained(self, save_directory: str | os.PathLike, *args, adapters_only: bool = False, **kwargs):
        """transformers' save_pretrained; with `adapters_only=True` it writes only what
        fine-tuning changed (adapters_state_dict(): a few MB) to meft_adapters.safetensors and
        the MEFT settings to meft_adapters.json. Load them onto the same converted base with
        `model.load_adapters(folder)` or `from_pretrained(base, adapters=folder)`."""
        if not adapters_only:
            return super().save_pretrained(save_directory, *args, **kwargs)
        unsupported = sorted(set(kwargs) - {"is_main_process"})
        if args or unsupported:
            raise TypeError(
                f"save_pretrained(adapters_only=True) takes save_directory and is_main_process only, got {unsupported or args}"
            )
        if not kwargs.get("is_main_process", True):
            return None
        folder = Path(save_directory)
        if folder.is_file():
            raise ValueError(f"{folder} is a file; adapters are saved into a folder")
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {name: tensor.detach().contiguous() for name, tensor in self.adapters_state_dict().items()}
        save_file(tensors, str(folder / ADAPTERS_WEIGHTS_NAME), metadata={"format": "pt"})
        description = {
            "architecture": type(self).__name__,
            "plm_model_type": self.config.plm_model_type,
            "meft_settings": self.config.meft_settings(),
            "base_model": getattr(self.config, "_name_or_path", ""),
            "id2label": {str(k): v for k, v in self.config.id2label.items()},
            "tensors": sorted(tensors),
        }
        (folder / ADAPTERS_CONFIG_NAME).write_text(json.dumps(description, indent=2) + "\n")
        return None

    def load_adapters(self, adapters_dir: str | os.PathLike) -> None:
        """Loads a folder written by save_pretrained(..., adapters_only=True) into this model,
        which must be the converted base they were trained on (same MEFT settings and
        shapes). Tensors are copied in place, cast to this model's dtype and device."""
        folder = Path(adapters_dir)
        weights, description_file = folder / ADAPTERS_WEIGHTS_NAME, folder / ADAPTERS_CONFIG_NAME
        if not (weights.is_file() and description_file.is_file()):
            raise FileNotFoundError(
                f"{folder} holds no {ADAPTERS_WEIGHTS_NAME} and {ADAPTERS_CONFIG_NAME}; "
                "write them with model.save_pretrained(folder, adapters_only=True)"
            )
        description = json.loads(description_file.read_text())
        if description["plm_model_type"] != self.config.plm_model_type:
            raise ValueError(
                f"these adapters were trained on a {description['plm_model_type']} model, not {self.config.plm_model_type}"
            )
        ours = self.config.meft_settings()
        differing = {
            k: (v, ours.get(k))
            for k, v in description["meft_settings"].items()
            if k not in RUNTIME_SETTINGS and ours.get(k) != v
        }
        if differing:
            details = ", ".join(f"{k}: saved {saved!r}, this model {here!r}" for k, (saved, here) in differing.items())
            raise ValueError(f"the adapters' MEFT settings differ from this model's ({details})")
        tensors = load_file(str(weights))
        state = self.state_dict()
        unknown = sorted(set(tensors) - set(state))
        if unknown:
            raise ValueError(f"{weights} holds tensors this model does not have: {', '.join(unknown[:5])}")
        required = {n for module in self._meft_trained_modules() for n in state if n.startswith(module + ".")}
        missing = sorted(required - set(tensors))
        if missing:
            raise ValueError(f"{weights} lacks tensors this model trains: {', '.join(missing[:5])}")
        wrong_shape = sorted(n for n, t in tensors.items() if t.shape != state[n].shape)
        if wrong_shape:
            n = wrong_shape[0]
            raise ValueError(
                f"{n} has shape {tuple(tensors[n].shape)} in {weights} but {tuple(state[n].shape)} in this model "
                "(another base model, adapter_dim or number of labels?)"
            )
        with torch.no_grad():
            for name, tensor in tensors.items():
                state[name].copy_(tensor)
        if "id2label" in description:
            self.config.id2label = {int(k): v for k, v in description["id2label"].items()}
            self.config.label2id = {v: k for k, v in self.config.id2label.items()}


def unquantized_modules(library_class: type, trainable_modules: tuple[str, ...]) -> set[str]:
    """The modules a quantizer must leave as they are: every adapter's linear layers and the task
    head MEFT trains, as peft keeps its adapters (a quantized adapter holds integers and cannot
    train). transformers' quantizers (bitsandbytes 4- and 8-bit among them) leave out the modules
    `_keep_in_fp32_modules` names, matched as a suffix of a module's path, beside the user's own
    `llm_int8_skip_modules`; from_pretrained with an fp16 `dtype` also loads them in float32, the
    dtype MEFT keeps them in anyway (keep_trainable_in_float32)."""
    linears = adapter_linear_names()
    adapters = {f"meft.{adapter}.{linear}" for variant in VARIANTS.values() for adapter in variant.adapters for linear in linears}
    return set(library_class._keep_in_fp32_modules or ()) | adapters | set(trainable_modules)


# ------------------------------------------------------------------------- the model classes
# One class per head of each family (families.py: heads), named "Meft" + the library class: the
# names auto_map gives. Causal LMs compute their training loss in chunks (ChunkedLossMixin).

class MeftBertModel(MeftModelMixin, transformers.BertModel):
    config_class = MeftBertConfig


class MeftBertForSequenceClassification(MeftModelMixin, transformers.BertForSequenceClassification):
    config_class = MeftBertConfig


class MeftBertForQuestionAnswering(MeftModelMixin, transformers.BertForQuestionAnswering):
    config_class = MeftBertConfig


class MeftBertForMaskedLM(MeftModelMixin, transformers.BertForMaskedLM):
    config_class = MeftBertConfig


class MeftRobertaModel(MeftModelMixin, transformers.RobertaModel):
    config_class = MeftRobertaConfig


class MeftRobertaForSequenceClassification(MeftModelMixin, transformers.RobertaForSequenceClassification):
    config_class = MeftRobertaConfig


class MeftRobertaForQuestionAnswering(MeftModelMixin, transformers.RobertaForQuestionAnswering):
    config_class = MeftRobertaConfig


class MeftRobertaForMaskedLM(MeftModelMixin, transformers.RobertaForMaskedLM):
    config_class = MeftRobertaConfig


class MeftBartModel(MeftModelMixin, transformers.BartModel):
    config_class = MeftBartConfig


class MeftBartForConditionalGeneration(MeftModelMixin, transformers.BartForConditionalGeneration):
    config_class = MeftBartConfig


class MeftBartForSequenceClassification(MeftModelMixin, transformers.BartForSequenceClassification):
    config_class = MeftBartConfig


class MeftBartForQuestionAnswering(MeftModelMixin, transformers.BartForQuestionAnswering):
    config_class = MeftBartConfig


class MeftOPTModel(MeftModelMixin, transformers.OPTModel):
    config_class = MeftOPTConfig


class MeftOPTForCausalLM(MeftModelMixin, ChunkedLossMixin, transformers.OPTForCausalLM):
    config_class = MeftOPTConfig


class MeftOPTForSequenceClassification(MeftModelMixin, transformers.OPTForSequenceClassification):
    config_class = MeftOPTConfig


class MeftLlamaModel(MeftModelMixin, transformers.LlamaModel):
    config_class = MeftLlamaConfig


class MeftLlamaForCausalLM(MeftModelMixin, ChunkedLossMixin, transformers.LlamaForCausalLM):
    config_class = MeftLlamaConfig


class MeftLlamaForSequenceClassification(MeftModelMixin, transformers.LlamaForSequenceClassification):
    config_class = MeftLlamaConfig


class MeftMistralModel(MeftModelMixin, transformers.MistralModel):
    config_class = MeftMistralConfig


class MeftMistralForCausalLM(MeftModelMixin, ChunkedLossMixin, transformers.MistralForCausalLM):
    config_class = MeftMistralConfig


class MeftMistralForSequenceClassification(MeftModelMixin, transformers.MistralForSequenceClassification):
    config_class = MeftMistralConfig


class MeftQwen2Model(MeftModelMixin, transformers.Qwen2Model):
    config_class = MeftQwen2Config


class MeftQwen2ForCausalLM(MeftModelMixin, ChunkedLossMixin, transformers.Qwen2ForCausalLM):
    config_class = MeftQwen2Config


class MeftQwen2ForSequenceClassification(MeftModelMixin, transformers.Qwen2ForSequenceClassification):
    config_class = MeftQwen2Config


class MeftGPT2Model(MeftModelMixin, transformers.GPT2Model):
    config_class = MeftGPT2Config


class MeftGPT2LMHeadModel(MeftModelMixin, ChunkedLossMixin, transformers.GPT2LMHeadModel):
    config_class = MeftGPT2Config


class MeftGPT2ForSequenceClassification(MeftModelMixin, transformers.GPT2ForSequenceClassification):
    config_class = MeftGPT2Config


def model_class_for(family: Family, auto_class: str) -> type[MeftModelMixin]:
    """The MEFT model class of `family`'s head `auto_class` ("AutoModelForCausalLM")."""
    return _MODEL_CLASSES["Meft" + family.head_for(auto_class).library_class]
