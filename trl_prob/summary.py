"""An end-of-training summary: what the run did to the model, in a few lines.

Held-out exact match (greedy, teacher-forced: one pass through the fused head) and mean target-token probability before and after training, the
schedule's lambda at the first and the last step (with the moving target probability that drove it), and where the
run's outputs are. Opt-in: ``trl-prob sft ... --summary true`` (the quickstart recipe turns it on), or from Python::

    summary = RunSummary(trainer)          # measures at the start and at the end of trainer.train()
    trainer.add_callback(summary)
    trainer.train()
    print(summary.format())

Exact match needs prompt-completion data (plain or conversational, or messages with ``assistant_only_loss``) with a
held-out split: for each held-out sample the prompt is every token before the first target token of TRL's prepared
sample, and the reference is the target tokens (the completion with TRL's EOS, or the assistant turn with its
end-of-turn token), so a completion is right only if the model writes it exactly and then stops. Both measurements
leave the training trajectory unchanged (no RNG is drawn, the model is put back in train mode).
"""

from __future__ import annotations

import json
import os

import torch
from transformers import TrainerCallback

SUMMARY_FILE = "summary.json"


class SummaryError(ValueError):
    """The summary cannot be measured on this data (raised before training starts)."""


def _prompts_and_references(dataset, num_samples: int | None) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, reference ids) of the first ``num_samples`` rows of a TRL-prepared dataset."""
    columns = set(dataset.column_names or [])
    if not {"input_ids", "labels"} <= columns:
        raise SummaryError(
            f"the summary's exact match needs prompt-completion data (TRL's prepared dataset has columns "
            f"{sorted(columns)}, no 'labels' marking the completion)."
        )
    if num_samples is not None:
        dataset = dataset.select(range(min(num_samples, len(dataset))))
    pairs = []
    for row, (ids, labels) in enumerate(zip(dataset["input_ids"], dataset["labels"], strict=True)):
        targets = [i for i, label in enumerate(labels) if label != -100]
        if not targets or targets[0] == 0:
            raise SummaryError(
                f"held-out sample {row} has {'no completion' if not targets else 'no prompt'} after TRL's "
                "preparation: the summary's exact match needs prompt-completion data (a prompt and a completion in "
                "every sample)."
            )
        start = targets[0]
        end = next((i for i in range(start, len(labels)) if labels[i] == -100), len(labels))
        pairs.append((list(ids[:start]), list(ids[start:end])))
    if not pairs:
        raise SummaryError("the held-out split has no rows: the summary has nothing to measure.")
    return pairs


@torch.no_grad()
def exact_match(trainer, dataset, num_samples: int | None = None, batch_size: int | None = None) -> float:
    """Share of held-out samples whose greedy completion (``model.generate``) equals the reference target tokens.

    ``dataset`` is TRL-prepared (``trainer.eval_dataset``). Split across processes; every process returns the same
    value. Under FSDP / DeepSpeed ZeRO-3 all ranks generate in lock-step (``synced_gpus``).
    """
    pairs = _prompts_and_references(dataset, num_samples)
    tokenizer = getattr(trainer.processing_class, "tokenizer", trainer.processing_class)
    accelerator = trainer.accelerator
    model = accelerator.unwrap_model(trainer.model_wrapped, keep_torch_compile=False)
    sharded = bool(getattr(trainer, "is_fsdp_enabled", False) or getattr(trainer, "is_deepspeed_enabled", False))
    batch_size = batch_size or trainer.args.per_device_eval_batch_size
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = accelerator.device

    correct = torch.zeros(2, dtype=torch.float64, device=device)  # (right, counted)
    was_training = model.training
    model.eval()
    try:
        with accelerator.split_between_processes(list(range(len(pairs))), apply_padding=sharded) as mine:
            seen = set()
            for start in range(0, max(len(mine), 1), batch_size):
                chunk = mine[start : start + batch_size]
                if not chunk:
                    if not sharded:
                        break
                    chunk = [0]  # keep every rank's forward passes in step
                prompts = [pairs[i][0] for i in chunk]
                width = max(len(p) for p in prompts)
                input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
                attention = torch.zeros_like(input_ids)
                for r, prompt in enumerate(prompts):  # left-padded: generation continues every prompt's end
                    input_ids[r, width - len(prompt) :] = torch.tensor(prompt)
                    attention[r, width - len(prompt) :] = 1
                max_new = max(len(pairs[i][1]) for i in chunk)
                generated = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention.to(device),
                    do_sample=False,
                    max_new_tokens=max_new,
                    pad_token_id=pad_id,
                    synced_gpus=sharded and accelerator.num_processes > 1,
                )[:, width:].tolist()
                for i, tokens in zip(chunk, generated, strict=True):
                    if i in seen:  # the padding of an uneven split repeats samples
                        continue
                    seen.add(i)
                    reference = pairs[i][1]
                    correct[0] += float(tokens[: len(reference)] == reference)
                    correct[1] += 1
    finally:
        model.train(was_training)
    if accelerator.num_processes > 1:
        correct = accelerator.reduce(correct, reduction="sum")
    return float(correct[0] / correct[1]) if correct[1] > 0 else float("nan")


class RunSummary(TrainerCallback):
    """Measures held-out exact match and mean target p at the start and the end of training; records lambda.

    Args:
        trainer: the [`ProbSFTTrainer`] (or any ``SFTTrainer`` with ``measure_token_probs``) it reports on.
        eval_dataset: the held-out split, as the trainer prepared it (default: ``trainer.eval_dataset``).
        num_samples: held-out samples measured (default 200; None for all).
        print_at_end: print the summary on the main process when training ends (the CLI prints it after saving,
            with the output paths, instead).
        split_name: what the summary calls the held-out split.
    """

    def __init__(self, trainer, eval_dataset=None, num_samples: int | None = 200, print_at_end: bool = True,
                 split_name: str = "held-out"):
        self.trainer = trainer
        self.split_name = split_name
        self.dataset = trainer.eval_dataset if eval_dataset is None else eval_dataset
        if self.dataset is None:
            raise SummaryError("the summary needs a held-out split (an eval dataset, e.g. --dataset_test_split test).")
        if isinstance(self.dataset, dict):
            raise SummaryError("the summary measures one held-out split; the trainer has several eval datasets.")
        _prompts_and_references(self.dataset, 1)  # bad data fails here, before training
        self.num_samples = num_samples
        self.print_at_end = print_at_end
        self.result: dict = {}

    def measure(self) -> dict:
        """One forward pass over the held-out samples through the fused head (no generation): greedy exact match is
        the share of samples whose every target token, EOS included, is the model's top-1 given the reference prefix
        (greedy decoding writes the reference exactly if and only if that holds, ties aside; :func:`exact_match` is the
        same number by ``model.generate``, and a test holds them equal); mean target p comes from the same pass."""
        trainer = self.trainer
        if trainer.is_world_process_zero():
            print(f"trl-prob summary: measuring {self.split_name} samples at step {trainer.state.global_step}", flush=True)
        stats = trainer.measure_token_probs(self.dataset, num_samples=self.num_samples,
                                            progress=not trainer.args.disable_tqdm)  # fmt: skip
        return {
            "step": trainer.state.global_step,
            "exact_match": stats.sequence_top1_share,
            "mean_token_prob": stats.mean_p,
        }

    def on_train_begin(self, args, state, control, **kwargs):
        from .probe import place_on_continuum
        from .schedules import DEFAULT_SIGNAL, SIGNALS

        n = len(self.dataset) if self.num_samples is None else min(self.num_samples, len(self.dataset))
        before = self.measure()
        # the probe's placement, on held-out data: exact match on the default signal's ramp (sequence_top1 is the
        # teacher-forced exact match), so a base that writes no answer is weak whatever its mean p
        signal = SIGNALS[DEFAULT_SIGNAL]
        before["continuum"] = place_on_continuum(before["exact_match"], signal.ramp_low, signal.ramp_high)
        self.result = {"num_samples": n, "before": before, "lambda": {}}
        if self.trainer.is_world_process_zero():
            print(f"trl-prob: before training, on {n} {self.split_name} samples: exact match "
                  f"{before['exact_match']:.3f}, mean target p {before['mean_token_prob']:.3f}: {before['continuum']} "
                  f"on the task (exact match on the {signal.ramp_low:.2f} -> {signal.ramp_high:.2f} ramp: trl-prob "
                  "probe's placement)", flush=True)  # fmt: skip

    def on_step_begin(self, args, state, control, **kwargs):
        schedule = getattr(self.trainer, "schedule", None)
        if schedule is None or getattr(args, "objective_schedule", "none") == "none":
            return
        entry = {"step": state.global_step + 1, "value": schedule.value, "ema_token_prob": schedule.p_ema}
        self.result["lambda"].setdefault("first", entry)
        self.result["lambda"]["last"] = entry

    def on_train_end(self, args, state, control, **kwargs):
        self.result["after"] = self.measure()
        if self.print_at_end and state.is_world_process_zero:
            print(self.format())

    def format(self, output_dir: str | None = None, plot: str | None = None) -> str:
        """The summary as text; ``output_dir`` / ``plot`` add where the model, checkpoints and plot are."""
        r, args = self.result, self.trainer.args
        before, after = r["before"], r.get("after", {})
        lines = [
            f"Summary ({r['num_samples']} {self.split_name} samples, greedy decoding)",
            f"  {'':<22}{'before (step ' + str(before['step']) + ')':>18}{'after (step ' + str(after.get('step', '?')) + ')':>18}",
            f"  {'exact match':<22}{before['exact_match']:>18.3f}{after.get('exact_match', float('nan')):>18.3f}",
            f"  {'mean target p':<22}{before['mean_token_prob']:>18.3f}{after.get('mean_token_prob', float('nan')):>18.3f}",
        ]
        lam = r.get("lambda", {})
        objective = getattr(args, "objective", "?")
        if lam:
            first, last = lam["first"], lam["last"]
            lines.append(
                f"  {'lambda':<22}{first['value']:>18.2f}{last['value']:>18.2f}   (step {first['step']} -> "
                f"{last['step']}; 0 = nll, 1 = {objective})"
            )
            if first.get("ema_token_prob") is not None and last.get("ema_token_prob") is not None:
                signal = getattr(args, "schedule_signal", "")
                lines.append(
                    f"  {'signal (moving avg.)':<22}{first['ema_token_prob']:>18.3f}{last['ema_token_prob']:>18.3f}"
                    f"   ({signal}, what the {getattr(args, 'objective_schedule', '')} schedule follows; ramp "
                    f"{getattr(args, 'schedule_ramp_low', 0):.2f} -> {getattr(args, 'schedule_ramp_high', 0):.2f})"
                )
        else:
            lines.append(f"  {'objective':<22}{objective:>18} throughout (no schedule)")
        if output_dir is not None:
            checkpoints = sorted(
                (d for d in os.listdir(output_dir) if d.startswith("checkpoint-") and d[11:].isdigit()),
                key=lambda d: int(d[11:]),
            ) if os.path.isdir(output_dir) else []  # fmt: skip
            lines.append(f"  model        {output_dir}")
            lines.append(f"  summary      {os.path.join(output_dir, SUMMARY_FILE)}")
            lines.append(
                f"  checkpoints  {', '.join(os.path.join(output_dir, c) for c in checkpoints) if checkpoints else 'none'}"
            )
        if plot is not None:
            lines.append(f"  plot         {plot}")
        return "\n".join(lines)

    def save(self, output_dir: str) -> str:
        path = os.path.join(output_dir, SUMMARY_FILE)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.result, f, indent=2)
            f.write("\n")
        return path
