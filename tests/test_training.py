"""The transformers Trainer drives a converted model: the real MiniLM on real RTE rows, with
gradient accumulation, clipping, evaluation, checkpoints and resuming; gradient checkpointing."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
import transformers

from tests.conftest import SHARED_DATA
from tests.test_modeling import batch, build, gradients, loss_of
from tests.test_reversible import _SavedTracker

ROOT = Path(__file__).resolve().parent.parent
GLUE = SHARED_DATA / "glue"
RTE = GLUE / "RTE"
STEPS, SAVE_AT = 8, 4
# transformers >= 5.2x renames gradient_checkpointing_enable; the tests call the name 5.17 has
pytestmark = pytest.mark.filterwarnings("ignore:`gradient_checkpointing_(enable|disable)` is deprecated:FutureWarning")


def example_module():
    """examples/finetune_glue.py, whose data reading and batching the tests share."""
    spec = importlib.util.spec_from_file_location("finetune_glue", ROOT / "examples" / "finetune_glue.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def example():
    return example_module()


@pytest.fixture(scope="module")
def minilm_meft3(converted):
    return converted("minilm", "meft3")[0]


@pytest.fixture(scope="module")
def rte_rows(example, minilm_meft3):
    if not (RTE / "train.tsv").is_file():
        pytest.skip(f"no GLUE RTE data at {RTE}")
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_meft3)
    rows = example.read_glue(RTE, "rte", "train")[:16]
    return example.encode(rows, tokenizer, seq_len=32, with_type_ids=True), tokenizer.pad_token_id


def classifier(folder):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return transformers.AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True, num_labels=2)


class MicroBatchLosses:
    """Every training forward's loss, recorded from the model's output."""

    def __init__(self, model):
        self.values: list[torch.Tensor] = []
        model.register_forward_hook(self.record)

    def record(self, module, args, output):
        if module.training:
            self.values.append(output.loss.detach().clone())


def trainer_for(model, features, pad_token_id, example, output_dir, **overrides):
    args = transformers.TrainingArguments(
        output_dir=str(output_dir),
        max_steps=STEPS,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        gradient_accumulation_steps=2,
        max_grad_norm=0.5,
        learning_rate=5e-3,
        lr_scheduler_type="constant",
        save_strategy="steps",
        save_steps=SAVE_AT,
        eval_strategy="no",
        logging_steps=1,
        logging_nan_inf_filter=False,
        report_to="none",
        seed=0,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        remove_unused_columns=False,
        disable_tqdm=True,
        **overrides,
    )
    return transformers.Trainer(
        model=model, args=args, train_dataset=features, eval_dataset=features, data_collator=example.Collator(pad_token_id)
    )


@pytest.fixture(scope="module")
def uninterrupted(minilm_meft3, rte_rows, example, tmp_path_factory):
    features, pad_token_id = rte_rows
    model = classifier(minilm_meft3)
    assert model.config.hidden_dropout_prob == 0.1  # dropout on: resuming must replay its RNG
    losses = MicroBatchLosses(model)
    output_dir = tmp_path_factory.mktemp("uninterrupted")
    trainer = trainer_for(model, features, pad_token_id, example, output_dir)
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    history = trainer.state.log_history
    return {"losses": losses.values, "before": before, "after": after, "history": history, "output_dir": output_dir}


@pytest.mark.slow
def test_trainer_fits_rte_rows(uninterrupted):
    # 16 RTE rows, 8 steps of 2 × 4: the loss on those rows falls from chance (ln 2)
    assert math.isclose(uninterrupted["before"], math.log(2), abs_tol=0.01)
    assert uninterrupted["after"] < uninterrupted["before"] - 0.05, (uninterrupted["before"], uninterrupted["after"])
    logged = [e for e in uninterrupted["history"] if "loss" in e]
    assert len(logged) == STEPS and len(uninterrupted["losses"]) == 2 * STEPS  # accumulation: 2 micro-batches a step
    assert all(math.isfinite(e["loss"]) and e["grad_norm"] > 0 for e in logged)
    assert (uninterrupted["output_dir"] / f"checkpoint-{SAVE_AT}" / "model.safetensors").is_file()


@pytest.mark.slow
def test_resuming_from_a_checkpoint_continues_the_same_run(uninterrupted, minilm_meft3, rte_rows, example, tmp_path):
    features, pad_token_id = rte_rows
    model = classifier(minilm_meft3)
    losses = MicroBatchLosses(model)
    # gradient checkpointing leaves the reversible layers as they are, so it changes nothing here
    # the flag's newer name where transformers has it (the old one warns that v6 removes it)
    fields = transformers.TrainingArguments.__dataclass_fields__
    flag = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    trainer = trainer_for(model, features, pad_token_id, example, tmp_path, **{flag: True})
    trainer.train(resume_from_checkpoint=str(uninterrupted["output_dir"] / f"checkpoint-{SAVE_AT}"))
    assert all(stack.checkpoint_func is not None for stack in model.meft_stacks)
    expected = uninterrupted["losses"][2 * SAVE_AT :]
    assert len(losses.values) == len(expected) == 2 * (STEPS - SAVE_AT)
    # bit for bit: same weights, optimizer state, data order and dropout masks
    for resumed, reference in zip(losses.values, expected):
        assert torch.equal(resumed, reference), (resumed, reference)


# --- gradient checkpointing ------------------------------------------------------------------


def saved_bytes(model, auto_class) -> int:
    tracker = _SavedTracker(model.parameters())
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(tracker.pack, tracker.unpack):
        loss = loss_of(model, auto_class, *batch())  # noqa: F841 (its graph holds what is counted)
    return tracker.live_bytes()


@pytest.mark.parametrize("variant", ["meft1", "meft3"])
def test_gradient_checkpointing_applies_to_the_layers_that_store_activations(variant):
    auto = "AutoModelForSequenceClassification"
    # 4 layers, the lowest reversible: the 3 above store activations unless checkpointed
    model = build("bert-base-uncased", auto, variant=variant, reversible_layers=1, plm={"num_hidden_layers": 4})
    # what gradient_checkpointing_enable() also does, so that the counts differ by checkpointing only
    model.enable_input_require_grads()
    loss, reference = gradients(model, auto, "reversible")
    stored = saved_bytes(model, auto)
    model.gradient_checkpointing_enable()
    assert all(stack.checkpoint_func is not None for stack in model.meft_stacks)
    loss_gc, checkpointed = gradients(model, auto, "reversible")
    assert torch.equal(loss, loss_gc)
    for name, grad in reference.items():
        assert torch.equal(grad, checkpointed[name]), name  # dropout replayed by the checkpoint
    assert saved_bytes(model, auto) < stored / 3
    # the vanilla mode stores every layer's activations: all of them are checkpointed
    _, vanilla = gradients(model, auto, "vanilla")
    for name, grad in reference.items():
        assert torch.equal(grad, vanilla[name]), name
    model.gradient_checkpointing_disable()
    assert all(stack.checkpoint_func is None for stack in model.meft_stacks)
    assert saved_bytes(model, auto) == stored


@pytest.mark.skipif(
    not hasattr(transformers.PreTrainedModel, "activation_checkpointing_enable"),
    reason="transformers before gradient checkpointing was renamed activation checkpointing",
)
def test_activation_checkpointing_every_n_layers():
    """The newer name and its every_n_layers reach the MEFT stacks: with 6 layers above the one
    reversible layer, every second one is checkpointed, so less is stored than without and more
    than with every layer checkpointed; gradients stay bit for bit the same."""
    auto = "AutoModelForSequenceClassification"
    model = build("bert-base-uncased", auto, variant="meft3", reversible_layers=1, plm={"num_hidden_layers": 7})
    model.enable_input_require_grads()
    loss, reference = gradients(model, auto, "reversible")
    stored = saved_bytes(model, auto)
    model.activation_checkpointing_enable()
    every_layer = saved_bytes(model, auto)
    model.activation_checkpointing_enable(every_n_layers=2)
    assert all(stack.checkpoint_every_n_layers == 2 for stack in model.meft_stacks)
    loss_gc, checkpointed = gradients(model, auto, "reversible")
    assert torch.equal(loss, loss_gc)
    for name, grad in reference.items():
        assert torch.equal(grad, checkpointed[name]), name
    every_second = saved_bytes(model, auto)
    assert every_layer < every_second < stored, (every_layer, every_second, stored)
    model.activation_checkpointing_disable()
    assert saved_bytes(model, auto) == stored


def test_gradient_checkpointing_changes_nothing_in_a_fully_reversible_stack():
    auto = "AutoModelForCausalLM"
    model = build("opt-125m", auto, variant="meft3")
    model.enable_input_require_grads()
    loss, reference = gradients(model, auto, "reversible")
    stored = saved_bytes(model, auto)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    loss_gc, checkpointed = gradients(model, auto, "reversible")
    assert torch.equal(loss, loss_gc)
    assert all(torch.equal(grad, checkpointed[name]) for name, grad in reference.items())
    assert saved_bytes(model, auto) == stored


def test_checkpointed_upper_layers_pass_gradients_to_routed_tensors():
    # BART's decoder reads the encoder output through the routed arguments: non-reentrant
    # checkpointing must still send its gradient back to the encoder's adapters
    auto = "AutoModelForSeq2SeqLM"
    model = build("bart-base", auto, variant="meft3", reversible_layers=1)
    loss, reference = gradients(model, auto, "reversible")
    model.gradient_checkpointing_enable()
    loss_gc, checkpointed = gradients(model, auto, "reversible")
    assert torch.equal(loss, loss_gc)
    assert any(".encoder." in name for name in reference)
    for name, grad in reference.items():
        assert torch.equal(grad, checkpointed[name]), name


@pytest.mark.parametrize("variant", ["meft1", "meft3"])
def test_saved_tensor_hooks_such_as_activation_offloading_change_no_gradient(variant):
    """What activation offloading installs (TRL's activation_offloading, torch's save_on_cpu):
    saved-tensor hooks that move every tensor autograd saves away and back. Here they hand back
    copies: the reversible backward still gives plain autograd's gradients bit for bit."""
    from tests.test_modeling import assert_reversible_equals_plain_autograd

    model = build("tinyllama-1.1b", "AutoModelForCausalLM", variant=variant, plm={"attention_dropout": 0.1})
    packed = []

    def pack(tensor):
        packed.append(tensor.numel())
        return tensor.clone()  # a copy, as a move to the host and back gives

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        assert_reversible_equals_plain_autograd(model, "AutoModelForCausalLM")
    assert packed  # the hooks saw the saved tensors of both runs


