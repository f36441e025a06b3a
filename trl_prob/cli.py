"""``trl-prob``: TRL's ``trl sft`` training [`ProbSFTTrainer`], with trl-prob's flags.

- ``trl-prob sft``: every ``trl sft`` flag (``ScriptArguments``, ``SFTConfig``, ``ModelConfig``, dataset mixtures,
  ``--config recipe.yaml`` with its ``env:`` block) plus the objective flags of [`ProbSFTConfig`]; flags the training
  parser does not know go to ``accelerate launch`` (``--num_processes 2``, ``--accelerate_config NAME|PATH``, ...).
- ``trl-prob probe``: the same flags plus ``--num_samples`` / ``--batch_size``; builds the trainer ``sft`` would build
  and measures where the model stands on the capability continuum instead of training.
- ``trl-prob plot RUN_DIR [--output PNG]``: a run's loss, token probability and objective lambda.

The file has the shape of TRL's CLI. :func:`sft` and :func:`make_parser` are ``trl/scripts/sft.py``'s ``main`` and
``make_parser``; ``python -m trl_prob.cli {sft,probe} ...`` is the per-process entry (use it with your own launcher:
``accelerate launch -m trl_prob.cli sft --config recipe.yaml``, ``torchrun -m trl_prob.cli ...``, SLURM ``srun``).
:func:`launch` is ``trl/cli/commands/training.py``: it parses and validates in one process, so bad input fails with one
line before any process starts, then runs ``accelerate launch [accelerate flags] --module trl_prob.cli sft [flags]``.
"""

from __future__ import annotations

import argparse
import contextlib
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

logger = logging.getLogger(__name__)

PROG = "trl-prob"
WORKER_MODULE = "trl_prob.cli"
# What in --output_dir means a run already lives there (besides checkpoint-* folders): a saved model or trainer state.
RUN_FILES = ("trainer_state.json", "training_args.bin", "config.json", "model.safetensors", "pytorch_model.bin",
             "model.safetensors.index.json", "adapter_config.json", "adapter_model.safetensors")  # fmt: skip


class CLIError(Exception):
    """Bad input: reported as one line on stderr, exit status 1 (2 for usage errors)."""

    def __init__(self, message: str, status: int = 1):
        super().__init__(message)
        self.status = status


@contextlib.contextmanager
def bad_input(status: int = 1):
    """Errors raised inside are bad input (a value, a path, a YAML file): re-raised as a one-line [`CLIError`]."""
    import yaml

    try:
        yield
    except StopIteration:  # datasets' json builder on a file without a single row
        raise CLIError("The dataset has no rows: there is nothing to train on.") from None
    except (ValueError, OSError, yaml.YAMLError) as exc:
        raise CLIError(_one_line(exc), status) from exc


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


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
    summary: bool = field(
        default=False,
        metadata={
            "help": "At the end of training, print what the run did: held-out exact match (greedy generate) and mean "
            "target-token probability before and after, lambda at the first and last step, where the model, "
            "checkpoints and plot (written to OUTPUT_DIR/training.png) are; also saved to OUTPUT_DIR/summary.json. "
            "Needs prompt-completion data with a held-out split (--dataset_test_split)."
        },
    )
    summary_samples: int | None = field(
        default=200, metadata={"help": "Held-out samples the summary measures (None: the whole split)."}
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
        metadata={
            "help": "Training samples to measure (None: the whole training split); with --schedule_per_source, spread "
            "over the sources in their shares of the data."
        },
    )
    batch_size: int | None = field(
        default=None,
        metadata={"help": "Samples per device per forward pass (default: --per_device_eval_batch_size)."},
    )


ACCELERATE_EPILOG = """\
Flags not listed above go to `accelerate launch`, as with `trl sft`: --num_processes N, --multi_gpu, --num_machines,
--machine_rank, --main_process_ip, --main_process_port, --mixed_precision, --config_file PATH, and
--accelerate_config NAME|PATH (a file, or one of TRL's shipped configs: multi_gpu, fsdp2, zero3, ...).
See `accelerate launch --help`. A recipe's YAML may also hold accelerate keys; unknown keys are an error."""


