import math
import os
import warnings

import pytest
import torch
from sdt_helpers import (
    ByteChunks,
    assert_same_state,
    make_config,
    make_updates_config,
    one_thread,
    run_ddp_worker,
    tiny_gpt2,
    train_and_save_state,
    training_args,
)
from transformers import TrainerCallback

import hf_sdt
from hf_sdt import SDTCompactLinear, SDTConfig, get_sdt_model, sdt_layers
from hf_sdt.controller import SDTController
from hf_sdt.masks import expand_block_mask
from hf_sdt.schedule import density_at, target_block_counts
from hf_sdt.trainer import SDT_STATE_NAME, SDTTrainer


def layer_shapes(model):
    return [(layer.out_features, layer.in_features) for layer in sdt_layers(model).values()]


class CountsFollowTheSchedule(TrainerCallback):
    """Checks after every optimizer step that each layer holds exactly the schedule's count of blocks."""

    def __init__(self, config: SDTConfig):
        self.config = config
        self.checked = 0

    def on_step_end(self, args, state, control, model=None, **kwargs):
        expected = target_block_counts(
            layer_shapes(model),
            self.config.block_shape,
            density_at(state.global_step - 1, state.max_steps, self.config),
            self.config.distribution,
        )
        assert [int(layer.sdt_mask.sum()) for layer in sdt_layers(model).values()] == expected
        self.checked += 1


def assert_zero_outside_masks(model, optimizer):
    for name, layer in sdt_layers(model).items():
        if isinstance(layer, SDTCompactLinear):  # nothing is stored outside the blocks, optimizer states included
            states = [v for v in optimizer.state[layer.sdt_blocks].values() if isinstance(v, torch.Tensor) and v.dim()]
            assert states and all(value.shape == layer.sdt_blocks.shape for value in states), name
            continue
        inactive = ~expand_block_mask(layer.sdt_mask, layer.block_size, (layer.out_features, layer.in_features))
        if layer.is_conv1d:
            inactive = inactive.t()
        assert (layer.weight[inactive] == 0).all(), name
        for key, value in optimizer.state[layer.weight].items():
            if isinstance(value, torch.Tensor) and value.shape == layer.weight.shape:
                assert (value[inactive] == 0).all(), f"{name}: optimizer state {key} of inactive blocks"


def test_sdt_trainer_on_real_text(tmp_path):
    config = make_config()
    checker = CountsFollowTheSchedule(config)
    trainer = SDTTrainer(
        model=tiny_gpt2(),
        args=training_args(tmp_path),
        train_dataset=ByteChunks(),
        sdt_config=config,
        callbacks=[checker],
    )
    trainer.train()
    assert checker.checked == 40
    logs = [entry for entry in trainer.state.log_history if "sdt/density" in entry]
    assert len(logs) == 40
    assert logs[0]["sdt/density"] > 0.9 and logs[-1]["sdt/density"] == pytest.approx(0.25, abs=0.02)
    # Updates at steps 5, 10, 15, 20; at 20 the decayed drop fraction (0.02) rounds to no block in these small layers.
    for entry in logs:
        step = entry["step"] - 1
        if step in (5, 10, 15):
            assert entry["sdt/churn"] > 0, f"step {step} should have changed blocks"
        if step >= 24:
            assert entry["sdt/churn"] == 0.0, "the topology is frozen after update_end"
    assert 0 < logs[-1]["sdt/linear_flops_saved"] < 1
    assert logs[-1]["sdt/train_flops_ratio"] + logs[-1]["sdt/train_flops_saved"] == pytest.approx(1)
    first, last = logs[0]["loss"], sum(entry["loss"] for entry in logs[-5:]) / 5
    assert last < first - 0.5, (first, last)
    assert_zero_outside_masks(trainer.model, trainer.optimizer)


