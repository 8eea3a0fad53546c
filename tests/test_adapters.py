"""The bottleneck adapter and its initialisation."""

from __future__ import annotations

import torch

from meft_convert.templates.adapters import MeftAdapter, init_adapter_projection


def test_zero_init_outputs_exactly_zero():
    adapter = MeftAdapter(64, 8, "gelu", 0.1, init="zero")
    assert torch.count_nonzero(adapter(torch.randn(3, 64))) == 0


def test_paper_init_is_normal_with_the_given_std_and_seeded():
    a = MeftAdapter(512, 64, "relu", 0.0, init_std=0.02)
    b = MeftAdapter(512, 64, "relu", 0.0, init_std=0.02)
    a.reset_parameters(torch.Generator().manual_seed(3))
    b.reset_parameters(torch.Generator().manual_seed(3))
    assert torch.equal(a.up_proj.weight, b.up_proj.weight)
    for w in (a.down_proj.weight, a.up_proj.weight):
        assert abs(w.std().item() - 0.02) < 0.001 and abs(w.mean().item()) < 0.001
    assert torch.count_nonzero(a.down_proj.bias) == 0 and torch.count_nonzero(a.up_proj.bias) == 0


def test_loaded_tensors_are_not_reinitialised():
    """transformers marks tensors it loaded; the init must leave them alone."""
    adapter = MeftAdapter(16, 4, "gelu", 0.0)
    loaded = adapter.up_proj.weight.detach().clone()
    adapter.up_proj.weight._is_hf_initialized = True
    init_adapter_projection(adapter.up_proj)
    assert torch.equal(adapter.up_proj.weight, loaded)
