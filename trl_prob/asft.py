"""ASFT's anchor on the fused head: KL(q_ref || p_model) per target token, in chunks, without [tokens x vocab] logits.

ASFT (arXiv 2509.23753) trains, per target token, -sg(p) log p + alpha KL(q_ref || p_model), the KL summed over the
vocabulary (the family row is in :mod:`trl_prob.objectives`). Its authors' code and LLaMA-Factory keep a second full
model copy and the full fp32 logits of both. Here:

- the model's own final hidden states are captured by a forward hook on its decoder backbone (the module TRL's fused
  forward calls, ``model.base_model``), then sliced exactly as TRL slices them (``hidden[:, :-1]`` against
  ``labels[:, 1:]``, or unshifted with ``shift_labels``) at the label mask TRL returns, so the KL lines up with
  ``outputs.log_probs`` token for token;
- the reference's hidden states come from one ``torch.no_grad`` forward of the same backbone, same inputs, with the
  adapters disabled (PEFT's ``disable_adapter()``; LoRA) and the modules in eval mode, or from a reference model named
  by ``ProbSFTConfig.ref_model_name_or_path`` (full fine-tuning), each through its own LM head;
- the KL is TRL's ``ChunkedDivergenceFunction`` (``trl.kernels.chunked_divergence``, the kernel of TRL's
  DistillationTrainer) with ``beta=0``, i.e. KL(teacher || student): tiles of 4096 tokens x 32768 vocabulary entries,
  both projections recomputed in backward, the gradient (p - q) per token to the model's hidden states (and to its LM
  head when that trains), none to the reference. Triton kernels on GPU, torch tiles elsewhere.

The trainer hands the KL to the objective in :attr:`trl_prob.head.HeadTokens.ref_kl`; everything else (schedules,
normalisation by TRL over target tokens, accumulation, DDP, checkpoints) is the per-token seam as for every objective.
Each optimizer step logs ``asft_kl``, its mean KL over the target tokens of all processes.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from dataclasses import replace

import torch
import transformers
from torch.distributed.tensor import DTensor
from accelerate.utils import is_peft_model
from packaging.version import Version

from .head import HeadTokens

logger = logging.getLogger(__name__)


def uses_reference(objective) -> bool:
    """Whether an objective (an :class:`~trl_prob.objectives.Objective`) reads the reference KL."""
    return objective.family == "asft"


def logit_transform(config) -> tuple[float, float | None]:
    """(logit scale, final logit softcapping) of a model, read as TRL's ``add_fused_lm_head`` reads them."""
    text_config = config.get_text_config()
    softcap = getattr(text_config, "final_logit_softcapping", None)
    scale = getattr(text_config, "logit_scale", None)
    if scale is None:
        scale = getattr(text_config, "output_multiplier", None)
    if scale is None:
        scale = getattr(text_config, "lm_head_multiplier", None)
    if scale is None and getattr(text_config, "logits_scaling", None) is not None:
        scale = text_config.logits_scaling if text_config.model_type == "hyperclovax" else 1 / text_config.logits_scaling
    return (1.0 if scale is None else scale), softcap


def backbone_of(model: transformers.PreTrainedModel) -> torch.nn.Module:
    """The decoder backbone TRL's fused forward calls: ``base_model`` (``model`` for vision-language models before
    transformers 5)."""
    text_config = model.config.get_text_config()
    if text_config is not model.config and Version(transformers.__version__) < Version("5.0.0"):
        return model.model
    return model.base_model


def reference_head(lm_head: torch.nn.Module) -> torch.nn.Module:
    """The LM head as the reference uses it: PEFT's original module under ``modules_to_save``, the base layer of a
    LoRA-adapted head (TRL's fused head reads that base weight for the model too), else the head itself."""
    original = getattr(lm_head, "original_module", None)
    if original is not None:
        return original
    if hasattr(lm_head, "get_base_layer"):
        return lm_head.get_base_layer()
    return lm_head


def chunked_kl(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, scale=1.0, softcap=None, ref_scale=1.0,
               ref_softcap=None) -> torch.Tensor:  # fmt: skip
    """KL(q_ref || p_model) per row of ``hidden`` [N, H] (fp32 [N]), through the LM heads, without [N x V] logits."""
    if hidden.shape[0] == 0:  # no target token: a zero that stays connected to the graph
        return hidden.sum(-1).float() * 0.0
    # FSDP2 shards the heads into DTensors: gathered once here, as TRL's fused head and distillation loss do
    weight, bias, ref_weight, ref_bias = (x.full_tensor() if isinstance(x, DTensor) else x
                                          for x in (weight, bias, ref_weight, ref_bias))  # fmt: skip
    kl, _ = chunked_divergence(
        student_hidden=hidden, student_weight=weight, student_bias=bias, teacher_hidden=ref_hidden.detach(),
        teacher_weight=ref_weight.detach(), teacher_bias=None if ref_bias is None else ref_bias.detach(),
        beta=0.0, temperature=1.0, student_logit_scale=scale, student_final_logit_softcapping=softcap,
        teacher_logit_scale=ref_scale, teacher_final_logit_softcapping=ref_softcap,
    )  # fmt: skip
    return kl.float()


