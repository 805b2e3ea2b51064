import json
import math
import os
import subprocess
import sys

import pytest
import torch

import lwlr
import train
from conftest import ROOT, read_log, tiny_run_args
from model import GPT, GPTConfig
from optimizers import adamw, base
from optimizers.registry import OPTIMIZERS
from runtime import device
from runtime.ranks import Runtime
from training import build, checkpoint
from training.config import ConfigError, TrainConfig, parse_config
from training.trainer import Trainer


def test_tiny_run_writes_config_log_and_checkpoints(tmp_path, token_dir):
    out = tmp_path / "out"
    assert train.main(tiny_run_args(out, token_dir)) == 0
    assert json.loads((out / "config.json").read_text())["config"]["model"] == "gpt2-tiny"
    losses = [r["loss"] for r in read_log(out, "train")]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    assert [r["step"] for r in read_log(out, "eval")] == [3, 6]
    assert checkpoint.complete_steps(str(out)) == [6, 3]
    assert (out / "model.safetensors").stat().st_size > 0
    record = read_log(out, "train")[-1]
    for key in ("lr", "grad_norm", "ms_per_step", "tokens_per_s", "peak_mem_gib", "mfu"):
        assert key in record


def test_schedule_warmup_cosine_and_constant():
    c = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert build.lr_at(0, c) == pytest.approx(0.1)  # step 0 takes 1/10 of the peak
    assert build.lr_at(9, c) == pytest.approx(1.0)  # the last warmup step reaches it
    assert build.lr_at(10, c) == pytest.approx(1.0)  # the cosine starts at the peak, never above it
    assert build.lr_at(35, c) == pytest.approx(0.1 + 0.9 * (2 + 2**0.5) / 4)  # a quarter of the way: cos(pi/4)
    assert build.lr_at(60, c) == pytest.approx(0.55)  # halfway through the cosine
    assert build.lr_at(110, c) == pytest.approx(0.1)  # the end of the decay
    assert build.lr_at(500, c) == pytest.approx(0.1)  # and beyond
    constant = TrainConfig(lr=1.0, warmup_steps=10, max_steps=110, schedule="constant")
    assert build.lr_at(100, constant) == 1.0


def test_torch_adamw_applies_the_multiplier_like_ours():
    """adamw.TorchAdamW at lr with multiplier 2 steps exactly as torch.optim.AdamW at 2 lr, and its groups keep lr."""
    generator = torch.Generator().manual_seed(0)
    values = [torch.randn(5, 3, generator=generator), torch.randn(4, generator=generator)]
    ours_params, reference_params = (
        [torch.nn.Parameter(v.clone()) for v in values],
        [torch.nn.Parameter(v.clone()) for v in values],
    )
    ours = adamw.TorchAdamW([{"params": ours_params[:1], "multiplier": 2.0}, {"params": ours_params[1:]}], lr=1.0)
    reference = torch.optim.AdamW(
        [{"params": reference_params[:1], "lr": 0.2}, {"params": reference_params[1:], "lr": 0.1}],
        lr=1.0,
        betas=(0.9, 0.95),
        eps=1e-8,
        weight_decay=0.1,
        fused=True,
    )
    for _ in range(3):
        for group in ours.param_groups:  # as Trainer.step sets the schedule's rate
            group["lr"] = 0.1
        grads = [torch.randn(v.shape, generator=generator) for v in values]
        for params in (ours_params, reference_params):
            for p, g in zip(params, grads):
                p.grad = g.clone()
        ours.step(), reference.step()
    assert [g["lr"] for g in ours.param_groups] == [0.1, 0.1]
    for a, b in zip(ours_params, reference_params):
        assert torch.equal(a, b)


def test_config_files_and_overrides(tmp_path):
    config_file = tmp_path / "conf.py"
    config_file.write_text("lr = 3e-4\nmax_steps = 7\nimport math\n_private = 1\n")
    c = parse_config([str(config_file), "--max_steps=9", "--residual_scale=true"])
    assert (c.lr, c.max_steps, c.residual_scale) == (3e-4, 9, True)
    config_file.write_text("learning_rate = 3e-4\n")
    with pytest.raises(ConfigError, match="conf.py: unknown config key 'learning_rate'"):
        parse_config([str(config_file)])
    config_file.write_text("max_steps = 1.5\n")
    with pytest.raises(ConfigError, match="conf.py: max_steps must be int, got float"):
        parse_config([str(config_file)])
    with pytest.raises(ConfigError, match="config file .*nothere.py not found"):
        parse_config(["nothere.py"])


