"""Your own text: plain-text files (or folders of them) as GPT-2 token files, for `--dataset=text`.

    python -m data.text.prepare my.txt                    # -> data/text/{train,val}.bin
    python -m data.text.prepare notes/ book.txt --out_dir=data/mine   # then --data_dir=data/mine

Each file is one document, in GPT-2's BPE, ending in <|endoftext|>; a folder contributes its .txt and
.md files, in sorted order, at any depth. The last `--val_fraction` of the tokens (10%, nanoGPT's split
of its Shakespeare) is the validation split, so validation is text the model has not trained on. Files
are read as UTF-8; one that is not, or nothing to read at all, is one `error:` line naming it.
"""

import sys

if not __package__:  # run by its path, from where the project's packages cannot be imported
    print("error: run it from the repository's root as a module: python -m data.text.prepare FILE ...", file=sys.stderr)
    sys.exit(2)

import argparse
import os

import numpy as np

from data.tokenfile import prepared_line, split_files, write_tokens
from data.tokenizer import VOCAB_SIZE, encode_document
from runtime.errors import UserError
from runtime.exits import run_main
from runtime.progress import Progress

HERE = os.path.dirname(os.path.abspath(__file__))
TEXT_SUFFIXES = (".txt", ".md")


class TextError(UserError):
    """Text that cannot be prepared: no files, a file that is not UTF-8, or too little of it."""


def text_files(paths: list[str]) -> list[str]:
    """The files named, and those under the folders named, in order."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            found = sorted(
                os.path.join(root, name)
                for root, _, names in os.walk(path)
                for name in names
                if name.endswith(TEXT_SUFFIXES)
            )
            if not found:
                raise TextError(f"{path}: a folder without .txt or .md files")
            files += found
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise TextError(f"{path}: no such file or folder")
    return files


def prepare(paths: list[str], out_dir: str = HERE, val_fraction: float = 0.1) -> dict[str, int]:
    if not 0 < val_fraction < 1:
        raise TextError(f"--val_fraction={val_fraction} must lie between 0 and 1")
    files = text_files(paths)
    documents = []
    with Progress("tokenizing", len(files), "files") as progress:
        for path in files:
            try:
                with open(path, encoding="utf-8") as f:
                    documents.append(encode_document(f.read()))
            except UnicodeDecodeError as e:
                raise TextError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
            progress.update()
    tokens = np.concatenate([np.asarray(d, dtype=np.int64) for d in documents])
    cut = len(tokens) - max(int(len(tokens) * val_fraction), 1)
    if len(tokens) - cut < 2 or cut < 2:
        raise TextError(f"{len(tokens):,} tokens in {len(files)} file(s): too little text to split into train and val")
    os.makedirs(out_dir, exist_ok=True)
    write_tokens(os.path.join(out_dir, "train.bin"), tokens[:cut], VOCAB_SIZE)
    write_tokens(os.path.join(out_dir, "val.bin"), tokens[cut:], VOCAB_SIZE)
    return {"train": cut, "val": len(tokens) - cut}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", help="text files, or folders of .txt and .md files")
    parser.add_argument("--out_dir", default=HERE, help="where train.bin and val.bin go (default data/text)")
    parser.add_argument("--val_fraction", type=float, default=0.1)
    args = parser.parse_args(argv)
    before = split_files(args.out_dir)
    counts = prepare(args.paths, args.out_dir, args.val_fraction)
    print(prepared_line(counts, "tokens", args.out_dir, before))
    return 0


if __name__ == "__main__":
    run_main(main)
