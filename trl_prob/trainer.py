"""``ProbObjectiveMixin``: the glue that puts an objective and its schedule inside TRL's ``SFTTrainer``.

How it hooks in, and why this way: TRL's ``SFTTrainer.compute_loss`` runs the model with its fused chunked
log-prob head and trains ``per_token_loss = -outputs.log_probs``, normalised by ``num_items_in_batch``
(every rank, every accumulation micro-batch), scaled for DDP, plus MoE aux loss, plus its metrics. We keep
all of that by wrapping the patched forward: inside ``compute_loss`` the wrapper replaces ``log_probs``
with ``-f(p)`` (the negated per-token objective), so TRL's own code trains our objective with its own
normalisation. ``tests/test_trl_contract.py`` pins the TRL behaviour this relies on.

Per optimizer step the mixin all-reduces the target-token statistics once, updates the moving average and
lambda (never inside a step), and logs them through TRL's metrics (every ``report_to`` backend).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os

import torch
from accelerate.utils import is_peft_model
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint
from trl import SFTTrainer

from .config import ProbSFTConfig
from .objectives import get_objective, power_loss
from .schedules import ScheduleState, ema_update, next_lambda
from .stats import TokenProbStats

logger = logging.getLogger(__name__)

SCHEDULE_STATE_FILE = "trl_prob_schedule.json"


def _unwrap_peft(model):
    return model.get_base_model() if is_peft_model(model) else model


class _StepBoundary(TrainerCallback):
    """Runs the mixin's once-per-optimizer-step work at the Trainer's step boundaries (on every rank)."""

    def __init__(self, trainer: ProbObjectiveMixin):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._begin_schedule()

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._end_optimizer_step()


class ProbObjectiveMixin:
    """Trains ``args.objective`` (with ``args.objective_schedule``) inside an ``SFTTrainer`` or subclass of it.

    Put it first in the bases: ``class MyTrainer(ProbObjectiveMixin, MySFTTrainer)``. ``args`` must be a
    [`ProbSFTConfig`]. Everything else (datasets, masks, PEFT/QLoRA, accumulation, DDP/FSDP, metrics,
    checkpoints) is the ``SFTTrainer``'s own.
    """

    def __init__(self, *args, **kwargs):
        bound = dict(zip(("model", "args"), args))
        config = kwargs.get("args", bound.get("args"))
        if config is None:
            model = kwargs.get("model", bound.get("model"))
            name = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", "model")
            config = ProbSFTConfig(f"{str(name).split('/')[-1]}-SFT")
            if len(args) > 1:
                args = (args[0], config, *args[2:])
            else:
                kwargs["args"] = config
        if not isinstance(config, ProbSFTConfig):
            raise TypeError(
                f"{type(self).__name__} needs `args` to be a trl_prob.ProbSFTConfig (it carries the objective), "
                f"got {type(config).__name__}."
            )
        if kwargs.get("compute_loss_func") is not None and config.uses_objective:
            raise ValueError(
                f"`compute_loss_func` replaces the loss that objective {config.objective!r} defines. Pass one or "
                "the other."
            )

        self._init_objective_state(config)
        super().__init__(*args, **kwargs)

        parallelism = self.accelerator.parallelism_config
        if parallelism is not None and getattr(parallelism, "sp_enabled", False) and config.uses_objective:
            raise ValueError(
                "Sequence parallelism (Ulysses/ALST) reduces the model's own NLL across ranks, so objective "
                f"{config.objective!r} cannot be applied. Disable sequence parallelism."
            )
        self._wrap_fused_forward(_unwrap_peft(self.model))
        self.add_callback(_StepBoundary(self))

    def _init_objective_state(self, config: ProbSFTConfig) -> None:
        """The mixin's own state; also used by the benchmarks' trainer-less stand-ins, so they cannot drift."""
        self._objective = get_objective(config.objective)
        self._schedule_state = ScheduleState(objective_lambda=1.0 if config.objective_schedule == "none" else 0.0)
        self._restored_schedule = False
        self._step_stats: TokenProbStats | None = None
        self._eval_stats: TokenProbStats | None = None
        self._in_compute_loss = False
        self._uses_objective = config.uses_objective

    # ----------------------------------------------------------------------------------------- the loss

    def _wrap_fused_forward(self, model) -> None:
        fused_forward = model.forward
        trainer = self

        @functools.wraps(fused_forward)
        def forward(*args, **kwargs):
            outputs = fused_forward(*args, **kwargs)
            if kwargs.get("fused_lm_head") and trainer._in_compute_loss:
                outputs.log_probs = -trainer._per_token_objective(outputs.log_probs, outputs.label_mask, model.training)
            return outputs

        model.forward = forward

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._in_compute_loss = True
        try:
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        finally:
            self._in_compute_loss = False

    @property
    def objective_lambda(self) -> float:
        """Lambda of the current optimizer step (1 = the objective alone)."""
        return self._schedule_state.objective_lambda

    def _per_token_objective(self, log_p: torch.Tensor, mask: torch.Tensor, training: bool) -> torch.Tensor:
        """The per-token loss TRL will sum and normalise; records the step's statistics on the way."""
        args = self.args
        target = self._objective
        keep = target.keep(log_p) & mask if target.is_thresholded else None
        stats = TokenProbStats.of(log_p, mask, keep)
        if training:
            self._step_stats = stats if self._step_stats is None else self._step_stats + stats
        else:
            stats.all_reduce()
            self._eval_stats = stats if self._eval_stats is None else self._eval_stats + stats

        log_p = log_p.float()
        if not self._uses_objective:
            return -log_p
        lam = self.objective_lambda
        if args.schedule_mode == "exponent":
            return power_loss(log_p, lam * target.param) * mask

        loss = target(log_p)
        if target.is_thresholded:
            loss = loss * keep * self._kept_token_scale(stats)
        if lam < 1.0:
            loss = (1.0 - lam) * (-log_p) + lam * loss
        return loss * mask

    def _kept_token_scale(self, stats: TokenProbStats) -> torch.Tensor:
        """valid / kept tokens of this micro-batch over all processes.

        TRL divides the summed loss by the step's target-token count; this factor turns that into a mean over
        the kept tokens, the paper's normaliser. With one micro-batch per step it is exact; with gradient
        accumulation each micro-batch uses its own kept share, as the paper's (verl) trainer does.
        """
        counts = torch.stack([stats.sums[0], stats.sums[4]])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts)
        valid, kept = counts
        return torch.where(kept > 0, valid / kept.clamp(min=1), 0.0).float()

    # ------------------------------------------------------------------------------------- the schedule

    def _statistic(self, stats: TokenProbStats) -> float:
        statistic = self.args.schedule_statistic
        if statistic == "median":
            return stats.median_p
        if statistic == "share_confident":
            return stats.share_confident
        return stats.mean_p

    def _begin_schedule(self) -> None:
        args, state = self.args, self._schedule_state
        if args.objective_schedule == "none" or self._restored_schedule:
            return
        if args.objective_schedule == "adaptive" and args.schedule_warm_start and not state.warm_started:
            stats = self.measure_token_probs(num_samples=args.schedule_warm_start_samples, progress=False)
            state.p_ema = self._statistic(stats)
            state.warm_started = True
            logger.info("trl-prob warm start: %s target-token probability %.4f", args.schedule_statistic, state.p_ema)
        state.objective_lambda = self._next_lambda(step=0, previous=0.0)

    def _next_lambda(self, step: int, previous: float) -> float:
        args = self.args
        return next_lambda(
            args.objective_schedule,
            step=step,
            total_steps=self.state.max_steps,
            p_ema=self._schedule_state.p_ema,
            previous_lambda=previous,
            objective_lambda=args.objective_lambda,
            warmup_ratio=args.schedule_warmup_ratio,
            p_low=args.schedule_p_low,
            p_high=args.schedule_p_high,
            monotone=args.schedule_monotone,
        )

    def _end_optimizer_step(self) -> None:
        args, state = self.args, self._schedule_state
        stats = self._step_stats if self._step_stats is not None else TokenProbStats.zeros(args.device)
        self._step_stats = None
        stats = stats.all_reduce().to_host()  # one sync per optimizer step, however many statistics are read

        metrics = self._metrics["train"]
        metrics["mean_token_prob"].append(stats.mean_p)
        metrics["nll"].append(stats.nll)
        if self._objective.is_thresholded:
            metrics["kept_token_fraction"].append(stats.kept_fraction)
        if args.objective_schedule == "none":
            return
        if args.schedule_statistic == "median":
            metrics["median_token_prob"].append(stats.median_p)
        elif args.schedule_statistic == "share_confident":
            metrics["confident_token_share"].append(stats.share_confident)

        used_lambda = state.objective_lambda
        metrics["objective_lambda"].append(used_lambda)
        if args.schedule_mode == "exponent":
            metrics["objective_exponent"].append(used_lambda * self._objective.param)
        state.p_ema = ema_update(state.p_ema, self._statistic(stats), args.schedule_ema_decay)
        state.step = self.state.global_step
        state.objective_lambda = self._next_lambda(step=state.step, previous=used_lambda)
        metrics["ema_token_prob"].append(state.p_ema if state.p_ema is not None else math.nan)

    # ------------------------------------------------------------------------------------- measurement

    def measure_token_probs(self, dataset=None, num_samples: int | None = None, progress: bool = True) -> TokenProbStats:
        """Target-token probability statistics of the current model on ``dataset`` (default: the training set).

        The tokens are exactly those training uses: TRL's prepared dataset, collator and masks, through the
        fused log-prob head (no full logits), batched, ``torch.no_grad``, split across processes and reduced.
        """
        from .measure import measure

        dataset = self.train_dataset if dataset is None else dataset
        if dataset is None:
            raise ValueError("measure_token_probs needs a dataset: the trainer has no train_dataset.")
        if num_samples is not None:
            if hasattr(dataset, "__len__"):
                dataset = dataset.select(range(min(num_samples, len(dataset))))
            else:
                dataset = dataset.take(num_samples)
        dataloader = self.get_eval_dataloader(dataset)
        return measure(
            self.model_wrapped,
            dataloader,
            prepare=self._prepare_inputs,
            gather=self.accelerator.gather_for_metrics,
            progress=progress,
        ).stats

    # ------------------------------------------------------------------------------------- logging

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if not self.model.training and self._eval_stats is not None:
            stats, self._eval_stats = self._eval_stats, None
            self._metrics["eval"]["mean_token_prob"] = [stats.mean_p]
            self._metrics["eval"]["nll"] = [stats.nll]
            if self._objective.is_thresholded:
                self._metrics["eval"]["kept_token_fraction"] = [stats.kept_fraction]
        super().log(logs, start_time)

    # ------------------------------------------------------------------------------------- checkpoints

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            checkpoint = get_last_checkpoint(self.args.output_dir)
        if isinstance(checkpoint, str):
            path = os.path.join(checkpoint, SCHEDULE_STATE_FILE)
            if os.path.isfile(path):
                with open(path) as f:
                    self._schedule_state = ScheduleState.from_dict(json.load(f))
                self._restored_schedule = True
            elif self.args.objective_schedule != "none":
                logger.warning("%s has no %s: the schedule restarts from its initial state.", checkpoint, SCHEDULE_STATE_FILE)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
            with open(os.path.join(folder, SCHEDULE_STATE_FILE), "w") as f:
                json.dump(self._schedule_state.to_dict(), f, indent=2)


class ProbSFTTrainer(ProbObjectiveMixin, SFTTrainer):
    """TRL's ``SFTTrainer`` training a probability-based objective (``ProbSFTConfig.objective``) on a schedule."""

    _tag_names = ["trl", "sft", "trl-prob"]