def make_parser(command: str = "sft", prog: str | None = None):
    """``trl/scripts/sft.py``'s parser with [`ProbSFTConfig`] for ``SFTConfig``, plus the command's own flags."""
    from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available
    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, TrlParser

    from .config import ProbSFTConfig

    class Parser(TrlParser):
        def error(self, message: str):  # argparse would print a usage line naming every one of ~250 flags
            raise CLIError(f"{message} (see `{self.prog} --help`)", status=2)

    class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
        """Defaults in the flag help (as HfArgumentParser does) and a hand-wrapped epilog."""

    dataclass_types = (ScriptArguments, ProbSFTConfig, ModelConfig, DatasetMixtureConfig, RunArguments)
    description = {
        "sft": "Supervised fine-tuning with TRL's SFTTrainer, training a probability-based objective on a schedule.",
        "probe": "Measure the model's target-token probabilities on the training data (where it stands on the "
        "capability continuum) with the trainer `sft` would build; writes probe.json and a plot to --output_dir.",
    }[command]
    parser = Parser(
        dataclass_types + ((ProbeArguments,) if command == "probe" else ()),
        prog=prog or f"{PROG} {command}",
        description=description,
        epilog=ACCELERATE_EPILOG,
        formatter_class=Formatter,
        allow_abbrev=False,
    )
    # The probe trains nothing: without a bf16 device it measures in float32 on what there is (SFTConfig's bf16
    # default would be refused there). An explicit --bf16 (flag or YAML) still wins.
    if command == "probe" and not (is_torch_bf16_gpu_available() or is_torch_xla_available()):
        parser.set_defaults(bf16=False)
    for action in parser._actions:  # the objective registry may have grown since ProbSFTConfig was defined
        if "--objective" in action.option_strings:
            action.help = _help("objective", action.help)
    return parser


def _help(name: str, default: str) -> str:
    from .objectives import objective_help

    return objective_help() if name == "objective" else default


# --------------------------------------------------------------------------------------------- the script


def sft(script_args, training_args, model_args, dataset_args, run_args, probe_args=None) -> None:
    """``trl/scripts/sft.py``'s ``main`` with [`ProbSFTTrainer`]; given ``probe_args`` (``trl-prob probe``), the same
    trainer is measured instead of trained. Bad input raises [`CLIError`] before anything is written."""
    from datasets import load_dataset
    from trl import get_dataset, get_peft_config, get_quantization_config

    from .probe import check_probe_inputs, run_probe
    from .trainer import ProbSFTTrainer

    with bad_input():
        resume = check_output_dir(training_args, run_args) if probe_args is None else None
        model_init_kwargs = dict(
            revision=model_args.model_revision,
            trust_remote_code=training_args.trust_remote_code,
            attn_implementation=model_args.attn_implementation,
            dtype=model_args.dtype,
        )
        model_init_kwargs.update(training_args.model_init_kwargs or {})
        training_args.model_init_kwargs = model_init_kwargs

        # Load the dataset; a mixture wins over --dataset_name and is split into TRL's own "train"/"test".
        train_split, test_split = script_args.dataset_train_split, script_args.dataset_test_split
        if dataset_args.datasets:
            if script_args.dataset_name:
                logger.warning("Both `datasets` and `dataset_name` are given: loading `datasets`, ignoring the other.")
            dataset, train_split, test_split = _load_mixture(get_dataset, dataset_args, training_args), "train", "test"
        elif script_args.dataset_name:
            dataset = _load_dataset(load_dataset, script_args)
        else:
            raise CLIError(NO_DATASET)
        train_dataset = _split(dataset, train_split, "--dataset_train_split")
        eval_dataset = None
        summary = probe_args is None and run_args.summary
        if training_args.eval_strategy != "no" or summary:
            eval_dataset = _split(dataset, test_split, "--dataset_test_split")
        _check_rows(script_args, training_args, train_split, train_dataset, test_split, eval_dataset)
        check_probe_inputs(train_dataset, _tokenizer(model_args, training_args), training_args)

        trainer = ProbSFTTrainer(
            model=model_args.model_name_or_path,
            args=training_args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            quantization_config=get_quantization_config(model_args),
            peft_config=get_peft_config(model_args),
            callbacks=[rank_log_callback(run_args.rank_log_dir)] if run_args.rank_log_dir else None,
        )
        if summary:
            from .summary import RunSummary

            summary = RunSummary(trainer, num_samples=run_args.summary_samples, print_at_end=False,
                                 split_name=f"{test_split!r}")  # fmt: skip
            trainer.add_callback(summary)

    if probe_args is not None:
        run_probe(trainer, num_samples=probe_args.num_samples, output_dir=training_args.output_dir,
                  batch_size=probe_args.batch_size, source_dataset=train_dataset)  # fmt: skip
    else:
        trainer.train(resume_from_checkpoint=resume)
        trainer.accelerator.print("Training completed.")
        trainer.save_state()  # trainer_state.json in output_dir: what `trl-prob plot` reads when no checkpoint was kept
        trainer.save_model(training_args.output_dir)
        trainer.accelerator.print(f"Model saved to {training_args.output_dir}.")
        if summary:
            print_summary(trainer, summary, training_args.output_dir)
        if training_args.push_to_hub:
            trainer.push_to_hub(dataset_name=script_args.dataset_name)
            trainer.accelerator.print(f"Model pushed to the Hub in https://huggingface.co/{trainer.hub_model_id}.")
    end(trainer)


