"""The templates' definitions read without torch are the templates' own, and behave as imported."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from meft_convert.template_tables import DEFINITIONS, template_tables
from meft_convert.templates import adapters, configuration_meft, fixed_point, modeling_meft
from meft_convert.templates.families import FAMILIES

MODULES = {"fixed_point.py": fixed_point, "adapters.py": adapters, "configuration_meft.py": configuration_meft,
           "modeling_meft.py": modeling_meft}


def test_every_definition_is_read_and_its_values_are_the_module_s():
    tables = template_tables()
    for file, names in DEFINITIONS.items():
        for name in names:
            ours, theirs = getattr(tables, name), getattr(MODULES[file], name)
            if isinstance(theirs, type):
                assert [f.name for f in dataclasses.fields(ours)] == [f.name for f in dataclasses.fields(theirs)], name
            elif callable(theirs):  # the same lines of the same file, compiled again
                code, module_code = ours.__code__, theirs.__code__
                assert (code.co_filename, code.co_firstlineno) == (f"templates/{file}", module_code.co_firstlineno), name
                assert module_code.co_filename.endswith(file) and code.co_names == module_code.co_names, name
            elif name == "VARIANTS":
                assert {k: dataclasses.asdict(v) for k, v in ours.items()} == {k: dataclasses.asdict(v) for k, v in theirs.items()}
            else:
                assert ours == theirs, name


@pytest.mark.parametrize(
    "settings",
    [{}, {"variant": "meft1"}, {"variant": "meft2", "beta": 2**-8}, {"lambda_": 1 / 1024, "stream_bits": 32, "frac_bits": 20},
     {"lambda_": 0.3}, {"lambda_": 0.3, "exact": False}, {"adapter_init": "normal"}, {"stream_bits": 32, "frac_bits": 30},
     {"output_stream": "sum"}, {"reversible_layers": -1}, {"offload_remainders": "yes"}, {"adapter_dim": 0}],
)
def test_the_settings_checks_answer_as_the_module_s(settings):
    def outcome(validate):
        try:
            return validate(**settings)
        except ValueError as e:
            return f"ValueError: {e}"

    ours = outcome(template_tables().validate_meft_settings)
    assert ours == outcome(configuration_meft.validate_meft_settings)
    assert isinstance(ours, dict) == (settings in ({}, {"variant": "meft1"}, {"variant": "meft2", "beta": 2**-8},
                                                   {"lambda_": 1 / 1024, "stream_bits": 32, "frac_bits": 20},
                                                   {"lambda_": 0.3, "exact": False}))


def test_auto_maps_and_adapter_draws_are_the_module_s():
    tables = template_tables()
    for family in FAMILIES.values():
        assert tables.auto_map_for(family, list(family.heads)) == configuration_meft.auto_map_for(family, list(family.heads))
    ours = tables.draw_adapter(tables.adapter_generator(5), 12, 3, "paper", 0.1)
    theirs = adapters.draw_adapter(adapters.adapter_generator(5), 12, 3, "paper", 0.1)
    assert ours.keys() == theirs.keys() and all(np.array_equal(ours[k], theirs[k]) for k in ours)
    assert tables.denominator_of(1 / 12) == 12
    with pytest.raises(ValueError):
        tables.denominator_of(0.3)


def test_a_definition_that_is_gone_is_named(monkeypatch):
    from meft_convert import template_tables as module

    monkeypatch.setitem(module.DEFINITIONS, "adapters.py", ("ADAPTER_INITS", "no_such_function"))
    with pytest.raises(LookupError, match="no_such_function"):
        module.template_tables.__wrapped__()
