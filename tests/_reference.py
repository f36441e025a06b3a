"""The references the objective tests compare against, shared by several test modules: the paper's f(p) written in p
space, and the loss through the model's full logits."""

import torch


def paper_formula(spec: str, p: torch.Tensor) -> torch.Tensor:
    """f(p) straight from the paper's table, in float64 and in p space."""
    family, _, param = spec.partition(":")
    q = float(param) if param else None
    if family in ("nll", "dft"):
        return -torch.log(p)
    if family == "p":
        return 1 - p
    if family == "power":
        return (1 - p**q) / q
    keep = (p >= q) if family.startswith("top") else (p <= q)
    base = (1 - p) if family.endswith("_p") else -torch.log(p)
    return base * keep


def completion_mask(input_ids, attention_mask, tokenizer):
    """Positions of completion tokens (after '='), as the targets of the shifted next-token prediction."""
    equals = tokenizer.convert_tokens_to_ids("=")
    after_equals = (input_ids == equals).long().cumsum(dim=1) - (input_ids == equals).long() > 0
    return (after_equals & attention_mask.bool())[:, 1:]


def paper_loss(log_p, mask, spec, lam=1.0):
    """The step loss from target log-probabilities, as the paper normalises it: (1 - lam) NLL + lam f, f averaged over
    the kept tokens for a thresholded family, over all target tokens otherwise; and f per token."""
    p = log_p.exp()
    family, _, param = spec.partition(":")
    per_token = -log_p * p.detach() if family == "dft" else paper_formula(spec, p)  # differentiable through p
    if family.startswith(("top", "bottom")):
        q = float(param)
        keep = ((p >= q) if family.startswith("top") else (p <= q)) & mask
        target = (per_token * keep).sum() / keep.sum()
    else:
        target = (per_token * mask).sum() / mask.sum()
    nll = (-log_p * mask).sum() / mask.sum()
    return (1 - lam) * nll + lam * target, per_token


def reference_loss(model, inputs, spec, tokenizer, lam=1.0):
    logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits.float()
    log_probs = torch.log_softmax(logits[:, :-1], dim=-1)
    targets = inputs["input_ids"][:, 1:]
    mask = completion_mask(inputs["input_ids"], inputs["attention_mask"], tokenizer)
    log_p = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    loss, per_token = paper_loss(log_p, mask, spec, lam)
    return loss, per_token * mask, mask
