"""Checkpoints a killed run cannot leave half-written for ``--resume_from_checkpoint true`` to pick up.

transformers writes ``checkpoint-N/`` in place, file after file (weights, optimizer, scheduler, RNG states, then
``trainer_state.json``), so a run killed mid-save leaves a directory that looks like a checkpoint and that
``get_last_checkpoint`` returns: resuming from it fails on a truncated file or, worse, silently continues from a mix of
steps. trl-prob tells complete checkpoints from incomplete ones:

- a single-process checkpoint is complete when its ``trainer_state.json`` (the last file transformers writes) parses;
- a multi-process one also needs ``trl_prob_complete.json``, written by the main process after every rank finished its
  part of the save (other ranks write their own RNG states, FSDP/DeepSpeed their own shards): a barrier, then an
  atomic rename;
- the world size that decides between the two is saved in ``trainer_state.json`` (``stateful_callbacks.
  CheckpointCompletion``); checkpoints written without it (earlier trl-prob versions, plain transformers) are judged
  by ``trainer_state.json`` alone.

``--resume_from_checkpoint true`` resumes from the newest *complete* checkpoint and says in one line which newer ones it
skipped; a named checkpoint that is incomplete is refused with one line.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

TRAINER_STATE_FILE = "trainer_state.json"
COMPLETE_MARKER = "trl_prob_complete.json"
COMPLETION_CALLBACK = "CheckpointCompletion"  # its key in trainer_state.json's `stateful_callbacks`
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def completion_callback(trainer) -> TrainerCallback:
    """The callback that records the world size in each checkpoint's trainer state and marks a checkpoint complete
    once every rank saved it.

    It also carries TRL's ``num_tokens`` counter across a resume: ``SFTTrainer`` counts the tokens it trained on in an
    attribute it neither saves nor restores, so a resumed run would log ``num_tokens`` from 0 again. Made per trainer,
    like the schedule's callback, so the instance transformers re-creates from a checkpoint still reaches it.
    """

    class CheckpointCompletion(TrainerCallback, ExportableState):
        def __init__(self, world_size: int = 1):
            self.world_size = world_size
            self.train_tokens = None  # TRL's counter at the checkpoint a run resumes from (set by the trainer)

        # TRL's counter is the private `SFTTrainer._total_train_tokens` (read here, set on resume), kept on purpose:
        # it is what TRL logs as `num_tokens`, and no public name reads or sets it. `state.num_input_tokens_seen`
        # (`include_num_input_tokens_seen`) is transformers' own count, saved and restored, but a separate counter
        # (off by default) that TRL's `num_tokens` never reads, so restoring it would not continue TRL's log; recounting
        # the dataset cannot give TRL's number either (padding, packing, the step a run stopped at). A TRL without the
        # attribute: None, and nothing is restored. tests/test_trl_api.py allows exactly these uses.
        def state(self) -> dict:
            tokens = getattr(trainer, "_total_train_tokens", None)
            return {"args": {"world_size": trainer.args.world_size}, "attributes": {"train_tokens": tokens}}

        def on_train_begin(self, args, state, control, **kwargs):
            if self.train_tokens is not None and hasattr(trainer, "_total_train_tokens"):
                trainer._total_train_tokens = self.train_tokens

        def on_save(self, args, state, control, **kwargs):
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.barrier()  # every rank has written its files
            if state.is_world_process_zero:
                checkpoint = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
                if os.path.isdir(checkpoint):
                    write_marker(checkpoint, state.global_step, args.world_size)

    assert CheckpointCompletion.__name__ == COMPLETION_CALLBACK
    return CheckpointCompletion(trainer.args.world_size)


def write_marker(checkpoint: str, step: int, world_size: int) -> None:
    tmp = os.path.join(checkpoint, COMPLETE_MARKER + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"global_step": step, "world_size": world_size}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(checkpoint, COMPLETE_MARKER))


def checkpoint_problem(checkpoint: str) -> str | None:
    """Why ``checkpoint`` cannot be resumed from as a complete checkpoint, or None if it can."""
    path = os.path.join(checkpoint, TRAINER_STATE_FILE)
    if not os.path.isfile(path):
        return f"no {TRAINER_STATE_FILE} (the run stopped before the save finished)"
    try:
        with open(path, encoding="utf-8") as f:
            trainer_state = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return f"{TRAINER_STATE_FILE} is cut short or unreadable (the run stopped while writing it)"
    if not isinstance(trainer_state, dict):
        return f"{TRAINER_STATE_FILE} is not a trainer state"
    recorded = (trainer_state.get("stateful_callbacks") or {}).get(COMPLETION_CALLBACK)
    world_size = recorded.get("args", {}).get("world_size", 1) if isinstance(recorded, dict) else 1
    if isinstance(world_size, int) and world_size > 1 and not os.path.isfile(os.path.join(checkpoint, COMPLETE_MARKER)):
        return (
            f"no {COMPLETE_MARKER}: a {world_size}-process save that did not finish on every rank (the run stopped "
            "while saving)"
        )
    return None


def saved_trainer_state(checkpoint: str) -> dict:
    with open(os.path.join(checkpoint, TRAINER_STATE_FILE), encoding="utf-8") as f:
        return json.load(f)


def saved_train_tokens(trainer_state: dict) -> int | None:
    recorded = (trainer_state.get("stateful_callbacks") or {}).get(COMPLETION_CALLBACK)
    tokens = recorded.get("attributes", {}).get("train_tokens") if isinstance(recorded, dict) else None
    return tokens if isinstance(tokens, (int, float)) else None


def finished_problem(checkpoint: str, trainer_state: dict, max_steps: int, num_train_epochs: float) -> str | None:
    """Why resuming from ``checkpoint`` would not continue the run: it is the run's last step already (transformers
    would train one step past it), unless this run asks for more steps or epochs. None if there is more to train."""
    step, saved_max = trainer_state.get("global_step"), trainer_state.get("max_steps")
    if not (isinstance(step, int) and isinstance(saved_max, int)):
        return None
    if max_steps is not None and max_steps > 0:
        finished = step >= max_steps
    else:
        finished = step >= saved_max and num_train_epochs <= (trainer_state.get("num_train_epochs") or 0)
    if not finished:
        return None
    return (
        f"{checkpoint} is the run's last step ({step} of {saved_max}): the run finished and there is nothing to resume "
        "(its model is in that checkpoint). Raise --max_steps or --num_train_epochs to train on."
    )


SCHEDULE_CALLBACK = "ProbObjectiveSchedule"  # the schedule callback's key in trainer_state.json's `stateful_callbacks`
LEGACY_SCHEDULE_STATE_FILE = "trl_prob_schedule.json"  # checkpoints written before the schedule was a callback


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed (incomplete, finished, or its schedule state missing, unreadable or
    ill-typed); raised before any step runs."""