@pytest.mark.parametrize(
    "mode,steps,save_at",
    [("weights", 30, 15), ("weights-compact", 30, 15), ("updates", 14, 6)],  # updates: between selections 4 and 8
)
def test_resumed_run_ends_like_an_uninterrupted_one(tmp_path, mode, steps, save_at):
    config = {
        "weights": make_config(grow_criterion="random", schedule_end=0.3),
        "weights-compact": make_config(grow_criterion="random", schedule="constant"),
        "updates": make_updates_config(),
    }[mode]
    full = SDTTrainer(
        model=tiny_gpt2(),
        args=training_args(tmp_path / "full", max_steps=steps, save_strategy="steps", save_steps=save_at),
        train_dataset=ByteChunks(),
        sdt_config=config,
    )
    full.train()
    checkpoint = tmp_path / "full" / f"checkpoint-{save_at}"
    assert (checkpoint / SDT_STATE_NAME).is_file()
    resumed = SDTTrainer(
        model=tiny_gpt2(),
        args=training_args(tmp_path / "resumed", max_steps=steps),
        train_dataset=ByteChunks(),
        sdt_config=config,
    )
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert_same_state(full.model.state_dict(), resumed.model.state_dict())
    assert resumed.sdt_callback.controller.steps_done == steps


def run_plain_loop(
    config: SDTConfig, steps: int, poison_step: int | None = None, compile_backend=None, after_topology=None
):
    """A plain PyTorch loop with the controller (the model compiled with `compile_backend` if given), calling
    `after_topology(step, model, optimizer, masks_before)` (weights mode) between the controller's topology change
    and the optimizer step; returns the model, controller, optimizer, per-step layer counts and per-step churn."""
    model = get_sdt_model(tiny_gpt2(), config)
    forward = model if compile_backend is None else torch.compile(model, backend=compile_backend)
    controller = SDTController(model, config, total_steps=steps)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = ByteChunks()
    counts, churns = [], []
    for step in range(steps):
        controller.begin_step(step)
        batch = torch.stack([data[(step * 4 + i) % len(data)]["input_ids"] for i in range(4)])
        forward(input_ids=batch, labels=batch).loss.backward()
        if step == poison_step:
            next(iter(sdt_layers(model).values())).weight_parameter.grad.fill_(float("nan"))
        if after_topology is not None:
            masks_before = {name: layer.sdt_mask.clone() for name, layer in sdt_layers(model).items()}
        controller.before_optimizer_step(optimizer)
        if after_topology is not None:
            after_topology(step, model, optimizer, masks_before)
        if step == poison_step:
            optimizer.zero_grad()  # keep the NaN out of the weights: the test is about the scores
        optimizer.step()
        optimizer.zero_grad()
        controller.after_optimizer_step()
        counts.append([int(layer.block_mask.sum()) for layer in sdt_layers(model).values()])
        churns.append(controller.churn)
    return model, controller, optimizer, counts, churns


@pytest.mark.parametrize(
    "overrides",
    [
        {"prune_criterion": "wanda", "grow_criterion": "gradient"},
        {"prune_criterion": "taylor", "grow_criterion": "random", "distribution": "erk"},
        {"prune_criterion": "magnitude", "schedule": "linear", "distribution": "global"},
    ],
)
def test_controller_criteria_and_distributions(overrides):
    config = make_config(**overrides)
    model, _, optimizer, counts, churns = run_plain_loop(config, 20)
    shapes = layer_shapes(model)
    blocks_total = sum(layer.sdt_mask.numel() for layer in sdt_layers(model).values())
    for step, step_counts in enumerate(counts):
        density = density_at(step, 20, config)
        if config.distribution == "global":
            assert sum(step_counts) == max(len(shapes), round(density * blocks_total))
        else:
            assert step_counts == target_block_counts(shapes, config.block_shape, density, config.distribution)
    assert max(churns) > 0
    assert_zero_outside_masks(model, optimizer)


