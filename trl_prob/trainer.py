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
from transformers.trainer_callback import ExportableState
from trl import SFTTrainer

from .checkpoints import (
    COMPLETION_CALLBACK,
    checkpoint_problem,
    completion_callback,
    finished_problem,
    last_complete_checkpoint,
    saved_train_tokens,
    saved_trainer_state,
    skipped_line,
)
from .config import ProbSFTConfig
from .data import check_rows, first_prompt_over
from .loss import distributed_sum, objective_loss
from .measure import Measurement, gather_rows, measure, num_samples, per_sample_stats, sample_index
from .objectives import get_objective
from .schedules import (
    NEEDS_TOP1,
    SIGNALS,
    STATISTIC_METRICS,
    AdaptiveSchedule,
    ConstantSchedule,
    Schedule,
    ScheduleStateError,
    SourceSchedules,
    build_schedule,
)
from .sources import (
    SOURCE_ID,
    SourceCollator,
    first_rows_per_source,
    resolve_sources,
    token_lambdas,
    with_source_ids,
)
from .stats import SourceStats, TokenProbStats

logger = logging.getLogger(__name__)

SCHEDULE_CALLBACK = "ProbObjectiveSchedule"  # its key in trainer_state.json's `stateful_callbacks`
LEGACY_SCHEDULE_STATE_FILE = "trl_prob_schedule.json"  # checkpoints written before the schedule was a callback
TRAINER_STATE_FILE = "trainer_state.json"


ASSISTANT_ONLY_LOSS_ADVICE = (
    "assistant_only_loss needs {% generation %} markers in the chat template to find the assistant turns. For a model "
    "whose template has none (SmolLM2, many others): give the data as conversational prompt/completion rows (prompt: "
    "the messages before the answer; completion: the assistant turn) and drop assistant_only_loss: TRL's default "
    "completion_only_loss then trains exactly the assistant turn. Or pass --chat_template_path with a template that "
    "has the markers."
)


class CheckpointError(ValueError):
    """A checkpoint whose schedule state is missing, unreadable or ill-typed; raised before any step runs."""


def _unwrap_peft(model):
    return model.get_base_model() if is_peft_model(model) else model


def _schedule_callback(trainer: ProbObjectiveMixin) -> TrainerCallback:
    """The callback that runs the schedule at optimizer-step boundaries (on every rank) and exports its state.

    As an ``ExportableState``, its state is written into the checkpoint's ``trainer_state.json`` by the Trainer
    itself, in the same file write as the rest of the trainer state. The class is made per trainer, so an instance
    that transformers re-creates (``restore_callback_states_from_checkpoint``) still drives the same trainer.
    """

    class ProbObjectiveSchedule(TrainerCallback, ExportableState):
        def on_train_begin(self, args, state, control, **kwargs):
            state.stateful_callbacks.setdefault(SCHEDULE_CALLBACK, self.state())  # resumed from a legacy checkpoint
            trainer._begin_schedule()

        def on_step_end(self, args, state, control, **kwargs):
            trainer._end_optimizer_step()

        def state(self) -> dict:
            attributes = {"schedule": trainer.schedule.state_dict()}
            if trainer.source_schedules is not None:
                attributes["source_schedules"] = trainer.source_schedules.state_dict()
            return {"args": {}, "attributes": attributes}

    assert ProbObjectiveSchedule.__name__ == SCHEDULE_CALLBACK
    return ProbObjectiveSchedule()


def _exported_schedule(trainer_state: str):
    """The schedule callback's entry in a checkpoint's ``trainer_state.json`` (``stateful_callbacks``), or None."""
    with open(trainer_state) as f:
        return json.load(f).get("stateful_callbacks", {}).get(SCHEDULE_CALLBACK)


