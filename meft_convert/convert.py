"""convert(): an original checkpoint in, a MEFT checkpoint folder out.

The output folder holds the PLM's safetensors shards byte for byte, one shard with the
adapters MEFT adds, config.json (the PLM's config plus the MEFT settings, `auto_map` and
`architectures`), the modeling code from `templates/`, the tokenizer files, a model card
and, when verified, the verification report. It is written under a temporary name next to
the destination and renamed only when complete, so an interrupted or failed conversion
leaves nothing behind and never touches an existing folder unless --force is given.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field, fields
from importlib import metadata, resources
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .errors import BadInputError, VerificationError
from .hub import push_to_hub, resolve_model
from .partial import clean_stale_partials, mark_partial, unmark_partial
from .provenance import provenance
from .settings import MeftSettings, _option, setting_error
from .templates.families import Family, auto_map_for, family_for
from .templates.meft_table import MEFT_SETTINGS, VARIANTS, adapter_generator, draw_adapter
from .weights import (
    FLOAT_DTYPES,
    ShardCopy,
    SourceWeights,
    copy_if_present,
    find_weights,
    is_bnb_4bit,
    layer_dtype,
    layer_prefix,
    quantized_modules,
    write_weights,
)

# torch, transformers and the templates that import them load inside the functions that use
# them, so that the CLI parses its arguments and answers --help or a usage error without them,
# and a conversion that needs no model (_plan_without_torch) runs without them (the family
# table and the settings table need neither)
if TYPE_CHECKING:
    import numpy as np
    import transformers


def verify_conversion(*args, **kwargs):
    from .verify import verify_conversion as verify

    return verify(*args, **kwargs)


def model_card(facts) -> str:
    from .card import model_card as card

    return card(facts)


# --task values and the Auto class whose head each one means
TASKS = {
    "base": "AutoModel",
    "sequence-classification": "AutoModelForSequenceClassification",
    "question-answering": "AutoModelForQuestionAnswering",
    "masked-lm": "AutoModelForMaskedLM",
    "causal-lm": "AutoModelForCausalLM",
    "seq2seq-lm": "AutoModelForSeq2SeqLM",
}
TEMPLATE_FILES = (
    "configuration_meft.py", "modeling_meft.py", "families.py", "family_kernels.py", "meft_table.py", "reversible.py",
    "plans.py", "recompute.py", "arithmetic.py", "blocks.py", "fixed_point.py", "labels.py", "adapters.py", "losses.py",
)
EXTRA_FILES = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
    "chat_template.jinja",
    "generation_config.json",
]


@dataclass
class ConvertOptions(MeftSettings):
    """Everything a conversion takes: the MEFT settings (MeftSettings) and where the model comes
    from and goes. The CLI builds one option per field from this table."""

    model: str = field(
        kw_only=True,  # the MEFT settings (with defaults) come first, from MeftSettings
        metadata=_option(
            "A local folder, or a Hugging Face model id (e.g. facebook/opt-1.3b) resolved through the "
            "Hugging Face cache; with HF_HUB_OFFLINE=1 only the cache is used.",
            argument=True,
        )
    )
    output: Path = field(kw_only=True, metadata=_option("Folder to write the converted checkpoint to.", flags=("-o", "--output")))
    task: str | None = field(
        default=None,
        metadata=_option(
            "The head the result's `architectures` names, so that its pipeline and Auto class pick it "
            "(default: the head the original declares). Every head the family has is loadable anyway.",
            choices=tuple(TASKS),
        ),
    )
    num_labels: int | None = field(
        default=None, metadata=_option("Number of labels of a sequence-classification head.", metavar="N")
    )
    revision: str | None = field(default=None, metadata=_option("Branch, tag or commit of a hub model."))
    force: bool = field(default=False, metadata=_option("Replace the output folder if it exists.", flag_only=True))
    link: bool = field(
        default=False,
        metadata=_option(
            "Hard-link the original's weight shards into the output instead of copying them (instant, no extra "
            "disk): both names then share one file, so neither may be edited in place. Needs one file system; "
            "shards whose header lacks `format: pt` are still copied (that entry is added).",
            flag_only=True,
        ),
    )
    verify: bool = field(
        default=True,
        metadata=_option("Compare the result with the original: fidelity, reconstruction, gradients."),
    )
    push_to_hub: str | None = field(
        default=None,
        metadata=_option(
            "Upload the result to this hub repository (e.g. you/opt-1.3b-meft3), created if needed. The local "
            "folder is written and verified first and kept whatever happens to the upload.",
            metavar="REPO_ID",
        ),
    )
    private: bool = field(default=False, metadata=_option("Create the hub repository as private.", flag_only=True))
    push_revision: str | None = field(
        default=None,
        metadata=_option("Branch to push to (created from main if missing; default: main).", metavar="BRANCH"),
    )
    commit_message: str | None = field(default=None, metadata=_option("Commit message of the upload.", metavar="TEXT"))
    token: str | None = field(
        default=None,
        repr=False,  # never shown, not even in a traceback's locals
        metadata=_option(
            "Hugging Face token for downloading the model and pushing (default: HF_TOKEN, else the stored "
            "login). Never printed or written.",
            metavar="TOKEN",
        ),
    )
    show_progress: bool = field(default=True, metadata=_option("Progress bars.", cli=False))

    def __post_init__(self):
        super().__post_init__()
        # the Python API takes paths as well as strings (the config records the model as text)
        if isinstance(self.model, os.PathLike):
            self.model = os.fspath(self.model)
        if self.output is not None and not isinstance(self.output, Path):
            self.output = Path(self.output)


class ConfigJSON(dict):
    """config.json's entries, read and set as attributes as a transformers config's are: the
    MEFT config of a plan made without transformers (_plan_without_torch)."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value) -> None:
        self[name] = value

    def meft_settings(self) -> dict:
        return {key: self[key] for key in MEFT_SETTINGS}

    def save_pretrained(self, folder: Path) -> None:
        # as transformers writes a config
        (Path(folder) / "config.json").write_text(json.dumps(self, indent=2, sort_keys=True) + "\n", encoding="utf-8")


