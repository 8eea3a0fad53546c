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
from importlib import resources
from pathlib import Path
from typing import Callable

import torch
import transformers

from .calibrate import calibrate_plan
from .card import CardFacts, base_model_license, model_card
from .errors import BadInputError, VerificationError
from .hub import push_to_hub, resolve_model
from .provenance import provenance
from .templates.adapters import MeftAdapter
from .templates.configuration_meft import auto_map_for, config_class_for, validate_meft_settings
from .templates.families import Family, family_for
from .templates.modeling_meft import model_class_for
from .verify import quiet_transformers, verify_conversion
from .weights import SourceWeights, copy_if_present, find_weights, write_weights

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
    "configuration_meft.py", "modeling_meft.py", "families.py", "reversible.py", "adapters.py", "losses.py"
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


def _option(help: str, **extra) -> dict:
    return {"help": help, **extra}


@dataclass
class ConvertOptions:
    """Everything a conversion takes. The CLI builds one option per field from this table."""

    model: str = field(
        metadata=_option(
            "A local folder, or a Hugging Face model id (e.g. facebook/opt-1.3b) resolved through the "
            "Hugging Face cache; with HF_HUB_OFFLINE=1 only the cache is used.",
            argument=True,
        )
    )
    output: Path = field(metadata=_option("Folder to write the converted checkpoint to.", flags=("-o", "--output")))
    variant: str = field(
        default="meft3",
        metadata=_option(
            "meft1: F = PLM layer, G = adapter (λ=0.1, β=1). meft2: F = adapter, G = PLM layer (λ=1, β=0.1). "
            "meft3: F = attention block, G = MLP block (λ=β=0.1).",
            choices=("meft1", "meft2", "meft3"),
        ),
    )
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
    adapter_dim: int = field(default=8, metadata=_option("Bottleneck width r of the adapters (d → r → d)."))
    lambda_: float | str | None = field(
        default="auto",
        metadata=_option(
            "Scale λ of stream x1. auto: measured at conversion, the largest 2^-k that keeps the starting point "
            "(MEFT1 and MEFT3; 1 in MEFT2). Or a value used as given; exact mode needs 1/m: 0.1, 1/1024, 2^-10.",
            flags=("--lambda",),
            scale=True,
        ),
    )
    beta: float | str | None = field(
        default="auto",
        metadata=_option("Scale β of stream x2 (auto: measured, in MEFT2 and MEFT3; 1 in MEFT1); like --lambda.", scale=True),
    )
    init_std: float = field(default=0.02, metadata=_option("σ of the adapters' N(0, σ²) initialisation."))
    adapter_init: str = field(
        default="auto",
        metadata=_option(
            "paper: both projections N(0, σ²). zero: the up-projection starts at zero, so adapters output exactly 0. "
            "auto: zero, which keeps the starting point exactly; the paper init's cost is measured and reported.",
            choices=("auto", "paper", "zero"),
        ),
    )
    stream_bits: str = field(
        default="auto",
        metadata=_option(
            "Width of the exact streams' integers. auto: 32 for fp16/bf16 checkpoints (fractional bits from the "
            "hidden-state range measured at conversion, with a 16x margin), 64 for float32 (32 fractional bits).",
            choices=("auto", "32", "64"),
        ),
    )
    allow_low_fidelity: bool = field(
        default=False,
        metadata=_option(
            "Keep a conversion whose verification misses the starting-point target or, in float mode, the "
            "reconstruction and gradient bounds; the model card states what was lost.",
            flag_only=True,
        ),
    )
    reversible_layers: int | None = field(
        default=None,
        metadata=_option("Only the lowest K layers recompute activations; the rest store them (default: all).", metavar="K"),
    )
    output_stream: str = field(
        default="plm",
        metadata=_option(
            "plm: return the stream that follows the pretrained layers (best starting point). "
            "mean: the paper's (x1 + x2) / 2.",
            choices=("plm", "mean"),
        ),
    )
    exact: bool = field(
        default=True,
        metadata=_option("Exact fixed-point reconstruction (default), or the paper's approximate float one."),
    )
    revision: str | None = field(default=None, metadata=_option("Branch, tag or commit of a hub model."))
    seed: int = field(default=0, metadata=_option("Seed of the adapters' initialisation."))
    force: bool = field(default=False, metadata=_option("Replace the output folder if it exists.", flag_only=True))
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

    def requested(self) -> dict:
        """The settings calibration decides, as given: "auto" or a value (None counts as auto)."""
        values = {"lambda_": self.lambda_, "beta": self.beta, "adapter_init": self.adapter_init, "stream_bits": self.stream_bits}
        return {key: "auto" if value is None else value for key, value in values.items()}

    def meft_settings(self, resolved: dict | None = None) -> dict:
        """The MEFT settings; `auto` ones take `resolved` (calibration's choice) or, before
        calibration, a stand-in that passes the checks."""
        requested = {**self.requested(), **(resolved or {})}
        scaled = {"meft1": ("lambda_",), "meft2": ("beta",)}.get(self.variant, ("lambda_", "beta"))
        scales = {
            key: (2.0**-10 if key in scaled else 1.0) if requested[key] == "auto" else requested[key] for key in ("lambda_", "beta")
        }
        stream_bits = 64 if requested["stream_bits"] == "auto" else int(requested["stream_bits"])
        try:
            return validate_meft_settings(
                variant=self.variant,
                lambda_=scales["lambda_"],
                beta=scales["beta"],
                adapter_dim=self.adapter_dim,
                adapter_init="zero" if requested["adapter_init"] == "auto" else requested["adapter_init"],
                adapter_init_std=self.init_std,
                reversible_layers=self.reversible_layers,
                output_stream=self.output_stream,
                exact=self.exact,
                stream_bits=stream_bits,
                frac_bits=resolved.get("frac_bits", 32) if resolved else (32 if stream_bits == 64 else 16),
            )
        except ValueError as e:
            raise BadInputError(str(e)) from None