def print_summary(trainer, summary, output_dir: str) -> None:
    """``--summary``: the plot of the run, the summary on stdout and in summary.json (main process)."""
    if not trainer.is_world_process_zero():
        return
    from .plots import plot_training

    plot = plot_training(output_dir)
    if os.path.abspath(os.path.dirname(plot)) == os.path.abspath(output_dir):
        plot = os.path.join(output_dir, os.path.basename(plot))  # as the user gave the directory
    summary.save(output_dir)
    print(summary.format(output_dir=output_dir, plot=plot), flush=True)


NO_DATASET = "Give a dataset: --dataset_name PATH_OR_HUB_ID, or a `datasets:` list in the --config YAML."


def _load_dataset(load_dataset, script_args):
    """``load_dataset`` of ``--dataset_name``; a local file it cannot read is one line naming the file and line."""
    from .data import empty_files, locate_load_error

    name = script_args.dataset_name
    try:
        return load_dataset(name, name=script_args.dataset_config, streaming=script_args.dataset_streaming)
    except Exception as exc:  # datasets wraps the reader's error (DatasetGenerationError, pyarrow, UnicodeDecodeError)
        where = locate_load_error(name)
        if where is not None:
            raise CLIError(f"--dataset_name {name}: {where}") from exc
        empty = empty_files(name)
        if empty:
            raise CLIError(f"--dataset_name {name}: {', '.join(empty)} holds no rows: there is nothing to train on.") from exc
        raise


def _load_mixture(get_dataset, dataset_args, training_args):
    """TRL's ``get_dataset`` of the ``datasets:`` mixture; with per-source schedules, each row also carries its source in
    ``--source_column``: the entry's name where the data have no such column (:func:`trl_prob.sources.load_mixture`)."""
    if not training_args.schedule_per_source:
        return get_dataset(dataset_args)
    from .sources import load_mixture

    return load_mixture(dataset_args, training_args.source_column)


def _check_rows(script_args, training_args, train_split, train_dataset, test_split, eval_dataset) -> None:
    """Rows the run cannot train on (or measure), before the trainer is built: one line naming split, row, field."""
    from .data import DataError, check_rows, locate_load_error

    source = f"--dataset_name {script_args.dataset_name}: " if script_args.dataset_name else ""
    for split, dataset in ((train_split, train_dataset), (test_split, eval_dataset)):
        try:
            check_rows(dataset, split=repr(split), text_field=training_args.dataset_text_field)
        except DataError as exc:
            where = locate_load_error(script_args.dataset_name) if script_args.dataset_name else None
            raise CLIError(f"{source}{exc}" + (f" ({where})" if where else "")) from exc


def _split(dataset, name: str, flag: str):
    if name not in dataset:
        raise CLIError(f"{flag} {name}: the dataset has no such split (it has: {', '.join(dataset)}).")
    return dataset[name]


