"""MeftConfig: settings, checks, and their round trip through config.json."""

from __future__ import annotations

import json
import re

import pytest
import transformers

from meft_convert.templates.configuration_meft import (
    MEFT_SETTINGS,
    auto_map_for,
    config_class_for,
    validate_meft_settings,
)
from meft_convert.templates.families import BERT, OPT
from meft_convert.templates.meft_table import VARIANTS
from tests.conftest import real_config


def meft_config(family, config_name, **settings):
    values = real_config(config_name).to_dict()
    for key in ("model_type", "transformers_version", "architectures"):
        values.pop(key, None)
    return config_class_for(family)(**values, **settings)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_defaults_fill_lambda_and_beta(variant):
    config = meft_config(OPT, "opt-125m", variant=variant)
    assert (config.lambda_, config.beta) == (VARIANTS[variant].lambda_, VARIANTS[variant].beta)
    assert config.model_type == "meft_opt" and config.plm_model_type == "opt"
    assert isinstance(config, transformers.OPTConfig) and config.hidden_size == 32 and config.init_std == 0.02


def test_round_trip_keeps_every_setting_even_defaults(tmp_path):
    config = meft_config(BERT, "bert-base-uncased", variant="meft1", lambda_=1 / 1024, reversible_layers=1)
    config.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert set(MEFT_SETTINGS) <= set(written)  # defaults too, so config.json shows them all
    again = type(config).from_pretrained(tmp_path)
    assert again.meft_settings() == config.meft_settings()
    assert again.hidden_size == 32 and again.variant == "meft1" and again.lambda_ == 1 / 1024


@pytest.mark.parametrize(
    "settings,match",
    [
        (dict(variant="meft4"), "variant must be one of"),
        (dict(lambda_=0.3), "is not 1/m"),
        (dict(beta=-1.0), "beta must be a positive number"),
        (dict(beta=float("nan")), "beta must be a positive number"),
        (dict(adapter_dim=0), "adapter_dim must be a positive integer"),
        (dict(adapter_init="xavier"), "adapter_init must be one of"),
        (dict(output_stream="x1"), "output_stream must be one of"),
        (dict(reversible_layers=-1), "reversible_layers must be"),
        (dict(frac_bits=60), "frac_bits must be"),
        (dict(chunk_attention_queries="yes"), "chunk_attention_queries must be true or false"),
        (dict(compile_blocks=True, chunk_attention_queries=True), "compile_blocks keeps every attention block whole"),
    ],
)
def test_bad_settings_are_refused(settings, match):
    with pytest.raises(ValueError, match=match):
        validate_meft_settings(**settings)


def test_float_mode_accepts_any_positive_scale():
    assert validate_meft_settings(lambda_=0.3, exact=False)["lambda_"] == 0.3


def test_reversible_layers_cannot_exceed_the_depth():
    with pytest.raises(ValueError, match="exceeds the model's 2 layers"):
        meft_config(OPT, "opt-125m", reversible_layers=3)


def test_auto_map_names_the_classes_the_checkpoint_code_defines():
    auto_map = auto_map_for(BERT, ["AutoModel", "AutoModelForMaskedLM"])
    assert auto_map == {
        "AutoConfig": "configuration_meft.MeftBertConfig",
        "AutoModel": "modeling_meft.MeftBertModel",
        "AutoModelForMaskedLM": "modeling_meft.MeftBertForMaskedLM",
    }
    from meft_convert.templates import configuration_meft, modeling_meft

    for target in auto_map.values():
        module, name = target.split(".")
        assert getattr({"configuration_meft": configuration_meft, "modeling_meft": modeling_meft}[module], name).__name__ == name


def test_every_auto_map_entry_is_a_class_statement_in_the_shipped_source():
    from importlib import resources

    from meft_convert.templates.families import FAMILIES

    shipped = resources.files("meft_convert.templates")
    for family in FAMILIES.values():
        for target in auto_map_for(family, list(family.heads)).values():
            module, name = target.split(".")
            source = shipped.joinpath(module + ".py").read_text()
            assert re.search(rf"^class {name}\(", source, re.MULTILINE), target


def test_a_declared_model_class_must_be_a_head_of_its_family_with_the_right_loss():
    import transformers

    from meft_convert.templates import modeling_meft

    with pytest.raises(TypeError, match="BertModel is no head of llama models"):
        type("MeftBertModel", (modeling_meft.MeftModelMixin, transformers.BertModel),
             {"config_class": modeling_meft.MeftLlamaConfig})
    with pytest.raises(TypeError, match="causal LMs, and only they"):
        type("MeftLlamaForCausalLM", (modeling_meft.MeftModelMixin, transformers.LlamaForCausalLM),
             {"config_class": modeling_meft.MeftLlamaConfig})
    assert modeling_meft.MeftLlamaForCausalLM._meft_family == "llama"
    assert modeling_meft.MeftOPTForSequenceClassification._meft_trainable_modules == ("score",)
    # subclasses of a declared class (FSDP builds one per sharded module) inherit its description
    subclass = type("Sharded", (modeling_meft.MeftOPTForCausalLM,), {})
    assert subclass._meft_trainable_modules == () and subclass._meft_family == "opt"


def test_a_subclass_of_a_config_class_keeps_its_plm_config_and_the_registry():
    from meft_convert.templates import configuration_meft
    from meft_convert.templates.families import LLAMA

    class MyConfig(configuration_meft.MeftLlamaConfig):
        pass

    config = MyConfig(hidden_size=64, num_attention_heads=4, variant="meft1")
    assert config._plm_config_class is transformers.LlamaConfig
    assert (config.hidden_size, config.variant, config.lambda_) == (64, "meft1", 0.1)
    assert config_class_for(LLAMA) is configuration_meft.MeftLlamaConfig