@dataclass
class _Plan:
    """What will be written, decided before anything is."""

    family: Family
    config: transformers.PretrainedConfig
    adapters: dict[str, torch.Tensor]
    missing: list[str]  # tensors the model has but the checkpoint lacks (initialised on load)
    unexpected: list[str]  # tensors the checkpoint has but the model does not use (kept)
    trainable: int  # parameters that train (adapters, a new head) ...
    total: int  # ... of all the model's parameters


def read_config_json(folder: Path) -> dict:
    """A checkpoint's config.json as a dict; BadInputError if it is missing or not JSON."""
    path = folder / "config.json"
    if not path.is_file():
        raise BadInputError(f"{folder} has no config.json")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadInputError(f"{path} is not valid JSON ({e})") from None


def _read_config(folder: Path) -> dict:
    config = read_config_json(folder)
    model_type = config.get("model_type")
    if isinstance(model_type, str) and model_type.startswith("meft_"):
        raise BadInputError(f"{folder} is already a MEFT checkpoint ({model_type})")
    try:
        family_for(model_type)
    except ValueError as e:
        raise BadInputError(str(e)) from None
    return config


def _layer_prefix(keys, family: Family) -> str | None:
    """The part of the tensor names before the layer list, e.g. 'model.' in
    'model.decoder.layers.0.fc1.weight' (checkpoints differ in whether they carry it)."""
    marker = family.stacks[0].layers + ".0."
    for key in keys:
        start = key.find(marker)
        if start == 0 or (start > 0 and key[start - 1] == "."):
            return key[:start]
    return None


