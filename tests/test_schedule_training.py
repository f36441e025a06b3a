"""Schedules inside real (tiny, CPU) training runs: resume reproduces the trajectory, lambda is fixed within an
optimizer step under gradient accumulation, adaptive follows the model's capability, the warm start measures the
base model, and warm-up schedules log the expected lambda / exponent.

Expected values are computed independently from each run's own logs or a full-logits probe; nothing is hard-coded.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections import defaultdict

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import addition_dataset, base_args  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback  # noqa: E402

from addition import mean_target_probability, random_tiny_llama  # noqa: E402
from trl_prob.experimental import ExperimentalSFTConfig  # noqa: E402  (the research knobs these tests use)
from trl_prob import ProbSFTConfig, ProbSFTTrainer  # noqa: E402
from trl_prob.embedded import default_model_path  # noqa: E402
from trl_prob.schedules import warmup_lambda  # noqa: E402
from trl_prob.checkpoints import (  # noqa: E402
    LEGACY_SCHEDULE_STATE_FILE,
    SCHEDULE_CALLBACK,
    TRAINER_STATE_FILE,
    CheckpointError,
)

SCHEDULE_KEYS = ("objective_lambda", "schedule_signal_ema", "mean_token_prob", "loss")


@pytest.fixture(scope="module")
def shipped_tokenizer():
    return AutoTokenizer.from_pretrained(default_model_path())


def shipped_model():
    return AutoModelForCausalLM.from_pretrained(default_model_path())


def make_trainer(tmp_path, model, tokenizer, dataset=None, trainer_class=ProbSFTTrainer, **overrides):
    args = base_args(tmp_path, **overrides)
    return trainer_class(
        model=model,
        args=ExperimentalSFTConfig(**args),
        train_dataset=dataset if dataset is not None else addition_dataset(),
        processing_class=tokenizer,
    )


def step_logs(trainer) -> dict[int, dict]:
    return {entry["step"]: entry for entry in trainer.state.log_history if "loss" in entry}


class _RecordBegin(TrainerCallback):
    """Added after the trainer's own callback, so it sees the schedule state right after the warm start."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.p_ema = None
        self.objective_lambda = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.p_ema = self.trainer.schedule.p_ema
        self.objective_lambda = self.trainer.objective_lambda


# ----------------------------------------------------------------------------------------------------------- resume

# A band around the shipped model's ~0.7 statistic, so lambda sits strictly inside (0, 1) and moves step to step.
RESUME = dict(
    objective="p",
    objective_schedule="adaptive",
    schedule_signal="mean",  # the band below is placed for the mean; resume is what is tested here, not the signal
    schedule_ramp_low=0.55,
    schedule_ramp_high=0.85,
    schedule_ema_decay=0.5,
    schedule_warm_start_samples=16,
    max_steps=8,
    save_strategy="steps",
    save_steps=4,
)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, shipped_tokenizer):
    tmp_path = tmp_path_factory.mktemp("uninterrupted")
    trainer = make_trainer(tmp_path, shipped_model(), shipped_tokenizer, **RESUME)
    trainer.train()
    return trainer


def test_resume_reproduces_the_schedule_step_for_step(tmp_path, uninterrupted, shipped_tokenizer):
    full = step_logs(uninterrupted)
    assert sorted(full) == list(range(1, 9))
    lambdas = [full[s]["objective_lambda"] for s in full]
    # The comparison means something only if lambda is neither pinned at an end nor constant.
    assert all(0.0 < lam < 1.0 for lam in lambdas), lambdas
    assert max(lambdas) - min(lambdas) > 1e-3, lambdas

    checkpoint = os.path.join(uninterrupted.args.output_dir, "checkpoint-4")
    # The saved state is the one after step 4: its EMA as logged at step 4, the lambda step 5 then used. It lives in
    # trainer_state.json (transformers' stateful callbacks), written with the rest of the trainer state.
    assert not os.path.exists(os.path.join(checkpoint, LEGACY_SCHEDULE_STATE_FILE))
    saved = saved_schedule(checkpoint)
    assert saved["step"] == 4
    assert saved["warm_started"] is True
    assert saved["p_ema"] == pytest.approx(full[4]["schedule_signal_ema"], rel=1e-9)
    assert saved["objective_lambda"] == pytest.approx(full[5]["objective_lambda"], rel=1e-9)

    resumed = make_trainer(tmp_path, shipped_model(), shipped_tokenizer, **RESUME)
    begin = _RecordBegin(resumed)
    resumed.add_callback(begin)
    resumed.train(resume_from_checkpoint=checkpoint)
    assert begin.p_ema == saved["p_ema"]  # restored, not re-measured by a second warm start
    logged = step_logs(resumed)
    assert sorted(logged) == list(range(1, 9))  # steps 1-4 come back from the checkpoint's trainer_state.json
    again = {step: entry for step, entry in logged.items() if step > 4}
    for step in again:
        for key in SCHEDULE_KEYS:
            assert again[step][key] == pytest.approx(full[step][key], rel=1e-5, abs=1e-7), (step, key)


