"""What a new user meets on a first run: progress through every long phase, a step time without the
compilation in it, torchrun on the first try, a finished run that says so, nanoGPT's names understood,
fine-tuning from a directory of any shape."""

import io
import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch

import train
from conftest import ROOT, read_log, tiny_run_args, torchrun, tree_digest
from runtime import exits, progress
from runtime.progress import Progress, counted, duration, first_beating
from training import build, metrics
from training import trainer as trainer_module
from training.config import ConfigError, TrainConfig, parse_config
from training.trainer import Trainer


def test_durations_read_as_people_say_them():
    assert [duration(s) for s in (0, 42.4, 60, 185, 3599, 3600, 7620)] == [
        "0 s",
        "42 s",
        "1 min 00 s",
        "3 min 05 s",
        "59 min 59 s",
        "1 h 00 min",
        "2 h 07 min",
    ]


def test_progress_writes_plain_lines_with_the_count_rate_and_time_left_off_a_terminal(monkeypatch):
    clock = iter([0.0, 20.0, 24.0, 28.0])  # the start, then one reading per update
    monkeypatch.setattr(time, "perf_counter", lambda: next(clock))
    stream = io.StringIO()  # not a terminal
    with Progress("lwlr", 4, "batches", every=22.0, stream=stream) as p:
        assert list(counted(["a", "b", "c"], p)) == ["a", "b", "c"]
    # 20 s: the first batch (it compiled), under `every`, silent; 24 s: 2 of 4 done, the rate from the second
    # batch alone (1 in 4 s), so 8 s left, not the 24 s a rate over the first would say; 28 s: under `every`
    assert stream.getvalue() == "lwlr: 2/4 batches | 0.25 batches/s | 8 s left\n"
    assert p.first_seconds == 20.0  # the first batch's, which a run counts as its compile
    clock = iter([0.0, 95.0])
    monkeypatch.setattr(time, "perf_counter", lambda: next(clock))
    first = io.StringIO()
    with Progress("eval", 20, "batches", every=10.0, stream=first) as p:
        p.update()
    # a first batch that compiled for 95 s: no rate yet, so no "0 batches/s" and no "? left"
    assert first.getvalue() == "eval: 1/20 batches | the first in 1 min 35 s\n"
    monkeypatch.undo()
    quiet = io.StringIO()
    with Progress("eval", 2, every=0.0, stream=quiet, enabled=False) as p:
        p.update(), p.update()
    assert quiet.getvalue() == ""  # ranks other than 0


def test_a_heartbeat_beats_while_the_first_item_is_worked_on_and_stops_after_it():
    stream = io.StringIO()
    items = first_beating(iter("abc"), "lwlr: compiling at the first batch", every=0.01, stream=stream)
    assert next(items) == "a"
    for _ in range(3000):  # the first item "compiles" until two beats are out (the bound ends a hung test)
        if stream.getvalue().count("\n") >= 2:
            break
        time.sleep(0.01)
    assert next(items) == "b"
    beats = stream.getvalue().count("\n")
    time.sleep(0.05)  # five periods on the second item: a heartbeat still beating would add lines
    assert stream.getvalue().count("\n") == beats >= 2 and list(items) == ["c"]
    lines = stream.getvalue().splitlines()
    assert all(line.startswith("lwlr: compiling at the first batch: ") and line.endswith(" so far") for line in lines)


