"""On a CUDA device: compiled half-steps, CUDA RNG replay, SDPA, bf16 and autocast.

Skipped without a GPU (CI has none); benchmarks/README.md records the run on an H200.
"""

from __future__ import annotations

import importlib.util
import os

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before CUDA starts: deterministic cuBLAS

import pytest  # noqa: E402
import torch  # noqa: E402

from meft_convert.templates import arithmetic, fixed_point, reversible  # noqa: E402
from tests.test_modeling import batch, build, loss_of  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CASES = [
    ("bert-base-uncased", "AutoModelForSequenceClassification"),
    ("roberta-base", "AutoModelForSequenceClassification"),
    ("bart-base", "AutoModelForSeq2SeqLM"),  # two reversible stacks; the encoder's gradients come through cross-attention
    ("opt-125m", "AutoModelForCausalLM"),
    ("tinyllama-1.1b", "AutoModelForCausalLM"),
    ("mistral-7b-v0.1", "AutoModelForCausalLM"),
    ("qwen2-0.5b", "AutoModelForCausalLM"),
    ("gpt2", "AutoModelForCausalLM"),
]
# the engine as converted fp32 checkpoints use it, and as 16-bit ones do (int32 streams; the
# batch's 27 tokens in chunks of 5, so every position-wise part and the arithmetic are chunked),
# with the remainders in pinned host memory and causal attention a chunk of queries at a time
ENGINES = {
    "int64": {},
    "int32-chunked": dict(stream_bits=32, frac_bits=20, recompute_chunk_tokens=5),
    "int32-chunked-offload": dict(stream_bits=32, frac_bits=20, recompute_chunk_tokens=5, offload_remainders=True,
                                  chunk_attention_queries=True),
}
# LLaMA-like configs ship without dropout: it is switched on so that its CUDA replay is tested
DROPOUT_OFF = {"tinyllama-1.1b", "mistral-7b-v0.1", "qwen2-0.5b"}


def plm_settings(config_name: str, attention: str) -> dict:
    return {"attn_implementation": attention, **({"attention_dropout": 0.1} if config_name in DROPOUT_OFF else {})}


def cuda_gradients(model, auto_class, mode, seed=0, autocast=False):
    model.zero_grad(set_to_none=True)
    ids, mask = (t.cuda() for t in batch())
    with torch.random.fork_rng(devices=[torch.cuda.current_device()]):
        torch.manual_seed(seed)
        with model.meft_backward(mode), torch.autocast("cuda", torch.bfloat16, enabled=autocast):
            loss = loss_of(model, auto_class, ids, mask)
        loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("engine", ["int64", "int32-chunked"])
@pytest.mark.parametrize("variant", ["meft1", "meft2", "meft3"])
@pytest.mark.parametrize("config_name,auto_class", CASES)
def test_gradients_bitwise_with_deterministic_kernels(config_name, auto_class, variant, engine):
    model = build(config_name, auto_class, dtype=torch.bfloat16, variant=variant, plm=plm_settings(config_name, "eager"),
                  **ENGINES[engine])
    model.cuda().train()
    torch.use_deterministic_algorithms(True)
    try:
        vanilla = cuda_gradients(model, auto_class, "vanilla")
        reversible_grads = cuda_gradients(model, auto_class, "reversible")
    finally:
        torch.use_deterministic_algorithms(False)
    assert set(vanilla) == set(reversible_grads) and vanilla
    for key in vanilla:
        assert torch.equal(vanilla[key], reversible_grads[key]), key


@pytest.mark.parametrize("engine", ["int64", "int32-chunked-offload"])
@pytest.mark.parametrize("autocast", [False, True], ids=["bf16", "fp32-autocast"])
@pytest.mark.parametrize("variant", ["meft1", "meft2", "meft3"])
@pytest.mark.parametrize("config_name,auto_class", CASES)
def test_sdpa_reconstruction_is_bit_exact_and_compiled(config_name, auto_class, variant, autocast, engine):
    dtype = torch.float32 if autocast else torch.bfloat16
    model = build(config_name, auto_class, dtype=dtype, variant=variant, plm=plm_settings(config_name, "sdpa"),
                  **ENGINES[engine])
    model.cuda().train()
    for layers in model.meft_stacks:
        layers.trace = []
    cuda_gradients(model, auto_class, "reversible", autocast=autocast)  # the audit would raise on a mismatch
    for layers in model.meft_stacks:
        forward = {name: (a, b) for kind, name, a, b in layers.trace if kind == "forward"}
        rebuilt = [(name, a, b) for kind, name, a, b in layers.trace if kind == "backward"]
        assert len(rebuilt) == len(forward) == len(layers)
        for name, a, b in rebuilt:
            assert a.is_cuda and torch.equal(forward[name][0], a) and torch.equal(forward[name][1], b)
    assert fixed_point._COMPILE["enabled"]  # the half-steps ran compiled


