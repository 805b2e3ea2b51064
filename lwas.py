"""Layer-wise adaptive step sizes (LW-AS): SGD with momentum and AdamW whose step size for each layer
(parameter tensor) comes from the curvature along that layer's own update direction.

    Bahamou and Goldfarb 2023, "Layer-wise Adaptive Step-Sizes for Stochastic First-Order Methods for
    Deep Learning", arXiv 2305.13664.

Only the paper's abstract is public (no full text, no code), so this is a reconstruction.

The paper's: a base optimizer gives each layer l a direction d_l, and the layer's step size is the
damped-Newton step for self-concordant functions along d_l, from the layer's diagonal Hessian block H_ll:
    rho_l = g_l . d_l,   delta_l = sqrt(d_l . H_ll . d_l),   alpha_l = rho_l / (delta_l (delta_l + rho_l)),
    theta_l -= eta * alpha_l * d_l,   with decoupled weight decay theta_l -= eta * alpha_l * wd * theta_l.

Ours, where the abstract says nothing:
  - the step sizes are refreshed every `lw_interval` steps (the optimizer's before_step hook runs refresh()
    before step(), optim.StepHooks) and held in between;
  - rho_l, q_l = d_l . C_ll . d_l and |d_l|^2 are averaged over refreshes (an EMA with `beta`,
    bias-corrected), since one batch's curvature estimate is noisy; alpha_l comes from the averages;
  - damping: delta_l = sqrt(max(q_l, 0) + damping * |d_l|^2), so zero or negative curvature still gives a
    finite step; alpha_l = 0 when rho_l <= 0 (d_l is no descent direction on average); alpha_l <= alpha_max;
  - the first `warmup_steps` steps take the plain step size `warmup_lr` while the averages fill;
  - eta is the training schedule's lr (1.0: the step sizes as computed) times the group's lr_scale, so
    lr_rule=lwlr's multiplier eta_l multiplies alpha_l;
  - the curvature C: `exact`, `rademacher` or `gauss_newton` (see Curvature);
  - joint rescale (optional): every layer steps at once, and cross-layer curvature can make the joint
    step overshoot when no layer's own step does. With u = (eta eta_l alpha_l d_l) over all layers,
    c = min(1, g.u / u.C.u), the Newton step along u, scales every alpha_l until the next refresh;
  - DDP: rho_l from the all-reduced gradient (the same on every rank); the curvature terms are measured
    on each rank's own batch and averaged over the ranks, gauss_newton's block terms from the gradient of
    all ranks' sampled labels together (Curvature);
  - fsdp (gauss_newton only): rho_l, |d_l|^2 and the block terms' d_l . g_hat_l are sums over the shards,
    summed over the ranks; g_hat comes from the sharded model's own backward, and the joint term's JVP runs
    the model's stages one at a time on gathered weights (sharded_gauss_newton_quadratic_form), so every
    number is DDP's on the same ranks.

The step itself is the fused step of optim.py: the AdamW and SGD-momentum kernels read each tensor's step
size from a device scalar (its "step_size" state), so a refresh costs no host sync and no recompile.
"""

import math
from contextlib import nullcontext
from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.func import functional_call, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

import kernels
import optim
import parallel
from loss import sampled_label_loss
from parallel import local

CURVATURES = ("gauss_newton", "rademacher", "exact")


def check_curvature(kind: str) -> None:
    if kind not in CURVATURES:
        raise ValueError(f"curvature={kind!r}: choose one of {', '.join(CURVATURES)}")