def test_progress_draws_a_bar_on_a_terminal(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    clock = iter([0.0, 30.0, 31.0, 32.0])  # the start, then one reading per update
    monkeypatch.setattr(time, "perf_counter", lambda: next(clock))
    terminal = Terminal()
    with Progress("lwlr", 3, "batches", every=0.0, stream=terminal) as p:
        p.update(), p.update(), p.update()
        assert (p.bar.n, p.bar.total, p.bar.desc) == (3, 3, "lwlr")
    assert "batches/s |" not in terminal.getvalue()  # the bar, not plain lines
    assert p.first_seconds == 30.0  # on a terminal as in a log


def test_a_run_reports_progress_through_the_measurement_and_the_evals(tmp_path, token_dir, capsys, monkeypatch):
    monkeypatch.setattr(progress, "EVERY_SECONDS", 0.0)  # a line after every unit of work
    assert (
        train.main(tiny_run_args(tmp_path / "run", token_dir, max_steps=2, eval_interval=2, lwlr_T=3, eval_steps=3))
        == 0
    )
    out = capsys.readouterr().out
    assert "lwlr: 1/3 batches" in out and "lwlr: 2/3 batches" in out
    assert "eval: 1/3 batches" in out and "eval: 2/3 batches" in out


class StepClock:
    """The step time's clock (training.metrics), moved by the steps themselves: the figures do not depend
    on how busy the machine is."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


def test_the_step_time_leaves_out_the_first_step_and_the_log_says_the_time_left(
    tmp_path, token_dir, monkeypatch, capsys
):
    step, clock, beats = Trainer.step, StepClock(), []

    def compiling_first_step(self, n, layer_stats=None):  # the first step compiles: 100 s, and a heartbeat meanwhile
        if n == 0:
            for _ in range(3000):  # until the heartbeat has beaten twice (the loop only ends a hung test)
                if len([line for line in beats if "compiling" in line]) >= 2:
                    break
                time.sleep(0.01)
        clock.now += 100.0 if n == 0 else 0.25
        return step(self, n, layer_stats)

    real_print = print
    monkeypatch.setattr(
        progress, "print", lambda *a, **k: (beats.append(str(a[0])), real_print(*a, **k)), raising=False
    )
    monkeypatch.setattr(metrics, "time", clock)
    monkeypatch.setattr(Trainer, "step", compiling_first_step)
    monkeypatch.setattr(progress, "EVERY_SECONDS", 0.05)  # heartbeats come quickly while it compiles
    monkeypatch.setattr(trainer_module, "compiles", lambda *args: (True, "compile=true"))
    monkeypatch.setattr(torch, "compile", lambda model: model)
    out = tmp_path / "run"
    assert train.main(tiny_run_args(out, token_dir, max_steps=4, log_interval=2, eval_interval=4)) == 0
    printed = capsys.readouterr().out
    assert "torch.compile: on (compile=true); compiling at the first step" in printed
    assert "torch.compile: compiled in 1 min 40 s (the first step, which ms/step leaves out)" in printed
    compiled_at = printed.index("torch.compile: compiled in")
    assert re.search(r"torch.compile: compiling: \d+ s so far", printed[:compiled_at])
    assert "torch.compile: compiling: " not in printed[compiled_at:]  # the step's heartbeat ends with its compile
    first, last = read_log(out, "train")
    assert first["ms_per_step"] == pytest.approx(250)  # step 2 alone; step 1's 100 s left out
    assert first["seconds_left"] == pytest.approx(0.25 * 2)  # 2 of 4 steps to go
    assert f"| {duration(first['seconds_left'])} left" in printed
    assert last["seconds_left"] == 0


def test_an_eval_between_log_lines_does_not_double_the_logged_loss(tmp_path, token_dir):
    # lr 0 on one repeated batch: every step's loss is the same number, so every interval's mean is too.
    out = tmp_path / "run"
    args = tiny_run_args(
        out, token_dir, lr=0.0, min_lr=0.0, data_subset_batches=1, max_steps=6, log_interval=2, eval_interval=3
    )
    assert train.main(args) == 0
    losses = [r["loss"] for r in read_log(out, "train")]
    assert len(losses) == 3 and losses == pytest.approx([losses[0]] * 3, rel=1e-6)


def shipped(name: str) -> TrainConfig:
    return parse_config([os.path.join(ROOT, "config", name)])


def test_the_micro_batch_adapts_so_the_global_batch_splits_over_the_processes():
    said = []
    default = TrainConfig()  # 2,048 tokens = 16 * 128
    assert build.fit_micro_batch(default, 128, 1, say=said.append) is default and said == []
    two = build.fit_micro_batch(default, 128, 2, say=said.append)
    assert (two.micro_batch_size, build.grad_accumulation(two, 128, 2)) == (8, 1)
    assert said == [
        "batch: micro_batch_size 16 -> 8, so that tokens_per_step=2,048 splits over 2 processes: "
        "8 batch * 128 block * 1 accum * 2 processes"
    ]
    gpt2 = shipped("train_gpt2.py")  # 491,520 = 480 sequences of 1024: 160 per process on 3, and 12 does not divide 160
    three = build.fit_micro_batch(gpt2, 1024, 3, say=said.append)
    assert (three.micro_batch_size, build.grad_accumulation(three, 1024, 3)) == (10, 16)


TRAINING_CONFIGS = [name for name in sorted(os.listdir(os.path.join(ROOT, "config"))) if not name.startswith("eval_")]


@pytest.mark.parametrize("name", TRAINING_CONFIGS)  # config/eval_*.py never train: eval_only
def test_every_shipped_config_splits_its_batch_over_1_2_4_and_8_processes(name):
    c = shipped(name)
    block_size = c.block_size or 1024
    for world_size in (1, 2, 4, 8):
        fitted = build.fit_micro_batch(c, block_size, world_size, say=lambda line: None)
        accum = build.grad_accumulation(fitted, block_size, world_size)
        assert fitted.micro_batch_size * block_size * accum * world_size == c.tokens_per_step
        assert fitted.micro_batch_size <= c.micro_batch_size and fitted.tokens_per_step == c.tokens_per_step


def test_a_global_batch_no_split_fits_names_the_values_that_would():
    with pytest.raises(ConfigError) as error:
        build.fit_micro_batch(TrainConfig(), 128, 3)
    assert str(error.value) == (
        "tokens_per_step=2,048 cannot be split over 3 processes of sequences of block_size=128: it must be "
        "a multiple of block_size * processes = 384. tokens_per_step=1,920 or 2,304 would; or run on "
        "1, 2, 4, 8, 16 processes"
    )


def test_a_config_error_is_said_by_rank_0_alone(monkeypatch, capsys):
    def bad_config():
        raise ConfigError("tokens_per_step=3 cannot be split")

    for rank, expected in (("0", "error: tokens_per_step=3 cannot be split\n"), ("1", "")):
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(SystemExit) as exit_code:
            exits.run_main(bad_config)
        assert exit_code.value.code == 2 and capsys.readouterr().err == expected


@pytest.fixture(scope="module")
def shakespeare_dirs(tmp_path_factory):
    """The default and the char-level datasets, prepared as the quick start prepares them."""
    from data.shakespeare import prepare as bpe
    from data.shakespeare_char import prepare as char

    root = tmp_path_factory.mktemp("shakespeare")
    (root / "bpe").mkdir(), (root / "char").mkdir()
    bpe.prepare(str(root / "bpe")), char.prepare(str(root / "char"))
    return root


@pytest.mark.parametrize("config, data", [("train_shakespeare.py", "bpe"), ("train_shakespeare_char.py", "char")])
def test_the_default_and_char_level_configs_run_unchanged_under_torchrun_on_2_processes(
    tmp_path, shakespeare_dirs, config, data
):
    out = tmp_path / "run"
    args = [
        f"config/{config}",
        f"--data_dir={shakespeare_dirs / data}",
        f"--out_dir={out}",
        "--max_steps=2",
        "--eval_interval=2",
        "--eval_steps=1",
        "--lwlr_T=2",
        "--lwlr_cache_dir=none",
        "--compile=false",
        "--dtype=float32",
    ]
    result = torchrun(2, args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        result.stdout.count("batch: micro_batch_size 16 -> 8, so that tokens_per_step=2,048 splits over 2 processes")
        == 1
    )
    start = read_log(out, "start")[0]
    assert start["grad_accum"] == 1 and start["config"]["micro_batch_size"] == 8


def test_a_finished_run_run_again_says_so_and_changes_no_file(tmp_path, token_dir, capsys):
    out = tmp_path / "run"
    args = tiny_run_args(out, token_dir, max_steps=3, eval_interval=3)
    assert train.main(args) == 0
    before = tree_digest(out)
    capsys.readouterr()
    assert train.main([*args, "--micro_batch_size=2"]) == 0
    said = capsys.readouterr().out
    assert f"{out} holds a finished run: step 3 of max_steps=3" in said
    extend = "--max_steps=MORE --lr_decay_steps=3 --allow_resume_changes=max_steps"
    assert extend in said and "another --out_dir" in said
    assert tree_digest(out) == before
    extended = ["--max_steps=4", "--lr_decay_steps=3", "--allow_resume_changes=max_steps"]  # as the message says
    assert train.main([*args, *extended]) == 0
    assert read_log(out, "start")[-1]["step"] == 3 and read_log(out, "train")[-1]["step"] == 4


@pytest.mark.parametrize(
    "typed, meant",
    [
        ("max_iters", "max_steps"),
        ("learning_rate", "lr"),
        ("batch_size", "micro_batch_size"),
        ("gradient_accumulation_steps", "tokens_per_step"),
        ("eval_iters", "eval_steps"),
        ("lr_decay_iters", "lr_decay_steps"),
        ("weight_decy", "weight_decay"),
    ],
)
def test_an_unknown_key_names_the_one_meant(typed, meant, tmp_path):
    with pytest.raises(ConfigError, match=rf"unknown config key '{typed}'; .*\b{meant}\b"):
        parse_config([f"--{typed}=1"])
    config_file = tmp_path / "nanogpt.py"
    config_file.write_text(f"{typed} = 1\n")
    with pytest.raises(
        ConfigError, match=rf"{re.escape(str(config_file))}: unknown config key '{typed}'; .*\b{meant}\b"
    ):
        parse_config([str(config_file)])


@pytest.fixture
def narrow_long_dir(tmp_path):
    """A GPT-2 directory with a narrow preset's shape (2 layers, 2 heads, width 64) but 1024 positions."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    path = tmp_path / "hf-1024-positions"
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=1024, vocab_size=50257)).save_pretrained(
        path
    )
    return path


