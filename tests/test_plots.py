"""plot_training: a PNG from a real run's trainer_state.json, and clear errors when there is none."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
from datasets import Dataset  # noqa: E402

from addition import build_tokenizer, make_addition_examples, random_tiny_llama  # noqa: E402
from trl_prob.experimental import ExperimentalSFTConfig  # noqa: E402  (the research knobs these tests use)
from trl_prob import ProbSFTConfig, ProbSFTTrainer  # noqa: E402
from trl_prob.plots import TRAINING_PNG, find_trainer_state, plot_training  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == PNG_MAGIC and os.path.getsize(path) > 10_000


def _addition(n: int, seed: int) -> Dataset:
    rows = make_addition_examples(n, noise=0.2, seed=seed)
    return Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A real 6-step run with a linear schedule in exponent mode (lambda and exponent logged) and eval every 3 steps."""
    output_dir = str(tmp_path_factory.mktemp("plots") / "run")
    args = ExperimentalSFTConfig(
        output_dir=output_dir,
        objective="power:4",
        objective_schedule="linear",
        schedule_mode="exponent",
        schedule_warmup_ratio=0.5,
        max_steps=6,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=16,
        learning_rate=3e-3,
        logging_steps=1,
        eval_strategy="steps",
        eval_steps=3,
        save_strategy="steps",
        save_steps=6,
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    trainer = ProbSFTTrainer(
        model=random_tiny_llama(seed=0),
        args=args,
        train_dataset=_addition(64, seed=0),
        eval_dataset=_addition(16, seed=1),
        processing_class=build_tokenizer(),
    )
    trainer.train()
    trainer.save_state()
    return output_dir


def test_plot_training_writes_a_png_from_a_real_run(run_dir):
    with open(os.path.join(run_dir, "trainer_state.json")) as f:
        logged = {key for entry in json.load(f)["log_history"] for key in entry}
    # What the figure draws is really in the log.
    assert {"mean_token_prob", "schedule_signal_ema", "objective_lambda", "objective_exponent", "loss", "nll"} <= logged
    assert {"eval_loss", "eval_nll", "eval_mean_token_prob", "eval_exact_match"} <= logged

    path = plot_training(run_dir)
    assert path == os.path.join(run_dir, TRAINING_PNG)
    assert _is_png(path)


def test_plot_training_takes_the_json_file_and_an_output_path(run_dir, tmp_path):
    out = str(tmp_path / "figures" / "curves.png")
    assert plot_training(os.path.join(run_dir, "trainer_state.json"), out) == out
    assert _is_png(out)


def test_checkpoint_state_is_found_when_the_run_dir_has_none(run_dir, tmp_path):
    checkpoint = os.path.join(run_dir, "checkpoint-6")
    os.makedirs(tmp_path / "interrupted" / "checkpoint-2")
    os.symlink(checkpoint, tmp_path / "interrupted" / "checkpoint-6")
    assert find_trainer_state(str(tmp_path / "interrupted")).endswith(os.path.join("checkpoint-6", "trainer_state.json"))
    assert _is_png(plot_training(str(tmp_path / "interrupted"), str(tmp_path / "out.png")))


def test_run_without_a_schedule_still_plots(tmp_path):
    history = [{"step": s, "loss": 3.0 / s, "nll": 3.0 / s, "mean_token_prob": 0.1 * s} for s in range(1, 6)]
    state = tmp_path / "trainer_state.json"
    state.write_text(json.dumps({"global_step": 5, "log_history": history}))
    assert _is_png(plot_training(str(tmp_path)))


def test_directory_without_trainer_state_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"No trainer_state\.json in .*checkpoint"):
        plot_training(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="neither a run directory nor a trainer_state.json"):
        plot_training(str(tmp_path / "missing"))


def test_empty_log_history_is_a_clear_error(tmp_path):
    (tmp_path / "trainer_state.json").write_text(json.dumps({"log_history": []}))
    with pytest.raises(ValueError, match="empty log_history"):
        plot_training(str(tmp_path))


def test_per_source_run_draws_a_line_per_source(tmp_path, monkeypatch):
    rows = [dict(r, source="add") for r in _addition(16, seed=0)]
    rows += [dict(prompt=r["prompt"], completion=r["completion"][::-1], source="rev") for r in _addition(16, seed=1)]
    args = ExperimentalSFTConfig(output_dir=str(tmp_path / "run"), objective="p", objective_schedule="adaptive",
                         schedule_per_source=True, max_steps=3, per_device_train_batch_size=8, logging_steps=1,
                         report_to="none", use_cpu=True, seed=0, disable_tqdm=True, save_strategy="no")  # fmt: skip
    trainer = ProbSFTTrainer(model=random_tiny_llama(seed=0), args=args, train_dataset=Dataset.from_list(rows),
                             processing_class=build_tokenizer())  # fmt: skip
    trainer.train()
    trainer.save_state()

    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    plot_training(args.output_dir)
    probability, schedule = figures[0].axes[0], figures[0].axes[1]
    for ax in (probability, schedule):
        labels = [line.get_label() for line in ax.get_lines()]
        assert {"source add", "source rev"} <= set(labels), labels
    lambdas = {line.get_label(): list(line.get_ydata()) for line in schedule.get_lines()}
    logged = [e["objective_lambda/rev"] for e in trainer.state.log_history if "objective_lambda/rev" in e]
    assert lambdas["source rev"] == pytest.approx(logged)


def test_plot_draws_the_held_out_exact_match(run_dir, tmp_path, monkeypatch):
    """eval_exact_match (what the schedule's signal should track) is drawn wherever the run evaluated."""
    import trl_prob.plots as plots

    drawn, original = [], plots._plot

    def recording(ax, history, key, label, **style):
        plotted = original(ax, history, key, label, **style)
        if plotted:
            drawn.append(key)
        return plotted

    monkeypatch.setattr(plots, "_plot", recording)
    plots.plot_training(run_dir, str(tmp_path / "t.png"))
    assert "eval_exact_match" in drawn and "eval_mean_token_prob" in drawn
