"""optimizer=muon (optimizers/muon.py) step for step against torch.optim.Muon and torch.optim.AdamW run directly at
lr * multiplier, through a state-dict reload; its guard; and its DDP run against one process."""

import inspect

import pytest
import torch

from conftest import TEST_DEVICE, read_log, tiny_run_args, torchrun
from model import GPT, GPTConfig
from optimizers import base, muon
from training import checkpoint

BLOCK_MATRICES = {"q_proj", "k_proj", "v_proj", "o_proj", "c_fc", "c_proj"}


def tiny_model() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig.from_preset("gpt2-tiny", vocab_size=128)).to(TEST_DEVICE)


def torch_newton_schulz_in_float32():
    """torch.optim.Muon's own Newton-Schulz function with its one cast to bf16 made a cast to fp32."""
    source = inspect.getsource(torch.optim._muon._zeropower_via_newtonschulz)
    assert source.count(".bfloat16()") == 1
    namespace = dict(vars(torch.optim._muon))
    exec(source.replace(".bfloat16()", ".float()"), namespace)
    return namespace["_zeropower_via_newtonschulz"]


@pytest.mark.parametrize(
    "backend, ns_dtype",
    [("torch", torch.bfloat16), ("triton", torch.bfloat16), ("torch", torch.float32)],
    ids=["torch-bf16", "triton-bf16", "torch-fp32"],
)
def test_muon_steps_as_torch_muon_and_adamw_do_at_each_layers_rate_through_a_reload(backend, ns_dtype, monkeypatch):
    if ns_dtype == torch.float32:  # the references run torch.optim.Muon's step around an fp32 Newton-Schulz
        monkeypatch.setattr(torch.optim._muon, "_zeropower_via_newtonschulz", torch_newton_schulz_in_float32())
    ours_model, reference_model = tiny_model(), tiny_model()
    names = [name for name, _ in ours_model.named_parameters()]
    scales = {name: 0.5 + (i % 5) / 4 for i, name in enumerate(names)}  # a layer-wise rate per tensor
    lr, adamw_lr, betas, eps = 0.02, 3e-3, (0.9, 0.95), 1e-8

    def ours_from(state=None):
        groups = base.param_groups(ours_model, scales, weight_decay=0.1)
        optimizer = muon.Muon(
            groups,
            lr=lr,
            adamw_lr_ratio=adamw_lr / lr,
            momentum=0.95,
            betas=betas,
            eps=eps,
            ns_dtype=ns_dtype,
            backend=backend,
        )
        if state is not None:
            optimizer.load_state_dict(state)
        return optimizer

    ours = ours_from()
    muon_names = {name for group in ours.muon.param_groups for name in group["names"]}
    assert muon_names == {n for n in names if n.split(".")[-2] in BLOCK_MATRICES and n.endswith("weight")}
    # The references: one torch optimizer per tensor, at the rate that tensor's layer gets.
    references = {}
    for name, p in reference_model.named_parameters():
        decay = 0.1 if p.dim() >= 2 else 0.0
        if name in muon_names:
            references[name] = torch.optim.Muon([p], lr=lr * scales[name], weight_decay=decay, momentum=0.95)
        else:
            references[name] = torch.optim.AdamW(
                [p], lr=adamw_lr * scales[name], betas=betas, eps=eps, weight_decay=decay
            )
    generator = torch.Generator().manual_seed(1)
    schedule = [1.0, 0.8, 0.6, 0.5, 0.3, 0.1]  # the schedule's fraction of the peak, step by step
    for step, fraction in enumerate(schedule):
        base.set_lr(ours, lr * fraction)
        for name, reference in references.items():
            peak = lr if name in muon_names else adamw_lr
            reference.param_groups[0]["lr"] = peak * fraction * scales[name]
        for (_, a), (_, b) in zip(ours_model.named_parameters(), reference_model.named_parameters()):
            a.grad = torch.randn(a.shape, generator=generator).to(TEST_DEVICE)
            b.grad = a.grad.clone()
        ours.step()
        for reference in references.values():
            reference.step()
        if step == 2:
            ours = ours_from(ours.state_dict())
    for (name, a), b in zip(ours_model.named_parameters(), reference_model.parameters()):
        if name in muon_names:  # the same torch code on the same numbers
            assert torch.equal(a, b), name
        else:  # ours fused (torch's fused kernel, or the Triton one) against torch's default AdamW
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


def test_a_step_the_guard_marks_non_finite_changes_nothing_in_either_part():
    model = tiny_model()
    optimizer = muon.Muon(base.param_groups(model, None, 0.1), lr=0.02, adamw_lr_ratio=0.15, backend="torch")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.found_inf = torch.ones((), device=TEST_DEVICE)
    optimizer.step()
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    optimizer.found_inf = torch.zeros((), device=TEST_DEVICE)
    optimizer.step()
    assert not torch.equal(model.transformer.h[0].attn.q_proj.weight, before["transformer.h.0.attn.q_proj.weight"])
    assert not torch.equal(model.transformer.wte.weight, before["transformer.wte.weight"])


def test_muon_under_ddp_matches_one_process_to_its_bf16_orthogonalization(tmp_path, token_dir):
    """Two processes average their gradients where one accumulates micro-steps: fp32 sums in another order
    (1e-7), which Muon's bf16 Newton-Schulz turns into about 1e-3 of a weight's scale (measured 1.8e-3).
    Gradients left unaveraged would differ by the update itself, some 5e-2. The key biases are left out:
    their gradient is zero by construction (docs/lwlr.md, "The key bias")."""
    one, two = tmp_path / "one", tmp_path / "two"
    settings = dict(max_steps=4, eval_interval=4, optimizer="muon", lr=0.02, adamw_lr=3e-3)
    for nproc, out in ((1, one), (2, two)):
        result = torchrun(nproc, tiny_run_args(out, token_dir, **settings))
        assert result.returncode == 0, result.stderr[-3000:]
    assert [r["loss"] for r in read_log(one, "train")] == pytest.approx(
        [r["loss"] for r in read_log(two, "train")], rel=1e-5
    )
    a, b = (checkpoint.load_tensors(checkpoint.step_dir(str(out), 4), "model") for out in (one, two))
    for name in a:
        if not name.endswith("k_proj.bias"):
            assert (a[name] - b[name]).abs().max() <= 5e-3 * a[name].abs().max(), name
