"""Every recipe parses, uses only known keys, and trains two steps with the model and data swapped for the embedded
tiny ones (QLoRA recipes stay QLoRA: bitsandbytes NF4 runs on CPU). Offline, in-process, seconds each."""

from __future__ import annotations

import glob
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import yaml  # noqa: E402

from addition import make_addition_examples  # noqa: E402
from trl_prob import cli  # noqa: E402
from trl_prob.embedded import default_dataset_path, default_model_path  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(
    os.path.relpath(path, ROOT)
    for path in glob.glob(os.path.join(ROOT, "recipes", "**", "*.yaml"), recursive=True)
    if os.sep + "accelerate" + os.sep not in path
)
ACCELERATE_CONFIGS = sorted(glob.glob(os.path.join(ROOT, "recipes", "accelerate", "*.yaml")))
# What a CPU cannot do, and what makes two steps take seconds instead of minutes. Everything else stays as written,
# including QLoRA, gradient checkpointing, chat templates and assistant-only loss.
CPU_OVERRIDES = [
    "--bf16", "false",
    "--use_cpu", "true",
    "--dtype", "float32",                    # also the 4-bit compute dtype
    "--max_steps", "2",
    "--per_device_train_batch_size", "4",
    "--gradient_accumulation_steps", "2",
    "--schedule_warm_start_samples", "16",
    "--per_device_eval_batch_size", "16",
    "--eval_strategy", "no",
    "--save_strategy", "no",
    "--report_to", "none",
    "--disable_tqdm", "true",
]  # fmt: skip


def recipe_keys(path: str) -> list[str]:
    with open(os.path.join(ROOT, path)) as f:
        config = yaml.safe_load(f)
    assert isinstance(config, dict), f"{path} is not a YAML mapping"
    return [key for key in config if key != "env"]


def parser_dests(command: str = "sft", recipe: str | None = None) -> set[str]:
    """What the parser `trl-prob` builds for this recipe knows (with trl_prob.experimental's if it says so)."""
    experimental = recipe is not None and cli.wants_experimental(["--config", os.path.join(ROOT, recipe)])
    return {action.dest for action in cli.make_parser(command, experimental=experimental)._actions}


def test_recipes_found():
    assert "recipes/quickstart.yaml" in RECIPES
    assert {"recipes/math/qwen2.5-math-1.5b-full.yaml", "recipes/math/qwen2.5-math-7b-qlora.yaml",
            "recipes/medical/llama-3.1-8b-qlora.yaml", "recipes/mixture/qwen2.5-math-1.5b-math-medical.yaml"} <= set(
        RECIPES)  # fmt: skip


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_key_is_a_known_argument(recipe):
    known = parser_dests("sft", recipe)
    unknown = [key for key in recipe_keys(recipe) if key not in known]
    assert not unknown, f"{recipe}: unknown keys {unknown}"
    # probe accepts the same recipes
    assert not [key for key in recipe_keys(recipe) if key not in parser_dests("probe", recipe)]


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_parses(recipe, monkeypatch):
    monkeypatch.chdir(ROOT)
    parsed = cli.make_parser("sft", experimental=cli.wants_experimental(["--config", recipe])).parse_args_and_config(
        ["--config", recipe, *CPU_OVERRIDES], return_remaining_strings=True, separate_remaining_strings=True
    )
    *dataclasses, config_remaining, cli_remaining = parsed
    assert config_remaining == [] and cli_remaining == []
    training_args = dataclasses[1]
    with open(os.path.join(ROOT, recipe)) as f:
        config = yaml.safe_load(f)
    if config.get("objective") == "auto":  # the quickstart: the benchmark's choice, resolved in the config
        from trl_prob.auto import AUTO_SETTINGS

        assert training_args.objective_auto
        assert all(getattr(training_args, k) == v for k, v in AUTO_SETTINGS.items() if k != "objective")
    else:  # what the recipe names is what it trains (a fixed objective, or the adaptive schedule toward it)
        assert training_args.objective == config["objective"] and not training_args.objective_auto
        assert training_args.objective_schedule == config.get("objective_schedule", "none")
        assert training_args.schedule_signal == config.get("schedule_signal", training_args.schedule_signal)
    if "Qwen2.5-Math" in config.get("model_name_or_path", "") and not config.get("schedule_per_source"):
        # a setting the paper measured trains what it found there: 1 - p (Qwen2.5-Math-1.5B/7B on NuminaMath-CoT)
        assert "NuminaMath" in config["dataset_name"] and training_args.objective == "p"
    if "chat_template_path" in config:
        assert os.path.isfile(config["chat_template_path"])


