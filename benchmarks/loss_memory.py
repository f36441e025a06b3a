"""Peak memory and time of one forward + backward of the LM head + loss, per objective.

What is measured, per (vocab V, hidden H, tokens N) configuration and per case:

- ``trl:nll``: TRL's own path. A head-only causal LM patched with ``trl.trainer.utils.add_fused_lm_head``
  (the same call and ``outputs`` as ``SFTTrainer``), loss = ``-log_probs.sum() / num_tokens`` as in
  ``SFTTrainer.compute_loss``. This is the reference every ratio is taken against.
- ``prob:<spec>``: trl-prob's path. The same model patched with the outputs the objective reads (DEFT:
  ``log_sum_sq_probs``), and trl-prob's ``ObjectiveHook.loss`` (statistics, threshold normaliser, schedule
  blend) on the head's outputs, i.e. exactly the code ``ProbSFTTrainer`` runs per micro-batch, then TRL's loss.
  ``+adaptive`` runs the adaptive schedule's blend path ``(1 - lam) nll + lam f`` at lam = 0.5;
  ``+adaptive-exp`` the ``schedule_mode="exponent"`` path ``power:(lam k)``.
- ``paper:<spec>``: the paper repo's approach (GaotangLi/Beyond-Log-Likelihood, verl SFT trainer): full
  ``[N, V]`` logits from the LM head, ``log_softmax(logits.float())``, ``gather`` of the target, f(p), mean
  over the (kept) tokens. For ``deft`` / ``deft_cayley`` / ``eaft`` the gate comes from that full softmax (sum_v
  p_v^2, the entropy), as their authors' code computes it.

The "model" is the LM head only: a leaf ``hidden`` tensor ``[1, N + 1, H]`` (requires grad) stands for the
last hidden state, and the head weight ``[V, H]`` is trained (full fine-tuning, as in the paper) unless
``--frozen-head`` (LoRA / QLoRA: the head is frozen). Targets are planted so that p(target) spreads over
(0, 1) like a trained model's (thresholds keep a realistic share), and ``--ignore-frac`` of the labels are -100
(prompt tokens).

How memory is measured (peak of the step above what is live before it: activations, gradients, workspace):

- CUDA: ``torch.cuda.reset_peak_memory_stats()``, then ``max_memory_allocated()`` after the step minus
  ``memory_allocated()`` before it (live tensor bytes; the caching allocator's reserve is not counted).
- CPU: ``tracemalloc`` does not see torch's allocations and torch keeps no CPU peak counter, so the process runs
  with ``MALLOC_MMAP_THRESHOLD_=65536`` (the script re-executes itself with it): every allocation >= 64 KiB is
  its own ``mmap`` and goes back to the OS on free, so the resident set follows live tensor memory rather than
  glibc's arena high-water mark. Before each step the kernel's peak-RSS counter is reset
  (``echo 5 > /proc/self/clear_refs``, Linux >= 4.0); after it, ``VmHWM - VmRSS(before)`` is the peak resident
  memory the step added. Pages count when touched, which is what a real run pays. (Checked: a 512 MiB
  ``torch.ones`` reads as +512 MiB; 40 x 8 MiB allocated and freed read as their peak, not more.)

How time is measured: wall time of forward + backward (``torch.cuda.synchronize()`` before reading the clock on
GPU), median over ``--repeats`` repetitions after ``--warmup`` untimed rounds. All cases share one process, one
weight and one batch, and run interleaved round-robin (order reversed every other round), so drift on a shared
machine hits every case alike. Memory is deterministic; its median is reported too. The minimum is reported as
well (``x min``).

On a shared CPU, whole-step times drift by more than an objective adds, so each fused case's per-token part is
also timed alone (``--loss-reps`` times, on the head's real log-probs: the hook's ``ObjectiveHook.loss``
plus TRL's loss, forward and backward back to log p). The head kernel's backward does the same work whatever
gradient reaches it, so ``x decomp`` = (trl:nll's step - its per-token part + the case's per-token part) /
trl:nll's step is what the case costs relative to TRL, free of drift (``+loss us``: the per-token part's extra
time over trl:nll's).

Usage (CPU, the committed results)::

    python benchmarks/loss_memory.py

GPU, realistic sizes (Qwen2.5-7B head, 16k tokens, bf16)::

    python benchmarks/loss_memory.py --device cuda --dtype bfloat16 \\
        --config 152064x3584x16384 --config 152064x3584x8192 --config 32000x4096x8192 --repeats 10 \\
        --out benchmarks/results/loss_memory_gpu.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

DEFAULT_OBJECTIVES = ("nll", "p", "power:10", "top_p:0.2", "bottom_p:0.8", "top_logp:0.2", "dft", "deft",
                      "deft_cayley", "eaft:1")
DEFAULT_CASES = (
    ("trl:nll",)
    + tuple(f"prob:{spec}" for spec in DEFAULT_OBJECTIVES)
    + ("prob:power:10+adaptive", "prob:power:10+adaptive-exp", "paper:nll", "paper:power:10", "paper:deft",
       "paper:deft_cayley", "paper:eaft:1")
)
DEFAULT_CONFIGS = ("32000x2048x128", "152064x3584x16")
# SFTTrainer patches its model with these outputs (trl/trainer/sft_trainer.py)
SFT_OUTPUTS = ("log_probs", "entropy", "is_top1")
REFERENCE = "trl:nll"
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


# --------------------------------------------------------------------------------------------- the head-only model


class _Backbone(torch.nn.Module):
    def forward(self, inputs_embeds=None, **kwargs):
        return SimpleNamespace(last_hidden_state=inputs_embeds)


class HeadOnlyLM(torch.nn.Module):
    """A causal LM whose backbone is the identity on ``inputs_embeds``: only the LM head and the loss cost anything.

    It has what ``add_fused_lm_head`` looks up (``config``, ``base_model``, ``get_output_embeddings``); its own
    forward returns the full logits, like any ``*ForCausalLM``.
    """

    def __init__(self, vocab: int, hidden: int, dtype: torch.dtype, device: str, frozen_head: bool):
        super().__init__()
        from transformers import LlamaConfig

        self.config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=0)
        self.model = _Backbone()
        self.lm_head = torch.nn.Linear(hidden, vocab, bias=False, device=device, dtype=dtype)
        self.lm_head.weight.requires_grad_(not frozen_head)

    @property
    def base_model(self):
        return self.model

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, inputs_embeds=None, **kwargs):
        return SimpleNamespace(logits=self.lm_head(self.model(inputs_embeds).last_hidden_state))


def make_inputs(vocab: int, hidden: int, tokens: int, dtype: torch.dtype, device: str, ignore_frac: float, seed: int):
    """Weight ~ N(0, 0.02^2); hidden states = noise + a planted multiple of the target's head row, so the target's
    logit is log V + U(-3, 5) above the others' ~0, so p(target) spreads over (0.05, 0.99) (mean ~0.6)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    weight = (torch.randn(vocab, hidden, generator=g) * 0.02).to(device=device, dtype=dtype)
    labels = torch.randint(0, vocab, (1, tokens + 1), generator=g)
    margin = math.log(vocab) + torch.empty(tokens + 1).uniform_(-3.0, 5.0, generator=g)
    # position t predicts label t + 1 (the causal shift): plant the next label's head row in hidden state t
    next_labels = torch.cat([labels[0, 1:], labels[0, :1]]).to(device)
    rows = weight[next_labels].float()
    scale = (margin.to(device) / rows.pow(2).sum(-1)).unsqueeze(-1)
    h = torch.randn(tokens + 1, hidden, generator=g).to(device) * 0.5 + scale * rows
    hidden_states = h.to(dtype).unsqueeze(0).contiguous()
    ignored = torch.rand(1, tokens + 1, generator=g) < ignore_frac
    labels = labels.masked_fill(ignored, -100).to(device)
    return weight, hidden_states, labels


