"""Optimizer-step time and peak memory of ``ProbSFTTrainer`` (each objective, the adaptive schedule) vs TRL's ``SFTTrainer``.

Every case trains the same randomly initialised Llama-shaped model (same weights, same pre-tokenised batches,
same ``SFTConfig`` fields) for a few optimizer steps through the real ``Trainer.train()`` loop:

- ``trl:nll``: plain ``trl.SFTTrainer`` (loss_type ``nll``), the reference of every ratio;
- ``prob:<spec>``: ``trl_prob.ProbSFTTrainer`` with ``objective=<spec>`` (``prob:nll`` is the plug-in's
  cost with the objective switched off: its statistics and per-step logging only);
- ``prob:<spec>+adaptive``: the same with ``objective_schedule="adaptive"`` (its warm-start probe runs in
  ``train()`` before the first step: it shows in the whole ``train()`` call time, reported too, not in the step
  time);
- ``prob:<spec>+per_source``: adaptive with ``schedule_per_source=True`` over ``--sources`` sources (rows take
  them in turn): per-source statistics rows, a lambda per token, per-source metrics.

Cases are interleaved: each round calls ``train()`` with ``--steps`` optimizer steps on every trainer in turn
(order reversed every other round), ``--rounds`` times; a callback records, per optimizer step,

- time: the wall-clock period between consecutive ``on_step_end`` events (everything a step costs: batch
  fetch, forward/backward of all accumulation micro-batches, optimizer, trl-prob's step-boundary work, logging
  at ``logging_steps=1``); the first step of each ``train()`` call is dropped (its period would include
  ``train()``'s set-up). ``torch.cuda.synchronize()`` before each clock read on GPU.
- memory: the peak above what is live at ``on_step_begin``, until ``on_step_end``: CUDA:
  ``max_memory_allocated() - memory_allocated()``; CPU: ``VmHWM - VmRSS`` with the peak-RSS counter reset at
  step begin and ``MALLOC_MMAP_THRESHOLD_=65536`` so freed tensors leave the resident set (see
  ``loss_memory.py``).

Medians over all recorded steps; ratios vs ``trl:nll``. Targets: time <= 1.05x, memory <= 1.02x.

``--hot-path`` also profiles trl-prob's per-micro-batch code alone (``ObjectiveHook.loss`` on N target
log-probs and their other head outputs) against TRL's ``-log_probs``: aten ops per call (~ CUDA kernel launches), ops that synchronise a CUDA
device with the host (``aten::nonzero`` from boolean indexing, ``aten::_local_scalar_dense`` from
``.item()``/``.tolist()``), and CPU time per call; and the same for the per-optimizer-step
``ObjectiveHook.end_step``.

Usage (CPU, the committed results)::

    python benchmarks/train_step.py --hot-path

GPU::

    python benchmarks/train_step.py --device cuda --hidden 1024 --seq-len 1024 --batch-size 8 --rounds 3 --steps 6 \\
        --out benchmarks/results/train_step_gpu.json
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import statistics
import sys
import tempfile
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

import torch  # noqa: E402

from loss_memory import PeakMemory, device_name  # noqa: E402

DEFAULT_CASES = (
    "trl:nll",
    "prob:nll",
    "prob:p",
    "prob:power:10",
    "prob:top_p:0.2",
    "prob:bottom_p:0.8",
    "prob:top_logp:0.2",
    "prob:dft",
    "prob:deft",
    "prob:deft_cayley",
    "prob:eaft:1",
    "prob:power:10+adaptive",
    "prob:p+token_gate",
)
REFERENCE = "trl:nll"
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def build_model(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate or int(2.6875 * args.hidden),
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64),
        num_key_value_heads=max(1, args.hidden // 128),
        max_position_embeddings=max(512, args.seq_len),
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(args.seed)
    return LlamaForCausalLM(config)


def build_dataset(args, model):
    """Pre-tokenised prompt-completion rows of exactly ``seq_len`` tokens (no padding), on which the model is confident.

    A random-init model puts p ~ 1/V on every token, which would leave the thresholded objectives nothing to keep
    and the adaptive schedule at lambda = 0. So the head is scaled by ``--head-scale`` (peakier predictions), each
    completion is the model's own greedy continuation of a random prompt, and ``--label-noise`` of the completion
    tokens are replaced by random ones: target probabilities then spread over (0, 1) (mean ~0.3-0.4), so every
    path (kept tokens, the schedule's blend at 0 < lambda < 1) runs with realistic values.
    """
    from datasets import Dataset

    g = torch.Generator().manual_seed(args.seed)
    n = args.batch_size * args.grad_accum * args.steps * 2
    prompt_len = args.seq_len // 4
    prompts = torch.randint(3, args.vocab, (n, prompt_len), generator=g)
    with torch.no_grad():
        ids = model.generate(
            prompts,
            attention_mask=torch.ones_like(prompts),
            max_new_tokens=args.seq_len - prompt_len,
            min_new_tokens=args.seq_len - prompt_len,
            do_sample=False,
            pad_token_id=0,
        )
    noisy = torch.rand(ids.shape, generator=g) < args.label_noise
    noisy[:, :prompt_len] = False
    ids = torch.where(noisy, torch.randint(3, args.vocab, ids.shape, generator=g), ids)
    rows = [
        {"input_ids": row.tolist(), "completion_mask": [0] * prompt_len + [1] * (args.seq_len - prompt_len),
         "source": f"s{i % args.sources}"}  # read only by the +per_source cases; the others drop the column
        for i, row in enumerate(ids)
    ]  # fmt: skip
    return Dataset.from_list(rows)


def build_tokenizer():
    from addition import build_tokenizer as embedded_tokenizer

    return embedded_tokenizer()  # only its pad/eos ids are used: the data is pre-tokenised


class StepRecorder:
    """Trainer callback: per-step period between ``on_step_end`` events, step compute time, and peak memory."""

    def __new__(cls, device: str):
        from transformers import TrainerCallback

        class Recorder(TrainerCallback):
            def __init__(self):
                self.device = device
                self.memory = PeakMemory(device)
                self.periods, self.compute, self.peaks, self.train_calls = [], [], [], []
                self._last_end = None
                self._begin = None

            def _now(self):
                if self.device.startswith("cuda"):
                    torch.cuda.synchronize()
                return time.perf_counter()

            def on_train_begin(self, args, state, control, **kwargs):
                self._last_end = None

            def on_step_begin(self, args, state, control, **kwargs):
                self.memory.start()
                self._begin = self._now()

            def on_step_end(self, args, state, control, **kwargs):
                now = self._now()
                self.peaks.append(self.memory.stop())
                self.compute.append(now - self._begin)
                if self._last_end is not None:
                    self.periods.append(now - self._last_end)
                self._last_end = now

        return Recorder()


def parse_case(case: str) -> dict:
    kind, _, rest = case.partition(":")
    if kind == "trl" and rest == "nll":
        return {"kind": "trl", "objective": "nll", "schedule": "none"}
    if kind != "prob" or not rest:
        raise ValueError(f"Unknown case {case!r}: trl:nll or prob:<spec>[+adaptive]")
    for schedule in ("adaptive", "token_gate", "progress"):
        if rest.endswith(f"+{schedule}"):
            return {"kind": "prob", "objective": rest[: -len(schedule) - 1], "schedule": schedule}
    if rest.endswith("+per_source"):
        return {"kind": "prob", "objective": rest[: -len("+per_source")], "schedule": "adaptive", "per_source": True}
    return {"kind": "prob", "objective": rest, "schedule": "none"}


def build_trainer(case: str, model, dataset, tokenizer, args, output_dir: str):
    from trl import SFTConfig, SFTTrainer

    from trl_prob import ProbSFTTrainer

    from trl_prob.experimental import ExperimentalSFTConfig as ProbSFTConfig  # the research knobs

    info = parse_case(case)
    on_gpu = args.device.startswith("cuda")
    common = dict(
        output_dir=output_dir,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        max_steps=args.steps,
        learning_rate=1e-5,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=not on_gpu,
        bf16=on_gpu,
        seed=args.seed,
        data_seed=args.seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
        max_length=args.seq_len,
        completion_only_loss=True,
        gradient_checkpointing=args.gradient_checkpointing,
    )
    if info["kind"] == "trl":
        trainer = SFTTrainer(model=model, args=SFTConfig(**common), train_dataset=dataset, processing_class=tokenizer)
    else:
        config = ProbSFTConfig(
            **common,
            objective=info["objective"],
            objective_schedule=info["schedule"],
            schedule_warm_start_samples=args.warm_start_samples,
            flush_denormal=bool(args.flush_denormal),  # the same setting for the TRL baseline and every case
            schedule_per_source=info.get("per_source", False),
        )
        trainer = ProbSFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    recorder = StepRecorder(args.device)
    trainer.add_callback(recorder)
    return trainer, recorder


# --------------------------------------------------------------------------------------------- hot path


def hot_path(args) -> dict:
    """Per-call cost of trl-prob's per-micro-batch and per-step code, on CPU, with op and sync counts."""
    from torch.profiler import ProfilerActivity, profile

    from trl_prob.experimental import ExperimentalSFTConfig as ProbSFTConfig  # the research knobs

    syncing = ("aten::nonzero", "aten::_local_scalar_dense", "aten::item")
    n = args.hot_path_tokens or args.batch_size * (args.seq_len - 1)  # TRL's log_probs: [batch, seq_len - 1]
    g = torch.Generator().manual_seed(0)
    log_p = torch.rand(n, generator=g).clamp(min=1e-4).log().requires_grad_(True)
    mask = torch.rand(n, generator=g) < 0.9
    log_p_masked = (log_p * mask).detach().requires_grad_(True)

    from trl_prob.head import HeadTokens
    from trl_prob.hook import ObjectiveHook

    vocab = args.vocab
    entropy = torch.rand(n, generator=g) * math.log(vocab) * mask
    log_sum_sq = (torch.rand(n, generator=g) * -math.log(vocab)) * mask
    tokens = HeadTokens(log_p_masked, mask, is_top1=(torch.rand(n, generator=g) < 0.5) & mask, entropy=entropy,
                        log_sum_sq_probs=log_sum_sq, vocab_size=vocab)  # fmt: skip

    def stand_in(spec: str, schedule: str):
        """The trainer's public seam alone: the objective hook, with lambda mid-ramp."""
        hook = ObjectiveHook(ProbSFTConfig(
            output_dir=os.path.join(tempfile.gettempdir(), "trl-prob-bench"),  # never written
            objective=spec, objective_schedule=schedule, report_to="none", use_cpu=True,
        ), vocab_size=vocab)  # fmt: skip
        hook.schedule.value = 0.5 if schedule != "none" else 1.0
        return hook

    def measure(fn, reps: int):
        for _ in range(3):
            fn()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        ops = [e for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is None]
        names = [e.name for e in prof.events() if e.name.startswith("aten::")]
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return {
            "top_level_aten_ops": len(ops),
            "syncing_ops": {s: names.count(s) for s in syncing if names.count(s)},
            "us_per_call": 1e6 * statistics.median(times),
        }

    results = {"tokens": n, "per_micro_batch": {}, "per_optimizer_step": {}, "stats_of": {}}

    # TokenProbStats.of as it is vs a sync-free variant (masked sums, index_add_ histogram, one stack)
    from trl_prob.stats import TokenProbStats

    keep = log_p_masked.detach().exp() >= 0.2
    current = TokenProbStats.of(log_p_masked, mask, keep).sums
    proposed = sync_free_stats(log_p_masked, mask, keep)
    results["stats_of"]["max_abs_diff_vs_current"] = (current - proposed).abs().max().item()
    results["stats_of"]["current"] = measure(lambda: TokenProbStats.of(log_p_masked, mask, keep), args.hot_path_reps)
    results["stats_of"]["sync_free"] = measure(lambda: sync_free_stats(log_p_masked, mask, keep), args.hot_path_reps)

    count = mask.sum().clamp(min=1)

    def trl_nll():
        # SFTTrainer.compute_loss past the head: -log_probs summed over the step's tokens, then backward
        log_p_masked.grad = None
        ((-log_p_masked).sum() / count).backward()

    results["per_micro_batch"]["trl:nll"] = measure(trl_nll, args.hot_path_reps)
    for case in DEFAULT_CASES[1:]:
        info = parse_case(case)
        hook = stand_in(info["objective"], info["schedule"])

        def micro(hook=hook):
            # the same with trl-prob's hook in between: log_probs -> -f(p) (+ statistics), then backward
            log_p_masked.grad = None
            hook.step_stats = None
            per_token = hook.loss(tokens, {})
            (per_token.sum() / count).backward()

        results["per_micro_batch"][case] = measure(micro, args.hot_path_reps)

        # time the per-step accounting alone: refill the step's statistics before each call, outside the timing
        def end_only(hook=hook):
            hook.end_step()
            hook.pop_metrics()

        def timed_end(hook=hook):
            times, ops, names = [], None, None
            for i in range(args.hot_path_reps + 4):
                hook.step_stats = None
                hook.loss(tokens, {})
                if i == 3:
                    with profile(activities=[ProfilerActivity.CPU]) as prof:
                        end_only()
                    ops = [e for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is None]
                    names = [e.name for e in prof.events() if e.name.startswith("aten::")]
                    continue
                start = time.perf_counter()
                end_only()
                if i > 3:
                    times.append(time.perf_counter() - start)
            return {
                "top_level_aten_ops": len(ops),
                "syncing_ops": {s: names.count(s) for s in syncing if names.count(s)},
                "us_per_call": 1e6 * statistics.median(times),
            }

        results["per_optimizer_step"][case] = timed_end()
    return results


def sync_free_stats(log_p: torch.Tensor, mask: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """What ``TokenProbStats.of`` computes, without boolean indexing (no ``nonzero``, so no device-to-host sync)
    and as one ``stack`` instead of six indexed writes. Proposed replacement, measured by ``--hot-path``."""
    from trl_prob.stats import _HIST, CONFIDENT_P, HISTOGRAM_BINS

    w = mask.to(torch.float64)
    log_p = log_p.detach().to(torch.float64) * w  # 0 where masked: exp() = 1 there, weighted out below
    p = log_p.exp()
    kept = w if keep is None else keep.detach().to(torch.float64) * w
    bins = (p * HISTOGRAM_BINS).long().clamp_(0, HISTOGRAM_BINS - 1)
    hist = torch.zeros(HISTOGRAM_BINS, dtype=torch.float64, device=p.device).index_add_(0, bins.flatten(), w.flatten())
    head = torch.stack([w.sum(), (p * w).sum(), -log_p.sum(), ((p > CONFIDENT_P) * w).sum(), kept.sum()])
    sequences = torch.zeros(_HIST - len(head), dtype=torch.float64, device=p.device)  # without is_top1: zeros
    return torch.cat([head, sequences, hist])


# --------------------------------------------------------------------------------------------- main


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", action="append", help=f"cases (default: {', '.join(DEFAULT_CASES)})")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=0, help="MLP width (default 2.6875 x hidden)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per train() call")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of train() calls per case")
    parser.add_argument("--warm-start-samples", type=int, default=16, help="adaptive warm-start probe size")
    parser.add_argument("--sources", type=int, default=4, help="data sources of the +per_source cases")
    parser.add_argument("--head-scale", type=float, default=32.0, help="LM head weight multiplier (confident model)")
    parser.add_argument("--label-noise", type=float, default=0.2, help="share of completion tokens made random")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads on CPU (default 1: see benchmarks/README.md, 0: torch's default)"
    )
    parser.add_argument("--hot-path", action="store_true", help="also profile trl-prob's per-micro-batch code")
    parser.add_argument(
        "--hot-path-tokens", type=int, default=0, help="log-probs per micro-batch for --hot-path (default batch x (seq_len - 1))"
    )
    parser.add_argument("--hot-path-reps", type=int, default=50)
    parser.add_argument("--flush-denormal", action="store_true",
                        help="torch.set_flush_denormal(True) (CPU): subnormal floats are computed as 0")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/train_step_<device>.json)")
    args = parser.parse_args(argv)
    on_gpu = args.device.startswith("cuda")
    if not on_gpu and os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONUNBUFFERED="1")
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *(sys.argv[1:] if argv is None else argv)], env)
    if not on_gpu and args.threads:
        torch.set_num_threads(args.threads)
    if not on_gpu and args.flush_denormal:
        torch.set_flush_denormal(True)
    warnings.filterwarnings("ignore")
    import logging

    import transformers
    import trl

    transformers.logging.set_verbosity_error()
    logging.getLogger("trl_prob").setLevel(logging.WARNING)

    cases = args.case or list(DEFAULT_CASES)
    for case in cases:
        parse_case(case)
    if REFERENCE not in cases:
        cases.insert(0, REFERENCE)

    base = build_model(args)
    with torch.no_grad():
        base.lm_head.weight.mul_(args.head_scale)
    dataset = build_dataset(args, base)
    tokenizer = build_tokenizer()
    workdir = tempfile.mkdtemp(prefix="trl-prob-train-step-")
    trainers = {}
    for case in cases:
        model = copy.deepcopy(base).to(args.device)
        trainers[case] = build_trainer(case, model, dataset, tokenizer, args, os.path.join(workdir, case.replace(":", "_")))
    del base

    n_params = sum(p.numel() for p in trainers[REFERENCE][0].model.parameters())
    print(
        f"model: Llama {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}, {n_params / 1e6:.1f}M params; "
        f"batch {args.batch_size} x {args.seq_len} tokens x {args.grad_accum} accumulation; {args.device}",
        flush=True,
    )
    for rnd in range(args.rounds):
        order = cases if rnd % 2 == 0 else cases[::-1]
        for case in order:
            trainer, recorder = trainers[case]
            start = time.perf_counter()
            trainer.train()
            # the whole call: set-up, the adaptive warm-start probe, the steps
            recorder.train_calls.append(time.perf_counter() - start)
            print(
                f"  round {rnd + 1}/{args.rounds} {case:26s} step periods (ms): "
                + " ".join(f"{1e3 * t:.0f}" for t in recorder.periods[-(args.steps - 1) :]),
                flush=True,
            )

    summary = {}
    for case in cases:
        recorder = trainers[case][1]
        summary[case] = {
            "step_s": recorder.periods,
            "compute_s": recorder.compute,
            "peak_mib": recorder.peaks,
            "train_call_s": recorder.train_calls,
            "step_s_median": statistics.median(recorder.periods),
            "compute_s_median": statistics.median(recorder.compute),
            "peak_mib_median": statistics.median(recorder.peaks),
            "train_call_s_median": statistics.median(recorder.train_calls),
        }
        logged = [h for h in trainers[case][0].state.log_history if "loss" in h and "train_runtime" not in h]
        for key in ("mean_token_prob", "objective_lambda", "kept_token_fraction"):
            values = [h[key] for h in logged if key in h]
            if values:
                summary[case][f"last_{key}"] = values[-1]
    ref = summary[REFERENCE]
    for case, r in summary.items():
        r["time_ratio_vs_trl_nll"] = r["step_s_median"] / ref["step_s_median"]
        r["compute_ratio_vs_trl_nll"] = r["compute_s_median"] / ref["compute_s_median"]
        r["mem_ratio_vs_trl_nll"] = r["peak_mib_median"] / ref["peak_mib_median"]

    print(f"\n(ratios vs {REFERENCE}; targets: time <= 1.05x, memory <= 1.02x)")
    print(f"{'case':26s} {'step ms':>9s} {'x time':>7s} {'x compute':>9s} {'peak MiB':>9s} {'x mem':>7s} {'train() call s':>14s}")
    for case, r in summary.items():
        print(
            f"{case:26s} {1e3 * r['step_s_median']:9.1f} {r['time_ratio_vs_trl_nll']:7.3f} "
            f"{r['compute_ratio_vs_trl_nll']:9.3f} {r['peak_mib_median']:9.1f} {r['mem_ratio_vs_trl_nll']:7.3f} "
            f"{r['train_call_s_median']:14.2f}"
        )

    results = {
        "meta": {
            "benchmark": "train_step",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": device_name(args.device),
            "torch": torch.__version__,
            "trl": trl.__version__,
            "transformers": transformers.__version__,
            "command": " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
            "model": {
                "arch": "LlamaForCausalLM (random init, LM head scaled)",
                "layers": args.layers,
                "hidden": args.hidden,
                "vocab": args.vocab,
                "params": n_params,
            },
            "batch": {"per_device": args.batch_size, "seq_len": args.seq_len, "grad_accum": args.grad_accum},
            "data": f"greedy continuations of the model (head x{args.head_scale}), {args.label_noise:.0%} random tokens",
            "precision": "bf16 autocast" if on_gpu else "fp32",
            "cpu_threads": None if on_gpu else torch.get_num_threads(),
            "flush_denormal": bool(args.flush_denormal) and not on_gpu,
            "steps_per_train_call": args.steps,
            "rounds": args.rounds,
            "time": "period between consecutive on_step_end events (first step of each train() call dropped)",
            "memory": (
                "max_memory_allocated() - memory_allocated() at on_step_begin"
                if on_gpu
                else "VmHWM - VmRSS at on_step_begin (peak reset there), MALLOC_MMAP_THRESHOLD_=65536"
            ),
            "reference": REFERENCE,
        },
        "cases": summary,
    }
    if args.hot_path:
        print("\nhot path (CPU):")
        hp = hot_path(args)
        results["hot_path"] = hp
        # decomposed step-time estimate: the reference step + what trl-prob adds per micro-batch (x accumulation)
        # and per optimizer step, each measured alone with many repetitions (robust to a noisy shared CPU)
        ref_step = summary[REFERENCE]["step_s_median"]
        ref_micro = hp["per_micro_batch"][REFERENCE]["us_per_call"] * 1e-6
        for case, r in summary.items():
            if case in hp["per_micro_batch"] and case != REFERENCE:
                extra = args.grad_accum * (hp["per_micro_batch"][case]["us_per_call"] * 1e-6 - ref_micro)
                extra += hp["per_optimizer_step"][case]["us_per_call"] * 1e-6
                r["extra_s_per_step_decomposed"] = extra
                r["time_ratio_decomposed_vs_trl_nll"] = (ref_step + extra) / ref_step
        summary[REFERENCE]["time_ratio_decomposed_vs_trl_nll"] = 1.0
        print(f"per micro-batch, {hp['tokens']} log-probs, forward + backward past the head:")
        for case, r in hp["per_micro_batch"].items():
            print(f"  {case:26s} {r['top_level_aten_ops']:4d} ops  syncs {r['syncing_ops']}  {r['us_per_call']:8.1f} us")
        st = hp["stats_of"]
        print(f"TokenProbStats.of ({hp['tokens']} tokens, with keep), max |diff| of the proposed variant: {st['max_abs_diff_vs_current']:.3g}")
        for key in ("current", "sync_free"):
            r = st[key]
            print(f"  {key:26s} {r['top_level_aten_ops']:4d} ops  syncs {r['syncing_ops']}  {r['us_per_call']:8.1f} us")
        print("per optimizer step (_end_optimizer_step):")
        for case, r in hp["per_optimizer_step"].items():
            print(f"  {case:26s} {r['top_level_aten_ops']:4d} ops  syncs {r['syncing_ops']}  {r['us_per_call']:8.1f} us")
        print(f"decomposed step time vs {REFERENCE} (reference step {1e3 * ref_step:.1f} ms):")
        for case, r in summary.items():
            if "extra_s_per_step_decomposed" in r:
                print(f"  {case:26s} +{1e3 * r['extra_s_per_step_decomposed']:.3f} ms/step  x{r['time_ratio_decomposed_vs_trl_nll']:.4f}")

    out = args.out or os.path.join(RESULTS, f"train_step_{'gpu' if on_gpu else 'cpu'}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
