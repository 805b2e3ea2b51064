"""Export a trained checkpoint as a Hugging Face GPT-2 directory that transformers loads as it is.

    python export.py --out_dir=out --hf_dir=hf/my-gpt2                 # the newest complete checkpoint in out
    python export.py --checkpoint=out/step-00000200 --hf_dir=hf/my-gpt2
    # then: transformers.GPT2LMHeadModel.from_pretrained("hf/my-gpt2"), or python sample.py --pretrained=hf/my-gpt2

Writes config.json and model.safetensors in GPT-2's own layout (q, k and v fused into c_attn, Conv1D's
(in, out) weights, the lm_head tied to wte), and GPT-2's tokenizer (vocab.json, merges.txt,
tokenizer_config.json, built offline from data/gpt2.tiktoken), so that transformers' AutoTokenizer and
tools built on it, lm-evaluation-harness among them, take the directory as it is. Refuses what GPT-2
cannot express: residual scaling, a vocabulary other than GPT-2's 50,257 tokens (a char-level model:
GPT-2's tokenizer would not fit it).
"""

import argparse
import json
import os
import shutil

from safetensors.torch import save_file

from data.tokenizer import VOCAB_SIZE, hf_tokenizer_files
from runtime.exits import run_main
from runtime.files import file_mode
from training import checkpoint
from training.hf import PretrainedError, hf_config, to_hf_state_dict


def export(model, hf_dir: str) -> None:
    """config.json, model.safetensors and the tokenizer's files for model in hf_dir, which must be new or
    empty; written into a temporary folder first, so a failed export leaves nothing behind."""
    if model.config.vocab_size != VOCAB_SIZE:
        raise PretrainedError(
            f"the model's vocabulary has {model.config.vocab_size} tokens, not GPT-2's {VOCAB_SIZE}: "
            "a Hugging Face GPT-2 directory implies GPT-2's tokenizer"
        )
    config = hf_config(model.config)
    if os.path.exists(hf_dir) and (not os.path.isdir(hf_dir) or os.listdir(hf_dir)):
        raise PretrainedError(f"--hf_dir={hf_dir} exists and is not an empty folder: choose a new one")
    tmp = f"{hf_dir.rstrip(os.sep)}.tmp-{os.getpid()}"
    os.makedirs(tmp)
    try:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        save_file(to_hf_state_dict(model), os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        os.chmod(os.path.join(tmp, "model.safetensors"), file_mode())  # safetensors creates it 0600
        for name, text in hf_tokenizer_files(model.config.block_size).items():
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                f.write(text)
        if os.path.isdir(hf_dir):
            os.rmdir(hf_dir)  # empty, checked above
        os.replace(tmp, hf_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--out_dir", default="out", help="a training run's folder: its newest complete checkpoint is exported"
    )
    parser.add_argument("--checkpoint", default=None, help="a step-XXXXXXXX folder instead")
    parser.add_argument("--hf_dir", required=True, help="the Hugging Face directory to write (new or empty)")
    args = parser.parse_args(argv)
    path, meta = checkpoint.find(args.out_dir, args.checkpoint)
    model = checkpoint.load_model(path, meta)
    checkpoint.refuse_non_finite(model.state_dict(), args.hf_dir)
    export(model, args.hf_dir)
    print(f"exported {path} (step {meta['step']}) to {args.hf_dir}")
    return 0


if __name__ == "__main__":
    run_main(main)