# --------------------------------------------------------------------------------------------- the cases


def objective_hook(spec: str, schedule: str, mode: str, lam: float, vocab: int):
    """trl-prob's per-micro-batch seam, as ``ProbSFTTrainer`` builds it (``trainer.objective_hook``), at lambda ``lam``."""
    from trl_prob.experimental import ExperimentalSFTConfig as ProbSFTConfig  # the research knobs
    from trl_prob.hook import ObjectiveHook

    hook = ObjectiveHook(ProbSFTConfig(
        output_dir=os.path.join(tempfile.gettempdir(), "trl-prob-bench"),  # never written
        objective=spec, objective_schedule=schedule, schedule_mode=mode, report_to="none",
        use_cpu=not torch.cuda.is_available(),
    ), vocab_size=vocab)  # fmt: skip
    hook.schedule.value = lam
    return hook


def parse_case(case: str) -> dict:
    kind, _, rest = case.partition(":")
    if kind == "trl":
        if rest != "nll":
            raise ValueError(f"{case!r}: TRL's fused head trains nll only")
        return {"kind": "trl", "spec": "nll"}
    spec, schedule, mode = rest, "none", "blend"
    if rest.endswith("+adaptive"):
        spec, schedule = rest[: -len("+adaptive")], "adaptive"
    elif rest.endswith("+adaptive-exp"):
        spec, schedule, mode = rest[: -len("+adaptive-exp")], "adaptive", "exponent"
    if kind not in ("prob", "paper") or (kind == "paper" and schedule != "none"):
        raise ValueError(f"Unknown case {case!r}")
    return {"kind": kind, "spec": spec, "schedule": schedule, "mode": mode}


