"""How good is a model: its loss on the configured data (evaluate: a run's evals, and train.py's
eval_only, loss_only below), and HellaSwag scored as GPT-2 repositories score it.

    python train.py config/eval_gpt2.py --init_from=hf/gpt2       # GPT-2's own val loss on OpenWebText
    python train.py --eval_only=true --out_dir=out                 # a run's newest checkpoint, on its data
    python eval.py hellaswag --file=data/hellaswag/hellaswag_val.jsonl --init_from=hf/gpt2
    python eval.py hellaswag --file=data/hellaswag/hellaswag_val.jsonl --out_dir=out --limit=500

HellaSwag (Zellers et al., 2019) is 10,042 validation examples, each a context and four endings of
which one (`label`) is right; its file is the user's own copy (README, "Evaluating"). Each ending is
scored by the log-probabilities of its tokens, " " + ending in GPT-2's BPE, given the context's tokens:
`acc` takes the ending with the highest sum, `acc_norm` the one with the highest mean per token, as
llm.c and build-nanogpt do (GPT-2 124M: acc_norm about 0.295). lm-evaluation-harness computes the same
log-likelihoods and the same `acc`; its `acc_norm` divides by the ending's length in bytes instead of
tokens, so it comes out slightly different (tests/test_eval.py checks the agreement).
"""

import argparse
import dataclasses
import json
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from data.loader import TokenBatches
from data.tokenizer import VOCAB_SIZE, gpt2_encoding
from model import GPT
from runtime.device import autocast, environment
from runtime.errors import UserError
from runtime.exits import run_main
from runtime.files import write_json
from runtime.progress import Progress, heartbeat
from runtime.ranks import init_runtime
from runtime.signals import StopVote
from training import checkpoint, hf, outdir
from training.build import data_dir, eval_split, gpt_config, token_batches
from training.config import INIT_MODES, ConfigError, TrainConfig
from training.runlog import RunLog


class HellaSwagFileError(UserError):
    """A HellaSwag file that is missing or not in HellaSwag's jsonl format, named by its line."""


def model_for(c: TrainConfig) -> tuple[GPT, str, int | None]:
    """The model eval_only evaluates, where it came from and its step: init_from's Hugging Face
    directory, else out_dir's newest complete checkpoint (built from the config saved with it)."""
    if c.init_from not in INIT_MODES:
        model = GPT(gpt_config(c))
        hf.load_weights(model, c.init_from)
        return model, c.init_from, None
    found = checkpoint.latest(c.out_dir)
    if found is None:
        raise ConfigError(
            f"eval_only: {c.out_dir} holds no complete checkpoint, and init_from={c.init_from} names no Hugging "
            "Face directory: give --init_from=PATH or the out_dir of a run"
        )
    path, meta = found
    return checkpoint.load_model(path, meta), f"{path} (step {meta['step']})", meta["step"]


@torch.no_grad()
def evaluate(
    model, batches: TokenBatches, c: TrainConfig, rt, ctx, vote: StopVote | None = None, compiles: bool = False
) -> float | None:
    """Mean loss over the same eval_steps val batches every time, split across ranks; None when a stop
    (vote) came first: an eval of hundreds of batches must not outlast a scheduler's grace period.
    compiles: the first batch compiles the model's eval graph (minutes on a CPU), said by a heartbeat."""
    model.eval()
    total = torch.zeros((), device=rt.device)
    split = eval_split(c, rt.world_size)
    # Progress speaks only if the eval takes a while.
    with Progress("eval", c.eval_steps, "batches", enabled=rt.is_main) as progress:
        for i in range(c.eval_steps):
            if vote is not None and vote.poll(f"eval batch {i}"):
                model.train()
                return None
            x, y = batches.get(i, split, rt.device, rank=rt.rank)
            with heartbeat("torch.compile: compiling the eval graph", enabled=compiles and i == 0 and rt.is_main):
                with ctx:
                    _, loss = model(x, y)
            total += loss.float()
            progress.update()
    if rt.distributed:
        with rt.waiting_for_ranks("the all-reduce of the val loss"):
            dist.all_reduce(total, op=dist.ReduceOp.AVG)
    model.train()
    return total.item() / c.eval_steps


