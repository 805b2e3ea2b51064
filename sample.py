"""Sample text from a trained checkpoint or a local Hugging Face GPT-2 directory.

python sample.py --out_dir=out                    # newest complete checkpoint in out
python sample.py --checkpoint=out/step-00000250   # a specific one
python sample.py --pretrained=path/to/gpt2        # config.json + model.safetensors
python sample.py --prompt="ROMEO:" --num_samples=3 --max_new_tokens=200 --temperature=0.8 --top_k=200
"""

import argparse
import sys

import torch

from data import vocab
from runtime.exits import run_main
from training import checkpoint, hf
from training.build import data_dir
from training.config import TrainConfig


def load_model(args):
    """The model, and the vocabulary of the data it was trained on (GPT-2's for --pretrained)."""
    if args.pretrained:
        return hf.from_pretrained(args.pretrained), vocab.GPT2Vocab()
    path, meta = checkpoint.find(args.out_dir, args.checkpoint)
    model = checkpoint.load_model(path, meta)
    print(f"loaded {path} (step {meta['step']})", file=sys.stderr)
    vocabulary = vocab.load(data_dir(TrainConfig(**meta["config"])))
    if vocabulary.size != model.config.vocab_size:
        raise vocab.VocabularyError(
            f"the model has {model.config.vocab_size} tokens but its dataset's vocabulary {vocabulary.size}: "
            "was the data folder prepared again or moved?"
        )
    return model, vocabulary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", default="out")
    parser.add_argument("--checkpoint", default="", help="a step-XXXXXXXX folder")
    parser.add_argument("--pretrained", default="", help="a local Hugging Face GPT-2 directory")
    parser.add_argument("--prompt", default="\n")
    parser.add_argument("--num_samples", type=int, default=2)
    parser.add_argument("--max_new_tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top_k", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    model, vocabulary = load_model(args)
    model = model.to(args.device).eval()
    idx = torch.tensor([vocabulary.encode(args.prompt)], device=args.device)
    for _ in range(args.num_samples):
        out = model.generate(idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k)
        print(vocabulary.decode(out[0].tolist()))
        print("---------------")


if __name__ == "__main__":
    run_main(main)
