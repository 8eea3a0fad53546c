"""get_meft_model(): a pretrained model in memory in, the MEFT model a converted folder loads as out.

    from transformers import AutoModelForCausalLM
    from meft_convert import get_meft_model

    model = get_meft_model(AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-135M"), variant="meft3")
    model.save_pretrained("smollm2-meft3")  # loads with trust_remote_code=True, without meft_convert

The result is what `meft-convert` writes and `from_pretrained(folder, trust_remote_code=True)`
loads: the same class (templates/modeling_meft.model_class_for), the same config (built by
convert.meft_config), the same adapters for the same seed (convert.draw_adapters), and `auto`
settings measured by the same calibration. Nothing is written or copied: the MEFT model is
built on the meta device and then takes the PLM's tensors (the very storage of `model`).
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from typing import TYPE_CHECKING, Callable

from .errors import BadInputError
from .settings import MeftSettings

if TYPE_CHECKING:
    import transformers


def _head_of(family, model) -> str:
    """The auto class whose head `model` is, from its class (or the library class it derives from)."""
    for cls in type(model).__mro__:
        auto_class = family.auto_class_of(cls.__name__)
        if auto_class is not None:
            return auto_class
    known = ", ".join(head.library_class for head in family.heads.values())
    raise BadInputError(f"MEFT has no version of {type(model).__name__}; the {family.model_type} classes it has: {known}")


def _tokenizer_folder(name_or_path: str):
    """The original's folder, if the model was loaded from one: calibration reads its tokenizer
    there, as convert() does."""
    from pathlib import Path

    path = Path(name_or_path).expanduser() if name_or_path else None
    return path if path is not None and path.is_dir() else None


def get_meft_model(
    model: transformers.PreTrainedModel,
    settings: MeftSettings | None = None,
    *,
    tokenizer=None,
    log: Callable[[str], None] = lambda message: None,
    **overrides,
) -> transformers.PreTrainedModel:
    """The MEFT version of `model` (a transformers model MEFT has a class for: a base model or
    one of its heads), ready to train: the PLM frozen, the adapters (and a task head MEFT
    trains) trainable, in eval mode as from_pretrained returns models.

    settings: a MeftSettings (default: its defaults); `overrides` replace its fields, e.g.
    `variant="meft1", lambda_=2**-10`. Settings left to "auto" are measured on `model` (the
    calibration of `meft-convert`) on the calibration text, tokenised by `tokenizer` or the
    tokenizer in the folder the model was loaded from (else a fixed random sequence).
    log: receives the calibration's progress lines.

    The result shares `model`'s tensors (nothing is copied; training the MEFT model leaves the
    frozen weights as they are, but a task head it trains is the same storage as `model`'s).
    `save_pretrained(folder)` writes a folder laid out as `meft-convert`'s (code files,
    auto_map, provenance in config.json) that loads with trust_remote_code=True."""
    import torch

    from . import calibrate
    from .convert import TASKS, base_model_name, draw_adapters, meft_config, record_provenance
    from .templates.families import family_for
    from .templates.meft_table import adapter_generator
    from .templates.modeling_meft import freeze_plm, model_class_for, refuse_quantized_trainables
    from .verify import quiet_transformers
    from .weights import layer_dtype

    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(MeftSettings)})
    if unknown:
        raise TypeError(f"get_meft_model() got unknown settings {unknown}; MeftSettings has "
                        f"{', '.join(f.name for f in dataclasses.fields(MeftSettings))}")
    settings = dataclasses.replace(settings or MeftSettings(), **overrides)
    model_type = getattr(model.config, "model_type", None)
    if str(model_type).startswith("meft_"):
        raise BadInputError(f"{type(model).__name__} is already a MEFT model")
    try:
        family = family_for(model_type)
    except ValueError as e:
        raise BadInputError(str(e)) from None
    auto_class = _head_of(family, model)
    try:  # before calibrating: a head quantized at loading cannot train
        refuse_quantized_trainables(model, family.head_for(auto_class).trainable)
    except ValueError as e:
        raise BadInputError(str(e)) from None
    task = next(t for t, a in TASKS.items() if a == auto_class)
    state = model.state_dict()
    name = getattr(model.config, "_name_or_path", "") or ""
    base_model = base_model_name(name) if name else None

    def config_for(resolved: dict | None):
        # a copy: meft_config sets num_labels on the PLM's config, and `model` keeps its own
        plm_config = copy.deepcopy(model.config)
        config, _, _ = meft_config(
            family, plm_config, settings.meft_settings(resolved), task=task, num_labels=None, keys=state,
            base_model=base_model,
        )
        return config

    config = config_for(None)
    # from the parameters, not the state: a quantized layer's state holds float32 scales beside
    # its integer weights, while its norms keep the dtype the model computes in
    dtype = calibrate.TORCH_DTYPES[layer_dtype(family, dict(model.named_parameters()))]
    causal = auto_class == calibrate.CAUSAL_LM
    folder = _tokenizer_folder(name)
    if tokenizer is None and folder is None and settings.measured(sixteen_bit=dtype in (torch.float16, torch.bfloat16)):
        warnings.warn(
            "get_meft_model: no tokenizer given and none where the model was loaded from; the auto settings are "
            "calibrated on a fixed random token sequence instead of text (pass tokenizer=...)",
            stacklevel=2,
        )
    was_training = model.training
    try:
        resolved = calibrate.calibrate_settings(
            settings, family, config, dtype, source=folder, original=model if causal else model.base_model,
            tokenizer=tokenizer, log=log,
        )
    finally:
        model.train(was_training)  # calibration runs it in eval mode
    if resolved is not None:  # the settings `auto` stood for, measured on the model
        config = config_for(resolved)
        config.meft_calibration = resolved["calibration"]
    record_provenance(config)

    with torch.device("meta"), quiet_transformers():
        meft = model_class_for(family, auto_class)(config)
    # the same generator, in the same order, as convert(): the same adapters for the same seed
    drawn = draw_adapters(meft, adapter_generator(settings.seed))
    device = next((t.device for t in state.values()), torch.device("cpu"))
    adapters = {key: torch.from_numpy(values).to(device=device, dtype=dtype) for key, values in drawn.items()}
    # a PLM loaded in 4 or 8 bits: its quantized layers are taken whole (their packed weights and
    # quantization state mean something only to their own class), the rest tensor by tensor
    replaced = tuple(name + "." for name in calibrate.share_replaced_modules(meft, model))
    state = {key: t for key, t in state.items() if not key.startswith(replaced)}
    expected = {key for key in meft.state_dict() if not key.startswith(replaced)}
    if set(state) | set(adapters) != expected or set(state) & set(adapters):
        raise RuntimeError(
            f"the MEFT model's tensors are not the PLM's plus the adapters: missing {sorted(expected - set(state) - set(adapters))[:3]}, "
            f"unexpected {sorted((set(state) | set(adapters)) - expected)[:3]}"
        )
    missing, unexpected = meft.load_state_dict({**state, **adapters}, assign=True, strict=False)
    missing = [key for key in missing if not key.startswith(replaced)]
    if missing or unexpected:
        raise RuntimeError(f"loading the PLM's tensors: missing {missing[:3]}, unexpected {unexpected[:3]}")
    # buffers that are not saved (rotary frequencies, position ids) are the PLM's too
    for key, buffer in list(meft.named_buffers()):
        if buffer.is_meta:
            owner, _, leaf = key.rpartition(".")
            meft.get_submodule(owner).register_buffer(leaf, model.get_buffer(key), persistent=False)
    left = [key for key, t in [*meft.named_parameters(), *meft.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"tensors the PLM did not provide: {left[:3]}")
    # as from_pretrained leaves a converted folder's model: PLM frozen, trainable parts in float32
    freeze_plm(meft, type(meft)._meft_trainable_modules)
    if getattr(model, "generation_config", None) is not None and meft.can_generate():
        meft.generation_config = copy.deepcopy(model.generation_config)
    meft.eval()
    # save_pretrained then copies the class's file and the files it imports (templates/, byte
    # for byte) and names it in auto_map, as transformers does for every remote-code class and
    # as a converted folder's model loaded with trust_remote_code=True has it
    type(meft).register_for_auto_class(auto_class)
    return meft