class Curvature:
    """One refresh's curvature along the layers' directions d_l, on one batch (x, y) of `model`, whose
    forward(x, y) returns (logits, mean loss).

    exact         d_l . H_ll . d_l, one Hessian-vector product per layer (L double backwards): small
                  models and tests.
    rademacher    one HVP along u = (s_l d_l) with random signs s_l = +-1: q_l = s_l d_l . (H u)_l. Unbiased
                  (E[s_l s_k] = 0 for k != l), noisy through the cross-layer terms, and it can be negative.
    gauss_newton  the Gauss-Newton block d_l . G_ll . d_l, estimated as Sophia's GNB estimator estimates the
                  diagonal: labels sampled from the model's own predictions, g_hat the gradient of their
                  mean loss over N tokens; N (d_l . g_hat_l)^2 is unbiased for d_l . G_ll . d_l (the sampled
                  residuals have covariance softmax's Hessian and are independent across tokens), is never
                  negative, and costs one forward and backward: no double backward, no forward-mode AD.
                  Over R ranks g_hat is the mean gradient over all R N tokens (the mean of the ranks'
                  d_l . g_hat_l, times R N): one estimate from the whole batch, however it is spread.
    joint_term(u) is u . C . u along a whole-model vector: one more HVP for exact and rademacher; for
    gauss_newton (J u)^T H_out (J u) / N, exact, from one forward-mode JVP of the logits.

    Double backward and forward-mode AD run under the math SDPA kernel (flash attention implements neither)
    and need the uncompiled model. `reduce` averages a result over DDP ranks. `sharded`: the model is
    fsdp's (its parameters DTensors, the directions this rank's shards of them); gauss_newton only.
    """

    def __init__(
        self,
        kind: str,
        model: torch.nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        ctx=None,
        reduce=None,
        sharded: bool = False,
    ):
        check_curvature(kind)
        if sharded and kind not in parallel.SHARDABLE_CURVATURES:  # the config refuses it first (parallel.check)
            raise ValueError(f"curvature={kind!r} cannot run on a sharded model")
        self.kind, self.model, self.x, self.y, self.sharded = kind, model, x, y, sharded
        self.ctx = ctx if ctx is not None else nullcontext()
        self.reduce = reduce or (lambda t: t)
        self.ranks = dist.get_world_size() if reduce is not None else 1
        self._grads = None  # the loss gradient with its graph (exact, rademacher)

    def _loss_gradients(self, params):
        if self._grads is None:
            with self.ctx, sdpa_kernel(SDPBackend.MATH):
                _, loss = self.model(self.x, self.y)
            self._grads = torch.autograd.grad(loss, params, create_graph=True)
        return self._grads

    def block_terms(
        self, params: list[torch.Tensor], directions: list[torch.Tensor], signs: torch.Tensor | None = None
    ) -> torch.Tensor:
        """q_l, an estimate of d_l . C_ll . d_l for every layer: a float32 vector of len(params).
        `signs` fixes rademacher's s_l (tests); by default they are drawn from torch's RNG."""
        if self.kind == "gauss_newton":
            return self.reduce(self._gauss_newton_blocks(params, directions))
        grads = self._loss_gradients(params)
        if self.kind == "exact":
            terms = [_dot(d, _hessian_vector_product([g], [p], [d])[0]) for p, g, d in zip(params, grads, directions)]
            return self.reduce(torch.stack(terms))
        if signs is None:
            signs = torch.randint(0, 2, (len(params),), device=directions[0].device).float() * 2 - 1
        products = _hessian_vector_product(grads, params, [s * d for s, d in zip(signs, directions)])
        return self.reduce(torch.stack([s * _dot(d, h) for s, d, h in zip(signs, directions, products)]))

    def _gauss_newton_blocks(self, params, directions):
        """N (d_l . g_hat_l)^2 per layer, N the tokens of every rank's batch and g_hat their mean gradient:
        the mean of the ranks' dots under DDP (each rank differentiates its own batch), the sum of the
        shards' dots under fsdp (whose backward reduce-scatters the ranks' mean gradient)."""
        sampled_grads = self._sampled_label_gradients(params)
        dots = torch.stack(
            [
                _dot(d, g) if g is not None else torch.zeros((), dtype=torch.float32, device=d.device)
                for d, g in zip(directions, sampled_grads)
            ]
        )
        dots = parallel.sum_over_shards(dots, params) if self.sharded else self.reduce(dots)
        return (self.x.numel() * self.ranks) * dots.square()  # x (B, T): one token a position

    def _sampled_label_gradients(self, params) -> list[torch.Tensor | None]:
        """g_hat for each of params (this rank's shard under fsdp): the gradient of the mean loss against
        labels sampled from the model's predictions on x."""
        if not self.sharded:
            with self.ctx:
                logits, _ = self.model(self.x)
            return list(torch.autograd.grad(sampled_label_loss(logits), params, allow_unused=True))
        # fsdp: autograd.grad cannot reach a sharded parameter (the forward runs on gathered copies), so the
        # model's own backward reduce-scatters g_hat into .grad while the step's gradients wait aside.
        everything = list(self.model.parameters())
        step_grads = [p.grad for p in everything]
        for p in everything:
            p.grad = None
        with self.ctx:
            logits, _ = self.model(self.x)
        sampled_label_loss(logits).backward()
        sampled = [None if p.grad is None else local(p.grad) for p in params]
        for p, grad in zip(everything, step_grads):
            p.grad = grad
        return sampled

    def joint_term(self, params: list[torch.Tensor], vectors: list[torch.Tensor]) -> torch.Tensor:
        """u . C . u for the whole-model vector u = vectors (one tensor per parameter in params; this rank's
        shard of each under fsdp)."""
        if self.kind != "gauss_newton":
            products = _hessian_vector_product(self._loss_gradients(params), params, vectors)
            return self.reduce(sum(_dot(u, h) for u, h in zip(vectors, products)))
        if not self.sharded:
            return self.reduce(gauss_newton_quadratic_form(self.model, self.x, params, vectors, self.ctx))
        # fsdp: a JVP does not go through fsdp's hooks; it runs stage by stage on gathered weights.
        names = {p: name for name, p in self.model.named_parameters()}
        tangents = {names[p]: u for p, u in zip(params, vectors)}
        return self.reduce(sharded_gauss_newton_quadratic_form(self.model, self.x, tangents, self.ctx))