def saved_schedule(checkpoint: str) -> dict:
    with open(os.path.join(checkpoint, TRAINER_STATE_FILE)) as f:
        return json.load(f)["stateful_callbacks"][SCHEDULE_CALLBACK]["attributes"]["schedule"]


def edit_schedule_state(checkpoint: str, edit) -> None:
    """Rewrite the checkpoint's trainer_state.json with ``edit(stateful_callbacks)`` applied."""
    path = os.path.join(checkpoint, TRAINER_STATE_FILE)
    with open(path) as f:
        state = json.load(f)
    edit(state["stateful_callbacks"])
    with open(path, "w") as f:
        json.dump(state, f)


def copy_checkpoint(uninterrupted, tmp_path) -> str:
    checkpoint = str(tmp_path / "checkpoint-4")
    shutil.copytree(os.path.join(uninterrupted.args.output_dir, "checkpoint-4"), checkpoint)
    return checkpoint


def test_resume_without_schedule_state_is_refused_unless_reset_is_asked(tmp_path, uninterrupted, shipped_tokenizer, caplog):
    full = step_logs(uninterrupted)
    checkpoint = copy_checkpoint(uninterrupted, tmp_path)
    edit_schedule_state(checkpoint, lambda callbacks: callbacks.pop(SCHEDULE_CALLBACK))

    resumed = make_trainer(tmp_path, shipped_model(), shipped_tokenizer, **RESUME)
    with pytest.raises(CheckpointError, match=r"checkpoint-4 has no schedule state.*--schedule_reset_on_resume"):
        resumed.train(resume_from_checkpoint=checkpoint)
    assert resumed.state.global_step == 0  # refused before any step

    resumed = make_trainer(tmp_path, shipped_model(), shipped_tokenizer, schedule_reset_on_resume=True, **RESUME)
    with caplog.at_level(logging.WARNING, logger="trl_prob.trainer"):
        resumed.train(resume_from_checkpoint=checkpoint)
    assert any("schedule restarts" in record.getMessage() for record in caplog.records)
    again = step_logs(resumed)
    # The model, data order and step-5 statistic are the checkpoint's; only the schedule state was lost: the EMA
    # restarts from a fresh warm start instead of continuing, so the trajectory departs from the uninterrupted one.
    assert again[5]["mean_token_prob"] == pytest.approx(full[5]["mean_token_prob"], rel=1e-5)
    assert again[5]["schedule_signal_ema"] != pytest.approx(full[5]["schedule_signal_ema"], rel=1e-6)


def test_legacy_checkpoint_with_a_schedule_file_resumes_the_same_trajectory(tmp_path, uninterrupted, shipped_tokenizer):
    full = step_logs(uninterrupted)
    checkpoint = copy_checkpoint(uninterrupted, tmp_path)
    state = saved_schedule(checkpoint)
    edit_schedule_state(checkpoint, lambda callbacks: callbacks.pop(SCHEDULE_CALLBACK))
    with open(os.path.join(checkpoint, LEGACY_SCHEDULE_STATE_FILE), "w") as f:
        json.dump(state, f)  # what trl-prob 0.1 wrote beside the checkpoint

    resumed = make_trainer(tmp_path, shipped_model(), shipped_tokenizer, **RESUME)
    resumed.train(resume_from_checkpoint=checkpoint)
    again = step_logs(resumed)
    for step in (5, 8):
        for key in SCHEDULE_KEYS:
            assert again[step][key] == pytest.approx(full[step][key], rel=1e-5, abs=1e-7), (step, key)
    # ... and its next checkpoints carry the state the new way
    assert saved_schedule(os.path.join(resumed.args.output_dir, "checkpoint-8"))["step"] == 8


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda c: c.__setitem__(SCHEDULE_CALLBACK, {"args": {}, "attributes": {"schedule": {"step": "four", "objective_lambda": 0.5}}}),
         "step must be an integer >= 0, got 'four'"),
        (lambda c: c[SCHEDULE_CALLBACK]["attributes"]["schedule"].__setitem__("objective_lambda", None),
         "objective_lambda must be a number in [0, 1], got None"),
    ],
)
def test_ill_typed_schedule_state_is_one_clear_error_before_any_step(tmp_path, uninterrupted, shipped_tokenizer, corrupt, message):
    checkpoint = copy_checkpoint(uninterrupted, tmp_path)
    edit_schedule_state(checkpoint, corrupt)
    resumed = make_trainer(tmp_path, shipped_model(), shipped_tokenizer, **RESUME)
    with pytest.raises(CheckpointError) as info:
        resumed.train(resume_from_checkpoint=checkpoint)
    assert "checkpoint-4" in str(info.value) and message in str(info.value)
    assert resumed.state.global_step == 0