@dataclass
class _Plan:
    """What will be written, decided before anything is."""

    family: Family
    config: transformers.PretrainedConfig | ConfigJSON
    adapters: dict[str, np.ndarray]  # float32, as drawn ...
    adapter_dtype: str  # ... and stored in this dtype (safetensors' name: the PLM layers' dtype)
    missing: list[str]  # tensors the model has but the checkpoint lacks (initialised on load)
    unexpected: list[str]  # tensors the checkpoint has but the model does not use (kept)
    trainable: int  # parameters that train (adapters, a new head) ...
    total: int  # ... of all the model's parameters


def base_model_name(model: str, revision: str | None = None) -> tuple[str, bool]:
    """How written files name the original, and whether it is a hub id: the hub id (with
    "@revision" when one was given), or only the folder's name for a local folder, so that no
    path of this machine is written into files that get pushed and shared."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path.absolute().name, False
    return (model if revision is None else f"{model}@{revision}"), True


def read_config_json(folder: Path) -> dict:
    """A checkpoint's config.json as a dict; BadInputError if it is missing or not JSON."""
    path = folder / "config.json"
    if not path.is_file():
        raise BadInputError(f"{folder} has no config.json")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadInputError(f"{path} is not valid JSON ({e})") from None


def _quantization_name(quantization: dict) -> str:
    method = quantization.get("quant_method", "quantization_config")
    return f"{method} 8-bit" if method == "bitsandbytes" and quantization.get("load_in_8bit") else method


