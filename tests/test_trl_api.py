"""The TRL / accelerate / transformers / datasets API that ``trl_prob/cli.py`` and ``trl_prob/preflight.py`` call,
pinned: each name imports from its public path and takes the parameters we pass, and the few behaviours the launcher
builds on hold. A release that moves, renames or changes one fails here instead of in a user's run. The two files are
read to check that they import nothing private and nothing unpinned; every file of trl_prob/ is read to check that it
touches no private name of TRL, transformers, PEFT or accelerate but the few in ALLOWED_PRIVATE, each with its reason."""

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
    private = [f"{m}.{n}" for m, n in imported if any(part.startswith("_") for part in [*m.split("."), n])]
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


@pytest.mark.parametrize("argv, remaining", [
    (["--config", "a.yaml", "--num_processes", "2", "--lr", "2", "--multi_gpu", "--x", "2"],
     ["--num_processes", "2", "--multi_gpu"]),
    ([], []),
    (["--lr", "1"], []),
    (["--multi_gpu"], ["--multi_gpu"]),
    (["2", "--a", "2", "--b", "2"], ["--a", "2"]),  # the first "2" stays: it precedes --a
    (["--a", "--a", "--a"], ["--a", "--a"]),
    (["--a", "1", "--b"], ["--b", "--a"]),  # out of order: only --b's ... nothing after it matches --a
    (["x", "y"], ["z"]),  # an element that never occurs: nothing more is removed
])  # fmt: skip
def test_local_subtract_subsequence_matches_trls(argv, remaining):
    """trl_prob.cli splits the launcher's argv as TRL's launcher does, with a copy of TRL's private
    ``_subtract_subsequence``: the two agree (the remaining strings removed in order, the rest kept)."""
    from trl.cli.commands.training import _subtract_subsequence

    from trl_prob.cli import subtract_subsequence

    assert subtract_subsequence(argv, remaining) == _subtract_subsequence(list(argv), list(remaining))


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


# ------------------------------------------------------------------------------------------ private names, all of trl_prob

# The private names of TRL / transformers / PEFT / accelerate that trl_prob/ may touch: (file under trl_prob/, name) ->
# why no public name or small copy does. Every other private name of theirs found in trl_prob/ fails the scan, and an
# entry no longer found fails too (the list shrinks with the code).
ALLOWED_PRIVATE = {
    ("checkpoints.py", "_total_train_tokens"): "TRL's token counter (logged as num_tokens) lives only there: read to "
    "save it in a checkpoint, set to continue it on resume; no public name reads or sets it (checkpoints.py says more)",
    ("trainer.py", "_set_signature_columns_if_needed"): "the one transformers hook that decides which dataset columns "
    "remove_unused_columns keeps; per-source runs add their source id column (trainer.py says why no public way does)",
    ("trainer.py", "_signature_columns"): "the list that hook fills (same reason)",
    ("trainer.py", "_tag_names"): "the model-card tags transformers/TRL read from the trainer class; TRL's own "
    "trainers set them the same way and no argument takes them",
}
PRIVATE_LIBRARIES = ("trl", "transformers", "peft", "accelerate")


def _library_private_names() -> set[str]:
    """Every ``_name`` (not dunder) that occurs in the source of the four libraries (transformers' model files aside:
    thousands of architectures, none of which trl_prob names)."""
    import importlib.util
    import re

    names, word = set(), re.compile(r"\b_[A-Za-z]\w*")
    for library in PRIVATE_LIBRARIES:
        root = os.path.dirname(importlib.util.find_spec(library).origin)
        for folder, _, files in os.walk(root):
            if library == "transformers" and f"{os.sep}models{os.sep}" in f"{folder}{os.sep}":
                continue
            for name in files:
                if name.endswith(".py"):
                    with open(os.path.join(folder, name), encoding="utf-8", errors="replace") as f:
                        names.update(word.findall(f.read()))
    return names


def _extended_library_names() -> set[str]:
    """The ``_names`` in the source of the library classes trl_prob subclasses or mixes into (SFTTrainer and its
    bases, the callback classes): a method or attribute trl_prob defines under one of these overrides theirs."""
    import re

    from transformers import TrainerCallback
    from transformers.trainer_callback import ExportableState
    from trl import SFTTrainer

    names, word = set(), re.compile(r"\b_[A-Za-z]\w*")
    for cls in {*SFTTrainer.__mro__, TrainerCallback, ExportableState} - {object}:
        try:
            names.update(word.findall(inspect.getsource(cls)))
        except (OSError, TypeError):
            pass
    return names