# The parameters of TRL's `ChunkedDivergenceFunction.forward` (after `ctx`) that `chunked_kl` passes, in TRL's order;
# tests/test_asft.py checks them against `inspect.signature` of TRL's forward.
DIVERGENCE_PARAMETERS = (
    "student_hidden", "student_weight", "student_bias", "teacher_hidden", "teacher_weight", "teacher_bias", "beta",
    "temperature", "student_logit_scale", "student_final_logit_softcapping", "teacher_logit_scale",
    "teacher_final_logit_softcapping",
)  # fmt: skip


def chunked_divergence(**named):
    """TRL's ``ChunkedDivergenceFunction`` called by parameter name: a ``torch.autograd.Function`` takes its arguments
    positionally, so they are put in the order of TRL's ``forward`` signature here (a parameter TRL renamed or dropped
    is a ``TypeError`` naming it, never a value in the wrong slot)."""
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

    bound = inspect.signature(ChunkedDivergenceFunction.forward).bind(None, **named)  # None: `ctx`
    bound.apply_defaults()
    return ChunkedDivergenceFunction.apply(*bound.args[1:])


def reference_init_kwargs(args, dtype: torch.dtype) -> dict:
    """``from_pretrained`` keywords of a reference model: the run's ``model_init_kwargs`` (``revision``,
    ``trust_remote_code``, ``attn_implementation``, ...; ``trust_remote_code`` defaulting to ``args.trust_remote_code``,
    as TRL loads the model), in the trained model's dtype, whole on one device and unquantized (it is only read, in
    full precision beside the model)."""
    kwargs = dict(getattr(args, "model_init_kwargs", None) or {})
    for name in ("dtype", "torch_dtype", "device_map", "quantization_config"):
        kwargs.pop(name, None)
    kwargs.setdefault("trust_remote_code", getattr(args, "trust_remote_code", False))
    return {**kwargs, "dtype": dtype}