def test_a_finetune_takes_the_directorys_positions_and_names_no_preset(tmp_path, token_dir, narrow_long_dir, capsys):
    out = tmp_path / "run"
    args = tiny_run_args(
        out,
        token_dir,
        init_from=narrow_long_dir,
        block_size=384,
        micro_batch_size=1,
        tokens_per_step=384,
        max_steps=1,
        eval_interval=1,
        eval_steps=1,
    )
    args = [
        arg for arg in args if not arg.startswith(("--lwlr_T=", "--model="))
    ]  # the directory's, and a fine-tune's default
    assert train.main(args) == 0
    printed = capsys.readouterr().out
    assert "narrow-2" not in printed and "preset" not in printed
    assert f"init_from: the weights of {narrow_long_dir} (2 layers, 2 heads, width 64, block_size 384)" in printed
    assert "over T=10 batches" in printed
    whole = build.pretrained(
        parse_config([f"--init_from={narrow_long_dir}", f"--data_dir={token_dir}", "--block_size=0"])
    )
    assert build.gpt_config(whole).block_size == 1024 and whole.lwlr_T == 10
    given = build.pretrained(parse_config([f"--init_from={narrow_long_dir}", f"--data_dir={token_dir}", "--lwlr_T=3"]))
    assert given.lwlr_T == 3