def _read_config(folder: Path) -> dict:
    config = read_config_json(folder)
    model_type = config.get("model_type")
    if isinstance(model_type, str) and model_type.startswith("meft_"):
        raise BadInputError(f"{folder} is already a MEFT checkpoint ({model_type})")
    quantization = config.get("quantization_config")
    if isinstance(quantization, dict) and not is_bnb_4bit(quantization):
        # only bitsandbytes' 4-bit layout is read: other packings mean nothing to conversion
        raise BadInputError(
            f"{folder} is a quantized checkpoint ({_quantization_name(quantization)}), and only bitsandbytes 4-bit "
            "checkpoints (*-bnb-4bit) convert as they are; convert the unquantized original instead and load the result "
            "quantized: from_pretrained(OUTPUT, trust_remote_code=True, quantization_config=BitsAndBytesConfig(...))"
        )
    try:
        family_for(model_type)
    except ValueError as e:
        raise BadInputError(str(e)) from None
    return config


def _architecture(family: Family, declared: list[str] | None, task: str | None, keys) -> tuple[str, str]:
    """(auto class, library class) the result declares: the task's, or the original's if MEFT has it."""
    if task is not None:
        if TASKS[task] not in family.heads:
            available = ", ".join(t for t, auto in TASKS.items() if auto in family.heads)
            raise BadInputError(f"{family.model_type} models have no {task} head; their tasks: {available}")
        head = family.head_for(TASKS[task])
        if head.requires_keys and not any(head.requires_keys in k for k in keys):
            raise BadInputError(f"the checkpoint has no pretrained {task} head ({head.requires_keys}*) to keep")
        return TASKS[task], head.library_class
    for name in declared or []:
        auto_class = family.auto_class_of(name)
        if auto_class is not None:
            return auto_class, name
    return "AutoModel", family.head_for("AutoModel").library_class


def meft_config(
    family: Family,
    plm_config: transformers.PretrainedConfig,
    settings: dict,
    *,
    task: str | None,
    num_labels: int | None,
    keys,
    base_model: tuple[str, bool] | None,
) -> tuple[transformers.PretrainedConfig, str, str]:
    """The MEFT model's config: the PLM's config (`num_labels` set on it) plus the MEFT
    `settings`, `architectures`, `auto_map` (every head whose tensors `keys` name) and the
    original's name (base_model_name()). Returns it with the auto class and the library class
    of the head it declares. The one place a MEFT config is built: convert() and
    get_meft_model() call it."""
    from .templates.configuration_meft import config_class_for

    reason = family.unsupported(plm_config)
    if reason:
        raise BadInputError(reason)
    if num_labels is not None:
        if num_labels < 1:
            raise BadInputError(f"--num-labels must be at least 1, got {num_labels}")
        plm_config.num_labels = num_labels
    auto_class, library_class = _architecture(family, plm_config.architectures, task, keys)
    if num_labels is not None and auto_class != TASKS["sequence-classification"]:
        head_task = next(t for t, a in TASKS.items() if a == auto_class)
        given = f"from --task {task}" if task else f"the original's, {library_class}"
        raise BadInputError(
            f"--num-labels sets the labels of a sequence-classification head, but the result's head is {head_task} "
            f"({given}); add --task sequence-classification, or leave out --num-labels"
        )
    values = _plm_values(plm_config.to_dict(), settings)
    config_class = config_class_for(family)
    try:
        config = config_class(**values, **settings)
    except ValueError as e:
        raise setting_error(e) from None
    for key, value in _meft_entries(family, auto_class, library_class, keys, base_model).items():
        setattr(config, key, value)
    return config, auto_class, library_class


def _plm_values(values: dict, settings: dict) -> dict:
    """The PLM config's entries a MEFT config keeps (`values`: the PLM config as a dict)."""
    values = {key: value for key, value in values.items() if key not in _NOT_KEPT}
    clash = sorted(set(values) & set(settings))
    if clash:
        raise BadInputError(f"the model's config already has keys MEFT uses: {clash}")
    for key in values:
        if key.endswith("layerdrop"):
            values[key] = 0.0  # dropping a layer would skip the whole reversible stack
    return values


# entries of the PLM's config that a MEFT config replaces, or that transformers writes itself
_NOT_KEPT = ("model_type", "transformers_version", "architectures", "auto_map", "_name_or_path")