def exported_schedule(trainer_state: str):
    """The schedule callback's entry in a checkpoint's ``trainer_state.json`` (``stateful_callbacks``), or None."""
    with open(trainer_state) as f:
        return json.load(f).get("stateful_callbacks", {}).get(SCHEDULE_CALLBACK)


def saved_schedule_state(checkpoint: str, args) -> dict | None:
    """The schedule state a checkpoint holds, checked; ``None`` where the run may start the schedule afresh.

    Raises :class:`CheckpointError` naming the checkpoint and what is wrong: no schedule state for a run with a
    schedule (unless ``args.schedule_reset_on_resume``), unreadable JSON, or ill-typed fields.
    """
    from .schedules import ScheduleStateError, build_schedule

    trainer_state = os.path.join(checkpoint, TRAINER_STATE_FILE)
    legacy = os.path.join(checkpoint, LEGACY_SCHEDULE_STATE_FILE)
    state = where = None
    try:
        if os.path.isfile(trainer_state):
            exported = exported_schedule(trainer_state)
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


def saved_extension_state(checkpoint: str, args, extension):
    """The run extension's state a checkpoint holds (its ``state_key`` entry of the schedule callback's state), as the
    extension checks it (:meth:`trl_prob.extension.RunExtension.saved_state`); ``None`` where it may start afresh.
    Raises :class:`CheckpointError` like :func:`saved_schedule_state`."""
    trainer_state = os.path.join(checkpoint, TRAINER_STATE_FILE)
    state = None
    if os.path.isfile(trainer_state):
        try:
            exported = exported_schedule(trainer_state)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"checkpoint {checkpoint}: cannot read its schedule state ({exc}).") from None
        if isinstance(exported, dict):
            state = (exported.get("attributes") or {}).get(extension.state_key)
    return extension.saved_state(checkpoint, state, args)


@dataclass
class ResumePlan:
    """What resuming a run needs, checked before any step: the checkpoint, its schedule state and the run extension's
    (None: restart them), TRL's token counter, and the line to log about newer incomplete checkpoints it skipped."""

    checkpoint: str | None
    schedule_state: dict | None = None
    extension_state: Any = None
    train_tokens: int | None = None
    skipped: str | None = None


def plan_resume(resume_from_checkpoint, args, extension=None) -> ResumePlan:
    """The one place a resume is checked (``Trainer.train(resume_from_checkpoint=...)`` and ``trl-prob sft``):
    ``True`` picks the newest complete checkpoint of ``args.output_dir``; a named one must be complete, unfinished and
    carry well-formed schedule state (and the run extension's, when it keeps one). Raises :class:`CheckpointError`
    with one line otherwise."""
    checkpoint, skipped = resume_from_checkpoint, None
    if checkpoint is True:
        checkpoint, passed = last_complete_checkpoint(args.output_dir)
        if checkpoint is None:
            found = "".join(f"; {os.path.basename(c)}: {problem}" for c, problem in passed)
            raise CheckpointError(f"no complete checkpoint in {args.output_dir} to resume from{found}.")
        skipped = skipped_line(passed, checkpoint) if passed else None
    elif isinstance(checkpoint, str) and (problem := checkpoint_problem(checkpoint)) is not None:
        raise CheckpointError(f"checkpoint {checkpoint} is incomplete: {problem}.")
    if not isinstance(checkpoint, str):
        return ResumePlan(None)
    trainer_state = saved_trainer_state(checkpoint)
    finished = finished_problem(checkpoint, trainer_state, args.max_steps, args.num_train_epochs)
    if finished is not None:
        raise CheckpointError(finished)
    state = saved_schedule_state(checkpoint, args)
    keeps_state = extension is not None and extension.state_key is not None
    extension_state = saved_extension_state(checkpoint, args, extension) if keeps_state else None
    if keeps_state and (state is None or extension_state is None):
        state = extension_state = None  # one restarts with the other
    return ResumePlan(checkpoint, state, extension_state, saved_train_tokens(trainer_state), skipped)