@pytest.mark.parametrize("variant", ["meft1", "meft3"])
@pytest.mark.parametrize("config_name", ["tinyllama-1.1b", "opt-125m"])
def test_causal_core_without_a_mask_rebuilds_exactly_and_trains_like_the_whole_attention(config_name, variant):
    """Without padding the model passes no mask: each chunk of queries after a sequence's first
    attends aligned to the lower right (flash attention, TinyLlama's grouped-query heads as they
    are). Reconstruction is bit-exact; loss and gradients are those of the attention over the
    whole sequence at once, to bf16 rounding."""
    ids = torch.randint(3, 1000, (2, 16), generator=torch.Generator().manual_seed(0)).cuda()
    mask = torch.ones_like(ids)
    results = {}
    for chunk in (5, 0):
        model = build(config_name, "AutoModelForCausalLM", dtype=torch.bfloat16, variant=variant,
                      plm=plm_settings(config_name, "sdpa") | {"attention_dropout": 0.0, "dropout": 0.0},
                      chunk_attention_queries=True, **dict(ENGINES["int32-chunked"], recompute_chunk_tokens=chunk))
        model.cuda().train()
        [layers] = model.meft_stacks
        layers.trace = []
        model.zero_grad(set_to_none=True)
        loss = loss_of(model, "AutoModelForCausalLM", ids, mask)
        loss.backward()
        forward = {name: (a, b) for kind, name, a, b in layers.trace if kind == "forward"}
        rebuilt = [(name, a, b) for kind, name, a, b in layers.trace if kind == "backward"]
        assert len(rebuilt) == len(layers) and all(torch.equal(forward[n][0], a) and torch.equal(forward[n][1], b)
                                                     for n, a, b in rebuilt)
        results[chunk] = loss.detach().float(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}
    (loss_c, chunked), (loss_w, whole) = results[5], results[0]
    assert abs(loss_c - loss_w) <= 1e-2 * abs(loss_w)
    assert set(chunked) == set(whole)
    for key in whole:
        if not whole[key].any():  # behind a zero-initialised projection
            assert not chunked[key].any(), key
            continue
        cosine = torch.nn.functional.cosine_similarity(chunked[key].flatten(), whole[key].flatten(), dim=0)
        assert cosine > 0.99, (key, float(cosine))