@pytest.mark.parametrize("variant", ["meft1", "meft3"])
def test_an_offloaders_hooks_see_the_callers_graph_only_and_get_all_of_it_back(variant):
    """An activation offloader (TRL's) numbers what autograd saves, moves it away and expects every
    piece back during backward. The reversible step hands it only what plain autograd would keep
    outside the stack (embeddings, head, loss), never the graphs the engine builds and drops in
    forward or differentiates at once in backward, and everything it was handed comes back."""
    model = build("tinyllama-1.1b", "AutoModelForCausalLM", variant=variant)
    ids, mask = batch()
    held: dict[int, torch.Tensor] = {}
    packed = {"vanilla": 0, "reversible": 0}
    for mode in packed:

        def pack(tensor, mode=mode):
            packed[mode] += 1
            held[id(tensor), packed[mode]] = tensor.clone()  # a copy, as a move to the host and back gives
            return id(tensor), packed[mode]

        with torch.autograd.graph.saved_tensors_hooks(pack, held.pop), model.meft_backward(mode):
            loss = loss_of(model, "AutoModelForCausalLM", ids, mask)
            loss.backward()
        if mode == "reversible":
            assert held == {}  # all of it came back
        held.clear()  # plain autograd leaves what it saved for a branch the loss never reads
    # the stack's layers saved nothing through the caller's hooks (plain autograd keeps each layer's)
    assert 0 < packed["reversible"] < packed["vanilla"] / 4, packed


