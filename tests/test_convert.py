"""convert() over a table of checkpoints: what is written, and what is refused."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from huggingface_hub import ModelCard
from safetensors import safe_open
from safetensors.torch import save_file

from meft_convert import convert as convert_module
from meft_convert import weights as weights_module
from meft_convert.convert import TEMPLATE_FILES, ConvertOptions, convert
from meft_convert.errors import BadInputError, VerificationError
from meft_convert.weights import find_weights
from tests.conftest import source

VARIANTS = ["meft1", "meft2", "meft3"]
CHECKPOINTS = ["minilm", "bert", "roberta", "bart", "opt-125m", "opt-350m", "llama", "mistral", "qwen2", "gpt2"]
MODEL_TYPES = {"minilm": "bert", "bert": "bert", "roberta": "roberta", "bart": "bart", "opt-125m": "opt", "opt-350m": "opt",
               "llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "gpt2": "gpt2"}
CLS, QA, MLM = "AutoModelForSequenceClassification", "AutoModelForQuestionAnswering", "AutoModelForMaskedLM"
HEADS = {"minilm": {CLS, QA}, "bert": {CLS, QA, MLM}, "roberta": {CLS, QA, MLM}, "bart": {"AutoModelForSeq2SeqLM", CLS, QA}}
DECODER_HEADS = {"AutoModelForCausalLM", CLS}
ARCHITECTURES = {"minilm": "MeftBertModel", "bert": "MeftBertForMaskedLM", "roberta": "MeftRobertaForMaskedLM",
                 "bart": "MeftBartModel", "opt-125m": "MeftOPTForCausalLM", "opt-350m": "MeftOPTForCausalLM",
                 "llama": "MeftLlamaForCausalLM", "mistral": "MeftMistralForCausalLM", "qwen2": "MeftQwen2ForCausalLM",
                 "gpt2": "MeftGPT2LMHeadModel"}


def tensors_of(folder: Path) -> dict[str, torch.Tensor]:
    result = {}
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            result.update({k: f.get_tensor(k) for k in f.keys()})
    return result


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", CHECKPOINTS)
def test_conversion_writes_a_verified_checkpoint(name, variant, converted, tiny_checkpoints, minilm):
    out, report = converted(name, variant)
    assert report["passed"], report["problems"]
    assert sum(r["differing_elements"] for r in report["reconstruction"]) == 0
    assert report["gradients"]["bitwise_equal"] == report["gradients"]["tensors"] > 0
    assert 0 < report["fidelity"]["cosine_min"] <= report["fidelity"]["cosine_mean"] <= 1

    original, written = tensors_of(source(name, tiny_checkpoints, minilm)), tensors_of(out)
    for key, tensor in original.items():  # every original tensor: same name, dtype, shape and bytes
        assert written[key].dtype == tensor.dtype and written[key].shape == tensor.shape
        assert torch.equal(written[key].view(torch.uint8), tensor.view(torch.uint8)), key
    added = set(written) - set(original)
    adapters = {"meft1": ("ffn", "coupling"), "meft2": ("coupling", "ffn"), "meft3": ("attn", "ffn")}[variant]
    config = transformers.AutoConfig.from_pretrained(out, trust_remote_code=True)
    layers = config.encoder_layers + config.decoder_layers if name == "bart" else config.num_hidden_layers
    assert len(added) == layers * len(adapters) * 4 and all(".meft." in key for key in added)
    assert {key.split(".meft.")[1].split(".")[0] for key in added} == set(adapters)
    plm_dtype = next(t.dtype for k, t in original.items() if ".0." in k and t.is_floating_point())
    assert all(written[key].dtype == plm_dtype for key in added)

    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "meft_" + MODEL_TYPES[name]
    assert config["variant"] == variant and config["exact"] is True and config["output_stream"] == "plm"
    assert set(config["auto_map"]) >= {"AutoConfig", "AutoModel"}
    expected_heads = HEADS.get(name, DECODER_HEADS)
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModel"} | expected_heads
    assert config["architectures"] == [ARCHITECTURES[name]]
    for file in TEMPLATE_FILES:
        assert (out / file).read_bytes() == (Path(convert_module.__file__).parent.parent / "templates" / file).read_bytes()
    if name in ("minilm", "bert"):
        assert (out / "tokenizer.json").is_file() and (out / "vocab.txt").is_file()
    if name == "bart":  # both stacks are reversible and were rebuilt exactly
        assert {r["layer"].split()[0] for r in report["reconstruction"]} == {"encoder", "decoder"}
    assert "trust_remote_code=True" in (out / "README.md").read_text()
    assert not list(out.parent.glob(".*partial"))


def test_adapter_initialisation_is_seeded_and_zero_init_is_zero(tiny_checkpoints, tmp_path):
    base = dict(model=str(tiny_checkpoints["bert"]), verify=False, show_progress=False)
    a = convert(ConvertOptions(output=tmp_path / "a", seed=1, adapter_init="paper", **base), log=lambda _: None)
    b = convert(ConvertOptions(output=tmp_path / "b", seed=1, adapter_init="paper", **base), log=lambda _: None)
    c = convert(ConvertOptions(output=tmp_path / "c", seed=2, adapter_init="paper", **base), log=lambda _: None)
    z = convert(ConvertOptions(output=tmp_path / "z", adapter_init="zero", init_std=0.5, **base), log=lambda _: None)
    ta, tb, tc, tz = (tensors_of(x) for x in (a, b, c, z))
    key = "bert.encoder.layer.0.meft.ffn.down_proj.weight"
    assert torch.equal(ta[key], tb[key]) and not torch.equal(ta[key], tc[key])
    assert abs(ta[key].std().item() - 0.02) < 0.005 and abs(tz[key].std().item() - 0.5) < 0.1
    ups = [k for k in tz if ".up_proj." in k]
    assert ups and all(torch.count_nonzero(tz[k]) == 0 for k in ups)
    assert all(torch.count_nonzero(tz[k]) == 0 for k in tz if k.endswith("down_proj.bias"))


def test_settings_are_recorded(tiny_checkpoints, tmp_path):
    out = convert(
        ConvertOptions(
            model=str(tiny_checkpoints["opt-125m"]), output=tmp_path / "o", variant="meft1", lambda_=2**-10, beta=1 / 64,
            adapter_dim=4, reversible_layers=1, output_stream="mean", verify=True, show_progress=False,
        ),
        log=lambda _: None,
    )
    config = json.loads((out / "config.json").read_text())
    assert (config["lambda_"], config["beta"], config["adapter_dim"], config["reversible_layers"], config["output_stream"]) == (
        2**-10, 1 / 64, 4, 1, "mean")
    report = json.loads((out / "meft_report.json").read_text())
    assert report["passed"] and len(report["reconstruction"]) == 1  # only the lowest layer is reversible
    assert tensors_of(out)["model.decoder.layers.0.meft.coupling.down_proj.weight"].shape == (4, 32)


def test_float_mode_reports_its_reconstruction_error(tiny_checkpoints, tmp_path):
    """λ = β = 0.3 (not 1/m: float mode only) on an fp16 checkpoint, verified in fp16: the start
    is lost, and the float inverse rebuilds the input of layer 0 more than 0.1% off after two
    layers. --allow-low-fidelity keeps it, and the report names each loss with its figure."""
    out = convert(
        ConvertOptions(
            model=str(tiny_checkpoints["opt-125m"]), output=tmp_path / "f", exact=False, lambda_=0.3, beta=0.3,
            allow_low_fidelity=True, show_progress=False,
        ),
        log=lambda _: None,
    )
    report = json.loads((out / "meft_report.json").read_text())
    assert report["passed"] and report["settings"]["exact"] is False and report["dtype"] == "float16"
    errors = {r["layer"]: r["relative_error"] for r in report["reconstruction"]}
    assert set(errors) == {"layer 0", "layer 1"} and all(e > 0 for e in errors.values())
    losses = report["accepted_losses"]
    assert losses[0].startswith("the starting point is lost: next-token top-1 agreement")
    assert f"input of layer 0 with a relative error of {errors['layer 0']:.3e} (bound 0.001)" in losses[1]


# ------------------------------------------------------------------------ bad input


def _snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


def _fails(options: ConvertOptions, error=BadInputError, match: str | None = None) -> None:
    parent = Path(options.output).parent
    before = set(parent.iterdir()) if parent.exists() else None
    with pytest.raises(error, match=match):
        convert(options, log=lambda _: None)
    after = set(parent.iterdir()) if parent.exists() else None
    assert before == after  # nothing written next to the output either


def test_existing_output_is_never_touched_without_force(tiny_checkpoints, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    before = _snapshot(out)
    _fails(ConvertOptions(model=str(tiny_checkpoints["bert"]), output=out, show_progress=False), match="already exists")
    assert _snapshot(out) == before


def test_force_replaces_only_after_success(tiny_checkpoints, tmp_path, monkeypatch):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    options = ConvertOptions(model=str(tiny_checkpoints["bert"]), output=out, force=True, show_progress=False)

    def failing_verification(*args, **kwargs):
        raise VerificationError("simulated failure")

    monkeypatch.setattr(convert_module, "verify_conversion", failing_verification)
    _fails(options, VerificationError)
    assert (out / "notes.txt").read_text() == "precious"
    monkeypatch.undo()
    convert(options, log=lambda _: None)
    assert not (out / "notes.txt").exists() and (out / "config.json").is_file()


def test_interrupted_conversion_leaves_nothing(tiny_checkpoints, tmp_path, monkeypatch):
    original_copy = weights_module._copy_with_progress

    def interrupted(src, dst, progress):
        original_copy(src, dst, progress)
        raise KeyboardInterrupt

    monkeypatch.setattr(weights_module, "_copy_with_progress", interrupted)
    out = tmp_path / "new" / "deeper" / "out"
    with pytest.raises(KeyboardInterrupt):
        convert(ConvertOptions(model=str(tiny_checkpoints["bert"]), output=out, show_progress=False), log=lambda _: None)
    assert list(tmp_path.iterdir()) == []  # not even the parent folders it created


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(lambda_=0.3), r"lambda=0.3 is not 1/m"),
        (dict(beta=0.0), "beta must be a positive number"),
        (dict(lambda_=-0.1), "lambda must be a positive number"),
        (dict(adapter_dim=0), "adapter_dim must be a positive integer"),
        (dict(reversible_layers=3), "exceeds the model's 2 layers"),
        (dict(model="./no/such/folder"), "no such folder"),
        (dict(model="nobody/no-such-model"), "not found in the Hugging Face cache"),
    ],
)
def test_bad_options_are_refused_before_anything_is_written(tiny_checkpoints, tmp_path, change, match):
    options = ConvertOptions(**{"model": str(tiny_checkpoints["opt-125m"]), "output": tmp_path / "out", "show_progress": False, **change})
    _fails(options, match=match)


def test_unknown_model_type_lists_supported_types(tmp_path):
    folder = tmp_path / "neox"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt_neox"}))
    save_file({"w": torch.zeros(2)}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    _fails(ConvertOptions(model=str(folder), output=tmp_path / "out"),
           match="'gpt_neox' is not supported; supported: bart, bert, gpt2, llama, mistral, opt, qwen2, roberta")


def test_already_converted_checkpoint_is_refused(converted, tmp_path):
    out, _ = converted("bert", "meft3")
    _fails(ConvertOptions(model=str(out), output=tmp_path / "again"), match="already a MEFT checkpoint")


def _copy_checkpoint(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for file in src.iterdir():
        (dst / file.name).write_bytes(file.read_bytes())
    return dst


def test_shards_without_format_metadata_are_streamed_unchanged(tiny_checkpoints, tmp_path):
    # some exporters write no `format: pt` entry; the converter adds it without loading tensors
    folder = _copy_checkpoint(tiny_checkpoints["opt-125m"], tmp_path / "plain")
    original = tensors_of(folder)
    (folder / "model.safetensors").unlink()
    save_file(original, str(folder / "model.safetensors"))  # no metadata
    out = convert(ConvertOptions(model=str(folder), output=tmp_path / "out", show_progress=False), log=lambda _: None)
    shard = next(f for f in sorted(out.glob("model-*.safetensors")) if "embed_tokens" in str(safe_open(str(f), "pt").keys()))
    with safe_open(str(shard), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        for key in original:
            assert torch.equal(f.get_tensor(key).view(torch.uint8), original[key].view(torch.uint8)), key
    # the tensor bytes follow the new header byte for byte
    data_of = lambda path: path.read_bytes()[8 + int.from_bytes(path.read_bytes()[:8], "little"):]  # noqa: E731
    assert data_of(shard) == data_of(folder / "model.safetensors")


def test_corrupt_safetensors_is_refused(tiny_checkpoints, tmp_path):
    folder = _copy_checkpoint(tiny_checkpoints["bert"], tmp_path / "corrupt")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    _fails(ConvertOptions(model=str(folder), output=tmp_path / "out"), match="not a readable safetensors file")
    (folder / "model.safetensors").write_bytes(b"\x00" * 100)
    _fails(ConvertOptions(model=str(folder), output=tmp_path / "out"), match="not a readable safetensors file")


def _pickle_checkpoint(tiny_checkpoints, folder: Path) -> Path:
    _copy_checkpoint(tiny_checkpoints["opt-125m"], folder)
    state = tensors_of(folder)
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    return folder


def test_pickle_only_checkpoint_is_refused_with_how_to_convert_it(tiny_checkpoints, tmp_path):
    folder = _pickle_checkpoint(tiny_checkpoints, tmp_path / "bin")
    _fails(ConvertOptions(model=str(folder), output=tmp_path / "out"), match="has only pickle weights")
    _fails(ConvertOptions(model=str(folder), output=tmp_path / "out"), match=r"save_pretrained\(out\)` \(transformers 5 saves safetensors\)")
    (folder / "pytorch_model.bin").unlink()
    _fails(ConvertOptions(model=str(folder), output=tmp_path / "out"), match="reads safetensors only")


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_is_never_unpickled(tmp_path, tiny_checkpoints):
    folder = _pickle_checkpoint(tiny_checkpoints, tmp_path / "evil")
    marker = tmp_path / "code-ran"
    payload = _Payload()
    payload.marker = marker
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"x": payload}))
    _fails(ConvertOptions(model=str(folder), output=tmp_path / "out"), match="has only pickle weights")
    assert not marker.exists()


@pytest.mark.slow  # a subprocess with a hub cache: 15 s
def test_hub_id_through_an_offline_cache(tiny_checkpoints, tmp_path):
    """A model id resolves through a prepared Hugging Face cache with HF_HUB_OFFLINE=1."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--tiny-org--opt"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in tiny_checkpoints["opt-125m"].iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1")
    cli = [sys.executable, "-m", "meft_convert", "tiny-org/opt", "--no-verify"]
    ok = subprocess.run([*cli, "-o", str(tmp_path / "out")], env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["meft_base_model"] == "tiny-org/opt"
    assert ModelCard.load(tmp_path / "out" / "README.md").data.base_model == "tiny-org/opt"
    assert "Not verified at conversion" in (tmp_path / "out" / "README.md").read_text()
    pinned = subprocess.run([*cli, "--revision", commit, "-o", str(tmp_path / "pinned")], env=env, capture_output=True, text=True)
    assert pinned.returncode == 0, pinned.stderr
    missing = subprocess.run([*cli, "-o", str(tmp_path / "x")], env={**env, "HF_HUB_CACHE": str(tmp_path / "empty")}, capture_output=True, text=True)
    assert missing.returncode == 2 and "not found in the Hugging Face cache" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1 and not (tmp_path / "x").exists()


def test_sharded_checkpoints_keep_their_shards(tiny_checkpoints, tmp_path):
    import transformers

    sharded = tmp_path / "sharded"
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_checkpoints["opt-125m"])
    model.save_pretrained(sharded, max_shard_size="1MB")
    assert (sharded / "model.safetensors.index.json").is_file()
    n_shards = len(list(sharded.glob("*.safetensors")))
    out = convert(ConvertOptions(model=str(sharded), output=tmp_path / "out", show_progress=False), log=lambda _: None)
    assert len(list(out.glob("*.safetensors"))) == n_shards + 1
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors_of(out))
    assert json.loads((out / "meft_report.json").read_text())["passed"]
    (sharded / sorted(sharded.glob("*.safetensors"))[0].name).unlink()
    _fails(ConvertOptions(model=str(sharded), output=tmp_path / "out2"), match="is missing")


