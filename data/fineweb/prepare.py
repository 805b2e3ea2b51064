"""FineWeb-Edu, the educational slice of FineWeb that current GPT-2 reproductions train on (llm.c,
modded-nanogpt), through Hugging Face `datasets` (data/hf_text.py).

    # HuggingFaceFW/fineweb-edu, sample-10BT (~27 GB of parquet)
    python data/fineweb/prepare.py
    python data/fineweb/prepare.py --max_tokens=1000000000   # stop the train split at 1B tokens
    python data/fineweb/prepare.py --data_files sample/10BT/000_00000.parquet   # downloaded parquet files

Then `python train.py config/train_gpt2.py --dataset=fineweb`. The validation split is 0.05% of the
documents (seed 2357), as for OpenWebText. `--max_tokens` caps what is written, not what is downloaded:
to download less, fetch a few of the sample's parquet files and pass them as --data_files.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from data import hf_text  # noqa: E402

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
