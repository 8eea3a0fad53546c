"""The bottleneck adapter MEFT trains while the pretrained model stays frozen."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN

# the init kinds and the values a fresh adapter is drawn with, in the torch-free table
from .labels import labelled
from .meft_table import ADAPTER_INITS, adapter_generator, draw_adapter  # noqa: F401

if TYPE_CHECKING:
    import numpy as np


class MeftAdapter(nn.Module):
    """d → r → d: down-projection, the PLM's own activation, dropout, up-projection.

    init "paper": both projections N(0, σ²) and zero biases, so the output starts near zero
    and the pretrained model's computation is (almost) kept. init "zero": the up-projection
    starts at zero too, so the adapter outputs exactly zero until it is trained.
    """

    def __init__(
        self,
        hidden_size: int,
        adapter_dim: int,
        activation: str,
        dropout: float,
        init: str = "paper",
        init_std: float = 0.02,
    ):
        super().__init__()
        if init not in ADAPTER_INITS:
            raise ValueError(f"adapter init must be one of {ADAPTER_INITS}, got {init!r}")
        self.init, self.init_std, self.activation = init, init_std, activation
        self.down_proj = nn.Linear(hidden_size, adapter_dim)
        self.act = ACT2FN[activation]
        self.dropout = nn.Dropout(dropout)
        self.up_proj = nn.Linear(adapter_dim, hidden_size)
        # each projection carries its own init rule: transformers initialises the weights a
        # checkpoint lacks module by module, and the PLM's rule must not apply to these
        self.down_proj._meft_init = (init_std, False)
        self.up_proj._meft_init = (init_std, init == "zero")
        self.disabled = False  # set by the model's disable_adapter(): the adapter then outputs zeros
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: np.random.Generator | None = None) -> None:
        """Fresh values: drawn from `generator` (draw_adapter()), or without one from torch's
        global generator, as transformers initialises the weights a checkpoint lacks."""
        if generator is None:
            init_adapter_projection(self.down_proj)
            init_adapter_projection(self.up_proj)
            return
        if self.down_proj.weight.is_meta:
            return
        drawn = draw_adapter(generator, self.down_proj.in_features, self.down_proj.out_features, self.init, self.init_std)
        for name, param in self.named_parameters():
            param.copy_(torch.from_numpy(drawn[name]))

    @labelled("adapter")
    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.disabled:
            return torch.zeros_like(hidden_states)
        # the weights stay float32 (an optimizer step on 16-bit weights under- and overflows);
        # the adapter computes in the dtype of the model it sits in, as the frozen layers do
        dtype = hidden_states.dtype
        h = _linear(hidden_states, self.down_proj, dtype)
        return _linear(self.dropout(self.act(h)), self.up_proj, dtype)


def _linear(x: torch.Tensor, linear: nn.Linear, dtype: torch.dtype) -> torch.Tensor:
    if linear.weight.dtype == dtype:
        return linear(x)
    bias = None if linear.bias is None else linear.bias.to(dtype)
    return nn.functional.linear(x, linear.weight.to(dtype), bias)


def adapter_linear_names() -> tuple[str, ...]:
    """The names of an adapter's linear layers, read from one built on the meta device (so
    that what must stay unquantized follows the adapter's own layout)."""
    with torch.device("meta"):
        adapter = MeftAdapter(1, 1, "relu", 0.0)
    return tuple(name for name, module in adapter.named_children() if isinstance(module, nn.Linear))


def is_adapter_projection(module: nn.Module) -> bool:
    return hasattr(module, "_meft_init")


@torch.no_grad()
def init_adapter_projection(linear: nn.Linear) -> None:
    """N(0, σ²) weights (zeros for a zero-initialised up-projection) and zero bias, from torch's
    global generator. Uses transformers' init functions: they skip tensors already loaded from
    a checkpoint and, unlike torch.nn.init, are not switched off while from_pretrained fills in
    missing ones."""
    if linear.weight.is_meta:
        return
    std, zero = linear._meft_init
    if zero:
        init.zeros_(linear.weight)
    else:
        init.normal_(linear.weight, 0.0, std)
    init.zeros_(linear.bias)
