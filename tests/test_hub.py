"""Resolving models, and publishing results through the real huggingface_hub client talking
over HTTP to the Hub-compatible server in tests/hub_server.py."""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from meft_convert import hub
from meft_convert.errors import BadInputError
from tests.conftest import HUB_TOKEN, hub_env
from tests.hub_server import git_blob_sha1


def test_local_folder_resolves_to_itself(tiny_checkpoints):
    assert hub.resolve_model(str(tiny_checkpoints["bert"])) == tiny_checkpoints["bert"]


def test_revision_is_for_hub_ids_only(tiny_checkpoints):
    with pytest.raises(BadInputError, match="--revision applies to hub ids"):
        hub.resolve_model(str(tiny_checkpoints["bert"]), revision="main")


def test_a_file_is_not_a_model(tiny_checkpoints):
    with pytest.raises(BadInputError, match="is a file"):
        hub.resolve_model(str(tiny_checkpoints["bert"] / "config.json"))


@pytest.mark.parametrize("name", ["not a valid id!", "a/b/c/"])
def test_invalid_ids(name):
    with pytest.raises(BadInputError):
        hub.resolve_model(name)


def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _run(args: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=300, check=False)


def _assert_token_nowhere(token: str, result: subprocess.CompletedProcess, *folders: Path) -> None:
    assert token not in result.stdout and token not in result.stderr
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file():
                assert token.encode() not in path.read_bytes(), path


# loads the pushed model by its hub id (and, if given, the local folder too), runs a forward
# and a backward pass, and prints the bytes of the logits and of the adapters' gradients
LOAD = """
import hashlib, json, sys, torch, transformers
def run(where):
    model = transformers.AutoModelForCausalLM.from_pretrained(where, trust_remote_code=True)
    ids = torch.arange(3, 27).reshape(2, 12)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    model.train()
    torch.manual_seed(0)
    model(input_ids=ids, labels=ids).loss.backward()
    grads = torch.cat([p.grad.flatten() for _, p in sorted(model.named_parameters()) if p.grad is not None])
    return {"logits": hashlib.sha256(logits.numpy().tobytes()).hexdigest(),
            "grads": hashlib.sha256(grads.numpy().tobytes()).hexdigest(), "n_grads": grads.numel()}
print(json.dumps({where: run(where) for where in sys.argv[1:]}))
"""


@pytest.mark.slow
def test_push_then_load_from_the_hub_and_offline(hub, tiny_checkpoints, tmp_path):
    """Convert with --push-to-hub, load by hub id through the server in a fresh process (bitwise
    equal to the local folder), then again offline from the cache in another process."""
    out, home = tmp_path / "out", tmp_path / "hf-home"
    env = hub_env(hub.endpoint, home)
    pushed = _run(
        ["-m", "meft_convert", str(tiny_checkpoints["opt-125m"]), "-o", str(out), "--variant", "meft3",
         "--push-to-hub", "org/opt-meft3", "--commit-message", "first upload"],
        env, tmp_path,
    )
    assert pushed.returncode == 0, pushed.stderr
    assert f"Pushed to {hub.endpoint}/org/opt-meft3/commit/" in pushed.stdout
    _assert_token_nowhere(HUB_TOKEN, pushed, out, home)

    # the repository holds the folder, byte for byte
    repo = hub.state.repos["org/opt-meft3"]
    files = repo.commits[repo.branches["main"]]
    assert sorted(files) == sorted(p.name for p in out.iterdir())
    assert all(git_blob_sha1(content) == git_blob_sha1((out / name).read_bytes()) for name, content in files.items())
    # the weights went as the Hub takes them, through Git LFS: asked for, sent, verified, committed by sha256
    weights = [name for name in files if name.endswith(".safetensors")]
    assert weights
    sent = {path for method, path, status in hub.state.requests if method == "PUT" and status == 200}
    verified = {path for method, path, status in hub.state.requests if path.startswith("/lfs/verify/") and status == 200}
    for name in weights:
        oid = hashlib.sha256((out / name).read_bytes()).hexdigest()
        assert f"/lfs/objects/{oid}" in sent and f"/lfs/verify/{oid}" in verified
        assert hub.state.lfs_objects[oid] == (out / name).read_bytes()
    assert ("POST", "/org/opt-meft3.git/info/lfs/objects/batch", 200) in hub.state.requests

    loaded = _run(["-c", LOAD, "org/opt-meft3", str(out)], env, tmp_path)
    assert loaded.returncode == 0, loaded.stderr
    results = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert results["org/opt-meft3"] == results[str(out)] and results[str(out)]["n_grads"] > 0

    served = len(hub.state.requests)
    offline = _run(["-c", LOAD, "org/opt-meft3"], dict(env, HF_HUB_OFFLINE="1"), tmp_path)
    assert offline.returncode == 0, offline.stderr
    assert json.loads(offline.stdout.strip().splitlines()[-1])["org/opt-meft3"] == results[str(out)]
    assert len(hub.state.requests) == served  # the cache alone

    checked = _run(["-m", "meft_convert", "check", "org/opt-meft3", "--no-verify"], env, tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "the code is byte-identical to what this version ships" in checked.stdout


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "case,expected",
    [
        ("server down", "could not reach http://127.0.0.1:"),
        ("wrong token", "the hub refused the token (401 Unauthorized"),
        ("no token", "no Hugging Face token found"),
        ("private repo of another account", "someone/private-model exists but this token cannot see or write to it"),
    ],
)
def test_failed_push_exits_1_with_the_cause_and_keeps_the_folder(hub, converted, tmp_path, case, expected):
    folder, _ = converted("opt-125m", "meft3")
    before = _hashes(folder)
    hub.state.add_repo("someone/private-model", private=True) if "someone/private-model" not in hub.state.repos else None
    repo_id = "someone/private-model" if case == "private repo of another account" else "org/failing"
    endpoint = f"http://127.0.0.1:{_closed_port()}" if case == "server down" else hub.endpoint
    token = {"wrong token": "hf_wrong_token_ffffffffffff", "no token": None}.get(case, HUB_TOKEN)
    args = ["-m", "meft_convert", "push", str(folder), repo_id, "--private"]
    if token is not None:
        args += ["--token", token]  # on the command line: it must not be echoed either
    result = _run(args, hub_env(endpoint, tmp_path / "home", token=None), tmp_path)
    assert result.returncode == 1, result.stderr
    assert expected in result.stderr
    assert f"meft-convert push {folder} {repo_id} --private" in result.stderr
    assert "Traceback" not in result.stderr
    assert _hashes(folder) == before
    if token is not None:
        _assert_token_nowhere(token, result, folder, tmp_path / "home")
    assert "org/failing" not in hub.state.repos or case == "private repo of another account"
    assert not hub.state.repos["someone/private-model"].commits[hub.state.repos["someone/private-model"].branches["main"]]


