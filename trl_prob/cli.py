"""``trl-prob``: TRL's ``trl sft`` command, training with [`ProbSFTTrainer`] and accepting trl-prob's flags.

Commands:

- ``trl-prob sft``: every ``trl sft`` flag (``ScriptArguments``, ``SFTConfig``, ``ModelConfig``, dataset mixtures,
  ``--config recipe.yaml`` with its ``env:`` block) plus the objective flags of [`ProbSFTConfig`]. Flags the training
  parser does not know go to ``accelerate launch`` (``--num_processes 2``, ``--multi_gpu``, ``--use_cpu``,
  ``--accelerate_config NAME|PATH``, ...), exactly as in ``trl sft``.
- ``trl-prob probe``: the same flags plus ``--num_samples`` and ``--batch_size``; builds the trainer as ``sft`` would,
  then measures where the model stands on the capability continuum instead of training.
- ``trl-prob plot RUN_DIR [--output PNG]``: plots a run's loss, token probability and objective lambda.

How a training command runs (the same split as TRL's CLI): the *launcher* (``trl-prob sft ...``) parses and validates
everything in one process, so bad input fails with one line before any process starts; then it runs
``accelerate launch [accelerate flags] --module trl_prob.cli sft [training flags]``. ``python -m trl_prob.cli`` is the
per-process entry point, the counterpart of ``trl/scripts/sft.py``: use it directly with your own launcher
(``accelerate launch -m trl_prob.cli sft --config recipe.yaml``, ``torchrun -m trl_prob.cli ...``, SLURM ``srun``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from trl.cli.commands.base import Command, CommandContext

logger = logging.getLogger(__name__)

PROG = "trl-prob"
WORKER_MODULE = "trl_prob.cli"
# Files whose presence in --output_dir means a run already lives there (a finished model, adapter or trainer state).
RUN_FILES = (
    "trainer_state.json",
    "training_args.bin",
    "config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "adapter_config.json",
    "adapter_model.safetensors",
)
TRUE_STRINGS = ("true", "last", "yes", "1")


class CLIError(Exception):
    """Bad input from the command line: reported as one line on stderr, exit status 1 (2 for usage errors)."""

    def __init__(self, message: str, status: int = 1):
        super().__init__(message)
        self.status = status


# --------------------------------------------------------------------------------------------- arguments


@dataclass
class RunArguments:
    """Flags of the ``trl-prob`` command itself (not of the trainer)."""

    _argument_group_name = "trl-prob run"

    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Train into an --output_dir that already holds a run (checkpoints or a saved model); its files are "
            "replaced as the new run writes them. Without it (or --resume_from_checkpoint) such a directory is "
            "refused. transformers 5 dropped this TrainingArguments flag; trl-prob keeps the safety it gave."
        },
    )
    rank_log_dir: str | None = field(
        default=None,
        metadata={
            "help": "Debugging distributed runs: every process appends each record it logs (loss, mean_token_prob, "
            "objective_lambda, ...) to RANK_LOG_DIR/rank<N>.jsonl, to check that the ranks agree."
        },
    )


@dataclass
class ProbeArguments:
    """Flags of ``trl-prob probe``."""

    _argument_group_name = "trl-prob probe"

    num_samples: int | None = field(
        default=1024,
        metadata={"help": "Training samples to measure (None: the whole training split)."},
    )
    batch_size: int | None = field(
        default=None,
        metadata={"help": "Samples per device per forward pass (default: --per_device_eval_batch_size)."},
    )


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in the flag help (as HfArgumentParser does) and hand-wrapped description/epilog."""


def _dataclass_types(command: str) -> tuple[type, ...]:
    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments

    from .config import ProbSFTConfig

    types: tuple[type, ...] = (ScriptArguments, ProbSFTConfig, ModelConfig, DatasetMixtureConfig, RunArguments)
    return types + (ProbeArguments,) if command == "probe" else types


def objective_fields() -> list[dataclasses.Field]:
    """The fields ``ProbSFTConfig`` adds to ``SFTConfig`` (the objective and its schedule)."""
    from trl import SFTConfig

    from .config import ProbSFTConfig

    inherited = {f.name for f in dataclasses.fields(SFTConfig)}
    return [f for f in dataclasses.fields(ProbSFTConfig) if f.name not in inherited]


def _flag_table(fields: Sequence[dataclasses.Field]) -> str:
    lines = []
    for f in fields:
        lines.append(f"  --{f.name}")
        lines += textwrap.wrap(f.metadata.get("help", ""), width=100, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines)


