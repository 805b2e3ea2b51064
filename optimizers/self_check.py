"""A self-check of the fused optimizer kernels on the machine about to train with them, before the first
step, and the choice of each optimizer's backend.

A wrong optimizer update does not crash: it quietly spoils a run. A new GPU architecture, a Triton
version nobody has tried or an unforeseen memory layout can each make a kernel compute something else
than its torch reference. So before a run's first step on CUDA, the optimizer it uses takes two steps
(with SophiaG's Hessian refresh between them) on small tensors through both backends, from the same
starting state, and every parameter and state tensor must agree within the kernel's tolerance. The
tensors cover both builds a launch can take (kernels.py): an ALIGNED set (sizes a multiple of 4, fresh
16-byte-aligned storage) and an unaligned one (an odd size, a one-element tensor, a view at an odd
offset), in two param groups with their own multiplier and weight decay, named (by model.param_role) so
that Adam-mini gives them each of its block roles. Which kernels an optimizer launches, and the
tolerance they are held to, are its registry entry's (spec.py).

What it guarantees: on this GPU, with this torch, this Triton and this source, each kernel the optimizer
launches computes its reference's update on tensors of every layout class. What it does not: it checks
two steps on small tensors, not a whole run (a large tensor's grid, memory pressure, a later NaN).

A pass is cached per (GPU name, compute capability, torch, Triton, a hash of the optimizer's source
files: the file that declares it and every file of the project it imports, at any depth) in the cache
folder, so a second run pays nothing. A failure (a mismatch, a compile or launch error) sends the
optimizer to the torch path for the whole run under optimizer_backend=auto, with one warning line, and
stops the run before its first step under optimizer_backend=triton.
"""

import hashlib
import importlib
import json
import os
import time

import torch
import torch.distributed as dist
import triton

from model import GPT, GPTConfig, param_role
from optimizers.registry import module_of, spec
from runtime import sources
from runtime.errors import UserError
from runtime.files import DiskFullError, write_json

CACHE_FILE = "kernel-check.json"
CACHE_VERSION = 1
REPORT = "please report it with this line to the project's issue tracker"

# (role, bias, shape, storage offset in elements): a parameter of each role gives Adam-mini each of its
# block kinds at n_head = 2; the first set takes the ALIGNED build, the second the unaligned one.
ALIGNED_SET = (
    ("embedding", False, (64, 32), 0),
    ("q", False, (32, 32), 0),
    ("layernorm", False, (32,), 0),
    ("mlp_in", True, (128,), 0),
)
UNALIGNED_SET = (
    ("k", False, (6, 5), 0),
    ("v", False, (7, 5), 1),
    ("layernorm", False, (1,), 0),
    ("mlp_out", True, (37,), 0),
)
N_HEAD = 2


class KernelCheckError(UserError):
    """optimizer_backend=triton on a machine where the kernels' self-check failed."""


def kernel_names(optimizer: str) -> str:
    """The kernels an optimizer's steps and refreshes launch, by name, for the messages."""
    return ", ".join(kernel.fn.__name__ for kernel in spec(optimizer).all_kernels)


def source_files(optimizer: str) -> list[str]:
    """What an optimizer's kernels and torch path are made of: the file that declares it and every file of
    the project that file imports, at any depth."""
    declared_in = os.path.relpath(importlib.import_module(module_of(optimizer)).__file__, sources.ROOT)
    return [sources.modules()[name] for name in sources.dependencies(sources.module_of(declared_in))]


def _name_of(role: str, is_bias: bool) -> str:
    """A parameter name of GPT's with this role (model.param_role decides what a name is)."""
    with torch.device("meta"):
        model = GPT(GPTConfig(n_layer=1, n_head=N_HEAD, n_embd=8, vocab_size=8, block_size=8))
    return next(
        name
        for name, _ in model.named_parameters()
        if (param_role(name).layer, param_role(name).is_bias) == (role, is_bias)
    )


def _tensors(layout, device, generator) -> list[tuple[str, torch.nn.Parameter]]:
    named = []
    for role, is_bias, shape, offset in layout:
        numel = 1
        for size in shape:
            numel *= size
        storage = torch.randn(offset + numel, generator=generator)
        named.append((_name_of(role, is_bias), torch.nn.Parameter(storage.to(device)[offset:].view(shape))))
    return named


