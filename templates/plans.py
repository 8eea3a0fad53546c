"""How a block runs: three execution plans, and the one place that picks one (`plan_for`).

- `OneGraph`: a block with a mixing and a position-wise part, in one chunk. Forward and backward
  build the graph plain autograd builds (before → mixing → position-wise): its parts recomputed
  once and differentiated by one autograd call.
- `PartByPart`: the parts one after another, the position-wise ones (and the coupling
  arithmetic) a chunk of tokens at a time, so that an MLP's wide intermediates cost a chunk; the
  mixing part sees the whole sequence.
- `CausalQueries`: a block with a causal core, in several chunks: every part a chunk of queries at
  a time, each chunk reading the keys and values (the context) of its own and earlier positions.

Every plan has the same three methods, for one half-step (reversible.HalfStep: its block, scale,
RNG record and run):

    forward(step, inp, x) -> y                 y = scale·x + block(inp); remainders kept
    backward(step, inp, y, packed, dy, d_other, writable, keep_value)
        -> (x, d_other + (∂block/∂inp)ᵀ·dy, scale·dy)   x rebuilt from y exactly (exact mode)
    vanilla(block, x, routed, chunk_tokens) -> block(x) under ordinary autograd, chunked the same
        way: the vanilla path and the test oracle

The forward runs each part exactly as backward recomputes it (recompute.py), with the RNG state
before each part recorded; backward restores it.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch

from .blocks import Block, CausalCore, Rows, _part, _row_slices, _rows
from .labels import labelled, part
from .recompute import _add, _block_input, _detached_output, _inputs_of, _leaves, _part_input, _scaled


def plan_for(block: Block, inp: torch.Tensor, chunk_tokens: int) -> "Plan":
    """The plan a block runs with on `inp`, chunked at `chunk_tokens` tokens (0: one chunk): the
    one place the choice is made, for forward, backward and the vanilla path alike."""
    several = len(_row_slices(inp, chunk_tokens)) > 1
    if block.causal is not None and several:
        return CAUSAL_QUERIES
    if block.mixing is not None and block.positionwise is not None and not several:
        return ONE_GRAPH
    return PART_BY_PART


def run_block(block: Block, x: torch.Tensor, routed: dict, chunk_tokens: int = 0) -> torch.Tensor:
    """The block under ordinary autograd, chunked as the reversible path chunks it."""
    return plan_for(block, x, chunk_tokens).vanilla(block, x, routed, chunk_tokens)


# ------------------------------------------------------------------------------ shared parts


def _coupled(step, x, slices: list[slice], out_of) -> object:
    """y = scale·x + out for each chunk of rows, out_of(sl) giving the block output of rows sl (one
    chunk's alive at a time); with several chunks y's integers overwrite x's. The remainders are
    kept for backward."""
    run = step.run
    y = run.arithmetic.output(x, x.value.shape, x.value.device, len(slices), flags=run.flags)
    packed = []
    for sl in slices:
        out = out_of(sl)
        packed.append(y.couple(sl, x, out, step.factor))
        del out
    run.remainders.add(run.arithmetic.kept_remainders(packed))
    return y.stream()


def _rebuilt(step, y, inp: torch.Tensor, chunks: int, keep_value: bool):
    """Where the rebuilt stream x lands; its value is kept only where a block reads it again."""
    arith = step.run.arithmetic
    return arith.output(y, inp.shape, inp.device, chunks, keep_values=arith.keeps_value(keep_value))


def _restore(states: list, i: int) -> None:
    if states and states[i] is not None:
        states[i].restore()


def _record_or_restore(run, states: list, i: int, replay: bool) -> None:
    """Forward records the RNG state before a part's chunk i; backward's recompute restores it."""
    if replay:
        _restore(states, i)
    else:
        states.append(run.capture_rng())


def _put_rows(buffer: torch.Tensor, sl: slice, g: torch.Tensor | None) -> None:
    if g is None:
        _part(buffer, sl).zero_()
    else:
        _part(buffer, sl).copy_(g)


def _joined(parts: list, lead: tuple[int, ...]) -> tuple:
    """The `before` part's outputs of every chunk, joined into tensors shaped (*lead, width)."""
    if len(parts) == 1:
        return tuple(parts[0])
    return tuple(torch.cat(column).view(*lead, -1) for column in zip(*parts))


# ------------------------------------------------------------------------------ part by part


class PartByPart:
    """The parts one after another; position-wise ones a chunk of tokens at a time."""

    def forward(self, step, inp: torch.Tensor, x):
        run, block, record = step.run, step.block, step.record
        if block.mixing is not None:
            mixing_input = self._mixing_input(step, inp, replay=False)
            record.mixing = run.capture_rng()
            h = _detached_output(block.mixing, mixing_input, run, run.routed_leaves, reads_stream=block.before is None)
            del mixing_input
        else:
            h = inp
        slices = _row_slices(h, run.settings.chunk_tokens)
        if len(slices) > 1:
            h = h.contiguous()

        def out_of(sl: slice) -> torch.Tensor:
            if block.positionwise is None:
                return _part(h, sl)
            record.chunks.append(run.capture_rng())
            return _detached_output(block.positionwise, _part(h, sl), run, reads_stream=block.mixing is None,
                                    stream_part=_part(inp, sl) if block.before is not None else None)

        return _coupled(step, x, slices, out_of)

    def backward(self, step, inp: torch.Tensor, y, packed: list, dy, d_other, writable: bool, keep_value: bool):
        x, d_inp, dx = self._backward(step, inp, y, packed, dy, keep_value)
        return x, _add(d_other, d_inp), dx

    def _backward(self, step, inp: torch.Tensor, y, packed: list, dy, keep_value: bool):
        run, block, grads, params = step.run, step.block, step.run.grads, step.params
        leaf, h, h_detached = self._recompute_mixing(step, inp)
        d_inp = None
        if block.positionwise is None and dy is not None:
            # the mixing part's gradients first: its graph is freed before x's value is allocated
            d_inp = grads.of(h, leaf, dy, params)
            h = leaf = None
        slices = _row_slices(h_detached, run.settings.chunk_tokens)
        chunked = len(slices) > 1
        if chunked:
            h_detached = h_detached.contiguous()
            dy = None if dy is None else dy.contiguous()
        # values as the kernel computes them (a value computed apart can differ in rounding from the
        # forward's), kept only where a block reads them
        x = _rebuilt(step, y, inp, len(slices), keep_value)
        d_h = d_direct = None  # gradients of the mixing output and, after `before`, of the residual
        if chunked and dy is not None and block.positionwise is not None:
            d_h = torch.empty(h_detached.shape, dtype=h_detached.dtype, device=h_detached.device)
            if block.before is not None:
                d_direct = torch.empty(inp.shape, dtype=inp.dtype, device=inp.device)
        # chunks from the last: plain autograd sums a parameter's per-chunk gradients in that order
        for i in reversed(range(len(slices))):
            sl = slices[i]
            g, g_direct = self._backward_chunk(step, i, sl, inp, h_detached, x, y, packed, dy)
            if g is None:
                continue
            if not chunked:
                d_h, d_direct = g, g_direct
            else:
                _put_rows(d_h, sl, g)
                if block.before is not None:
                    _put_rows(d_direct, sl, g_direct)
        if dy is not None and block.positionwise is not None:
            if block.before is not None:
                d_parts = grads.of(h, leaf, d_h, params)
                h = leaf = d_h = None  # the attention core's graph goes before `before` is recomputed
                if d_direct is None:
                    d_direct = torch.zeros_like(inp)
                d_inp = self._backward_before(step, inp, d_parts, d_direct, chunked)
            else:
                d_inp = grads.of(h, leaf, d_h, params) if block.mixing is not None else d_h
        return x.stream(), d_inp, _scaled(dy, step.scale)

    def _recompute_mixing(self, step, inp: torch.Tensor) -> tuple:
        """(its input leaves, its output with graph, that output detached) of the mixing part
        recomputed over the whole sequence; (None, None, inp) for a block without one."""
        run, block = step.run, step.block
        if block.mixing is None:
            return None, None, inp
        leaf = _leaves(self._mixing_input(step, inp, replay=True))
        if step.record.mixing is not None:
            step.record.mixing.restore()
        # only the recompute runs under the forward's autocast; the gradients are computed outside
        # it, as loss.backward() computes plain autograd's (autocast would also apply to the
        # backward's own kernels and change their rounding)
        with torch.enable_grad(), run.autocast.active(), part("block"):
            h = block.mixing(_inputs_of(leaf, block.before is None, run.compute_dtype), run.routed_leaves)
        return leaf, h, h.detach()

    def _backward_chunk(self, step, i: int, sl, inp: torch.Tensor, h_detached: torch.Tensor, x, y, packed: list, dy):
        """Chunk i (rows sl) of a block's backward: its position-wise part recomputed, the stream
        rebuilt from it (x.uncouple), and the gradients (of the mixing output and, after `before`,
        of the residual; None, None without a position-wise part or dy)."""
        run, block = step.run, step.block
        if block.positionwise is None:
            x.uncouple(sl, y, _part(h_detached, sl), packed[i] if packed else None, step.factor)
            return None, None
        _restore(step.record.chunks, i)
        part_leaf = _part(h_detached, sl).detach().requires_grad_()
        with torch.enable_grad(), run.autocast.active(), part("block"):
            h_part = _part_input(part_leaf, block.mixing is None, run.compute_dtype)
            if block.before is None:
                part_out = block.positionwise(h_part)
            else:
                stream_leaf = _part(inp, sl).detach().requires_grad_()
                part_out = block.positionwise(h_part, _block_input(stream_leaf, run.compute_dtype))
                part_leaf = (part_leaf, stream_leaf)
        x.uncouple(sl, y, part_out.detach(), packed[i] if packed else None, step.factor)
        if dy is None:
            return None, None
        g = run.grads.of(part_out, part_leaf, _part(dy, sl), step.params, routed=False)
        return g if block.before is not None else (g, None)

    def _mixing_input(self, step, inp: torch.Tensor, replay: bool):
        """What the mixing part reads: the block input, or the `before` part's outputs over the
        whole sequence, computed a chunk at a time (the RNG state before each chunk recorded in
        forward, replayed in backward's recompute)."""
        run, block = step.run, step.block
        if block.before is None:
            return inp
        slices = _row_slices(inp, run.settings.chunk_tokens)
        lead = tuple(inp.shape[:-1])
        columns = None
        for i, sl in enumerate(slices):
            _record_or_restore(run, step.record.before, i, replay)
            with run.autocast.active() if replay else contextlib.nullcontext():
                outs = _detached_output(block.before, _part(inp, sl), run, run.routed_leaves, Rows(sl, lead))
            if len(slices) == 1:
                return tuple(outs)
            if columns is None:
                rows = inp.numel() // inp.shape[-1]
                columns = [torch.empty((rows, o.shape[-1]), dtype=o.dtype, device=o.device) for o in outs]
            for column, o in zip(columns, outs):
                column[sl].copy_(o)
            del outs
        return tuple(column.view(*lead, -1) for column in columns)

    def _backward_before(self, step, inp: torch.Tensor, d_parts: tuple, d_inp: torch.Tensor, chunked: bool):
        """d_inp (the position-wise part's share) plus (∂before/∂inp)ᵀ·d_parts, the `before` part
        recomputed and differentiated a chunk at a time, from the last."""
        run, block = step.run, step.block
        slices = _row_slices(inp, run.settings.chunk_tokens)
        lead = tuple(inp.shape[:-1])
        wanted = [j for j, d in enumerate(d_parts) if d is not None]  # outputs the core used
        if not wanted:
            return d_inp
        d_parts = tuple(d_parts[j].contiguous() for j in wanted)
        for i in reversed(range(len(slices))):
            sl = slices[i]
            _restore(step.record.before, i)
            leaf = _part(inp, sl).detach().requires_grad_()
            with torch.enable_grad(), run.autocast.active(), part("block"):
                outs = tuple(block.before(_block_input(leaf, run.compute_dtype), run.routed_leaves, Rows(sl, lead)))
            outs = tuple(outs[j] for j in wanted)
            g = run.grads.of(outs, leaf, tuple(_part(d, sl) for d in d_parts), step.params)
            del outs
            if g is None:
                continue
            if chunked:  # d_inp is this function's own buffer
                _part(d_inp, sl).add_(g)
            else:  # d_inp may be the very tensor the coupling's gradient still needs
                d_inp = d_inp + g
        return d_inp

    def vanilla(self, block: Block, x: torch.Tensor, routed: dict, chunk_tokens: int) -> torch.Tensor:
        slices = _row_slices(x, chunk_tokens)
        if block.before is not None:
            # each position-wise part reads the input through a view of its own, so that a row's
            # gradient is one sum per part and then the sum of the two, as the reversible
            # backward forms it
            x_rows = [x] if len(slices) == 1 else torch.split(_rows(x), chunk_tokens)
            lead = tuple(x.shape[:-1])
            parts = [block.before(r.view_as(r), routed, Rows(sl, lead)) for r, sl in zip(x_rows, slices)]
            h = block.mixing(_joined(parts, lead), routed)
        else:
            h = block.mixing(x, routed) if block.mixing is not None else x
        if block.positionwise is None:
            return h
        h_rows = [h] if len(slices) == 1 else torch.split(_rows(h), chunk_tokens)
        if block.before is not None:
            outs = [block.positionwise(a, b.view_as(b)) for a, b in zip(h_rows, x_rows)]
        else:
            outs = [block.positionwise(a) for a in h_rows]
        return outs[0] if len(slices) == 1 else torch.cat(outs).view(*h.shape[:-1], -1)


# -------------------------------------------------------------------------------- one graph


class OneGraph(PartByPart):
    """A block in one chunk, its parts one graph, as plain autograd builds it. No part is
    recomputed twice (`before`, whose outputs the part-by-part plan keeps only detached) and the
    host makes one autograd call, not three. Under plain autograd it is the part-by-part block."""

    def forward(self, step, inp: torch.Tensor, x):
        leaf = inp.detach().requires_grad_()
        return _coupled(step, x, [slice(None)], lambda sl: self._whole_block(step, leaf, replay=False).detach())

    def backward(self, step, inp: torch.Tensor, y, packed: list, dy, d_other, writable: bool, keep_value: bool):
        leaf = inp.detach().requires_grad_()
        with step.run.autocast.active():
            out = self._whole_block(step, leaf, replay=True)
        x = _rebuilt(step, y, inp, 1, keep_value)
        x.uncouple(slice(None), y, out.detach(), packed[0] if packed else None, step.factor)
        d_inp = None if dy is None else step.run.grads.of(out, leaf, dy, step.params)
        del out, leaf  # the block's output goes before the stream gradients are formed
        dx = _scaled(dy, step.scale)
        return x.stream(), _add(d_other, d_inp), dx

    @labelled("block")
    def _whole_block(self, step, leaf: torch.Tensor, replay: bool):
        """The block's parts on `leaf` as one graph, each part reading the stream through a view
        of its own. In forward the RNG state before each part is recorded, in backward's
        recompute it is restored."""
        run, block, record = step.run, step.block, step.record
        cd = run.compute_dtype
        with torch.enable_grad():
            if block.before is not None:
                _record_or_restore(run, record.before, 0, replay)
                h = tuple(block.before(_block_input(leaf, cd), run.routed_leaves, Rows(slice(None), tuple(leaf.shape[:-1]))))
            else:
                h = _block_input(leaf, cd)
            if not replay:
                record.mixing = run.capture_rng()
            elif record.mixing is not None:
                record.mixing.restore()
            h = block.mixing(h, run.routed_leaves)
            _record_or_restore(run, record.chunks, 0, replay)
            return block.positionwise(h) if block.before is None else block.positionwise(h, _block_input(leaf, cd))


# --------------------------------------------------------------------- causal query chunks


class _Context:
    """A causal core's context (keys and values) over the whole sequence, (rows, width) each,
    filled a chunk at a time, and in backward its gradient, summed over the chunks that read it."""

    def __init__(self, core: CausalCore, inp: torch.Tensor):
        self.core, self.index = core, core.context
        self.rows = inp.numel() // inp.shape[-1]
        self.columns: list | None = None
        self.grads: list | None = None

    def fill(self, sl: slice, outs: tuple) -> tuple:
        """Stores the chunk's context outputs; returns the others (the queries)."""
        if self.columns is None:
            self.columns = [torch.empty((self.rows, outs[j].shape[-1]), dtype=outs[j].dtype, device=outs[j].device)
                            for j in self.index]
        for column, j in zip(self.columns, self.index):
            column[sl].copy_(outs[j])
        return self.core.queries(outs)

    def at(self, rows: Rows) -> tuple:
        return tuple(column[rows.context] for column in self.columns)

    def add_grads(self, rows: Rows, grads: Sequence[torch.Tensor | None]) -> None:
        if self.grads is None:
            self.grads = [torch.zeros_like(column) for column in self.columns]
        for total, g in zip(self.grads, grads):
            if g is not None:
                total[rows.context].add_(g)

    def grads_of(self, outs: tuple, d_queries: tuple, sl: slice) -> tuple:
        """The gradients of a chunk's `before` outputs: the queries' own, the context's summed."""
        d_queries, d_context = iter(d_queries), iter(self.grads)
        return tuple(next(d_context)[sl] if j in self.index else next(d_queries) for j in range(len(outs)))


class _CausalChunk:
    """One chunk of a block with a causal core, recomputed with its graph: `before` from its
    input rows, the core from the queries and the context, the position-wise part from the
    core's output and the input rows."""

    @labelled("block")
    def __init__(self, step, inp: torch.Tensor, i: int, rows: Rows, context: _Context):
        run, block, record = step.run, step.block, step.record
        cd = run.compute_dtype
        _restore(record.before, i)
        self.before_leaf = _part(inp, rows.rows).detach().requires_grad_()
        with torch.enable_grad(), run.autocast.active():
            self.outs = tuple(block.before(_block_input(self.before_leaf, cd), run.routed_leaves, rows))  # graph attached
        self.query_leaves = _leaves(block.causal.queries(self.outs))
        self.context_leaves = _leaves(context.at(rows))
        _restore(record.cores, i)
        with torch.enable_grad(), run.autocast.active():
            self.h = block.causal.run(_inputs_of(self.query_leaves, False, cd), _inputs_of(self.context_leaves, False, cd),
                                      run.routed_leaves, rows)
        self.h_leaf, self.stream_leaf = self.h.detach().requires_grad_(), _part(inp, rows.rows).detach().requires_grad_()
        _restore(record.chunks, i)
        with torch.enable_grad(), run.autocast.active():
            self.out = block.positionwise(_part_input(self.h_leaf, False, cd), _block_input(self.stream_leaf, cd))

    def input_gradient(self, step, d_out: torch.Tensor, rows: Rows, context: _Context):
        """The chunk's input gradient, position-wise part, core and `before` differentiated in
        turn (the core's context gradient summed into `context`); the graph goes with it."""
        grads, params = step.run.grads, step.params
        d_h, d_direct = grads.of(self.out, (self.h_leaf, self.stream_leaf), d_out, params, routed=False)
        self.out = self.h_leaf = None
        n = len(self.query_leaves)
        d_core = grads.of(self.h, (*self.query_leaves, *self.context_leaves), d_h, params)
        self.h = d_h = None
        context.add_grads(rows, d_core[n:])
        d_outs = context.grads_of(self.outs, d_core[:n], rows.rows)
        wanted = [j for j, d in enumerate(d_outs) if d is not None]
        d_before = None
        if wanted:
            d_before = grads.of(tuple(self.outs[j] for j in wanted), self.before_leaf, tuple(d_outs[j] for j in wanted),
                                params)
        self.outs = None
        return _add(d_direct, d_before)


class CausalQueries:
    """Before, core and position-wise part a chunk of queries at a time."""

    def forward(self, step, inp: torch.Tensor, x):
        """The chunks in order, each reading the context of the chunks up to itself."""
        run, block, record = step.run, step.block, step.record
        slices = _row_slices(inp, run.settings.chunk_tokens)
        lead = tuple(inp.shape[:-1])
        context = _Context(block.causal, inp)

        def out_of(sl: slice) -> torch.Tensor:
            rows = Rows(sl, lead)
            record.before.append(run.capture_rng())
            queries = context.fill(sl, _detached_output(block.before, _part(inp, sl), run, run.routed_leaves, rows))
            record.cores.append(run.capture_rng())
            n = len(queries)
            h = _detached_output(lambda parts, routed: block.causal.run(parts[:n], parts[n:], routed, rows),
                                 (*queries, *context.at(rows)), run, run.routed_leaves, reads_stream=False)
            del queries
            record.chunks.append(run.capture_rng())
            return _detached_output(block.positionwise, h, run, reads_stream=False, stream_part=_part(inp, sl))

        return _coupled(step, x, slices, out_of)

    def backward(self, step, inp: torch.Tensor, y, packed: list, dy, d_other, writable: bool, keep_value: bool):
        """The context is recomputed over the whole sequence first; then each chunk, from the last,
        recomputes its `before` part, core and position-wise part and differentiates them in that
        order. A chunk's context gradient is complete once the chunks after it are done, which is
        when its `before` part needs it. Each chunk's input gradient is summed into d_other's rows
        where that may be done in place (one hidden-sized tensor fewer), as d_other + (the chunk's
        sum): the same bits."""
        run, block = step.run, step.block
        slices = _row_slices(inp, run.settings.chunk_tokens)
        lead = tuple(inp.shape[:-1])
        context = _Context(block.causal, inp)
        for i in reversed(range(len(slices))):
            _restore(step.record.before, i)
            with run.autocast.active():
                context.fill(slices[i], _detached_output(block.before, _part(inp, slices[i]), run, run.routed_leaves,
                                                         Rows(slices[i], lead)))
        x = _rebuilt(step, y, inp, len(slices), keep_value)
        in_place = writable and d_other is not None and d_other.is_contiguous() and d_other.dtype == inp.dtype
        d_inp = None
        if dy is not None:
            d_inp = d_other if in_place else torch.empty(inp.shape, dtype=inp.dtype, device=inp.device)
            dy = dy.contiguous()
        for i in reversed(range(len(slices))):
            rows = Rows(slices[i], lead)
            chunk = _CausalChunk(step, inp, i, rows, context)
            x.uncouple(rows.rows, y, chunk.out.detach(), packed[i] if packed else None, step.factor)
            if dy is None:
                continue
            d_rows = chunk.input_gradient(step, _part(dy, rows.rows), rows, context)
            del chunk
            if not in_place:
                _put_rows(d_inp, rows.rows, d_rows)
            elif d_rows is not None:
                _part(d_inp, rows.rows).add_(d_rows)
        if dy is None:
            return x.stream(), d_other, None
        return x.stream(), d_inp if in_place else _add(d_other, d_inp), _scaled(dy, step.scale)

    def vanilla(self, block: Block, x: torch.Tensor, routed: dict, chunk_tokens: int) -> torch.Tensor:
        slices = _row_slices(x, chunk_tokens)
        x_rows = torch.split(_rows(x), chunk_tokens)
        lead = tuple(x.shape[:-1])
        parts = [block.before(r.view_as(r), routed, Rows(sl, lead)) for r, sl in zip(x_rows, slices)]
        context = [torch.cat([p[j] for p in parts]) for j in block.causal.context]
        outs = []
        for p, r, sl in zip(parts, x_rows, slices):
            rows = Rows(sl, lead)
            h = block.causal.run(block.causal.queries(p), tuple(c[rows.context] for c in context), routed, rows)
            outs.append(block.positionwise(h, r.view_as(r)))
        return torch.cat(outs).view(*x.shape[:-1], -1)


Plan = PartByPart | CausalQueries
PART_BY_PART, ONE_GRAPH, CAUSAL_QUERIES = PartByPart(), OneGraph(), CausalQueries()
