"""A self-check of the fused optimizer kernels on the machine about to train with them, before the first
step, and the choice of each optimizer's backend.

A wrong optimizer update does not crash: it quietly spoils a run. A new GPU architecture, a Triton
version nobody has tried or an unforeseen memory layout can each make a kernel compute something else
than its torch reference. So before a run's first step on CUDA, the optimizer it uses takes two steps
(with SophiaG's Hessian refresh between them) on small tensors through both backends, from the same
starting state, and every parameter and state tensor must agree within the kernel's tolerance. The
tensors cover both builds a launch can take (kernels.py): an ALIGNED set (sizes a multiple of 4, fresh
16-byte-aligned storage) and an unaligned one (an odd size, a one-element tensor, a view at an odd
offset), in two param groups with their own lr_scale and weight decay, named so that Adam-mini gives them
each of its block roles.

What it guarantees: on this GPU, with this torch, this Triton and this source, each kernel the optimizer
launches computes its reference's update on tensors of every layout class. What it does not: it checks
two steps on small tensors, not a whole run (a large tensor's grid, memory pressure, a later NaN).

A pass is cached per (GPU name, compute capability, torch, Triton, a hash of the kernels' and
optimizers' source) in the cache folder, so a second run pays nothing. A failure (a mismatch, a compile
or launch error) sends the optimizer to the torch path for the whole run under optimizer_backend=auto,
with one warning line, and stops the run before its first step under optimizer_backend=triton.
"""

import hashlib
import json
import os
import time

import torch
import torch.distributed as dist
import triton

import outdir
from errors import UserError

ROOT = os.path.dirname(os.path.abspath(__file__))
SOURCES = [os.path.join(ROOT, name) for name in ("kernels.py", "optim.py", "lwas.py")]  # what the kernels compute
CACHE_FILE = "kernel-check.json"
CACHE_VERSION = 1
REPORT = "please report it with this line to the project's issue tracker"

# Elementwise fp32 updates whose Triton and torch forms differ only in rounding (FMA contraction, the
# order of a few multiplications): agreement to a few float32 ulps of each value. Adam-mini's block
# mean of g^2 is a reduction in another order, which stays within the same bound at these block sizes.
TOLERANCE = {  # optimizer: (rtol, atol) over parameters and every state tensor, after two steps
    "adamw": (1e-5, 1e-6),
    "lion": (1e-5, 1e-6),
    "sophiag": (1e-5, 1e-6),
    "adam_mini": (1e-5, 1e-6),
    "sgdm_lw": (1e-5, 1e-6),
    "adamw_lw": (1e-5, 1e-6),
}
KERNELS = {  # optimizer: the kernels its steps launch (kernels.py)
    "adamw": "adamw_kernel",
    "lion": "lion_kernel",
    "sophiag": "sophiag_kernel and the Hessian refresh's ema_of_square_kernel",
    "adam_mini": "block_mean_square_kernel and adam_mini_kernel",
    "sgdm_lw": "sgd_momentum_kernel",
    "adamw_lw": "adamw_kernel with per-tensor step sizes",
}

# (name, shape, storage offset in elements): names give Adam-mini each block role (optim.ADAM_MINI_BLOCKS)
# at n_head = 2; the first set takes the ALIGNED build, the second the unaligned one.
ALIGNED_SET = (
    ("transformer.wte.weight", (64, 32), 0),
    ("transformer.h.0.attn.q_proj.weight", (32, 32), 0),
    ("transformer.h.0.ln_1.weight", (32,), 0),
    ("transformer.h.0.mlp.c_fc.bias", (128,), 0),
)
UNALIGNED_SET = (
    ("transformer.h.0.attn.k_proj.weight", (6, 5), 0),
    ("transformer.h.0.attn.v_proj.weight", (7, 5), 1),
    ("transformer.h.0.ln_2.weight", (1,), 0),
    ("transformer.h.0.mlp.c_proj.bias", (37,), 0),
)
N_HEAD = 2


class KernelCheckError(UserError):
    """optimizer_backend=triton on a machine where the kernels' self-check failed."""


def _tensors(spec, device, generator) -> list[tuple[str, torch.nn.Parameter]]:
    named = []
    for name, shape, offset in spec:
        numel = 1
        for size in shape:
            numel *= size
        storage = torch.randn(offset + numel, generator=generator)
        named.append((name, torch.nn.Parameter(storage.to(device)[offset:].view(shape))))
    return named


