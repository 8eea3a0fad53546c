"""The templates' plain-Python definitions, read without torch or transformers.

The templates (the code a converted checkpoint carries) import torch and transformers at the
top, yet some of what they define is plain Python or numpy: the settings checks, the variants
table, the adapter initialisation, the `auto_map` a checkpoint names. A conversion that needs
no model reads those here, from the template files themselves: each definition named below is
executed on its own, with the names it uses, so that there is one definition and the CLI loads
no torch for it. A definition that comes to need anything else fails here by name (NameError),
and the tests run every one of them.
"""

from __future__ import annotations

import __future__
import ast
import functools
import math
from dataclasses import dataclass
from importlib import resources
from types import SimpleNamespace

# template file -> the top-level definitions read from it, in dependency order
DEFINITIONS = {
    "fixed_point.py": ("denominator_of",),
    "adapters.py": ("ADAPTER_INITS", "adapter_generator", "draw_adapter"),
    "configuration_meft.py": (
        "VARIANT_DEFAULTS", "OUTPUT_STREAMS", "validate_meft_settings", "MEFT_SETTINGS", "config_class_name", "auto_map_for",
    ),
    "modeling_meft.py": ("Variant", "VARIANTS"),
}


def _defined_names(node: ast.stmt) -> list[str]:
    if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
        return [node.name]
    if isinstance(node, ast.Assign):
        return [target.id for target in node.targets if isinstance(target, ast.Name)]
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return [node.target.id]
    return []


def _execute(file: str, names: tuple[str, ...], namespace: dict) -> None:
    source = resources.files("meft_convert.templates").joinpath(file).read_text(encoding="utf-8")
    nodes = {}
    for node in ast.parse(source, filename=file).body:
        for name in _defined_names(node):
            if name in names:
                nodes[name] = node
    absent = [name for name in names if name not in nodes]
    if absent:
        raise LookupError(f"templates/{file} no longer defines {absent}")
    # in the file's order, each once (one assignment may define several names)
    body = sorted({id(node): node for node in nodes.values()}.values(), key=lambda node: node.lineno)
    # with the templates' own `from __future__ import annotations`: their annotations stay text
    code = compile(
        ast.Module(body=body, type_ignores=[]), f"templates/{file}", "exec",
        flags=__future__.annotations.compiler_flag, dont_inherit=True,
    )
    exec(code, namespace)  # noqa: S102


@functools.cache
def template_tables() -> SimpleNamespace:
    """The definitions of DEFINITIONS, as attributes (e.g. `template_tables().VARIANTS`)."""
    import numpy as np

    # what the definitions use besides each other; `__name__` is a loaded module's, as the
    # dataclass machinery wants for the text annotations
    namespace: dict = {"__name__": __name__, "math": math, "np": np, "dataclass": dataclass}
    for file, names in DEFINITIONS.items():
        _execute(file, names, namespace)
    return SimpleNamespace(**{name: namespace[name] for names in DEFINITIONS.values() for name in names})
