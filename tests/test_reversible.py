"""The reversible engine on its own: small blocks, no transformers."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

from meft_convert.templates import arithmetic as A
from meft_convert.templates import blocks as B
from meft_convert.templates.meft_table import packed_remainder_bytes
from meft_convert.templates import plans as P
from meft_convert.templates import reversible as R

D = 16


class ToyBlock(nn.Module):
    """A residual MLP with dropout that also reads a routed scale and an optional routed tensor."""

    def __init__(self, dropout: float = 0.1):
        super().__init__()
        self.a, self.b = nn.Linear(D, 32), nn.Linear(32, D)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, routed):
        h = self.drop(self.b(torch.relu(self.a(x)))) * routed.get("scale", 1.0)
        if routed.get("context") is not None:
            h = h + routed["context"].to(h.dtype)
        return h + x


def couplings(blocks: nn.ModuleList) -> list[R.Coupling]:
    result = []
    for i in range(len(blocks) // 2):
        F, G = blocks[2 * i], blocks[2 * i + 1]
        params = tuple(p for p in [*F.parameters(), *G.parameters()] if p.requires_grad)
        result.append(R.Coupling(F, G, params, f"layer {i}"))
    return result


def run(blocks, x, settings, mode, routed=None, seed=1, **kw):
    """Forward and backward of a fixed loss; returns outputs, input grad, param grads, trace."""
    blocks.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(x.requires_grad)
    trace = []
    torch.manual_seed(seed)
    y1, y2 = R.run_stack(x, couplings(blocks), settings, routed or {"scale": 0.5}, mode=mode, trace=trace, **kw)
    (y1.sum() * 1.3 + (y2**2).sum()).backward()
    return {
        "y": (y1.detach(), y2.detach()),
        "dx": None if x.grad is None else x.grad.clone(),
        "grads": [None if p.grad is None else p.grad.clone() for p in blocks.parameters()],
        "trace": trace,
    }


SETTINGS = {
    "meft1-like": dict(lambda_=0.1, beta=1.0, swap=True),
    "meft2-like": dict(lambda_=1.0, beta=0.1, swap=True),
    "meft3-like": dict(lambda_=0.1, beta=0.1, swap=False),
    "tiny-scales": dict(lambda_=2.0**-10, beta=2.0**-10, swap=False),
}


@pytest.fixture
def blocks():
    torch.manual_seed(0)
    return nn.ModuleList([ToyBlock() for _ in range(8)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("name", list(SETTINGS))
def test_reversible_gradients_are_bitwise_plain_autograd(blocks, dtype, name):
    blocks.to(dtype)
    settings = A.CouplingSettings(**SETTINGS[name])
    x = torch.randn(3, 5, D, dtype=dtype, requires_grad=True)
    vanilla = run(blocks, x, settings, "vanilla")
    reversible = run(blocks, x, settings, "reversible")
    assert torch.equal(vanilla["y"][0], reversible["y"][0]) and torch.equal(vanilla["y"][1], reversible["y"][1])
    assert torch.equal(vanilla["dx"], reversible["dx"])
    for a, b in zip(vanilla["grads"], reversible["grads"]):
        assert torch.equal(a, b)
    # dropout was active: a second seed gives other gradients
    other = run(blocks, x, settings, "reversible", seed=2)
    assert not torch.equal(other["grads"][0], reversible["grads"][0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(SETTINGS))
def test_reconstruction_is_bit_exact(blocks, dtype, name):
    blocks.to(dtype)
    result = run(blocks, torch.randn(2, 7, D, dtype=dtype), A.CouplingSettings(**SETTINGS[name]), "reversible")
    forward = {n: (a, b) for kind, n, a, b in result["trace"] if kind == "forward"}
    rebuilt = {n: (a, b) for kind, n, a, b in result["trace"] if kind == "backward"}
    assert set(forward) == set(rebuilt) == {f"layer {i}" for i in range(4)}
    for n in forward:
        assert forward[n][0].dtype == torch.int64
        assert torch.equal(forward[n][0], rebuilt[n][0]) and torch.equal(forward[n][1], rebuilt[n][1])


def test_float_reconstruction_error_grows_as_in_the_paper(blocks):
    """The paper's float inverse divides by λ per layer; its error grows with depth."""
    settings = A.CouplingSettings(lambda_=0.1, beta=0.1, swap=False, exact=False)
    result = run(blocks, torch.randn(2, 7, D), settings, "reversible")
    forward = {n: a for kind, n, a, _ in result["trace"] if kind == "forward"}
    errors = [
        ((forward[n] - a).norm() / forward[n].norm()).item() for kind, n, a, _ in result["trace"] if kind == "backward"
    ]
    assert errors[-1] > 1e-3  # layer 0, rebuilt last: visibly wrong
    assert errors[-1] > 100 * errors[0]