def _tokenizer(model_args, training_args):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(
            model_args.model_name_or_path,
            revision=model_args.model_revision,
            trust_remote_code=training_args.trust_remote_code,
        )
    except Exception:  # a processor-only model: TRL loads its processor and checks the template itself
        return None


def rank_log_callback(directory: str):
    """``--rank_log_dir``: a callback appending each record this process logs to ``<directory>/rank<N>.jsonl``."""
    from transformers import TrainerCallback

    class RankLogCallback(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            os.makedirs(directory, exist_ok=True)
            with open(os.path.join(directory, f"rank{args.process_index}.jsonl"), "a") as f:
                f.write(json.dumps({"step": state.global_step, **(logs or {})}) + "\n")

    return RankLogCallback()


def end(trainer) -> None:
    """Leave the process group cleanly on every rank: barrier, then finish the trackers and destroy the group.

    Multi-process CPU runs on torch 2.13 + gloo were seen to finish training and saving, then hang one rank at
    interpreter exit (about one run in five); distributed workers also skip the interpreter's teardown (``os._exit``
    in :func:`worker_main`).
    """
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        trainer.accelerator.wait_for_everyone()
    # `Trainer.end` (transformers >= 5.18) is accelerator.end_training(): trackers' finish(), destroy_process_group()
    getattr(trainer, "end", trainer.accelerator.end_training)()


# --------------------------------------------------------------------------------------------- validation


def resolve_resume(value, output_dir: str):
    """``--resume_from_checkpoint``: ``true``/``last`` means the last checkpoint in ``output_dir``, else a path."""
    if value in (None, False) or str(value).lower() in ("false", "no", "0", "none"):
        return None
    from .checkpoints import checkpoint_problem, last_complete_checkpoint

    if value is True or str(value).lower() in ("true", "last", "yes", "1"):
        checkpoint, skipped = last_complete_checkpoint(output_dir)
        if checkpoint is None and skipped:
            incomplete = "; ".join(f"{os.path.basename(c)}: {problem}" for c, problem in skipped)
            raise CLIError(f"--resume_from_checkpoint {value}: no complete checkpoint in --output_dir {output_dir} "
                           f"({incomplete}); start afresh with --overwrite_output_dir.")  # fmt: skip
        if checkpoint is None:
            raise CLIError(f"--resume_from_checkpoint {value}: no checkpoint-* folder in --output_dir {output_dir}.")
        return True
    if not os.path.isdir(value):
        raise CLIError(f"--resume_from_checkpoint {value}: no such checkpoint directory.")
    problem = checkpoint_problem(value)
    if problem is not None:
        raise CLIError(f"--resume_from_checkpoint {value}: an incomplete checkpoint ({problem}).")
    return value


def check_output_dir(training_args, run_args: RunArguments):
    """Refuse to train over an earlier run unless asked to (overwrite) or continuing it (resume); returns the resume."""
    output_dir = training_args.output_dir
    resume = resolve_resume(training_args.resume_from_checkpoint, output_dir)
    names = sorted(os.listdir(output_dir)) if os.path.isdir(output_dir) else []
    found = [name for name in names if name.startswith("checkpoint-") or name in RUN_FILES]
    if found and not (run_args.overwrite_output_dir or resume):
        shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
        raise CLIError(
            f"--output_dir {output_dir} already holds a run ({shown}); pass --overwrite_output_dir to train over it, "
            "--resume_from_checkpoint true to continue it, or choose another --output_dir."
        )
    if resume:
        check_resumable(resume if isinstance(resume, str) else _last_checkpoint(output_dir), training_args)
    return resume


def _last_checkpoint(output_dir: str) -> str:
    from .checkpoints import last_complete_checkpoint

    return last_complete_checkpoint(output_dir)[0]


def check_resumable(checkpoint: str, training_args) -> None:
    """The checkpoint's schedule state is there and well-formed (or a restart of the schedule was asked for), and
    the run it belongs to has steps left."""
    from .checkpoints import finished_problem, saved_trainer_state
    from .trainer import CheckpointError, saved_schedule_state

    try:
        saved_schedule_state(checkpoint, training_args)
    except CheckpointError as exc:
        raise CLIError(str(exc)) from exc
    finished = finished_problem(checkpoint, saved_trainer_state(checkpoint), training_args.max_steps,
                                training_args.num_train_epochs)  # fmt: skip
    if finished is not None:
        raise CLIError(f"--resume_from_checkpoint: {finished}")


def _looks_local(path: str) -> bool:
    """A path rather than a Hub id (``org/name``) or a builder name (``json``)."""
    local_suffixes = (".json", ".jsonl", ".csv", ".parquet")
    return path.startswith(("/", ".", "~")) or path.count("/") > 1 or path.endswith(local_suffixes)


def check_model(model_args, training_args):
    """The model exists: a local directory or a Hub id whose config loads (from the cache when offline); its config."""
    from transformers import AutoConfig

    path = model_args.model_name_or_path
    if not path:
        raise CLIError("--model_name_or_path is required (a local directory or a Hugging Face Hub model id).")
    local = os.path.expanduser(path)
    if os.path.isfile(local) or path.lower().endswith(".gguf"):
        if path.lower().endswith(".gguf"):
            raise CLIError(f"--model_name_or_path {path}: a GGUF file; {GGUF_ADVICE}")
        raise CLIError(f"--model_name_or_path {path}: a file, not a model directory (config.json and weights).")
    if _looks_local(path) and not os.path.isdir(local):
        raise CLIError(f"--model_name_or_path {path}: no such directory.")
    if os.path.isdir(local):
        names = os.listdir(local)
        ggufs = sorted(name for name in names if name.lower().endswith(".gguf"))
        if "config.json" not in names and ggufs:
            raise CLIError(f"--model_name_or_path {path}: no config.json, only GGUF ({', '.join(ggufs)}); {GGUF_ADVICE}")
        if "config.json" in names and not any(name.endswith(WEIGHT_SUFFIXES) for name in names):
            raise CLIError(f"--model_name_or_path {path}: a config.json but no weights (model.safetensors, "
                           "pytorch_model.bin, or a sharded *.index.json); was the save interrupted?")  # fmt: skip
    try:
        return AutoConfig.from_pretrained(path, revision=model_args.model_revision,
                                          trust_remote_code=training_args.trust_remote_code)  # fmt: skip
    except (OSError, ValueError) as exc:
        where = "" if os.path.exists(path) else "no such local directory, and as a Hub id: "
        raise CLIError(f"--model_name_or_path {path}: {where}{_one_line(exc)}") from exc


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".index.json", ".pt", ".pth")
GGUF_ADVICE = (
    "llama.cpp's quantized format, which TRL does not train. Dequantize it into a transformers model directory first: "
    "AutoModelForCausalLM.from_pretrained(folder, gguf_file=name) and AutoTokenizer likewise, then save a plain "
    "LlamaForCausalLM copy (`python benchmarks/smollm2.py` does this for SmolLM2-135M-Instruct)."
)