def _meft_entries(family: Family, auto_class: str, library_class: str, keys, base_model: tuple[str, bool] | None) -> dict:
    """The entries a MEFT config adds besides the settings: `architectures`, `auto_map` (every
    head whose tensors `keys` name) and the original's name (base_model_name())."""
    heads = [a for a, h in family.heads.items() if h.requires_keys is None or any(h.requires_keys in k for k in keys)]
    if auto_class not in heads:
        heads.append(auto_class)
    entries = {"architectures": ["Meft" + library_class], "auto_map": auto_map_for(family, heads)}
    if base_model is not None:
        entries["meft_base_model"], from_hub = base_model
        if not from_hub:  # `check` then asks for the original's folder (--original)
            entries["meft_base_model_local"] = True
    return entries


def draw_adapters(meft_model, generator: np.random.Generator, name_of: Callable[[str], str] = str) -> dict[str, np.ndarray]:
    """Fresh float32 tensors of every adapter of `meft_model` (built on the meta device), drawn
    from `generator` (templates/meft_table.py: adapter_generator(seed)) in the model's module
    order, named `name_of(module name)` + "." + parameter name. Adapters are drawn by
    templates/meft_table.py's draw_adapter() alone, in the same order with or without a model
    (_plan_from_headers): the same seed gives the same adapters in a converted folder and from
    get_meft_model()."""
    from .templates.adapters import MeftAdapter

    adapters = {}
    for name, module in meft_model.named_modules():
        if isinstance(module, MeftAdapter):
            module.to_empty(device="cpu")
            module.reset_parameters(generator)
            adapters.update({f"{name_of(name)}.{key}": p.detach().numpy().copy() for key, p in module.named_parameters()})
    return adapters


def _plan(options: ConvertOptions, settings: dict, source: Path, raw_config: dict, weights: SourceWeights) -> _Plan:
    import torch
    import transformers

    from .templates.modeling_meft import model_class_for
    from .verify import quiet_transformers

    family = family_for(raw_config["model_type"])
    # a 4-bit checkpoint's packed weights have their own shapes; their quantization state (a few
    # tensors beside each) is theirs too, copied byte for byte like every other tensor
    packed = quantized_modules(weights.tensors)
    packed_weights = {module + ".weight" for module in packed}
    if isinstance(raw_config.get("quantization_config"), dict) and not packed:
        raise BadInputError(
            f"{source}/config.json declares bitsandbytes 4-bit weights, but no tensor of the checkpoint is packed (none "
            "has its quantization state): save the 4-bit model again with save_pretrained, or remove quantization_config"
        )
    with quiet_transformers():
        plm_config = transformers.AutoConfig.from_pretrained(source)
    config, auto_class, library_class = meft_config(
        family, plm_config, settings, task=options.task, num_labels=options.num_labels, keys=weights.tensors,
        base_model=base_model_name(options.model, options.revision),
    )
    dtype = layer_dtype(family, weights.tensors)
    generator = adapter_generator(options.seed)

    # without verification (which builds the models anyway), the checkpoint's own headers tell the
    # layers and their shapes where it was saved by the class the result declares: building the
    # models would only import transformers' modeling code (seconds) to learn the same
    if (
        not options.verify
        and options.num_labels is None
        and _headers_know_the_head(plm_config, auto_class, weights)
        and library_class in (plm_config.architectures or [])
    ):
        plan = _plan_from_headers(family, auto_class, config, settings, weights, generator, dtype)
        if plan is not None:
            return plan

    # the tensors MEFT adds and the shapes it expects, read off models built on the meta device
    with torch.device("meta"), quiet_transformers():
        library_model = getattr(transformers, library_class)(plm_config)
        meft_model = model_class_for(family, auto_class)(config)
    library_keys = library_model.state_dict()
    meft_keys = meft_model.state_dict()
    class_prefix = layer_prefix(library_keys, family)
    file_prefix = layer_prefix(weights.tensors, family)
    if class_prefix is None or file_prefix is None:
        raise BadInputError(
            f"the checkpoint's tensors do not contain the {family.model_type} layers ({family.stacks[0].layers}.0.*)"
        )

    def file_name(key: str) -> str:
        return file_prefix + key[len(class_prefix) :] if key.startswith(class_prefix) else key

    mismatched = []
    for key, tensor in library_keys.items():
        info = weights.tensors.get(file_name(key))
        if file_name(key) in packed_weights:
            continue
        if info is not None and tuple(info.shape) != tuple(tensor.shape):
            mismatched.append(f"{file_name(key)}: checkpoint {tuple(info.shape)}, config {tuple(tensor.shape)}")
    if mismatched:
        raise BadInputError("tensor shapes do not match the config: " + "; ".join(mismatched[:3]))
    mapped = {file_name(k) for k in library_keys} | {key for keys in packed.values() for key in keys}
    # a tensor tied to another (OPT's and GPT-2's lm_head is their embedding matrix) is loaded
    # with the one it is tied to: it is missing from the checkpoint only if all its ties are
    ties: dict[int, set[str]] = {}
    named = [*library_model.named_parameters(remove_duplicate=False), *library_model.named_buffers(remove_duplicate=False)]
    for key, tensor in named:
        ties.setdefault(id(tensor), set()).add(file_name(key))
    tied = {key: names for names in ties.values() for key in names}
    missing = sorted(k for k in mapped - set(weights.tensors) if not tied.get(k, set()) & set(weights.tensors))
    unexpected = sorted(set(weights.tensors) - mapped)

    adapters = draw_adapters(meft_model, generator, name_of=file_name)
    added = {file_name(k) for k in meft_keys} - mapped
    if set(adapters) != added:
        raise RuntimeError(f"adapter tensors {sorted(set(adapters) ^ added)[:3]} do not match the MEFT model")
    trainable, total = meft_model.get_nb_trainable_parameters()
    return _Plan(family, config, adapters, dtype, missing, unexpected, trainable, total)


