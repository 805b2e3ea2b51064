"""export.py against transformers: the exported directory loads in GPT2LMHeadModel with our logits,
and hf.from_pretrained reads it back exactly."""

import os
import stat
import subprocess
import sys

import pytest
import torch

import export
import train
from conftest import ROOT, tiny_run_args
from model import GPT, GPTConfig
from training import checkpoint, hf


def run_export(*args):
    return subprocess.run(
        [sys.executable, "export.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


# Text that exercises GPT-2's split pattern: contractions, runs of spaces and newlines, digits, accents,
# CJK and an emoji (bytes of no single token). ("<|endoftext|>" in text is the special token to transformers,
# as with GPT-2's own files, and plain text to encode_ordinary: not compared.)
TOKENIZER_TEXTS = [
    "hello world",
    " The  quick brown fox\n\n  jumped 12345 times!\tDon't you've we'll 's",
    "naïve café — 東京 🤖 ∑x²",
    "".join(chr(c) for c in range(32, 600)),
]


def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def test_a_trained_run_exports_to_a_directory_transformers_loads(tmp_path, token_dir):
    from transformers import AutoTokenizer, GPT2LMHeadModel

    from data.tokenizer import gpt2_encoding

    out, hf_dir = tmp_path / "run", tmp_path / "hf"
    assert train.main(tiny_run_args(out, token_dir, max_steps=3, eval_interval=3)) == 0
    result = run_export(f"--out_dir={out}", f"--hf_dir={hf_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    names = ["config.json", "merges.txt", "model.safetensors", "tokenizer_config.json", "vocab.json"]
    assert sorted(os.listdir(hf_dir)) == names
    modes = {name: stat.S_IMODE(os.stat(hf_dir / name).st_mode) for name in names}
    assert set(modes.values()) == {0o666 & ~current_umask()}, modes  # model.safetensors too, not 0600
    ours = checkpoint.load_model(*checkpoint.latest(str(out))).eval()
    theirs = GPT2LMHeadModel.from_pretrained(str(hf_dir)).eval()
    assert theirs.lm_head.weight.data_ptr() == theirs.transformer.wte.weight.data_ptr()  # tied, as GPT-2's
    idx = torch.randint(0, 50257, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(idx).logits, ours(idx)[0], rtol=0, atol=1e-5)
    back = hf.from_pretrained(str(hf_dir))
    for (name, a), b in zip(ours.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), name  # exactly: the conversion only moves and transposes
    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))  # GPT-2's own, as transformers loads it
    for text in TOKENIZER_TEXTS:
        assert tokenizer.encode(text) == gpt2_encoding().encode_ordinary(text), text
    assert tokenizer.eos_token_id == 50256 and len(tokenizer) == 50257


def test_export_refuses_what_gpt2_cannot_express(tmp_path, token_dir):
    out = tmp_path / "scaled"
    assert train.main(tiny_run_args(out, token_dir, max_steps=1, eval_interval=1, residual_scale="true")) == 0
    scaled = run_export(f"--out_dir={out}", f"--hf_dir={tmp_path / 'hf'}")
    assert scaled.returncode == 2 and "residual_scale is on" in scaled.stderr
    assert not (tmp_path / "hf").exists() and not list(tmp_path.glob("hf.tmp-*"))
    with pytest.raises(hf.PretrainedError, match="65 tokens, not GPT-2's 50257"):
        export.export(GPT(GPTConfig.from_preset("gpt2-tiny", vocab_size=65)), str(tmp_path / "char"))
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("keep me")
    model = GPT(GPTConfig.from_preset("gpt2-tiny"))
    with pytest.raises(hf.PretrainedError, match="exists and is not an empty folder"):
        export.export(model, str(occupied))
    assert (occupied / "notes.txt").read_text() == "keep me"
    missing = run_export(f"--out_dir={tmp_path / 'none'}", f"--hf_dir={tmp_path / 'hf'}")
    assert missing.returncode == 2 and "holds no complete checkpoint" in missing.stderr
