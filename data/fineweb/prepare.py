"""FineWeb-Edu, the educational slice of FineWeb that current GPT-2 reproductions train on (llm.c,
modded-nanogpt), through Hugging Face `datasets` (data/hf_text.py).

    # HuggingFaceFW/fineweb-edu, sample-10BT (~27 GB of parquet)
    python -m data.fineweb.prepare
    python -m data.fineweb.prepare --max_tokens=1000000000   # stop the train split at 1B tokens
    python -m data.fineweb.prepare --data_files sample/10BT/000_00000.parquet   # downloaded parquet files

Then `python train.py config/train_gpt2.py --dataset=fineweb`. The validation split is 0.05% of the
documents (seed 2357), as for OpenWebText. `--max_tokens` caps what is written, not what is downloaded:
to download less, fetch a few of the sample's parquet files and pass them as --data_files.
"""

import sys

if not __package__:  # run by its path, from where the project's packages cannot be imported
    print("error: run it from the repository's root as a module: python -m data.fineweb.prepare", file=sys.stderr)
    sys.exit(2)

import os

from data import hf_text

DEFAULTS = dict(
    out_dir=os.path.dirname(os.path.abspath(__file__)),
    repo="HuggingFaceFW/fineweb-edu",
    revision="main",
    name="sample-10BT",
    val_fraction=0.0005,
    split_seed=2357,
)

if __name__ == "__main__":
    sys.exit(hf_text.main(__doc__, DEFAULTS))