def _headers_know_the_head(config, auto_class: str, weights: SourceWeights) -> bool:
    """Whether the tensors outside the layers are the checkpoint's own: a base model's, a head
    tied to the embeddings, or an untied causal-LM head whose matrix the checkpoint holds
    (`lm_head.weight` in every family). Other untied heads have a tensor of their own whose name
    only the model knows."""
    if getattr(config, "tie_word_embeddings", True) is not False or auto_class == "AutoModel":
        return True
    return auto_class == "AutoModelForCausalLM" and "lm_head.weight" in weights.tensors


def _plan_from_headers(
    family: Family, auto_class: str, config, settings: dict, weights: SourceWeights, generator: np.random.Generator,
    dtype: str,
) -> _Plan | None:
    """The plan of a checkpoint saved by the class the result declares, from its tensor headers
    and the family table, without building a model. Each stack's layers must be numbered 0..n-1
    with n the config's count and hold the same tensors as layer 0 (names, shapes, dtypes), every
    matrix must have the config's hidden size, and every tensor must be a float one; the tensors
    outside the layers are taken as the class saved them (its head tied to the embeddings or held
    by the checkpoint, which the caller checks: _headers_know_the_head). The adapters are drawn in the order the model's modules have them. None
    where the headers do not settle this: the caller then builds the models, which name what is
    missing or mismatched. Needs neither torch nor transformers (`config` may be a ConfigJSON)."""
    import re

    prefix = layer_prefix(weights.tensors, family)
    if prefix is None:
        return None
    if any(info.dtype not in FLOAT_DTYPES for info in weights.tensors.values()):
        return None  # integer tensors are buffers older versions saved (BERT's position_ids): not parameters
    variant, hidden = VARIANTS[settings["variant"]], getattr(config, "hidden_size", None)
    if not isinstance(hidden, int):
        return None
    layer_counts = []
    for stack in family.stacks:
        expected = getattr(config, f"{stack.name}_layers" if stack.name else "num_hidden_layers", None)
        pattern = re.compile(re.escape(prefix + stack.layers) + r"\.(\d+)\.(.+)")
        layers: dict[int, dict[str, tuple]] = {}
        for key, info in weights.tensors.items():
            if match := pattern.fullmatch(key):
                layers.setdefault(int(match[1]), {})[match[2]] = (info.shape, info.dtype)
        if not isinstance(expected, int) or sorted(layers) != list(range(expected)):
            return None
        if any(layers[i] != layers[0] for i in layers):
            return None
        if any(len(shape) == 2 and hidden not in shape for shape, _ in layers[0].values()):
            return None
        layer_counts.append(expected)

    # as MeftLayers.unreachable_adapters: with the PLM stream returned, the top layer's adapter
    # block that writes the dropped stream (MEFT1's G, MEFT2's F) stays frozen
    dropped = variant.G if variant.plm_stream == 1 else variant.F
    frozen_block = config.output_stream == "plm" and variant.swap and dropped == "adapter"
    adapters, frozen = {}, 0
    for stack, count in zip(family.stacks, layer_counts):
        for index in range(count):
            for name in variant.adapters:
                drawn = draw_adapter(generator, hidden, config.adapter_dim, config.adapter_init, config.adapter_init_std)
                adapters.update({f"{prefix}{stack.layers}.{index}.meft.{name}.{key}": t for key, t in drawn.items()})
                if frozen_block and index == count - 1 and name == "coupling":
                    frozen += sum(t.size for t in drawn.values())
    overlap = sorted(set(adapters) & set(weights.tensors))
    if overlap:
        return None

    def numel(shape) -> int:
        count = 1
        for dim in shape:
            count *= dim
        return count

    head = family.head_for(auto_class)
    head_size = sum(
        numel(info.shape)
        for key, info in weights.tensors.items()
        if any(key.startswith(module + ".") for module in head.trainable)
    )
    adapter_size = sum(t.size for t in adapters.values())
    total = sum(numel(info.shape) for info in weights.tensors.values()) + adapter_size
    return _Plan(family, config, adapters, dtype, [], [], adapter_size - frozen + head_size, total)