def test_meft2_with_a_small_lambda_is_warned_about(tiny_checkpoints, tmp_path):
    messages = []
    options = ConvertOptions(model=str(tiny_checkpoints["opt-125m"]), output=tmp_path / "o", variant="meft2",
                             lambda_=0.5, verify=False, show_progress=False)
    convert(options, log=messages.append)
    assert any(m.startswith("warning: in MEFT2, lambda scales") for m in messages)


@pytest.mark.parametrize(
    "name,task,architecture",
    [
        ("minilm", "sequence-classification", "MeftBertForSequenceClassification"),
        ("bert", "question-answering", "MeftBertForQuestionAnswering"),
        ("roberta", "base", "MeftRobertaModel"),
        ("bart", "seq2seq-lm", "MeftBartForConditionalGeneration"),
        ("opt-125m", "sequence-classification", "MeftOPTForSequenceClassification"),
    ],
)
def test_task_chooses_the_declared_head(name, task, architecture, tiny_checkpoints, minilm, tmp_path):
    options = ConvertOptions(model=str(source(name, tiny_checkpoints, minilm)), output=tmp_path / "o", task=task,
                             num_labels=5 if task == "sequence-classification" else None, show_progress=False)
    out = convert(options, log=lambda _: None)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [architecture]
    assert json.loads((out / "meft_report.json").read_text())["passed"]
    if task == "sequence-classification":
        model = transformers.AutoModelForSequenceClassification.from_pretrained(out, trust_remote_code=True)
        assert model.config.num_labels == 5
        trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad and ".meft." not in n}
        assert trainable == {"classifier" if name == "minilm" else "score"}