_ACCELERATE_EPILOG = """\
Flags not listed above go to `accelerate launch`, as with `trl sft`: --num_processes N, --multi_gpu, --num_machines,
--machine_rank, --main_process_ip, --main_process_port, --mixed_precision, --config_file PATH, and
--accelerate_config NAME|PATH (a file, or one of TRL's shipped configs: multi_gpu, fsdp2, zero3, ...).
See `accelerate launch --help`. A recipe's YAML may also hold accelerate keys; unknown keys are an error."""


def make_parser(command: str = "sft", prog: str | None = None):
    """The parser of ``trl-prob sft`` / ``probe``: TRL's ``TrlParser`` over ``trl sft``'s dataclasses, with
    [`ProbSFTConfig`] in place of ``SFTConfig``, plus the command's own flags."""
    from trl import TrlParser

    class Parser(TrlParser):
        def error(self, message: str):  # argparse would print a usage line naming every one of ~250 flags
            raise CLIError(f"{message} (see `{self.prog} --help`)", status=2)

    description = {
        "sft": "Supervised fine-tuning with TRL's SFTTrainer, training a probability-based objective on a schedule.",
        "probe": "Measure the model's target-token probabilities on the training data (where it stands on the "
        "capability continuum) with the trainer `sft` would build; writes probe.json and a plot to --output_dir.",
    }[command]
    parser = Parser(
        _dataclass_types(command),
        prog=prog or f"{PROG} {command}",
        description=description,
        epilog=_ACCELERATE_EPILOG,
        formatter_class=_Formatter,
        allow_abbrev=False,
    )
    if command == "probe":
        from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available

        # The probe trains nothing: without a bf16 device it measures in float32 on what there is (SFTConfig's bf16
        # default would be refused there). An explicit --bf16 (flag or YAML) still wins.
        if not (is_torch_bf16_gpu_available() or is_torch_xla_available()):
            parser.set_defaults(bf16=False)
    return parser


def parse_worker_args(command: str, argv: Sequence[str]) -> tuple[Any, ...]:
    """Parse a worker's arguments into dataclasses; keys of the YAML config that only accelerate knows are ignored."""
    return make_parser(command).parse_args_and_config(list(argv), fail_with_unknown_args=False)


# --------------------------------------------------------------------------------------------- validation


def existing_run(output_dir: str) -> list[str]:
    """What in ``output_dir`` belongs to an earlier run: ``checkpoint-*`` folders and saved model/trainer files."""
    if not os.path.isdir(output_dir):
        return []
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    found = sorted(name for name in os.listdir(output_dir) if name.startswith(f"{PREFIX_CHECKPOINT_DIR}-"))
    return found + [name for name in RUN_FILES if os.path.exists(os.path.join(output_dir, name))]


def resolve_resume(value: str | bool | None, output_dir: str) -> str | bool | None:
    """``--resume_from_checkpoint``: ``true``/``last`` means the last checkpoint in ``output_dir``, else a path."""
    if value is None or value is False:
        return None
    if value is True or str(value).lower() in TRUE_STRINGS:
        from transformers.trainer_utils import get_last_checkpoint

        if not os.path.isdir(output_dir) or get_last_checkpoint(output_dir) is None:
            raise CLIError(f"--resume_from_checkpoint {value}: no checkpoint-* folder in --output_dir {output_dir}.")
        return True
    if str(value).lower() in ("false", "no", "0", "none"):
        return None
    if not os.path.isdir(value):
        raise CLIError(f"--resume_from_checkpoint {value}: no such checkpoint directory.")
    return value


def check_output_dir(training_args, run_args: RunArguments) -> None:
    """Refuse to train over an earlier run unless asked to (overwrite) or continuing it (resume)."""
    if run_args.overwrite_output_dir or resolve_resume(training_args.resume_from_checkpoint, training_args.output_dir):
        return
    found = existing_run(training_args.output_dir)
    if found:
        shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
        raise CLIError(
            f"--output_dir {training_args.output_dir} already holds a run ({shown}); pass --overwrite_output_dir to "
            "train over it, --resume_from_checkpoint true to continue it, or choose another --output_dir."
        )


def _looks_local(path: str) -> bool:
    """A path rather than a Hub id (``org/name``) or a builder name (``json``)."""
    return (
        path.startswith(("/", ".", "~"))
        or path.count("/") > 1
        or path.endswith((".json", ".jsonl", ".csv", ".parquet"))
    )