def check_dataset(script_args, dataset_args) -> None:
    """A dataset is given and every named one exists locally or can be resolved (no data is downloaded)."""
    from datasets import load_dataset_builder

    if dataset_args.datasets:
        specs = [(d.path, d.name, d.data_dir, d.data_files) for d in dataset_args.datasets]
    elif script_args.dataset_name:
        specs = [(script_args.dataset_name, script_args.dataset_config, None, None)]
    else:
        raise CLIError(NO_DATASET)
    for path, name, data_dir, data_files in specs:
        if os.path.exists(os.path.expanduser(path)):
            continue
        if _looks_local(path):
            raise CLIError(f"dataset {path}: no such file or directory.")
        try:
            load_dataset_builder(path, name=name, data_dir=data_dir, data_files=data_files)
        except Exception as exc:  # datasets raises a zoo of types (DatasetNotFoundError, ConnectionError, ValueError)
            raise CLIError(f"dataset {path}: no such local path, and as a Hub dataset: {_one_line(exc)}") from exc


# --------------------------------------------------------------------------------------------- per-process entry


def run_worker(command: str, argv: Sequence[str]) -> int:
    """Run ``command`` on this process (what ``accelerate launch`` starts on every rank); YAML keys that only
    accelerate knows are ignored."""
    with bad_input():
        parsed = make_parser(command).parse_args_and_config(list(argv), fail_with_unknown_args=False)
    sft(*parsed)
    return 0