def test_the_download_command_named_is_the_one_huggingface_hub_installs(tmp_path):
    with pytest.raises(
        ConfigError, match=r"`hf download openai-community/gpt2 --local-dir hf/gpt2`.*before 0\.34.*huggingface-cli"
    ):
        build.pretrained(parse_config(["--init_from=openai-community/gpt2"]))
    for path in ("README.md", "config/finetune_shakespeare.py"):
        text = open(os.path.join(ROOT, path)).read()
        assert "hf download openai-community/gpt2" in text
        assert "huggingface-cli" not in re.sub(r"older versions call it\s+`huggingface-cli\s+download`", "", text)


def test_a_run_ends_with_its_summary_and_summary_json(tmp_path, token_dir, capsys):
    out = tmp_path / "run"
    assert train.main(tiny_run_args(out, token_dir, max_steps=4, eval_interval=2, lr_decay_steps=6)) == 0
    further = tiny_run_args(
        out, token_dir, max_steps=6, eval_interval=2, lr_decay_steps=6, allow_resume_changes="max_steps"
    )
    capsys.readouterr()
    assert train.main(further) == 0  # a resume reports the whole run's val losses
    last = capsys.readouterr().out.strip().splitlines()[-3:]
    evals = [(r["step"], r["val_loss"]) for r in read_log(out, "eval")]
    best = min(evals, key=lambda e: e[1])
    assert last[0].startswith("done: steps 4 to 6 in ") and " tok/s" in last[0]
    assert last[1] == f"val loss: {evals[-1][1]:.4f} at step 6 (final), best {best[1]:.4f} at step {best[0]}"
    assert last[2] == f"checkpoint: {out}/step-00000006 | model: {out}/model.safetensors | summary: {out}/summary.json"
    saved = json.loads((out / "summary.json").read_text())
    assert saved["best_val_loss"] == {"step": best[0], "value": best[1]} and saved["steps"] == {"from": 4, "to": 6}
    assert saved["seconds"]["lwlr measurement"] == 0 and "lwlr measurement" not in last[0]  # a resume measures nothing