def build_step(case: str, model: HeadOnlyLM, lam: float):
    """A closure running forward + backward of the loss for ``case`` on ``model``; returns the loss."""
    from trl.trainer.utils import add_fused_lm_head

    from trl_prob import get_objective

    from trl_prob.head import HeadTokens

    info = parse_case(case)
    vocab = model.config.vocab_size
    if info["kind"] in ("trl", "prob"):
        hook = None
        if info["kind"] == "prob":
            lam = lam if info["schedule"] != "none" else 1.0
            hook = objective_hook(info["spec"], info["schedule"], info["mode"], lam, vocab)
        add_fused_lm_head(model, outputs=hook.head_outputs if hook is not None else SFT_OUTPUTS)

        def step(hidden_states, labels):
            outputs = model(inputs_embeds=hidden_states, labels=labels, fused_lm_head=True)
            if hook is not None:  # what the trainer's forward hook does inside compute_loss
                hook.step_stats = None  # the trainer drops it once per optimizer step
                outputs.log_probs = -hook.loss(HeadTokens.from_outputs(outputs, vocab), {})
            # SFTTrainer.compute_loss, loss_type="nll"
            per_token_loss = -outputs.log_probs
            loss = per_token_loss.sum() / outputs.label_mask.sum().clamp(min=1)
            loss.backward()
            return loss

        def loss_only(tokens):
            """The same step past the head: what the case adds on top of the kernel, forward and backward."""
            log_probs, mask = tokens.log_p, tokens.mask
            if hook is not None:
                hook.step_stats = None
                log_probs = -hook.loss(tokens, {})
            loss = (-log_probs).sum() / mask.sum().clamp(min=1)
            loss.backward()
            return loss

        step.loss_only = loss_only
        return step

    objective = get_objective(info["spec"])

    def paper_step(hidden_states, labels):
        logits = model(inputs_embeds=hidden_states).logits[:, :-1]  # [1, N, V] in the weight dtype
        targets = labels[:, 1:]
        mask = targets != -100
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        log_p = log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        tokens = None
        if objective.row.takes_tokens:  # DEFT / EAFT as their authors run them: the gate from the full fp32 softmax
            probs = log_probs.exp()
            tokens = HeadTokens(log_p, mask, entropy=-(probs * log_probs).sum(-1).detach(),
                                log_sum_sq_probs=probs.pow(2).sum(-1).log().detach(), vocab_size=vocab)  # fmt: skip
        loss_mask = mask
        if objective.is_thresholded:
            loss_mask = mask & objective.keep(log_p)
        loss = (objective(log_p, tokens) * loss_mask).sum() / (loss_mask.sum() + 1e-8)
        loss.backward()
        return loss

    return paper_step


# --------------------------------------------------------------------------------------------- one measurement