def test_inconsistent_values_fail_clearly(tmp_path, token_dir):
    with pytest.raises(
        ConfigError,
        match="tokens_per_step=100 cannot be split over 1 process of sequences of block_size=32: "
        "it must be a multiple of block_size \\* processes = 32. tokens_per_step=96 or 128 would",
    ):
        train.main(tiny_run_args(tmp_path / "a", token_dir, tokens_per_step=100))
    with pytest.raises(ConfigError, match="block_size=128 exceeds the gpt2-tiny preset's 64"):
        train.main(tiny_run_args(tmp_path / "b", token_dir, block_size=128))
    from data.tokenfile import TokenFileError

    with pytest.raises(TokenFileError, match="nowhere/train.bin: no such token file"):
        train.main(tiny_run_args(tmp_path / "c", tmp_path / "nowhere"))


def test_a_misspelt_dataset_is_refused_with_a_suggestion():
    with pytest.raises(ConfigError, match="no data/shakespear/ folder; did you mean shakespeare?"):
        build.data_dir(TrainConfig(dataset="shakespear"))


def test_command_line_errors_exit_2_with_a_message_before_torch_is_imported(tmp_path):
    command = [sys.executable, "-X", "importtime", "train.py", "--no_such_key=1"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2
    assert "unknown config key 'no_such_key'" in result.stderr
    imported = [
        line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")
    ]
    assert "training.config" in imported and "torch" not in imported
    help_text = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True).stdout
    assert "--tokens_per_step=2048" in help_text and "sets grad_accum" in help_text


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_every_optimizer_trains(tmp_path, token_dir, optimizer):
    # Lion: sign updates, each element moves by lr per step. LW-AS: lr scales its step sizes.
    # Muon: lr is the orthogonalized matrices' rate (the speedrun's 0.05 scale); adamw_lr the rest's.
    lr = {"lion": 2e-3, "sgdm_lw": 1.0, "adamw_lw": 0.3, "muon": 0.02}.get(optimizer, 3e-3)
    out = tmp_path / optimizer
    args = tiny_run_args(
        out,
        token_dir,
        optimizer=optimizer,
        lr=lr,
        max_steps=12,
        eval_interval=12,
        hess_interval=2,
        data_subset_batches=1,
        lw_interval=2,
        lw_warmup_steps=4,
        adamw_lr=3e-3,  # muon's AdamW part; the others ignore it
    )
    assert train.main(args) == 0
    losses = [r["loss"] for r in read_log(out, "train")]
    assert losses[-1] < losses[0] - 0.5, losses  # one repeated batch: the loss must fall