def test_the_run_says_its_threads_and_warns_when_the_machine_is_busy(tmp_path, token_dir, monkeypatch, capsys):
    from runtime import threads

    monkeypatch.setattr(os, "getloadavg", lambda: (9.0, 8.0, 7.0))
    before = torch.get_num_threads()
    try:
        assert train.main(tiny_run_args(tmp_path / "run", token_dir, threads=1, max_steps=1, eval_interval=1)) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    printed = capsys.readouterr().out
    assert "threads: 1 (threads=1; --threads or OMP_NUM_THREADS sets it), OMP_WAIT_POLICY=" in printed
    assert f"warning: this machine is busy (load 9.0 on {os.cpu_count()} cores)" in printed
    assert read_log(tmp_path / "run", "start")[0]["env"]["threads"] == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.choose(0) == (3, "OMP_NUM_THREADS=3") and threads.choose(2) == (2, "threads=2")
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert threads.choose(0, ranks_on_host=2)[0] == max(1, (os.cpu_count() or 1) // 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.1, 0.1, 0.1))
    assert threads.busy_warning(1) is None


def test_train_py_sets_the_wait_policy_before_torch_loads_unless_the_user_did():
    probe = "import sys, train; print(train.threads.os.environ.get('OMP_WAIT_POLICY'))"
    for given, expected in ((None, "PASSIVE"), ("ACTIVE", "ACTIVE")):
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        env.update({"OMP_WAIT_POLICY": given} if given else {})
        out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, env=env)
        assert out.stdout.strip() == expected, out.stderr[-2000:]
    lines = open(os.path.join(ROOT, "train.py")).read().splitlines()
    set_at = next(i for i, line in enumerate(lines) if line.startswith("threads.before_torch()"))
    first_heavy = next(i for i, line in enumerate(lines) if line.startswith("import multipliers"))
    assert set_at < first_heavy  # before the first import that loads torch


def test_the_first_eval_of_a_compiled_model_beats_while_it_compiles(monkeypatch):
    import contextlib

    from eval import evaluate
    from runtime.ranks import Runtime

    beats, real_print = [], print
    monkeypatch.setattr(
        progress, "print", lambda *a, **k: (beats.append(str(a[0])), real_print(*a, **k)), raising=False
    )
    monkeypatch.setattr(progress, "EVERY_SECONDS", 0.01)

    class Batches:
        def get(self, i, split, device, rank=0):
            return torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long)

    class Compiling(torch.nn.Module):  # its first forward lasts until the heartbeat has said so
        calls = 0

        def forward(self, x, y):
            self.calls += 1
            for _ in range(3000 if self.calls == 1 else 0):  # the loop only ends a hung test
                if any("compiling the eval graph" in line for line in beats):
                    break
                time.sleep(0.01)
            return None, torch.tensor(2.0)

    c = TrainConfig(eval_steps=3)
    rt = Runtime(0, 0, 1, torch.device("cpu"))
    assert evaluate(Compiling(), Batches(), c, rt, contextlib.nullcontext(), compiles=True) == 2.0
    assert any(line.startswith("torch.compile: compiling the eval graph: ") for line in beats)
    beats.clear()
    compiled = Compiling()
    compiled.calls = 1  # compiled already: no forward waits
    assert evaluate(compiled, Batches(), c, rt, contextlib.nullcontext(), compiles=False) == 2.0
    assert not any("compiling" in line for line in beats)
