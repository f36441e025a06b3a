"""Child process of tests/test_faults.py: one ``trl-prob sft`` process (the per-process entry, ``trl_prob.cli``) that
kills itself with SIGKILL (``kill -9``: no cleanup, no atexit, no flush) at a chosen point.

    python tests/_fault_train.py FAULT sft [trl-prob sft flags]

FAULT is one of
  none                    no fault
  step:N                  inside the N-th training step of this process: after the backward pass, before the optimizer
                          step
  write:FILE@STEP         while writing FILE of checkpoint-STEP: the first half of its bytes is on disk, then killed
                          (FILE: model.safetensors, optimizer.pt, scheduler.pt, rng_state.pth, trainer_state.json)
  saved:STEP              right after transformers wrote checkpoint-STEP's trainer_state.json, before anything else

The fault is injected here, in the test harness, by wrapping the functions that do the work; the product code is the
installed trl_prob.
"""

from __future__ import annotations

import io
import os
import signal
import sys


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def in_checkpoint(path, name: str, step: str) -> bool:
    path = os.fspath(path) if isinstance(path, (str, os.PathLike)) else ""
    return os.path.basename(path) == name and os.path.basename(os.path.dirname(path)) == f"checkpoint-{step}"


def write_half_and_die(path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    die()


def inject(fault: str) -> None:
    kind, _, arg = fault.partition(":")
    if kind == "none":
        return
    if kind == "step":
        from trl import SFTTrainer

        target, count, original = int(arg), [0], SFTTrainer.training_step

        def killing_training_step(self, *args, **kwargs):
            out = original(self, *args, **kwargs)  # forward and backward done, optimizer step not yet
            count[0] += 1
            if count[0] == target:
                die()
            return out

        SFTTrainer.training_step = killing_training_step
        return
    if kind == "write":
        name, step = arg.split("@")
        import safetensors.torch
        import torch
        import transformers.modeling_utils
        from transformers.trainer_callback import TrainerState

        torch_save = torch.save

        def save(obj, f, *args, **kwargs):
            if in_checkpoint(f, name, step):
                buffer = io.BytesIO()
                torch_save(obj, buffer, *args, **kwargs)
                write_half_and_die(f, buffer.getvalue())
            return torch_save(obj, f, *args, **kwargs)

        torch.save = save
        safe_save_file = transformers.modeling_utils.safe_save_file

        def save_file(tensors, filename, metadata=None):
            if in_checkpoint(filename, name, step):
                write_half_and_die(filename, safetensors.torch.save(tensors, metadata=metadata))
            return safe_save_file(tensors, filename, metadata=metadata)

        transformers.modeling_utils.safe_save_file = save_file
        save_to_json = TrainerState.save_to_json

        def save_state(self, json_path):
            if in_checkpoint(json_path, name, step):
                save_to_json(self, json_path)
                with open(json_path, "rb") as f:
                    data = f.read()
                write_half_and_die(json_path, data)
            return save_to_json(self, json_path)

        TrainerState.save_to_json = save_state
        return
    if kind == "saved":
        from transformers.trainer_callback import TrainerState

        step, save_to_json = arg, TrainerState.save_to_json

        def save_state(self, json_path):
            save_to_json(self, json_path)
            if in_checkpoint(json_path, "trainer_state.json", step):
                die()

        TrainerState.save_to_json = save_state
        return
    raise SystemExit(f"unknown fault {fault!r}")


if __name__ == "__main__":
    fault = sys.argv.pop(1)
    inject(fault)
    from trl_prob.cli import worker_main

    sys.exit(worker_main())  # the command line as `python -m trl_prob.cli sft ...` gets it
