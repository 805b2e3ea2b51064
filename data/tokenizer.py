"""GPT-2's BPE through tiktoken, offline.

tiktoken.get_encoding("gpt2") downloads its rank files on first use, which fails without internet. The
same ranks ship here as gpt2.tiktoken (from openai-whisper's assets, MIT; see gpt2.tiktoken.LICENSE),
checked by SHA-256 and combined with tiktoken's own GPT-2 split pattern, so the encoding is
GPT-2's on any machine: "hello world" -> [31373, 995].
"""

import functools
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
