"""What F and G are to the engine, and how their rows are cut into chunks.

A block is a part that mixes positions (attention), a part that acts on each position alone
(an MLP block, an adapter), or both; a `before` part (a norm and attention's input
projections) may run ahead of the mixing one, and a causal core may run the mixing part a
chunk of queries at a time. How a block runs is plans.py's business.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch


# The part of a block that mixes positions: (stream value, routed layer arguments) -> tensor;
# after a `before` part it gets that part's outputs instead of the stream value.
Mixing = Callable[[Any, dict], torch.Tensor]
# The part that acts on each position alone: tensor (any leading shape) -> tensor; after a
# `before` part, (mixing output, block input) -> tensor, so that it can add the residual.
Positionwise = Callable[..., torch.Tensor]
# A position-wise part ahead of the mixing one: (block input, routed arguments, Rows) -> tensors.
Before = Callable[[torch.Tensor, dict, "Rows"], tuple]
# Causal attention of one chunk of query rows: (the chunk's `before` outputs other than the
# context, the context outputs on the rows Rows.context, routed arguments, Rows) -> (rows, width).
CausalRun = Callable[[tuple, tuple, dict, "Rows"], torch.Tensor]


@dataclass(frozen=True)
class Rows:
    """The positions one chunk covers: a range of the block input's (batch × sequence) rows.
    A `before` part cuts the same rows out of routed tensors that go with positions (rotary
    embeddings) with `take`."""

    rows: slice
    lead: tuple[int, ...]  # the block input's leading shape, e.g. (batch, sequence)

    def take(self, t: torch.Tensor) -> torch.Tensor:
        """The chunk's rows of t, whose leading dimensions broadcast to the block input's."""
        if self.rows == slice(None):
            return t
        return t.expand(*self.lead, t.shape[-1]).reshape(-1, t.shape[-1])[self.rows]

    def _bounds(self) -> tuple[int, int, int]:
        length = self.lead[-1]  # positions per sequence: the lead is (batch, sequence)
        total = 1
        for n in self.lead:
            total *= n
        start, stop, _ = self.rows.indices(total)
        return start, stop, length

    @property
    def context(self) -> slice:
        """The rows whose keys and values the chunk's queries may read: from the start of its
        first sequence to the chunk's end (causal attention reads no later position)."""
        start, stop, length = self._bounds()
        return slice(start // length * length, stop)

    def sequences(self) -> list["QueryGroup"]:
        """The chunk's queries as groups that one attention call serves each: a run of whole
        sequences, or the part of one sequence the chunk holds (at most three groups)."""
        start, stop, length = self._bounds()
        first = self.context.start
        groups, row = [], start
        while row < stop:
            batch, position = divmod(row, length)
            if position == 0 and stop - row >= length:
                count = (stop - row) // length
                end, keys = length, slice(row - first, row - first + count * length)
            else:
                count, end = 1, min(length, position + stop - row)
                keys = slice(batch * length - first, batch * length - first + end)
            size = count * (end - position)
            groups.append(QueryGroup(slice(row - start, row - start + size), keys, slice(batch, batch + count), position, end))
            row += size
        return groups


@dataclass(frozen=True)
class QueryGroup:
    """Queries of `batch` (sequences of the batch) at positions [start, stop), which read the
    keys at positions [0, stop) of the same sequences: `queries` are their rows in the chunk,
    `keys` the rows of those keys in the chunk's context (Rows.context)."""

    queries: slice
    keys: slice
    batch: slice
    start: int
    stop: int


@dataclass(frozen=True)
class CausalCore:
    """The mixing part as causal attention, a chunk of queries at a time: a chunk's queries read
    the keys and values (the `context`) of their own and earlier positions only. With it the
    whole block runs chunk by chunk; only the context and its gradient cover the whole
    sequence (with grouped-query attention a fraction of the hidden size), not the queries, the
    attention output or their gradients."""

    run: CausalRun
    context: tuple[int, ...]  # which of the `before` part's outputs are the context

    def queries(self, outs: Sequence) -> tuple:
        """The `before` part's outputs that are not context: what each chunk reads of itself alone."""
        return tuple(t for j, t in enumerate(outs) if j not in self.context)


@dataclass(frozen=True)
class Block:
    """F or G: optionally `before` (position-wise: a norm and attention's input projections),
    `mixing` (attention; None if the block has none) and then `positionwise` (an output
    projection and residual, an MLP block, an adapter; None if none). The position-wise parts
    may run a chunk of tokens at a time; a block with `before` has all three parts. With
    `causal` as well, the mixing part runs a chunk of queries at a time whenever the block runs
    in several chunks (`mixing` serves a single chunk)."""

    mixing: Mixing | None = None
    positionwise: Positionwise | None = None
    before: Before | None = None
    causal: CausalCore | None = None

    def __post_init__(self):
        if self.before is not None and (self.mixing is None or self.positionwise is None):
            raise ValueError("a block with a `before` part needs a mixing and a position-wise part")
        if self.causal is not None and self.before is None:
            raise ValueError("a block with a causal core needs a `before` part (its queries and context)")


def as_block(block: Block | Mixing) -> Block:
    """A plain callable (x, routed) -> tensor is a block that mixes positions."""
    return block if isinstance(block, Block) else Block(mixing=block)


# ------------------------------------------------------------------------ rows and chunks


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t as (tokens, hidden): chunks are ranges of rows."""
    return t.reshape(-1, t.shape[-1])


def _row_slices(t: torch.Tensor, chunk_tokens: int) -> list[slice]:
    rows = t.numel() // t.shape[-1] if t.dim() else 1
    if chunk_tokens <= 0 or rows <= chunk_tokens:
        return [slice(None)]
    return [slice(start, min(start + chunk_tokens, rows)) for start in range(0, rows, chunk_tokens)]


def _part(t: torch.Tensor, sl: slice) -> torch.Tensor:
    """One chunk of t; the whole tensor, shape and all, when there is a single chunk."""
    return t if sl == slice(None) else _rows(t)[sl]