@pytest.mark.parametrize(
    "name,task,match",
    [
        ("opt-125m", "masked-lm", "opt models have no masked-lm head; their tasks: base, sequence-classification, causal-lm"),
        ("bert", "causal-lm", "bert models have no causal-lm head"),
        ("minilm", "masked-lm", r"the checkpoint has no pretrained masked-lm head \(cls.predictions.\*\)"),
    ],
)
def test_a_head_the_model_lacks_is_refused(name, task, match, tiny_checkpoints, minilm, tmp_path):
    _fails(ConvertOptions(model=str(source(name, tiny_checkpoints, minilm)), output=tmp_path / "o", task=task), match=match)


@pytest.mark.parametrize("name", ["opt-125m", "gpt2"])
def test_a_tied_head_is_not_noted_as_missing_an_untied_one_is(tiny_checkpoints, tmp_path, name):
    from tests.conftest import TINY, build_checkpoint, real_config

    logged = []
    convert(ConvertOptions(model=str(tiny_checkpoints[name]), output=tmp_path / "tied", verify=False, show_progress=False), log=logged.append)
    assert not any("not in the checkpoint" in line for line in logged), logged

    config_name, _, dtype, _ = TINY[name]
    untied = build_checkpoint(tmp_path / "untied", real_config(config_name, tie_word_embeddings=False), dtype)
    head = "lm_head.weight"
    with safe_open(str(untied / "model.safetensors"), framework="pt") as f:
        kept = {key: f.get_tensor(key) for key in f.keys() if key != head}
        assert len(kept) == len(list(f.keys())) - 1
    save_file(kept, str(untied / "model.safetensors"), metadata={"format": "pt"})
    logged = []
    convert(ConvertOptions(model=str(untied), output=tmp_path / "out", verify=False, show_progress=False), log=logged.append)
    assert f"note: {head} is not in the checkpoint; it is initialised when the model loads" in logged