def _architecture(family: Family, declared: list[str] | None, task: str | None, keys) -> tuple[str, str]:
    """(auto class, library class) the result declares: the task's, or the original's if MEFT has it."""
    if task is not None:
        head = family.heads.get(TASKS[task])
        if head is None:
            available = ", ".join(t for t, auto in TASKS.items() if auto in family.heads)
            raise BadInputError(f"{family.model_type} models have no {task} head; their tasks: {available}")
        if head.requires_keys and not any(head.requires_keys in k for k in keys):
            raise BadInputError(f"the checkpoint has no pretrained {task} head ({head.requires_keys}*) to keep")
        return TASKS[task], head.library_class
    for name in declared or []:
        for auto_class, head in family.heads.items():
            if head.library_class == name:
                return auto_class, name
    return "AutoModel", family.heads["AutoModel"].library_class


def _plan(options: ConvertOptions, settings: dict, source: Path, raw_config: dict, weights: SourceWeights) -> _Plan:
    family = family_for(raw_config["model_type"])
    with quiet_transformers():
        plm_config = transformers.AutoConfig.from_pretrained(source)
    reason = family.unsupported(plm_config)
    if reason:
        raise BadInputError(reason)
    if options.num_labels is not None:
        if options.num_labels < 1:
            raise BadInputError(f"--num-labels must be at least 1, got {options.num_labels}")
        plm_config.num_labels = options.num_labels
    auto_class, library_class = _architecture(family, plm_config.architectures, options.task, weights.tensors)
    heads = [a for a, h in family.heads.items() if h.requires_keys is None or any(h.requires_keys in k for k in weights.tensors)]
    if auto_class not in heads:
        heads.append(auto_class)

    values = plm_config.to_dict()
    for key in ("model_type", "transformers_version", "architectures", "auto_map", "_name_or_path"):
        values.pop(key, None)
    clash = sorted(set(values) & set(settings))
    if clash:
        raise BadInputError(f"the model's config already has keys MEFT uses: {clash}")
    for key in values:
        if key.endswith("layerdrop"):
            values[key] = 0.0  # dropping a layer would skip the whole reversible stack
    config_class = config_class_for(family)
    try:
        config = config_class(**values, **settings)
    except ValueError as e:
        raise BadInputError(str(e)) from None
    config.architectures = ["Meft" + library_class]
    config.auto_map = auto_map_for(family, heads)
    config.meft_base_model = options.model if options.revision is None else f"{options.model}@{options.revision}"

    # the tensors MEFT adds and the shapes it expects, read off models built on the meta device
    with torch.device("meta"), quiet_transformers():
        library_model = getattr(transformers, library_class)(plm_config)
        meft_model = model_class_for(family, auto_class)(config)
    library_keys = library_model.state_dict()
    meft_keys = meft_model.state_dict()
    class_prefix = _layer_prefix(library_keys, family)
    file_prefix = _layer_prefix(weights.tensors, family)
    if class_prefix is None or file_prefix is None:
        raise BadInputError(
            f"the checkpoint's tensors do not contain the {family.model_type} layers ({family.stacks[0].layers}.0.*)"
        )

    def file_name(key: str) -> str:
        return file_prefix + key[len(class_prefix) :] if key.startswith(class_prefix) else key

    mismatched = []
    for key, tensor in library_keys.items():
        info = weights.tensors.get(file_name(key))
        if info is not None and tuple(info.shape) != tuple(tensor.shape):
            mismatched.append(f"{file_name(key)}: checkpoint {tuple(info.shape)}, config {tuple(tensor.shape)}")
    if mismatched:
        raise BadInputError("tensor shapes do not match the config: " + "; ".join(mismatched[:3]))
    mapped = {file_name(k) for k in library_keys}
    missing = sorted(mapped - set(weights.tensors))
    unexpected = sorted(set(weights.tensors) - mapped)

    layer0 = file_prefix + family.stacks[0].layers + ".0."
    float_dtypes = [
        info.dtype for key, info in weights.tensors.items() if key.startswith(layer0) and info.dtype in ("F32", "F16", "BF16", "F64")
    ]
    dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}[
        float_dtypes[0] if float_dtypes else "F32"
    ]
    generator = torch.Generator().manual_seed(options.seed)
    adapters = {}
    for name, module in meft_model.named_modules():
        if isinstance(module, MeftAdapter):
            module.to_empty(device="cpu")
            module.reset_parameters(generator)
            for param_name, param in module.named_parameters():
                adapters[file_name(f"{name}.{param_name}")] = param.detach().to(dtype).contiguous()
    added = {file_name(k) for k in meft_keys} - mapped
    if set(adapters) != added:
        raise RuntimeError(f"adapter tensors {sorted(set(adapters) ^ added)[:3]} do not match the MEFT model")
    trainable, total = meft_model.get_nb_trainable_parameters()
    return _Plan(family, config, adapters, missing, unexpected, trainable, total)


