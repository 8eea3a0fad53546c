"""The settings table (templates/meft_table.py) and the family table (templates/families.py) are
what the checkpoint's code runs and what the converter reads, without torch."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from meft_convert import calibrate, cli, convert, estimate, settings
from meft_convert.templates import adapters, arithmetic, configuration_meft, families, fixed_point, meft_table, modeling_meft
from meft_convert.templates.families import BERT, FAMILIES
from tests.test_configuration import meft_config


def test_the_checkpoint_code_and_the_converter_read_one_table():
    for module, names in [
        (arithmetic, ("denominator_of",)),
        (fixed_point, ("remainder_layout",)),
        (adapters, ("ADAPTER_INITS", "adapter_generator", "draw_adapter")),
        (configuration_meft, ("MEFT_SETTINGS", "validate_meft_settings")),
        (modeling_meft, ("VARIANTS", "RUNTIME_SETTINGS")),
        (convert, ("MEFT_SETTINGS", "VARIANTS", "adapter_generator", "draw_adapter")),
        (settings, ("VARIANTS", "validate_meft_settings")),
        (calibrate, ("VARIANTS", "adapter_generator", "denominator_of")),
        (estimate, ("VARIANTS", "RECOMPUTE_CHUNK_TOKENS", "remainder_layout", "packed_remainder_bytes")),
        (cli, ("VARIANTS", "RECOMPUTE_CHUNK_TOKENS")),
    ]:
        for name in names:
            assert getattr(module, name) is getattr(meft_table, name), f"{module.__name__}.{name}"
    assert configuration_meft.auto_map_for is families.auto_map_for is convert.auto_map_for


def test_the_tables_import_neither_torch_nor_transformers_nor_numpy():
    probe = (
        "import json, sys\n"
        "from meft_convert.templates import families, meft_table\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'numpy'})))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert json.loads(result.stdout) == [], result.stderr


def test_each_variant_scales_the_streams_its_paper_defaults_scale():
    assert list(meft_table.VARIANTS) == ["meft1", "meft2", "meft3"]
    for name, variant in meft_table.VARIANTS.items():
        defaults = {"lambda_": variant.lambda_, "beta": variant.beta}
        assert variant.scaled and all(defaults[s] < 1 for s in variant.scaled), name
        assert all(value == 1.0 for s, value in defaults.items() if s not in variant.scaled), name
        assert len(variant.adapters) == 2 and variant.plm_stream in (0, 1), name


@pytest.mark.parametrize(
    "values",
    [{}, {"variant": "meft1"}, {"variant": "meft2", "beta": 2**-8}, {"lambda_": 1 / 1024, "stream_bits": 32, "frac_bits": 20},
     {"lambda_": 0.3}, {"lambda_": 0.3, "exact": False}, {"adapter_init": "normal"}, {"stream_bits": 32, "frac_bits": 30},
     {"output_stream": "sum"}, {"reversible_layers": -1}, {"offload_remainders": "yes"}, {"adapter_dim": 0}],
)
def test_a_settings_check_answers_through_the_table_as_through_the_config_class(values):
    def outcome(check):
        try:
            return check()
        except ValueError as e:
            return f"ValueError: {e}"

    ours = outcome(lambda: meft_table.validate_meft_settings(**values))
    assert ours == outcome(lambda: meft_config(BERT, "bert-base-uncased", **values).meft_settings())
    assert isinstance(ours, dict) == (values in ({}, {"variant": "meft1"}, {"variant": "meft2", "beta": 2**-8},
                                                 {"lambda_": 1 / 1024, "stream_bits": 32, "frac_bits": 20},
                                                 {"lambda_": 0.3, "exact": False}))


def test_auto_maps_name_the_classes_the_checkpoint_code_builds_and_adapter_draws_repeat():
    for family in FAMILIES.values():
        auto_map = families.auto_map_for(family, list(family.heads))
        assert auto_map.pop("AutoConfig") == f"configuration_meft.{configuration_meft.config_class_for(family).__name__}"
        assert auto_map == {auto_class: f"modeling_meft.{modeling_meft.model_class_for(family, auto_class).__name__}"
                            for auto_class in family.heads}
    ours = meft_table.draw_adapter(meft_table.adapter_generator(5), 12, 3, "paper", 0.1)
    again = meft_table.draw_adapter(meft_table.adapter_generator(5), 12, 3, "paper", 0.1)
    assert ours.keys() == again.keys() and all(np.array_equal(ours[k], again[k]) for k in ours)
    assert meft_table.denominator_of(1 / 12) == 12
    with pytest.raises(ValueError):
        meft_table.denominator_of(0.3)


def test_a_remainder_stored_on_its_own_takes_ceil_log2_m_bits():
    for m in (*range(1, 300), 1000, 1024, 1025, 2**20, 2**20 + 1):
        assert meft_table.single_remainder_bits(m) == math.ceil(math.log2(m)), m
        assert meft_table.remainder_bits(m) <= meft_table.single_remainder_bits(m), m  # packing never costs more


def test_one_settings_definition_gives_the_defaults_docs_and_runtime_list_everywhere():
    from dataclasses import fields

    table = {f.name: f for f in fields(meft_table.ModelSettings)}
    assert meft_table.MEFT_SETTINGS == tuple(table)
    assert meft_table.RUNTIME_SETTINGS == ("audit", "loss_chunk_size", "compile_blocks", "recompute_chunk_tokens",
                                           "offload_remainders", "chunk_attention_queries")
    # every setting is documented in the config classes' docstring, under its name
    for name, f in table.items():
        assert f"    {name}: " in configuration_meft.MeftConfig.__doc__, name
        assert f"    {name}: " in configuration_meft.MeftLlamaConfig.__doc__, name
    # the converter's options and the engine's coupling settings default to the table's values
    converter = settings.MeftSettings()
    for name, option in (("variant", "variant"), ("adapter_dim", "adapter_dim"), ("adapter_init_std", "init_std"),
                         ("reversible_layers", "reversible_layers"), ("output_stream", "output_stream"),
                         ("exact", "exact")):
        assert getattr(converter, option) == table[name].default, name
    coupling = arithmetic.CouplingSettings(0.5, 0.5, swap=False)
    for name in ("exact", "frac_bits", "audit", "stream_bits"):
        assert getattr(coupling, name) == table[name].default, name
    assert settings.FRAC_BITS_64 == table["frac_bits"].default == 32
    assert estimate.RECOMPUTE_CHUNK_TOKENS == table["recompute_chunk_tokens"].default == 4096
    with pytest.raises(TypeError):
        meft_table.validate_meft_settings(adapter_size=8)  # a name that is no setting