def test_paths_are_accepted_where_strings_are(tiny_checkpoints, tmp_path):
    """The Python API takes pathlib.Path for the model (MiniLM's get_model_path() returns one)."""
    out = convert(ConvertOptions(model=Path(tiny_checkpoints["bert"]), output=str(tmp_path / "out"), verify=False, show_progress=False), log=lambda _: None)
    assert out == tmp_path / "out"
    config = json.loads((out / "config.json").read_text())
    assert isinstance(config["meft_base_model"], str) and config["meft_base_model"]


def _both_plans(folder: Path, variant: str, **options):
    """The plan read off the checkpoint's headers (--no-verify) and the one read off models built
    on the meta device (with verification), with whether the headers sufficed."""
    plans, from_headers = [], []
    original = convert_module._plan_from_headers

    def spy(*args, **kwargs):
        from_headers.append(original(*args, **kwargs))
        return from_headers[-1]

    for verify in (False, True):
        opts = ConvertOptions(model=str(folder), output=Path("unused"), variant=variant, verify=verify, **options)
        with pytest.MonkeyPatch.context() as m:
            m.setattr(convert_module, "_plan_from_headers", spy)
            plans.append(convert_module._plan(opts, opts.meft_settings(), folder, convert_module._read_config(folder), find_weights(folder)))
    return plans, from_headers


