"""The code every checkpoint carries, and users run with trust_remote_code=True, reads no files,
opens no sockets, runs no programs and evaluates or unpickles nothing: checked on its syntax tree.

One exception, named here: the adapter-only save and load that a user calls explicitly
(`save_pretrained(..., adapters_only=True)`, `load_adapters(folder)`, and `from_pretrained(...,
adapters=folder)`, which calls load_adapters) read and write one safetensors file, through
the safetensors library, and one JSON description, in the folder the user names. Nothing else in
the templates may touch files, and nothing anywhere may unpickle."""

from __future__ import annotations

import ast
from importlib import resources

import pytest

# the modules template code may import (relative imports of its siblings aside)
ALLOWED_IMPORTS = {
    "__future__", "abc", "collections", "contextlib", "dataclasses", "enum", "functools", "inspect", "itertools",
    "math", "numbers", "operator", "os", "re", "textwrap", "types", "typing", "warnings", "weakref", "torch",
    "transformers",
    # the adapters' initialisation (templates/adapters.py); transformers depends on it
    "numpy",
}
FORBIDDEN_CALLS = {"open", "eval", "exec", "compile", "__import__", "breakpoint", "input", "globals", "vars"}
FORBIDDEN_NAMES = {"__builtins__", "__loader__"}
# attributes whose use reads or writes files, runs programs or deserialises objects
FORBIDDEN_ATTRIBUTES = {
    "read_text", "read_bytes", "write_text", "write_bytes", "open", "load", "loads", "save", "system", "popen",
    "urlopen", "load_library", "from_file", "hub", "cached_file", "hf_hub_download", "snapshot_download",
    # numpy's file functions
    "fromfile", "tofile", "loadtxt", "savetxt", "genfromtxt", "memmap", "savez", "savez_compressed", "DataSource",
}
# of os, only the environment (MEFT_COMPILE) may be read, and PathLike named in annotations
ALLOWED_OS_ATTRIBUTES = {"environ", "getenv", "PathLike"}
# the user-invoked adapter files (see above): which functions, and what they may do besides
USER_FILE_FUNCTIONS = {"modeling_meft.py": {"save_pretrained", "load_adapters"}}
USER_FILE_IMPORTS = {"json", "pathlib", "safetensors"}
USER_FILE_ATTRIBUTES = {"read_text", "write_text", "loads"}
SAFETENSORS_CALLS = {"load_file", "save_file"}


def violations(source: str, user_file_functions: set[str] = frozenset()) -> list[str]:
    """What in `source` the rules above forbid, one line each. Inside the functions named in
    `user_file_functions`, reading and writing text and safetensors files is allowed."""
    tree = ast.parse(source)
    excepted = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef) and node.name in user_file_functions
        for inner in ast.walk(node)
    }
    imports = ALLOWED_IMPORTS | (USER_FILE_IMPORTS if user_file_functions else set())
    found = []
    for node in ast.walk(tree):
        line = getattr(node, "lineno", 0)
        if id(node) in excepted and (
            (isinstance(node, ast.Attribute) and node.attr in USER_FILE_ATTRIBUTES)
            or (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in SAFETENSORS_CALLS)
        ):
            continue
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in SAFETENSORS_CALLS:
            found.append(f"{line}: {node.func.id}()")
        if isinstance(node, ast.Import):
            found += [f"{line}: import {a.name}" for a in node.names if a.name.split(".")[0] not in imports]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            if (node.module or "").split(".")[0] not in imports:
                found.append(f"{line}: from {node.module} import ...")
            found += [f"{line}: from {node.module} import {a.name}" for a in node.names if a.name in FORBIDDEN_ATTRIBUTES]
            if node.module == "os":
                found += [f"{line}: from os import {a.name}" for a in node.names if a.name not in ALLOWED_OS_ATTRIBUTES]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in FORBIDDEN_CALLS:
            found.append(f"{line}: {node.func.id}()")
        elif isinstance(node, ast.Name) and node.id in FORBIDDEN_NAMES:
            found.append(f"{line}: {node.id}")
        elif isinstance(node, ast.Attribute):
            if node.attr in FORBIDDEN_ATTRIBUTES:
                found.append(f"{line}: .{node.attr}")
            if isinstance(node.value, ast.Name) and node.value.id == "os" and node.attr not in ALLOWED_OS_ATTRIBUTES:
                found.append(f"{line}: os.{node.attr}")
    return found


def template_files() -> list[str]:
    return sorted(p.name for p in resources.files("meft_convert.templates").iterdir() if p.name.endswith(".py"))


@pytest.mark.parametrize("name", template_files())
def test_template_code_is_safe_to_trust(name):
    source = resources.files("meft_convert.templates").joinpath(name).read_text()
    assert violations(source, USER_FILE_FUNCTIONS.get(name, set())) == []


def test_user_invoked_file_access_stays_inside_the_named_functions():
    allowed = {"save_pretrained"}
    inside = "import json\ndef save_pretrained(folder):\n    folder.write_text(json.dumps({}))"
    assert violations(inside, allowed) == []
    elsewhere = "import json\ndef forward(folder):\n    return json.loads(folder.read_text())"
    assert len(violations(elsewhere, allowed)) == 2
    assert violations("from safetensors.torch import load_file\nw = load_file('x')", allowed)
    assert violations("def save_pretrained(f):\n    import pickle\n    return pickle.load(f)", allowed)


def test_every_file_a_checkpoint_receives_is_checked():
    from meft_convert.convert import TEMPLATE_FILES

    assert set(TEMPLATE_FILES) <= set(template_files())


@pytest.mark.parametrize(
    "source",
    [
        "x = open('weights.bin', 'rb').read()",
        "import socket",
        "import subprocess",
        "from urllib.request import urlopen",
        "import requests",
        "import http.client",
        "import pickle",
        "import marshal",
        "import io",
        "from pathlib import Path",
        "import os\nos.system('ls')",
        "import os\nfd = os.open('f', 0)",
        "from os import listdir",
        "eval('1 + 1')",
        "exec('x = 1')",
        "code = compile('1', 'f', 'eval')",
        "__import__('socket')",
        "import torch\nstate = torch.load('model.bin')",
        "import torch\ntorch.save({}, 'x')",
        "import torch\nm = torch.hub.load('a', 'b')",
        "from transformers.utils import cached_file",
        "import builtins",
        "import importlib",
        "getattr(__builtins__, 'open')",
    ],
)
def test_the_checker_catches_what_it_forbids(source):
    assert violations(source), source


def test_the_checker_allows_what_templates_need():
    source = "import os\nimport torch\nfrom .reversible import run_stack\nflag = os.environ.get('MEFT_COMPILE', '1')\nf = torch.compile"
    assert violations(source) == []
