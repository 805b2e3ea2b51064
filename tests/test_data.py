import os

import numpy as np
import pytest
import torch

from data.loader import TokenBatches
from data.tokenfile import HEADER_BYTES, TokenFileError, read_tokens, write_tokens
from data.tokenizer import EOT_TOKEN, gpt2_encoding


def test_tokenizer_gives_gpt2_ids_offline():
    enc = gpt2_encoding()
    assert enc.encode("hello world") == [31373, 995]
    assert enc.encode("Hello, my dog is cute") == [15496, 11, 616, 3290, 318, 13779]
    assert enc.n_vocab == 50257 and enc.eot_token == EOT_TOKEN


def test_shakespeare_prepare_round_trips(tmp_path):
    from data.shakespeare import prepare as shakespeare

    counts = shakespeare.prepare(str(tmp_path))
    assert counts["train"] > 1_000_000 and counts["val"] > 50_000
    enc = gpt2_encoding()
    paths = shakespeare.play_paths()
    expected_val = "".join(
        shakespeare.markdown_to_text(open(p, encoding="utf-8").read()) + "<|endoftext|>"
        for i, p in enumerate(paths) if i % shakespeare.VAL_EVERY == shakespeare.VAL_EVERY - 1
    )
    val = read_tokens(str(tmp_path / "val.bin"), 50257)
    assert enc.decode(val.tolist()) == expected_val
    train_text = enc.decode(read_tokens(str(tmp_path / "train.bin"), 50257).tolist())
    assert train_text.count("<|endoftext|>") + expected_val.count("<|endoftext|>") == 38
    assert "**" not in train_text and "\nHAMLET:\n" in train_text


def test_openwebtext_pipeline_on_a_local_datasets_dataset(tmp_path):
    import datasets

    from data.openwebtext import prepare as owt

    docs = [f"Document number {i}: the quick brown fox jumps over {i} lazy dogs." for i in range(400)]
    counts = owt.prepare(datasets.Dataset.from_dict({"text": docs}), str(tmp_path), num_proc=2)
    enc = gpt2_encoding()
    decoded = []
    for split in ("train", "val"):
        tokens = read_tokens(str(tmp_path / f"{split}.bin"), 50257)
        assert len(tokens) == counts[split]
        decoded += enc.decode(tokens.tolist()).split("<|endoftext|>")[:-1]
    assert sorted(decoded) == sorted(docs)  # every document once, in one of the splits
    assert 0 < counts["val"] < counts["train"]


def test_openwebtext_prepare_rejects_a_dataset_without_text(tmp_path):
    import datasets

    from data.openwebtext import prepare as owt

    with pytest.raises(ValueError, match="no 'text' column"):
        owt.prepare(datasets.Dataset.from_dict({"content": ["a"]}), str(tmp_path), num_proc=1)


def test_writer_leaves_no_file_when_interrupted(tmp_path):
    from data.tokenfile import TokenFileWriter

    path = tmp_path / "x.bin"
    with pytest.raises(RuntimeError):
        with TokenFileWriter(str(path), 50257) as writer:
            writer.write([1, 2, 3])
            raise RuntimeError("killed")
    assert os.listdir(tmp_path) == []


@pytest.fixture
def good_file(tmp_path):
    path = tmp_path / "tokens.bin"
    write_tokens(str(path), np.arange(1000) % 50257, 50257)
    return path


def test_bad_token_files_fail_with_the_file_named(tmp_path, good_file):
    with pytest.raises(TokenFileError, match="no such token file.*prepare.py"):
        read_tokens(str(tmp_path / "missing.bin"), 50257)
    raw = good_file.read_bytes()
    (tmp_path / "magic.bin").write_bytes(b"\x00" * 4 + raw[4:])
    with pytest.raises(TokenFileError, match="magic.bin: not a token file"):
        read_tokens(str(tmp_path / "magic.bin"), 50257)
    (tmp_path / "cut.bin").write_bytes(raw[:-10])
    with pytest.raises(TokenFileError, match="cut.bin: .*truncated"):
        read_tokens(str(tmp_path / "cut.bin"), 50257)
    (tmp_path / "int32.bin").write_bytes(raw[:HEADER_BYTES] + np.arange(1000, dtype=np.int32).tobytes())
    with pytest.raises(TokenFileError, match="int32.bin: .*not uint16"):
        read_tokens(str(tmp_path / "int32.bin"), 50257)
    with pytest.raises(TokenFileError, match="tokens.bin: 1000 tokens, fewer than the 1025"):
        read_tokens(str(good_file), 50257, min_tokens=1025)
    with pytest.raises(TokenFileError, match="tokens.bin: holds token id 999 .* vocab_size is 500"):
        read_tokens(str(good_file), 500)
    (tmp_path / "tiny.bin").write_bytes(b"abc")
    with pytest.raises(TokenFileError, match="tiny.bin: 3 bytes"):
        read_tokens(str(tmp_path / "tiny.bin"), 50257)


def test_batches_split_one_global_batch_over_ranks_and_micro_steps(good_file):
    batches = TokenBatches(str(good_file), "train", block_size=16, vocab_size=50257, seed=3)
    cpu = torch.device("cpu")
    whole_x, whole_y = batches.get(step=5, global_rows=8, first_row=0, rows=8, device=cpu)
    parts = [batches.get(5, 8, first, 2, cpu) for first in (0, 2, 4, 6)]
    assert torch.equal(torch.cat([x for x, _ in parts]), whole_x)
    assert torch.equal(whole_x[:, 1:], whole_y[:, :-1])  # targets are the next tokens
    assert torch.equal(whole_y[:, -1], whole_x[:, -1] + 1)  # the file is consecutive ids
    assert not torch.equal(batches.get(6, 8, 0, 8, cpu)[0], whole_x)
    subset = TokenBatches(str(good_file), "train", 16, 50257, seed=3, subset_batches=2)
    assert torch.equal(subset.get(1, 8, 0, 8, cpu)[0], subset.get(3, 8, 0, 8, cpu)[0])