def private_uses(path: str) -> list[tuple[int, str, bool]]:
    """(line, name, imported) of every private name ``path`` imports from the libraries (``imported``), or reads, sets
    or defines as an attribute (``x._name``, ``getattr(x, "_name")``, ``def _name`` / ``_name = ...`` in a class
    body)."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PRIVATE_LIBRARIES:
            for alias in node.names:
                if any(part.startswith("_") for part in [*node.module.split("."), alias.name]):
                    found.append((node.lineno, alias.name, True))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name, True) for a in node.names
                      if a.name.split(".")[0] in PRIVATE_LIBRARIES and "._" in f".{a.name}"]  # fmt: skip
    return found + [(line, name, False) for line, name, _ in _attribute_names(tree)]


def _attribute_names(tree) -> list[tuple[int, str, bool]]:
    """(line, name, defines) of every private non-dunder attribute name in ``tree``: ``x._name`` (``defines`` when
    ``self._name`` is assigned), ``getattr/hasattr/setattr/delattr(x, "_name")``, and methods / class attributes."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            defines = isinstance(node.ctx, ast.Store) and isinstance(node.value, ast.Name) and node.value.id == "self"
            found.append((node.lineno, node.attr, defines))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("getattr", "hasattr", "setattr", "delattr") and len(node.args) > 1
              and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)):  # fmt: skip
            found.append((node.lineno, node.args[1].value, False))
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    found.append((item.lineno, item.name, True))
                elif isinstance(item, (ast.Assign, ast.AnnAssign)):
                    targets = item.targets if isinstance(item, ast.Assign) else [item.target]
                    found += [(item.lineno, t.id, True) for t in targets if isinstance(t, ast.Name)]
    return [(line, name, defines) for line, name, defines in found
            if name.startswith("_") and not (name.startswith("__") and name.endswith("__"))]


def package_files() -> list[str]:
    return sorted(os.path.join(folder, name) for folder, _, files in os.walk(PACKAGE) for name in files
                  if name.endswith(".py"))  # fmt: skip


def library_private_uses() -> dict[tuple[str, str], list[int]]:
    """(file under trl_prob/, name) -> lines, for every private name of the four libraries trl_prob/ touches."""
    library, extended = _library_private_names(), _extended_library_names()
    trees = {path: ast.parse(open(path, encoding="utf-8").read()) for path in package_files()}
    ours = {name for tree in trees.values() for _, name, defines in _attribute_names(tree) if defines}
    ours |= {node.name for tree in trees.values() for node in ast.walk(tree)
             if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}  # fmt: skip
    uses: dict[tuple[str, str], list[int]] = {}
    for path in trees:
        where = os.path.relpath(path, PACKAGE)
        for line, name, imported in private_uses(path):
            # theirs: imported from them, an override of a class trl_prob extends, or in their source and not ours
            if imported or name in extended or (name in library and name not in ours):
                uses.setdefault((where, name), []).append(line)
    return uses


def test_trl_prob_touches_no_private_library_name_but_the_allowed():
    uses = library_private_uses()
    unexpected = {f"trl_prob/{where}:{lines[0]} {name}" for (where, name), lines in uses.items()
                  if (where, name) not in ALLOWED_PRIVATE}  # fmt: skip
    assert not unexpected, (
        f"private TRL/transformers/PEFT/accelerate names: {sorted(unexpected)}. Use a public name or a small tested "
        "copy, or add it to ALLOWED_PRIVATE with the reason none does."
    )
    stale = set(ALLOWED_PRIVATE) - set(uses)
    assert not stale, f"ALLOWED_PRIVATE entries no longer used (remove them): {sorted(stale)}"


def test_private_name_scan_finds_each_kind_of_use(tmp_path):
    """The scan's own check: an import, an attribute read, a getattr and an override are each found."""
    source = tmp_path / "x.py"
    source.write_text(
        "from trl.cli.commands.training import _subtract_subsequence\n"
        "import transformers.trainer_utils\n"
        "def f(trainer):\n"
        "    trainer._total_train_tokens = 1\n"
        "    return getattr(trainer, '_signature_columns', None)\n"
        "class T:\n"
        "    def _set_signature_columns_if_needed(self):\n"
        "        pass\n"
    )
    found = {name for _, name, _ in private_uses(str(source))}
    assert found == {"_subtract_subsequence", "_total_train_tokens", "_signature_columns",
                     "_set_signature_columns_if_needed"}  # fmt: skip
    assert {"_total_train_tokens", "_signature_columns", "_set_signature_columns_if_needed"} <= (
        _library_private_names() & _extended_library_names()
    )