def _plan_without_torch(options: ConvertOptions, settings: dict, raw_config: dict, weights: SourceWeights) -> _Plan | None:
    """The plan of a conversion that needs no model, made without importing torch or
    transformers: no verification, nothing for calibration to measure (MeftSettings.measured),
    headers that suffice (_plan_from_headers), and an original config.json that this
    transformers version wrote, which its round trip (from_pretrained, then save_pretrained)
    gives back unchanged: the MEFT config.json is then its entries plus the MEFT ones, as
    meft_config() adds them. None otherwise, and wherever something is wrong: the plan made with
    torch and transformers (_plan) then decides, and names what is wrong."""
    if options.verify or options.num_labels is not None or "quantization_config" in raw_config:
        return None
    family = family_for(raw_config["model_type"])
    dtype = layer_dtype(family, weights.tensors)
    if options.measured(sixteen_bit=dtype in ("F16", "BF16")):
        return None
    resolved = options.unmeasured()
    try:
        if resolved is not None:
            settings = options.meft_settings(resolved)
        auto_class, library_class = _architecture(family, raw_config.get("architectures"), options.task, weights.tensors)
        config = ConfigJSON(_plm_values(raw_config, settings))
        transformers_version = metadata.version("transformers")
    except (BadInputError, metadata.PackageNotFoundError):
        return None
    # the layer count as config.json names it (GPT-2's n_layer, for one, is known to its config class)
    layers = raw_config.get("num_hidden_layers")
    if (
        raw_config.get("transformers_version") != transformers_version
        or not isinstance(layers, int)
        or (settings["reversible_layers"] or 0) > layers
        or library_class not in (raw_config.get("architectures") or [])
        or family.unsupported(config)
        or not _headers_know_the_head(config, auto_class, weights)
    ):
        return None
    config.update(settings)
    config.update(_meft_entries(family, auto_class, library_class, weights.tensors, base_model_name(options.model, options.revision)))
    config.update(model_type="meft_" + family.model_type, transformers_version=transformers_version)
    if resolved is not None:
        config.meft_calibration = resolved["calibration"]
    return _plan_from_headers(family, auto_class, config, settings, weights, adapter_generator(options.seed), dtype)


