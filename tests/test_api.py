"""get_meft_model(): in memory, the same model as the CLI's folder; saved, a folder like the CLI's."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import transformers

from meft_convert import MeftSettings, get_meft_model
from meft_convert.convert import TEMPLATE_FILES, ConvertOptions
from meft_convert.provenance import check_code, shipped_code
from meft_convert.quiet import quiet_transformers
from tests.conftest import run_without_meft_convert

# the paper's init moves a tiny random model's start beyond verification's target: kept anyway
SETTINGS = dict(variant="meft3", lambda_=2**-10, beta=2**-10, adapter_init="paper", seed=0, allow_low_fidelity=True)
# fp32 (64-bit streams as given), fp16 (calibration measures the 32-bit streams' range), bf16 LLaMA
CAUSAL = ["gpt2", "opt-125m", "llama"]


def _ids(vocab_size: int = 1000) -> torch.Tensor:
    return torch.randint(3, vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))


def _load(folder, auto_class=transformers.AutoModelForCausalLM, **kwargs):
    with quiet_transformers():
        return auto_class.from_pretrained(folder, **kwargs)


@pytest.fixture(scope="module")
def in_memory(tiny_checkpoints):
    """(checkpoint) -> (the PLM loaded as the user would, its MEFT model), built once."""
    cache = {}

    def get(name: str):
        if name not in cache:
            plm = _load(tiny_checkpoints[name])
            cache[name] = plm, get_meft_model(plm, **SETTINGS)
        return cache[name]

    return get


def _config_without_origin(model) -> dict:
    values = model.config.to_dict()
    values.pop("_name_or_path", None)  # where each was loaded from
    return values


@pytest.mark.parametrize("name", CAUSAL)
def test_the_same_model_as_the_cli_folder(converted, in_memory, name):
    """Same class, config, tensors (bitwise, dtypes included), trainable parameters and outputs
    as the folder `meft-convert` writes for the same settings, loaded with trust_remote_code."""
    _, meft = in_memory(name)
    folder, _ = converted(name, SETTINGS["variant"], **{k: v for k, v in SETTINGS.items() if k != "variant"})
    reference = _load(folder, trust_remote_code=True)
    assert type(meft).__name__ == type(reference).__name__
    assert _config_without_origin(meft) == _config_without_origin(reference)
    ours, theirs = meft.state_dict(), reference.state_dict()
    assert set(ours) == set(theirs)
    differing = [k for k in ours if ours[k].dtype != theirs[k].dtype or not torch.equal(ours[k], theirs[k])]
    assert not differing
    assert [n for n, p in meft.named_parameters() if p.requires_grad] == [
        n for n, p in reference.named_parameters() if p.requires_grad
    ]
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(meft(ids).logits, reference(ids).logits)
    # one training step's gradients, dropout on, from the same random state
    grads = []
    for model in (meft, reference):
        model.train()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
        model.zero_grad(set_to_none=True)
        model.eval()
    assert grads[0].keys() == grads[1].keys() and all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])


def test_the_plm_tensors_are_shared_not_copied(in_memory):
    plm, meft = in_memory("opt-125m")
    ours = meft.state_dict()
    for key, tensor in plm.state_dict().items():
        assert ours[key].data_ptr() == tensor.data_ptr(), key
    assert all(t.device.type != "meta" for t in [*meft.parameters(), *meft.buffers()])
    # the input model is left as it was: its parameters are not frozen by the MEFT model's
    assert all(p.requires_grad for p in plm.parameters())
    assert set(ours) - set(plm.state_dict()) == {k for k in ours if ".meft." in k}


@pytest.mark.parametrize("name", [pytest.param("opt-125m", marks=pytest.mark.slow), "llama"])
def test_save_pretrained_writes_the_cli_layout_and_loads_without_meft_convert(converted, in_memory, tmp_path, name):
    _, meft = in_memory(name)
    folder, _ = converted(name, SETTINGS["variant"], **{k: v for k, v in SETTINGS.items() if k != "variant"})
    saved = tmp_path / "saved"
    meft.save_pretrained(saved)
    for file in TEMPLATE_FILES:  # the code, byte for byte, and recorded as the CLI records it
        assert (saved / file).read_bytes() == shipped_code(file) == (folder / file).read_bytes()
    assert check_code(saved).identical
    written, cli = json.loads((saved / "config.json").read_text()), json.loads((folder / "config.json").read_text())
    for key in ("auto_map", "architectures", "meft_code_sha256", "meft_convert_version", "meft_base_model", "meft_calibration"):
        assert written.get(key) == cli.get(key), key
    assert written == cli

    ids = _ids()
    with torch.no_grad():
        expected = meft(ids).logits.float()
    torch.save(ids, tmp_path / "ids.pt")
    code = f"""