def test_corrupt_trainer_state_json_is_one_clear_error(tmp_path, uninterrupted, shipped_tokenizer):
    checkpoint = copy_checkpoint(uninterrupted, tmp_path)
    with open(os.path.join(checkpoint, TRAINER_STATE_FILE), "w") as f:
        f.write('{"stateful_callbacks": {"ProbObjectiveSch')
    resumed = make_trainer(tmp_path, shipped_model(), shipped_tokenizer, **RESUME)
    with pytest.raises(CheckpointError, match="checkpoint-4 is incomplete: trainer_state.json is cut short"):
        resumed.train(resume_from_checkpoint=checkpoint)


# ------------------------------------------------------------------------------------------ gradient accumulation


class RecordingTrainer(ProbSFTTrainer):
    """Records (completed optimizer steps, lambda) at every training compute_loss call."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls: list[tuple[int, float]] = []

    def compute_loss(self, model, inputs, *args, **kwargs):
        if model.training:
            self.calls.append((self.state.global_step, self.objective_lambda))
        return super().compute_loss(model, inputs, *args, **kwargs)


@pytest.mark.parametrize("schedule", ["linear", "adaptive"])
def test_lambda_is_constant_within_an_optimizer_step_under_accumulation(tmp_path, shipped_tokenizer, schedule):
    accumulation, steps = 3, 4
    extra = (
        dict(schedule_warmup_ratio=1.0)
        if schedule == "linear"
        else dict(schedule_signal="token_top1", schedule_ramp_low=0.55, schedule_ramp_high=0.85, schedule_ema_decay=0.5,
                  schedule_warm_start_samples=16)  # a band around the shipped model's token_top1: lambda moves
    )
    trainer = make_trainer(
        tmp_path,
        shipped_model(),
        shipped_tokenizer,
        trainer_class=RecordingTrainer,
        objective="p",
        objective_schedule=schedule,
        gradient_accumulation_steps=accumulation,
        per_device_train_batch_size=2,
        max_steps=steps,
        **extra,
    )
    trainer.train()

    by_step = defaultdict(list)
    for step, lam in trainer.calls:
        by_step[step].append(lam)
    assert sorted(by_step) == list(range(steps))
    assert all(len(values) == accumulation for values in by_step.values()), dict(by_step)
    for values in by_step.values():
        assert len(set(values)) == 1, values  # never updated inside a step
    per_step = [by_step[s][0] for s in range(steps)]
    assert all(a != b for a, b in zip(per_step, per_step[1:])), per_step  # updated between steps

    # The value used in step s + 1 is the one logged for it (one log entry and one EMA update per optimizer step).
    logs = step_logs(trainer)
    assert [logs[s + 1]["objective_lambda"] for s in range(steps)] == pytest.approx(per_step, abs=1e-12)
    if schedule == "linear":
        assert per_step == pytest.approx([s / steps for s in range(steps)])
    else:
        # lambda(s + 1) from the EMA logged at step s, through the configured band
        expected = [min(1.0, max(0.0, (logs[s]["schedule_signal_ema"] - 0.55) / 0.30)) for s in range(1, steps)]
        assert per_step[1:] == pytest.approx(expected, abs=1e-9)


# ---------------------------------------------------------------------------------------------------- adaptive


def test_adaptive_follows_capability(tmp_path, shipped_tokenizer, tokenizer):
    common = dict(objective="p", objective_schedule="adaptive", max_steps=6, schedule_warm_start_samples=32)

    strong = make_trainer(tmp_path / "strong", shipped_model(), shipped_tokenizer, **common)
    strong.train()
    strong_logs = step_logs(strong).values()
    strong_lambdas = [e["objective_lambda"] for e in strong_logs]
    # the default signal reads whole completions: 20% of the rows carry a wrong answer the model does not write, so a
    # strong model's lambda sits high but below 1
    assert sum(strong_lambdas) / len(strong_lambdas) > 0.6, strong_lambdas
    assert all(e["schedule_signal_ema"] > strong.args.schedule_ramp_low for e in strong_logs)

    weak = make_trainer(tmp_path / "weak", random_tiny_llama(seed=0), tokenizer, **common)
    weak.train()
    weak_logs = step_logs(weak).values()
    weak_lambdas = [e["objective_lambda"] for e in weak_logs]
    assert sum(weak_lambdas) / len(weak_lambdas) < 0.05, weak_lambdas
    assert all(e["schedule_signal_ema"] < weak.args.schedule_ramp_low for e in weak_logs)


def full_logits_mean_p(trainer, num_samples: int, signal: str = "mean") -> float:
    """Mean target-token p (or, for ``token_top1``, the share of target tokens that are the argmax) from full logits
    (log_softmax + gather) on TRL's own batches and labels."""
    model = trainer.model
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in trainer.get_eval_dataloader(trainer.train_dataset.select(range(num_samples))):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            labels = batch["labels"][:, 1:]
            mask = labels != -100
            if signal == "token_top1":
                total += (logits.argmax(-1) == labels)[mask].sum().item()
            else:
                log_p = torch.log_softmax(logits.double(), -1).gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1)
                total += log_p[mask].exp().sum().item()
            count += int(mask.sum())
    model.train(was_training)
    return total / count


