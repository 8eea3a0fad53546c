"""The bottleneck adapter and its initialisation."""

from __future__ import annotations

import numpy as np
import torch

from meft_convert.templates.adapters import MeftAdapter, adapter_generator, draw_adapter, init_adapter_projection


def test_zero_init_outputs_exactly_zero():
    adapter = MeftAdapter(64, 8, "gelu", 0.1, init="zero")
    assert torch.count_nonzero(adapter(torch.randn(3, 64))) == 0


def test_paper_init_is_normal_with_the_given_std_and_seeded():
    a = MeftAdapter(512, 64, "relu", 0.0, init_std=0.02)
    b = MeftAdapter(512, 64, "relu", 0.0, init_std=0.02)
    c = MeftAdapter(512, 64, "relu", 0.0, init_std=0.02)
    a.reset_parameters(adapter_generator(3))
    b.reset_parameters(adapter_generator(3))
    c.reset_parameters(adapter_generator(4))
    assert torch.equal(a.up_proj.weight, b.up_proj.weight) and not torch.equal(a.up_proj.weight, c.up_proj.weight)
    for w in (a.down_proj.weight, a.up_proj.weight):
        assert abs(w.std().item() - 0.02) < 0.001 and abs(w.mean().item()) < 0.001
    assert torch.count_nonzero(a.down_proj.bias) == 0 and torch.count_nonzero(a.up_proj.bias) == 0


def test_a_seeded_reset_is_the_drawing_without_torch():
    """reset_parameters(generator) puts in exactly what draw_adapter() draws, which is what a
    conversion without a model writes; each draw moves the generator on."""
    for init in ("paper", "zero"):
        adapter = MeftAdapter(48, 6, "gelu", 0.0, init=init, init_std=0.05)
        generator = adapter_generator(7)
        adapter.reset_parameters(generator)
        second = MeftAdapter(48, 6, "gelu", 0.0, init=init, init_std=0.05)
        second.reset_parameters(generator)
        expected = adapter_generator(7)
        for module in (adapter, second):
            drawn = draw_adapter(expected, 48, 6, init, 0.05)
            assert list(drawn) == [name for name, _ in module.named_parameters()]
            for name, param in module.named_parameters():
                assert param.dtype == torch.float32 and np.array_equal(param.detach().numpy(), drawn[name]), name
        assert torch.count_nonzero(adapter.up_proj.weight) == (0 if init == "zero" else 48 * 6)
        assert not torch.equal(adapter.down_proj.weight, second.down_proj.weight)


def test_the_draws_are_float32_rounded_from_float64_normals():
    drawn = draw_adapter(adapter_generator(0), 5, 3, "paper", 0.02)
    reference = np.random.Generator(np.random.PCG64(0))
    assert np.array_equal(drawn["down_proj.weight"], (reference.normal(0.0, 0.02, (3, 5))).astype(np.float32))
    assert np.array_equal(drawn["up_proj.weight"], (reference.normal(0.0, 0.02, (5, 3))).astype(np.float32))
    assert all(a.dtype == np.float32 for a in drawn.values())


def test_loaded_tensors_are_not_reinitialised():
    """transformers marks tensors it loaded; the init must leave them alone."""
    adapter = MeftAdapter(16, 4, "gelu", 0.0)
    loaded = adapter.up_proj.weight.detach().clone()
    adapter.up_proj.weight._is_hf_initialized = True
    init_adapter_projection(adapter.up_proj)
    assert torch.equal(adapter.up_proj.weight, loaded)
