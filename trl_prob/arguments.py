"""The ``trl-prob`` command's own flags (not the trainer's), as TRL keeps ``ScriptArguments`` beside its scripts."""

from __future__ import annotations

from dataclasses import dataclass, field


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
            "help": "At the end of training, print what the run did: held-out greedy exact match (on 200 samples) and "
            "mean target-token probability before and after, lambda at the first and last step, where the model, "
            "checkpoints and plot (written to OUTPUT_DIR/training.png) are; also saved to OUTPUT_DIR/summary.json. "
            "Needs prompt-completion data with a held-out split (--dataset_test_split)."
        },
    )
    experimental: bool = field(
        default=False,
        metadata={
            "help": "Parse with trl_prob.experimental's research knobs (more schedule signals and kinds, per-source "
            "schedules, ...: `trl-prob sft --experimental --help`). None was shown to help on a real model."
        },
    )


@dataclass
class ExperimentalRunArguments(RunArguments):
    """``--experimental`` run flags."""

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