@pytest.mark.parametrize("signal", ["mean", "token_top1"])
def test_warm_start_measures_the_base_model(tmp_path, shipped_tokenizer, signal):
    n, decay = 24, 0.8
    dataset = addition_dataset(64, noise=0.2, seed=5)
    trainer = make_trainer(
        tmp_path,
        shipped_model(),
        shipped_tokenizer,
        dataset=dataset,
        objective="power:4",
        objective_schedule="adaptive",
        schedule_warm_start_samples=n,
        schedule_ema_decay=decay,
        schedule_signal=signal,
        max_steps=2,
        # SFTConfig defaults to bf16=True: on CPU, once train() has prepared the model, its forward (the warm start
        # included) runs under bf16 autocast, which moves p by ~1e-4 against these fp32 references.
        bf16=False,
    )
    # Probes of the base model, before any step: fused head, full logits on TRL's batches, and the embedded
    # module's own tokenisation of the raw rows.
    measured = trainer.measure_token_probs(num_samples=n, progress=False)
    probe = measured.mean_p if signal == "mean" else measured.token_top1_share
    reference = full_logits_mean_p(trainer, n, signal)
    assert probe == pytest.approx(reference, abs=1e-4)
    if signal == "mean":
        independent = mean_target_probability(trainer.model, shipped_tokenizer, dataset.select(range(n)))
        assert independent == pytest.approx(reference, abs=1e-4)

    begin = _RecordBegin(trainer)
    trainer.add_callback(begin)
    trainer.train()
    assert begin.p_ema == pytest.approx(reference, abs=1e-4)
    assert begin.objective_lambda == pytest.approx(
        min(1.0, max(0.0, (reference - 0.30) / 0.25)), abs=1e-3
    )  # the step-1 lambda already uses the warm start
    logs = step_logs(trainer)
    assert logs[1]["objective_lambda"] == begin.objective_lambda
    # the first logged EMA continues from the warm start rather than replacing it
    step_signal = logs[1]["mean_token_prob" if signal == "mean" else "token_top1_share"]
    assert logs[1]["schedule_signal_ema"] == pytest.approx(decay * begin.p_ema + (1 - decay) * step_signal, rel=1e-9)


# ------------------------------------------------------------------------------------------ warm-up / exponent