def test_outer_rng_state_is_untouched(blocks):
    settings = A.CouplingSettings(0.1, 0.1, swap=False)
    x = torch.randn(2, 4, D, requires_grad=True)
    torch.manual_seed(3)
    y1, y2 = R.run_stack(x, couplings(blocks), settings, {}, mode="reversible")
    after_forward = torch.get_rng_state()
    (y1 + y2).sum().backward()
    assert torch.equal(after_forward, torch.get_rng_state())
    # and the forward drew from the global generator exactly as plain autograd does
    torch.manual_seed(3)
    R.run_stack(x, couplings(blocks), settings, {}, mode="vanilla")
    assert torch.equal(after_forward, torch.get_rng_state())


def test_frozen_input_still_delivers_parameter_gradients(blocks):
    """Embeddings frozen: the stack's input needs no grad, the adapters' parameters do."""
    for block in blocks[::2]:
        block.requires_grad_(False)
    settings = A.CouplingSettings(0.1, 0.1, swap=False)
    x = torch.randn(2, 4, D)  # requires_grad=False
    vanilla = run(blocks, x, settings, "vanilla")
    reversible = run(blocks, x, settings, "reversible")
    trainable = [i for i, p in enumerate(blocks.parameters()) if p.requires_grad]
    assert trainable and all(reversible["grads"][i] is not None for i in trainable)
    for i in trainable:
        assert torch.equal(vanilla["grads"][i], reversible["grads"][i])
    assert all(reversible["grads"][i] is None for i, p in enumerate(blocks.parameters()) if not p.requires_grad)


def test_routed_tensor_requiring_grad_gets_its_gradient(blocks):
    """A tensor every block reads (like encoder states for cross-attention) is differentiated."""
    settings = A.CouplingSettings(0.1, 1.0, swap=True)
    x = torch.randn(2, 4, D, requires_grad=True)
    grads = {}
    for mode in ("vanilla", "reversible"):
        context = torch.randn(2, 4, D, generator=torch.Generator().manual_seed(0)).requires_grad_()
        run(blocks, x, settings, mode, routed={"context": context, "scale": 0.5})
        grads[mode] = context.grad
    assert grads["reversible"] is not None and grads["reversible"].abs().sum() > 0
    assert torch.equal(grads["reversible"], grads["vanilla"])


@pytest.mark.parametrize("k", [0, 1, 3, 4])
def test_hybrid_lower_layers_reversible(blocks, k):
    settings = A.CouplingSettings(0.1, 0.1, swap=False)
    x = torch.randn(2, 5, D, requires_grad=True)
    vanilla = run(blocks, x, settings, "vanilla")
    hybrid = run(blocks, x, settings, "reversible", reversible_layers=k)
    assert {n for kind, n, *_ in hybrid["trace"] if kind == "forward"} == {f"layer {i}" for i in range(k)}
    for a, b in zip(vanilla["grads"], hybrid["grads"]):
        assert torch.equal(a, b)


def test_float_mode_matches_the_float_coupling_forward(blocks):
    settings = A.CouplingSettings(0.1, 0.1, swap=False)
    x = torch.randn(2, 5, D)
    blocks.eval()
    with torch.no_grad():
        exact = R.run_stack(x, couplings(blocks), settings, {}, mode="vanilla")
        plain = R.run_stack(x, couplings(blocks), settings, {}, mode="float")
    for a, b in zip(exact, plain):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()


class Flaky(ToyBlock):
    """Adds a different tiny number on every call: a non-deterministic kernel."""

    calls = 0

    def forward(self, x, routed):
        Flaky.calls += 1
        return super().forward(x, routed) + Flaky.calls * 1e-3


def test_audit_names_the_non_deterministic_layer():
    torch.manual_seed(0)
    blocks = nn.ModuleList([ToyBlock(0.0) for _ in range(8)])
    blocks[5] = Flaky(0.0)  # G of layer 2
    x = torch.randn(2, 3, D, requires_grad=True)
    y1, y2 = R.run_stack(x, couplings(blocks), A.CouplingSettings(0.1, 0.1, swap=False), {}, mode="reversible")
    with pytest.raises(R.ReconstructionError, match="layer 2"):
        (y1 + y2).sum().backward()