import torch, transformers
model = transformers.AutoModelForCausalLM.from_pretrained({str(saved)!r}, trust_remote_code=True)
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
with torch.no_grad():
    logits = model(torch.load({str(tmp_path / "ids.pt")!r})).logits.float()
torch.save(logits, {str(tmp_path / "logits.pt")!r})
"""
    run_without_meft_convert(code, cwd=tmp_path)
    assert torch.equal(torch.load(tmp_path / "logits.pt"), expected)


def test_a_base_model_matches_the_cli_folder_loaded_as_one(converted, tiny_checkpoints):
    """BertModel (no head) from a BertForMaskedLM checkpoint: the same adapters and outputs as the
    CLI's folder loaded with AutoModel."""
    settings = {k: v for k, v in SETTINGS.items() if k != "variant"}
    plm = _load(tiny_checkpoints["bert"], transformers.AutoModel)
    meft = get_meft_model(plm, MeftSettings(**SETTINGS))
    folder, _ = converted("bert", "meft3", **settings)
    reference = _load(folder, transformers.AutoModel, trust_remote_code=True)
    assert type(meft).__name__ == type(reference).__name__ == "MeftBertModel"
    ours, theirs = meft.state_dict(), reference.state_dict()
    assert set(ours) == set(theirs)
    # the pooler is not in a masked-LM checkpoint: each load initialises its own
    assert all(torch.equal(ours[k], theirs[k]) for k in ours if not k.startswith("pooler."))
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(meft(ids).last_hidden_state, reference(ids).last_hidden_state)


def test_settings_are_the_cli_s_with_their_help():
    """One definition: ConvertOptions extends MeftSettings, so the defaults and help are the CLI's."""
    convert_fields = {f.name: f for f in dataclasses.fields(ConvertOptions)}
    for f in dataclasses.fields(MeftSettings):
        assert convert_fields[f.name].default == f.default and convert_fields[f.name].metadata == f.metadata
        assert f.metadata["help"] and MeftSettings.help(f.name) == f.metadata["help"]
    assert {"variant", "lambda_", "beta", "adapter_dim", "init_std", "adapter_init", "reversible_layers", "output_stream",
            "exact", "stream_bits", "allow_low_fidelity", "seed"} == {f.name for f in dataclasses.fields(MeftSettings)}


def test_unknown_settings_and_models_are_refused(in_memory):
    plm, meft = in_memory("gpt2")
    with pytest.raises(TypeError, match="lamda"):
        get_meft_model(plm, lamda=0.1)
    from meft_convert.errors import BadInputError

    with pytest.raises(BadInputError, match="already a MEFT model"):
        get_meft_model(meft)
    with pytest.raises(BadInputError, match="adapter_dim"):
        get_meft_model(plm, adapter_dim=0)


def test_auto_settings_are_calibrated_as_the_cli_calibrates_them(converted, tiny_checkpoints):
    """All defaults (λ, β, the init and the stream format left to `auto`) on an fp16 checkpoint:
    the in-memory calibration chooses and records what the CLI's does, and the adapters follow."""
    plm = _load(tiny_checkpoints["opt-125m"])
    meft = get_meft_model(plm)  # MeftSettings() defaults, as `meft-convert` without options
    folder, _ = converted("opt-125m", "meft3")
    reference = _load(folder, trust_remote_code=True)
    assert meft.config.meft_calibration == reference.config.meft_calibration
    assert _config_without_origin(meft) == _config_without_origin(reference)
    ours, theirs = meft.state_dict(), reference.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_calibrating_without_a_tokenizer_warns():
    """A model built from a config (no folder, no tokenizer) calibrates on random tokens: said so."""
    from tests.conftest import real_config

    config = real_config("gpt2")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        plm = transformers.GPT2LMHeadModel(config)
    with pytest.warns(UserWarning, match="pass tokenizer="):
        meft = get_meft_model(plm, variant="meft3")
    assert meft.config.meft_calibration["auto"] and not hasattr(meft.config, "meft_base_model")