def record_provenance(config) -> dict[str, bytes]:
    """Records in `config` this version and the sha256 of each code file a MEFT checkpoint
    holds (templates/); returns the files' bytes."""
    templates = resources.files("meft_convert.templates")
    code = {name: templates.joinpath(name).read_bytes() for name in TEMPLATE_FILES}
    for key, value in provenance(code).items():
        setattr(config, key, value)
    return code


def _card_facts(options: ConvertOptions, plan: _Plan, source: Path):
    """What the model card states but the verification report, which convert() adds once it has one."""
    from .card import CardFacts, base_model_license

    config = plan.config
    library_class = config.architectures[0].removeprefix("Meft")
    auto_class = plan.family.auto_class_of(library_class) or "AutoModel"
    name, from_hub = base_model_name(options.model, options.revision)
    return CardFacts(
        name=options.push_to_hub or Path(options.output).name,
        source=name,
        base_model=options.model if from_hub else None,
        license=base_model_license(source),
        auto_class=auto_class,
        model_type=plan.family.model_type,
        settings=config.meft_settings(),
        num_layers=config.num_hidden_layers,
        trainable=plan.trainable,
        total=plan.total,
        report=None,
        calibration=getattr(config, "meft_calibration", None),
        plm_config=read_config_json(source),
        dtype={"F32": "fp32", "F16": "fp16", "BF16": "bf16"}.get(plan.adapter_dtype),
    )


