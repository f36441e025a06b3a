"""Evaluation that means one thing: ``eval_loss`` is the objective at the live lambda, ``eval_nll`` beside it is the
evaluation's NLL at every step; ranking checkpoints on ``eval_loss`` while lambda moves is refused in the config."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import addition_dataset, base_args, logits_loss_trainer_class
from trl_prob import ProbSFTConfig, ProbSFTTrainer

LogitsLossTrainer = logits_loss_trainer_class()


def config(tmp_path, **overrides):
    return ProbSFTConfig(**base_args(tmp_path, objective="p", **overrides))


MOVING = [dict(objective_schedule="linear"), dict(objective_schedule="adaptive")]
RANKS_BY_LOSS = [
    dict(load_best_model_at_end=True),  # metric_for_best_model unset: transformers ranks by eval_loss
    dict(load_best_model_at_end=True, metric_for_best_model="loss"),
    dict(load_best_model_at_end=True, metric_for_best_model="eval_loss"),
    dict(metric_for_best_model="eval_loss"),  # what EarlyStoppingCallback reads, with or without load_best
]
EVAL = dict(eval_strategy="steps", save_strategy="steps", eval_steps=1, save_steps=1)


@pytest.mark.parametrize("schedule", MOVING, ids=lambda s: s["objective_schedule"])
@pytest.mark.parametrize("ranking", RANKS_BY_LOSS, ids=["load_best", "load_best-loss", "load_best-eval_loss", "eval_loss"])
def test_ranking_on_eval_loss_while_lambda_moves_is_refused(tmp_path, schedule, ranking):
    with pytest.raises(ValueError, match=r"metric_for_best_model.*eval_loss.*live lambda.*'eval_nll'") as info:
        config(tmp_path, **EVAL, **schedule, **ranking)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("schedule", [dict(objective_schedule="none"), dict(objective_schedule="constant",
                                                                           schedule_constant_lambda=0.5)],
                         ids=["none", "constant"])  # fmt: skip
def test_eval_loss_may_rank_checkpoints_while_lambda_stands_still(tmp_path, schedule):
    args = config(tmp_path, **EVAL, **schedule, load_best_model_at_end=True)
    assert args.metric_for_best_model == "loss" and args.greater_is_better is False


@pytest.mark.parametrize("metric", ["eval_nll", "nll"])
def test_eval_nll_ranks_checkpoints_lower_is_better(tmp_path, metric):
    args = config(tmp_path, **EVAL, objective_schedule="linear", load_best_model_at_end=True, metric_for_best_model=metric)
    assert args.greater_is_better is False  # transformers alone would take a name not ending in "loss" as higher-better


def test_a_run_keeps_the_checkpoint_with_the_best_eval_nll(tmp_path, tokenizer, tiny_model):
    """End to end: eval_nll is logged beside eval_loss, and it is what picks the best checkpoint."""
    from transformers import EarlyStoppingCallback

    args = config(tmp_path, **EVAL, objective_schedule="linear", schedule_warmup_ratio=1.0, max_steps=3,
                  load_best_model_at_end=True, metric_for_best_model="eval_nll", bf16=False)  # fmt: skip
    trainer = ProbSFTTrainer(model=tiny_model, args=args, train_dataset=addition_dataset(16),
                             eval_dataset=addition_dataset(8, seed=1), processing_class=tokenizer,
                             callbacks=[EarlyStoppingCallback(early_stopping_patience=10)])  # fmt: skip
    trainer.train()
    evals = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    assert len(evals) == 3 and all(math.isfinite(entry["eval_nll"]) for entry in evals)
    # lambda moved from step to step, so eval_loss (the objective at the live lambda) is not eval_nll
    assert any(entry["eval_loss"] != pytest.approx(entry["eval_nll"], rel=1e-3) for entry in evals)
    assert trainer.state.best_metric == min(entry["eval_nll"] for entry in evals)


def test_a_no_grad_forward_without_the_fused_head_is_refused_like_the_training_one(tmp_path, tiny_model, tokenizer):
    """Evaluation's forward runs under no_grad: without the fused head its loss would be TRL's plain NLL, reported as
    eval_loss of the objective. Refused as the training forward is."""
    trainer = LogitsLossTrainer(model=tiny_model, args=config(tmp_path, bf16=False), processing_class=tokenizer,
                                train_dataset=addition_dataset(16), eval_dataset=addition_dataset(8, seed=1))  # fmt: skip
    with pytest.raises(RuntimeError, match=r"without TRL's fused log-prob head \(fused_lm_head=True\) \(a no-grad "):
        trainer.evaluate()
    batch = trainer._prepare_inputs(next(iter(trainer.get_eval_dataloader())))
    with torch.no_grad(), pytest.raises(RuntimeError, match="without TRL's fused log-prob head"):
        trainer.compute_loss(trainer.model, batch)


def test_trls_own_logits_forward_after_the_fused_one_is_left_alone(tmp_path, tiny_model, tokenizer):
    """compute_loss(return_outputs=True), as evaluation's prediction_step calls it: TRL recomputes logits with a second
    no-grad forward after the fused one; the loss is the fused one's, the objective's."""
    trainer = ProbSFTTrainer(model=tiny_model, args=config(tmp_path, bf16=False), processing_class=tokenizer,
                             train_dataset=addition_dataset(16), eval_dataset=addition_dataset(8, seed=1))  # fmt: skip
    metrics = trainer.evaluate()
    assert math.isfinite(metrics["eval_loss"]) and math.isfinite(metrics["eval_nll"])
    assert metrics["eval_loss"] != pytest.approx(metrics["eval_nll"], rel=1e-3)  # the objective (1 - p), not NLL