def saved_schedule_state(checkpoint: str, args: ProbSFTConfig) -> dict | None:
    """The schedule state a checkpoint holds, checked; ``None`` where the run may start the schedule afresh.

    Raises :class:`CheckpointError` naming the checkpoint and what is wrong: no schedule state for a run with a
    schedule (unless ``args.schedule_reset_on_resume``), unreadable JSON, or ill-typed fields.
    """
    trainer_state = os.path.join(checkpoint, TRAINER_STATE_FILE)
    legacy = os.path.join(checkpoint, LEGACY_SCHEDULE_STATE_FILE)
    state = None
    try:
        if os.path.isfile(trainer_state):
            exported = _exported_schedule(trainer_state)
            if exported is not None:
                state = exported.get("attributes", {}).get("schedule") if isinstance(exported, dict) else exported
                where = f"{trainer_state} (stateful_callbacks.{SCHEDULE_CALLBACK})"
        if state is None and os.path.isfile(legacy):
            with open(legacy) as f:
                state = json.load(f)
            where = legacy
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint {checkpoint}: cannot read its schedule state ({exc}).") from None
    if state is None:
        if args.objective_schedule == "none" or args.schedule_reset_on_resume:
            return None
        raise CheckpointError(
            f"checkpoint {checkpoint} has no schedule state (neither {TRAINER_STATE_FILE} stateful_callbacks."
            f"{SCHEDULE_CALLBACK} nor {LEGACY_SCHEDULE_STATE_FILE}): resuming would restart the "
            f"{args.objective_schedule} schedule on a different trajectory. Pass --schedule_reset_on_resume to "
            "accept that."
        )
    try:
        build_schedule(args).load_state_dict(state)
    except ScheduleStateError as exc:
        raise CheckpointError(f"checkpoint {checkpoint}: bad schedule state in {where}: {exc}.") from None
    return state


def source_schedules_for(args: ProbSFTConfig, sources: list[str]) -> SourceSchedules:
    """One schedule per source: the run's adaptive schedule, or a constant one where ``schedule_source_lambda`` pins
    the source's lambda."""
    fixed = args.schedule_source_lambda or {}
    statistics = args.schedule_source_statistic or {}
    p_low_given, p_high_given = getattr(args, "_ramp_given", (args.schedule_p_low, args.schedule_p_high))

    def make(name: str) -> Schedule:
        if name in fixed:
            return ConstantSchedule(
                objective_lambda=fixed[name], statistic=args.schedule_statistic, ema_decay=args.schedule_ema_decay
            )
        if name in statistics:  # its own signal, on that signal's ramp unless the run gave one
            signal = SIGNALS[statistics[name]]
            return AdaptiveSchedule(
                p_low=signal.p_low if p_low_given is None else p_low_given,
                p_high=signal.p_high if p_high_given is None else p_high_given,
                statistic=signal.name, ema_decay=args.schedule_ema_decay, monotone=args.schedule_monotone,
            )  # fmt: skip
        return build_schedule(args)

    return SourceSchedules(sources, make)