def check_model(model_args, training_args) -> None:
    """The model exists: a local directory or a Hub id whose config loads (from the cache when offline)."""
    path = model_args.model_name_or_path
    if not path:
        raise CLIError("--model_name_or_path is required (a local directory or a Hugging Face Hub model id).")
    if _looks_local(path) and not os.path.isdir(os.path.expanduser(path)):
        raise CLIError(f"--model_name_or_path {path}: no such directory.")
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(
            path, revision=model_args.model_revision, trust_remote_code=training_args.trust_remote_code
        )
    except (OSError, ValueError) as exc:
        where = "" if os.path.exists(path) else "no such local directory, and as a Hub id: "
        raise CLIError(f"--model_name_or_path {path}: {where}{_one_line(exc)}") from exc


def check_dataset(script_args, dataset_args) -> None:
    """A dataset is given and every named one exists locally or can be resolved (no data is downloaded)."""
    if dataset_args.datasets:
        specs = [(d.path, d.name, d.data_dir, d.data_files) for d in dataset_args.datasets]
    elif script_args.dataset_name:
        specs = [(script_args.dataset_name, script_args.dataset_config, None, None)]
    else:
        raise CLIError("Give a dataset: --dataset_name PATH_OR_HUB_ID, or a `datasets:` list in the --config YAML.")
    for path, name, data_dir, data_files in specs:
        if os.path.exists(os.path.expanduser(path)):
            continue
        if _looks_local(path):
            raise CLIError(f"dataset {path}: no such file or directory.")
        from datasets import load_dataset_builder

        try:
            load_dataset_builder(path, name=name, data_dir=data_dir, data_files=data_files)
        except Exception as exc:  # datasets raises a zoo of types (DatasetNotFoundError, ConnectionError, ValueError)
            raise CLIError(f"dataset {path}: no such local path, and as a Hub dataset: {_one_line(exc)}") from exc


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


# --------------------------------------------------------------------------------------------- building


def load_datasets(script_args, dataset_args):
    """The ``DatasetDict`` exactly as ``trl sft`` loads it (a mixture wins over ``--dataset_name``)."""
    from datasets import load_dataset
    from trl import get_dataset

    if dataset_args is not None and dataset_args.datasets:
        if script_args.dataset_name:
            logger.warning("Both `datasets` and `dataset_name` are given: loading `datasets`, ignoring `dataset_name`.")
        return get_dataset(dataset_args)
    if script_args.dataset_name:
        return load_dataset(
            script_args.dataset_name, name=script_args.dataset_config, streaming=script_args.dataset_streaming
        )
    raise CLIError("Give a dataset: --dataset_name PATH_OR_HUB_ID, or a `datasets:` list in the --config YAML.")


def _split(dataset, name: str, flag: str):
    if name not in dataset:
        raise CLIError(f"{flag} {name}: the dataset has no such split (it has: {', '.join(dataset)}).")
    return dataset[name]


def load_splits(script_args, training_args, dataset_args=None):
    """(train, eval) datasets as ``trl sft`` picks them; eval only when ``eval_strategy`` is not ``no``."""
    try:
        dataset = load_datasets(script_args, dataset_args)
    except StopIteration:  # datasets' json builder on a file without a single row
        raise CLIError(f"The dataset {script_args.dataset_name!r} has no rows: there is nothing to train on.") from None
    mixture = dataset_args is not None and bool(dataset_args.datasets)
    # A mixture is split by `test_split_size` into TRL's own "train"/"test" names.
    train_split = "train" if mixture else script_args.dataset_train_split
    test_split = "test" if mixture else script_args.dataset_test_split
    train_dataset = _split(dataset, train_split, "--dataset_train_split")
    eval_dataset = None
    if training_args.eval_strategy != "no":
        eval_dataset = _split(dataset, test_split, "--dataset_test_split")
    return train_dataset, eval_dataset