def two_steps(make_optimizer, backend: str, device: torch.device, layout, refresh=None) -> list[torch.Tensor]:
    """Every parameter and state tensor after two steps of the optimizer make_optimizer(groups, backend)
    builds, from a fixed start and fixed gradients (the same for either backend). refresh(optimizer), the
    spec's model-free refresh, runs after each step on gradients of its own."""
    generator = torch.Generator().manual_seed(0)
    named = _tensors(layout, device, generator)
    matrices = [(n, p) for n, p in named if p.dim() >= 2]
    vectors = [(n, p) for n, p in named if p.dim() < 2]
    groups = [
        {"params": [p for _, p in part], "names": [n for n, _ in part], "multiplier": scale, "weight_decay": decay}
        for part, scale, decay in ((matrices, 1.7, 0.1), (vectors, 0.6, 0.0))
        if part
    ]
    optimizer = make_optimizer(groups, backend)
    for _ in range(2):
        for _, p in named:
            p.grad = torch.randn(p.shape, generator=generator).to(device)
        optimizer.step()
        if refresh is not None:  # SophiaG's: from another gradient, as in training
            for _, p in named:
                p.grad = torch.randn(p.shape, generator=generator).to(device)
            refresh(optimizer)
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


def cache_key(device: torch.device, optimizer: str) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        capability = "sm_{}{}".format(*torch.cuda.get_device_capability(device))
    else:
        name, capability = "cpu (Triton interpreter)", "cpu"
    source = hashlib.sha256()
    for path in source_files(optimizer):
        with open(os.path.join(sources.ROOT, path), "rb") as f:
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
            write_json(self.path, data)
        except (OSError, DiskFullError) as e:
            self.say(f"warning: cannot write the kernel self-check cache {self.path} ({e}); the next run checks again")


def check(optimizer: str, make_optimizer, device: torch.device, cache_folder: str, say=print) -> tuple[bool, str]:
    """Whether the optimizer's Triton kernels match its torch path on this device, and a sentence saying
    what was found (a cached pass, a pass, or the failure with the kernel, the error and the tolerance)."""
    cache = Cache(cache_folder, say)
    key = cache_key(device, optimizer)
    if cache.passed(key, optimizer):
        return True, f"self-check passed before on this machine (cached in {cache.path})"
    declared = spec(optimizer)
    rtol, atol = declared.tolerance
    start = time.perf_counter()
    try:
        errors = []
        for layout in (ALIGNED_SET, UNALIGNED_SET):
            reference, fused = (
                two_steps(make_optimizer, backend, device, layout, declared.refresh) for backend in ("torch", "triton")
            )
            errors.append(largest_error(fused, reference, rtol, atol))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as e:  # a compile or launch error of the kernels: the torch path still works
        message = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return False, (
            f"{optimizer}'s Triton kernels ({kernel_names(optimizer)}) failed to run: {type(e).__name__}: {message}"
        )
    seconds = time.perf_counter() - start
    difference, ratio = max(error[0] for error in errors), max(error[1] for error in errors)
    if not ratio <= 1:
        return False, (
            f"{optimizer}'s Triton kernels ({kernel_names(optimizer)}) differ from the torch path by up to "
            f"{difference:.3g} after two steps, beyond the tolerance rtol {rtol:g} / atol {atol:g}"
        )
    cache.write(key, optimizer, {"passed": True, "largest_difference": difference, "seconds": seconds})
    return True, (
        f"self-check passed in {seconds:.1f} s: the Triton path ({kernel_names(optimizer)}) matches the torch path "
        f"after two steps on aligned and unaligned tensors (largest difference {difference:.2g}, tolerance rtol "
        f"{rtol:g} / atol {atol:g}; cached in {cache.path})"
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
    if not spec(c.optimizer).kernels:
        return "torch", f"{c.optimizer} has no Triton path"
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
    # rank 0 speaks for the run, this rank for its GPU
    if not passed and dist.is_initialized() and dist.get_rank() != 0:
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