@pytest.mark.parametrize("distribution", ["uniform", "global"])
def test_the_dense_tail_grows_every_block_back_at_zero_with_a_fresh_optimizer_state(distribution):
    """The last quarter of the steps (15 to 19) trains dense: at step 15 every block becomes active, those pruned
    before start at zero with no gradient or optimizer state, and by the end they have trained."""
    config = make_config(dense_tail=0.25, distribution=distribution)
    restored = {}

    def check_restoration(step, model, optimizer, masks_before):
        for name, layer in sdt_layers(model).items():
            if step >= 8:  # the prune from dense ends at schedule_end = 0.4
                assert bool(layer.sdt_mask.all()) == (step >= 15), (name, step)
            if step == 15:
                pruned = ~layer.storage_element_mask(masks_before[name])
                assert pruned.any(), name
                state = optimizer.state[layer.weight]
                for value in (layer.weight, layer.weight.grad, state["exp_avg"], state["exp_avg_sq"]):
                    assert (value[pruned] == 0).all(), name
                restored[name] = pruned

    model, controller, _, counts, _ = run_plain_loop(config, 20, after_topology=check_restoration)
    blocks = [layer.sdt_mask.numel() for layer in sdt_layers(model).values()]
    assert counts[14] != blocks and counts[15:] == [blocks] * 5
    assert len(restored) == len(blocks)
    for name, layer in sdt_layers(model).items():
        assert (layer.weight[restored[name]] != 0).float().mean() > 0.9, f"{name}: restored weights trained"
    metrics = controller.metrics()
    assert metrics["sdt/density"] == 1.0 and metrics["sdt/linear_flops_ratio"] == 1.0


def test_non_finite_scores_skip_the_update_and_training_goes_on():
    config = make_config(prune_criterion="taylor", schedule="constant")
    _, clean_controller, _, clean_counts, _ = run_plain_loop(config, 12)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, controller, optimizer, counts, _ = run_plain_loop(config, 12, poison_step=5)
    messages = [str(w.message) for w in caught if "non-finite scores" in str(w.message)]
    assert len(messages) == 1 and "step 5" in messages[0]
    assert controller.skipped_updates >= 1 and clean_controller.skipped_updates == 0
    assert counts[-1] == clean_counts[-1]
    assert all(math.isfinite(float(p.detach().sum())) for p in model.parameters())
    assert_zero_outside_masks(model, optimizer)


def test_trainer_takes_a_converted_model_and_refuses_ambiguity(tmp_path):
    config = make_config()
    model = get_sdt_model(tiny_gpt2(), config)
    trainer = SDTTrainer(model=model, args=training_args(tmp_path, max_steps=1), train_dataset=ByteChunks())
    assert trainer.sdt_config == config
    with pytest.raises(ValueError, match="sdt_config"):
        SDTTrainer(model=tiny_gpt2(), args=training_args(tmp_path, max_steps=1))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["weights", "weights-compact", "weights-budget", "updates"])
def test_two_processes_agree_with_each_other_and_with_one(tmp_path, mode):
    """2 CPU processes (gloo) through `accelerate launch`, against one process with the same global batch (in
    updates mode only the ranks are compared: its block energies sum per micro-batch, so a different split of the
    batch may choose other blocks); with a compute budget, both plan the same density and schedule and spend at
    most it."""
    rank0, rank1 = run_ddp_worker(tmp_path, 4, mode)
    with one_thread():
        train_and_save_state(str(tmp_path), batch_size=8, mode=mode)  # the same global batch in one process
    single = torch.load(tmp_path / "world1_rank0.pt")
    assert any(key.endswith(("sdt_mask", "sdt_block_ids")) for key in single)
    for key in single:
        assert torch.equal(rank0[key], rank1[key]), f"{key} differs between ranks"
    if mode != "updates":  # 2 processes chose the blocks of 1 process, and trained them alike
        assert_same_state(single, rank0)
    if mode == "weights-budget":
        assert 0.6 < rank0["receipt"] <= 0.7