class Exploding(ToyBlock):
    def forward(self, x, routed):
        return super().forward(x, routed) * float("inf")


@pytest.mark.parametrize("mode", ["reversible", "vanilla"])
def test_non_finite_block_output_is_reported_with_its_layer(mode):
    torch.manual_seed(0)
    blocks = nn.ModuleList([ToyBlock() for _ in range(8)])
    blocks[6] = Exploding()  # F of layer 3
    with pytest.raises(FloatingPointError, match=r"layer 3 \(F\)"):
        R.run_stack(torch.randn(2, 3, D, requires_grad=True), couplings(blocks), A.CouplingSettings(0.1, 0.1, False), {}, mode=mode)


def host_bytes(run) -> int:
    """Bytes of packed remainders a run keeps in host memory."""
    store = run.remainders
    if store is None or not store.offload:
        return 0
    return sum(t.numel() * t.element_size() for chunks in store.parts for planes in chunks for t in planes or ())


def kept_bytes(run) -> int:
    """Bytes a run holds for backward beside the saved tensors: the final streams, RNG states,
    checksums and any remainders in host memory."""
    total = 0
    for stream in run.final_streams or ():
        for t in (stream.ints, stream.value):
            total += 0 if t is None else t.numel() * t.element_size()
    for layer in run.layers:
        for record in (layer.F.record, layer.G.record):
            for rng in (record.mixing, *record.chunks, *record.before, *record.cores):
                if rng is not None:
                    total += rng.cpu.numel() + (0 if rng.device_state is None else rng.device_state.numel())
        total += 0 if layer.checksum is None else layer.checksum.numel() * 8
    return total + host_bytes(run)


class _SavedTracker:
    """Counts the bytes autograd still holds for backward after a forward, excluding parameters."""

    class _Holder:
        def __init__(self, t):
            # detached: holding a saved output with its grad_fn would make a reference cycle
            # that keeps short-lived graphs alive and inflates the count
            self.t = t.detach()

    def __init__(self, exclude):
        self.holders = weakref.WeakSet()
        self.exclude = {p.untyped_storage().data_ptr() for p in exclude}

    def pack(self, t):
        holder = self._Holder(t)
        self.holders.add(holder)
        return holder

    def unpack(self, holder):
        return holder.t

    def live_bytes(self) -> int:
        gc.collect()
        storages = {}
        for h in list(self.holders):
            s = h.t.untyped_storage()
            if s.data_ptr() not in self.exclude:
                storages[s.data_ptr()] = s.nbytes()
        return sum(storages.values())