@pytest.mark.parametrize(
    "schedule, mode, objective, ratio",
    [("linear", "blend", "p", 0.5), ("cosine", "blend", "p", 0.5), ("linear", "exponent", "power:4", 0.5)],
)
def test_warmup_schedule_logs(tmp_path, tokenizer, schedule, mode, objective, ratio):
    steps = 6
    trainer = make_trainer(
        tmp_path,
        random_tiny_llama(seed=0),
        tokenizer,
        objective=objective,
        objective_schedule=schedule,
        schedule_mode=mode,
        schedule_warmup_ratio=ratio,
        max_steps=steps,
    )
    trainer.train()
    logs = step_logs(trainer)
    assert sorted(logs) == list(range(1, steps + 1))
    warmup_steps = ratio * steps
    for step, entry in logs.items():
        # the lambda used in step s was set after s - 1 completed steps
        progress = min(1.0, (step - 1) / warmup_steps)
        expected = progress if schedule == "linear" else 0.5 * (1 - math.cos(math.pi * progress))
        assert entry["objective_lambda"] == pytest.approx(expected, abs=1e-12), step
        assert entry["objective_lambda"] == pytest.approx(warmup_lambda(step - 1, steps, ratio, schedule))
        if mode == "exponent":
            assert entry["objective_exponent"] == pytest.approx(entry["objective_lambda"] * 4, abs=1e-12)
        else:
            assert "objective_exponent" not in entry
            # the loss TRL reports is the blend with that same lambda: (1 - lam) NLL + lam (1 - p), token means
            lam = entry["objective_lambda"]
            blend = (1 - lam) * entry["nll"] + lam * (1 - entry["mean_token_prob"])
            assert entry["loss"] == pytest.approx(blend, rel=1e-4)
    # lambda = 0 at step 1: pure NLL whatever the mode
    assert logs[1]["loss"] == pytest.approx(logs[1]["nll"], rel=1e-4)
    assert logs[steps]["objective_lambda"] == 1.0


# ------------------------------------------------------------------------------- resume=True, monotone, statistic


def test_resume_from_last_checkpoint_with_true(tmp_path, uninterrupted, shipped_tokenizer):
    full = step_logs(uninterrupted)
    output_dir = tmp_path / "run"
    shutil.copytree(os.path.join(uninterrupted.args.output_dir, "checkpoint-4"), output_dir / "checkpoint-4")
    resumed = make_trainer(tmp_path, shipped_model(), shipped_tokenizer, **RESUME)
    assert resumed.args.output_dir == str(output_dir)
    resumed.train(resume_from_checkpoint=True)
    again = step_logs(resumed)
    for step in range(5, 9):
        for key in SCHEDULE_KEYS:
            assert again[step][key] == pytest.approx(full[step][key], rel=1e-5, abs=1e-7), (step, key)


def test_monotone_lambda_never_decreases_in_training(tmp_path, uninterrupted, shipped_tokenizer):
    free = [entry["objective_lambda"] for _, entry in sorted(step_logs(uninterrupted).items())]
    assert any(b < a for a, b in zip(free, free[1:])), free  # the free schedule does fall on this run
    overrides = {**RESUME, "save_strategy": "no", "schedule_monotone": True}
    trainer = make_trainer(tmp_path, shipped_model(), shipped_tokenizer, **overrides)
    trainer.train()
    logs = [entry for _, entry in sorted(step_logs(trainer).items())]
    held = [entry["objective_lambda"] for entry in logs]
    assert all(b >= a for a, b in zip(held, held[1:])), held
    # each step's lambda is the max of the previous one and what the EMA logged one step earlier asks for
    held_back = 0
    for previous, entry in zip(logs, logs[1:]):
        band = min(1.0, max(0.0, (previous["schedule_signal_ema"] - 0.55) / 0.30))
        assert entry["objective_lambda"] == pytest.approx(max(previous["objective_lambda"], band), abs=1e-9)
        held_back += band < previous["objective_lambda"] - 1e-6
    assert held_back > 0  # the monotone rule did act on this run


@pytest.mark.parametrize(
    "statistic, key", [("mean", "mean_token_prob"), ("median", "median_token_prob"), ("share_confident", "confident_token_share")]
)
def test_ema_follows_the_configured_statistic(tmp_path, shipped_tokenizer, statistic, key):
    decay = 0.6
    trainer = make_trainer(
        tmp_path,
        shipped_model(),
        shipped_tokenizer,
        objective="p",
        objective_schedule="adaptive",
        schedule_signal=statistic,
        schedule_ema_decay=decay,
        schedule_warm_start_samples=16,
        max_steps=4,
    )
    begin = _RecordBegin(trainer)
    trainer.add_callback(begin)
    trainer.train()
    logs = [entry for _, entry in sorted(step_logs(trainer).items())]
    assert all(key in entry for entry in logs)
    for other in {"median_token_prob", "confident_token_share"} - {key}:
        assert all(other not in entry for entry in logs)
    ema = begin.p_ema
    assert ema is not None and 0.0 <= ema <= 1.0
    for entry in logs:
        ema = decay * ema + (1 - decay) * entry[key]
        assert entry["schedule_signal_ema"] == pytest.approx(ema, rel=1e-9, abs=1e-12)