def worker_main(argv: Sequence[str] | None = None) -> int:
    """``python -m trl_prob.cli {sft,probe} ...``: one process of a (possibly distributed) run."""
    if argv is None and os.environ.get(HIDE_BITSANDBYTES_ENV) == "1":  # the launcher found no use for it
        hide_bitsandbytes()
    _quiet_known_warnings()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("sft", "probe"):
        print(f"usage: python -m {WORKER_MODULE} {{sft,probe}} [flags]  (per-process entry; see `{PROG} --help`)",
              file=sys.stderr)  # fmt: skip
        return 2
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    try:
        status = run_worker(argv[0], argv[1:])
    except CLIError as exc:
        if os.environ.get("TRL_PROB_TRACEBACK") == "1":
            raise
        rank = f"[rank {os.environ['RANK']}] " if distributed and "RANK" in os.environ else ""
        print(f"{PROG} {argv[0]}: error: {rank}{exc}", file=sys.stderr)
        status = exc.status
    if distributed:
        # The process group is gone; skip the interpreter's teardown, where gloo threads could still hang a rank.
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(status)
    return status


# --------------------------------------------------------------------------------------------- quiet start

HIDE_BITSANDBYTES_ENV = "TRL_PROB_HIDE_BITSANDBYTES"
# transformers' bitsandbytes optimizers (`--optim`): their names contain one of these.
BITSANDBYTES_OPTIM_MARKS = ("bnb", "8bit", "paged", "lion", "ademamix")


def needs_bitsandbytes(model_args, training_args, model_config=None) -> bool:
    """Whether the run asks for bitsandbytes: 4/8-bit loading, a quantization config, a pre-quantized model or a
    bitsandbytes optimizer. Errs on the side of yes."""
    init_kwargs = training_args.model_init_kwargs or {}
    optim = str(getattr(training_args.optim, "value", training_args.optim))
    return bool(
        model_args.load_in_4bit
        or model_args.load_in_8bit
        or init_kwargs.get("quantization_config") is not None
        or getattr(model_config, "quantization_config", None) is not None
        or any(mark in optim for mark in BITSANDBYTES_OPTIM_MARKS)
    )


def hide_bitsandbytes() -> None:
    """Make bitsandbytes look uninstalled to this process, for a run that does not use it.

    Why: ``transformers.trainer_utils`` imports peft whenever peft is installed, and peft 0.21's ``peft/helpers.py``
    imports bitsandbytes at module level; on CPUs with AVX512-BF16 bitsandbytes then warns that it cannot load a
    4-bit kernel ("Failed to load CPU gemm_4bit_forward ...") and costs ~1 s of import, on runs that load nothing in
    4 bits. No public switch turns either import off, so this uses Python's documented way to block one import:
    ``sys.modules[name] = None`` makes ``import bitsandbytes`` raise ImportError (peft falls back to ``bnb = None``) and
    ``importlib.util.find_spec`` return None (transformers and peft then see it as not installed). It is a hack on the
    process's view of the environment, not on their code; it is applied only by the command-line entry points, and
    only when :func:`needs_bitsandbytes` says no (the launcher never loads a model, so it always hides it).
    """
    if "bitsandbytes" not in sys.modules:
        sys.modules["bitsandbytes"] = None  # type: ignore[assignment]


def _single_process_defaults(namespace) -> None:
    """Pass accelerate the values it would default to for a one-process run, so that it does not print its
    "The following values were not passed to `accelerate launch`" block on every run. With an accelerate config
    file, several devices, or a multi-process flag, accelerate decides (and says what it decided) as before."""
    from accelerate.commands.config import default_config_file

    if namespace.config_file is not None or (os.path.isfile(default_config_file) and not namespace.cpu):
        return  # accelerate reads its defaults from the config file
    if namespace.multi_gpu or namespace.use_fsdp or namespace.use_deepspeed or namespace.tpu:
        return
    for name, value in (("num_machines", 1), ("mixed_precision", "no"), ("dynamo_backend", "no")):
        if getattr(namespace, name) is None:
            setattr(namespace, name, value)
    if namespace.num_processes is None and _accelerator_count() <= 1:
        namespace.num_processes = 1


