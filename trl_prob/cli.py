"""``trl-prob``: TRL's ``trl sft`` training [`ProbSFTTrainer`], with trl-prob's flags.

``trl-prob sft`` takes every ``trl sft`` flag (``--config recipe.yaml`` included) plus [`ProbSFTConfig`]'s; flags the
training parser does not know go to ``accelerate launch``. ``trl-prob probe`` builds the trainer ``sft`` would build
and measures the model instead of training it; ``trl-prob plot RUN_DIR`` plots a run. The shape is TRL's: :func:`main`
is ``trl/cli/main.py`` over TRL's ``Command`` classes, :func:`launch` is ``TrainingCommand.run`` for a module instead of
a file of ``trl/scripts``, :func:`sft` and :func:`make_parser` are ``trl/scripts/sft.py``'s. ``python -m trl_prob.cli
{sft,probe}`` is the per-process entry (for ``accelerate launch -m``, ``torchrun -m``, SLURM); the checks made before
anything starts are in :mod:`trl_prob.preflight`.
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

from .arguments import ExperimentalRunArguments, ProbeArguments, RunArguments  # noqa: F401  (the command's own flags)
from .preflight import CLIError, bad_input, check_probe_inputs, check_run, load_data

PROG = "trl-prob"
WORKER_MODULE = "trl_prob.cli"


ACCELERATE_EPILOG = """\
Flags not listed above go to `accelerate launch`, as with `trl sft`: --num_processes N, --multi_gpu, --num_machines,
--machine_rank, --main_process_ip, --main_process_port, --mixed_precision, --config_file PATH, and
--accelerate_config NAME|PATH (a file, or one of TRL's shipped configs: multi_gpu, fsdp2, zero3, ...).
See `accelerate launch --help`. A recipe's YAML may also hold accelerate keys; unknown keys are an error."""
DESCRIPTIONS = {
    "sft": "Supervised fine-tuning with TRL's SFTTrainer, training a probability-based objective on a schedule.",
    "probe": "Measure the model's target-token probabilities on the training data (where it stands on the capability "
    "continuum) with the trainer `sft` would build; writes probe.json and a plot to --output_dir.",
}


def wants_experimental(argv: Sequence[str]) -> bool:
    """``--experimental`` on the command line (``--experimental``, ``--experimental true``) or ``experimental: true``
    in the ``--config`` YAML: the parser then knows trl_prob.experimental's flags."""
    argv = list(argv)
    for i, flag in enumerate(argv):
        if flag == "--experimental":
            return i + 1 >= len(argv) or argv[i + 1].startswith("--") or argv[i + 1].lower() in ("true", "1", "yes")
        if flag.startswith("--experimental="):
            return flag.split("=", 1)[1].lower() in ("true", "1", "yes")
    if "--config" in argv and argv.index("--config") + 1 < len(argv):
        import yaml

        try:
            with open(argv[argv.index("--config") + 1]) as f:
                loaded = yaml.safe_load(f)
        except (OSError, yaml.YAMLError):
            return False  # the parser reports the file itself
        return isinstance(loaded, dict) and loaded.get("experimental") is True
    return False


def make_parser(command: str = "sft", prog: str | None = None, experimental: bool = False):
    """``trl/scripts/sft.py``'s parser with [`ProbSFTConfig`] for ``SFTConfig``, plus the command's own flags;
    ``experimental``: with :class:`trl_prob.experimental.ExperimentalSFTConfig` and its run flags."""
    from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available
    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, TrlParser

    from .config import ProbSFTConfig
    from .objectives import objective_help

    run_arguments = RunArguments
    if experimental:
        from .experimental import ExperimentalSFTConfig as ProbSFTConfig  # noqa: N814  (registers the research rows)

        run_arguments = ExperimentalRunArguments

    class Parser(TrlParser):
        def error(self, message: str):  # argparse would print a usage line naming every one of ~250 flags
            raise CLIError(f"{message} (see `{self.prog} --help`)", status=2)

    class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
        """Defaults in the flag help (as HfArgumentParser does) and a hand-wrapped epilog."""

    dataclass_types = (ScriptArguments, ProbSFTConfig, ModelConfig, DatasetMixtureConfig, run_arguments)
    parser = Parser(dataclass_types + ((ProbeArguments,) if command == "probe" else ()), prog=prog or f"{PROG} {command}",
                    description=DESCRIPTIONS[command], epilog=ACCELERATE_EPILOG, formatter_class=Formatter,
                    allow_abbrev=False)  # fmt: skip
    # The probe trains nothing: without a bf16 device it measures in float32 on what there is (SFTConfig's bf16
    # default would be refused there). An explicit --bf16 (flag or YAML) still wins.
    if command == "probe" and not (is_torch_bf16_gpu_available() or is_torch_xla_available()):
        parser.set_defaults(bf16=False)
    (objective,) = [f for f in dataclasses.fields(ProbSFTConfig) if f.name == "objective"]
    if objective.metadata.get("help") != objective_help():  # a family registered since ProbSFTConfig was defined
        group = parser.add_argument_group("objective", conflict_handler="resolve")  # replaces the flag, same dest
        group.add_argument("--objective", type=str, default=objective.default, help=objective_help())
    return parser


def parse(command: str, argv: Sequence[str], **kwargs):
    """``make_parser(command).parse_args_and_config(argv, **kwargs)``, bad input as one [`CLIError`] line."""
    with bad_input(), warnings.catch_warnings():
        # TRL's SFTConfig defaults `gradient_checkpointing=True`, which transformers 5 reports as a deprecated alias
        # of `activation_checkpointing` whenever the config is built: noise the user did not cause.
        warnings.filterwarnings("ignore", message="`gradient_checkpointing", category=FutureWarning)
        return make_parser(command, experimental=wants_experimental(argv)).parse_args_and_config(list(argv), **kwargs)


# --------------------------------------------------------------------------------------------- the script


def sft(script_args, training_args, model_args, dataset_args, run_args, probe_args=None, resume=None) -> None:
    """``trl/scripts/sft.py``'s ``main`` with [`ProbSFTTrainer`], after :func:`trl_prob.preflight.check_run` (whose
    ``resume`` it takes); given ``probe_args`` (``trl-prob probe``), the same trainer is measured instead of trained."""
    from trl import get_peft_config, get_quantization_config

    from .checkpoints import CheckpointError
    from .trainer import ProbSFTTrainer

    model_init_kwargs = dict(revision=model_args.model_revision, trust_remote_code=training_args.trust_remote_code,
                             attn_implementation=model_args.attn_implementation, dtype=model_args.dtype)  # fmt: skip
    model_init_kwargs.update(training_args.model_init_kwargs or {})
    training_args.model_init_kwargs = model_init_kwargs

    summary = probe_args is None and run_args.summary
    need_eval = training_args.eval_strategy != "no" or summary
    train_dataset, eval_dataset, _, test_split = load_data(script_args, training_args, model_args, dataset_args,
                                                           need_eval)  # fmt: skip
    check_probe_inputs(train_dataset, model_args, training_args)
    with bad_input():
        trainer = ProbSFTTrainer(model=model_args.model_name_or_path, args=training_args, train_dataset=train_dataset,
                                 eval_dataset=eval_dataset, quantization_config=get_quantization_config(model_args),
                                 peft_config=get_peft_config(model_args),
                                 callbacks=[rank_log_callback(run_args.rank_log_dir)]
                                 if getattr(run_args, "rank_log_dir", None) else None)  # fmt: skip
        if summary:
            from .summary import RunSummary

            summary = RunSummary(trainer, num_samples=getattr(run_args, "summary_samples", 200), print_at_end=False,
                                 split_name=f"{test_split!r}")  # fmt: skip
            trainer.add_callback(summary)

    if probe_args is not None:
        from .probe import run_probe

        run_probe(trainer, num_samples=probe_args.num_samples, output_dir=training_args.output_dir,
                  batch_size=probe_args.batch_size, source_dataset=train_dataset)  # fmt: skip
    else:
        if getattr(training_args, "objective_auto", False):
            from .auto import describe

            trainer.accelerator.print(f"trl-prob: {describe()}")  # what `auto` trains, before step 1
        try:
            trainer.train(resume_from_checkpoint=resume)
        except CheckpointError as exc:  # train()'s resume plan, made before step 1
            raise CLIError(str(exc)) from exc
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
    """Leave the process group cleanly on every rank: a barrier (multi-process CPU runs on torch 2.13 + gloo were seen
    to hang a rank at exit without it), then ``Trainer.end`` (transformers >= 5.18: the trackers' finish() and
    destroy_process_group()), or what it does where it is missing."""
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        trainer.accelerator.wait_for_everyone()
    getattr(trainer, "end", trainer.accelerator.end_training)()


# --------------------------------------------------------------------------------------------- bitsandbytes

# bitsandbytes logs this on import on CPUs with AVX512-BF16 when the optional `kernels` package is absent. peft imports
# bitsandbytes at module level and transformers imports peft for every run, so every run would show it.
BNB_KERNEL_LOGGER, BNB_KERNEL_WARNING = "bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward"
# Offline, the `kernels` package says first that it skips the trust check of that same bitsandbytes kernel.
KERNELS_LOGGER, KERNELS_NOTICE = "kernels._internals.hf_hub", "kernels-community/quantization-bitsandbytes"
# transformers' bitsandbytes optimizers (`--optim`): their names contain one of these.
BITSANDBYTES_OPTIM_MARKS = ("bnb", "8bit", "paged", "lion", "ademamix")


def needs_bitsandbytes(model_args, training_args, model_config=None) -> bool:
    """Whether the run asks for bitsandbytes: 4/8-bit loading, a quantization config, a pre-quantized model or a
    bitsandbytes optimizer. Errs on the side of yes."""
    optim = str(getattr(training_args.optim, "value", training_args.optim))
    return bool(
        model_args.load_in_4bit
        or model_args.load_in_8bit
        or (training_args.model_init_kwargs or {}).get("quantization_config") is not None
        or getattr(model_config, "quantization_config", None) is not None
        or any(mark in optim for mark in BITSANDBYTES_OPTIM_MARKS)
    )


class HeldKernelWarning(logging.Filter):
    """``with HeldKernelWarning() as held``: bitsandbytes' kernel warning held back on its own logger;
    ``held.release()`` logs it, for a run that uses bitsandbytes."""

    def __enter__(self):
        self.held = []
        for name in (BNB_KERNEL_LOGGER, KERNELS_LOGGER):
            logging.getLogger(name).addFilter(self)
        return self

    def __exit__(self, *exc_info):
        for name in (BNB_KERNEL_LOGGER, KERNELS_LOGGER):
            logging.getLogger(name).removeFilter(self)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith(BNB_KERNEL_WARNING) or (record.name == KERNELS_LOGGER and KERNELS_NOTICE in message):
            self.held.append(record)
            return False
        return True

    def release(self) -> None:
        self.__exit__()
        for record in self.held:
            logging.getLogger(record.name).handle(record)


# --------------------------------------------------------------------------------------------- per-process entry


def run_worker(command: str, argv: Sequence[str], held: HeldKernelWarning | None = None) -> int:
    """Run ``command`` on this process (what ``accelerate launch`` starts on every rank); YAML keys that only
    accelerate knows are ignored."""
    parsed = parse(command, argv, fail_with_unknown_args=False)
    # PEFT reads transformers 5's deprecated `is_gradient_checkpointing` when it wraps a model: noise the user did not
    # cause, on every LoRA run
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    model_config, resume = check_run(command, *parsed[:5], in_worker=True)
    if held is not None and needs_bitsandbytes(parsed[2], parsed[1], model_config):
        held.release()
    sft(*parsed, resume=resume)
    return 0


def worker_main(argv: Sequence[str] | None = None) -> int:
    """``python -m trl_prob.cli {sft,probe} ...``: one process of a (possibly distributed) run."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("sft", "probe"):
        print(f"usage: python -m {WORKER_MODULE} {{sft,probe}} [flags]  (per-process entry; see `{PROG} --help`)",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        with HeldKernelWarning() as held:
            return run_worker(argv[0], argv[1:], held)
    except CLIError as exc:
        if os.environ.get("TRL_PROB_TRACEBACK") == "1":
            raise
        rank = f"[rank {os.environ['RANK']}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ else ""
        print(f"{PROG} {argv[0]}: error: {rank}{exc}", file=sys.stderr)
        return exc.status


# --------------------------------------------------------------------------------------------- launcher


def _accelerate_parser():
    """``accelerate launch``'s parser, built as accelerate's own CLI builds it (a subcommand), of a parser class whose
    errors are one [`CLIError`] line instead of accelerate's usage naming all its flags."""
    from accelerate.commands.launch import launch_command_parser
    from accelerate.commands.utils import CustomArgumentParser

    class Parser(CustomArgumentParser):
        def error(self, message: str):
            raise CLIError(f"accelerate launch: {message}", status=2)

    return launch_command_parser(argparse.ArgumentParser(prog=PROG).add_subparsers(parser_class=Parser))


def subtract_subsequence(items: Sequence[str], subsequence: Sequence[str]) -> list[str]:
    """``items`` with the ordered ``subsequence`` removed (the first match of each element, in order): how TRL's
    launcher splits its argv (``trl.cli.commands.training._subtract_subsequence``, a private function, copied here;
    tests/test_trl_api.py compares the two)."""
    rest = iter(subsequence)
    current = next(rest, None)
    kept = []
    for item in items:
        if current is not None and item == current:
            current = next(rest, None)
        else:
            kept.append(item)
    return kept


def launch(command: str, argv: Sequence[str], launch_command_fn: Callable | None = None) -> int:
    """``TrainingCommand.run`` (``trl/cli/commands/training.py``): parse, split the flags as TRL does, check
    (:func:`trl_prob.preflight.check_run`), then ``accelerate launch [accelerate flags] --module trl_prob.cli COMMAND
    [training flags]``. TRL's ``launch_training_script`` runs a file of ``trl/scripts``, not a module, and lets
    accelerate's parser exit with its full usage on a bad flag: its two calls are made here instead."""
    from accelerate.commands.launch import launch_command
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from trl.cli.accelerate_config import resolve_accelerate_config_argument

    argv = list(argv)
    *parsed, config_remaining, cli_remaining = parse(command, argv, return_remaining_strings=True,
                                                     separate_remaining_strings=True)  # fmt: skip
    with bad_input(status=2):
        launch_args = resolve_accelerate_config_argument(config_remaining + cli_remaining)
    script = ["--module", WORKER_MODULE, command, *subtract_subsequence(argv, cli_remaining)]
    namespace, unknown = _accelerate_parser().parse_known_args([*launch_args, *script])
    if namespace.training_script != WORKER_MODULE and not unknown:  # a stray value took the module's place
        unknown = [namespace.training_script]
    in_config = [flag[2:] for flag in unknown if flag in config_remaining[::2]]
    if in_config:
        raise CLIError(f"unknown key(s) in --config: {', '.join(in_config)} (neither a training nor an accelerate "
                       "flag; check the spelling)", status=2)  # fmt: skip
    if unknown:
        raise CLIError(f"unrecognized arguments: {' '.join(unknown)} (see `{PROG} {command} --help`)", status=2)

    check_run(command, *parsed[:5])
    _single_process_defaults(namespace)
    _cpu_threads(namespace, parsed[1])
    try:
        (launch_command_fn or launch_command)(namespace)
    except subprocess.CalledProcessError as exc:  # the worker already reported its error
        return exc.returncode or 1
    except ChildFailedError:  # torch.distributed.elastic: the failing rank printed its error
        return 1
    return 0


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


# --------------------------------------------------------------------------------------------- console script


def _commands():
    """TRL's ``Command`` classes (``trl/cli/commands``): ``sft`` and ``probe`` launch like TRL's training commands."""
    from trl.cli.commands.base import Command

    class LaunchCommand(Command):
        def register(self, subparsers) -> None:
            subparsers.add_parser(self.name, help=self.help_text, add_help=False)

        def run(self, args, context) -> int:
            return launch(self.name, context.argv_after(self.name))

    class PlotCommand(Command):
        def register(self, subparsers) -> None:
            plot = subparsers.add_parser(self.name, help=self.help_text, description=self.help_text)
            plot.add_argument("run_dir", metavar="RUN_DIR",
                              help="A run's --output_dir, one of its checkpoints, or a trainer_state.json.")  # fmt: skip
            plot.add_argument("--output", metavar="PNG", help="Where to write the plot (default: inside RUN_DIR).")

        def run(self, args, context) -> int:
            from .plots import plot_training

            if not os.path.exists(args.run_dir):
                raise CLIError(f"{args.run_dir}: no such run directory.")
            with bad_input():
                print(plot_training(args.run_dir, output_png=args.output))
            return 0

    return [LaunchCommand("sft", "Train with a probability-based objective (every `trl sft` flag plus ours)"),
            LaunchCommand("probe", "Measure the model's target-token probabilities on the training data"),
            PlotCommand("plot", "Plot a run's loss, token probability and objective lambda")]  # fmt: skip


def _flag_table(fields: Sequence[dataclasses.Field]) -> str:
    from .objectives import objective_help

    lines = []
    for f in fields:
        text = objective_help() if f.name == "objective" else f.metadata.get("help", "")
        lines += [f"  --{f.name}", *textwrap.wrap(text, width=100, initial_indent=" " * 6, subsequent_indent=" " * 6)]
    return "\n".join(lines)


def _build_parser(commands) -> argparse.ArgumentParser:
    """``trl/cli/main.py``'s parser, with our flags in the epilog."""
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
    subparsers = parser.add_subparsers(help="available commands", dest="command")
    for command in commands:
        command.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The ``trl-prob`` console script: ``trl/cli/main.py``'s ``main``, bad input as one line on stderr."""
    from trl.cli.commands.base import CommandContext

    with HeldKernelWarning():  # this process only parses, checks and launches: it never uses bitsandbytes
        commands = {command.name: command for command in _commands()}
        parser = _build_parser(commands.values())
        argv = list(sys.argv[1:] if argv is None else argv)
        args, _ = parser.parse_known_args(argv)
        if args.command is None:
            parser.print_help()
            return 0
        try:
            return commands[args.command].run(args, CommandContext(argv=argv))
        except CLIError as exc:
            if os.environ.get("TRL_PROB_TRACEBACK") == "1":
                raise
            print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
            return exc.status


if __name__ == "__main__":
    sys.exit(worker_main())
