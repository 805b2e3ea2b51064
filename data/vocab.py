"""A dataset's vocabulary: GPT-2's BPE (the default), or the characters a char-level dataset lists in
its vocab.json. train.py sizes the model from it and sample.py encodes prompts and decodes samples
with it, so a char-level run needs no flag beyond its dataset.
"""

import contextlib
import json
import os

from data.tokenizer import VOCAB_SIZE, gpt2_encoding
from runtime.errors import UserError

VOCAB_FILE = "vocab.json"


class VocabularyError(UserError):
    """A vocab.json that is not one, or text with characters the vocabulary lacks."""


class CharVocab:
    def __init__(self, chars: list[str]):
        self.chars = chars
        self.index = {ch: i for i, ch in enumerate(chars)}
        self.size = len(chars)

    def encode(self, text: str) -> list[int]:
        unknown = sorted(set(text) - set(self.index))
        if unknown:
            raise VocabularyError(f"characters {unknown!r} are not in this dataset's vocabulary")
        return [self.index[ch] for ch in text]

    def decode(self, ids) -> str:
        return "".join(self.chars[i] for i in ids)


class GPT2Vocab:
    size = VOCAB_SIZE

    def encode(self, text: str) -> list[int]:
        return gpt2_encoding().encode_ordinary(text)

    def decode(self, ids) -> str:
        return gpt2_encoding().decode(list(ids))


def save_chars(data_dir: str, chars: list[str]) -> None:
    """vocab.json of these characters; left as it is when it already holds them (a prepare run again)."""
    path, data = os.path.join(data_dir, VOCAB_FILE), {"kind": "char", "chars": chars}
    with contextlib.suppress(OSError, ValueError):
        with open(path, encoding="utf-8") as f:
            if json.load(f) == data:
                return
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False, indent=0)


def load(data_dir: str):
    """The vocabulary of the token files in data_dir: its vocab.json's characters, else GPT-2's."""
    path = os.path.join(data_dir, VOCAB_FILE)
    if not os.path.isfile(path):
        return GPT2Vocab()
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        chars = data["chars"]
        if (
            data.get("kind") != "char"
            or not chars
            or len(set(chars)) != len(chars)
            or not all(isinstance(c, str) and len(c) == 1 for c in chars)
        ):
            raise ValueError("expected {'kind': 'char', 'chars': [distinct single characters]}")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise VocabularyError(f"{path}: not a vocabulary file ({e})") from None
    return CharVocab(chars)