@pytest.mark.parametrize(
    "overrides",
    [
        {"gradient_accumulation_steps": 2},
        {"max_steps": -1, "num_train_epochs": 1, "per_device_train_batch_size": 64},
        {"bf16": True},
        {"activation_checkpointing": True},  # transformers 5 name of gradient checkpointing
    ],
    ids=["grad-accumulation", "epochs", "bf16", "grad-checkpointing"],
)
def test_trainer_variants(tmp_path, overrides):
    config = make_config(update_interval=2, prune_criterion="wanda")
    checker = CountsFollowTheSchedule(config)
    trainer = SDTTrainer(
        model=tiny_gpt2(),
        args=training_args(tmp_path, max_steps=overrides.pop("max_steps", 10), **overrides),
        train_dataset=ByteChunks(),
        sdt_config=config,
        callbacks=[checker],
    )
    result = trainer.train()
    assert checker.checked == trainer.state.max_steps > 0
    assert math.isfinite(result.training_loss)
    assert max(entry.get("sdt/churn", 0) for entry in trainer.state.log_history) > 0
    assert_zero_outside_masks(trainer.model, trainer.optimizer)


@pytest.mark.parametrize("grow_criterion", ["random", "gradient"])
def test_updates_mode_trains_logs_and_checkpoints_adapters(tmp_path, grow_criterion):
    pretrained = tiny_gpt2().state_dict()
    trainer = SDTTrainer(
        model=tiny_gpt2(),
        args=training_args(tmp_path, max_steps=12, save_strategy="steps", save_steps=6),
        train_dataset=ByteChunks(),
        sdt_config=make_updates_config(grow_criterion=grow_criterion),
    )
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "sdt/density" in entry]
    assert len(logs) == 12 and logs[-1]["sdt/density"] == pytest.approx(0.25)
    assert logs[-1]["sdt/linear_flops_ratio"] == pytest.approx(0.75)
    if grow_criterion == "gradient":
        assert 0 < logs[-1]["sdt/linear_flops_saved"] < 0.25  # the capture steps count as dense
    else:  # random growth takes no dense gradient: every step costs the active blocks only
        assert logs[-1]["sdt/linear_flops_saved"] == pytest.approx(0.25)
    assert any(entry["sdt/churn"] > 0 for entry in logs)
    checkpoint = tmp_path / "checkpoint-6"
    assert sorted(os.listdir(checkpoint)) == sorted(
        ["optimizer.pt", "rng_state.pth", "scheduler.pt", SDT_STATE_NAME, "sdt_adapter.safetensors",
         "sdt_adapter_config.json", "trainer_state.json", "training_args.bin"]
    )  # fmt: skip
    for name, layer in sdt_layers(trainer.model).items():  # only the trained blocks moved
        layer.materialize_()
        active = expand_block_mask(layer.block_mask, layer.block_size, (layer.out_features, layer.in_features))
        assert torch.equal(layer.weight.t()[~active], pretrained[name + ".weight"].t()[~active])


@pytest.mark.parametrize(
    "overrides",
    [
        {"gradient_accumulation_steps": 2},
        {"bf16": True},
        {"activation_checkpointing": True},
        {"torch_compile": True, "torch_compile_backend": "aot_eager"},
    ],
    ids=["grad-accumulation", "bf16", "grad-checkpointing", "compiled"],
)
def test_updates_mode_trainer_variants(tmp_path, overrides):
    trainer = SDTTrainer(
        model=tiny_gpt2(),
        args=training_args(tmp_path, max_steps=10, **overrides),
        train_dataset=ByteChunks(),
        sdt_config=make_updates_config(),
    )
    result = trainer.train()
    assert math.isfinite(result.training_loss)
    assert max(entry.get("sdt/churn", 0) for entry in trainer.state.log_history) > 0
    assert all(layer.sdt_updates.abs().sum() > 0 for layer in sdt_layers(trainer.model).values())