def loss_only(c: TrainConfig, rt) -> int:
    """eval_only: val and train loss of the model over eval_steps fixed batches of each split (the val
    batches a run evaluates on; train windows from the same fixed stream), split across ranks. Prints
    them and appends one `eval_only` record to out_dir/log.jsonl; writes nothing else."""
    model, source, step = model_for(c)
    model = model.to(rt.device)
    ctx = autocast(rt.device, c.dtype)
    rows = eval_split(c, rt.world_size).global_rows
    losses = {
        split: evaluate(model, token_batches(c, split, "val", model.config), c, rt, ctx) for split in ("val", "train")
    }
    data = data_dir(c)
    rt.print0(
        f"eval_only: {source} on {data}: val loss {losses['val']:.4f} | train loss {losses['train']:.4f} "
        f"({c.eval_steps} batches of {rows} x {model.config.block_size} tokens each)"
    )
    if rt.is_main:
        outdir.prepare(c.out_dir)
        log = RunLog(rt, c.out_dir)
        record = {"step": step, "source": source, "data": data, "eval_steps": c.eval_steps}
        log.record(
            "eval_only", {**record, **{f"{s}_loss": v for s, v in losses.items()}, "env": environment(rt.device)}
        )
        log.close()
    return 0


@dataclasses.dataclass
class Example:
    context: str
    endings: list[str]
    label: int


def read_hellaswag(path: str, limit: int = 0) -> list[Example]:
    """HellaSwag's validation jsonl: per line, "ctx", four "endings" and a "label" in 0..3."""
    if not os.path.isfile(path):
        raise HellaSwagFileError(
            f"{path}: no such file; HellaSwag's validation set is hellaswag_val.jsonl from "
            "github.com/rowanz/hellaswag (data/), downloaded wherever a network is"
        )
    examples = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {number}"
            try:
                record = json.loads(line)
            except ValueError as e:
                raise HellaSwagFileError(f"{where}: not JSON ({e})") from None
            if not isinstance(record, dict):
                raise HellaSwagFileError(f"{where}: expected a JSON object")
            missing = [key for key in ("ctx", "endings", "label") if key not in record]
            if missing:
                raise HellaSwagFileError(f"{where}: no {', '.join(missing)} field")
            endings, label = record["endings"], record["label"]
            if not (isinstance(endings, list) and len(endings) == 4 and all(isinstance(e, str) for e in endings)):
                raise HellaSwagFileError(f"{where}: endings must be a list of 4 strings")
            if isinstance(label, str) and label.isdigit():
                label = int(label)
            if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < 4:
                raise HellaSwagFileError(f"{where}: label must be 0, 1, 2 or 3, got {record['label']!r}")
            if not isinstance(record["ctx"], str):
                raise HellaSwagFileError(f"{where}: ctx must be a string")
            examples.append(Example(record["ctx"], endings, label))
            if limit and len(examples) == limit:
                break
    if not examples:
        raise HellaSwagFileError(f"{path}: no examples")
    return examples


