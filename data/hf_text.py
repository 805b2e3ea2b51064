"""Text datasets through Hugging Face `datasets` into token files: the one pipeline behind
data/openwebtext/prepare.py and data/fineweb/prepare.py (`python -m data.openwebtext.prepare`).

Loading: a Hub repository at a revision, as parquet files (`datasets` 4 and later run no loading
scripts), or local parquet, jsonl or text files (`--data_files`). Writing: the documents are split into
train and val (a seeded fraction), tokenized in parallel a slice at a time, each followed by
<|endoftext|>, and streamed into one token file per split; `--max_tokens` stops the train split there.
"""

import argparse
import os
import sys

import numpy as np

from data.tokenfile import TokenFileWriter, prepared_line, split_files
from data.tokenizer import VOCAB_SIZE, encode_document
from runtime.errors import UserError

SLICE_DOCUMENTS = 100_000  # documents tokenized and written at a time: bounds memory, lets --max_tokens stop early
LOCAL_FORMATS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".txt": "text"}


class DatasetError(UserError):
    """A dataset that cannot be loaded, with what to do about it."""


def tokenize(example: dict) -> dict:
    ids = encode_document(example["text"])
    return {"ids": ids, "len": len(ids)}


def prepare(
    dataset, out_dir: str, num_proc: int, val_fraction: float, split_seed: int, max_tokens: int = 0
) -> dict[str, int]:
    """dataset: a `datasets.Dataset` with a "text" column; split into train/val, tokenized, written to
    out_dir/{train,val}.bin. max_tokens > 0 caps the train split (val is written whole)."""
    import datasets

    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(f"expected a datasets.Dataset, got {type(dataset).__name__}")
    if "text" not in dataset.column_names:
        raise DatasetError(f"the dataset has no 'text' column (columns: {dataset.column_names})")
    splits = dataset.train_test_split(test_size=val_fraction, seed=split_seed, shuffle=True)
    counts = {}
    for split, part, cap in (("train", splits["train"], max_tokens), ("val", splits["test"], 0)):
        with TokenFileWriter(os.path.join(out_dir, f"{split}.bin"), VOCAB_SIZE) as writer:
            for start in range(0, len(part), SLICE_DOCUMENTS):
                documents = part.select(range(start, min(start + SLICE_DOCUMENTS, len(part))))
                tokenized = documents.map(
                    tokenize,
                    remove_columns=part.column_names,
                    num_proc=min(num_proc, len(documents)),
                    desc=f"tokenizing {split} {start:,}+",
                ).with_format("numpy")
                ids = np.concatenate(tokenized["ids"])
                writer.write(ids[: cap - writer.count] if cap else ids)
                if cap and writer.count >= cap:
                    break
        counts[split] = writer.count
    return counts


def load(repo: str, revision: str, name: str | None, data_files: list[str] | None, num_proc: int):
    """The "train" split of a Hub dataset (repo at revision, config name), or of local data files."""
    import datasets

    if data_files:
        missing = [path for path in data_files if not os.path.isfile(path)]
        if missing:
            raise DatasetError(f"--data_files: no such file: {', '.join(missing)}")
        formats = {LOCAL_FORMATS.get(os.path.splitext(path)[1].lower()) for path in data_files}
        if None in formats or len(formats) > 1:
            raise DatasetError(
                f"--data_files must all be one of {', '.join(LOCAL_FORMATS)} (got {', '.join(data_files)})"
            )
        kind = formats.pop()
        options = {"sample_by": "document"} if kind == "text" else {}  # a text file is one document
        return datasets.load_dataset(kind, data_files=data_files, split="train", **options)
    try:
        return datasets.load_dataset(repo, name, revision=revision, split="train", num_proc=num_proc)
    except Exception as e:  # datasets and huggingface_hub raise many types; each becomes one line of what to do
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "scripts are no longer supported" in message:
            raise DatasetError(
                f"{repo} at revision {revision} is a loading script, which datasets>=4 does not run: pass "
                "--revision=refs/convert/parquet (the Hub's parquet conversion), or --data_files with its parquet files"
            ) from None
        raise DatasetError(
            f"could not load {repo} (revision {revision}) from the Hugging Face Hub: {message}. Check the network "
            "(or HF_ENDPOINT), or download the parquet files yourself and pass --data_files"
        ) from None


def main(description: str, defaults: dict, argv: list[str] | None = None) -> int:
    """A prepare script's command line: defaults holds out_dir, repo, revision, name, val_fraction, split_seed."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", default=defaults["out_dir"])
    parser.add_argument(
        "--repo", default=defaults["repo"], help="Hugging Face dataset repository (default %(default)s)"
    )
    parser.add_argument(
        "--revision", default=defaults["revision"], help="its branch, tag or commit (default %(default)s)"
    )
    parser.add_argument("--name", default=defaults["name"], help="its config name (default %(default)s)")
    parser.add_argument("--data_files", nargs="+", help="local .parquet, .jsonl or .txt files instead of the Hub")
    parser.add_argument("--max_tokens", type=int, default=0, help="stop the train split at this many tokens (0 = all)")
    parser.add_argument("--num_proc", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    args = parser.parse_args(argv)
    try:
        os.makedirs(args.out_dir, exist_ok=True)
        before = split_files(args.out_dir)
        dataset = load(args.repo, args.revision, args.name, args.data_files, args.num_proc)
        counts = prepare(
            dataset, args.out_dir, args.num_proc, defaults["val_fraction"], defaults["split_seed"], args.max_tokens
        )
    except (DatasetError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(prepared_line(counts, "tokens", args.out_dir, before))
    return 0
