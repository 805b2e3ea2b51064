"""The output layer and cross-entropy together, a chunk of rows at a time, forward and backward, so the
(N, vocab) logits never exist in full.

With GPT-2's vocabulary the logits are the largest tensor of a step: 2,048 rows x 50,257 fp32 is 412 MB,
built and read several times over (the matmul, log-softmax, its gradient), and on a CPU most of the
step's time is the output layer and the loss (85% of the default run's). Here each chunk of
`chunk_rows` rows computes its logits, its loss and, when a gradient is wanted, its gradients with
respect to the hidden states and the weight at once (as Liger-Kernel's fused linear cross-entropy
does), so backward has only to scale them. The matmuls run on the weight padded with zero rows to a
multiple of 64 (the padded logits are masked to -inf): a 50,304-row matmul is faster than a
50,257-row one, and the parameter keeps GPT-2's shape. Mean over targets != -1, as F.cross_entropy
with ignore_index=-1.
"""

import torch
import torch.nn.functional as F

PAD_ROWS_TO = 64


class LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows: int):
        """hidden (N, C), weight (V, C), targets (N,) -> mean cross-entropy of hidden @ weight.T."""
        rows, vocab = hidden.shape[0], weight.shape[0]
        padded = -vocab // PAD_ROWS_TO * -PAD_ROWS_TO
        weight_padded = F.pad(weight, (0, 0, 0, padded - vocab))  # (padded, C), zero rows past vocab
        if torch.is_autocast_enabled(hidden.device.type):
            # Cast once: autocast would cast this non-leaf weight (6.4M elements for GPT-2) again at each of
            # the three matmuls of every chunk.
            weight_padded = weight_padded.to(torch.get_autocast_dtype(hidden.device.type))
        wants_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        accumulate = torch.promote_types(hidden.dtype, torch.float32)  # fp32 at least: bf16 logits and sums would round
        valid = targets != -1
        count = valid.sum().to(accumulate)
        loss_sum = torch.zeros((), dtype=accumulate, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if wants_grad else None
        grad_weight = torch.zeros(weight_padded.shape, dtype=accumulate, device=weight.device) if wants_grad else None
        for start in range(0, rows, chunk_rows):
            h = hidden[start : start + chunk_rows]  # (n, C)
            y = targets[start : start + chunk_rows].clamp(min=0)
            keep = valid[start : start + chunk_rows]
            logits = (h @ weight_padded.t()).to(accumulate)  # (n, padded)
            logits[:, vocab:] = float("-inf")
            logsumexp = torch.logsumexp(logits, dim=1)
            picked = logits.gather(1, y[:, None]).squeeze(1)
            loss_sum += torch.where(keep, logsumexp - picked, 0.0).sum()
            if wants_grad:  # d loss / d logits = (softmax - onehot) / count, built in place in the logits
                probs = logits.sub_(logsumexp[:, None]).exp_()
                probs.scatter_add_(1, y[:, None], torch.full_like(picked, -1.0)[:, None])
                probs.mul_(torch.where(keep, 1.0 / count, 0.0)[:, None])
                probs = probs.to(h.dtype)
                grad_hidden[start : start + chunk_rows] = probs @ weight_padded
                grad_weight += probs.t() @ h
        if wants_grad:
            ctx.save_for_backward(grad_hidden, grad_weight[:vocab].to(weight.dtype))
        return loss_sum / count

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss, grad_weight * grad_loss, None, None


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int
) -> torch.Tensor:
    """Mean cross-entropy of the logits hidden @ weight.T (..., vocab) against targets (...), computed in
    chunks of chunk_rows rows; equals F.cross_entropy(logits, targets, ignore_index=-1) in value and gradients."""
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows={chunk_rows} must be >= 1")
    return LinearCrossEntropy.apply(hidden.reshape(-1, hidden.size(-1)), weight, targets.reshape(-1), chunk_rows)


def sampled_label_loss(logits: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits (..., vocab) against labels sampled from their own softmax. Over N
    tokens its gradient g_hat has E[N g_hat g_hat^T] = the Gauss-Newton matrix: Sophia's estimator of its
    diagonal (optim.SophiaG.after_step, through optim.sampled_label_gradients), and LW-AS's
    Gauss-Newton curvature (lwas.Curvature)."""
    logits = logits.float().view(-1, logits.size(-1))  # (N, vocab)
    with torch.no_grad():
        # Non-finite logits (a diverged step) would make the sampler raise; sample from finite stand-ins
        # instead, so the loss below comes out non-finite and the caller's guard skips the refresh.
        sampled = torch.distributions.Categorical(logits=torch.where(torch.isfinite(logits), logits, 0.0)).sample()
    return F.cross_entropy(logits, sampled)