def test_sample_reads_the_newest_checkpoint(tmp_path, token_dir):
    out = tmp_path / "run"
    assert train.main(tiny_run_args(out, token_dir, max_steps=3, eval_interval=3)) == 0
    result = subprocess.run(
        [
            sys.executable,
            "sample.py",
            f"--out_dir={out}",
            "--prompt=ROMEO:",
            "--max_new_tokens=5",
            "--num_samples=1",
            "--device=cpu",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ROMEO:") and "step-00000003" in result.stderr
    missing = subprocess.run(
        [sys.executable, "sample.py", f"--out_dir={tmp_path / 'none'}"], cwd=ROOT, capture_output=True, text=True
    )
    assert (
        missing.returncode == 2
        and missing.stderr.startswith("error: ")
        and "holds no complete checkpoint" in missing.stderr
    )


def test_bfloat16_autocast_and_torch_compile_compose_with_the_fused_kernels_and_lwlr(tmp_path, capsys):
    """The GPU configuration (bf16 autocast, torch.compile, the Triton optimizer) on a CPU: the kernels run
    interpreted, autocast and Inductor run for real. Losses and multipliers stay near the fp32 eager run's.
    A 64-token vocabulary: the interpreter takes seconds per launch over GPT-2's 50,257-row embedding."""
    from bench.common import random_token_dir

    token_dir = random_token_dir(64, str(tmp_path / "data"), train_tokens=20_000)
    common = dict(optimizer_backend="triton", max_steps=4, eval_interval=4, lwlr_T=4)
    eager, gpu_like = tmp_path / "eager", tmp_path / "gpu_like"
    assert train.main(tiny_run_args(eager, token_dir, **common)) == 0
    eager_said = capsys.readouterr().out
    assert train.main(tiny_run_args(gpu_like, token_dir, **common, dtype="bfloat16", compile="true")) == 0
    compiled_said = capsys.readouterr().out
    assert read_log(gpu_like, "start")[0]["config"]["dtype"] == "bfloat16"
    eager_losses, bf16_losses = ([r["loss"] for r in read_log(out, "train")] for out in (eager, gpu_like))
    assert (
        bf16_losses == pytest.approx(eager_losses, abs=2e-2) and bf16_losses != eager_losses
    )  # close, and really bf16
    eager_lwlr, bf16_lwlr = (json.loads((out / "lwlr.json").read_text())["layers"] for out in (eager, gpu_like))
    for a, b in zip(eager_lwlr, bf16_lwlr):
        assert b["multiplier"] == pytest.approx(a["multiplier"], rel=5e-2), a["name"]
    weights = checkpoint.load_tensors(checkpoint.step_dir(str(gpu_like), 4), "model")
    assert all(torch.isfinite(t).all() and t.dtype == torch.float32 for t in weights.values())  # fp32 master weights
    # The compile came at lwlr's first batch: the summary counts it once, as the run's compile, apart from
    # the measurement's other batches; the eager run compiled nothing.
    compiled = summary_seconds(gpu_like)["compile"]
    assert compiled > 0 and f"{compiled:.1f} s of it the first, which compiled the model" in compiled_said
    assert "torch.compile: compiled in" not in compiled_said  # not again at the first step
    eager_seconds = summary_seconds(eager)
    assert eager_seconds["compile"] == 0 and "lwlr measurement" in eager_seconds
    assert "lwlr: measured" in eager_said and "compiled the model" not in eager_said  # measured, compiling nothing


def summary_seconds(out) -> dict[str, float]:
    return json.loads((out / "summary.json").read_text())["seconds"]


# Each shipped config as its comment says to run it, and the model it trains, by hand: the preset, the
# sequence length, and the parameter count with GPT-2's vocabulary (gpt2 124,439,808 with the tied head
# counted once; gpt2-mini at 128 positions 7,242,624, the default run's first line).
SHIPPED = {
    "finetune_shakespeare.py": ([], "gpt2", 1024, 124_439_808),
    "train_gpt2.py": ([], "gpt2", 1024, 124_439_808),
    "train_gpt2_adamw_lw.py": (["train_gpt2.py"], "gpt2", 1024, 124_439_808),
    "train_gpt2_lion.py": (["train_gpt2.py"], "gpt2", 1024, 124_439_808),
    "train_gpt2_sophiag.py": (["train_gpt2.py"], "gpt2", 1024, 124_439_808),
    "train_shakespeare.py": ([], "gpt2-mini", 128, 7_242_624),
    "train_shakespeare_char.py": ([], "gpt2-mini", 128, 7_242_624),
    "eval_gpt2.py": ([], "gpt2", 1024, 124_439_808),
    "eval_gpt2_medium.py": ([], "gpt2-medium", 1024, 354_823_168),
    "eval_gpt2_large.py": ([], "gpt2-large", 1024, 774_030_080),
    "eval_gpt2_xl.py": ([], "gpt2-xl", 1024, 1_557_611_200),
}


@pytest.mark.parametrize("name", sorted(os.listdir(os.path.join(ROOT, "config"))))
def test_every_shipped_config_parses_and_builds_its_model(name, tmp_path):
    assert name in SHIPPED, f"config/{name}: add what it trains to SHIPPED"
    base, preset, block_size, params = SHIPPED[name]
    files = [os.path.join(ROOT, "config", f) for f in [*base, name]]
    c = parse_config(files)
    if c.init_from not in ("auto", "resume", "scratch"):  # GPT-2's config.json stands in for the directory
        shape = GPTConfig.from_preset(preset)
        (tmp_path / "config.json").write_text(
            json.dumps({"n_layer": shape.n_layer, "n_head": shape.n_head, "n_embd": shape.n_embd, "n_positions": 1024})
        )
        c = build.pretrained(parse_config([*files, f"--init_from={tmp_path}"]))
    with torch.device("meta"):
        model = GPT(build.gpt_config(c, vocab_size=50257))
    assert (c.model, model.config.block_size, model.num_params()) == (preset, block_size, params)


def test_dtype_auto_takes_bf16_where_the_processor_computes_it(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(device, "cpu_computes_bf16", lambda: True)
    assert device.precision(cpu, "auto") == (
        "bfloat16",
        "dtype=auto on a CPU that computes bf16 natively (AVX512-BF16 or AMX)",
    )
    assert isinstance(device.autocast(cpu, "auto"), torch.autocast)
    assert device.precision(cpu, "float32")[0] == "float32"
    monkeypatch.setattr(device, "cpu_computes_bf16", lambda: False)
    assert device.precision(cpu, "auto") == ("float32", "dtype=auto on a cpu without native bf16")
    assert device.precision(cpu, "bfloat16")[0] == "bfloat16"  # asked for: emulated, but granted
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    assert device.precision(cuda, "auto")[0] == "float32"
    with pytest.raises(ValueError, match="dtype='fp16'"):
        device.precision(cpu, "fp16")


def test_a_cpu_kind_names_its_vector_width_bf16_and_amx(monkeypatch):
    kinds = {
        "AVX2": {"avx2": True},
        "AVX512": {"avx2": True, "avx512_f": True},
        "AVX512-BF16": {"avx2": True, "avx512_f": True, "avx512_bf16": True},
        "AVX512-BF16+AMX": {"avx2": True, "avx512_f": True, "avx512_bf16": True, "amx_bf16": True},
    }
    for kind, capability in kinds.items():
        monkeypatch.setattr(torch._C._cpu, "_get_cpu_capability", lambda capability=capability: capability)
        assert device.cpu_kind() == kind


def test_the_run_says_first_which_precision_it_chose_and_why(tmp_path, token_dir, capfd):
    assert train.main(tiny_run_args(tmp_path / "run", token_dir, max_steps=1, eval_interval=1, dtype="auto")) == 0
    chosen = "bfloat16" if device.cpu_computes_bf16() else "float32"
    first = capfd.readouterr().out.splitlines()[0]
    assert first.startswith(
        "precision: bf16 autocast, with fp32 weights" if chosen == "bfloat16" else "precision: fp32 (dtype=auto"
    )
    assert read_log(tmp_path / "run", "start")[0]["precision"] == chosen


def test_the_schedule_reaches_the_optimizer_at_each_step(tmp_path, token_dir):
    """Warmup then cosine: the logged lr, the lr in a checkpoint's param groups and the size of AdamW's first
    update (sign-like: lr * multiplier per element) all follow build.lr_at, group by group."""
    args = tiny_run_args(
        tmp_path / "run",
        token_dir,
        max_steps=6,
        warmup_steps=3,
        eval_interval=6,
        lr=1e-2,
        lr_rule="fan_in",
        weight_decay=0.0,
    )
    assert train.main(args) == 0
    c = parse_config(args)
    # By hand: warmup 1/3, 2/3, 1 of lr = 1e-2, then the cosine from lr to min_lr = 2e-4 over steps 3..6,
    # min_lr + (lr - min_lr) * (1 + cos(pi * k / 3)) / 2 at k = 0, 1, 2.
    expected = [1e-2 / 3, 2e-2 / 3, 1e-2, 1e-2, 2e-4 + 9.8e-3 * 0.75, 2e-4 + 9.8e-3 * 0.25]
    assert [r["lr"] for r in read_log(tmp_path / "run", "train")] == pytest.approx(expected, rel=1e-12)
    groups = checkpoint.load_tensors(checkpoint.step_dir(str(tmp_path / "run"), 6), "optimizer")["param_groups"]
    assert {g["lr"] for g in groups} == {build.lr_at(5, c)} and len({g["multiplier"] for g in groups}) > 1
    trainer = fresh_trainer(c)
    before = {name: p.detach().clone() for name, p in trainer.raw_model.named_parameters()}
    trainer.step(0)
    for group in trainer.optimizer.param_groups:
        for name, p in zip(group["names"], group["params"]):
            if not name.endswith("k_proj.bias"):  # a zero gradient by construction: no step to speak of
                largest = (p.detach() - before[name]).abs().max().item()
                assert largest == pytest.approx(build.lr_at(0, c) * group["multiplier"], rel=1e-3), name


def test_one_or_two_accumulation_micro_steps_over_the_same_global_batch_give_the_same_weights(tmp_path, token_dir):
    """tokens_per_step 256 of 32-token rows: 8 rows in one micro-step, or 4 and 4 in two. The two micro-steps'
    gradients are averaged, so the steps are the same up to float rounding; gradients summed instead would be
    twice as large: another logged gradient norm, and other steps through AdamW's eps (1e-3 here, so that it
    matters)."""
    runs, norms = {}, {}
    for micro_batch_size in (8, 4):
        out = tmp_path / f"micro{micro_batch_size}"
        args = tiny_run_args(  # fan_in's layer-wise rates: lwlr would measure over batches of micro_batch_size rows
            out,
            token_dir,
            micro_batch_size=micro_batch_size,
            max_steps=5,
            eval_interval=5,
            eps=1e-3,
            grad_clip=0.0,  # clipping would scale a doubled gradient back
            lr_rule="fan_in",
        )
        assert train.main(args) == 0
        assert read_log(out, "start")[0]["grad_accum"] == 256 // (micro_batch_size * 32)
        runs[micro_batch_size] = checkpoint.load_tensors(checkpoint.step_dir(str(out), 5), "model")
        norms[micro_batch_size] = [r["grad_norm"] for r in read_log(out, "train")]
    assert norms[4] == pytest.approx(norms[8], rel=1e-5)  # the same gradient, step by step
    for name, weight in runs[8].items():
        # The key bias has a zero gradient by construction: rounding noise, which Adam normalizes (docs/lwlr.md).
        if not name.endswith("k_proj.bias"):
            torch.testing.assert_close(runs[4][name], weight, rtol=1e-6, atol=1e-6, msg=name)


def fresh_trainer(c):
    torch.manual_seed(c.seed)
    model = GPT(build.gpt_config(c))
    return Trainer(c, Runtime(0, 0, 1, torch.device("cpu")), model, lwlr.baseline_multipliers(model, c.lr_rule))


def test_a_plain_torch_optimizer_trains_with_the_layer_wise_rates():
    """base.with_layer_lr gives a torch.optim optimizer, which knows nothing of multiplier, each group's
    lr * multiplier in its step (SGD: p -= lr * multiplier * g, by hand), and its groups keep the schedule's lr;
    unwrapped, set_lr refuses it."""
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3))
    groups = [{"params": [a], "multiplier": 0.5}, {"params": [b], "multiplier": 2.0}]
    sgd = base.with_layer_lr(torch.optim.SGD)(groups, lr=1.0)
    base.set_lr(sgd, 0.1)
    a.grad, b.grad = torch.ones(3), torch.ones(3)
    sgd.step()
    assert torch.equal(a.detach(), torch.full((3,), -0.05)) and torch.equal(b.detach(), torch.full((3,), -0.2))
    assert [group["lr"] for group in sgd.param_groups] == [0.1, 0.1]
    with pytest.raises(TypeError, match=r"SGD ignores multipliers: build it from optimizers.base.with_layer_lr\(SGD\)"):
        base.set_lr(torch.optim.SGD([{"params": [a], "multiplier": 0.5}], lr=1.0), 0.1)


def test_compile_auto_is_on_where_it_repays_its_cost(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    default = parse_config([])  # the default run: gpt2-mini, GPT-2's vocabulary, 200 steps
    monkeypatch.setattr(build.shutil, "which", lambda name: "/usr/bin/" + name)
    monkeypatch.setattr(device, "cpu_computes_bf16", lambda: False)  # fp32: compiling measured no faster
    assert build.compiles(default, cpu, 50257) == (
        False,
        "compile=auto on a CPU: off in fp32, where the default run's compiled step was no faster (docs/benchmarks.md)",
    )
    monkeypatch.setattr(device, "cpu_computes_bf16", lambda: True)  # bf16 autocast: 0.66x a step
    assert build.compiles(default, cpu, 50257)[0]
    assert not build.compiles(default, cpu, 82)[0]  # char-level: 7.6 ms a step saved, 5,300 steps to repay
    assert not build.compiles(parse_config(["--max_steps=100"]), cpu, 50257)[0]
    assert build.compiles(parse_config(["--max_steps=100"]), cuda, 82)[0]
    assert not build.compiles(parse_config(["--compile=false"]), cuda, 50257)[0]
    monkeypatch.setattr(build.shutil, "which", lambda name: None)
    assert build.compiles(default, cpu, 50257) == (
        False,
        "compile=auto on a CPU: off, no C++ compiler on PATH for inductor",
    )


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--dropout=1.5", "dropout=1.5 must lie in [0, 1)"),
        ("--beta1=-0.1", "beta1=-0.1 must lie in [0, 1)"),
        ("--beta2=1.5", "beta2=1.5 must lie in [0, 1)"),
        ("--eps=-1", "eps=-1.0 must be a finite number >= 0"),
        ("--seed=-1", "seed=-1 must be >= 0"),
        ("--device=tpu", "device='tpu': choose auto, cpu, cuda or cuda:N"),
    ],
)
def test_out_of_range_values_are_refused_as_the_config_is_read(flag, message):
    with pytest.raises(ConfigError) as error:
        parse_config([flag])
    assert str(error.value).startswith(message)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_device_cuda_without_cuda_is_one_line_before_out_dir_is_touched(tmp_path, token_dir):
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "train.py", *tiny_run_args(out, token_dir, device="cuda")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr[-2000:]
    assert result.stderr.startswith("error: device=cuda, but torch sees no CUDA device here") and not out.exists()
