"""OpenWebText (8M web documents, about 9B GPT-2 tokens) through Hugging Face `datasets`.

    python data/openwebtext/prepare.py                    # downloads ~54 GB; writes train.bin (~17 GB), val.bin
    python data/openwebtext/prepare.py --text_files a.txt # the same pipeline on local text files

Documents are tokenized in parallel (num_proc workers), each followed by <|endoftext|>, and streamed
into one token file per split. As in nanoGPT, 0.05% of the documents (seed 2357) are the validation split.
"""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from data.tokenfile import TokenFileWriter  # noqa: E402
from data.tokenizer import VOCAB_SIZE, encode_document  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
VAL_FRACTION = 0.0005
SPLIT_SEED = 2357
WRITE_SHARDS = 1024  # documents are written in this many contiguous slices to bound memory


def tokenize(example: dict) -> dict:
    ids = encode_document(example["text"])
    return {"ids": ids, "len": len(ids)}


def prepare(dataset, out_dir: str, num_proc: int) -> dict[str, int]:
    """dataset: a `datasets.Dataset` with a "text" column; split into train/val, tokenized, written."""
    import datasets

    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(f"expected a datasets.Dataset, got {type(dataset).__name__}")
    if "text" not in dataset.column_names:
        raise ValueError(f"the dataset has no 'text' column (columns: {dataset.column_names})")
    splits = dataset.train_test_split(test_size=VAL_FRACTION, seed=SPLIT_SEED, shuffle=True)
    counts = {}
    for split, part in (("train", splits["train"]), ("val", splits["test"])):
        tokenized = part.map(tokenize, remove_columns=part.column_names, num_proc=num_proc, desc=f"tokenizing {split}")
        with TokenFileWriter(os.path.join(out_dir, f"{split}.bin"), VOCAB_SIZE) as writer:
            shards = min(WRITE_SHARDS, len(tokenized))
            for i in range(shards):
                shard = tokenized.shard(num_shards=shards, index=i, contiguous=True).with_format("numpy")
                writer.write(np.concatenate(shard["ids"]))
        counts[split] = writer.count
    return counts


def load(text_files: list[str] | None, num_proc: int):
    import datasets

    if text_files:  # one document per file
        return datasets.load_dataset("text", data_files=text_files, sample_by="document", split="train")
    return datasets.load_dataset("openwebtext", split="train", num_proc=num_proc)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", default=HERE)
    parser.add_argument("--num_proc", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    parser.add_argument("--text_files", nargs="*", help="local text files instead of the hub dataset")
    args = parser.parse_args()
    counts = prepare(load(args.text_files, args.num_proc), args.out_dir, args.num_proc)
    print(", ".join(f"{split}: {count:,} tokens" for split, count in counts.items()))