def saved_bytes(depth: int, mode: str, shape=(4, 64)) -> tuple[int, int]:
    torch.manual_seed(0)
    blocks = nn.ModuleList([ToyBlock() for _ in range(2 * depth)])
    tracker = _SavedTracker(blocks.parameters())
    x = torch.randn(*shape, D, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(tracker.pack, tracker.unpack):
        y1, y2 = R.run_stack(x, couplings(blocks), A.CouplingSettings(0.1, 0.1, False), {}, mode=mode)
    kept = kept_bytes(y1.grad_fn.run) if mode == "reversible" else 0
    return tracker.live_bytes(), kept


def test_saved_bytes_grow_with_depth_by_the_remainders_only():
    shape = (4, 64)
    elements = 4 * 64 * D
    remainders_per_layer = 2 * packed_remainder_bytes(10, elements)  # two streams, 3.33 bits each
    saved2, kept2 = saved_bytes(2, "reversible", shape)
    saved8, kept8 = saved_bytes(8, "reversible", shape)
    assert saved8 - saved2 == 6 * remainders_per_layer
    # per layer also two RNG states and a checksum: a few KB, whatever the batch
    assert (kept8 - kept2) / 6 <= 16 * 1024
    vanilla2, _ = saved_bytes(2, "vanilla", shape)
    vanilla8, _ = saved_bytes(8, "vanilla", shape)
    assert vanilla8 - vanilla2 > 10 * (saved8 - saved2)


def test_a_second_backward_through_one_forward_is_refused(blocks):
    # backward consumes the final streams as it rebuilds the layers below them
    x = torch.randn(2, 5, D, requires_grad=True)
    y1, y2 = R.run_stack(x, couplings(blocks), A.CouplingSettings(0.1, 0.1, False), {}, mode="reversible")
    assert kept_bytes(y1.grad_fn.run) >= 2 * x.numel() * 8  # two int64 streams
    (y1.sum() + y2.sum()).backward(retain_graph=True)
    assert y1.grad_fn.run.final_streams is None
    with pytest.raises(RuntimeError, match="a second time"):
        (y1.sum() + y2.sum()).backward()


class NestedRoutedBlock(ToyBlock):
    """Reads a tensor from inside a tuple inside a dict, as routed arguments may carry them."""

    def forward(self, x, routed):
        context = routed["extras"]["pair"][0]
        return super().forward(x, {}) + context.to(x.dtype) * routed["extras"]["pair"][1]


def test_routed_tensors_inside_containers_get_their_gradients():
    settings = A.CouplingSettings(0.1, 0.1, swap=False)
    grads = {}
    for mode in ("vanilla", "reversible"):
        torch.manual_seed(0)
        blocks = nn.ModuleList([NestedRoutedBlock() for _ in range(4)])
        context = torch.randn(2, 4, D, generator=torch.Generator().manual_seed(0)).requires_grad_()
        x = torch.randn(2, 4, D, generator=torch.Generator().manual_seed(1))
        torch.manual_seed(1)
        y1, y2 = R.run_stack(x, couplings(blocks), settings, {"extras": {"pair": (context, 0.5)}}, mode=mode)
        (y1.sum() + (y2**2).sum()).backward()
        grads[mode] = context.grad
    assert grads["reversible"] is not None and grads["reversible"].abs().sum() > 0
    assert torch.equal(grads["reversible"], grads["vanilla"])


def test_double_backward_is_refused_with_what_to_do(blocks):
    x = torch.randn(2, 5, D, requires_grad=True)
    y1, y2 = R.run_stack(x, couplings(blocks), A.CouplingSettings(0.1, 0.1, False), {}, mode="reversible")
    params = [p for p in blocks.parameters()]
    with pytest.raises(RuntimeError, match="create_graph=True.*vanilla"):
        torch.autograd.grad((y1 + y2).sum(), params, create_graph=True)


class Constant(nn.Module):
    def __init__(self, value: float):
        super().__init__()
        self.value = value

    def forward(self, x, routed):
        return torch.full_like(x, self.value)


@pytest.mark.parametrize("stream_bits,frac_bits,value,layers", [(64, 32, 2.0**23, 300), (32, 20, 100.0, 20)])
@pytest.mark.parametrize("mode", ["reversible", "vanilla"])
def test_streams_of_scale_one_are_range_checked(stream_bits, frac_bits, value, layers, mode):
    """With λ = β = 1 nothing shrinks the streams: block outputs far inside the range still sum
    past it. The streams themselves are checked, so this raises instead of wrapping around."""
    blocks = nn.ModuleList([Constant(value) for _ in range(2 * layers)])
    settings = A.CouplingSettings(1.0, 1.0, swap=False, stream_bits=stream_bits, frac_bits=frac_bits)
    x = torch.zeros(1, 2, D, requires_grad=True)
    with pytest.raises(FloatingPointError, match=r"layer \d+ \([FG]\)"):
        R.run_stack(x, couplings(blocks), settings, {}, mode=mode)
    # the stack input is checked too, and a few layers of the same outputs are fine
    with pytest.raises(FloatingPointError, match="the stack input"):
        R.run_stack(x.detach() + 4 * value * layers, couplings(blocks[:2]), settings, {}, mode=mode)
    R.run_stack(x, couplings(blocks[:4]), settings, {}, mode=mode)


def positionwise_couplings(blocks: nn.ModuleList) -> list[R.Coupling]:
    """F mixes (a toy block reading routed arguments), G is position-wise: chunkable."""
    result = []
    for i in range(len(blocks) // 2):
        F, G = blocks[2 * i], blocks[2 * i + 1]
        params = tuple(p for p in [*F.parameters(), *G.parameters()] if p.requires_grad)
        result.append(R.Coupling(B.Block(mixing=F, positionwise=lambda h, G=G: G(h, {})), B.Block(positionwise=lambda h, G=G: G(h, {})), params, f"layer {i}"))
    return result


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("stream_bits,frac_bits", [(64, 32), (32, 20)])
def test_chunked_positionwise_parts_rebuild_exactly_and_match_plain_autograd(blocks, dtype, stream_bits, frac_bits):
    blocks.to(dtype)
    settings = A.CouplingSettings(0.1, 1 / 256, swap=True, stream_bits=stream_bits, frac_bits=frac_bits, chunk_tokens=3)
    x = torch.randn(2, 7, D, dtype=dtype, requires_grad=True)  # 14 tokens: chunks of 3, 3, 3, 3, 2
    results = {}
    for mode in ("vanilla", "reversible"):
        blocks.zero_grad(set_to_none=True)
        trace = []
        torch.manual_seed(4)
        y1, y2 = R.run_stack(x, positionwise_couplings(blocks), settings, {"scale": 0.5}, mode=mode, trace=trace)
        (y1.float().sum() * 1.3 + (y2.float() ** 2).sum()).backward()
        results[mode] = ([p.grad.clone() for p in blocks.parameters()], trace)
    assert all(torch.equal(a, b) for a, b in zip(results["vanilla"][0], results["reversible"][0]))
    trace = results["reversible"][1]
    forward = {n: (a, b) for kind, n, a, b in trace if kind == "forward"}
    rebuilt = [(n, a, b) for kind, n, a, b in trace if kind == "backward"]
    assert len(rebuilt) == 4 and all(torch.equal(forward[n][0], a) and torch.equal(forward[n][1], b) for n, a, b in rebuilt)
    assert {a.dtype for _, a, _ in rebuilt} == {torch.int32 if stream_bits == 32 else torch.int64}


class ToyAttention(nn.Module):
    """An attention block in three parts: per-position projections (with dropout and a routed
    per-position tensor taken by rows), attention over the whole sequence, then an output
    projection and the residual."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(D, 3 * 8)
        self.out = nn.Linear(8, D)
        self.drop = nn.Dropout(0.1)

    def before(self, x, routed, rows):
        q, k, v = self.qkv(self.drop(x) + torch.tanh(x)).split(8, dim=-1)  # x read twice, as a norm reads it
        return q * rows.take(routed["position"]).to(q.dtype), k, v

    def core(self, parts, routed):
        q, k, v = parts
        return torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, dim=-1) @ v

    def finish(self, h, x):
        return x + self.out(h)


def split_couplings(blocks: nn.ModuleList) -> list[R.Coupling]:
    """F is a three-part attention block, G a position-wise MLP: both chunkable."""
    result = []
    for i in range(len(blocks) // 2):
        F, G = blocks[2 * i], blocks[2 * i + 1]
        params = tuple(p for p in [*F.parameters(), *G.parameters()] if p.requires_grad)
        block_f = B.Block(before=F.before, mixing=F.core, positionwise=F.finish)
        result.append(R.Coupling(block_f, B.Block(positionwise=lambda h, G=G: G(h, {})), params, f"layer {i}"))
    return result


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_tokens", [3, 7, 0])
def test_blocks_with_a_before_part_rebuild_exactly_and_match_plain_autograd(dtype, chunk_tokens):
    torch.manual_seed(0)
    blocks = nn.ModuleList([ToyAttention() if i % 2 == 0 else ToyBlock() for i in range(8)]).to(dtype)
    settings = A.CouplingSettings(2.0**-8, 2.0**-8, swap=False, stream_bits=32, frac_bits=20, chunk_tokens=chunk_tokens)
    x = torch.randn(2, 7, D, dtype=dtype)  # 14 rows: chunks of 3 cross the batch boundary, of 7 do not
    routed = {"position": 1 + torch.rand(1, 7, 1).expand(1, 7, 8 * 3)[..., :8].contiguous()}
    results = {}
    for mode in ("vanilla", "reversible"):
        blocks.zero_grad(set_to_none=True)
        leaf = x.clone().requires_grad_()
        trace = []
        torch.manual_seed(4)
        y1, y2 = R.run_stack(leaf, split_couplings(blocks), settings, routed, mode=mode, trace=trace)
        (y1.float().sum() * 1.3 + (y2.float() ** 2).sum()).backward()
        results[mode] = (y1.detach(), leaf.grad, [p.grad for p in blocks.parameters()], trace)
    vanilla, reversible = results["vanilla"], results["reversible"]
    assert torch.equal(vanilla[0], reversible[0])
    assert torch.equal(vanilla[1], reversible[1])
    assert len(vanilla[2]) == 8 * 4 and all(g is not None for g in reversible[2])
    assert all(torch.equal(a, b) for a, b in zip(vanilla[2], reversible[2]))
    forward = {n: (a, b) for kind, n, a, b in reversible[3] if kind == "forward"}
    rebuilt = [(n, a, b) for kind, n, a, b in reversible[3] if kind == "backward"]
    assert len(rebuilt) == 4 and all(torch.equal(forward[n][0], a) and torch.equal(forward[n][1], b) for n, a, b in rebuilt)


def test_a_chunked_before_part_computes_the_unchunked_block():
    torch.manual_seed(0)
    attention = ToyAttention().eval()
    block = B.Block(before=attention.before, mixing=attention.core, positionwise=attention.finish)
    x = torch.randn(3, 5, D, dtype=torch.float64)
    routed = {"position": torch.rand(1, 5, 8, dtype=torch.float64)}
    attention.double()
    whole = P.run_block(block, x, routed)
    q, k, v = attention.before(x, routed, B.Rows(slice(None), (3, 5)))
    assert torch.allclose(whole, attention.finish(attention.core((q, k, v), routed), x), rtol=0, atol=0)
    for chunk in (1, 4, 6, 15):
        assert torch.allclose(P.run_block(block, x, routed, chunk), whole, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="needs a mixing and a position-wise part"):
        B.Block(before=attention.before, mixing=attention.core)


class ToyCausalAttention(ToyAttention):
    """ToyAttention made causal, with its core also a chunk of queries at a time."""

    def core(self, parts, routed):
        q, k, v = parts
        scores = q @ k.transpose(-1, -2) / 8**0.5
        later = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).triu(1)
        return torch.softmax(scores.masked_fill(later, float("-inf")), dim=-1) @ v

    def causal(self, queries, context, routed, rows):
        (q,), (k, v) = queries, context
        outs = []
        for g in rows.sequences():
            n = g.batch.stop - g.batch.start
            qg = q[g.queries].view(n, g.stop - g.start, -1)
            kg, vg = (t[g.keys].view(n, g.stop, -1) for t in (k, v))
            scores = qg @ kg.transpose(-1, -2) / 8**0.5
            later = torch.ones(g.stop, g.stop, dtype=torch.bool).triu(1)[g.start:]
            outs.append((torch.softmax(scores.masked_fill(later, float("-inf")), dim=-1) @ vg).reshape(-1, vg.shape[-1]))
        return torch.cat(outs)

    def block(self) -> B.Block:
        return B.Block(before=self.before, mixing=self.core, positionwise=self.finish,
                       causal=B.CausalCore(self.causal, context=(1, 2)))


@pytest.mark.parametrize("start,stop,length,expected", [
    (0, 14, 7, [(0, 14, 0, 14, 0, 2, 0, 7)]),
    (3, 6, 7, [(0, 3, 0, 6, 0, 1, 3, 6)]),
    (5, 17, 7, [(0, 2, 0, 7, 0, 1, 5, 7), (2, 9, 7, 14, 1, 2, 0, 7), (9, 12, 14, 17, 2, 3, 0, 3)]),
])
def test_rows_split_a_chunk_into_query_groups_by_sequence(start, stop, length, expected):
    rows = B.Rows(slice(start, stop), (3, length))
    got = [(g.queries.start, g.queries.stop, g.keys.start, g.keys.stop, g.batch.start, g.batch.stop, g.start, g.stop)
           for g in rows.sequences()]
    assert got == expected
    assert rows.context == slice(start // length * length, stop)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_tokens", [3, 7, 5, 0])
@pytest.mark.parametrize("swap", [False, True])
def test_blocks_with_a_causal_core_rebuild_exactly_and_match_plain_autograd(dtype, chunk_tokens, swap):
    torch.manual_seed(0)
    blocks = nn.ModuleList([ToyCausalAttention() if i % 2 == 0 else ToyBlock() for i in range(8)]).to(dtype)
    couplings = []
    for i in range(4):
        F, G = blocks[2 * i], blocks[2 * i + 1]
        params = tuple(p for p in [*F.parameters(), *G.parameters()] if p.requires_grad)
        # MEFT1's shape: the causal block followed, in the same half, by a position-wise one
        couplings.append(R.Coupling(F.block(), B.Block(positionwise=lambda h, G=G: G(h, {})), params, f"layer {i}"))
    settings = A.CouplingSettings(2.0**-8, 2.0**-8, swap=swap, stream_bits=32, frac_bits=20, chunk_tokens=chunk_tokens)
    x = torch.randn(2, 7, D, dtype=dtype)  # 14 rows: chunks of 3 and 5 cross the batch boundary, of 7 do not
    routed = {"position": (1 + torch.rand(1, 7, 8)).requires_grad_()}
    results = {}
    for mode in ("vanilla", "reversible"):
        blocks.zero_grad(set_to_none=True)
        routed["position"].grad = None
        leaf = x.clone().requires_grad_()
        trace = []
        torch.manual_seed(4)
        y1, y2 = R.run_stack(leaf, couplings, settings, routed, mode=mode, trace=trace)
        (y1.float().sum() * 1.3 + (y2.float() ** 2).sum()).backward()
        results[mode] = (y1.detach(), leaf.grad, [p.grad for p in blocks.parameters()], routed["position"].grad, trace)
    vanilla, reversible = results["vanilla"], results["reversible"]
    assert torch.equal(vanilla[0], reversible[0])
    assert torch.equal(vanilla[1], reversible[1])
    assert all(g is not None for g in reversible[2])
    assert all(torch.equal(a, b) for a, b in zip(vanilla[2], reversible[2]))
    assert torch.equal(vanilla[3], reversible[3])
    forward = {n: (a, b) for kind, n, a, b in reversible[4] if kind == "forward"}
    rebuilt = [(n, a, b) for kind, n, a, b in reversible[4] if kind == "backward"]
    assert len(rebuilt) == 4 and all(torch.equal(forward[n][0], a) and torch.equal(forward[n][1], b) for n, a, b in rebuilt)


def test_a_causal_core_a_chunk_at_a_time_computes_the_whole_block():
    torch.manual_seed(0)
    attention = ToyCausalAttention().double().eval()
    block = attention.block()
    x = torch.randn(3, 5, D, dtype=torch.float64)
    routed = {"position": torch.rand(1, 5, 8, dtype=torch.float64)}
    whole = P.run_block(block, x, routed)
    for chunk in (1, 2, 4, 6, 15):
        assert torch.allclose(P.run_block(block, x, routed, chunk), whole, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="causal core needs a `before` part"):
        B.Block(mixing=attention.core, positionwise=attention.finish, causal=B.CausalCore(attention.causal, (1, 2)))


@pytest.mark.parametrize("stream_bits,frac_bits", [(64, 32), (32, 20)])
def test_streams_start_a_chunk_of_rows_at_a_time_with_the_same_integers_values_and_checks(stream_bits, frac_bits):
    x = torch.randn(3, 7, D, dtype=torch.bfloat16) * 4
    results = []
    for chunk in (0, 4, 5):
        settings = A.CouplingSettings(0.5, 0.5, swap=False, stream_bits=stream_bits, frac_bits=frac_bits, chunk_tokens=chunk)
        stream, flag = A.ExactArithmetic(settings, torch.bfloat16).start(x)
        results.append((stream.ints, stream.value, stream.checksum, bool(flag)))
    for ints, value, checksum, flag in results[1:]:
        assert torch.equal(ints, results[0][0]) and torch.equal(value, results[0][1])
        assert torch.equal(checksum, results[0][2]) and flag is results[0][3] is False
    # a value out of range in the last chunk alone is caught
    big = x.clone()
    big[2, 6, 0] = 2.0 ** (stream_bits - 1 - frac_bits)
    settings = A.CouplingSettings(0.5, 0.5, swap=False, stream_bits=stream_bits, frac_bits=frac_bits, chunk_tokens=4)
    assert bool(A.ExactArithmetic(settings, torch.bfloat16).start(big)[1])


def _live_stream_integers(shape: tuple) -> int:
    """Stream-integer tensors of `shape` alive now (distinct storages)."""
    # type(), not isinstance(): gc also holds weak proxies, which raise once their object is gone
    return len({t.untyped_storage().data_ptr() for t in gc.get_objects()
                if issubclass(type(t), torch.Tensor) and t.dtype in (torch.int32, torch.int64) and tuple(t.shape) == shape})


@pytest.mark.parametrize("chunk_tokens", [0, 8])
@pytest.mark.parametrize("name", ["meft1-like", "meft3-like"])
def test_backward_keeps_at_most_two_stream_integer_tensors_alive(chunk_tokens, name):
    """While a block runs, in forward or recomputed in backward, only the two streams' integers are
    alive: a half-step's input stream (kept by its caller) is let go once the output is made from
    it, with the work in one chunk (new integers) as in several (written in place)."""
    alive = {"forward": [], "backward": []}
    phase = ["forward"]

    class Counting(ToyBlock):
        def forward(self, x, routed):
            alive[phase[0]].append(_live_stream_integers(STREAM_SHAPE))
            return super().forward(x, routed)

    STREAM_SHAPE = (4, 8, D)
    torch.manual_seed(0)
    blocks = nn.ModuleList([Counting(dropout=0.0) for _ in range(6)])
    settings = A.CouplingSettings(**SETTINGS[name], stream_bits=32, frac_bits=16, chunk_tokens=chunk_tokens)
    x = torch.randn(*STREAM_SHAPE, requires_grad=True)
    y1, y2 = R.run_stack(x, couplings(blocks), settings, {"scale": 0.5}, mode="reversible")  # no trace: it keeps copies
    phase[0] = "backward"
    (y1.sum() + (y2**2).sum()).backward()
    assert len(alive["forward"]) == len(alive["backward"]) == 6, alive
    assert max(alive["forward"]) == max(alive["backward"]) == 2, alive


def test_a_stack_input_that_needs_no_gradient_is_not_kept_for_backward(blocks):
    """Frozen embeddings: the reversible stack rebuilds its layers' inputs itself, so once the
    forward is done nothing holds the stack input (a leaf made to require grad would have been
    held by its AccumulateGrad for a gradient nobody reads: one hidden state per step)."""
    x = torch.randn(2, 5, D)
    y1, y2 = R.run_stack(x, couplings(blocks), A.CouplingSettings(0.5, 0.5, False), {"scale": 0.5}, mode="reversible")
    kept = [fn.variable for fn, _ in y1.grad_fn.next_functions if type(fn).__name__ == "AccumulateGrad"]
    assert len(kept) == len(list(blocks.parameters()))
    assert not any(t.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() for t in kept)
    (y1.sum() + y2.sum()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in blocks.parameters())


@pytest.mark.parametrize("chunk_tokens, befores_per_block, calls_per_half", [(0, 1, 1), (7, 2 * 2, 2 + 1 + 2)])
def test_a_block_in_one_chunk_is_recomputed_once_and_differentiated_by_one_call(monkeypatch, chunk_tokens,
                                                                               befores_per_block, calls_per_half):
    """In one chunk an attention block's three parts are recomputed as one graph and differentiated
    by one autograd call; in chunks, `before` runs twice a chunk (its outputs for the core, then
    differentiated) and each part has calls of its own."""
    befores = {"forward": 0, "backward": 0}
    phase = ["forward"]

    class Counting(ToyAttention):
        def before(self, x, routed, rows):
            befores[phase[0]] += 1
            return super().before(x, routed, rows)

    torch.manual_seed(0)
    blocks = nn.ModuleList([Counting() if i % 2 == 0 else ToyBlock() for i in range(4)])
    settings = A.CouplingSettings(2.0**-8, 2.0**-8, swap=False, stream_bits=32, frac_bits=20, chunk_tokens=chunk_tokens)
    x = torch.randn(2, 7, D, requires_grad=True)
    routed = {"position": 1 + torch.rand(1, 7, 8)}
    y1, y2 = R.run_stack(x, split_couplings(blocks), settings, routed, mode="reversible")
    calls = []
    grad = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: calls.append(1) or grad(*a, **k))
    phase[0] = "backward"
    (y1.sum() + (y2**2).sum()).backward()
    chunks = 1 if chunk_tokens == 0 else 2
    assert befores == {"forward": 2 * chunks, "backward": 2 * befores_per_block}
    # two layers: F (attention) and G (a position-wise block, one call a chunk)
    assert len(calls) == 2 * (calls_per_half + chunks)


@pytest.mark.parametrize("mode", ["reversible", "vanilla"])
def test_a_finished_run_is_freed_without_the_garbage_collector(blocks, mode):
    """A run owns its half-steps; were they to hold it back, every finished run (with the routed
    tensors it keeps: an attention mask, rotary tables) would live on into later steps."""
    runs = []
    original = R.StackRun.__post_init__

    def spy(run):
        runs.append(weakref.ref(run))
        original(run)

    x = torch.randn(2, 5, D, requires_grad=True)
    mask = torch.ones(64, 64)
    gc.collect()
    gc.disable()
    try:
        R.StackRun.__post_init__ = spy
        y1, y2 = R.run_stack(x, couplings(blocks), A.CouplingSettings(0.1, 0.1, False), {"mask": mask}, mode=mode)
        (y1.sum() + y2.sum()).backward()
        del y1, y2
        mask_ref = weakref.ref(mask)
        del mask
        assert runs and all(ref() is None for ref in runs)
        assert mask_ref() is None
    finally:
        R.StackRun.__post_init__ = original
        gc.enable()
