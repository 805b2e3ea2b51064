import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, tiny_run_args
from data.loader import BatchSplit, TokenBatches
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
        for i, p in enumerate(paths)
        if i % shakespeare.VAL_EVERY == shakespeare.VAL_EVERY - 1
    )
    val = read_tokens(str(tmp_path / "val.bin"), 50257)
    assert enc.decode(val.tolist()) == expected_val
    train_text = enc.decode(read_tokens(str(tmp_path / "train.bin"), 50257).tolist())
    assert train_text.count("<|endoftext|>") + expected_val.count("<|endoftext|>") == 38
    assert "**" not in train_text and "\nHAMLET:\n" in train_text


def decoded_documents(folder, counts=None) -> list[str]:
    enc = gpt2_encoding()
    decoded = []
    for split in ("train", "val"):
        tokens = read_tokens(str(folder / f"{split}.bin"), 50257)
        if counts:
            assert len(tokens) == counts[split]
        decoded += enc.decode(tokens.tolist()).split("<|endoftext|>")[:-1]
    return decoded


def run_prepare(module, *args):
    """A prepare script as the README runs it: python -m data.<dataset>.prepare, from the repository's root."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # no test may reach the Hub: offline mode fails at once instead
    return subprocess.run(
        [sys.executable, "-m", module, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env
    )


@pytest.mark.parametrize("script", ["data.openwebtext.prepare", "data.fineweb.prepare"])
@pytest.mark.parametrize("file_format", ["parquet", "jsonl"])
def test_prepare_reads_local_files_offline(tmp_path, script, file_format):
    import datasets

    docs = [f"{script} document {i}: some words, repeated {i} times." for i in range(300)]
    halves = [
        datasets.Dataset.from_dict({"text": docs[:150], "id": list(range(150))}),
        datasets.Dataset.from_dict({"text": docs[150:], "id": list(range(150))}),
    ]
    files = []
    for i, half in enumerate(halves):
        path = tmp_path / f"part{i}.{file_format}"
        half.to_parquet(str(path)) if file_format == "parquet" else half.to_json(str(path), lines=True)
        files.append(path)
    out = tmp_path / "out"
    result = run_prepare(script, f"--out_dir={out}", "--num_proc=1", "--data_files", *files)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "train:" in result.stdout and "val:" in result.stdout
    assert sorted(decoded_documents(out)) == sorted(docs)  # every document once, in one of the two splits
    assert 0 < len(read_tokens(str(out / "val.bin"), 50257)) < len(read_tokens(str(out / "train.bin"), 50257))


def test_max_tokens_caps_the_train_split(tmp_path):
    import datasets

    path = tmp_path / "docs.parquet"
    datasets.Dataset.from_dict({"text": [f"fineweb-like document {i} " * 20 for i in range(500)]}).to_parquet(str(path))
    out = tmp_path / "out"
    result = run_prepare(
        "data.fineweb.prepare", f"--out_dir={out}", "--num_proc=1", "--max_tokens=1000", "--data_files", path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(read_tokens(str(out / "train.bin"), 50257)) == 1000
    assert len(read_tokens(str(out / "val.bin"), 50257)) > 0


def test_prepare_errors_are_one_line_saying_what_to_do(tmp_path):
    import datasets

    unreachable = run_prepare("data.openwebtext.prepare", f"--out_dir={tmp_path}")
    assert unreachable.returncode == 2 and unreachable.stderr.count("\n") == 1, unreachable.stderr
    assert (
        "could not load Skylion007/openwebtext (revision refs/convert/parquet)" in unreachable.stderr
        and "--data_files" in unreachable.stderr
    )
    script_dataset = tmp_path / "scripted"
    script_dataset.mkdir()
    (script_dataset / "scripted.py").write_text("import datasets\n")
    scripted = run_prepare(
        "data.openwebtext.prepare", f"--out_dir={tmp_path}", f"--repo={script_dataset}", "--revision=main"
    )
    assert (
        scripted.returncode == 2
        and "is a loading script" in scripted.stderr
        and "refs/convert/parquet" in scripted.stderr
    )
    missing = run_prepare("data.fineweb.prepare", f"--out_dir={tmp_path}", "--data_files", tmp_path / "nope.parquet")
    assert missing.returncode == 2 and "--data_files: no such file" in missing.stderr
    datasets.Dataset.from_dict({"content": ["a"]}).to_parquet(str(tmp_path / "no_text.parquet"))
    no_text = run_prepare("data.fineweb.prepare", f"--out_dir={tmp_path}", "--data_files", tmp_path / "no_text.parquet")
    assert no_text.returncode == 2 and "no 'text' column" in no_text.stderr
    assert not list(tmp_path.glob("*.bin"))  # nothing half-written


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
    with pytest.raises(TokenFileError, match="no such token file.*python -m data.<dataset>.prepare"):
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
    with pytest.raises(
        TokenFileError, match="tokens.bin: written for a vocabulary of 50257 tokens, but the model's has 500"
    ):
        read_tokens(str(good_file), 500)
    header = np.frombuffer(raw[:HEADER_BYTES], dtype="<i4").copy()
    header[3] = 500  # a header whose vocabulary is the model's, but whose largest id is beyond it
    (tmp_path / "beyond.bin").write_bytes(header.tobytes() + raw[HEADER_BYTES:])
    with pytest.raises(TokenFileError, match="beyond.bin: holds token id 999 .* vocab_size is 500"):
        read_tokens(str(tmp_path / "beyond.bin"), 500)
    (tmp_path / "tiny.bin").write_bytes(b"abc")
    with pytest.raises(TokenFileError, match="tiny.bin: 3 bytes"):
        read_tokens(str(tmp_path / "tiny.bin"), 50257)


def test_batches_split_one_global_batch_over_ranks_and_micro_steps(good_file):
    batches = TokenBatches(str(good_file), "train", block_size=16, vocab_size=50257, seed=3)
    cpu = torch.device("cpu")
    whole_x, whole_y = batches.get(5, BatchSplit(rows=8), cpu)
    # 2 ranks of 2 micro-steps of 2 rows: rank r's micro-step m holds rows (r * 2 + m) * 2 onward
    split = BatchSplit(rows=2, micro_steps=2, ranks=2)
    parts = [batches.get(5, split, cpu, micro, rank) for rank in range(2) for micro in range(2)]
    assert torch.equal(torch.cat([x for x, _ in parts]), whole_x)
    # one rank of 4 micro-steps takes the same rows, in the same order
    one_rank = [batches.get(5, BatchSplit(rows=2, micro_steps=4), cpu, micro)[0] for micro in range(4)]
    assert torch.equal(torch.cat(one_rank), whole_x)
    assert torch.equal(whole_x[:, 1:], whole_y[:, :-1])  # targets are the next tokens
    assert torch.equal(whole_y[:, -1], whole_x[:, -1] + 1)  # the file is consecutive ids
    assert not torch.equal(batches.get(6, BatchSplit(rows=8), cpu)[0], whole_x)
    subset = TokenBatches(str(good_file), "train", 16, 50257, seed=3, subset_batches=2)
    assert torch.equal(subset.get(1, BatchSplit(rows=8), cpu)[0], subset.get(3, BatchSplit(rows=8), cpu)[0])


def test_char_level_shakespeare_round_trips_through_prepare_train_and_sample(tmp_path):
    import train
    from data import vocab
    from data.shakespeare import prepare as shakespeare
    from data.shakespeare_char import prepare as shakespeare_char

    data = tmp_path / "data"
    data.mkdir()
    counts = shakespeare_char.prepare(str(data))
    vocabulary = vocab.load(str(data))
    assert 60 <= vocabulary.size <= 100 and "\n" in vocabulary.chars and "A" in vocabulary.chars
    first_play = shakespeare.markdown_to_text(open(shakespeare.play_paths()[0], encoding="utf-8").read()).strip()
    train_ids = read_tokens(str(data / "train.bin"), vocabulary.size)
    assert len(train_ids) == counts["train"] and vocabulary.decode(train_ids[: len(first_play)]) == first_play
    assert vocabulary.encode(first_play[:500]) == train_ids[:500].tolist()

    out = tmp_path / "run"
    assert train.main(tiny_run_args(out, data, max_steps=3, eval_interval=3)) == 0
    sample = subprocess.run(
        [
            sys.executable,
            "sample.py",
            f"--out_dir={out}",
            "--prompt=ROMEO:",
            "--max_new_tokens=40",
            "--num_samples=1",
            "--device=cpu",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert sample.returncode == 0, sample.stderr
    text = sample.stdout.split("\n---------------")[0]
    assert text.startswith("ROMEO:") and len(text) == len("ROMEO:") + 40 and set(text) <= set(vocabulary.chars)
    export = subprocess.run(
        [sys.executable, "export.py", f"--out_dir={out}", f"--hf_dir={tmp_path / 'hf'}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert export.returncode == 2 and f"{vocabulary.size} tokens, not GPT-2's 50257" in export.stderr


def test_a_malformed_vocabulary_file_is_named(tmp_path):
    from data import vocab

    assert vocab.load(str(tmp_path)).size == 50257  # no vocab.json: GPT-2's
    (tmp_path / "vocab.json").write_text('{"kind": "char", "chars": ["a", "a"]}')
    with pytest.raises(vocab.VocabularyError, match="vocab.json: not a vocabulary file"):
        vocab.load(str(tmp_path))


def test_own_text_prepares_in_one_command_and_trains(tmp_path):
    """python -m data.text.prepare, as the README runs it: each file one document in sorted order, a folder's
    .txt and .md files at any depth and nothing else, the last tenth of the tokens for validation; then a run
    trains on it, and preparing the same text again leaves the token files as they were."""
    import train

    notes = tmp_path / "notes"
    (notes / "deeper").mkdir(parents=True)
    (notes / "b.md").write_text("# Second\nThe second document, in markdown.\n", encoding="utf-8")
    (notes / "deeper" / "a.txt").write_text("Déjà vu: a nested file, after b.md in path order.\n", encoding="utf-8")
    (notes / "skipped.py").write_text("print('not text')\n", encoding="utf-8")
    book = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    (tmp_path / "book.txt").write_text(book, encoding="utf-8")
    out = tmp_path / "mine"

    done = run_prepare("data.text.prepare", notes, tmp_path / "book.txt", f"--out_dir={out}")
    assert done.returncode == 0, done.stderr
    train_ids = read_tokens(str(out / "train.bin"), 50257)
    val_ids = read_tokens(str(out / "val.bin"), 50257)
    total = len(train_ids) + len(val_ids)
    assert len(val_ids) == int(total * 0.1) and f"val: {len(val_ids):,} tokens" in done.stdout
    documents = gpt2_encoding().decode(np.concatenate([train_ids, val_ids]).tolist()).split("<|endoftext|>")
    expected = [
        "# Second\nThe second document, in markdown.\n",
        "Déjà vu: a nested file, after b.md in path order.\n",
        book,
        "",
    ]
    assert documents == expected

    assert train.main(tiny_run_args(tmp_path / "run", out, max_steps=2, eval_interval=2)) == 0

    def stamps():
        return {split: os.stat(out / f"{split}.bin").st_mtime_ns for split in ("train", "val")}

    before = stamps()
    again = run_prepare("data.text.prepare", notes, tmp_path / "book.txt", f"--out_dir={out}")
    assert "(train.bin and val.bin unchanged: already these tokens)" in again.stdout, again.stdout
    assert stamps() == before


def test_own_text_mistakes_are_one_line_naming_the_file(tmp_path):
    from data.text import prepare as text

    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    refused = run_prepare("data.text.prepare", tmp_path / "latin1.txt", f"--out_dir={tmp_path / 'out'}")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert f"error: {tmp_path / 'latin1.txt'}: not UTF-8 text (byte 3" in refused.stderr
    (tmp_path / "empty").mkdir()
    (tmp_path / "tiny.txt").write_text("a", encoding="utf-8")
    for paths, message in [
        ([tmp_path / "empty"], "a folder without .txt or .md files"),
        ([tmp_path / "nowhere.txt"], "no such file or folder"),
        ([tmp_path / "tiny.txt"], "too little text to split into train and val"),
    ]:
        with pytest.raises(text.TextError, match=message):
            text.prepare([str(p) for p in paths], str(tmp_path / "out"))
    with pytest.raises(text.TextError, match="--val_fraction=1.0 must lie between 0 and 1"):
        text.prepare([str(tmp_path / "tiny.txt")], str(tmp_path / "out"), val_fraction=1.0)
    assert not (tmp_path / "out").exists()  # nothing written for text that was refused
