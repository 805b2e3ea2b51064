"""GPT-2, exactly: learned position embeddings, pre-LayerNorm blocks, causal attention through
scaled_dot_product_attention, a tanh-GELU MLP of width 4C, a final LayerNorm and an lm_head tied to
the token embedding, with GPT-2's biases.

Two departures from the Hugging Face layout, both for the layer-wise learning rate:
  - q, k and v are three separate Linear layers, so each can carry its own learning rate
    (GPT2LMHeadModel fuses them into one `c_attn`; training/hf.py splits it on loading and fuses it on export).
  - optional residual-branch scaling `x + beta * f(x)` with beta = 1/sqrt(n_layer), applied as a
    multiplication in the forward pass (not folded into the init) so it survives any re-initialization.

Parameter names (transformer.h.{i}.attn.q_proj, ...mlp.c_fc, transformer.wte) are decided here, and what
each parameter is (param_role) is read from its name here alone: initialization, lwlr's rules, Adam-mini's
blocks, Muon's matrices, the self-check's tensors and the multipliers' plot all ask param_role.

The output layer and its cross-entropy run a chunk of rows at a time (LinearCrossEntropy, at the end), so
the full logits of GPT-2's 50,257-token vocabulary are never built during training.
"""

import contextlib
import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest sequence the position embedding covers
    vocab_size: int = 50257  # GPT-2 BPE: 50,000 merges + 256 bytes + <|endoftext|>
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0  # 0 for pretraining; the published GPT-2 runs use none either
    bias: bool = True  # GPT-2 has biases in every Linear and LayerNorm
    residual_scale: bool = False  # x + f(x)/sqrt(n_layer) on both branches of every block
    # With targets: the output layer and the loss in chunks of this many rows, never the full logits
    # (LinearCrossEntropy below); 0 = full logits.
    loss_chunk_rows: int = 0

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "GPTConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(overrides) - known
        if unknown:
            raise ValueError(f"unknown GPTConfig field(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**{**PRESETS[name], **overrides})


PRESETS = {
    # GPT-2 as published; parameter counts with the tied head counted once.
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124,439,808
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 354,823,168
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774,030,080
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1,557,611,200
    # Small presets for CPU work. The 50257-entry embedding dominates their size.
    "gpt2-mini": dict(n_layer=4, n_head=4, n_embd=128, block_size=256),  # 7.3M, the default CPU run
    "gpt2-tiny": dict(n_layer=2, n_head=2, n_embd=32, block_size=64),  # 1.6M, for tests
    # The depth study at CPU scale (bench/overfit.py --preset depth-cpu): 64 wide, 2 heads, 2 to 32 blocks.
    **{
        f"narrow-{n_layer}": dict(n_layer=n_layer, n_head=2, n_embd=64, block_size=256) for n_layer in (2, 4, 8, 16, 32)
    },
}


def causal_attention(q, k, v, dropout_p: float):
    """Causal scaled-dot-product attention over (B, nh, T, hs). On a CPU in bf16 through SDPA's math
    backend, which compiles to bf16 matmuls and one fused softmax: the default run's compiled step took
    0.87x the time it takes through the CPU flash kernel (docs/benchmarks.md). Elsewhere SDPA picks."""
    cpu_bf16 = q.device.type == "cpu" and q.dtype == torch.bfloat16
    with sdpa_kernel(SDPBackend.MATH) if cpu_bf16 else contextlib.nullcontext():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        if config.n_embd % config.n_head:
            raise ValueError(f"n_embd={config.n_embd} is not divisible by n_head={config.n_head}")
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.q_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.k_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.v_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.o_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        B, T, C = x.shape
        # (B, T, C) -> (B, nh, T, hs)
        q = self.q_proj(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = causal_attention(q, k, v, self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, nh, T, hs) -> (B, T, C)
        return self.resid_dropout(self.o_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)
        # A Python float, so torch.compile treats it as a constant; 1.0 means no scaling (x * 1.0 is exact).
        self.residual_beta = 1.0 / math.sqrt(config.n_layer) if config.residual_scale else 1.0

    def forward(self, x):
        x = x + self.residual_beta * self.attn(self.ln_1(x))
        return x + self.residual_beta * self.mlp(self.ln_2(x))


INIT_SCHEMES = ("gpt2", "fan_out", "fan_in")

# What each parameter is, read from its name in this one place (initialization, lwlr's rules, Adam-mini's
# blocks, Muon's matrices, the self-check's tensors and the multipliers' plot all ask param_role): the
# module it belongs to, by its attribute name.
LAYER_ROLES = {
    "wte": "embedding",
    "wpe": "position",
    "q_proj": "q",
    "k_proj": "k",
    "v_proj": "v",
    "o_proj": "attn_out",
    "c_fc": "mlp_in",
    "c_proj": "mlp_out",
    "ln_1": "layernorm",
    "ln_2": "layernorm",
    "ln_f": "layernorm",
}
# The transformer blocks' Linear layers: their weights are the blocks' matrices (Muon's part; the plot's
# "Linear weights").
BLOCK_LINEARS = ("q", "k", "v", "attn_out", "mlp_in", "mlp_out")
# Linear layers that write into the residual stream; GPT-2 shrinks their init by 1/sqrt(2 * n_layer).
RESIDUAL_PROJECTIONS = ("attn_out", "mlp_out")


@dataclass(frozen=True)
class ParamRole:
    layer: str  # a value of LAYER_ROLES, or "other"
    is_bias: bool
    block: int | None  # the transformer block's index; None for the embeddings and ln_f

    @property
    def is_block_matrix(self) -> bool:
        """A weight matrix of a transformer block: q, k, v, the attention output or an MLP matrix."""
        return self.layer in BLOCK_LINEARS and not self.is_bias

    @property
    def kind(self) -> str:
        """The class a parameter is drawn and summarized in (the multipliers' plot, the layer statistics):
        its layer's role, biases apart."""
        return "bias" if self.is_bias else self.layer

    @property
    def gradient_is_zero(self) -> bool:
        """Whether the loss's gradient is zero by construction: softmax(q.(k + b)) does not depend on the
        key bias b, so its gradient is rounding noise (mean |g| ~1e-10 against ~1e-4 elsewhere, gpt2-tiny)."""
        return self.is_bias and self.layer == "k"


def param_role(name: str) -> ParamRole:
    """What the parameter `name` of a GPT is: its layer's role, whether it is a bias, and its block. A name
    this model does not have (another module's, in lwlr's generic use) has the layer "other"."""
    parts = name.split(".")
    layer = LAYER_ROLES.get(parts[-2], "other") if len(parts) >= 2 else "other"
    block = int(parts[2]) if parts[:2] == ["transformer", "h"] and len(parts) > 2 and parts[2].isdigit() else None
    return ParamRole(layer, parts[-1] == "bias", block)


def vocab_size_of(state_dict: dict) -> int:
    """The vocabulary a GPT's state dict was built for: its token embedding's rows."""
    return next(t for name, t in state_dict.items() if param_role(name).layer == "embedding").shape[0]


def non_finite(state_dict: dict) -> list[str]:
    """The names of the tensors holding a NaN or an infinity: weights that must not be trained from or
    exported."""
    return [name for name, t in state_dict.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied: one tensor, counted once
        init_weights(self, "gpt2")

    def num_params(self) -> int:
        """All parameters, the tied embedding / lm_head counted once (GPT-2's published counts)."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self) -> int:
        """Training FLOPs per token, 6N + 12 L C T (PaLM, appendix B). N excludes the position
        embedding, a lookup; it includes wte because the tied lm_head is a matmul."""
        c = self.config
        n = self.num_params() - self.transformer.wpe.weight.numel()
        return 6 * n + 12 * c.n_layer * c.n_embd * c.block_size

    def forward(self, idx, targets=None, last_position_only: bool = False):
        """idx (B, T) token ids -> (logits (B, T, vocab), loss or None). Logits cover every position:
        Sophia's Hessian estimator samples labels from all of them; last_position_only gives (B, 1, vocab),
        all that generation needs. With targets and loss_chunk_rows set, (None, loss): the loss comes from
        linear_cross_entropy and the logits are never built."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        pos = torch.arange(T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        if targets is not None and self.config.loss_chunk_rows:
            return None, linear_cross_entropy(x, self.lm_head.weight, targets, self.config.loss_chunk_rows)
        if last_position_only:
            x = x[:, -1:, :]  # (B, 1, C): one row of the output layer instead of T
        logits = self.lm_head(x)  # (B, T, vocab)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None):
        """Extend idx (B, T) by max_new_tokens sampled tokens; temperature 0 is greedy decoding."""
        for _ in range(max_new_tokens):
            context = idx[:, -self.config.block_size :]
            logits, _ = self(context, last_position_only=True)
            logits = logits[:, -1, :]
            if temperature == 0:
                next_token = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                next_token = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
            idx = torch.cat((idx, next_token), dim=1)
        return idx


@torch.no_grad()
def init_weights(model: GPT, scheme: str = "gpt2") -> None:
    """(Re-)initialize every parameter by a named scheme.

    gpt2     GPT-2's training init: Linear and embedding weights N(0, 0.02), the residual output
             projections N(0, 0.02 / sqrt(2 n_layer)), biases 0, LayerNorm scales 1.
    fan_out  lwlr's measurement init: every Linear weight N(0, 1/fan_out), which keeps the variance of
             backpropagated gradients constant through depth. The tied wte / lm_head counts as a
             Linear with fan_out = vocab size; the position embedding counts as a bias (0).
    fan_in   the forward-variance-preserving counterpart: N(0, 1/fan_in) (fan_in = n_embd for wte).
    """
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"unknown init scheme {scheme!r}; choose one of {', '.join(INIT_SCHEMES)}")
    config = model.config
    for name, p in model.named_parameters():
        role = param_role(name)
        if role.is_bias:
            nn.init.zeros_(p)
        elif role.layer == "layernorm":  # LayerNorm scales
            nn.init.ones_(p)
        elif role.layer == "position":
            nn.init.normal_(p, std=0.02) if scheme == "gpt2" else nn.init.zeros_(p)
        elif scheme == "gpt2":
            std = 0.02 / math.sqrt(2 * config.n_layer) if role.layer in RESIDUAL_PROJECTIONS else 0.02
            nn.init.normal_(p, std=std)
        else:
            # nn.Linear stores (out, in); the tied wte (vocab, C) is lm_head's weight in that layout.
            fan_out, fan_in = p.shape
            nn.init.normal_(p, std=math.sqrt(1.0 / (fan_out if scheme == "fan_out" else fan_in)))


# ---- the output layer and its loss ----------------------------------------------------------------
# The output layer and cross-entropy together, a chunk of rows at a time, forward and backward, so the
# (N, vocab) logits never exist in full.
#
# With GPT-2's vocabulary the logits are the largest tensor of a step: 2,048 rows x 50,257 fp32 is 412 MB,
# built and read several times over (the matmul, log-softmax, its gradient), and on a CPU most of the
# step's time is the output layer and the loss (85% of the default run's). Here each chunk of
# `chunk_rows` rows computes its logits, its loss and, when a gradient is wanted, its gradients with
# respect to the hidden states and the weight at once (as Liger-Kernel's fused linear cross-entropy
# does), so backward has only to scale them. The matmuls run on the weight padded with zero rows to a
# multiple of 64 (the padded logits are masked to -inf): a 50,304-row matmul is faster than a
# 50,257-row one, and the parameter keeps GPT-2's shape. Mean over targets != -1, as F.cross_entropy
# with ignore_index=-1.

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