@pytest.mark.parametrize("mode", ["weights", "updates"])
def test_load_best_model_at_end_restores_the_best_checkpoint(tmp_path, mode):
    config = make_updates_config() if mode == "updates" else make_config(schedule="constant", update_interval=2)
    # "Best" is the highest loss, an early checkpoint, so that loading it changes the model.
    args = training_args(
        tmp_path, max_steps=8, eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2,
        load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=True,
    )  # fmt: skip
    data = ByteChunks()
    trainer = SDTTrainer(model=tiny_gpt2(), args=args, train_dataset=data, eval_dataset=data, sdt_config=config)
    trainer.train()
    assert not trainer.state.best_model_checkpoint.endswith("checkpoint-8")  # else this tests nothing
    best = hf_sdt.from_pretrained(trainer.state.best_model_checkpoint, base_model=tiny_gpt2())
    for name, layer in sdt_layers(best).items():
        assert torch.equal(sdt_layers(trainer.model)[name].block_mask, layer.block_mask), name
    ids = data[0]["input_ids"][None]
    torch.testing.assert_close(trainer.model.eval()(ids).logits, best.eval()(ids).logits)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["weights", "updates"])
def test_compiled_training_with_topology_updates_equals_eager_and_never_recompiles(mode):
    """Gradient growth (weights mode) or selection (updates mode): the steps that collect dense gradients collect
    them eagerly (a second, cached graph variant), every other step is the first variant; topology and weights
    equal an eager run's."""
    from torch._dynamo.utils import counters

    if mode == "weights":
        config = make_config(schedule="constant", density=0.5, update_interval=2, update_end=0.9, drop_fraction=0.5)
    else:
        config = make_updates_config(update_interval=2, selection_steps=2)
    eager, *_, eager_churns = run_plain_loop(config, 9)
    graphs = []
    for steps in (9, 17):
        torch._dynamo.reset()
        counters.clear()
        compiled, *_, churns = run_plain_loop(config, steps, compile_backend="aot_eager")
        graphs.append(counters["stats"]["unique_graphs"])
        if steps == 9:
            assert churns == eager_churns and max(churns) > 0
            for name, layer in sdt_layers(eager).items():
                assert_same_state(layer.state_dict(), sdt_layers(compiled)[name].state_dict())
    assert graphs[0] == graphs[1], f"more update steps compiled more graphs: {graphs}"


def test_an_sdt_model_trained_without_a_controller_warns_once(tmp_path):
    """A gradual schedule needs a controller to prune: under a plain Trainer it would stay dense, silently."""
    from transformers import Trainer

    args = training_args(tmp_path, max_steps=3)
    with pytest.warns(UserWarning, match="without an SDT controller, so the density stays at 1.0") as caught:
        Trainer(model=get_sdt_model(tiny_gpt2(), make_config()), args=args, train_dataset=ByteChunks()).train()
    assert len([w for w in caught if "without an SDT controller" in str(w.message)]) == 1
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*without an SDT controller")
        SDTTrainer(model=tiny_gpt2(), args=args, train_dataset=ByteChunks(), sdt_config=make_config()).train()


def test_updates_mode_learns_a_tiny_classification_task_at_the_documented_rate(tmp_path):
    """Which of two marker tokens a sequence holds, somewhere among random tokens (chance 50%): a tiny Llama in
    updates mode at its default density and the rate the docs give (a LoRA rate, 2e-3) learns it in 64 steps; a
    model that learned nothing would predict one class."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    def marked_sequences(count: int, seed: int) -> list[dict]:
        generator = torch.Generator().manual_seed(seed)
        ids = torch.randint(6, 64, (count, 16), generator=generator)  # (N, T)
        labels = torch.randint(0, 2, (count,), generator=generator)
        ids[torch.arange(count), torch.randint(0, 16, (count,), generator=generator)] = 4 + labels
        return [{"input_ids": row, "labels": label} for row, label in zip(ids, labels, strict=True)]

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=2, pad_token_id=0)  # fmt: skip
    model = LlamaForSequenceClassification(config)
    args = training_args(tmp_path, max_steps=64, per_device_train_batch_size=16, learning_rate=2e-3, logging_steps=16)
    trainer = SDTTrainer(model=model, args=args, train_dataset=marked_sequences(1024, 0),
                         sdt_config=SDTConfig(mode="updates", block_size=16))  # fmt: skip
    trainer.train()
    test = marked_sequences(256, 1)
    with torch.no_grad():
        logits = type(model).forward(model.eval(), input_ids=torch.stack([e["input_ids"] for e in test])).logits
    accuracy = (logits.argmax(-1) == torch.stack([e["labels"] for e in test])).float().mean().item()
    assert accuracy >= 0.7, f"updates mode learned too little: {accuracy:.1%} (chance 50%)"


class SequencesPerStep(TrainerCallback):
    """The sequences each optimizer step's forwards took (all its micro-batches)."""

    def __init__(self, model):
        self.sizes, self.seen = [], 0
        model.register_forward_pre_hook(self.count, with_kwargs=True)

    def count(self, module, args, kwargs):
        if module.training:
            self.seen += len(kwargs["input_ids"])

    def on_step_end(self, args, state, control, **kwargs):
        self.sizes.append(self.seen)
        self.seen = 0


