"""Labels sampled from the model's own predictions: the Gauss-Newton-Bartlett estimator (Liu et al. 2023)
that SophiaG's Hessian refresh and LW-AS's gauss_newton curvature share. Over N tokens the gradient g_hat
of the sampled-label loss has E[N g_hat g_hat^T] = the Gauss-Newton matrix, for one forward and one
backward: no double backward, no forward-mode AD.
"""

import torch
import torch.nn.functional as F

from optimizers.base import StepContext
from runtime.fsdp import local


def sampled_label_loss(logits: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits (..., vocab) against labels sampled from their own softmax. Over N
    tokens its gradient g_hat has E[N g_hat g_hat^T] = the Gauss-Newton matrix: Sophia's estimator of its
    diagonal (sophiag.SophiaG.after_step, through sampled_label_gradients), and LW-AS's
    Gauss-Newton curvature (curvature.Curvature)."""
    logits = logits.float().view(-1, logits.size(-1))  # (N, vocab)
    with torch.no_grad():
        # Non-finite logits (a diverged step) would make the sampler raise; sample from finite stand-ins
        # instead, so the loss below comes out non-finite and the caller's guard skips the refresh.
        sampled = torch.distributions.Categorical(logits=torch.where(torch.isfinite(logits), logits, 0.0)).sample()
    return F.cross_entropy(logits, sampled)


def sampled_label_gradients(context: StepContext) -> None:
    """Gradients of the loss against labels sampled from the model's own predictions over the step's
    micro-batches (SophiaG's Gauss-Newton-Bartlett estimator, Liu et al. 2023). A non-finite one counts the
    step as bad (found_inf): on the device, and the same on every rank (DDP averaged the gradients; under
    fsdp each rank sees its own shard, so the flag is reduced)."""
    batches = context.micro_batches
    for micro, (x, _) in enumerate(batches):
        with context.autocast, context.sync(micro == len(batches) - 1):
            logits, _ = context.model(x)
            (sampled_label_loss(logits) / len(batches)).backward()
    grads = [local(p.grad) for p in context.raw_model.parameters() if p.grad is not None]
    non_finite = torch.isfinite(torch.stack(torch._foreach_norm(grads)).sum()).logical_not().float()
    if context.sharded:
        non_finite = context.reduce_mean(non_finite)  # above 0 on every rank when any rank's shard is bad
    torch.logical_or(context.found_inf, non_finite > 0, out=context.found_inf)
