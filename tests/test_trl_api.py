"""The TRL / accelerate / transformers / datasets API that ``trl_prob/cli.py`` and ``trl_prob/preflight.py`` call,
pinned: each name imports from its public path and takes the parameters we pass, and the few behaviours the launcher
builds on hold. A release that moves, renames or changes one fails here instead of in a user's run. The two files are
read to check that they import nothing private (but the one TRL function named in PRIVATE) and nothing unpinned."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import inspect
import os
from dataclasses import dataclass

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "trl_prob")
SOURCES = [os.path.join(PACKAGE, name) for name in ("cli.py", "preflight.py")]
LIBRARIES = ("trl", "accelerate", "transformers", "datasets")

# (module, attribute) -> the parameters cli.py passes (by keyword, or what its positional argument means).
CALLABLES = {
    ("trl", "TrlParser"): ("dataclass_types",),  # plus argparse keywords (prog, epilog, ...) through **kwargs
    ("trl", "TrlParser.parse_args_and_config"): (
        "args", "return_remaining_strings", "fail_with_unknown_args", "separate_remaining_strings"),  # fmt: skip
    ("trl", "get_dataset"): ("mixture_config",),
    ("trl", "get_peft_config"): ("model_args",),
    ("trl", "get_quantization_config"): ("model_args",),
    ("trl", "SFTTrainer"): ("model", "args", "train_dataset", "eval_dataset", "quantization_config", "peft_config",
                            "callbacks"),  # fmt: skip
    ("trl", "SFTTrainer.train"): ("resume_from_checkpoint",),
    ("trl", "SFTTrainer.save_state"): (),
    ("trl", "SFTTrainer.save_model"): ("output_dir",),
    ("trl", "SFTTrainer.push_to_hub"): (),  # dataset_name= goes through **kwargs to create_model_card
    ("trl", "SFTTrainer.create_model_card"): ("dataset_name",),
    ("trl.cli.accelerate_config", "resolve_accelerate_config_argument"): ("launch_args",),
    ("trl.cli.commands.base", "Command"): ("name", "help_text"),
    ("trl.cli.commands.base", "Command.register"): ("subparsers",),
    ("trl.cli.commands.base", "Command.run"): ("args", "context"),
    ("trl.cli.commands.base", "CommandContext"): ("argv",),
    ("trl.cli.commands.base", "CommandContext.argv_after"): ("token",),
    ("trl.cli.commands.training", "_subtract_subsequence"): ("lst", "subseq"),
    ("accelerate.commands.launch", "launch_command_parser"): ("subparsers",),
    ("accelerate.commands.utils", "CustomArgumentParser"): (),  # argparse's keywords, through add_subparsers
    ("accelerate.commands.launch", "launch_command"): ("args",),
    ("accelerate", "Accelerator.wait_for_everyone"): (),
    ("accelerate", "Accelerator.end_training"): (),  # what Trainer.end (transformers >= 5.18) calls
    ("transformers", "AutoConfig.from_pretrained"): ("pretrained_model_name_or_path",),  # revision=, ... in **kwargs
    ("transformers", "AutoTokenizer.from_pretrained"): ("pretrained_model_name_or_path",),
    ("transformers", "TrainerCallback.on_log"): ("args", "state", "control"),
    ("transformers.trainer_utils", "get_last_checkpoint"): ("folder",),
    ("transformers.utils", "is_torch_bf16_gpu_available"): (),
    ("transformers.utils", "is_torch_xla_available"): (),
    ("datasets", "load_dataset"): ("path", "name", "streaming"),
    ("datasets", "load_dataset_builder"): ("path", "name", "data_dir", "data_files"),
}
# The private TRL names imported, and why: TRL's launcher splits its argv with this function; we call the same one.
PRIVATE = {("trl.cli.commands.training", "_subtract_subsequence")}
# Dataclasses whose fields cli.py reads.
FIELDS = {
    ("trl", "ScriptArguments"): ("dataset_name", "dataset_config", "dataset_streaming", "dataset_train_split",
                                 "dataset_test_split"),  # fmt: skip
    ("trl", "ModelConfig"): ("model_name_or_path", "model_revision", "attn_implementation", "dtype"),
    ("trl", "DatasetMixtureConfig"): ("datasets",),
    ("trl", "SFTConfig"): ("output_dir", "model_init_kwargs", "trust_remote_code", "eval_strategy",
                           "resume_from_checkpoint", "push_to_hub", "bf16"),  # fmt: skip
}

# Module-level values cli.py reads, and their type.
CONSTANTS = {
    ("accelerate.commands.config", "default_config_file"): str,  # accelerate's own config file: it decides defaults
}


def resolve(module: str, attribute: str):
    value = importlib.import_module(module)
    for part in attribute.split("."):
        value = getattr(value, part)
    return value


@pytest.mark.parametrize("name", CALLABLES, ids=lambda name: ".".join(name))
def test_callable_takes_what_we_pass(name):
    parameters = inspect.signature(resolve(*name)).parameters
    missing = [p for p in CALLABLES[name] if p not in parameters]
    assert not missing, f"{'.'.join(name)}{inspect.signature(resolve(*name))} has no {missing}"


@pytest.mark.parametrize("name", FIELDS, ids=lambda name: ".".join(name))
def test_dataclass_has_the_fields_we_read(name):
    fields = {f.name for f in dataclasses.fields(resolve(*name))}
    assert not set(FIELDS[name]) - fields


def test_cli_imports_only_pinned_public_names():
    imported = set()
    for node in (node for source in SOURCES for node in ast.walk(ast.parse(open(source).read()))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in LIBRARIES:
            imported |= {(node.module, alias.name) for alias in node.names}
        elif isinstance(node, ast.Import):
            assert not [a.name for a in node.names if a.name.split(".")[0] in LIBRARIES], "import names from modules"
    private = [f"{m}.{n}" for m, n in imported - PRIVATE if any(part.startswith("_") for part in [*m.split("."), n])]
    assert not private, f"private imports: {private}"
    pinned = {(module, attribute.split(".")[0]) for module, attribute in [*CALLABLES, *FIELDS, *CONSTANTS]}
    assert imported - pinned == set(), "pin these in CALLABLES or FIELDS"


@pytest.mark.parametrize("name", CONSTANTS, ids=lambda name: ".".join(name))
def test_pinned_constant_exists_with_its_type(name):
    assert isinstance(resolve(*name), CONSTANTS[name])


def test_mixture_entries_carry_what_check_dataset_reads():
    from trl import DatasetMixtureConfig

    (entry,) = DatasetMixtureConfig(datasets=[{"path": "json", "data_files": "a.jsonl"}]).datasets
    assert (entry.path, entry.name, entry.data_dir, entry.data_files) == ("json", None, None, "a.jsonl")


def test_trl_parser_separates_what_it_does_not_know(tmp_path):
    """The launcher's split: unknown YAML keys come back as ``--key value`` pairs, unknown command-line strings in
    order; the YAML overrides a parser default (the probe's bf16), the command line overrides the YAML."""
    from trl import TrlParser

    @dataclass
    class Args:
        lr: float = 1.0
        bf16: bool = True

    config = tmp_path / "c.yaml"
    config.write_text("lr: 2.0\nnum_processes: 8\n")
    parser = TrlParser(Args, prog="x")
    parser.set_defaults(bf16=False, lr=0.5)
    args, config_remaining, cli_remaining = parser.parse_args_and_config(
        ["--config", str(config), "--multi_gpu", "--bf16", "true", "--main_process_port", "1"],
        return_remaining_strings=True,
        separate_remaining_strings=True,
    )
    assert (args.lr, args.bf16) == (2.0, True)
    assert config_remaining == ["--num_processes", "8"]
    assert cli_remaining == ["--multi_gpu", "--main_process_port", "1"]
    (args,) = parser.parse_args_and_config(["--config", str(config)], fail_with_unknown_args=False)
    assert (args.lr, args.bf16) == (2.0, False)


def test_accelerate_config_names_resolve_to_config_file():
    from trl.cli.accelerate_config import resolve_accelerate_config_argument

    resolved = resolve_accelerate_config_argument(["--num_processes", "2", "--accelerate_config", "zero3"])
    config_file, path, *rest = resolved
    assert config_file == "--config_file" and path.endswith("zero3.yaml") and os.path.isfile(path)
    assert rest == ["--num_processes", "2"]
    assert resolve_accelerate_config_argument(["--multi_gpu"]) == ["--multi_gpu"]


def test_accelerate_launch_parses_a_module_entry():
    from accelerate.commands.launch import launch_command_parser

    parser = launch_command_parser()
    assert isinstance(parser, argparse.ArgumentParser)
    namespace = parser.parse_args(["--num_processes", "2", "--module", "trl_prob.cli", "sft", "--objective", "p"])
    assert namespace.module is True and namespace.num_processes == 2
    assert (namespace.training_script, namespace.training_script_args) == ("trl_prob.cli", ["sft", "--objective", "p"])


def test_trl_subtracts_the_accelerate_flags_in_order():
    """TRL's own split of the launcher's argv: the remaining (accelerate) strings removed in order, the rest kept."""
    from trl.cli.commands.training import _subtract_subsequence

    argv = ["--config", "a.yaml", "--num_processes", "2", "--lr", "2", "--multi_gpu", "--x", "2"]
    assert _subtract_subsequence(argv, ["--num_processes", "2", "--multi_gpu"]) == ["--config", "a.yaml", "--lr", "2",
                                                                                    "--x", "2"]  # fmt: skip


def test_trl_commands_run_with_the_argv_after_their_name():
    from trl.cli.commands.base import Command, CommandContext

    assert CommandContext(argv=["--v", "sft", "--lr", "1"]).argv_after("sft") == ["--lr", "1"]
    assert {"register", "run"} <= Command.__abstractmethods__


def test_accelerate_launch_parser_built_as_a_subcommand_uses_our_parser_class():
    """The launcher's one-line errors: accelerate's parser, built on a subparsers action (as `accelerate launch` is),
    is of the class we give and parses a module entry as the plain one does."""
    from accelerate.commands.launch import launch_command_parser
    from accelerate.commands.utils import CustomArgumentParser

    class Parser(CustomArgumentParser):
        def error(self, message):
            raise RuntimeError(message)

    parser = launch_command_parser(argparse.ArgumentParser().add_subparsers(parser_class=Parser))
    assert isinstance(parser, Parser)
    namespace, unknown = parser.parse_known_args(["--num-processes", "2", "--nope", "--module", "m", "sft", "--lr", "1"])
    assert (namespace.num_processes, namespace.module, unknown) == (2, True, ["--nope"])
    assert (namespace.training_script, namespace.training_script_args) == ("m", ["sft", "--lr", "1"])
    with pytest.raises(RuntimeError, match="num_processes"):
        parser.parse_known_args(["--num_processes", "two", "m"])