# padding-free packing as TRL's padding_free and DataCollatorWithFlattening give it: sequences
# joined into one row, position_ids restarting at 0 at each, no attention mask, the first label of
# each sequence -100. transformers keeps the sequences apart through the mask it builds from
# position_ids; the reversible backward recomputes every layer with that mask
PACKED_ENGINES = {
    "int64": {},
    "int32-chunked-queries": dict(stream_bits=32, frac_bits=20, recompute_chunk_tokens=5, chunk_attention_queries=True),
}


def _packed_loss(model, rows: list[torch.Tensor], packed: bool, positions: bool = True):
    """The mean token loss of the rows, as one packed row or each row alone (summed, then divided
    by the number of predicted tokens, as one packed row averages)."""
    if packed:
        ids = torch.cat(rows)[None]
        labels = torch.cat([r.clone().index_fill_(0, torch.tensor([0], device=r.device), -100) for r in rows])[None]
        position_ids = torch.cat([torch.arange(len(r), device=r.device) for r in rows])[None] if positions else None
        return model(input_ids=ids, position_ids=position_ids, labels=labels, use_cache=False).loss
    total = sum(model(input_ids=r[None], labels=r[None], use_cache=False).loss * (len(r) - 1) for r in rows)
    return total / sum(len(r) - 1 for r in rows)


def _packed_gradients(model, rows, packed: bool, mode: str = "reversible", positions: bool = True):
    model.zero_grad(set_to_none=True)
    with model.meft_backward(mode):
        loss = _packed_loss(model, rows, packed, positions)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("engine", list(PACKED_ENGINES))
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("variant", ["meft1", "meft3"])
def test_packed_rows_stay_apart_in_forward_and_in_the_recompute(variant, attention, engine):
    model = build("tinyllama-1.1b", "AutoModelForCausalLM", variant=variant, plm={"attn_implementation": attention},
                  **PACKED_ENGINES[engine])
    model.eval()  # no dropout, so that packed and separate rows see the same computation; gradients still flow
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, 1000, (n,), generator=g) for n in (11, 7, 9)]
    loss, packed = _packed_gradients(model, rows, packed=True)
    # the recompute saw the forward's mask: the same bits as plain autograd through the same row
    loss_v, vanilla = _packed_gradients(model, rows, packed=True, mode="vanilla")
    assert torch.equal(loss, loss_v)
    assert vanilla.keys() == packed.keys() and all(torch.equal(vanilla[k], packed[k]) for k in packed)
    # and the sequences stayed apart: the loss and gradients of each row run alone, to rounding
    loss_s, alone = _packed_gradients(model, rows, packed=False)
    assert any(g.abs().max() > 0 for g in alone.values())
    assert loss.item() == pytest.approx(loss_s.item(), rel=1e-6, abs=0)
    for key in alone:
        scale = alone[key].abs().max().item()
        assert (packed[key] - alone[key]).abs().max().item() <= 1e-5 * scale, key
    # without the restarting positions the rows would attend across: the comparison can fail
    loss_joined, _ = _packed_gradients(model, rows, packed=True, positions=False)
    assert abs(loss_joined.item() - loss_s.item()) > 1e-3
