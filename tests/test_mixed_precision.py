"""bf16 and fp16 autocast: reversible gradients equal plain autograd's under the same autocast,
and training (fp16 with a gradient scaler) stays finite."""

from __future__ import annotations

import pytest
import torch

from tests.test_modeling import batch, build, loss_of

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
CASES = [
    ("bert-base-uncased", "AutoModelForSequenceClassification", "meft1"),
    ("bert-base-uncased", "AutoModelForSequenceClassification", "meft3"),
    ("opt-125m", "AutoModelForCausalLM", "meft2"),
    ("tinyllama-1.1b", "AutoModelForCausalLM", "meft3"),
]


def autocast_gradients(model, auto_class, mode, dtype, seed=5, enabled=True):
    model.train()
    model.zero_grad(set_to_none=True)
    ids, mask = batch()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        with model.meft_backward(mode), torch.autocast("cpu", dtype=dtype, enabled=enabled):
            loss = loss_of(model, auto_class, ids, mask)
        loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("config_name,auto_class,variant", CASES)
def test_reversible_gradients_equal_plain_autograd_under_autocast(config_name, auto_class, variant, dtype):
    plm = {"pad_token_id": 0, "attention_dropout": 0.1} if config_name == "tinyllama-1.1b" else {}
    model = build(config_name, auto_class, variant=variant, plm=plm)  # float32 weights, as autocast expects
    loss_v, vanilla = autocast_gradients(model, auto_class, "vanilla", dtype)
    loss_r, reversible = autocast_gradients(model, auto_class, "reversible", dtype)
    assert torch.equal(loss_v, loss_r)
    assert set(vanilla) == set(reversible) and len(reversible) >= 8
    for key in vanilla:
        assert torch.equal(vanilla[key], reversible[key]), key
    # autocast really ran in 16 bits: without it, the same dropout masks give other gradients
    float32 = autocast_gradients(model, auto_class, "reversible", dtype, enabled=False)[1]
    assert any(not torch.equal(float32[key], reversible[key]) for key in reversible)


def train(model, auto_class, dtype, steps: int, scaler=None) -> list[float]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids, mask = batch()
    losses = []
    model.train()
    for _ in range(steps):
        with torch.autocast("cpu", dtype=dtype):
            loss = loss_of(model, auto_class, ids, mask)
        losses.append(loss.item())
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
            scaler.step(optimizer)
            scaler.update()
        optimizer.zero_grad(set_to_none=True)
    return losses


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_training_under_autocast_stays_finite_and_learns(dtype):
    model = build("bert-base-uncased", "AutoModelForSequenceClassification", variant="meft3")
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16) if dtype == torch.float16 else None
    losses = train(model, "AutoModelForSequenceClassification", dtype, steps=8, scaler=scaler)
    assert all(torch.isfinite(torch.tensor(losses)))
    # one batch, eight steps: the adapters and classifier fit it
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(torch.isfinite(p).all() and not torch.equal(p, start[n]) for n, p in model.named_parameters() if n in start)
    model.eval()  # evaluation under autocast takes the plain float path
    with torch.autocast("cpu", dtype=dtype), torch.no_grad():
        assert torch.isfinite(loss_of(model, "AutoModelForSequenceClassification", *batch()))
    if scaler is not None:
        # no step was skipped for inf/NaN gradients: the scale never dropped
        assert scaler.get_scale() == 2.0**16


def test_fp16_overflow_is_reported_not_trained_on():
    """Block outputs past fp16's range become inf; the engine names the layer instead of
    letting inf into the fixed-point streams."""
    model = build("bert-base-uncased", "AutoModel", variant="meft3")
    with torch.no_grad():
        model.encoder.layer[0].meft.attn.up_proj.bias.fill_(1e5)  # past fp16's 65504
    model.train()
    ids, mask = batch()
    with torch.autocast("cpu", dtype=torch.float16), pytest.raises(FloatingPointError, match="layer 0"):
        model(input_ids=ids, attention_mask=mask)


@pytest.mark.parametrize("name", ["opt-125m", "llama"])  # saved in fp16 and in bf16
def test_16bit_checkpoint_loaded_as_saved_trains(name, converted):
    """Loaded as the README shows (no dtype), a 16-bit checkpoint keeps its frozen weights in
    their dtype and its trainable ones in float32; 20 AdamW steps stay finite and learn, and
    the reversible gradients still equal plain autograd's."""
    from transformers import AutoModelForCausalLM

    folder, _ = converted(name, "meft3")
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    saved_dtype = {"opt-125m": torch.float16, "llama": torch.bfloat16}[name]
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and {p.dtype for p in trainable.values()} == {torch.float32}
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {saved_dtype}

    _, reversible = autocast_gradients(model, "AutoModelForCausalLM", "reversible", saved_dtype, enabled=False)
    _, vanilla = autocast_gradients(model, "AutoModelForCausalLM", "vanilla", saved_dtype, enabled=False)
    assert reversible.keys() == vanilla.keys() == trainable.keys()
    assert all(torch.equal(reversible[n], vanilla[n]) for n in reversible)

    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2)
    ids, mask = batch()
    losses = []
    torch.manual_seed(0)
    for _ in range(20):
        loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert all(torch.isfinite(p).all() for p in trainable.values())
    # random tiny models with a frozen head: the adapters lower the loss slowly but steadily
    assert losses[-1] < losses[0] - 0.02 and losses[10] < losses[0], losses


def test_diverged_parameters_are_named_as_the_cause():
    model = build("bert-base-uncased", "AutoModel", variant="meft3")
    with torch.no_grad():
        model.encoder.layer[1].meft.ffn.down_proj.weight[0, 0] = float("nan")
    model.train()
    with pytest.raises(FloatingPointError, match="trainable parameters of layer 1 hold NaN"):
        model(input_ids=batch()[0], attention_mask=batch()[1])
