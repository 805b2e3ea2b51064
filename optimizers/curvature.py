"""The curvature along each layer's update direction that LW-AS's step sizes come from (lwas.py): per
layer, an estimate of d_l . C_ll . d_l, and along a whole-model vector u, u . C . u, with C the Hessian
(exact, rademacher) or the Gauss-Newton matrix (gauss_newton), on one batch, averaged over the ranks.
Under fsdp (gauss_newton only) the model's whole weights are never in one place: the joint term's JVP
runs its stages one at a time on gathered weights.
"""

from contextlib import nullcontext
from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.func import functional_call, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from model import GPT, param_role
from optimizers.sampled_labels import sampled_label_loss
from runtime.fsdp import local, sum_over_shards, whole

CURVATURES = ("gauss_newton", "rademacher", "exact")
# What runs on fsdp's shards: gauss_newton. exact and rademacher are Hessian-vector products, a double
# backward, which FSDP2's gathers and reduce-scatters (autograd hooks) do not carry.
SHARDABLE_CURVATURES = ("gauss_newton",)


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
        # The run refuses it first (its registry entry's refuses, training.build.check_optimizer).
        if sharded and kind not in SHARDABLE_CURVATURES:
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
            terms = [dot(d, _hessian_vector_product([g], [p], [d])[0]) for p, g, d in zip(params, grads, directions)]
            return self.reduce(torch.stack(terms))
        if signs is None:
            signs = torch.randint(0, 2, (len(params),), device=directions[0].device).float() * 2 - 1
        products = _hessian_vector_product(grads, params, [s * d for s, d in zip(signs, directions)])
        return self.reduce(torch.stack([s * dot(d, h) for s, d, h in zip(signs, directions, products)]))

    def _gauss_newton_blocks(self, params, directions):
        """N (d_l . g_hat_l)^2 per layer, N the tokens of every rank's batch and g_hat their mean gradient:
        the mean of the ranks' dots under DDP (each rank differentiates its own batch), the sum of the
        shards' dots under fsdp (whose backward reduce-scatters the ranks' mean gradient)."""
        sampled_grads = self._sampled_label_gradients(params)
        dots = torch.stack(
            [
                dot(d, g) if g is not None else torch.zeros((), dtype=torch.float32, device=d.device)
                for d, g in zip(directions, sampled_grads)
            ]
        )
        dots = sum_over_shards(dots, params) if self.sharded else self.reduce(dots)
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
            return self.reduce(sum(dot(u, h) for u, h in zip(vectors, products)))
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
    twin, params = unsharded_twin(model), dict(model.named_parameters())
    roles = {name: param_role(name) for name in params}

    def stage(names, run, *inputs):
        """run(weights by name, *inputs) and its derivative along u of `names` and the inputs' tangents;
        inputs are (value, tangent) pairs."""
        weights = [whole(params[n]).detach() for n in names]
        directions = [
            whole(tangents[n], like=params[n]) if n in tangents else torch.zeros_like(w) for n, w in zip(names, weights)
        ]
        values, input_tangents = tuple(v for v, _ in inputs), tuple(t for _, t in inputs)
        return jvp(
            lambda *v: run(dict(zip(names, v[len(values) :])), *v[: len(values)]),
            (*values, *weights),
            (*input_tangents, *directions),
        )

    def call(module, names: list[str], weights: dict, *args):
        """The twin's `module` on the weights of `names`, which are its own parameters in its order."""
        own = [name for name, _ in module.named_parameters()]
        return functional_call(module, dict(zip(own, (weights[n] for n in names))), args)

    def named(layer: str, block: int | None = None) -> list[str]:
        return [n for n, role in roles.items() if role.layer == layer and role.block == block]

    (wte,), (wpe,) = named("embedding"), named("position")
    positions = torch.arange(x.size(1), device=x.device)
    with ctx, sdpa_kernel(SDPBackend.MATH):
        hidden = stage(
            [wte, wpe], lambda w: twin.transformer.drop(F.embedding(x, w[wte]) + F.embedding(positions, w[wpe]))
        )
        for index, block in enumerate(twin.transformer.h):
            names = [n for n, role in roles.items() if role.block == index]
            hidden = stage(names, partial(call, block, names), hidden)
        # the last LayerNorm, then the output layer, which is the token embedding (tied)
        final = named("layernorm")
        logits, tangent = stage(
            [*final, wte], lambda w, h: F.linear(call(twin.transformer.ln_f, final, w, h), w[wte]), hidden
        )
    return _output_quadratic_form(logits, tangent)


def _output_quadratic_form(logits: torch.Tensor, tangent: torch.Tensor) -> torch.Tensor:
    """(J u)^T H_out (J u) / N from the logits and their tangent J u, H_out = diag(p) - p p^T per token."""
    logits, tangent = logits.float().view(-1, logits.size(-1)), tangent.float().view(-1, logits.size(-1))
    probs = torch.softmax(logits, dim=-1)
    # z^T (diag(p) - p p^T) z = sum p z^2 - (p . z)^2, per token
    per_token = (probs * tangent.square()).sum(-1) - (probs * tangent).sum(-1).square()
    return per_token.mean()


def dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a . b in at least float32."""
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    return torch.dot(a.reshape(-1).to(dtype), b.reshape(-1).to(dtype))


def unsharded_twin(model: torch.nn.Module) -> torch.nn.Module:
    """A GPT of the sharded model's config, in its mode, on the meta device (no storage): what a
    torch.func.functional_call runs on gathered weights, for a pass fsdp's hooks cannot take (a JVP)."""
    with torch.device("meta"):
        twin = GPT(model.config)
    return twin.train(model.training)