def build_trainer(
    script_args, training_args, model_args, dataset_args=None, callbacks=None, train_dataset=None, eval_dataset=None
):
    """The [`ProbSFTTrainer`] that ``trl-prob sft`` trains and ``trl-prob probe`` measures.

    The same construction as ``trl sft`` (``trl/scripts/sft.py``): model init kwargs from ``ModelConfig``, the
    quantization config (QLoRA with ``--load_in_4bit --use_peft``) and LoRA config from TRL's helpers, the eval split
    only when ``eval_strategy`` is not ``no``. Device placement is TRL's: ``device_map=None`` on CPU and under DDP.
    Pass ``train_dataset`` (and ``eval_dataset``) to skip loading them from ``script_args`` / ``dataset_args``.
    """
    from trl import get_peft_config, get_quantization_config

    from .trainer import ProbSFTTrainer

    model_init_kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    model_init_kwargs.update(training_args.model_init_kwargs or {})
    training_args.model_init_kwargs = model_init_kwargs

    if train_dataset is None:
        train_dataset, eval_dataset = load_splits(script_args, training_args, dataset_args)
    _check_inputs(train_dataset, model_args, training_args)
    return ProbSFTTrainer(
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
        callbacks=callbacks,
    )


def _check_inputs(train_dataset, model_args, training_args) -> None:
    """Empty data, or conversations without a chat template: a clear error before the model is loaded."""
    from transformers import AutoTokenizer

    from .probe import check_probe_inputs

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            model_args.model_name_or_path,
            revision=model_args.model_revision,
            trust_remote_code=training_args.trust_remote_code,
        )
    except Exception:  # a processor-only model: TRL loads its processor and checks the template itself
        tokenizer = None
    check_probe_inputs(train_dataset, tokenizer, training_args)


def _rank_log_callback(directory: str):
    from transformers import TrainerCallback

    class RankLogCallback(TrainerCallback):
        """Appends each record this process logs to ``<directory>/rank<N>.jsonl``."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            os.makedirs(directory, exist_ok=True)
            with open(os.path.join(directory, f"rank{args.process_index}.jsonl"), "a") as f:
                f.write(json.dumps({"step": state.global_step, **(logs or {})}) + "\n")

    return RankLogCallback()


# --------------------------------------------------------------------------------------------- per-process entry


def train(trainer, script_args, training_args) -> None:
    """``trl sft``'s training tail: train (resuming if asked), save, push."""
    resume = resolve_resume(training_args.resume_from_checkpoint, training_args.output_dir)
    trainer.train(resume_from_checkpoint=resume)
    trainer.accelerator.print("Training completed.")
    trainer.save_state()  # trainer_state.json in output_dir: what `trl-prob plot` reads when no checkpoint was kept
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}.")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
        trainer.accelerator.print(f"Model pushed to the Hub in https://huggingface.co/{trainer.hub_model_id}.")


def probe(trainer, probe_args: ProbeArguments, output_dir: str, source_dataset=None):
    """Measure instead of training: ``trl_prob.probe.run_probe`` on the trainer ``sft`` would train."""
    from .probe import run_probe

    return run_probe(
        trainer,
        num_samples=probe_args.num_samples,
        output_dir=output_dir,
        batch_size=probe_args.batch_size,
        source_dataset=source_dataset,
    )


def shut_down(trainer) -> None:
    """Leave the process group cleanly on every rank: barrier, then destroy it (finishing the trackers too).

    Multi-process CPU runs on torch 2.13 + gloo were seen to finish training and saving, then hang one rank at
    interpreter exit (about one run in five). Distributed workers therefore also skip the interpreter's teardown
    (``os._exit`` in :func:`worker_main`).
    """
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        trainer.accelerator.wait_for_everyone()
    # `Trainer.end` (transformers >= 5.18) is accelerator.end_training(): trackers' finish(), destroy_process_group()
    getattr(trainer, "end", trainer.accelerator.end_training)()


def setup_worker(command: str, argv: Sequence[str]) -> Callable[[], None]:
    """Parse, validate and build the trainer on this process; returns the job (train or probe, then shut down).

    Bad input surfaces here, before anything is written; errors of the job itself keep their traceback.
    """
    script_args, training_args, model_args, dataset_args, run_args, *rest = parse_worker_args(command, argv)
    if command == "sft":
        check_output_dir(training_args, run_args)
    callbacks = [_rank_log_callback(run_args.rank_log_dir)] if run_args.rank_log_dir else None
    train_dataset, eval_dataset = load_splits(script_args, training_args, dataset_args)
    trainer = build_trainer(
        script_args,
        training_args,
        model_args,
        callbacks=callbacks,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
    )

    def job() -> None:
        if command == "sft":
            train(trainer, script_args, training_args)
        else:
            (probe_args,) = rest
            probe(trainer, probe_args, training_args.output_dir, source_dataset=train_dataset)
        shut_down(trainer)

    return job