def test_offloaded_remainders_live_in_pinned_host_memory_and_change_nothing():
    from torch import nn

    from tests.test_reversible import D, ToyBlock, couplings, host_bytes

    torch.manual_seed(0)
    blocks = nn.ModuleList([ToyBlock() for _ in range(8)]).cuda().to(torch.bfloat16)
    x = torch.randn(4, 300, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    results = {}
    for offload in (False, True):
        settings = arithmetic.CouplingSettings(1 / 256, 1 / 256, swap=False, stream_bits=32, frac_bits=20,
                                               chunk_tokens=256, offload_remainders=offload)
        blocks.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        y1, y2 = reversible.run_stack(x, couplings(blocks), settings, {}, mode="reversible")
        run = y1.grad_fn.run
        host = host_bytes(run)
        (y1.float().sum() + (y2.float() ** 2).sum()).backward()
        results[offload] = (host, [p.grad.clone() for p in blocks.parameters()])
    # 4 layers, 2 streams, 8 bits for each of the 1200 x 16 elements
    assert results[False][0] == 0 and results[True][0] == 4 * 2 * 1200 * D
    assert all(torch.equal(a, b) for a, b in zip(results[False][1], results[True][1]))


def test_remainders_go_to_the_host_from_the_step_size_the_default_names(monkeypatch):
    from meft_convert.templates.modeling_meft import OFFLOAD_MIN_TOKENS

    seen = []
    original = fixed_point.RemainderStore.__init__

    def spy(self, offload, device):
        original(self, offload, device)
        seen.append(self.offload)

    monkeypatch.setattr(fixed_point.RemainderStore, "__init__", spy)
    model = build("tinyllama-1.1b", "AutoModelForCausalLM", dtype=torch.bfloat16, variant="meft3",
                  stream_bits=32, frac_bits=20).cuda().train()
    for tokens in (OFFLOAD_MIN_TOKENS // 2, OFFLOAD_MIN_TOKENS):
        ids = torch.randint(3, 1000, (1, tokens), device="cuda")
        model(input_ids=ids, labels=ids).loss.backward()
    assert seen == [False, True]


@pytest.mark.parametrize("heads, kv_heads, head_dim", [(32, 8, 128), (32, 4, 64), (12, 12, 64)])
def test_lower_right_query_chunks_run_on_cudnn_split_at_the_diagonal(heads, kv_heads, head_dim):
    """Llama-3-8B's, TinyLlama's and OPT-125m's heads: a lower-right chunk of 1024 queries after
    3072 positions runs as cuDNN's two calls merged (SplitCausalAttention) and matches float32
    lower-right causal attention, output and gradients, to bf16 rounding."""
    from torch.nn.attention.bias import causal_lower_right

    from meft_convert.templates import family_kernels as kernels

    gen = torch.Generator(device="cuda").manual_seed(0)
    start, count = 3072, 1024
    q = torch.randn(1, heads, count, head_dim, device="cuda", dtype=torch.bfloat16, generator=gen, requires_grad=True)
    k, v = (torch.randn(1, kv_heads, start + count, head_dim, device="cuda", dtype=torch.bfloat16, generator=gen,
                        requires_grad=True) for _ in range(2))
    grad = torch.randn_like(q)
    assert kernels._split_causal_runs(q, k)
    got = kernels._split_causal().apply(q, k, v, start, head_dim**-0.5, kernels._cudnn_attention,
                                        kernels._cudnn_attention_backward)
    got_grads = torch.autograd.grad(got, (q, k, v), grad)
    want = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), attn_mask=causal_lower_right(count, start + count), scale=head_dim**-0.5,
        enable_gqa=heads != kv_heads)
    want_grads = torch.autograd.grad(want, (q, k, v), grad.float())
    for name, a, b in zip("out dq dk dv".split(), (got, *got_grads), (want, *want_grads)):
        assert a.shape == b.shape, name
        error = (a.float() - b).norm() / b.norm()
        assert error < 1e-2, (name, float(error))


