"""Layer-wise learning rates (placeholder header; the measurement lands with its issue)."""

import torch


def param_groups(model: torch.nn.Module, multipliers: dict[str, float] | None, weight_decay: float, scale_decay: bool = True) -> list[dict]:
    """torch-style param groups, each carrying `lr_scale` (the timm convention).

    Parameters with the same (lr_scale, weight_decay) share a group: one global rate gives 2 groups,
    layer-wise rates about one per layer. Matrices and embeddings are decayed; biases and LayerNorm
    scales are not (nanoGPT, GPT-3). With scale_decay=False the decay is divided by lr_scale so the
    per-step decay lr * weight_decay stays the global one while the gradient step is scaled.
    """
    multipliers = multipliers or {}
    groups: dict[tuple[float, float], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lr_scale = float(multipliers.get(name, 1.0))
        decay = weight_decay if p.dim() >= 2 else 0.0
        if not scale_decay:
            decay /= lr_scale
        group = groups.setdefault((lr_scale, decay), {"params": [], "names": [], "lr_scale": lr_scale, "weight_decay": decay})
        group["params"].append(p)
        group["names"].append(name)
    return list(groups.values())