def _hessian_vector_product(gradients, inputs, vectors):
    """The Hessian's rows `inputs` times `vectors`: the gradient of sum(gradients . vectors) w.r.t. inputs
    (a gradient that does not depend on a tensor gives zeros: that block's curvature is 0)."""
    outputs = [(o, v) for o, v in zip(gradients, vectors) if o.requires_grad]
    if not outputs:
        return [torch.zeros_like(p) for p in inputs]
    products = torch.autograd.grad(
        [o for o, _ in outputs], inputs, grad_outputs=[v for _, v in outputs], retain_graph=True, allow_unused=True
    )
    return [torch.zeros_like(p) if h is None else h for p, h in zip(inputs, products)]


def gauss_newton_quadratic_form(model, x, params, tangents, ctx) -> torch.Tensor:
    """u . G . u = (J u)^T H_out (J u) / N for the mean cross-entropy over N tokens, where J u is the
    logits' directional derivative (one forward-mode JVP) and H_out = diag(p) - p p^T per token."""
    names = {p: name for name, p in model.named_parameters()}
    missing = [i for i, p in enumerate(params) if p not in names]
    if missing:
        raise ValueError(f"gauss_newton: {len(missing)} parameter(s) are not the model's own")
    keys = [names[p] for p in params]

    def logits_of(*values):
        return functional_call(model, dict(zip(keys, values)), (x,))[0]

    with ctx, sdpa_kernel(SDPBackend.MATH):
        logits, tangent = jvp(logits_of, tuple(p.detach() for p in params), tuple(tangents))
    return _output_quadratic_form(logits, tangent)


def sharded_gauss_newton_quadratic_form(model, x, tangents: dict[str, torch.Tensor], ctx) -> torch.Tensor:
    """gauss_newton_quadratic_form of fsdp's GPT, whose whole weights are never in one place: GPT.forward's
    stages (the embeddings, each block, the last LayerNorm with the tied output layer) run one at a time on
    an unsharded twin, each on its weights and its part of u gathered for it and let go after, carrying the
    activation and its tangent. A rank holds at most one block's weights and u whole, or the embedding's.
    `tangents`: this rank's shard of u by parameter name (0 for a parameter not in it)."""
    twin, params = parallel.unsharded_twin(model), dict(model.named_parameters())

    def stage(names, run, *inputs):
        """run(weights by name, *inputs) and its derivative along u of `names` and the inputs' tangents;
        inputs are (value, tangent) pairs."""
        weights = [parallel.whole(params[n]).detach() for n in names]
        directions = [
            parallel.whole(tangents[n], like=params[n]) if n in tangents else torch.zeros_like(w)
            for n, w in zip(names, weights)
        ]
        values, input_tangents = tuple(v for v, _ in inputs), tuple(t for _, t in inputs)
        return jvp(
            lambda *v: run(dict(zip(names, v[len(values) :])), *v[: len(values)]),
            (*values, *weights),
            (*input_tangents, *directions),
        )

    def under(prefix: str) -> list[str]:
        return [n for n in params if n.startswith(prefix)]

    def call(prefix: str, weights: dict, *args):
        """The twin's module at `prefix` (a name ending in a dot) on the weights named under it."""
        parts = {n.removeprefix(prefix): w for n, w in weights.items() if n.startswith(prefix)}
        return functional_call(twin.get_submodule(prefix.rstrip(".")), parts, args)

    wte, wpe, positions = "transformer.wte.weight", "transformer.wpe.weight", torch.arange(x.size(1), device=x.device)
    with ctx, sdpa_kernel(SDPBackend.MATH):
        hidden = stage(
            [wte, wpe], lambda w: twin.transformer.drop(F.embedding(x, w[wte]) + F.embedding(positions, w[wpe]))
        )
        for index in range(len(twin.transformer.h)):
            prefix = f"transformer.h.{index}."
            hidden = stage(under(prefix), partial(call, prefix), hidden)
        final = "transformer.ln_f."  # then the output layer, which is the token embedding (tied)
        logits, tangent = stage([*under(final), wte], lambda w, h: F.linear(call(final, w, h), w[wte]), hidden)
    return _output_quadratic_form(logits, tangent)