class AsftReference:
    """The reference of an ASFT run and the per-token KL to it, for one trainer's model.

    Args:
        model: the trained model as the trainer holds it (a ``PeftModel`` for LoRA).
        ref_model: a reference model (full fine-tuning), or None: the model itself with its adapters disabled.
    """

    def __init__(self, model, ref_model: transformers.PreTrainedModel | None = None):
        self.model = model
        self.base = model.get_base_model() if is_peft_model(model) else model
        self.ref_model = ref_model
        self.backbone = backbone_of(self.base)
        self.scale, self.softcap = logit_transform(self.base.config)
        self.ref_scale, self.ref_softcap = logit_transform((ref_model or self.base).config)
        self._captured = None
        self._in_reference = False
        self._handle = self.backbone.register_forward_hook(self._capture, with_kwargs=True)
        self.reference_passes = 0  # for tests and logs: how many reference forwards ran
        self._kl_sum = None  # [sum, count] of this optimizer step's training KL over its target tokens

    @classmethod
    def for_trainer(cls, model, args) -> AsftReference:
        """The reference ``args`` asks for: ``ref_model_name_or_path`` if set, else the adapters disabled (LoRA);
        full fine-tuning without a reference is refused in one line."""
        path = getattr(args, "ref_model_name_or_path", None)
        if path is None:
            if not is_peft_model(model):
                raise ValueError(
                    f"objective {args.objective!r} anchors the model to a reference, and full fine-tuning has none: "
                    "pass --ref_model_name_or_path (e.g. the model you start from), or train LoRA (--use_peft), whose "
                    "reference is its base with the adapters disabled."
                )
            return cls(model)
        base = model.get_base_model() if is_peft_model(model) else model
        weight = base.get_output_embeddings().weight
        ref_model = transformers.AutoModelForCausalLM.from_pretrained(path, **reference_init_kwargs(args, weight.dtype))
        ref_model.to(weight.device).eval().requires_grad_(False)
        ref_vocab = ref_model.get_output_embeddings().weight.shape[0]
        if ref_vocab != weight.shape[0]:
            raise ValueError(
                f"--ref_model_name_or_path {path}: its LM head has {ref_vocab} entries and the model's {weight.shape[0]}; "
                "ASFT's KL needs the same vocabulary."
            )
        return cls(model, ref_model)

    def remove(self) -> None:
        self._handle.remove()

    def _capture(self, module, args, kwargs, output):
        # only inside the trainer's compute_loss (not generate(), whose forwards the outer hook never sees)
        if not self._in_reference and self.active():
            self._captured = (args, kwargs, output.last_hidden_state)

    def take(self):
        """The backbone's inputs and hidden states of the forward just run (None if none), and forget them."""
        captured, self._captured = self._captured, None
        return captured

    @contextlib.contextmanager
    def _reference_mode(self):
        """No grad, eval mode (no dropout), adapters disabled (LoRA); everything restored on the way out."""
        self._in_reference = True
        modes = None
        try:
            with torch.no_grad():
                if self.ref_model is not None:
                    yield self.ref_model
                    return
                modes = [(module, module.training) for module in self.backbone.modules()]
                self.backbone.eval()
                with self.model.disable_adapter():
                    yield self.base
        finally:
            for module, training in modes or ():
                module.training = training
            self._in_reference = False

    def on_forward(self, module, args, kwargs, outputs):
        """Forward hook on the outermost model (ahead of the objective's): a fused-head forward inside ``compute_loss``
        gets ``outputs.ref_kl``, which :meth:`HeadTokens.from_outputs` reads."""
        captured = self.take()
        if captured is None or not kwargs.get("fused_lm_head") or not self.active():
            return outputs
        if getattr(outputs, "label_mask", None) is None:
            return outputs  # not TRL's fused output: the objective's hook refuses it, naming the head
        outputs.ref_kl = self.kl(outputs.label_mask, captured, shifted=kwargs.get("shift_labels") is not None)
        return outputs

    def active(self) -> bool:
        return True

    def add_kl(self, tokens: HeadTokens, captured, shifted: bool) -> HeadTokens:
        """``tokens`` with :attr:`~trl_prob.head.HeadTokens.ref_kl` (see :meth:`kl`)."""
        return replace(tokens, ref_kl=self.kl(tokens.mask, captured, shifted))

    def kl(self, mask: torch.Tensor, captured, shifted: bool) -> torch.Tensor:
        """KL(q_ref || p_model), fp32, at each target position of ``mask`` (TRL's label mask; 0 elsewhere), from the
        backbone's ``captured`` inputs and hidden states. ``shifted``: the forward got ``shift_labels`` (TRL scores
        them unshifted)."""
        args, kwargs, hidden = captured
        lm_head = self.base.get_output_embeddings()
        weight = lm_head.weight
        hidden = (hidden if shifted else hidden[:, :-1]).to(weight.device)
        with self._reference_mode() as reference:
            ref_hidden = backbone_of(reference)(*args, **kwargs).last_hidden_state
            ref_hidden = (ref_hidden if shifted else ref_hidden[:, :-1]).to(weight.device)
            ref_lm_head = reference_head(reference.get_output_embeddings())
            ref_weight, ref_bias = ref_lm_head.weight, ref_lm_head.bias
        self.reference_passes += 1
        kl = chunked_kl(hidden[mask], weight, lm_head.bias, ref_hidden[mask], ref_weight, ref_bias,
                        self.scale, self.softcap, self.ref_scale, self.ref_softcap)  # fmt: skip
        if self.base.training:
            step = torch.stack([kl.detach().double().sum(), torch.tensor(float(kl.numel()), dtype=torch.float64,
                                                                         device=kl.device)])  # fmt: skip
            self._kl_sum = step if self._kl_sum is None else self._kl_sum + step
        return kl.new_zeros(mask.shape).masked_scatter(mask, kl)

    def step_kl(self, device: torch.device | str = "cpu") -> float:
        """The mean KL(q_ref || p_model) over the optimizer step's target tokens on all processes (one all-reduce,
        called on every rank), and a fresh accumulator: the ``asft_kl`` metric. NaN for a step without targets."""
        from .loss import distributed_sum

        sums, self._kl_sum = self._kl_sum, None
        if sums is None:
            sums = torch.zeros(2, dtype=torch.float64, device=device)
        total, count = distributed_sum(sums.to(device)).tolist()
        return total / count if count else float("nan")


def attach_reference(trainer) -> AsftReference | None:
    """For an ASFT run: its reference, hooked onto ``trainer.model`` ahead of the objective's hook; else None.
    Refuses (one line) full fine-tuning without a reference, and a reference for an objective that reads none."""
    hook, args = trainer.objective_hook, trainer.args
    if not (hook.trains_objective and uses_reference(hook.objective)):
        if getattr(args, "ref_model_name_or_path", None) is not None:
            raise ValueError(
                f"--ref_model_name_or_path is the reference of objective asft; objective {args.objective!r} "
                f"(objective_schedule={args.objective_schedule!r}) reads none. Drop it, or use --objective asft."
            )
        return None
    from transformers import TrainerCallback

    reference = AsftReference.for_trainer(trainer.model, args)
    reference.active = lambda: trainer._in_compute_loss
    trainer.model.register_forward_hook(reference.on_forward, with_kwargs=True, prepend=True)

    class AsftKL(TrainerCallback):
        """Logs ``asft_kl`` (the step's mean KL to the reference) with the objective's metrics, on every rank."""

        def on_step_end(self, args, state, control, **kwargs):
            trainer.objective_hook.metrics["asft_kl"].append(reference.step_kl(args.device))

    trainer.add_callback(AsftKL())
    return reference
