"""GPT-2's BPE through tiktoken, offline.

tiktoken.get_encoding("gpt2") downloads its rank files on first use, which fails without internet. The
same ranks ship here as gpt2.tiktoken (from openai-whisper's assets, MIT; see gpt2.tiktoken.LICENSE),
checked by SHA-256 and combined with tiktoken's own GPT-2 split pattern, so the encoding is
GPT-2's on any machine: "hello world" -> [31373, 995].
"""

import functools
import json
import os

import tiktoken
from tiktoken_ext.openai_public import r50k_pat_str

RANKS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpt2.tiktoken")
RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
EOT_TOKEN = 50256  # <|endoftext|>, appended after every document
VOCAB_SIZE = 50257


@functools.cache
def gpt2_encoding() -> tiktoken.Encoding:
    # expected_hash makes tiktoken refuse a corrupted or replaced file.
    ranks = tiktoken.load.load_tiktoken_bpe(RANKS_PATH, expected_hash=RANKS_SHA256)
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": EOT_TOKEN},
        explicit_n_vocab=VOCAB_SIZE,
    )


def encode_document(text: str) -> list[int]:
    """A document's tokens followed by <|endoftext|>; special-token text inside it is encoded as text."""
    return gpt2_encoding().encode_ordinary(text) + [EOT_TOKEN]


def byte_alphabet() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte, the alphabet of its vocab.json and merges.txt: printable
    Latin-1 bytes stand for themselves, the other 68 for the characters from U+0100 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def _last_merge(ranks: dict[bytes, int], token: bytes) -> tuple[bytes, bytes]:
    """The two parts BPE joins last to make token: its bytes merged by ranks below the token's own."""
    parts, own = [bytes([b]) for b in token], ranks[token]
    while len(parts) > 2:
        merges = [(ranks.get(a + b, own), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        rank, i = min(merges)
        if rank >= own:
            break
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    assert len(parts) == 2, token
    return parts[0], parts[1]


def hf_tokenizer_files(model_max_length: int) -> dict[str, str]:
    """GPT-2's tokenizer as a Hugging Face directory holds it, built offline from the same ranks:
    vocab.json (token -> id in byte_alphabet's characters), merges.txt (the merges in rank order, each
    recovered as the last join BPE makes for its token) and tokenizer_config.json. transformers'
    AutoTokenizer loads them as GPT-2's own (tests/test_export.py compares it with tiktoken)."""
    ranks = tiktoken.load.load_tiktoken_bpe(RANKS_PATH, expected_hash=RANKS_SHA256)
    alphabet = byte_alphabet()

    def spelled(token: bytes) -> str:
        return "".join(alphabet[b] for b in token)

    vocab = {spelled(token): rank for token, rank in ranks.items()}
    vocab["<|endoftext|>"] = EOT_TOKEN
    merges = [
        _last_merge(ranks, token) for token, _ in sorted(ranks.items(), key=lambda item: item[1]) if len(token) > 1
    ]
    special = "<|endoftext|>"
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "bos_token": special,
        "eos_token": special,
        "unk_token": special,
        "add_prefix_space": False,
        "model_max_length": model_max_length,
    }
    return {
        "vocab.json": json.dumps(vocab, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "".join(f"{spelled(a)} {spelled(b)}\n" for a, b in merges),
        "tokenizer_config.json": json.dumps(config, indent=2),
    }