def test_token_top1_signal_equals_trls_own_token_accuracy(tmp_path, shipped_tokenizer):
    """token_top1 is read from our statistics; TRL computes mean_token_accuracy its own way from the same `is_top1`.
    On every step of one process they must agree."""
    trainer = make_trainer(tmp_path, shipped_model(), shipped_tokenizer, objective="p", objective_schedule="adaptive",
                           schedule_signal="token_top1", max_steps=4, bf16=False)  # fmt: skip
    trainer.train()
    for step, entry in step_logs(trainer).items():
        assert entry["token_top1_share"] == pytest.approx(entry["mean_token_accuracy"], rel=1e-6), step


def test_default_signal_is_the_steps_teacher_forced_exact_match(tmp_path, shipped_tokenizer):
    """The default signal, sequence_top1, is the share of the step's completions whose every target token is the
    model's first choice: checked against argmax over the full logits of the same rows (one step over all of them)."""
    rows = addition_dataset(n=16, noise=0.25, seed=3)  # some labels wrong: the model cannot write those
    trainer = make_trainer(tmp_path, shipped_model(), shipped_tokenizer, dataset=rows, objective="p",
                           objective_schedule="adaptive", max_steps=1, per_device_train_batch_size=16, bf16=False,
                           schedule_warm_start_samples=0)  # fmt: skip
    assert trainer.args.schedule_signal == "sequence_top1"
    (batch,) = list(trainer.get_train_dataloader())  # all 16 rows, before any update
    model = trainer.model.eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits.float()
    labels = batch["labels"][:, 1:]
    right = (logits[:, :-1].argmax(-1) == labels) | (labels == -100)
    expected = right.all(-1).double().mean().item()  # every row has target tokens
    trainer.train()
    (entry,) = step_logs(trainer).values()
    assert 0.0 < expected < 1.0  # the rows exercise both outcomes
    assert entry["sequence_top1_share"] == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    "schedule",
    [dict(objective_schedule="progress", schedule_progress_window=2, schedule_progress_threshold=0.5),
     dict(objective_schedule="token_gate", schedule_ramp_low=0.3, schedule_ramp_high=0.9)],
    ids=["progress", "token_gate"],
)
def test_a_resumed_confidence_schedule_ends_like_the_uninterrupted_run(tmp_path, shipped_tokenizer, schedule):
    """The new schedules' state (progress: the fresh-batch NLL's moving average and its window; token_gate: the last
    step's mean token lambda) travels in the checkpoint: steps 5-8 of a resumed run equal the uninterrupted ones."""
    options = {**RESUME, "schedule_ramp_low": None, "schedule_ramp_high": None, **schedule}
    options.pop("schedule_signal")
    full_run = make_trainer(tmp_path / "full", shipped_model(), shipped_tokenizer, **options)
    full_run.train()
    full = step_logs(full_run)
    lambdas = [full[s]["objective_lambda"] for s in sorted(full)]
    assert max(lambdas) - min(lambdas) > 1e-3, lambdas  # lambda moves: the comparison means something
    checkpoint = os.path.join(full_run.args.output_dir, "checkpoint-4")
    assert set(saved_schedule(checkpoint)) >= {"step", "objective_lambda"}
    resumed = make_trainer(tmp_path / "full", shipped_model(), shipped_tokenizer, **options)
    resumed.train(resume_from_checkpoint=checkpoint)
    logged = step_logs(resumed)
    for step in range(5, 9):
        for key in ("objective_lambda", "loss", "nll"):
            assert logged[step][key] == pytest.approx(full[step][key], rel=1e-5, abs=1e-7), (step, key)
    ours, want = resumed.schedule.state_dict(), full_run.schedule.state_dict()
    assert ours["step"] == want["step"] == 8
    assert ours["objective_lambda"] == pytest.approx(want["objective_lambda"], rel=1e-5)
    assert ours.get("history") == pytest.approx(want.get("history"), rel=1e-5) if "history" in want else True
