"""The causal-LM loss over chunks of tokens, so that the full logits never exist at once.

At a 50k vocabulary the logits of a batch outweigh every other activation: for 8 × 512
tokens they are 0.4 GB in bf16, and the loss upcasts them to float32 and keeps their log-softmax
(0.8 GB more), with as much again for their gradient. Reversible layers make the rest of the
model small, so this is what would set the peak. Here the head and the cross-entropy run on
`loss_chunk_size` tokens at a time, each chunk under activation checkpointing (its logits are
recomputed in backward), and only tokens that have a label are computed at all. The loss and its
gradient are the library's (`ForCausalLMLoss`): the same shift, ignore index and reduction, summed
in another order.
"""

from __future__ import annotations

import contextlib
import functools
import inspect

import torch
from torch.nn import functional
from torch.utils.checkpoint import checkpoint


def chunked_causal_lm_loss(
    hidden_states: torch.Tensor,
    head: torch.nn.Module,
    labels: torch.Tensor | None,
    chunk_tokens: int,
    *,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
    shift_labels: torch.Tensor | None = None,
    norm: torch.nn.Module | None = None,
) -> torch.Tensor:
    """Cross-entropy of head(norm(hidden_states)) against the next token, computed chunk by chunk.

    hidden_states: (batch, seq, d), the input of the LM head, or of `norm` (a norm of each
    position alone) where given. labels: (batch, seq), shifted here as the library does unless
    `shift_labels` is given. The mean is over labelled tokens, or the sum divided by
    `num_items_in_batch` when given (as Trainer does with gradient accumulation)."""
    if shift_labels is None:
        shift_labels = functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    targets = shift_labels.reshape(-1).to(hidden_states.device)
    flat = hidden_states.reshape(-1, hidden_states.shape[-1])
    labelled = (targets != ignore_index).nonzero().squeeze(1)
    total = torch.zeros((), dtype=torch.float32, device=flat.device)
    for start in range(0, labelled.numel(), chunk_tokens):
        rows = labelled[start : start + chunk_tokens]
        total = total + checkpoint(_chunk_loss, flat, rows, targets, head, norm, use_reentrant=False,
                                   preserve_rng_state=False)
    if num_items_in_batch is None:
        return total / labelled.numel()  # 0 / 0 = NaN without labels, as in the library
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def _chunk_loss(flat: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module,
                norm: torch.nn.Module | None) -> torch.Tensor:
    hidden = flat.index_select(0, rows)
    logits = head(hidden if norm is None else norm(hidden)).float()
    return functional.cross_entropy(logits, targets.index_select(0, rows), reduction="sum")


class ChunkedLossMixin:
    """For causal-LM heads: when training with labels, compute the loss in chunks
    (`config.loss_chunk_size` tokens; 0 turns it off). The output's `logits` are then None;
    evaluation (model.eval()) and generation compute full logits as the library does."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # forward keeps the library forward's name, docs and signature: generate() reads the
        # signature to decide which inputs (position ids, caches) to pass
        library_forward = super(ChunkedLossMixin, cls).forward

        @functools.wraps(library_forward)
        def forward(self, *args, **kwargs):
            return ChunkedLossMixin._chunked_forward(self, *args, **kwargs)

        cls.forward = forward

    def _chunked_forward(self, *args, **kwargs):
        library_forward = super(ChunkedLossMixin, self).forward
        chunk = getattr(self.config, "loss_chunk_size", 0)
        if not (chunk and self.training and torch.is_grad_enabled()):
            return library_forward(*args, **kwargs)
        bound = inspect.signature(library_forward).bind_partial(*args, **kwargs)
        arguments = dict(bound.arguments)
        arguments.update(arguments.pop("kwargs", {}))
        labels, shift_labels = arguments.get("labels"), arguments.get("shift_labels")
        if labels is None and shift_labels is None:
            return library_forward(*args, **kwargs)
        return_dict = arguments.pop("return_dict", None)
        arguments["labels"] = None
        arguments.pop("shift_labels", None)
        head = self.get_output_embeddings()
        if not isinstance(head, torch.nn.Linear):
            return library_forward(*args, **kwargs)
        # the norm after the last layer, where the model names one, runs with the head a chunk
        # at a time too: an RMSNorm works in float32, and over a long sequence at once its
        # float32 copies of the hidden states are as large as a whole step of reversible layers
        norm = self.meft_final_norm() if hasattr(self, "meft_final_norm") else None
        capture = _CapturedHead(head.out_features)
        # the library's forward runs with stand-ins for the head and the norm (torch's
        # set_submodule): a head that keeps its input and a norm that passes it on
        with _stand_in(self, head, capture), _stand_in(self, norm, torch.nn.Identity()):
            outputs = library_forward(**arguments, return_dict=True)
        loss = chunked_causal_lm_loss(
            capture.hidden_states,
            head,
            labels,
            chunk,
            num_items_in_batch=arguments.get("num_items_in_batch"),
            ignore_index=arguments.get("ignore_index", -100),
            shift_labels=shift_labels,
            norm=norm,
        )
        rest = {key: value for key, value in outputs.items() if key not in ("loss", "logits")}
        outputs = type(outputs)(loss=loss, **rest)
        return outputs if return_dict is not False else outputs.to_tuple()


class _CapturedHead(torch.nn.Module):
    """Stands in for the LM head while the library's forward runs: keeps the head's input and
    hands back a tensor of the logits' shape that takes no memory."""

    def __init__(self, out_features: int):
        super().__init__()
        self.out_features = out_features
        self.hidden_states = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        self.hidden_states = hidden_states
        return torch.empty((*hidden_states.shape[:-1], self.out_features), dtype=hidden_states.dtype, device="meta")


@contextlib.contextmanager
def _stand_in(model: torch.nn.Module, module: torch.nn.Module | None, stand_in: torch.nn.Module):
    """`module`, a submodule of `model`, is replaced by `stand_in` inside and put back after."""
    if module is None:
        yield
        return
    path = _path_of(model, module)
    model.set_submodule(path, stand_in)
    try:
        yield
    finally:
        model.set_submodule(path, module)


def _path_of(model: torch.nn.Module, module: torch.nn.Module) -> str:
    """`module`'s name in `model`, remembered per model: a walk over every module took about 4% of a
    small model's training step on the host (the head comes last)."""
    paths = model.__dict__.setdefault("_meft_submodule_paths", {})
    path = paths.get(id(module))
    if path is None or model.get_submodule(path) is not module:
        path = next(name for name, candidate in model.named_modules() if candidate is module)
        paths[id(module)] = path
    return path