def saved_source_schedule_state(checkpoint: str, args: ProbSFTConfig, sources: list[str]) -> dict | None:
    """The per-source schedule state a checkpoint holds, checked against this run's sources; ``None`` where the run
    may start the per-source schedules afresh. Raises :class:`CheckpointError` like :func:`saved_schedule_state`."""
    trainer_state = os.path.join(checkpoint, TRAINER_STATE_FILE)
    state = None
    if os.path.isfile(trainer_state):
        try:
            exported = _exported_schedule(trainer_state)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"checkpoint {checkpoint}: cannot read its schedule state ({exc}).") from None
        if isinstance(exported, dict):
            state = exported.get("attributes", {}).get("source_schedules")
    if state is None:
        if args.schedule_reset_on_resume:
            return None
        raise CheckpointError(
            f"checkpoint {checkpoint} has no per-source schedule state ({TRAINER_STATE_FILE} stateful_callbacks."
            f"{SCHEDULE_CALLBACK}.source_schedules): it was written by a run without schedule_per_source. Pass "
            "--schedule_reset_on_resume to start each source's schedule afresh."
        )
    try:
        source_schedules_for(args, sources).load_state_dict(state)
    except ScheduleStateError as exc:
        raise CheckpointError(f"checkpoint {checkpoint}: bad per-source schedule state in {trainer_state}: {exc}.") from None
    return state


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
        raw_train = kwargs.get("train_dataset", args[3] if len(args) > 3 else None)
        raw_eval = kwargs.get("eval_dataset", args[4] if len(args) > 4 else None)
        check_rows(raw_train, "train", config.dataset_text_field)  # a row with nothing to train: one line, here
        for name, dataset in raw_eval.items() if isinstance(raw_eval, dict) else [("eval", raw_eval)]:
            check_rows(dataset, name, config.dataset_text_field)
        if config.schedule_per_source:
            args, kwargs = self._tag_sources(config, args, kwargs, raw_train, raw_eval)
        try:
            super().__init__(*args, **kwargs)
        except ValueError as exc:
            if "{% generation %}" not in str(exc):
                raise
            raise ValueError(f"{exc} {ASSISTANT_ONLY_LOSS_ADVICE}") from exc
        self._check_truncation(raw_train)

        parallelism = self.accelerator.parallelism_config
        if parallelism is not None and getattr(parallelism, "sp_enabled", False) and config.uses_objective:
            raise ValueError(
                "Sequence parallelism (Ulysses/ALST) reduces the model's own NLL across ranks, so objective "
                f"{config.objective!r} cannot be applied. Disable sequence parallelism."
            )
        if self.sources is not None:
            self.data_collator = SourceCollator(self.data_collator)
        self._wrap_fused_forward(_unwrap_peft(self.model))
        self.add_callback(_schedule_callback(self))
        self._check_sharding()
        precision = getattr(self.args, "_cpu_precision", None)  # which precision a CPU run uses, and why
        if precision is not None and self.is_world_process_zero():
            logger.log(*precision)

    def _tag_sources(self, config, args, kwargs, raw_train, raw_eval):
        """Per-source runs: the run's sources from the training data, and every raw dataset with its integer
        source column (TRL's preparation keeps it)."""
        from .config import check_source_names

        if raw_train is None:
            raise ValueError("schedule_per_source needs a train_dataset (the sources are read from it).")
        column = config.source_column
        self.sources = resolve_sources(raw_train, column, config.schedule_sources)
        check_source_names(config.schedule_source_lambda, self.sources, "schedule_source_lambda")
        check_source_names(config.schedule_source_statistic, self.sources, "schedule_source_statistic")
        self.source_schedules = source_schedules_for(config, self.sources)
        self._source_lambdas = torch.tensor(self.source_schedules.values, dtype=torch.float32)
        train = with_source_ids(raw_train, column, self.sources)
        if isinstance(raw_eval, dict):
            evaluation = {name: with_source_ids(d, column, self.sources, name) for name, d in raw_eval.items()}
        elif raw_eval is not None:
            evaluation = with_source_ids(raw_eval, column, self.sources, "eval")
        else:
            evaluation = None
        args, kwargs = list(args), dict(kwargs)
        for position, key, value in ((3, "train_dataset", train), (4, "eval_dataset", evaluation)):
            if len(args) > position:
                args[position] = value
            elif value is not None or key in kwargs:
                kwargs[key] = value
        return tuple(args), kwargs

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if self.sources is not None and SOURCE_ID not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, SOURCE_ID]

    def _check_sharding(self) -> None:
        """FSDP asked for (an FSDP accelerate config, or ``fsdp`` args) on a CPU run, which accelerate does not shard:
        one warning line, since accelerate then trains data parallel without a word."""
        fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" or bool(self.args.fsdp)
        if fsdp and not self.is_fsdp_enabled and self.is_world_process_zero():
            logger.warning(
                "trl-prob: FSDP was asked for (ACCELERATE_USE_FSDP / fsdp) but the model is not sharded: accelerate "
                "uses its FSDP plugin only on GPUs/accelerators, so this CPU run is plain data parallel (every process "
                "holds the whole model)."
            )

    def _check_truncation(self, raw) -> None:
        """Rows that ``max_length`` cuts, said before any step: completions cut short are one warning line (their end and
        EOS are not trained); none left to train is an error when training starts (:meth:`train`; TRL would fail in its
        sampler), while the probe reports it in its own words."""
        args, prepared = self.args, self.train_dataset
        self._rows_before_truncation = None
        if args.packing or args.max_length is None or (args.dataset_kwargs or {}).get("skip_prepare_dataset"):
            return
        if not (hasattr(raw, "__len__") and hasattr(prepared, "__len__")):
            return
        dropped = len(raw) - len(prepared)
        if len(raw) and not len(prepared):
            self._rows_before_truncation = len(raw)
            return
        if "input_ids" not in (prepared.column_names or ()):
            return
        import pyarrow.compute as pc

        lengths = pc.list_value_length(prepared.with_format("arrow")["input_ids"])
        cut = pc.sum(pc.greater_equal(lengths, args.max_length)).as_py() or 0
        if (cut or dropped) and self.is_world_process_zero():
            lost = f", and leaves {dropped:,} more without any completion token (TRL drops them" if dropped else ""
            if dropped:
                found = first_prompt_over(raw, self.processing_class, args.max_length)
                if found is not None:  # name one, and what truncation does to it
                    lost += (f"; row {found[0]}: its 'prompt' alone is {found[1]} tokens, and truncation_mode="
                             f"{args.truncation_mode!r} keeps only its "
                             f"{'first' if args.truncation_mode == 'keep_start' else 'last'} {args.max_length}")  # fmt: skip
                lost += ")"
            logger.warning(
                "trl-prob: max_length=%d cuts %d of %d training rows short (the end of the completion and its EOS are "
                "not trained)%s; raise --max_length to train them whole.", args.max_length, cut, len(raw), lost
            )

    def _init_objective_state(self, config: ProbSFTConfig) -> None:
        """The mixin's own state; also used by the benchmarks' trainer-less stand-ins, so they cannot drift."""
        self._objective = get_objective(config.objective)
        self.schedule: Schedule = build_schedule(config)
        self._restored_schedule = False
        self._step_stats: TokenProbStats | None = None
        self._eval_stats: TokenProbStats | None = None
        self._in_compute_loss = False
        self._uses_objective = config.uses_objective
        self.sources: list[str] | None = None  # per-source runs: the data sources, in statistics-row order
        self.source_schedules: SourceSchedules | None = None
        self._source_lambdas: torch.Tensor | None = None  # this step's lambda per source, on the device
        self._batch_sources: torch.Tensor | None = None
        self._silent_sources: set[str] = set()  # sources already reported as absent from a step

    # ----------------------------------------------------------------------------------------- the loss

    def _wrap_fused_forward(self, model) -> None:
        fused_forward = model.forward
        trainer = self

        @functools.wraps(fused_forward)
        def forward(*args, **kwargs):
            outputs = fused_forward(*args, **kwargs)
            if kwargs.get("fused_lm_head") and trainer._in_compute_loss:
                outputs.log_probs = -trainer._per_token_objective(
                    outputs.log_probs, outputs.label_mask, kwargs, getattr(outputs, "is_top1", None)
                )
            return outputs

        model.forward = forward

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._in_compute_loss = True
        if SOURCE_ID in inputs:  # the batch's source ids are ours: the model must not see them
            self._batch_sources = inputs[SOURCE_ID]
            inputs = {key: value for key, value in inputs.items() if key != SOURCE_ID}
        try:
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        finally:
            self._in_compute_loss = False
            self._batch_sources = None

    @property
    def objective_lambda(self) -> float:
        """Lambda of the current optimizer step (1 = the objective alone)."""
        return self.schedule.value

    def _per_token_objective(
        self, log_p: torch.Tensor, mask: torch.Tensor, batch: dict, is_top1: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The per-token loss TRL will sum and normalise; records the statistics on the way."""
        objective = self._objective if self._uses_objective else get_objective("nll")
        padding_free = batch.get("cu_seq_lens_q") is not None
        index = sample_index(batch, mask) if padding_free else None
        sources = self._batch_sources
        if self.sources is not None and sources is None:
            raise RuntimeError(f"schedule_per_source: a batch came without its {SOURCE_ID!r} (a custom collator?).")
        objective_lambda = self.objective_lambda
        if sources is not None:
            objective_lambda = token_lambdas(self._source_lambdas, sources, index)
        loss, stats = objective_loss(
            log_p, mask, objective, objective_lambda, self.args.schedule_mode, all_reduce=distributed_sum,
            is_top1=is_top1, sample_index=index, num_samples=num_samples(batch) if padding_free else None,
            sample_source=sources, num_sources=len(self.sources) if sources is not None else 1,
        )  # fmt: skip
        if self.model.training:
            self._step_stats = stats if self._step_stats is None else self._step_stats + stats
        else:  # per sample, so that gather_for_metrics counts each evaluation sample once
            keep = objective.keep(log_p) & mask if objective.is_thresholded else None
            rows = per_sample_stats(batch, log_p, mask, keep, is_top1)
            rows, gathered_sources = gather_rows(rows, self.accelerator.gather_for_metrics, sources)
            if sources is not None:
                stats = SourceStats.from_rows(rows, gathered_sources, len(self.sources))
            else:
                stats = TokenProbStats.from_rows(rows)
            self._eval_stats = stats if self._eval_stats is None else self._eval_stats + stats
        return loss

    # ------------------------------------------------------------------------------------- the schedule

    def _begin_schedule(self) -> None:
        args, schedule = self.args, self.schedule
        if args.flush_denormal and self.args.device.type == "cpu":
            if torch.set_flush_denormal(True):
                logger.info("trl-prob: subnormal floats flushed to zero on CPU (pass --flush_denormal false to keep them).")
        if args.objective_schedule == "none" or self._restored_schedule:
            self._publish_source_lambdas()
            return
        if schedule.warm_starts and args.schedule_warm_start and not schedule.warm_started:
            logger.info("trl-prob warm start: measuring p on %d training samples", args.schedule_warm_start_samples)
            warm = self.measure_dataset(
                self._warm_start_dataset(args.schedule_warm_start_samples), progress=not args.disable_tqdm
            )
            self._check_signal_readable(warm.stats)
            schedule.warm_start(warm.stats)
            logger.info("trl-prob warm start: %s target-token probability %.4f", args.schedule_statistic, schedule.p_ema)
            if self.source_schedules is not None:
                self.source_schedules.warm_start(warm.sources)
                for name, source in zip(self.sources, self.source_schedules.schedules):
                    logger.info("trl-prob warm start: source %s: %s %s", name, args.schedule_statistic,
                                "not measured" if source.p_ema is None else f"{source.p_ema:.4f}")  # fmt: skip
        schedule.begin(self.state.max_steps)
        if self.source_schedules is not None:
            self.source_schedules.begin(self.state.max_steps)
        self._publish_source_lambdas()

    def _check_signal_readable(self, stats: TokenProbStats) -> None:
        """A signal that reads ``is_top1`` from a forward that does not return it would stay NaN, and the schedule
        would train NLL all run without a word: refused before step 1."""
        signal = self.args.schedule_statistic
        if signal in NEEDS_TOP1 and stats.num_tokens > 0 and math.isnan(self.schedule.signal(stats)):
            raise ValueError(
                f"schedule_statistic={signal!r} reads which target tokens are the model's top-1 (`is_top1` from TRL's "
                "fused log-prob head), and this model's forward did not return it. Use a signal read from p alone, "
                "e.g. --schedule_statistic mean."
            )

    def _publish_source_lambdas(self) -> None:
        if self.source_schedules is not None:  # one host-to-device copy per optimizer step
            self._source_lambdas = torch.tensor(self.source_schedules.values, dtype=torch.float32).to(self.args.device)

    def _end_optimizer_step(self) -> None:
        args, schedule = self.args, self.schedule
        stats = self._step_stats
        self._step_stats = None
        if stats is None:
            stats = SourceStats.zeros(len(self.sources), args.device) if self.sources else TokenProbStats.zeros(args.device)
        stats = stats.all_reduce().to_host()  # one sync per optimizer step, however many statistics are read
        by_source, stats = (stats, stats.total) if isinstance(stats, SourceStats) else (None, stats)

        metrics = self._metrics["train"]
        metrics["mean_token_prob"].append(stats.mean_p)
        metrics["nll"].append(stats.nll)
        if self._objective.is_thresholded:
            metrics["kept_token_fraction"].append(stats.kept_fraction)
        if args.objective_schedule == "none":
            return
        statistic_metric = STATISTIC_METRICS[args.schedule_statistic]
        if statistic_metric is not None:
            metrics[statistic_metric].append(schedule.signal(stats))

        if by_source is None:
            metrics["objective_lambda"].append(schedule.value)
        else:  # what the step trained overall: its tokens' mean lambda
            counts = by_source.sums[:, 0]
            lambdas = torch.tensor(self.source_schedules.values, dtype=torch.float64)
            if counts.sum() > 0:
                metrics["objective_lambda"].append(float((counts * lambdas).sum() / counts.sum()))
            self._log_sources(by_source, metrics)
        if args.schedule_mode == "exponent" and by_source is None:
            metrics["objective_exponent"].append(schedule.value * self._objective.param)
        schedule.step(stats)
        metrics["ema_token_prob"].append(schedule.p_ema if schedule.p_ema is not None else math.nan)
        if by_source is not None:
            self.source_schedules.step(by_source)
            self._publish_source_lambdas()

    def _log_sources(self, by_source: SourceStats, metrics) -> None:
        """Per-source metrics of the step; a source without target tokens in it logs nothing (its schedule keeps its
        running statistic and lambda), said once per source."""
        for index, (name, source_schedule) in enumerate(zip(self.sources, self.source_schedules.schedules)):
            stats = by_source[index]
            if stats.num_tokens == 0:
                if name not in self._silent_sources and self.is_world_process_zero():
                    logger.warning(
                        "trl-prob: source %s had no target tokens in optimizer step %d: its statistic keeps its last "
                        "value (said once per source).", name, self.state.global_step
                    )
                self._silent_sources.add(name)
                continue
            metrics[f"mean_token_prob/{name}"].append(stats.mean_p)
            metrics[f"objective_lambda/{name}"].append(source_schedule.value)
            own_metric = STATISTIC_METRICS[source_schedule.statistic]
            if own_metric is not None:
                metrics[f"{own_metric}/{name}"].append(source_schedule.signal(stats))

    # ------------------------------------------------------------------------------------- measurement

    def measure_token_probs(self, dataset=None, num_samples: int | None = None, progress: bool = True) -> TokenProbStats:
        """Target-token probability statistics of the current model on ``dataset`` (default: the training set).

        The tokens are exactly those training uses: TRL's prepared dataset, collator and masks, through the
        fused log-prob head (no full logits), batched, ``torch.no_grad``, split across processes, each sample once.
        """
        dataset = self.train_dataset if dataset is None else dataset
        if dataset is None:
            raise ValueError("measure_token_probs needs a dataset: the trainer has no train_dataset.")
        return self.measure_dataset(self._warm_start_dataset(num_samples, dataset), progress=progress).stats

    def _warm_start_dataset(self, num_samples: int | None, dataset=None):
        dataset = self.train_dataset if dataset is None else dataset
        if num_samples is None:
            return dataset
        if self.sources is not None and hasattr(dataset, "__len__") and SOURCE_ID in (dataset.column_names or ()):
            return first_rows_per_source(dataset, num_samples)  # a mixture's first rows are its first source's
        if hasattr(dataset, "__len__"):
            return dataset.select(range(min(num_samples, len(dataset))))
        return dataset.take(num_samples)

    def measure_dataset(self, dataset, progress: bool = True) -> Measurement:
        """:func:`trl_prob.measure.measure` of the current model over ``dataset`` through the trainer's eval
        dataloader (TRL's preparation, collator and masks; each sample once across processes)."""
        return measure(
            self.model_wrapped,
            self.get_eval_dataloader(dataset),
            prepare=self._prepare_inputs,
            gather=self.accelerator.gather_for_metrics,
            progress=progress,
            num_sources=len(self.sources) if self.sources is not None else None,
        )

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        if self.sources is not None and eval_dataset is not None and not isinstance(eval_dataset, str):
            def tagged(dataset, name):  # a dataset first seen here carries names in source_column, not ids yet
                columns = getattr(dataset, "column_names", None) or ()
                if SOURCE_ID in columns:
                    return dataset
                return with_source_ids(dataset, self.args.source_column, self.sources, name)

            if isinstance(eval_dataset, dict):
                eval_dataset = {name: tagged(dataset, name) for name, dataset in eval_dataset.items()}
            else:
                eval_dataset = tagged(eval_dataset, metric_key_prefix)
        return super().evaluate(eval_dataset=eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)

    # ------------------------------------------------------------------------------------- logging

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if not self.model.training and self._eval_stats is not None:
            stats, self._eval_stats = self._eval_stats, None
            if isinstance(stats, SourceStats):
                for index, name in enumerate(self.sources):
                    if stats[index].num_tokens:
                        self._metrics["eval"][f"mean_token_prob/{name}"] = [stats[index].mean_p]
                stats = stats.total
            self._metrics["eval"]["mean_token_prob"] = [stats.mean_p]
            self._metrics["eval"]["nll"] = [stats.nll]
            if self._objective.is_thresholded:
                self._metrics["eval"]["kept_token_fraction"] = [stats.kept_fraction]
        super().log(logs, start_time)

    # ------------------------------------------------------------------------------------- checkpoints

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if getattr(self, "_rows_before_truncation", None):
            raise ValueError(
                f"max_length={self.args.max_length} leaves none of the {self._rows_before_truncation:,} training rows a "
                "completion token (TRL keeps the start of each row, and the prompt fills max_length): raise --max_length "
                "or shorten the prompts."
            )
        # Checkpoints this run writes say when they are complete; `True` resumes from the newest complete one.
        completion = next((cb for cb in self.callback_handler.callbacks if type(cb).__name__ == COMPLETION_CALLBACK), None)
        if completion is None:
            completion = completion_callback(self)
            self.add_callback(completion)
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            checkpoint, skipped = last_complete_checkpoint(self.args.output_dir)
            if checkpoint is None:
                found = "".join(f"; {os.path.basename(c)}: {problem}" for c, problem in skipped)
                raise CheckpointError(f"no complete checkpoint in {self.args.output_dir} to resume from{found}.")
            if skipped and self.is_world_process_zero():
                logger.warning("trl-prob: %s", skipped_line(skipped, checkpoint))
            resume_from_checkpoint = checkpoint
        elif isinstance(checkpoint, str) and (problem := checkpoint_problem(checkpoint)) is not None:
            raise CheckpointError(f"checkpoint {checkpoint} is incomplete: {problem}.")
        if isinstance(checkpoint, str):
            trainer_state = saved_trainer_state(checkpoint)
            finished = finished_problem(checkpoint, trainer_state, self.args.max_steps, self.args.num_train_epochs)
            if finished is not None:
                raise CheckpointError(finished)
            completion.train_tokens = saved_train_tokens(trainer_state)
            state = saved_schedule_state(checkpoint, self.args)
            source_state = saved_source_schedule_state(checkpoint, self.args, self.sources) if self.sources else None
            if state is not None and (self.sources is None or source_state is not None):
                self.schedule.load_state_dict(state)
                if source_state is not None:
                    self.source_schedules.load_state_dict(source_state)
                self._restored_schedule = True
            elif self.args.objective_schedule != "none":
                logger.warning("%s: no schedule state; the schedule restarts (--schedule_reset_on_resume).", checkpoint)
        return super().train(resume_from_checkpoint, *args, **kwargs)


class ProbSFTTrainer(ProbObjectiveMixin, SFTTrainer):
    """TRL's ``SFTTrainer`` training a probability-based objective (``ProbSFTConfig.objective``) on a schedule."""

    _tag_names = ["trl", "sft", "trl-prob"]