def _card_facts(options: ConvertOptions, plan: _Plan, source: Path, report) -> CardFacts:
    config = plan.config
    library_class = config.architectures[0].removeprefix("Meft")
    auto_class = next((a for a, head in plan.family.heads.items() if head.library_class == library_class), "AutoModel")
    from_hub = not Path(options.model).expanduser().exists()
    return CardFacts(
        name=options.push_to_hub or Path(options.output).name,
        source=options.model,
        base_model=options.model if from_hub else None,
        license=base_model_license(source),
        auto_class=auto_class,
        model_type=plan.family.model_type,
        settings=config.meft_settings(),
        num_layers=config.num_hidden_layers,
        trainable=plan.trainable,
        total=plan.total,
        report=report,
        calibration=getattr(config, "meft_calibration", None),
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


def convert(options: ConvertOptions, log: Callable[[str], None] = print) -> Path:
    """Converts `options.model` and returns the output folder. Raises BadInputError for
    unusable input (before anything is written) and MeftConvertError if conversion or
    verification fails (nothing is left behind)."""
    settings = options.meft_settings()
    if settings["variant"] == "meft2" and settings["lambda_"] < 1:
        log(
            "warning: in MEFT2, lambda scales the stream its PLM layers read (y1 = lambda*x1 + adapter(x2)); "
            "below 1 the pretrained model's output is lost at the start. Keep lambda=1 and make beta small."
        )
    output = Path(options.output).expanduser().absolute()
    if output.exists() and not options.force:
        raise BadInputError(f"{output} already exists; pass --force to replace it")
    if output.exists() and not output.is_dir():
        raise BadInputError(f"{output} exists and is not a folder")
    source = resolve_model(options.model, options.revision, token=options.token)
    raw_config = _read_config(source)
    weights = find_weights(source)
    plan = _plan(options, settings, source, raw_config, weights)
    resolved = calibrate_plan(options, plan, source, weights, log)
    if resolved is not None:  # the settings `auto` stood for, measured on the model
        plan = _plan(options, options.meft_settings(resolved), source, raw_config, weights)
        plan.config.meft_calibration = resolved["calibration"]

    created = [p for p in reversed(output.parents) if not p.exists()]
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".partial", dir=output.parent))
    try:
        _use_umask(tmp)
        write_weights(weights, plan.adapters, tmp, show_progress=options.show_progress)
        templates = resources.files("meft_convert.templates")
        code = {name: templates.joinpath(name).read_bytes() for name in TEMPLATE_FILES}
        for key, value in provenance(code).items():
            setattr(plan.config, key, value)
        plan.config.save_pretrained(tmp)
        for name, data in code.items():
            (tmp / name).write_bytes(data)
        copy_if_present(source, tmp, EXTRA_FILES)
        report = None
        if options.verify:
            log("Verifying the converted model against the original ...")
            report = verify_conversion(
                source, tmp, model_name=options.model, seed=options.seed, share_plm=True,
                allow_low_fidelity=options.allow_low_fidelity,
            )
            report.save(tmp)
            if not report.passed:
                raise VerificationError(f"verification failed: {'; '.join(report.problems)}", report)
        (tmp / "README.md").write_text(model_card(_card_facts(options, plan, source, report)))
        _use_umask(tmp)
        _publish(tmp, output)
    except BaseException:
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


def option_fields() -> list:
    """The fields the CLI turns into options, in order."""
    return [f for f in fields(ConvertOptions) if f.metadata.get("cli", True)]

