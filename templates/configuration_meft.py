"""Configuration of a MEFT checkpoint: the PLM's own config plus the MEFT settings.

Each family has one config class, `Meft<PLMConfig>` (e.g. MeftBertConfig), declared at the end
of this file: the PLM's transformers config class with MeftConfig mixed in. Its model_type is
"meft_<plm type>", so a converted checkpoint is never mistaken for the original, and all
of the PLM's fields, defaults and aliases keep working for the PLM's own modules.
"""

from __future__ import annotations

import transformers

from .families import FAMILIES, Family, auto_map_for, config_class_name, family_for
from .meft_table import MEFT_SETTINGS, ModelSettings, validate_meft_settings


_CONFIG_CLASSES: dict[str, type] = {}  # each family's class, by name (the classes add themselves)


class MeftConfig:
    """The MEFT settings a converted checkpoint carries, on top of its PLM's config: the fields
    of meft_table.ModelSettings, which defines their defaults, documentation and checks."""

    _plm_config_class: type = None  # the PLM's config class, which each family's class extends

    def __init_subclass__(cls, **kwargs):
        # transformers makes each config class a dataclass and keeps an __init__ only if the class
        # defines one itself: so every subclass gets this one unless it has its own
        if "__init__" not in cls.__dict__:
            cls.__init__ = MeftConfig.__init__
        if MeftConfig in cls.__bases__:  # a family's class (a subclass of one inherits all this)
            cls._plm_config_class = cls.__bases__[-1]
            _CONFIG_CLASSES[cls.__name__] = cls
            if cls.__doc__ is None:
                cls.__doc__ = f"{cls._plm_config_class.__name__} with MEFT settings.\n\n{MeftConfig.__doc__}"
        super().__init_subclass__(**kwargs)

    def __init__(self, **kwargs):
        # the MEFT settings (defaults and checks: ModelSettings); the rest is the PLM's
        settings = validate_meft_settings(**{key: kwargs.pop(key) for key in MEFT_SETTINGS if key in kwargs})
        for key, value in settings.items():
            setattr(self, key, value)
        self._plm_config_class.__init__(self, **kwargs)
        layers = self.num_hidden_layers
        if self.reversible_layers is not None and self.reversible_layers > layers:
            raise ValueError(f"reversible_layers={self.reversible_layers} exceeds the model's {layers} layers")

    @property
    def plm_model_type(self) -> str:
        return self._plm_config_class.model_type

    def meft_settings(self) -> dict:
        return {key: getattr(self, key) for key in MEFT_SETTINGS}

    def to_diff_dict(self) -> dict:
        # MEFT settings are always written, default or not, so config.json shows them all
        output = super().to_diff_dict()
        output.update(self.meft_settings())
        return output


# help(MeftBertConfig) and the docs show every setting
MeftConfig.__doc__ += "\n\n" + ModelSettings.documentation()


# One class per family, named as families.config_class_name names it (auto_map's "AutoConfig").
class MeftBertConfig(MeftConfig, transformers.BertConfig):
    model_type = "meft_bert"


class MeftRobertaConfig(MeftConfig, transformers.RobertaConfig):
    model_type = "meft_roberta"


class MeftBartConfig(MeftConfig, transformers.BartConfig):
    model_type = "meft_bart"


class MeftOPTConfig(MeftConfig, transformers.OPTConfig):
    model_type = "meft_opt"


class MeftLlamaConfig(MeftConfig, transformers.LlamaConfig):
    model_type = "meft_llama"


class MeftMistralConfig(MeftConfig, transformers.MistralConfig):
    model_type = "meft_mistral"


class MeftQwen2Config(MeftConfig, transformers.Qwen2Config):
    model_type = "meft_qwen2"


class MeftGPT2Config(MeftConfig, transformers.GPT2Config):
    model_type = "meft_gpt2"


def config_class_for(family: Family) -> type[MeftConfig]:
    """The MEFT config class of `family`."""
    return _CONFIG_CLASSES[config_class_name(family)]


__all__ = ["MeftConfig", "auto_map_for", "config_class_for", "family_for", "validate_meft_settings"] + [
    config_class_name(family) for family in FAMILIES.values()
]