def _cpu_threads(namespace, training_args) -> None:
    """A CPU run uses the machine's cores: ``accelerate launch`` sets ``OMP_NUM_THREADS=1`` for its processes unless
    told otherwise (it widens that only under its own ``--cpu`` flag), which leaves all but one core idle. An explicit
    ``--num_cpu_threads_per_process`` or ``OMP_NUM_THREADS`` wins."""
    import torch

    from .config import has_accelerator

    if namespace.num_cpu_threads_per_process is not None or "OMP_NUM_THREADS" in os.environ:
        return
    if has_accelerator() and not training_args.use_cpu:
        return
    local_processes = max(1, (namespace.num_processes or 1) // (namespace.num_machines or 1))
    namespace.num_cpu_threads_per_process = max(1, torch.get_num_threads() // local_processes)


def _accelerator_count() -> int:
    import torch

    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and accelerator.is_available():
        return accelerator.device_count()
    return torch.cuda.device_count()


# --------------------------------------------------------------------------------------------- launcher


def _without(argv: Sequence[str], subsequence: Sequence[str]) -> list[str]:
    """``argv`` with the ordered ``subsequence`` of it removed."""
    rest = iter(subsequence)
    pending, kept = next(rest, None), []
    for arg in argv:
        if arg == pending:
            pending = next(rest, None)
        else:
            kept.append(arg)
    return kept


def _refuse_unrecognized(command: str, args: Sequence[str]) -> None:
    if args:
        raise CLIError(f"unrecognized arguments: {' '.join(args)} (see `{PROG} {command} --help`)", status=2)


def launch(command: str, argv: Sequence[str], launch_command_fn: Callable | None = None) -> int:
    """``trl sft``'s launcher (``trl/cli/commands/training.py``): parse and validate here, then start
    ``accelerate launch [accelerate flags] --module trl_prob.cli COMMAND [training flags]``.

    TRL's ``launch_training_script`` does not fit: it runs a file from ``trl/scripts`` (not a module) and lets
    accelerate's parser exit with its full usage on a bad flag, so its three lines are written out here.
    """
    from accelerate.commands.launch import launch_command, launch_command_parser
    from trl.cli.accelerate_config import resolve_accelerate_config_argument

    argv = list(argv)
    with bad_input():
        *parsed, config_remaining, cli_remaining = make_parser(command).parse_args_and_config(
            argv, return_remaining_strings=True, separate_remaining_strings=True
        )
    script_args, training_args, model_args, dataset_args, run_args, *_ = parsed

    # What the training parser left must be accelerate's: YAML keys, then command-line flags.
    accelerate_parser = launch_command_parser()
    accelerate_options = {option for action in accelerate_parser._actions for option in action.option_strings}
    accelerate_options.add("--accelerate_config")
    unknown_keys = [key[2:] for key in config_remaining[::2] if key not in accelerate_options]
    if unknown_keys:
        raise CLIError(f"unknown key(s) in --config: {', '.join(unknown_keys)} (neither a training nor an accelerate "
                       "flag; check the spelling)", status=2)  # fmt: skip
    flags = [arg.split("=", 1)[0] for arg in cli_remaining if arg.startswith("-")]
    _refuse_unrecognized(command, [flag for flag in flags if flag not in accelerate_options])
    with bad_input(status=2):
        launch_args = resolve_accelerate_config_argument(config_remaining + cli_remaining)

    def error(message: str):  # accelerate's own usage line would name all its flags
        raise CLIError(f"accelerate launch: {message}", status=2)

    accelerate_parser.error = error
    namespace, extra = accelerate_parser.parse_known_args(
        [*launch_args, "--module", WORKER_MODULE, command, *_without(argv, cli_remaining)]
    )
    if namespace.training_script != WORKER_MODULE:  # a stray value took the module's place
        extra = extra or [namespace.training_script]
    _refuse_unrecognized(command, extra)

    model_config = check_model(model_args, training_args)
    check_dataset(script_args, dataset_args)
    if command == "sft":
        check_output_dir(training_args, run_args)
    _single_process_defaults(namespace)
    _cpu_threads(namespace, training_args)
    hide = "0" if needs_bitsandbytes(model_args, training_args, model_config) else "1"
    with _environ(HIDE_BITSANDBYTES_ENV, hide):  # accelerate launch starts the workers with this environment
        try:
            (launch_command_fn or launch_command)(namespace)
        except subprocess.CalledProcessError as exc:  # the worker already reported its error
            return exc.returncode or 1
        except Exception as exc:  # torch.distributed.elastic's ChildFailedError: the failing rank printed its error
            if type(exc).__name__ != "ChildFailedError":
                raise
            return 1
    return 0


@contextlib.contextmanager
def _environ(name: str, value: str):
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


# --------------------------------------------------------------------------------------------- console script


def _flag_table(fields: Sequence[dataclasses.Field]) -> str:
    lines = []
    for f in fields:
        lines.append(f"  --{f.name}")
        lines += textwrap.wrap(_help(f.name, f.metadata.get("help", "")), width=100, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines)


def _top_level_parser() -> argparse.ArgumentParser:
    from trl import SFTConfig

    from .config import ProbSFTConfig

    inherited = {f.name for f in dataclasses.fields(SFTConfig)}
    objective_fields = [f for f in dataclasses.fields(ProbSFTConfig) if f.name not in inherited]
    parser = argparse.ArgumentParser(
        prog=PROG,
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="TRL's SFT with the probability-based objectives of 'Beyond Log Likelihood' and schedules "
        "from NLL toward -p^k. `trl-prob sft` takes every `trl sft` flag plus the ones below.",
        epilog=f"Objective and schedule flags (sft and probe):\n{_flag_table(objective_fields)}\n\n"
        f"Run flags (sft):\n{_flag_table(dataclasses.fields(RunArguments))}\n\n{ACCELERATE_EPILOG}\n\n"
        f"Example:\n  {PROG} sft --config recipes/quickstart.yaml\n"
        f"  {PROG} sft --config recipes/math/qwen2.5-math-1.5b-full.yaml --accelerate_config multi_gpu "
        "--num_processes 8",
    )
    commands = parser.add_subparsers(help="available commands", dest="command")
    commands.add_parser("sft", add_help=False, help="Train with a probability-based objective (every `trl sft` flag "
                        "plus ours)")  # fmt: skip
    commands.add_parser("probe", add_help=False, help="Measure the model's target-token probabilities on the "
                        "training data")  # fmt: skip
    plot = commands.add_parser("plot", help=PLOT_HELP, description=PLOT_HELP)
    plot.add_argument("run_dir", metavar="RUN_DIR",
                      help="A run's --output_dir, one of its checkpoints, or a trainer_state.json.")  # fmt: skip
    plot.add_argument("--output", metavar="PNG", help="Where to write the plot (default: inside RUN_DIR).")
    return parser


PLOT_HELP = "Plot a run's loss, token probability and objective lambda"


def _quiet_known_warnings() -> None:
    # TRL's SFTConfig defaults `gradient_checkpointing=True`, which transformers 5 reports as a deprecated alias of
    # `activation_checkpointing` on every run: noise the user did not cause and cannot silence from the command line.
    warnings.filterwarnings("ignore", message="`gradient_checkpointing", category=FutureWarning)


def main(argv: Sequence[str] | None = None) -> int:
    """The ``trl-prob`` console script."""
    if argv is None:  # this process only parses, validates and launches: it never needs bitsandbytes
        hide_bitsandbytes()
    _quiet_known_warnings()
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _top_level_parser()
    args, _ = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        if args.command != "plot":
            return launch(args.command, argv[argv.index(args.command) + 1 :])
        from .plots import plot_training

        if not os.path.exists(args.run_dir):
            raise CLIError(f"{args.run_dir}: no such run directory.")
        with bad_input():
            print(plot_training(args.run_dir, output_png=args.output))
        return 0
    except CLIError as exc:
        if os.environ.get("TRL_PROB_TRACEBACK") == "1":
            raise
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return exc.status


if __name__ == "__main__":
    sys.exit(worker_main())
