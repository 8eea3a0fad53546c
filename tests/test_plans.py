"""The execution plans: which one a block runs with, chosen in one place for every path."""

from __future__ import annotations

import pytest
import torch

from meft_convert.templates import blocks as B
from meft_convert.templates import plans as P
from tests.test_reversible import D, ToyAttention, ToyCausalAttention


def _blocks() -> dict[str, B.Block]:
    attention, causal = ToyAttention(), ToyCausalAttention()
    return {
        "mixing": B.Block(mixing=lambda x, routed: x),
        "positionwise": B.Block(positionwise=lambda x: x),
        "mixing+positionwise": B.Block(mixing=lambda x, routed: x, positionwise=lambda x: x),
        "before": B.Block(before=attention.before, mixing=attention.core, positionwise=attention.finish),
        "causal": causal.block(),
    }


@pytest.mark.parametrize("kind, one_chunk, several_chunks", [
    ("mixing", P.PartByPart, P.PartByPart),
    ("positionwise", P.PartByPart, P.PartByPart),
    ("mixing+positionwise", P.OneGraph, P.PartByPart),
    ("before", P.OneGraph, P.PartByPart),
    ("causal", P.OneGraph, P.CausalQueries),
])
def test_a_block_runs_as_one_graph_in_one_chunk_and_by_query_chunks_only_with_a_causal_core(kind, one_chunk,
                                                                                           several_chunks):
    block = _blocks()[kind]
    x = torch.zeros(2, 7, D)
    for chunk_tokens in (0, 14, 100):  # every row in one chunk
        assert type(P.plan_for(block, x, chunk_tokens)) is one_chunk
    for chunk_tokens in (1, 3, 13):
        assert type(P.plan_for(block, x, chunk_tokens)) is several_chunks


def test_one_graph_and_part_by_part_compute_the_same_block_under_autograd():
    torch.manual_seed(0)
    attention = ToyAttention().double().eval()
    block = B.Block(before=attention.before, mixing=attention.core, positionwise=attention.finish)
    x = torch.randn(2, 7, D, dtype=torch.float64, requires_grad=True)
    routed = {"position": torch.rand(1, 7, 8, dtype=torch.float64)}
    whole = P.ONE_GRAPH.vanilla(block, x, routed, 0)
    (g_whole,) = torch.autograd.grad(whole.sum(), x)
    chunked = P.PART_BY_PART.vanilla(block, x, routed, 5)
    (g_chunked,) = torch.autograd.grad(chunked.sum(), x)
    assert torch.allclose(whole, chunked, rtol=1e-12, atol=1e-12)
    assert torch.allclose(g_whole, g_chunked, rtol=1e-12, atol=1e-12)
