"""One registry of optimizers (optimizers/registry.py), each declared once beside its class (spec.py). Every
entry is a choice of the config and listed by --help; it builds from a config; it holds the state per
parameter it declares (the memory line's figure); it steps as its reference does; its GPU-check settings
train, launching exactly the Triton kernels it declares; and its kernels pass the self-check under the
tolerance it declares, keyed on its own source files. The same checks pass for a toy optimizer added as
docs/architecture.md says: its own file (this one) and one registry line."""

import dataclasses
import importlib
import os
import sys

import pytest
import torch
import triton
import triton.language as tl

from bench.common import random_token_dir
from conftest import ROOT, TEST_DEVICE
from model import GPT, GPTConfig
from optimizers import base, registry, self_check
from optimizers.base import FusedOptimizer, layer_lr
from optimizers.kernels import chunk, param_and_grad, tensor_lr
from optimizers.spec import OptimizerSpec, Reference
from runtime.ranks import Runtime
from training import build
from training.config import TrainConfig, help_text
from training.trainer import Trainer

DEVICE = torch.device(TEST_DEVICE)


# ---- the toy: plain SGD with decoupled weight decay, as a new optimizer's file would hold it -------------


@triton.jit
def toy_sgd_kernel(
    numel_ptr,
    chunk_tensor_ptr,
    chunk_start_ptr,
    found_inf_ptr,
    multiplier_ptr,
    weight_decay_ptr,
    param_ptrs,
    grad_ptrs,
    lr,
    BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """p *= 1 - lr*wd; p -= lr * g."""
    t, offs, mask = chunk(numel_ptr, chunk_tensor_ptr, chunk_start_ptr, found_inf_ptr, BLOCK, ALIGNED)
    lr_t = tensor_lr(lr, multiplier_ptr, None, t)
    param, p, g = param_and_grad(param_ptrs, grad_ptrs, weight_decay_ptr, t, offs, mask, lr_t, ALIGNED)
    tl.store(param + offs, p - lr_t * g, mask=mask)


class ToySGD(FusedOptimizer):
    state_names = ()
    scalar_keys = ("lr",)

    def __init__(self, params, lr=1e-2, weight_decay=0.0, backend="auto"):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay), backend)

    def _update_torch(self, group, params, grads, states):
        lr = layer_lr(group)
        if group["weight_decay"]:
            torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
        torch._foreach_add_(params, grads, alpha=-lr)

    def _launch_step(self, plan, grads, found_inf, group):
        (params,) = plan.tables("param")
        plan.launch(toy_sgd_kernel, found_inf, plan.multiplier, plan.weight_decay, params, grads, group["lr"])


TOY = OptimizerSpec(
    name="toy_sgd",
    summary="plain SGD, a test's toy",
    build=lambda c, groups, n_head, backend: ToySGD(groups, lr=c.lr, backend=backend),
    state_per_parameter=0,
    # torch's SGD couples weight decay into the gradient where ours is decoupled: compared without it
    reference=Reference("torch.optim.SGD", lambda c, groups: torch.optim.SGD(groups, lr=c.lr), {"weight_decay": 0.0}),
    gpu_check=dict(lr=1e-2),
    kernels={toy_sgd_kernel: 12},  # reads p, g and writes p
    tolerance=(1e-5, 1e-6),
)

# ---- the checks every entry passes ------------------------------------------------------------------------


def tiny_model(vocab_size: int = 50257) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig.from_preset("gpt2-tiny", vocab_size=vocab_size)).to(DEVICE)


def groups_of(model, c: TrainConfig) -> list[dict]:
    multipliers = {name: 0.5 + (i % 5) / 4 for i, (name, _) in enumerate(model.named_parameters())}
    return base.param_groups(model, multipliers, c.weight_decay)


