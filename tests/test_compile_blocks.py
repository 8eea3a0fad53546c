"""compile_blocks: the attention and MLP blocks through torch.compile, one graph for all layers."""

from __future__ import annotations

import pytest

from tests.test_modeling import build, gradients


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["meft1", "meft3"])
def test_compiled_blocks_train_exactly(variant):
    import torch._dynamo

    torch._dynamo.reset()
    model = build("opt-125m", "AutoModelForCausalLM", variant=variant, compile_blocks=True)
    torch._dynamo.utils.counters.clear()
    # reversible (the audit checks every rebuilt input bit for bit) against plain autograd
    # through the same compiled blocks: equal gradients
    loss_r, reversible = gradients(model, "AutoModelForCausalLM", "reversible")
    loss_v, vanilla = gradients(model, "AutoModelForCausalLM", "vanilla")
    assert torch.equal(loss_r, loss_v) and len(reversible) >= 4
    for key in vanilla:
        assert torch.equal(vanilla[key], reversible[key]), key
    # one graph per kind of block, whatever the number of layers (2 here)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 3
    # the same model as the eager one: without dropout, equal up to kernel rounding
    no_dropout = {"dropout": 0.0, "attention_dropout": 0.0}
    compiled = build("opt-125m", "AutoModelForCausalLM", variant=variant, compile_blocks=True, plm=no_dropout)
    eager = build("opt-125m", "AutoModelForCausalLM", variant=variant, plm=no_dropout)
    loss_c, compiled_grads = gradients(compiled, "AutoModelForCausalLM", "reversible")
    loss_e, eager_grads = gradients(eager, "AutoModelForCausalLM", "reversible")
    assert abs(loss_c.item() - loss_e.item()) <= 1e-5 * abs(loss_e.item())
    for key in eager_grads:
        assert (compiled_grads[key] - eager_grads[key]).norm() <= 1e-4 * eager_grads[key].norm(), key