def test_typo_in_a_recipe_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    with open(os.path.join(ROOT, "recipes/quickstart.yaml")) as f:
        config = yaml.safe_load(f)
    config["lerning_rate"] = config.pop("learning_rate")
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(config))
    assert cli.main(["sft", "--config", str(path), "--output_dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "unknown key(s) in --config: lerning_rate" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("config", ACCELERATE_CONFIGS, ids=os.path.basename)
def test_accelerate_configs_parse(config):
    from accelerate.commands.config.config_args import load_config_from_file

    loaded = load_config_from_file(config)
    assert loaded.num_processes == 8 and loaded.mixed_precision == "bf16"


def _messages_dataset(tmp_path, name: str = "messages", seed: int = 0) -> str:
    """The embedded task as `messages` (what NuminaMath-CoT provides), for the math recipes' assistant-only loss."""
    directory = tmp_path / name
    directory.mkdir()
    with open(directory / "train.jsonl", "w") as f:
        for row in make_addition_examples(64, noise=0.2, seed=seed, format="messages"):
            f.write(json.dumps({"messages": row["messages"]}) + "\n")
    return str(directory)


def _local_mixture(config: dict, tmp_path) -> tuple[str, list[str]]:
    """A copy of a `datasets:` recipe whose entries read local `messages` files, each under its entry's source name
    (its `columns`, `fraction` and `name` kept); returns the copy's path and the source names."""
    from trl.scripts.utils import DatasetConfig

    from trl_prob.experimental.sources import mixture_source_name

    entries, names = [], []
    for index, entry in enumerate(config["datasets"]):
        name = mixture_source_name(DatasetConfig(**entry))
        local = os.path.join(_messages_dataset(tmp_path, f"entry{index}", seed=index), f"{name}.jsonl")
        os.rename(os.path.join(os.path.dirname(local), "train.jsonl"), local)
        entries.append({**entry, "path": "json", "data_files": local, "split": "train"})
        names.append(name)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({**config, "datasets": entries}))
    return str(path), names


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_trains_two_steps(recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    with open(os.path.join(ROOT, recipe)) as f:
        config = yaml.safe_load(f)
    output_dir = tmp_path / "run"
    argv = ["--config", recipe, *CPU_OVERRIDES, "--model_name_or_path", default_model_path(), "--output_dir",
            str(output_dir)]  # fmt: skip
    sources = []
    if "datasets" in config:  # a mixture: the same entries, on local files
        argv[1], sources = _local_mixture(config, tmp_path)
    else:
        dataset = _messages_dataset(tmp_path) if config.get("assistant_only_loss") else default_dataset_path()
        argv += ["--dataset_name", dataset]
    if str(config.get("lora_target_modules", "")).startswith("['.*layers"):  # a regex naming SmolLM2's top layers
        argv += ["--lora_target_modules", "q_proj", "v_proj"]  # the tiny model has 2 layers

    assert cli.run_worker("sft", argv) == 0

    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    logged = [entry for entry in state["log_history"] if "objective_lambda" in entry]
    assert all(0.0 <= entry["objective_lambda"] <= 1.0 for entry in logged)
    if config.get("objective") == "auto":  # lambda is logged only where auto is a schedule
        from trl_prob.auto import AUTO_SETTINGS

        assert bool(logged) == (AUTO_SETTINGS.get("objective_schedule", "none") != "none")
        assert any("mean_token_prob" in entry for entry in state["log_history"])
    else:  # lambda is logged exactly where the recipe names a schedule
        assert bool(logged) == (config.get("objective_schedule", "none") != "none")
        assert any("mean_token_prob" in entry for entry in state["log_history"])
    for name in sources:
        assert any(0.0 <= entry.get(f"objective_lambda/{name}", -1) <= 1.0 for entry in logged), name
    if config.get("use_peft"):
        assert (output_dir / "adapter_model.safetensors").is_file()
        _reload_adapter(output_dir)
    else:
        assert (output_dir / "model.safetensors").is_file()


def _reload_adapter(output_dir) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    base = AutoModelForCausalLM.from_pretrained(
        default_model_path(), quantization_config=quantization, dtype=torch.float32
    )
    model = PeftModel.from_pretrained(base, str(output_dir))
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 5, 6]])).logits
    assert torch.isfinite(logits).all()
