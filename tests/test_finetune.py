"""init_from=PATH: training starts from a Hugging Face GPT-2 directory, offline. The "pretrained" model is
a randomly initialized GPT2LMHeadModel with gpt2-tiny's shape, saved by transformers itself."""

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import export
import train
from conftest import ROOT, read_log, tiny_run_args
from data.loader import BatchSplit
from training import build, checkpoint, hf
from training.config import ConfigError, parse_config


@pytest.fixture
def patterned_dir(tmp_path):
    """Token files of a repeating 97-token cycle: text a model can learn in a few steps (random ids cannot
    go below ln 50257)."""
    import numpy as np

    from data.tokenfile import write_tokens

    path = tmp_path / "patterned"
    path.mkdir()
    write_tokens(str(path / "train.bin"), np.arange(20_000) % 97, 50257)
    write_tokens(str(path / "val.bin"), np.arange(4_000) % 97, 50257)
    return path


def finetune_args(out_dir, data_dir, gpt2_dir, **overrides):
    values = dict(init_from=gpt2_dir, lr=1e-3, schedule="constant", warmup_steps=1, max_steps=4, eval_interval=2)
    return tiny_run_args(out_dir, data_dir, **{**values, **overrides})


def test_the_first_step_loss_is_transformers_loss_on_the_same_batch(tmp_path, token_dir, gpt2_dir):
    from transformers import GPT2LMHeadModel

    out = tmp_path / "run"
    args = finetune_args(out, token_dir, gpt2_dir, max_steps=1, eval_interval=1)
    assert train.main(args) == 0
    c = build.pretrained(parse_config(args))
    rows = c.tokens_per_step // c.block_size  # the step's whole batch, over its accumulation micro-steps
    batches = build.token_batches(c, "train", "train", build.gpt_config(c))
    x, y = batches.get(0, BatchSplit(rows), torch.device("cpu"))
    with torch.no_grad():
        logits = GPT2LMHeadModel.from_pretrained(str(gpt2_dir)).eval()(x).logits
    expected = F.cross_entropy(logits.flatten(0, 1), y.flatten()).item()
    assert read_log(out, "train")[0]["loss"] == pytest.approx(expected, rel=1e-5)
    start = read_log(out, "start")[0]
    assert start["config"]["model"] == "gpt2-tiny" and start["config"]["lwlr_init"] == "model"


def test_a_short_finetune_lowers_the_loss_and_measures_lwlr_at_the_loaded_weights(
    tmp_path, patterned_dir, gpt2_dir, capfd
):
    out = tmp_path / "run"
    assert train.main(finetune_args(out, patterned_dir, gpt2_dir, max_steps=12, eval_interval=6, lr=1e-2)) == 0
    losses = [r["loss"] for r in read_log(out, "train")]
    assert losses[-1] < losses[0] - 1.0
    report = json.loads((out / "lwlr.json").read_text())
    assert report["init"] == "model"
    assert "lwlr measures at them over T=2 batches (lwlr_init=model" in capfd.readouterr().out
    paper = tmp_path / "fan_out"
    assert train.main(finetune_args(paper, patterned_dir, gpt2_dir, max_steps=1, lwlr_init="fan_out")) == 0
    assert json.loads((paper / "lwlr.json").read_text())["init"] == "fan_out"
    assert report["layers"] != json.loads((paper / "lwlr.json").read_text())["layers"]


def test_a_restart_resumes_from_its_own_checkpoint_not_from_the_directory(tmp_path, token_dir, gpt2_dir):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert train.main(finetune_args(straight, token_dir, gpt2_dir, max_steps=4)) == 0
    assert train.main(finetune_args(stopped, token_dir, gpt2_dir, max_steps=2, lr_decay_steps=4)) == 0
    resumed = dict(max_steps=4, allow_resume_changes="max_steps")
    assert train.main(finetune_args(stopped, token_dir, gpt2_dir, **resumed)) == 0
    assert read_log(stopped, "start")[1]["step"] == 2  # the second start resumed at step 2
    a, b = (checkpoint.load_tensors(checkpoint.step_dir(str(out), 4), "model") for out in (straight, stopped))
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_the_finetuned_model_exports_and_round_trips(tmp_path, token_dir, gpt2_dir):
    out, exported = tmp_path / "run", tmp_path / "exported"
    assert train.main(finetune_args(out, token_dir, gpt2_dir, max_steps=2)) == 0
    assert export.main([f"--out_dir={out}", f"--hf_dir={exported}"]) == 0  # the CLI's own run: tests/test_export.py
    ours = checkpoint.load_model(*checkpoint.latest(str(out)))
    back = hf.from_pretrained(str(exported))
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), back.state_dict().values()))


def test_a_hub_name_or_a_disagreeing_model_fails_in_one_line(tmp_path, token_dir, gpt2_dir):
    result = subprocess.run(
        [sys.executable, "train.py", *tiny_run_args(tmp_path / "run", token_dir, init_from="openai-community/gpt2")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "init_from='openai-community/gpt2' is neither auto, resume, scratch nor a local directory" in result.stderr
    assert "download a Hugging Face directory first" in result.stderr
    with pytest.raises(ConfigError, match="model='gpt2-mini' disagrees with init_from=.*, which holds a gpt2-tiny"):
        build.pretrained(parse_config(finetune_args(tmp_path / "run", token_dir, gpt2_dir, model="gpt2-mini")))
    with pytest.raises(ConfigError, match="block_size=128 exceeds the 64 positions of init_from"):
        build.pretrained(parse_config(finetune_args(tmp_path / "run", token_dir, gpt2_dir, block_size=128)))
    assert not (tmp_path / "run").exists()