def _adapters_through_the_model(plan, seed: int) -> dict[str, torch.Tensor]:
    """The adapters as a MEFT model of the plan's config initialises them (the model classes,
    in their module order), named as in the checkpoint."""
    from meft_convert.templates.adapters import MeftAdapter, adapter_generator
    from meft_convert.templates.modeling_meft import model_class_for

    library_class = plan.config.architectures[0].removeprefix("Meft")
    auto_class = plan.family.auto_class_of(library_class)
    with torch.device("meta"):
        model = model_class_for(plan.family, auto_class)(plan.config)
    generator = adapter_generator(seed)
    expected = {}
    for name, module in model.named_modules():
        if isinstance(module, MeftAdapter):
            module.to_empty(device="cpu")
            module.reset_parameters(generator)
            for key, param in module.named_parameters():
                expected[f"{name}.{key}"] = param.detach()
    return expected


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_the_plan_from_headers_is_the_plan_from_models(tiny_checkpoints, minilm, name):
    """--no-verify builds no model: the same adapters (bit for bit, same seed), counts and config."""
    folder = source(name, tiny_checkpoints, minilm)
    for variant, extra in [("meft1", {}), ("meft2", {"seed": 3}), ("meft3", {"adapter_init": "zero", "output_stream": "mean"})]:
        (headers, models), from_headers = _both_plans(folder, variant, **extra)
        # the headers suffice, except for MiniLM's (an integer buffer, position_ids, that older
        # versions saved and the model does not use): only the model knows that tensor. Untied LM
        # heads (LLaMA's, Mistral's) hold their lm_head.weight
        assert from_headers == {"minilm": [None]}.get(name, [headers])
        assert sorted(headers.adapters) == sorted(models.adapters)
        assert headers.adapter_dtype == models.adapter_dtype
        expected = _adapters_through_the_model(models, extra.get("seed", 0))
        assert len(expected) == len(headers.adapters)
        for (key, values), (model_key, reference) in zip(headers.adapters.items(), expected.items()):
            assert model_key == key  # saved by the class the result declares: the same names
            assert values.dtype == models.adapters[key].dtype == np.float32 and np.array_equal(values, models.adapters[key]), key
            assert np.array_equal(values, reference.numpy()), key
        assert (headers.missing, headers.unexpected) == (models.missing, models.unexpected)
        assert (headers.trainable, headers.total) == (models.trainable, models.total)
        assert headers.config.to_dict() == models.config.to_dict()