def _proc_status(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # MiB
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def setup(config: dict, args) -> tuple:
    dtype = getattr(torch, args.dtype)
    model = HeadOnlyLM(config["vocab"], config["hidden"], dtype, args.device, args.frozen_head)
    weight, hidden_states, labels = make_inputs(
        config["vocab"], config["hidden"], config["tokens"], dtype, args.device, args.ignore_frac, args.seed
    )
    with torch.no_grad():
        model.lm_head.weight.copy_(weight)
    del weight
    hidden_states.requires_grad_(True)
    return model, hidden_states, labels


def _zero_grads(model, hidden_states):
    model.lm_head.weight.grad = None
    hidden_states.grad = None


class PeakMemory:
    """Peak memory a step adds above what is live before it, in MiB (see the module docstring for the method)."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            self.base = _proc_status("VmRSS")
            _reset_peak_rss()

    def stop(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - self.base) / 2**20
        return _proc_status("VmHWM") - self.base


def run(config: dict, cases: list[str], args) -> dict:
    samples = {case: {"time_s": [], "peak_mib": [], "loss": None} for case in cases}
    model, hidden_states, labels = setup(config, args)
    steps = {}
    for case in cases:
        # add_fused_lm_head and the trainer wrapper patch a model in place: one head-only model per case, all
        # sharing the same weight Parameter, hidden states and labels
        case_model = HeadOnlyLM.__new__(HeadOnlyLM)
        torch.nn.Module.__init__(case_model)
        case_model.config, case_model.model, case_model.lm_head = model.config, model.model, model.lm_head
        steps[case] = build_step(case, case_model, args.lam)
    for _ in range(args.warmup):
        for case in cases:
            steps[case](hidden_states, labels)
            _zero_grads(model, hidden_states)
    # The per-token part alone, on the head's real log-probs (forward + backward back to log p), many times: the
    # head kernel does the same work whatever gradient arrives, so this difference is all a case adds to the step
    from trl_prob.head import HeadTokens

    fused = [c for c in cases if hasattr(steps[c], "loss_only")]
    loss_only_s = {}
    if fused:
        with torch.no_grad():
            outputs = _fused_outputs(model, hidden_states, labels)
        for case in fused:
            times = []
            for i in range(args.loss_reps + 5):
                leaf = outputs.log_probs.detach().clone().requires_grad_(True)
                tokens = HeadTokens.from_outputs(outputs, model.config.vocab_size).with_log_p(leaf)
                _sync(args.device)
                start = time.perf_counter()
                steps[case].loss_only(tokens)
                _sync(args.device)
                if i >= 5:
                    times.append(time.perf_counter() - start)
            loss_only_s[case] = times
    memory = PeakMemory(args.device)
    for rep in range(args.repeats):
        order = cases if rep % 2 == 0 else cases[::-1]  # alternate the order: no case always runs first
        for case in order:
            _zero_grads(model, hidden_states)
            memory.start()
            start = time.perf_counter()
            loss = steps[case](hidden_states, labels)
            _sync(args.device)
            elapsed = time.perf_counter() - start
            peak = memory.stop()
            samples[case]["time_s"].append(elapsed)
            samples[case]["peak_mib"].append(peak)
            samples[case]["loss"] = loss.item()
            del loss
            _zero_grads(model, hidden_states)
            print(f"  [{rep + 1}/{args.repeats}] {case:28s} {1e3 * elapsed:9.1f} ms {peak:9.1f} MiB", flush=True)
    for case, times in loss_only_s.items():
        samples[case]["loss_only_s"] = times
    return samples


def _fused_outputs(model: HeadOnlyLM, hidden_states, labels):
    """TRL's fused head outputs for the batch, from a freshly patched model sharing ``model``'s weight."""
    from trl.trainer.utils import add_fused_lm_head

    fresh = HeadOnlyLM.__new__(HeadOnlyLM)
    torch.nn.Module.__init__(fresh)
    fresh.config, fresh.model, fresh.lm_head = model.config, model.model, model.lm_head
    add_fused_lm_head(fresh, outputs=("log_probs", "is_top1", "entropy", "log_sum_sq_probs"))  # what any case reads
    return fresh(inputs_embeds=hidden_states, labels=labels, fused_lm_head=True)


# --------------------------------------------------------------------------------------------- reporting


def parse_config(text: str) -> dict:
    try:
        vocab, hidden, tokens = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"config {text!r}: expected VOCABxHIDDENxTOKENS, e.g. 152064x3584x8192") from None
    return {"name": text, "vocab": vocab, "hidden": hidden, "tokens": tokens}


def summarize(samples: dict) -> dict:
    ref = samples[REFERENCE] if REFERENCE in samples else None
    ref_t = statistics.median(ref["time_s"]) if ref else None
    ref_m = statistics.median(ref["peak_mib"]) if ref else None
    ref_min = min(ref["time_s"]) if ref else None
    # decomposed estimate: head time (trl:nll's step minus its own per-token part) + each case's per-token part
    ref_loss = statistics.median(ref["loss_only_s"]) if ref and "loss_only_s" in ref else None
    head = ref_t - ref_loss if ref_loss is not None else None
    out = {}
    for case, s in samples.items():
        t, m = statistics.median(s["time_s"]), statistics.median(s["peak_mib"])
        out[case] = {
            "time_s": s["time_s"],
            "peak_mib": s["peak_mib"],
            "time_s_median": t,
            "time_s_min": min(s["time_s"]),
            "peak_mib_median": m,
            "time_ratio_vs_trl_nll": t / ref_t if ref_t else None,
            "time_ratio_min_vs_trl_nll": min(s["time_s"]) / ref_min if ref_min else None,
            "mem_ratio_vs_trl_nll": m / ref_m if ref_m else None,
            "loss": s["loss"],
        }
        if "loss_only_s" in s and head is not None:
            part = statistics.median(s["loss_only_s"])
            out[case]["loss_only_s_median"] = part
            out[case]["loss_only_extra_s_vs_trl_nll"] = part - ref_loss
            out[case]["time_ratio_decomposed_vs_trl_nll"] = (head + part) / (head + ref_loss)
    return out


def print_table(config: dict, summary: dict, target: float) -> None:
    print(f"\nV={config['vocab']} H={config['hidden']} N={config['tokens']}  (ratios vs {REFERENCE}; target <= {target}x)")
    print(
        f"{'case':30s} {'time ms':>10s} {'x time':>7s} {'x min':>7s} {'+loss us':>9s} {'x decomp':>8s} "
        f"{'peak MiB':>10s} {'x mem':>7s}  loss"
    )
    for case, r in summary.items():
        extra = r.get("loss_only_extra_s_vs_trl_nll")
        decomposed = r.get("time_ratio_decomposed_vs_trl_nll")
        print(
            f"{case:30s} {1e3 * r['time_s_median']:10.1f} {r['time_ratio_vs_trl_nll']:7.3f} "
            f"{r['time_ratio_min_vs_trl_nll']:7.3f} "
            + (f"{1e6 * extra:9.1f} {decomposed:8.4f} " if extra is not None else f"{'-':>9s} {'-':>8s} ")
            + f"{r['peak_mib_median']:10.1f} {r['mem_ratio_vs_trl_nll']:7.3f}  {r['loss']:.4f}"
        )


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = results["configs"]
    fig, axes = plt.subplots(len(configs), 2, figsize=(13, 3.6 * len(configs)), squeeze=False)
    for row, config in enumerate(configs):
        cases = list(config["cases"])
        for col, (key, label) in enumerate((("time_ratio_vs_trl_nll", "time"), ("mem_ratio_vs_trl_nll", "peak memory"))):
            ax = axes[row][col]
            values = [config["cases"][c][key] for c in cases]
            colors = ["tab:gray" if c == REFERENCE else "tab:red" if c.startswith("paper") else "tab:blue" for c in cases]
            ax.bar(range(len(cases)), values, color=colors)
            ax.axhline(1.10, color="k", ls="--", lw=0.8)
            ax.set_xticks(range(len(cases)))
            ax.set_xticklabels(cases, rotation=60, ha="right", fontsize=7)
            ax.set_ylabel(f"{label} / trl:nll")
            ax.set_title(f"V={config['vocab']} H={config['hidden']} N={config['tokens']}: {label}", fontsize=9)
            for i, v in enumerate(values):
                ax.text(i, v, f"{v:.2f}", ha="center", va="bottom", fontsize=6)
    fig.suptitle(f"LM head + loss, fwd+bwd ({results['meta']['device']}, {results['meta']['dtype']}); dashed: 1.10x", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu} ({torch.get_num_threads()} threads)"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", type=parse_config, help="VOCABxHIDDENxTOKENS (repeatable)")
    parser.add_argument("--case", action="append", help=f"cases to run (default: {', '.join(DEFAULT_CASES)})")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="head/hidden dtype (default: bfloat16 on GPU, float32 on CPU)")
    parser.add_argument("--frozen-head", action="store_true", help="LM head weight frozen (LoRA/QLoRA)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repetitions per case (default 3 CPU / 10 GPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds before timing (default 1 CPU / 2 GPU)")
    parser.add_argument("--loss-reps", type=int, default=200, help="repetitions of the per-token part alone")
    parser.add_argument("--ignore-frac", type=float, default=0.25, help="share of labels that are -100")
    parser.add_argument("--lam", type=float, default=0.5, help="schedule lambda for the +adaptive cases")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads on CPU (default 1: see benchmarks/README.md; 0: torch's default)"
    )
    parser.add_argument("--target", type=float, default=1.10)
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/loss_memory_<device>.json)")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--flush-denormal", action="store_true",
                        help="torch.set_flush_denormal(True) (CPU): subnormal floats are computed as 0")
    args = parser.parse_args(argv)
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    on_gpu = args.device.startswith("cuda")
    if args.repeats is None:
        args.repeats = 10 if on_gpu else 3
    if args.warmup is None:
        args.warmup = 2 if on_gpu else 1
    if args.threads and not on_gpu:
        torch.set_num_threads(args.threads)
    if args.flush_denormal and not on_gpu:
        torch.set_flush_denormal(True)

    if not on_gpu and os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":
        # glibc reads it at start-up only: re-execute with it (see "How memory is measured")
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONUNBUFFERED="1")
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *(sys.argv[1:] if argv is None else argv)], env)

    configs = args.config or [parse_config(c) for c in DEFAULT_CONFIGS]
    cases = args.case or list(DEFAULT_CASES)
    for case in cases:
        parse_case(case)
    if REFERENCE not in cases:
        cases.insert(0, REFERENCE)
    import transformers
    import trl

    results = {
        "meta": {
            "benchmark": "loss_memory",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": device_name(args.device),
            "dtype": args.dtype,
            "frozen_head": args.frozen_head,
            "ignore_frac": args.ignore_frac,
            "lambda": args.lam,
            "repeats": args.repeats,
            "cpu_threads": None if on_gpu else torch.get_num_threads(),
            "flush_denormal": bool(args.flush_denormal) and not on_gpu,
            "warmup": args.warmup,
            "torch": torch.__version__,
            "trl": trl.__version__,
            "transformers": transformers.__version__,
            "command": " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
            "memory_method": (
                "torch.cuda.max_memory_allocated() - memory_allocated() before the step"
                if on_gpu
                else "MALLOC_MMAP_THRESHOLD_=65536 (large frees return to the OS); VmHWM after the step - VmRSS "
                "before it, peak RSS reset via /proc/self/clear_refs before each step"
            ),
            "reference": REFERENCE,
        },
        "configs": [],
    }
    for config in configs:
        print(f"V={config['vocab']} H={config['hidden']} N={config['tokens']} on {args.device} ({args.dtype})", flush=True)
        samples = run(config, cases, args)
        summary = summarize(samples)
        print_table(config, summary, args.target)
        results["configs"].append({**{k: config[k] for k in ("vocab", "hidden", "tokens")}, "cases": summary})

    out = args.out or os.path.join(RESULTS, f"loss_memory_{'gpu' if on_gpu else 'cpu'}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"\nwrote {out}")
    if not args.no_plot:
        png = os.path.splitext(out)[0] + ".png"
        plot(results, png)
        print(f"wrote {png}")


if __name__ == "__main__":
    main()