def check_is_a_complete_choice(name: str) -> None:
    spec = registry.spec(name)
    assert isinstance(spec, OptimizerSpec) and spec.name == name
    assert spec.summary and "\n" not in spec.summary
    assert TrainConfig(optimizer=name).optimizer == name  # a choice of the config
    assert f"      {name}: {spec.summary}" in help_text().splitlines()
    assert (spec.tolerance is not None) == bool(spec.all_kernels)  # kernels come with their tolerance
    assert spec.reference.name and callable(spec.reference.build)
    for settings in (spec.gpu_check, spec.reference.settings):  # both are config keys and values
        TrainConfig(optimizer=name, **settings)
    assert spec.refresh_interval(TrainConfig(optimizer=name)) >= 1
    assert spec.refuses(TrainConfig(optimizer=name), True) is None  # the defaults run, under fsdp too


def check_holds_its_declared_state(name: str) -> None:
    """The state shaped like its parameter, in parameters' worth, after a step: at most the declared figure
    and within one of it (the memory line's estimate; per-block and per-tensor values, Adam-mini's second
    moment and LW-AS's step sizes, come on top and are small at GPT-2's sizes)."""
    spec, c = registry.spec(name), TrainConfig(optimizer=name, model="gpt2-tiny")
    model = tiny_model()
    optimizer = spec.build(c, groups_of(model, c), model.config.n_head, "torch")
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    base.set_lr(optimizer, c.lr)
    optimizer.step()
    params = list(model.parameters())
    held = sum(
        t.numel() for p in params for t in optimizer.state[p].values() if torch.is_tensor(t) and t.shape == p.shape
    )
    per_parameter = held / sum(p.numel() for p in params)
    assert spec.state_per_parameter - 1 < per_parameter <= spec.state_per_parameter + 0.01, per_parameter


def check_steps_as_its_reference(name: str, steps: int = 3) -> None:
    """Our torch path against the reference over a few steps of random gradients, each layer at its own
    rate (the reference's groups carry lr * multiplier), under the settings the reference holds in."""
    spec = registry.spec(name)
    c = TrainConfig(optimizer=name, model="gpt2-tiny", lr=1e-3, **spec.reference.settings)
    ours_model, reference_model = tiny_model(), tiny_model()
    groups = groups_of(ours_model, c)
    ours = spec.build(c, groups, ours_model.config.n_head, "torch")
    theirs = dict(reference_model.named_parameters())
    reference = spec.reference.build(
        c,
        [
            {
                "params": [theirs[n] for n in group["names"]],
                "names": list(group["names"]),
                "lr": c.lr * group["multiplier"],
                "weight_decay": group["weight_decay"],
            }
            for group in groups
        ],
    )
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        base.set_lr(ours, c.lr)
        for (_, a), (_, b) in zip(ours_model.named_parameters(), reference_model.named_parameters()):
            a.grad = (torch.randn(a.shape, generator=generator) * 1e-2).to(DEVICE)
            b.grad = a.grad.clone()
        ours.step()
        reference.step()
    for (name_, a), b in zip(ours_model.named_parameters(), reference_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"{name}: {name_}")


def check_trains_on_its_kernels(name: str, data_dir: str, monkeypatch) -> None:
    """Two training steps with the Triton path asked for, in the GPU check's settings (its refresh due in
    them): the kernels launched are exactly the declared ones (none: the run's backend is torch)."""
    spec = registry.spec(name)
    settings = dict(
        model="gpt2-tiny",
        data_dir=data_dir,
        block_size=16,
        micro_batch_size=2,
        tokens_per_step=32,
        device=TEST_DEVICE,
        dtype="float32",
        compile="false",
        lr_rule="single",
        optimizer=name,
        optimizer_backend="triton",
        kernel_check="off",
        **spec.gpu_check,
    )
    c = TrainConfig(**settings)
    launched, real = [], base.launch_kernel
    monkeypatch.setattr(base, "launch_kernel", lambda k, *args, **meta: (launched.append(k), real(k, *args, **meta)))
    torch.manual_seed(0)
    model = GPT(build.gpt_config(c)).to(DEVICE)  # the data's 64-token vocabulary, 16 positions
    trainer = Trainer(c, Runtime(0, 0, 1, DEVICE), model, None, backend=("triton", "the registry test"))
    losses = torch.stack([trainer.step(step)[1] for step in range(2)])
    assert torch.isfinite(losses).all()
    assert set(launched) == set(spec.all_kernels)
    if not spec.kernels:
        assert self_check.choose_backend(c, DEVICE, None, "unused")[0] == "torch"