def test_push_to_a_branch_with_the_stored_login(hub, converted, tmp_path):
    """--revision pushes to a branch created from main; the token comes from the stored login."""
    folder, _ = converted("opt-125m", "meft3")
    home = tmp_path / "home"
    home.mkdir()
    (home / "token").write_text(HUB_TOKEN)
    args = ["-m", "meft_convert", "push", str(folder), "org/branched", "--revision", "v1", "--commit-message", "to v1"]
    result = _run(args, hub_env(hub.endpoint, home, token=None), tmp_path)
    assert result.returncode == 0, result.stderr
    repo = hub.state.repos["org/branched"]
    assert not repo.commits[repo.branches["main"]]  # main untouched
    assert sorted(repo.commits[repo.branches["v1"]]) == sorted(p.name for p in folder.iterdir())
    assert HUB_TOKEN not in result.stdout + result.stderr


def test_push_refuses_a_folder_that_is_not_a_meft_checkpoint(tiny_checkpoints, tmp_path):
    from click.testing import CliRunner

    from meft_convert.cli import main

    result = CliRunner().invoke(main, ["push", str(tiny_checkpoints["opt-125m"]), "org/x"])
    assert result.exit_code == 2 and "is not a converted MEFT checkpoint" in result.output


# resolves a hub id in a fresh process (the hub's address is read when huggingface_hub loads) and
# prints the error's class, exit code and message
RESOLVE = """
import json, sys
from meft_convert.errors import MeftConvertError
from meft_convert.hub import resolve_model
try:
    resolve_model(sys.argv[1])
except MeftConvertError as e:
    print(json.dumps({"error": type(e).__name__, "exit_code": e.exit_code, "message": str(e)}))
print(json.dumps({"modules": sorted(m for m in ("torch", "transformers") if m in sys.modules)}))
"""


@pytest.mark.parametrize(
    "case,model,exit_code,expected",
    [
        ("server down", "org/model", 1, "could not reach http://127.0.0.1:"),
        ("wrong token", "org/model", 1, "the hub refused the token (401 Unauthorized"),
        ("gated", "someone/gated-model", 1, "'someone/gated-model' is gated: accept its conditions"),
        ("gated, no token", "someone/gated-model", 1, "'someone/gated-model' is gated"),
        ("not on the hub", "org/no-such-model", 2, "'org/no-such-model' not found on the hub"),
        ("private repo of another account", "someone/private-model", 2, "if it is private, use a token"),
        ("offline, not cached", "org/model", 2, "'org/model' not found in the Hugging Face cache (HF_HUB_OFFLINE is set)"),
    ],
)
def test_unreachable_models_say_why(hub, tmp_path, case, model, exit_code, expected):
    """Network failures and refused access exit 1 (the id may well be right); a model that is
    not there exits 2. Each message names its cause."""
    for repo_id, gated, private in (("someone/gated-model", True, False), ("someone/private-model", False, True)):
        if repo_id not in hub.state.repos:
            hub.state.add_repo(repo_id, private=private, gated=gated, files={"config.json": b"{}"})
    endpoint = f"http://127.0.0.1:{_closed_port()}" if case == "server down" else hub.endpoint
    token = {"wrong token": "hf_wrong_token_ffffffffffff", "gated, no token": None}.get(case, HUB_TOKEN)
    extra = {"HF_HUB_OFFLINE": "1"} if case.startswith("offline") else {}
    result = _run(["-c", RESOLVE, model], hub_env(endpoint, tmp_path / "home", token=token, **extra), tmp_path)
    assert result.returncode == 0, result.stderr
    error, modules = (json.loads(line) for line in result.stdout.strip().splitlines()[-2:])
    assert error["exit_code"] == exit_code and expected in error["message"], error
    assert error["error"] == ("HubAccessError" if exit_code == 1 else "BadInputError")
    assert modules == {"modules": []}  # resolving a model needs neither torch nor transformers
    if token is not None:
        assert token not in result.stdout + result.stderr


def test_no_network_exits_1_through_the_cli(tmp_path):
    env = hub_env(f"http://127.0.0.1:{_closed_port()}", tmp_path / "home")
    result = _run(["-m", "meft_convert", "org/model", "-o", str(tmp_path / "out"), "--no-verify"], env, tmp_path)
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith("Error: could not reach http://127.0.0.1:") and "not found" not in result.stderr
    assert not (tmp_path / "out").exists()