@pytest.mark.parametrize("density", [0.25, None])
def test_sdt_trainer_spends_at_most_its_compute_budget(tmp_path, force_blocked_path, density):
    """`SDTConfig(compute_budget=...)` under SDTTrainer (gradient accumulation: a step is two micro-batches; 52
    sequences in batches of 8, so that each epoch's last step takes 4 of them): the planner weighs the steps as
    Trainer runs them (planned as if equal, the run at density 0.25 ended at 0.561), and the logged receipt ends at
    most at the budget,
    and close to it. Without a density, the planned one is what the saved model says and loads with."""
    config = make_config(compute_budget=0.55, schedule_end=0.5, density=density)
    model = tiny_gpt2()
    sequences = SequencesPerStep(model)
    trainer = SDTTrainer(
        model=model,
        args=training_args(tmp_path, max_steps=20, gradient_accumulation_steps=2),
        train_dataset=ByteChunks(hf_sdt.demo_data.novel_excerpt()[: 52 * 64]),
        sdt_config=config,
        callbacks=[sequences],
    )
    trainer.train()
    controller = trainer.sdt_callback.controller
    assert list(controller.step_sizes) == sequences.sizes == [16, 16, 16, 4] * 5
    receipt = [entry["sdt/train_flops_ratio"] for entry in trainer.state.log_history if "sdt/density" in entry]
    assert 0.53 < receipt[-1] <= 0.55
    assert controller.planned_schedule_end < 0.5
    if density is None:
        trainer.save_model(tmp_path / "saved")
        loaded = hf_sdt.from_pretrained(tmp_path / "saved")
        assert loaded.config.sdt_config["density"] == controller.planned_density
        for name, value in trainer.model.state_dict().items():
            torch.testing.assert_close(loaded.state_dict()[name], value, msg=name)


@pytest.mark.parametrize(
    ("unused_module", "user_value", "expected"),
    [(False, None, False), (True, None, True), (False, True, True), (True, False, False)],
    ids=["all-used", "one-unused", "user-on", "user-off"],
)
def test_ddp_find_unused_parameters_follows_the_model(tmp_path, unused_module, user_value, expected):
    """Left unset, DDP's flag is on only when a forward leaves a trainable parameter unused; a value the user sets is
    kept (the accelerator is built as for 2 processes; nothing is launched)."""
    from unittest import mock

    from transformers import TrainingArguments

    model = tiny_gpt2()
    if unused_module:
        model.transformer.unused = torch.nn.Linear(4, 4)
    args = training_args(tmp_path, ddp_find_unused_parameters=user_value)
    with mock.patch.object(TrainingArguments, "world_size", new_callable=mock.PropertyMock, return_value=2):
        trainer = SDTTrainer(model=model, args=args, train_dataset=ByteChunks(), sdt_config=make_config())
    assert trainer.accelerator.ddp_handler.find_unused_parameters is expected