def run_worker(command: str, argv: Sequence[str]) -> int:
    """Run ``command`` on this process (what ``accelerate launch`` starts on every rank)."""
    setup_worker(command, argv)()
    return 0


def worker_main(argv: Sequence[str] | None = None) -> int:
    """``python -m trl_prob.cli {sft,probe} ...``: one process of a (possibly distributed) run."""
    _quiet_known_warnings()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("sft", "probe"):
        usage = f"usage: python -m {WORKER_MODULE} {{sft,probe}} [flags]  (per-process entry; see `{PROG} --help`)"
        print(usage, file=sys.stderr)
        return 2
    command = argv[0]
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    status = 0
    try:
        job = setup_worker(command, argv[1:])
    except (CLIError, ValueError, OSError) as exc:
        if os.environ.get("TRL_PROB_TRACEBACK") == "1":
            raise
        rank = f"[rank {os.environ['RANK']}] " if distributed and "RANK" in os.environ else ""
        print(f"{PROG} {command}: error: {rank}{_one_line(exc)}", file=sys.stderr)
        status = getattr(exc, "status", 1)
    else:
        job()
    if distributed:
        # The process group is gone; skip the interpreter's teardown, where gloo threads could still hang a rank.
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(status)
    return status


# --------------------------------------------------------------------------------------------- launcher


def _accelerate_parser():
    from accelerate.commands.launch import launch_command_parser

    parser = launch_command_parser()

    def error(message: str):
        raise CLIError(f"accelerate launch: {message}", status=2)

    parser.error = error
    return parser


def _option_strings(parser) -> set[str]:
    return {option for action in parser._actions for option in action.option_strings}


def split_launch_args(
    command: str, all_args: Sequence[str], config_remaining: Sequence[str], cli_remaining: Sequence[str]
) -> tuple[list[str], list[str]]:
    """(accelerate launch flags, training flags), as ``trl sft`` splits them; anything neither knows is an error."""
    from trl.cli.accelerate_config import resolve_accelerate_config_argument
    from trl.cli.commands.training import _subtract_subsequence

    accelerate_options = _option_strings(_accelerate_parser()) | {"--accelerate_config"}
    unknown_keys = [
        key[2:] for key in config_remaining[::2] if key.startswith("--") and key not in accelerate_options
    ]
    if unknown_keys:
        raise CLIError(
            f"unknown key(s) in --config: {', '.join(unknown_keys)} (neither a training nor an accelerate flag; "
            "check the spelling)",
            status=2,
        )
    flags = [arg.split("=", 1)[0] for arg in cli_remaining if arg.startswith("-")]
    unknown_flags = [flag for flag in flags if flag not in accelerate_options]
    if unknown_flags:
        raise CLIError(f"unrecognized arguments: {' '.join(unknown_flags)} (see `{PROG} {command} --help`)", status=2)
    try:
        launch_args = resolve_accelerate_config_argument(list(config_remaining) + list(cli_remaining))
    except ValueError as exc:
        raise CLIError(str(exc), status=2) from exc
    return launch_args, _subtract_subsequence(list(all_args), list(cli_remaining))


def accelerate_namespace(command: str, launch_args: Sequence[str], training_args: Sequence[str]) -> argparse.Namespace:
    """``accelerate launch [launch_args] --module trl_prob.cli COMMAND [training_args]``, parsed and checked."""
    parser = _accelerate_parser()
    namespace, extra = parser.parse_known_args([*launch_args, "--module", WORKER_MODULE, command, *training_args])
    if extra or namespace.training_script != WORKER_MODULE:
        stray = extra or [namespace.training_script]
        raise CLIError(f"unrecognized arguments: {' '.join(stray)} (see `{PROG} {command} --help`)", status=2)
    return namespace


def launch(
    command: str, argv: Sequence[str], launch_command_fn: Callable[[argparse.Namespace], None] | None = None
) -> int:
    """Parse and validate in this process, then start the run through ``accelerate launch`` (as ``trl sft`` does)."""
    parser = make_parser(command)
    try:
        *parsed, config_remaining, cli_remaining = parser.parse_args_and_config(
            list(argv), return_remaining_strings=True, separate_remaining_strings=True
        )
    except (yaml_errors() + (ValueError, OSError)) as exc:
        raise CLIError(_one_line(exc)) from exc
    script_args, training_args, model_args, dataset_args, run_args, *_ = parsed
    launch_args, training_flags = split_launch_args(command, argv, config_remaining, cli_remaining)
    namespace = accelerate_namespace(command, launch_args, training_flags)
    check_model(model_args, training_args)
    check_dataset(script_args, dataset_args)
    if command == "sft":
        check_output_dir(training_args, run_args)

    if launch_command_fn is None:
        from accelerate.commands.launch import launch_command as launch_command_fn
    try:
        launch_command_fn(namespace)
    except subprocess.CalledProcessError as exc:  # the worker already reported its error
        return exc.returncode or 1
    except Exception as exc:  # torch.distributed.elastic's ChildFailedError: the failing rank printed its own error
        if type(exc).__name__ != "ChildFailedError":
            raise
        return 1
    return 0


