"""OpenWebText (8M web documents, about 9B GPT-2 tokens) through Hugging Face `datasets` (data/hf_text.py).

    python -m data.openwebtext.prepare                            # the Hub's parquet files (~16 GB); train.bin ~17 GB
    python -m data.openwebtext.prepare --data_files a.parquet ... # local parquet, jsonl or text files instead

The Hub repository Skylion007/openwebtext is a loading script on its main branch, which `datasets` 4
and later refuse to run (nanoGPT issue 633); its parquet conversion lives on the branch
refs/convert/parquet, the default here. As in nanoGPT, 0.05% of the documents (seed 2357) are the
validation split.
"""

import sys

if not __package__:  # run by its path, from where the project's packages cannot be imported
    print("error: run it from the repository's root as a module: python -m data.openwebtext.prepare", file=sys.stderr)
    sys.exit(2)

import os

from data import hf_text

DEFAULTS = dict(
    out_dir=os.path.dirname(os.path.abspath(__file__)),
    repo="Skylion007/openwebtext",
    revision="refs/convert/parquet",
    name=None,
    val_fraction=0.0005,
    split_seed=2357,
)

if __name__ == "__main__":
    sys.exit(hf_text.main(__doc__, DEFAULTS))