def two_steps(make_optimizer, backend: str, device: torch.device, spec) -> list[torch.Tensor]:
    """Every parameter and state tensor after two steps of the optimizer make_optimizer(groups, backend)
    builds, from a fixed start and fixed gradients (the same for either backend)."""
    generator = torch.Generator().manual_seed(0)
    named = _tensors(spec, device, generator)
    matrices = [(n, p) for n, p in named if p.dim() >= 2]
    vectors = [(n, p) for n, p in named if p.dim() < 2]
    groups = [
        {"params": [p for _, p in part], "names": [n for n, _ in part], "lr_scale": scale, "weight_decay": decay}
        for part, scale, decay in ((matrices, 1.7, 0.1), (vectors, 0.6, 0.0))
        if part
    ]
    optimizer = make_optimizer(groups, backend)
    for _ in range(2):
        for _, p in named:
            p.grad = torch.randn(p.shape, generator=generator).to(device)
        optimizer.step()
        if hasattr(optimizer, "update_hessian"):  # SophiaG's refresh, from another gradient
            for _, p in named:
                p.grad = torch.randn(p.shape, generator=generator).to(device)
            optimizer.update_hessian()
    values = [p.detach() for _, p in named]
    for _, p in named:
        values += [v for v in optimizer.state[p].values() if isinstance(v, torch.Tensor)]
    return values


def largest_error(triton_values, torch_values, rtol: float, atol: float) -> tuple[float, float]:
    """The largest |a - b| over all values, and the largest of |a - b| / (atol + rtol * |b|), which must
    stay at most 1."""
    difference, ratio = 0.0, 0.0
    for a, b in zip(triton_values, torch_values):
        error = (a.double() - b.double()).abs()
        bound = atol + rtol * b.double().abs()
        finite = torch.isfinite(a).all() and torch.isfinite(b).all()
        difference = max(difference, error.max().item() if finite else float("inf"))
        ratio = max(ratio, (error / bound).max().item() if finite else float("inf"))
    return difference, ratio