def test_the_plan_falls_back_to_models_where_headers_do_not_tell(tiny_checkpoints, tmp_path):
    # a new head (--task): its tensors are not in the checkpoint, so only the model knows them
    (_, models), from_headers = _both_plans(tiny_checkpoints["opt-125m"], "meft3", task="sequence-classification")
    assert not from_headers and models.missing == ["score.weight"]
    # a layer that lacks a tensor: the models name it
    folder = _copy_checkpoint(tiny_checkpoints["opt-125m"], tmp_path / "holed")
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        kept = {k: f.get_tensor(k) for k in f.keys() if k != "model.decoder.layers.1.fc1.bias"}
    save_file(kept, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (headers, models), from_headers = _both_plans(folder, "meft3")
    assert from_headers == [None] and headers.missing == models.missing == ["model.decoder.layers.1.fc1.bias"]


# settings that need no model: given, not `auto` (measured on the model), and 64-bit streams
# (32-bit ones are sized from hidden states measured on it)
UNMEASURED = ["--lambda", "2^-10", "--beta", "2^-10", "--adapter-init", "zero", "--stream-bits", "64", "--no-verify"]
UNMEASURED_SETTINGS = dict(lambda_=2**-10, beta=2**-10, adapter_init="paper", stream_bits="64")


@pytest.mark.parametrize(
    "name,flags,heavy",
    [
        ("opt-125m", UNMEASURED, []),
        ("llama", UNMEASURED, []),  # bf16, its LM head untied
        ("llama", ["--variant", "meft1", "--no-exact", "--adapter-init", "paper", "--lambda", "1/8", "--beta", "1", "--no-verify"], []),
        # the control: 16-bit streams' range is measured on the model
        pytest.param("opt-125m", [*UNMEASURED, "--stream-bits", "auto"], ["torch", "transformers"], marks=pytest.mark.slow),
    ],
)
def test_a_conversion_that_needs_no_model_imports_neither_torch_nor_transformers(tiny_checkpoints, tmp_path, name, flags, heavy):
    from tests.test_cli import PROBE

    result = subprocess.run(
        [sys.executable, "-c", PROBE, str(tiny_checkpoints[name]), "-o", str(tmp_path / "out"), *flags],
        capture_output=True, text=True, timeout=300,
    )
    assert json.loads(result.stderr.strip().splitlines()[-1]) == {"code": 0, "heavy": heavy}, result.stdout + result.stderr
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "meft_" + MODEL_TYPES[name]


def _convert_both_ways(folder: Path, out: Path, **settings) -> tuple[Path, Path, bool]:
    """`folder` converted as convert() chooses (without torch where nothing needs the model) and
    with torch and transformers, into out/without/NAME and out/with/NAME; whether the first
    was made without them."""
    without_torch = []
    original = convert_module._plan_without_torch

    def spy(*args, **kwargs):
        without_torch.append(original(*args, **kwargs))
        return without_torch[-1]

    outputs = []
    for way, plan_without_torch in (("without", spy), ("with", lambda *args, **kwargs: None)):
        options = ConvertOptions(model=str(folder), output=out / way / "converted", show_progress=False, **settings)
        with pytest.MonkeyPatch.context() as m:
            m.setattr(convert_module, "_plan_without_torch", plan_without_torch)
            outputs.append(convert(options, log=lambda _: None))
    assert len(without_torch) == 1
    return outputs[0], outputs[1], without_torch[0] is not None


def _assert_same_folders(a: Path, b: Path) -> None:
    """File by file: config.json as a dict, every tensor bit for bit, every other file byte for byte."""
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        if name == "config.json":
            assert json.loads((a / name).read_text()) == json.loads((b / name).read_text())
        elif name.endswith(".safetensors"):
            ta, tb = tensors_of_file(a / name), tensors_of_file(b / name)
            assert ta.keys() == tb.keys()
            for key in ta:
                assert ta[key].dtype == tb[key].dtype and torch.equal(ta[key].view(torch.uint8), tb[key].view(torch.uint8)), key
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def tensors_of_file(file: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(file), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


# the checkpoints whose config.json names the hidden size and the layer count itself (GPT-2's
# and BART's use other names that their config classes map) and whose tensors are all
# parameters (MiniLM's old position_ids are not): those convert without torch
WITHOUT_TORCH = {"bert", "roberta", "opt-125m", "opt-350m", "llama", "mistral", "qwen2"}


@pytest.mark.parametrize("name", CHECKPOINTS)
@pytest.mark.parametrize(
    "settings",
    [
        dict(variant="meft3", lambda_=2**-10, beta=2**-10, adapter_init="zero", stream_bits="64"),
        # the paper's init (every adapter tensor drawn), another seed, the hybrid, the mean stream
        dict(variant="meft1", lambda_=2**-6, beta=1.0, adapter_init="paper", stream_bits="64", seed=5,
             reversible_layers=1, output_stream="mean", init_std=0.05),
        # float mode; allow_low_fidelity is recorded as a calibration that measured nothing
        dict(variant="meft2", lambda_=1.0, beta=0.1, adapter_init="paper", exact=False, allow_low_fidelity=True),
    ],
    ids=["meft3-zero", "meft1-paper-hybrid", "meft2-float"],
)
def test_the_conversion_without_torch_writes_what_the_one_with_torch_writes(tiny_checkpoints, minilm, tmp_path, name, settings):
    fast, full, without_torch = _convert_both_ways(source(name, tiny_checkpoints, minilm), tmp_path, verify=False, **settings)
    assert without_torch == (name in WITHOUT_TORCH)
    _assert_same_folders(fast, full)
    config = json.loads((fast / "config.json").read_text())
    assert {key: config[key] for key in ("variant", "lambda_", "adapter_init_std")} == {
        "variant": settings["variant"], "lambda_": settings["lambda_"], "adapter_init_std": settings.get("init_std", 0.02)}
    assert ("meft_calibration" in config) == settings.get("allow_low_fidelity", False)


def test_configs_another_transformers_wrote_take_the_way_with_torch(tiny_checkpoints, tmp_path):
    """Only this transformers version's own config.json is known to come back unchanged from
    its round trip; another's (older ones' keys, defaults that changed) is read by transformers."""
    folder = _copy_checkpoint(tiny_checkpoints["opt-125m"], tmp_path / "older")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "transformers_version": "4.21.0.dev0"}))
    fast, full, without_torch = _convert_both_ways(folder, tmp_path, verify=False, **UNMEASURED_SETTINGS)
    assert not without_torch
    _assert_same_folders(fast, full)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(reversible_layers=5), "exceeds the model's 2 layers"),
        (dict(task="question-answering"), "no question-answering head"),
        (dict(lambda_=0.3), "not 1/m"),
    ],
)
def test_what_the_way_without_torch_cannot_convert_is_refused_as_ever(tiny_checkpoints, tmp_path, change, match):
    options = ConvertOptions(
        model=str(tiny_checkpoints["opt-125m"]), output=tmp_path / "o", show_progress=False, verify=False,
        **{**UNMEASURED_SETTINGS, **change},
    )
    _fails(options, match=match)