def yaml_errors() -> tuple[type[BaseException], ...]:
    import yaml

    return (yaml.YAMLError,)


# --------------------------------------------------------------------------------------------- commands


class TrainingCommand(Command):
    """``sft`` / ``probe``: parse, validate, launch through accelerate."""

    def __init__(self, name: str, help_text: str):
        super().__init__(name=name, help_text=help_text)

    def register(self, subparsers) -> None:
        subparsers.add_parser(self.name, help=self.help_text, add_help=False)

    def run(self, args: argparse.Namespace, context: CommandContext) -> int:
        return launch(self.name, context.argv_after(self.name))


class PlotCommand(Command):
    """``plot RUN_DIR [--output PNG]``."""

    def __init__(self):
        super().__init__(name="plot", help_text="Plot a run's loss, token probability and objective lambda")

    def register(self, subparsers) -> None:
        parser = subparsers.add_parser(self.name, help=self.help_text, description=self.help_text)
        parser.add_argument(
            "run_dir", metavar="RUN_DIR", help="A run's --output_dir, one of its checkpoints, or a trainer_state.json."
        )
        parser.add_argument("--output", metavar="PNG", help="Where to write the plot (default: inside RUN_DIR).")

    def run(self, args: argparse.Namespace, context: CommandContext) -> int:
        from .plots import plot_training

        if not os.path.exists(args.run_dir):
            raise CLIError(f"{args.run_dir}: no such run directory.")
        try:
            print(plot_training(args.run_dir, output_png=args.output))
        except (OSError, ValueError) as exc:
            raise CLIError(_one_line(exc)) from exc
        return 0


def get_commands() -> list[Command]:
    return [
        TrainingCommand("sft", "Train with a probability-based objective (every `trl sft` flag plus ours)"),
        TrainingCommand("probe", "Measure the model's target-token probabilities on the training data"),
        PlotCommand(),
    ]


def _top_level_parser(commands: Sequence[Command]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="TRL's SFT with the probability-based objectives of 'Beyond Log Likelihood' and schedules "
        "from NLL toward -p^k. `trl-prob sft` takes every `trl sft` flag plus the ones below.",
        epilog="Objective and schedule flags (sft and probe):\n"
        + _flag_table(objective_fields())
        + "\n\nRun flags (sft):\n"
        + _flag_table(dataclasses.fields(RunArguments))
        + "\n\n"
        + _ACCELERATE_EPILOG
        + f"\n\nExample:\n  {PROG} sft --config recipes/quickstart.yaml\n"
        f"  {PROG} sft --config recipes/math/qwen2.5-math-1.5b-full.yaml --accelerate_config multi_gpu "
        "--num_processes 8",
    )
    subparsers = parser.add_subparsers(help="available commands", dest="command")
    for command in commands:
        command.register(subparsers)
    return parser


def _quiet_known_warnings() -> None:
    # TRL's SFTConfig defaults `gradient_checkpointing=True`, which transformers 5 reports as a deprecated alias of
    # `activation_checkpointing` on every run: noise the user did not cause and cannot silence from the command line.
    warnings.filterwarnings("ignore", message="`gradient_checkpointing", category=FutureWarning)


def main(argv: Sequence[str] | None = None) -> int:
    """The ``trl-prob`` console script."""
    _quiet_known_warnings()
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = get_commands()
    parser = _top_level_parser(commands)
    args, _ = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    command = next(c for c in commands if c.name == args.command)
    try:
        return command.run(args, CommandContext(argv=argv))
    except CLIError as exc:
        if os.environ.get("TRL_PROB_TRACEBACK") == "1":
            raise
        print(f"{PROG} {command.name}: error: {exc}", file=sys.stderr)
        return exc.status


if __name__ == "__main__":
    sys.exit(worker_main())