def cache_key(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        capability = "sm_{}{}".format(*torch.cuda.get_device_capability(device))
    else:
        name, capability = "cpu (Triton interpreter)", "cpu"
    source = hashlib.sha256()
    for path in SOURCES:
        with open(path, "rb") as f:
            source.update(f.read())
    identity = {
        "version": CACHE_VERSION,
        "device": name,
        "capability": capability,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "source": source.hexdigest(),
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]


class Cache:
    """Passes kept in cache_dir/kernel-check.json as {key: {optimizer: record}}. An unreadable file is
    ignored, and one that cannot be written costs a check next time: each says so once, never an error."""

    def __init__(self, folder: str, say):
        self.path, self.say = os.path.join(folder, CACHE_FILE), say
        self.data = None  # the file as read once

    def read(self) -> dict:
        if self.data is None:
            self.data = {}
            try:
                if os.path.exists(self.path):
                    with open(self.path) as f:
                        data = json.load(f)
                    if not isinstance(data, dict):
                        raise ValueError("not a JSON object")
                    self.data = data
            except (OSError, ValueError) as e:
                self.say(f"warning: kernel self-check cache {self.path} is unreadable ({e}); checking again")
        return self.data

    def passed(self, key: str, optimizer: str) -> bool:
        entry = self.read().get(key)
        record = entry.get(optimizer) if isinstance(entry, dict) else None
        return isinstance(record, dict) and record.get("passed") is True

    def write(self, key: str, optimizer: str, record: dict) -> None:
        data = self.read()
        if not isinstance(data.get(key), dict):
            data[key] = {}
        data[key][optimizer] = record
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            outdir.write_json(self.path, data)
        except (OSError, outdir.DiskFullError) as e:
            self.say(f"warning: cannot write the kernel self-check cache {self.path} ({e}); the next run checks again")


def check(optimizer: str, make_optimizer, device: torch.device, cache_folder: str, say=print) -> tuple[bool, str]:
    """Whether the optimizer's Triton kernels match its torch path on this device, and a sentence saying
    what was found (a cached pass, a pass, or the failure with the kernel, the error and the tolerance)."""
    cache = Cache(cache_folder, say)
    key = cache_key(device)
    if cache.passed(key, optimizer):
        return True, f"self-check passed before on this machine (cached in {cache.path})"
    rtol, atol = TOLERANCE[optimizer]
    start = time.perf_counter()
    try:
        errors = []
        for spec in (ALIGNED_SET, UNALIGNED_SET):
            reference = two_steps(make_optimizer, "torch", device, spec)
            errors.append(largest_error(two_steps(make_optimizer, "triton", device, spec), reference, rtol, atol))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as e:  # a compile or launch error of the kernels: the torch path still works
        message = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return False, (
            f"{optimizer}'s Triton kernels ({KERNELS[optimizer]}) failed to run: {type(e).__name__}: {message}"
        )
    seconds = time.perf_counter() - start
    difference, ratio = max(error[0] for error in errors), max(error[1] for error in errors)
    if not ratio <= 1:
        return False, (
            f"{optimizer}'s Triton kernels ({KERNELS[optimizer]}) differ from the torch path by up to {difference:.3g} "
            f"after two steps, beyond the tolerance rtol {rtol:g} / atol {atol:g}"
        )
    cache.write(key, optimizer, {"passed": True, "largest_difference": difference, "seconds": seconds})
    return True, (
        f"self-check passed in {seconds:.1f} s: the Triton path ({KERNELS[optimizer]}) matches the torch path after "
        f"two steps on aligned and unaligned tensors (largest difference {difference:.2g}, tolerance rtol {rtol:g} / "
        f"atol {atol:g}; cached in {cache.path})"
    )


def all_ranks_pass(passed: bool, device: torch.device) -> bool:
    """One backend for every rank: the torch path unless every rank's check passed."""
    if not dist.is_initialized():
        return passed
    flag = torch.tensor(float(passed), device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def choose_backend(c, device: torch.device, make_optimizer, cache_folder: str, say=print) -> tuple[str, str]:
    """The backend ("triton" or "torch") the run's optimizer takes, and why, in words. make_optimizer
    (groups, backend) builds the run's optimizer over other parameters, for the self-check."""
    if c.optimizer == "adamw_torch":
        return "torch", "torch.optim.AdamW(fused=True), the baseline"
    if c.optimizer_backend == "torch":
        return "torch", "optimizer_backend=torch"
    interpreted = device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
    if device.type != "cuda" and not (interpreted and (c.optimizer_backend == "triton" or c.kernel_check == "force")):
        if c.optimizer_backend == "triton":
            raise KernelCheckError(
                f"optimizer_backend=triton needs a CUDA device (this run's is {device.type}), or "
                "TRITON_INTERPRET=1 to interpret the kernels on a CPU; use optimizer_backend=auto or torch"
            )
        return "torch", f"optimizer_backend=auto on a {device.type}: the Triton kernels run on CUDA"
    where = "CUDA" if device.type == "cuda" else "the CPU through Triton's interpreter"
    chosen = f"optimizer_backend={c.optimizer_backend} on {where}"
    if c.kernel_check == "off" or (device.type != "cuda" and c.kernel_check != "force"):
        return "triton", f"{chosen}; kernel_check={c.kernel_check}, not checked"
    passed, finding = check(c.optimizer, make_optimizer, device, cache_folder, say)
    if (
        not passed and dist.is_initialized() and dist.get_rank() != 0
    ):  # rank 0 speaks for the run, this rank for its GPU
        print(f"rank {dist.get_rank()}: warning: kernel self-check: {finding}", flush=True)
    if not all_ranks_pass(passed, device) and passed:
        passed, finding = False, "another rank's kernel self-check failed (that rank's warning says how)"
    if passed:
        return "triton", f"{chosen}; {finding}"
    if c.optimizer_backend == "triton":
        raise KernelCheckError(
            f"kernel self-check: {finding}; optimizer_backend=triton stops here. Run with optimizer_backend=auto "
            f"(or torch) to train on the torch path, and {REPORT}"
        )
    say(f"warning: kernel self-check: {finding}; this run uses the torch path instead. {REPORT[0].upper()}{REPORT[1:]}")
    return "torch", f"optimizer_backend=auto, the torch path: the kernel self-check failed ({finding})"