def _use_umask(folder: Path) -> None:
    """mkdtemp and some writers create private files; give the result the usual permissions."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)


def _publish(tmp: Path, output: Path) -> None:
    """Moves the finished folder into place; an existing one (with --force) is replaced only
    once the new one is complete."""
    if output.exists():
        backup = output.with_name(f".{output.name}.replaced-{uuid.uuid4().hex[:8]}")
        output.rename(backup)
        try:
            tmp.rename(output)
        except BaseException:
            backup.rename(output)
            raise
        shutil.rmtree(backup) if backup.is_dir() else backup.unlink()
    else:
        tmp.rename(output)


def _refuse_without_bitsandbytes(options: ConvertOptions, raw_config: dict, weights: SourceWeights) -> None:
    """A checkpoint published in 4 bits runs only through bitsandbytes: calibration and verification need it."""
    import importlib.util

    if "quantization_config" not in raw_config or importlib.util.find_spec("bitsandbytes") is not None:
        return
    family = family_for(raw_config["model_type"])
    runs = options.verify or options.measured(sixteen_bit=layer_dtype(family, weights.tensors) in ("F16", "BF16"))
    if runs:
        raise BadInputError(
            "this checkpoint is stored in 4 bits, which only bitsandbytes computes with, and conversion runs it to "
            "calibrate and verify: pip install 'meft-convert[bnb]' (or give every setting and --no-verify)"
        )


def _checked_settings(options: ConvertOptions, log: Callable[[str], None]) -> dict:
    settings = options.meft_settings()
    if settings["variant"] == "meft2" and settings["lambda_"] < 1:
        log(
            "warning: in MEFT2, lambda scales the stream its PLM layers read (y1 = lambda*x1 + adapter(x2)); "
            "below 1 the pretrained model's output is lost at the start. Keep lambda=1 and make beta small."
        )
    return settings


def convert(options: ConvertOptions, log: Callable[[str], None] = print) -> Path:
    """Converts `options.model` and returns the output folder. Raises BadInputError for
    unusable input and MeftConvertError if conversion or verification fails; either way
    nothing is left behind, and an existing output is never touched unless it is replaced."""
    # a hub model downloads only once its settings are known to be valid; a local folder's
    # shards start copying first, and the settings (which load torch) are checked meanwhile
    local = Path(options.model).expanduser().is_dir()
    settings = None if local else _checked_settings(options, log)
    output = Path(options.output).expanduser().absolute()
    if output.exists() and not options.force:
        raise BadInputError(f"{output} already exists; pass --force to replace it")
    if output.exists() and not output.is_dir():
        raise BadInputError(f"{output} exists and is not a folder")
    clean_stale_partials(output, log)
    source = resolve_model(options.model, options.revision, token=options.token)
    read_config_json(source)
    weights = find_weights(source)

    created = [p for p in reversed(output.parents) if not p.exists()]
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".partial", dir=output.parent))
    copy = None
    try:
        mark_partial(tmp, output)  # so that a run after this one, if it is killed, can clean up
        _use_umask(tmp)
        # the kernel copies the shards while torch and transformers load and the plan is made
        copy = ShardCopy(weights, tmp, show_progress=options.show_progress, link=options.link).start()
        if settings is None:
            settings = _checked_settings(options, log)
        raw_config = _read_config(source)
        _refuse_without_bitsandbytes(options, raw_config, weights)
        plan = _plan_without_torch(options, settings, raw_config, weights)
        if plan is None:
            plan = _plan(options, settings, source, raw_config, weights)
            from .calibrate import calibrate_plan  # loads torch and transformers

            resolved = calibrate_plan(options, plan, source, weights, log)
            if resolved is not None:  # the settings `auto` stood for, measured on the model
                plan = _plan(options, options.meft_settings(resolved), source, raw_config, weights)
                plan.config.meft_calibration = resolved["calibration"]
        # the card's facts (its modules, the original's license) are gathered while the shards
        # are still being copied
        card_facts = _card_facts(options, plan, source)
        write_weights(weights, plan.adapters, plan.adapter_dtype, tmp, copy=copy)
        code = record_provenance(plan.config)
        plan.config.save_pretrained(tmp)
        for name, data in code.items():
            (tmp / name).write_bytes(data)
        copy_if_present(source, tmp, EXTRA_FILES)
        report = None
        if options.verify:
            log("Verifying the converted model against the original ...")
            report = verify_conversion(
                source, tmp, model_name=base_model_name(options.model, options.revision)[0], seed=options.seed, share_plm=True,
                allow_low_fidelity=options.allow_low_fidelity,
            )
            report.save(tmp)
            if not report.passed:
                raise VerificationError(f"verification failed: {'; '.join(report.problems)}", report)
        card_facts.report = report
        (tmp / "README.md").write_text(model_card(card_facts))
        unmark_partial(tmp)
        _use_umask(tmp)
        _publish(tmp, output)
    except BaseException:
        if copy is not None:
            copy.cancel()
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in reversed(created):
            shutil.rmtree(folder, ignore_errors=True)
        raise
    if report is not None:
        log(report.to_text())
    for name in plan.missing:
        log(f"note: {name} is not in the checkpoint; it is initialised when the model loads")
    if plan.unexpected:
        shown = ", ".join(plan.unexpected[:5]) + (" ..." if len(plan.unexpected) > 5 else "")
        log(f"note: {len(plan.unexpected)} tensors of the checkpoint are not used by the model and were kept as they are: {shown}")
    if options.push_to_hub:
        log(f"Pushing {output} to {options.push_to_hub} ...")
        url = push_to_hub(
            output,
            options.push_to_hub,
            private=options.private,
            revision=options.push_revision,
            commit_message=options.commit_message,
            token=options.token,
        )
        log(f"Pushed to {url}")
    return output


# the options --help lists first; the others follow in the order of their fields (MeftSettings' first)
_FIRST_OPTIONS = ("model", "output", "variant", "task", "num_labels")


def option_fields() -> list:
    """The fields the CLI turns into options, in order."""
    shown = [f for f in fields(ConvertOptions) if f.metadata.get("cli", True)]
    return sorted(shown, key=lambda f: _FIRST_OPTIONS.index(f.name) if f.name in _FIRST_OPTIONS else len(_FIRST_OPTIONS))