def _memory_speed():
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "memory_speed.py"
    spec = importlib.util.spec_from_file_location("memory_speed_benchmark", path)
    module = sys.modules.get(spec.name) or importlib.util.module_from_spec(spec)
    if spec.name not in sys.modules:
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")
@pytest.mark.parametrize("chunk", [256, 1024, 4096])
def test_an_nf4_base_at_llama_3_8b_width_trains_bit_for_bit_like_plain_autograd(chunk, monkeypatch):
    """Two Llama-3-8B layers in NF4 (bitsandbytes Linear4bit, as load_in_4bit loads them), 4096
    tokens: bitsandbytes multiplies up to 1536 rows with its own 4-bit kernels and dequantizes into
    cuBLAS above, so the recompute must run the forward's row counts. Chunks of 256 and 1024 rows
    take the first path, the whole sequence the second: the streams rebuild bit-exactly and the
    adapters' gradients equal plain autograd's through the same model."""
    ms = _memory_speed()
    monkeypatch.setitem(ms.RUN, "profile", "llm")
    monkeypatch.setitem(ms.RUN, "recompute_chunk_tokens", chunk)
    shape = dict(ms.SHAPES["llama-3-8b"], seq=4096, overrides=dict(num_hidden_layers=2))
    device = torch.device("cuda")
    plain = ms.build_plain(shape, device, torch.bfloat16, attention="eager", base="nf4")
    batch = ms.make_batch(shape, plain.config, device)
    torch.use_deterministic_algorithms(True)
    try:
        for method in ("meft1+offload", "meft3"):
            model, _ = ms.build_shared(plain, shape, method, device, torch.bfloat16, attention="eager")
            [stack] = model.meft_stacks
            stack.trace = []
            reversible = ms._grads(model, batch, "reversible", seed=0)
            seen = {(name, phase): tensors for phase, name, *tensors in stack.trace}
            stack.trace = None
            vanilla = ms._grads(model, batch, "vanilla", seed=0)
            comparison = ms._compare(reversible, vanilla)
            assert comparison["tensors"] == len(vanilla) > 0
            assert comparison["bitwise_equal"] == comparison["tensors"], (method, comparison)
            # every layer's input, rebuilt in backward, is the one forward saw, in all elements
            names = {name for name, _ in seen}
            assert len(names) == 2 and all(
                all(torch.equal(a, b) for a, b in zip(seen[name, "forward"], seen[name, "backward"])) for name in names
            ), method
            del model
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="needs trl")
@pytest.mark.parametrize("engine", ["int64", "int32-chunked-offload"])
@pytest.mark.parametrize("variant", ["meft1", "meft3"])
def test_trl_activation_offloading_moves_saved_tensors_and_changes_no_gradient(variant, engine):
    """TRL's `activation_offloading=True` runs each training step (forward and backward) inside
    `get_act_offloading_ctx_manager(model)`: saved-tensor hooks that copy what autograd saves to
    pinned host memory on a side stream and back. The reversible backward recomputes inside those
    hooks too; its gradients stay plain autograd's bit for bit."""
    from trl.models.activation_offloading import get_act_offloading_ctx_manager

    auto = "AutoModelForCausalLM"
    model = build("tinyllama-1.1b", auto, dtype=torch.bfloat16, variant=variant,
                  plm=plm_settings("tinyllama-1.1b", "eager"), **ENGINES[engine])
    model.cuda().train()
    offloading = get_act_offloading_ctx_manager(model, min_offload_size=256)
    torch.use_deterministic_algorithms(True)
    try:
        vanilla = cuda_gradients(model, auto, "vanilla")
        with offloading:
            offloaded = cuda_gradients(model, auto, "reversible")
            packed_in_forward = offloading.tensor_id
            offloaded_again = cuda_gradients(model, auto, "reversible")  # its state resets between steps
    finally:
        torch.use_deterministic_algorithms(False)
    assert packed_in_forward > 0 and offloading.tracker == {}
    assert set(vanilla) == set(offloaded) and vanilla
    for key in vanilla:
        assert torch.equal(vanilla[key], offloaded[key]), key
        assert torch.equal(offloaded[key], offloaded_again[key]), key


@pytest.mark.parametrize("engine", ["int64", "int32-chunked-queries"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("variant", ["meft1", "meft3"])
def test_packed_rows_on_cuda_stay_apart_in_forward_and_in_the_recompute(variant, attention, engine):
    """Padding-free packing as flash-attention users feed it (one row, position_ids restarting at 0,
    no mask), on CUDA: the packed row's loss and gradients equal the sequences run one by one, and
    plain autograd's through the same row bit for bit."""
    from tests.test_training import PACKED_ENGINES, _packed_gradients

    model = build("tinyllama-1.1b", "AutoModelForCausalLM", variant=variant, plm={"attn_implementation": attention},
                  **PACKED_ENGINES[engine])
    model.cuda().eval()  # no dropout, so packed and separate rows compute the same; gradients still flow
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, 1000, (n,), generator=g).cuda() for n in (11, 7, 9)]
    torch.use_deterministic_algorithms(True)
    try:
        loss, packed = _packed_gradients(model, rows, packed=True)
        loss_v, vanilla = _packed_gradients(model, rows, packed=True, mode="vanilla")
        loss_s, alone = _packed_gradients(model, rows, packed=False)
        loss_joined, _ = _packed_gradients(model, rows, packed=True, positions=False)
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(loss, loss_v)
    assert vanilla.keys() == packed.keys() and all(torch.equal(vanilla[k], packed[k]) for k in packed)
    assert loss.item() == pytest.approx(loss_s.item(), rel=1e-5, abs=0)
    for key in alone:
        scale = alone[key].abs().max().item()
        assert scale > 0 and (packed[key] - alone[key]).abs().max().item() <= 1e-4 * scale, key
    assert abs(loss_joined.item() - loss_s.item()) > 1e-3  # joined without positions, the rows attend across