def check_passes_the_self_check(name: str, tmp_path, monkeypatch) -> None:
    """The self-check passes, having launched every kernel the entry declares (its refresh's too)."""
    spec = registry.spec(name)
    if not spec.kernels:
        return
    c = TrainConfig(optimizer=name)
    launched, real = [], base.launch_kernel
    monkeypatch.setattr(base, "launch_kernel", lambda k, *args, **meta: (launched.append(k), real(k, *args, **meta)))
    passed, finding = self_check.check(
        name, lambda groups, backend: spec.build(c, groups, self_check.N_HEAD, backend), DEVICE, str(tmp_path)
    )
    assert passed, finding
    assert set(launched) == set(spec.all_kernels)
    # the cache keys on the optimizer's own files: the file that declares it and what that file imports
    files = self_check.source_files(name)
    declared_in = os.path.relpath(importlib.import_module(registry.module_of(name)).__file__, ROOT)
    assert declared_in in files and "optimizers/kernels.py" in files and "optimizers/base.py" in files


# ---- every registered optimizer, and the toy ---------------------------------------------------------------


@pytest.fixture(scope="module")
def small_vocabulary_data(tmp_path_factory):
    """Random ids over 64 tokens: the interpreted kernels go through the embedding row by row."""
    return random_token_dir(64, str(tmp_path_factory.mktemp("data")), train_tokens=20_000)


@pytest.mark.parametrize("name", list(registry.OPTIMIZERS))
def test_every_entry_is_a_complete_choice_holding_its_declared_state(name):
    check_is_a_complete_choice(name)
    check_holds_its_declared_state(name)


@pytest.mark.parametrize("name", list(registry.OPTIMIZERS))
def test_every_entry_steps_as_its_reference(name):
    check_steps_as_its_reference(name)


@pytest.mark.parametrize("name", list(registry.OPTIMIZERS))
def test_every_entry_trains_on_the_kernels_it_declares_which_pass_the_self_check(
    name, small_vocabulary_data, monkeypatch, tmp_path
):
    check_trains_on_its_kernels(name, small_vocabulary_data, monkeypatch)
    check_passes_the_self_check(name, tmp_path, monkeypatch)


def test_a_toy_optimizer_added_as_the_docs_say_passes_every_check(small_vocabulary_data, monkeypatch, tmp_path):
    assert "toy_sgd" not in registry.OPTIMIZERS
    monkeypatch.setitem(registry.OPTIMIZERS, "toy_sgd", "test_registry:TOY")  # the one registry line
    check_is_a_complete_choice("toy_sgd")
    check_holds_its_declared_state("toy_sgd")
    check_steps_as_its_reference("toy_sgd")
    check_trains_on_its_kernels("toy_sgd", small_vocabulary_data, monkeypatch)
    check_passes_the_self_check("toy_sgd", tmp_path, monkeypatch)


@pytest.mark.parametrize(
    "wrong, check",
    [
        (dict(state_per_parameter=2), check_holds_its_declared_state),  # declares state it does not hold
        (dict(kernels={}, tolerance=None), "trains"),  # forgets the kernel its step launches
        (dict(reference=Reference("torch.optim.Adam", lambda c, groups: torch.optim.Adam(groups, lr=c.lr))), "steps"),
        (dict(summary="two\nlines"), check_is_a_complete_choice),
    ],
)
def test_a_wrong_declaration_fails_its_check(wrong, check, small_vocabulary_data, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "WRONG", dataclasses.replace(TOY, **wrong), raising=False)
    monkeypatch.setitem(registry.OPTIMIZERS, "toy_sgd", "test_registry:WRONG")
    with pytest.raises(AssertionError):
        if check == "trains":
            check_trains_on_its_kernels("toy_sgd", small_vocabulary_data, monkeypatch)
        elif check == "steps":
            check_steps_as_its_reference("toy_sgd")
        else:
            check("toy_sgd")