def checkpoints(output_dir: str) -> list[str]:
    """``output_dir``'s ``checkpoint-N`` directories, newest first."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(output_dir) if (m := _CHECKPOINT.match(name))]
    return [os.path.join(output_dir, name) for _, name in sorted(found, reverse=True)
            if os.path.isdir(os.path.join(output_dir, name))]  # fmt: skip


def last_complete_checkpoint(output_dir: str) -> tuple[str | None, list[tuple[str, str]]]:
    """The newest complete checkpoint in ``output_dir`` (None if there is none), and the newer incomplete ones with
    what is wrong with each."""
    skipped = []
    for checkpoint in checkpoints(output_dir):
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            return checkpoint, skipped
        skipped.append((checkpoint, problem))
    return None, skipped


def skipped_line(skipped: list[tuple[str, str]], chosen: str) -> str:
    names = "; ".join(f"{os.path.basename(c)}: {problem}" for c, problem in skipped)
    return f"resuming from {chosen}, skipping the newer incomplete checkpoint(s) ({names})."



# ----------------------------------------------------------------------------------------- output dir and resume
# What `--output_dir` and `--resume_from_checkpoint` may ask, checked by the command line before any process starts
# (and on each process before the model loads); the checkpoint itself is then checked by `plan_resume`, as in train().

# What in an output directory means a run already lives there (besides checkpoint-* folders): a saved model or state.
RUN_FILES = ("trainer_state.json", "training_args.bin", "config.json", "model.safetensors", "pytorch_model.bin",
             "model.safetensors.index.json", "adapter_config.json", "adapter_model.safetensors")  # fmt: skip


def resolve_resume(value, output_dir: str) -> bool | str | None:
    """``--resume_from_checkpoint`` as given (a bool, a path, or the strings ``true``/``last``/``false``): None (start
    afresh), True (the newest complete checkpoint in ``output_dir``, which exists) or the path of a complete
    checkpoint. Raises :class:`CheckpointError` naming the value otherwise."""
    if value in (None, False) or str(value).lower() in ("false", "no", "0", "none"):
        return None
    if value is True or str(value).lower() in ("true", "last", "yes", "1"):
        checkpoint, skipped = last_complete_checkpoint(output_dir)
        if checkpoint is None and skipped:
            incomplete = "; ".join(f"{os.path.basename(c)}: {problem}" for c, problem in skipped)
            raise CheckpointError(f"--resume_from_checkpoint {value}: no complete checkpoint in --output_dir "
                                  f"{output_dir} ({incomplete}); start afresh with --overwrite_output_dir.")  # fmt: skip
        if checkpoint is None:
            raise CheckpointError(f"--resume_from_checkpoint {value}: no checkpoint-* folder in --output_dir {output_dir}.")
        return True
    if not os.path.isdir(value):
        raise CheckpointError(f"--resume_from_checkpoint {value}: no such checkpoint directory.")
    problem = checkpoint_problem(value)
    if problem is not None:
        raise CheckpointError(f"--resume_from_checkpoint {value}: an incomplete checkpoint ({problem}).")
    return value


def check_output_dir(args, overwrite_output_dir: bool = False, plan: bool = True) -> bool | str | None:
    """Refuse to train over an earlier run in ``args.output_dir`` unless overwriting it (``overwrite_output_dir``) or
    resuming it (``args.resume_from_checkpoint``, checked by :func:`resolve_resume`, then with ``plan`` by
    :func:`plan_resume`, which ``train()`` runs anyway). Returns what to pass to ``train(resume_from_checkpoint=...)``;
    raises :class:`CheckpointError` naming the value."""
    output_dir = args.output_dir
    resume = resolve_resume(args.resume_from_checkpoint, output_dir)
    names = sorted(os.listdir(output_dir)) if os.path.isdir(output_dir) else []
    found = [name for name in names if name.startswith("checkpoint-") or name in RUN_FILES]
    if found and not (overwrite_output_dir or resume):
        shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
        raise CheckpointError(
            f"--output_dir {output_dir} already holds a run ({shown}); pass --overwrite_output_dir to train over it, "
            "--resume_from_checkpoint true to continue it, or choose another --output_dir."
        )
    if resume and plan:
        plan_resume(resume, args)  # unfinished, schedule state well-formed (an extension's state: once the data is read)
    return resume
