"""The training-loop side of the objective: a ``TrainerCallback`` that starts the schedule, steps it after every
optimizer step, and carries its state in checkpoints."""

from __future__ import annotations

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from .checkpoints import SCHEDULE_CALLBACK


def schedule_callback(trainer) -> TrainerCallback:
    """The callback that runs ``trainer.objective_hook`` at optimizer-step boundaries (on every rank) and exports its
    state.

    As an ``ExportableState``, its state is written into the checkpoint's ``trainer_state.json`` by the Trainer itself,
    in the same file write as the rest of the trainer state. The class is made per trainer, so an instance that
    transformers re-creates (``restore_callback_states_from_checkpoint``) still drives the same trainer.
    """

    class ProbObjectiveSchedule(TrainerCallback, ExportableState):
        def on_train_begin(self, args, state, control, **kwargs):
            state.stateful_callbacks.setdefault(SCHEDULE_CALLBACK, self.state())  # resumed from a legacy checkpoint
            trainer.begin_objective()

        def on_step_end(self, args, state, control, **kwargs):
            trainer.objective_hook.end_step(args.device)

        def state(self) -> dict:
            return {"args": {}, "attributes": trainer.objective_hook.state_dict()}

    assert ProbObjectiveSchedule.__name__ == SCHEDULE_CALLBACK
    return ProbObjectiveSchedule()
