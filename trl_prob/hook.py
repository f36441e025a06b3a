"""The objective's public seam: one object that turns a micro-batch's head outputs into its per-token loss, and an
optimizer step's statistics into the next step's lambda and its metrics.

:class:`ObjectiveHook` knows nothing about trainers. The trainer calls :meth:`ObjectiveHook.loss` inside
``compute_loss`` (the per-micro-batch hook) and a ``TrainerCallback`` calls :meth:`ObjectiveHook.end_step` after each
optimizer step (:mod:`trl_prob.callback`); the benchmarks call the same two methods. Everything a step reads comes
from the fused head's per-token outputs and from one all-reduce of the step's statistics: no extra forward, no
host-device sync per micro-batch.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable

import torch

from .config import ProbSFTConfig
from .head import TRL_SFT_OUTPUTS, HeadTokens, require, union
from .loss import distributed_sum, objective_loss
from .measure import Measurement, gather_rows, num_samples, per_sample_stats, sample_index
from .objectives import get_objective
from .schedules import SIGNALS, Schedule, build_schedule
from .extension import BatchInfo, RunExtension
from .stats import LAMBDA_SUM, TokenProbStats, column_groups

NLL = get_objective("nll")


class ObjectiveHook:
    """The objective, its schedule and the statistics they read, for one training run.

    Args:
        args: the run's [`ProbSFTConfig`].
        extension: the run's plug-in (:class:`trl_prob.extension.RunExtension`, from
            ``args.run_extension()``), or ``None``. Where it gives lambdas (``token_lambdas``) they replace the
            schedule's at the one lambda seam; where it groups statistics (``batch_key``) its groups are kept beside
            the step's, in the same all-reduce.
        vocab_size: the model's vocabulary size (EAFT normalises the entropy by its log).
    """

    def __init__(self, args: ProbSFTConfig, extension: RunExtension | None = None, vocab_size: int | None = None):
        self.args = args
        self.objective = get_objective(args.objective)
        self.trains_objective = args.uses_objective
        self.schedule: Schedule = build_schedule(args)
        start = get_objective(args.start_objective)  # the blend's lambda-0 end: NLL unless a subclass says otherwise
        self.start = None if start.family == "nll" else start
        self.extension = extension
        self.vocab_size = vocab_size
        self.step_stats = None  # TokenProbStats, or the extension's grouped statistics
        self.eval_stats = None
        self.metrics: dict[str, list[float]] = defaultdict(list)  # this logging window's per-step values

    # ------------------------------------------------------------------------------------- what it reads

    def needs(self) -> dict[str, tuple[str, ...]]:
        """Each reader of this run (objective, schedule signal(s)) and the head outputs it reads."""
        needs = {}
        if self.trains_objective:
            needs[f"objective {self.objective.spec!r}"] = self.objective.reads
        if self.start is not None:
            needs[f"start objective {self.start.spec!r}"] = self.start.reads
        needs.update(self.schedule.needs())
        if self.extension is not None:
            needs.update(self.extension.needs())
        return needs

    @property
    def head_outputs(self) -> tuple[str, ...]:
        """What the fused head must compute: what this run reads, plus what SFTTrainer's own metrics read."""
        return union([*self.needs().values(), TRL_SFT_OUTPUTS])

    @property
    def stats_columns(self) -> frozenset[str]:
        """The statistics' column groups a training step computes: what its schedule's signal and the run extension
        read (the base columns, always computed, carry the logged mean_token_prob, nll and kept_token_fraction)."""
        readers = []
        if self.args.objective_schedule != "none":
            readers.append(self.schedule.stats_columns())
        if self.extension is not None:
            readers.append(self.extension.stats_columns())
        return column_groups(*readers)

    @property
    def eval_stats_columns(self) -> frozenset[str]:
        """An evaluation's: the training step's, and the top-1 columns of ``eval_exact_match``."""
        return column_groups(self.stats_columns, ("top1",))

    def check(self, tokens: HeadTokens) -> None:
        """Refuse head outputs that lack what a reader needs (one line naming both)."""
        require(tokens, self.needs())

    # ------------------------------------------------------------------------------------- per micro-batch

    @property
    def objective_lambda(self) -> float:
        return self.schedule.value

    def loss(
        self,
        tokens: HeadTokens,
        batch: dict,
        training: bool = True,
        values: torch.Tensor | None = None,
        gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The per-token loss TRL sums and normalises; records the micro-batch's statistics on the way.

        Args:
            tokens: the micro-batch's head outputs.
            batch: its model inputs (padding-free batches carry ``cu_seq_lens_q``).
            training: accumulate into the optimizer step's statistics (else into the evaluation's, per sample).
            values: each sample's value of the run extension's ``batch_key`` (taken out of the batch by the trainer).
            gather: all-gathers evaluation rows across processes (``accelerator.gather_for_metrics``).
        """
        self.check(tokens)
        objective = self.objective if self.trains_objective else NLL
        padding_free = batch.get("cu_seq_lens_q") is not None
        index = sample_index(batch, tokens.mask) if padding_free else None
        extension = self.extension
        key = extension.batch_key if extension is not None else None
        if key is not None and values is None:
            raise RuntimeError(f"{extension.name}: a batch came without its {key!r} (a custom collator?).")
        # the seam: the lambda each token trains with (one float for the step, or one per token), the extension's
        # where it gives one, else the schedule's
        info = BatchInfo(index, values)
        objective_lambda = extension.token_lambdas(tokens, info) if extension is not None else None
        if objective_lambda is None:
            objective_lambda = self.schedule.token_lambdas(tokens, info)
        grouped = key is not None
        loss, stats = objective_loss(
            tokens, objective, objective_lambda, self.args.schedule_mode, all_reduce=distributed_sum,
            sample_index=index, num_samples=num_samples(batch) if padding_free else None,
            group=(lambda rows: extension.group(rows, values)) if grouped else None,
            columns=self.stats_columns if training else self.eval_stats_columns, start=self.start,
        )  # fmt: skip
        if training:
            if not grouped and isinstance(objective_lambda, torch.Tensor):  # the step's mean token lambda, in the
                stats.sums[LAMBDA_SUM] = (objective_lambda.double() * tokens.mask).sum()  # same all-reduce
            self.step_stats = stats if self.step_stats is None else self.step_stats + stats
            return loss
        # per sample, so that gather_for_metrics counts each evaluation sample once
        keep = objective.keep(tokens.log_p) & tokens.mask if objective.is_thresholded else None
        rows = per_sample_stats(batch, tokens.log_p, tokens.mask, keep, tokens, self.eval_stats_columns)
        rows, gathered = gather_rows(rows, gather, values if grouped else None)
        stats = extension.group(rows, gathered) if grouped else TokenProbStats.from_rows(rows)
        self.eval_stats = stats if self.eval_stats is None else self.eval_stats + stats
        return loss

    # ------------------------------------------------------------------------------------- per optimizer step

    def begin(self, total_steps: int, warm: Measurement | None = None, device: torch.device | str = "cpu",
              steps_per_epoch: int | None = None) -> None:
        """Start the schedule(s) of a fresh run, warm-started from a measurement of the base model if given;
        ``steps_per_epoch`` tells the ``progress`` schedule which steps see fresh batches."""
        if warm is not None:
            self.schedule.warm_start(warm.stats)
            if self.extension is not None:
                self.extension.warm_start(warm.groups)
        self.schedule.begin(total_steps, steps_per_epoch)
        if self.extension is not None:
            self.extension.begin(total_steps, device)

    def end_step(self, device: torch.device | str = "cpu") -> None:
        """Account one optimizer step: one all-reduce of its statistics, its metrics, the next step's lambda."""
        args, schedule, metrics = self.args, self.schedule, self.metrics
        stats, self.step_stats = self.step_stats, None
        extension = self.extension
        if stats is None:
            stats = extension.zeros(device) if extension is not None else None
            stats = TokenProbStats.zeros(device) if stats is None else stats
        stats = stats.all_reduce().to_host()  # one sync per optimizer step, however many statistics are read
        groups, stats = (None, stats) if isinstance(stats, TokenProbStats) else (stats, stats.total)

        metrics["mean_token_prob"].append(stats.mean_p)
        metrics["nll"].append(stats.nll)
        if self.objective.is_thresholded:
            metrics["kept_token_fraction"].append(stats.kept_fraction)
        if args.objective_schedule == "none":
            return
        signal = SIGNALS[schedule.signal_name]
        if signal.metric is not None:
            metrics[signal.metric].append(schedule.signal(stats))
        trained = None if extension is None else extension.log_step(groups, metrics)  # what the step trained overall
        if trained is not None:
            metrics["objective_lambda"].append(trained)
        elif groups is None:
            metrics["objective_lambda"].append(schedule.trained_lambda(stats))
        if args.schedule_mode == "exponent" and groups is None:
            metrics["objective_exponent"].append(schedule.value * self.objective.param)
        schedule.step(stats)
        ema = schedule.p_ema if schedule.p_ema is not None else math.nan
        metrics["schedule_signal_ema"].append(ema)
        if extension is not None:
            extension.step(groups, device)

    def pop_metrics(self) -> dict[str, float]:
        """The logging window's metrics, averaged over its optimizer steps (NaN steps skipped), and a new window."""
        out = {}
        for key, values in self.metrics.items():
            finite = [v for v in values if not math.isnan(v)]
            out[key] = sum(finite) / len(finite) if finite else math.nan
        self.metrics = defaultdict(list)
        return out

    def pop_eval_metrics(self) -> dict[str, float]:
        """The evaluation's statistics as metrics (without the ``eval_`` prefix), and a fresh accumulator."""
        stats, self.eval_stats = self.eval_stats, None
        if stats is None:
            return {}
        out = {}
        if not isinstance(stats, TokenProbStats):  # the extension's groups
            out.update(self.extension.eval_metrics(stats))
            stats = stats.total
        out["mean_token_prob"] = stats.mean_p
        # the evaluation's mean NLL per target token: beside eval_loss (the objective at the live lambda, whose meaning
        # moves with lambda), the one loss that means the same thing at every evaluation (metric_for_best_model)
        out["nll"] = stats.nll
        # teacher-forced exact match: the share of evaluation completions whose every target token is the model's
        # first choice, i.e. that greedy decoding would write exactly (one forward pass, no generation)
        out["exact_match"] = stats.sequence_top1_share
        if self.objective.is_thresholded:
            out["kept_token_fraction"] = stats.kept_fraction
        return out

    # ------------------------------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict:
        state = {"schedule": self.schedule.state_dict()}
        if self.extension is not None and self.extension.state_key is not None:
            state[self.extension.state_key] = self.extension.state_dict()
        return state