def _output_quadratic_form(logits: torch.Tensor, tangent: torch.Tensor) -> torch.Tensor:
    """(J u)^T H_out (J u) / N from the logits and their tangent J u, H_out = diag(p) - p p^T per token."""
    logits, tangent = logits.float().view(-1, logits.size(-1)), tangent.float().view(-1, logits.size(-1))
    probs = torch.softmax(logits, dim=-1)
    # z^T (diag(p) - p p^T) z = sum p z^2 - (p . z)^2, per token
    per_token = (probs * tangent.square()).sum(-1) - (probs * tangent).sum(-1).square()
    return per_token.mean()


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a . b in at least float32."""
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    return torch.dot(a.reshape(-1).to(dtype), b.reshape(-1).to(dtype))


class LayerwiseAdaptive(optim.FusedOptimizer):
    """Shared by SGDMomentumLW and AdamWLW: per-layer step-size state, refresh(), and the fused step with
    each tensor's step size. Subclasses give the direction d_l, the torch update and the kernel launch.

    State per parameter: the base optimizer's buffers, and 0-dim float32 tensors step_size (alpha_l),
    rho_avg, curvature_avg, direction_sq_avg (EMAs, not bias-corrected) and refreshes (samples averaged).
    """

    scalar_state = ("rho_avg", "curvature_avg", "direction_sq_avg", "refreshes")

    def __init__(
        self,
        params,
        defaults: dict,
        backend: str,
        warmup_lr: float,
        alpha_max: float,
        beta: float,
        damping: float,
        warmup_steps: int,
        joint_rescale: bool,
        interval: int,
        curvature: str,
        curvature_rows: int = 0,
    ):
        for name, value in (("warmup_lr", warmup_lr), ("alpha_max", alpha_max), ("damping", damping)):
            optim.check_nonnegative_finite(name, value)
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must lie in [0, 1), got {beta}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if interval < 1:
            raise ValueError(f"interval must be >= 1, got {interval}")
        check_curvature(curvature)  # at construction, not at the first refresh
        super().__init__(params, defaults, backend)
        self.warmup_lr, self.alpha_max, self.beta, self.damping = warmup_lr, alpha_max, beta, damping
        self.warmup_steps, self.joint_rescale, self.interval, self.curvature = (
            warmup_steps,
            joint_rescale,
            interval,
            curvature,
        )
        self.curvature_rows = curvature_rows  # sequences of the first micro-batch in a curvature pass; 0 = all of them
        self.last_refresh: dict[str, torch.Tensor] = {}  # device tensors of the latest refresh, for logging

    def before_step(self, step: int, context: optim.StepContext) -> None:
        """New step sizes every interval steps, from a curvature pass on (part of) this rank's first
        micro-batch through the uncompiled model (double backward and forward-mode AD do not go through
        torch.compile), averaged over the ranks (the training step's hook, optim.StepHooks)."""
        if step % self.interval == 0:
            x, y = context.micro_batches[0]
            rows = self.curvature_rows or len(x)
            self.refresh(
                Curvature(
                    self.curvature,
                    context.raw_model,
                    x[:rows],
                    y[:rows],
                    context.autocast,
                    context.reduce_mean,
                    context.sharded,
                )
            )

    def _new_state(self, p) -> dict:
        state = {
            name: torch.zeros_like(p, memory_format=torch.preserve_format)
            for name in self.state_names
            if name != "step_size"
        }
        # The warmup's plain step size is absolute: the kernel multiplies by lr (eta), so it is stored over the peak
        # eta.
        state["step_size"] = torch.full(
            (),
            self.warmup_lr / self.defaults["lr"] if self.defaults["lr"] > 0 else 0.0,
            dtype=torch.float32,
            device=p.device,
        )
        state.update({name: torch.zeros((), dtype=torch.float32, device=p.device) for name in self.scalar_state})
        return state

    def _direction(self, group, p) -> torch.Tensor:
        """d for this step's gradient, from the state before the step (which is left unchanged); this
        rank's shard of it under fsdp."""
        raise NotImplementedError

    @torch.no_grad()
    def refresh(self, curvature: Curvature) -> None:
        """New step sizes from the current gradients (call after backward, before step())."""
        active = [(group, p) for group in self.param_groups for p in self._with_grads(group)]
        if not active:
            return
        params = [p for _, p in active]
        states = [self._state(p) for p in params]
        directions = [self._direction(group, p) for group, p in active]
        rho = torch.stack([_dot(local(p.grad), d) for p, d in zip(params, directions)])
        direction_sq = torch.stack(torch._foreach_norm(directions)).float().square()
        # Under fsdp each is a sum over this rank's shards: summed over the ranks, in one all-reduce.
        rho, direction_sq = parallel.sum_over_shards(torch.stack([rho, direction_sq]), params).unbind()
        with torch.enable_grad():
            curvature_terms = curvature.block_terms(params, directions).float()

        def stacked(name):
            return torch.stack([s[name] for s in states])

        # A non-finite sample leaves that layer's averages as they were; a skipped step (found_inf) leaves
        # every layer's state as it was, step sizes included. On the device: no host sync.
        skip = (
            self.found_inf.bool()
            if self.found_inf is not None
            else torch.zeros((), dtype=torch.bool, device=rho.device)
        )
        finite = torch.isfinite(rho) & torch.isfinite(curvature_terms) & torch.isfinite(direction_sq) & ~skip
        refreshes = stacked("refreshes") + finite.float()
        bias_correction = torch.where(refreshes > 0, 1 - self.beta**refreshes, 1.0)
        averages = {}
        for name, sample in (("rho_avg", rho), ("curvature_avg", curvature_terms), ("direction_sq_avg", direction_sq)):
            average = stacked(name)
            average = torch.where(
                finite, self.beta * average + (1 - self.beta) * torch.where(finite, sample, 0.0), average
            )
            torch._foreach_copy_([s[name] for s in states], list(average.unbind()))
            averages[name] = average / bias_correction
        torch._foreach_copy_([s["refreshes"] for s in states], list(refreshes.unbind()))

        step = min(group["step"] for group, _ in active)
        if step < self.warmup_steps:  # the averages fill; the plain step size stands
            self.last_refresh = {"curvature": averages["curvature_avg"], "rho": averages["rho_avg"]}
            return
        step_size = damped_newton_step_size(
            averages["rho_avg"], averages["curvature_avg"], averages["direction_sq_avg"], self.damping, self.alpha_max
        )
        step_size = torch.where(refreshes > 0, step_size, stacked("step_size"))
        joint_scale = torch.ones((), device=rho.device)
        if self.joint_rescale:
            layer_lrs = torch.tensor([optim.layer_lr(group) for group, _ in active], device=rho.device)
            scales = layer_lrs * step_size
            with torch.enable_grad():
                joint = curvature.joint_term(params, [s * d for s, d in zip(scales, directions)]).float()
            decrease = (scales * torch.where(finite, rho, 0.0)).sum()  # g . u: the first-order decrease along u
            joint_scale = torch.where(joint > 0, (decrease / joint).clamp(0.0, 1.0), 1.0)
            joint_scale = torch.where(torch.isfinite(joint_scale), joint_scale, 1.0)
            step_size = step_size * joint_scale
        step_size = torch.where(skip, stacked("step_size"), step_size)
        torch._foreach_copy_([s["step_size"] for s in states], list(step_size.unbind()))
        self.last_refresh = {
            "step_size": step_size,
            "joint_scale": joint_scale,
            "curvature": averages["curvature_avg"],
            "rho": averages["rho_avg"],
        }


def damped_newton_step_size(rho, curvature, direction_sq, damping: float, alpha_max: float) -> torch.Tensor:
    """alpha = rho / (delta (delta + rho)) with delta = sqrt(max(q, 0) + damping |d|^2); 0 where rho <= 0,
    at most alpha_max (zero curvature and no damping give rho / 0 = inf, capped)."""
    delta = torch.sqrt(curvature.clamp(min=0.0) + damping * direction_sq)
    step_size = rho / (delta * (delta + rho))
    return torch.where(rho > 0, step_size.nan_to_num(nan=alpha_max, posinf=alpha_max).clamp(max=alpha_max), 0.0)


class SGDMomentumLW(LayerwiseAdaptive):
    """SGD-m-LW: d_l = the momentum buffer after this step's gradient (torch.optim.SGD's, dampening 0),
    buf = momentum * buf + g. Before warmup_steps and with joint_rescale off it is SGD with momentum and
    decoupled weight decay at lr * warmup_lr."""

    state_names = ("momentum_buffer", "step_size")
    scalar_keys = ("lr", "momentum")

    def __init__(
        self,
        params,
        lr=1.0,
        momentum=0.9,
        weight_decay=0.0,
        warmup_lr=0.1,
        alpha_max=10.0,
        beta=0.5,
        damping=1e-8,
        warmup_steps=10,
        joint_rescale=True,
        interval=5,
        curvature="gauss_newton",
        curvature_rows=0,
        backend="auto",
    ):
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must lie in [0, 1), got {momentum}")
        super().__init__(
            params,
            dict(lr=lr, momentum=momentum, weight_decay=weight_decay),
            backend,
            warmup_lr,
            alpha_max,
            beta,
            damping,
            warmup_steps,
            joint_rescale,
            interval,
            curvature,
            curvature_rows,
        )

    def _direction(self, group, p):
        return local(self.state[p]["momentum_buffer"]) * group["momentum"] + local(p.grad)

    def _update_torch(self, group, params, grads, states):
        lr = optim.layer_lr(group)
        for p, g, buffer, step_size in zip(params, grads, *states):
            lr_t = lr * step_size
            if group["weight_decay"]:
                p.mul_(1 - lr_t * group["weight_decay"])
            buffer.mul_(group["momentum"]).add_(g)
            p.sub_(lr_t * buffer)

    def _launch_step(self, plan, grads, found_inf, group):
        params, buffers, step_sizes = plan.tables("param", "momentum_buffer", "step_size")
        plan.launch(
            kernels.sgd_momentum_kernel,
            found_inf,
            plan.lr_scale,
            plan.weight_decay,
            params,
            grads,
            buffers,
            step_sizes,
            group["lr"],
            group["momentum"],
        )


class AdamWLW(LayerwiseAdaptive):
    """AdamW-LW: d_l = AdamW's bias-corrected direction m_hat / (sqrt(v_hat) + eps) after this step's
    gradient. Before warmup_steps it is torch.optim.AdamW at lr * warmup_lr."""

    state_names = ("exp_avg", "exp_avg_sq", "step_size")
    scalar_keys = ("lr", "betas", "eps")

    def __init__(
        self,
        params,
        lr=1.0,
        betas=(0.9, 0.95),
        eps=1e-8,
        weight_decay=0.1,
        warmup_lr=1e-3,
        alpha_max=0.1,
        beta=0.5,
        damping=1e-8,
        warmup_steps=10,
        joint_rescale=True,
        interval=5,
        curvature="gauss_newton",
        curvature_rows=0,
        backend="auto",
    ):
        optim.check_nonnegative_finite("eps", eps)
        super().__init__(
            params,
            dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay),
            backend,
            warmup_lr,
            alpha_max,
            beta,
            damping,
            warmup_steps,
            joint_rescale,
            interval,
            curvature,
            curvature_rows,
        )

    def _direction(self, group, p):
        state, (beta1, beta2), step, grad = self.state[p], group["betas"], group["step"] + 1, local(p.grad)
        exp_avg = local(state["exp_avg"]).lerp(grad, 1 - beta1)
        exp_avg_sq = local(state["exp_avg_sq"]) * beta2 + (1 - beta2) * grad.square()
        return (exp_avg / (1 - beta1**step)) / (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**step) + group["eps"])

    def _update_torch(self, group, params, grads, states):
        optim.update_adamw(group, params, grads, *states)  # states: exp_avg, exp_avg_sq, step_size

    def _launch_step(self, plan, grads, found_inf, group):
        optim.launch_adamw(plan, grads, found_inf, group, step_sizes=plan.pointers["step_size"])


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """The curvature terms averaged over DDP ranks (each measured them on its own batch)."""
    dist.all_reduce(tensor, op=dist.ReduceOp.AVG)
    return tensor