@pytest.mark.parametrize("name", ["opt-125m", "llama"])
def test_a_folder_converted_without_torch_loads_and_computes_as_the_one_converted_with_it(tiny_checkpoints, tmp_path, name):
    fast, full, without_torch = _convert_both_ways(tiny_checkpoints[name], tmp_path, verify=False, **UNMEASURED_SETTINGS)
    assert without_torch
    ids = torch.randint(3, 1000, (2, 11), generator=torch.Generator().manual_seed(0))
    outputs = []
    for folder in (fast, full):
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
        assert type(model).__name__ == f"Meft{'OPT' if name == 'opt-125m' else 'Llama'}ForCausalLM"
        adapters = {k: v for k, v in model.state_dict().items() if ".meft." in k}
        assert adapters and all(torch.count_nonzero(v) for k, v in adapters.items() if k.endswith("proj.weight"))
        with torch.no_grad():
            outputs.append(model(input_ids=ids).logits)
    assert torch.isfinite(outputs[0]).all() and torch.equal(outputs[0], outputs[1])


def test_a_checkpoint_written_before_the_engine_reshape_loads_and_trains(tiny_checkpoints, tmp_path):
    """The config.json that 73cb13c wrote for the tiny LLaMA (tests/data/checkpoints): today's code
    reads the same settings from it, and the model loads with it and trains exactly."""
    from tests.test_modeling import assert_reversible_equals_plain_autograd

    old = json.loads((Path(__file__).parent / "data" / "checkpoints" / "tinyllama-meft3-73cb13c.config.json").read_text())
    settings = {key: old[key] for key in ("variant", "adapter_init", "stream_bits")}
    out = convert(ConvertOptions(model=str(tiny_checkpoints["llama"]), output=tmp_path / "out", lambda_=old["lambda_"],
                                 beta=old["beta"], verify=False, show_progress=False, **settings), log=lambda _: None)
    written = json.loads((out / "config.json").read_text())
    # the same entries, key for key, but those naming where and with what it was written
    written_by = ("meft_code_sha256", "meft_calibration", "meft_base_model_local", "meft_base_model", "transformers_version")
    kept = {k: v for k, v in written.items() if k not in written_by}
    assert kept == {k: old[k] for k in kept} and set(written) == set(old)
    (out / "config.json").write_text(json.dumps(old))
    model = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, attention_dropout=0.1)
    assert type(model).__name__ == old["architectures"][0]
    assert model.config.meft_settings() == {k: old[k] for k in model.config.meft_settings()}
    gradients = assert_reversible_equals_plain_autograd(model, "AutoModelForCausalLM")
    assert len(gradients) == 16


def test_link_hard_links_the_shards_and_says_what_to_do_where_it_cannot(tiny_checkpoints, tmp_path, monkeypatch):
    """--link: the output's PLM shard is the original's file (one inode), the model loads and the
    original is untouched; where the file system refuses, one error names the way out and nothing is left."""
    import errno
    import shutil

    source = tmp_path / "llama"
    shutil.copytree(tiny_checkpoints["llama"], source)
    options = dict(model=str(source), variant="meft1", verify=False, show_progress=False)
    out = convert(ConvertOptions(output=tmp_path / "linked", link=True, **options), log=lambda _: None)
    [original] = find_weights(source).files
    shard = out / "model-00001-of-00002.safetensors"
    assert shard.stat().st_ino == original.stat().st_ino and original.stat().st_nlink == 2
    model = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert model.meft_layers is not None

    def refuse(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", refuse)
    with pytest.raises(BadInputError, match="--link needs both on one file system .* leave it out to copy"):
        convert(ConvertOptions(output=tmp_path / "elsewhere", link=True, **options), log=lambda _: None)
    assert not (tmp_path / "elsewhere").exists() and not list(tmp_path.glob(".elsewhere*"))