@torch.no_grad()
def ending_log_probs(model: GPT, example: Example, device, ctx) -> tuple[list[tuple[float, int]], bool]:
    """(sum of the ending's token log-probabilities, the tokens scored) for each of the four endings, in
    one forward of four rows, and whether any row was cut. A row longer than block_size + 1 tokens loses
    its first tokens, as lm-evaluation-harness cuts (context + continuation)[-(max_length + 1):]: the
    context from the left, and an ending longer than the block keeps its last block_size tokens."""
    encode = gpt2_encoding().encode_ordinary
    context = encode(example.context)
    endings = [encode(" " + ending) for ending in example.endings]
    longest = model.config.block_size + 1
    rows = [(context + ending)[-longest:] for ending in endings]
    scored = [min(len(ending), len(row) - 1) for ending, row in zip(endings, rows)]  # the first token has no prediction
    width = max(len(row) for row in rows)
    tokens = torch.zeros((4, width), dtype=torch.long)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = torch.tensor(row)
    tokens = tokens.to(device)
    with ctx:
        logits, _ = model(tokens[:, :-1])
    log_probs = F.log_softmax(logits.float(), dim=-1).gather(-1, tokens[:, 1:, None])[..., 0]  # (4, width - 1)
    scores = []
    for i, (row, count) in enumerate(zip(rows, scored)):
        end = len(row) - 1  # log_probs[:, t] is the log-probability of token t + 1
        scores.append((float(log_probs[i, end - count : end].sum()), count))
    return scores, any(len(context) + len(ending) > longest for ending in endings)


def hellaswag(model: GPT, examples: list[Example], device, ctx, say=print) -> dict:
    """acc and acc_norm over the examples, and each example's scores and choices."""
    model.eval()
    correct = correct_norm = cut = 0
    per_example = []
    start = time.perf_counter()
    with Progress("hellaswag", len(examples), "examples") as progress:
        for example in examples:
            scores, was_cut = ending_log_probs(model, example, device, ctx)
            cut += was_cut
            choice = max(range(4), key=lambda i: scores[i][0])
            choice_norm = max(range(4), key=lambda i: scores[i][0] / scores[i][1])
            correct += choice == example.label
            correct_norm += choice_norm == example.label
            per_example.append(
                {"log_likelihoods": [s for s, _ in scores], "choice": choice, "choice_norm": choice_norm}
            )
            progress.update()
    seconds = time.perf_counter() - start
    n = len(examples)
    result = {
        "examples": n,
        "acc": correct / n,
        "acc_norm": correct_norm / n,
        "cut_to_block": cut,
        "examples_per_s": n / seconds,
    }
    longer = f"; {cut:,} longer than block_size {model.config.block_size}, cut from the left" if cut else ""
    say(
        f"hellaswag: acc {result['acc']:.4f} | acc_norm {result['acc_norm']:.4f} over {n:,} examples "
        f"({result['examples_per_s']:.1f} examples/s{longer})"
    )
    return {**result, "per_example": per_example}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", choices=["hellaswag"])
    parser.add_argument("--file", required=True, help="HellaSwag's hellaswag_val.jsonl (or a file in its format)")
    parser.add_argument("--init_from", default="", help="a local Hugging Face GPT-2 directory")
    parser.add_argument("--out_dir", default="out", help="a training run's folder: its newest complete checkpoint")
    parser.add_argument("--checkpoint", default="", help="a step-XXXXXXXX folder instead")
    parser.add_argument("--limit", type=int, default=0, help="the first N examples (0 = all)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    parser.add_argument("--json", default="", help="also write the result, with each example's scores, here")
    args = parser.parse_args(argv)
    examples = read_hellaswag(args.file, args.limit)  # a bad file fails before any model is loaded
    rt = init_runtime(args.device)
    if args.init_from:
        model, source = hf.from_pretrained(args.init_from), args.init_from
    else:
        path, meta = checkpoint.find(args.out_dir, args.checkpoint or None)
        model, source = checkpoint.load_model(path, meta), f"{path} (step {meta['step']})"
    if model.config.vocab_size != VOCAB_SIZE:
        raise hf.PretrainedError(
            f"{source}: a vocabulary of {model.config.vocab_size} tokens; HellaSwag is scored in GPT-2's BPE"
        )
    print(f"hellaswag: {source}, {len(examples):,} examples from {args.file}", file=sys.stderr)
    result = hellaswag(model.to(rt.device), examples, rt.device, autocast(rt.device, args.dtype))
    if args.json:
        write_json(args.json, {"source": source, "file": args.file, **result, "env": environment(rt.device)})
    return 0


if __name__ == "__main__":
    run_main(main)
