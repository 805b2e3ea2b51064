"""How good is a model: eval_only's losses against transformers' on the same batches, HellaSwag scored by
eval.py against lm-evaluation-harness on the exported directory, and bad input as one error line."""

import contextlib
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import export
import train
from conftest import ROOT, read_log, tiny_run_args, tree_digest
from data.loader import BatchSplit, TokenBatches
from eval import HellaSwagFileError, hellaswag, read_hellaswag
from test_reliability import assert_one_line_error, run_train
from training import checkpoint


def eval_args(out_dir, data_dir, **overrides) -> list[str]:
    values = dict(eval_only="true", eval_steps=3, micro_batch_size=2, block_size=32, seed=7)
    return tiny_run_args(out_dir, data_dir, **{**values, **overrides})


def transformers_loss(model, data_dir, split, steps=3, rows=2, block_size=32, seed=7) -> float:
    """The mean loss over eval_only's batches (the fixed "val" stream of each split), by transformers."""
    batches = TokenBatches(str(data_dir / f"{split}.bin"), "val", block_size, 50257, seed)
    total = 0.0
    with torch.no_grad():
        for i in range(steps):
            x, y = batches.get(i, BatchSplit(rows), torch.device("cpu"))
            logits = model(x).logits
            total += F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1)).item()
    return total / steps


def test_eval_only_of_a_gpt2_directory_is_transformers_loss_on_the_same_batches(tmp_path, token_dir, gpt2_dir):
    from transformers import GPT2LMHeadModel

    out = tmp_path / "eval"
    config = os.path.join(ROOT, "config", "eval_gpt2.py")
    assert train.main([config, *eval_args(out, token_dir, init_from=gpt2_dir)]) == 0
    (record,) = read_log(out, "eval_only")
    reference = GPT2LMHeadModel.from_pretrained(str(gpt2_dir)).eval()
    for split in ("val", "train"):
        assert record[f"{split}_loss"] == pytest.approx(transformers_loss(reference, token_dir, split), abs=1e-5)
    assert sorted(os.listdir(out)) == ["log.jsonl"]  # nothing but the record


def test_eval_only_of_a_run_changes_nothing_but_its_log(tmp_path, token_dir):
    out = tmp_path / "run"
    assert train.main(tiny_run_args(out, token_dir, max_steps=2, eval_interval=2, lr_rule="single")) == 0
    before = tree_digest(out)
    # The run's own eval batches (its eval_steps, micro-batch and seed); the checkpoint's block_size wins over 16
    assert train.main(eval_args(out, token_dir, eval_steps=2, micro_batch_size=4, seed=1337, block_size=16)) == 0
    after = tree_digest(out)
    assert {name for name in after if after[name] != before.get(name)} == {"log.jsonl"}
    record = read_log(out, "eval_only")[0]
    assert record["step"] == 2 and record["val_loss"] > 0 and "step-00000002" in record["source"]
    eval_records = read_log(out, "eval")  # the run's own eval at step 2 used the same val batches
    assert record["val_loss"] == pytest.approx(eval_records[-1]["val_loss"], abs=1e-6)


def test_eval_only_without_a_model_is_one_error_line_and_writes_nothing(tmp_path, token_dir):
    out = tmp_path / "nothing"
    result = run_train(eval_args(out, token_dir))
    assert_one_line_error(result, "eval_only:", "holds no complete checkpoint", "--init_from=PATH")
    assert not out.exists()


EXAMPLES = [
    ("A man is sitting on a roof. He", ["starts pulling up roofing.", "is ripping level tiles off.",
     "is holding a rubik's cube.", "starts pulling up roofing on a roof."], 3),
    ("A woman walks into a kitchen and", ["opens the fridge.", "sings to the cat.", "paints the wall blue.",
     "reads a book."], 0),
    ("Two dogs run across a field. They", ["chase a red ball.", "sit down.", "bark at a car passing by slowly.",
     "jump."], 2),
    ("The chef slices the onions, then", ["fries them in butter.", "cries.", "calls a friend.",
     "puts them in a bowl of cold water for ten minutes."], 1),
]  # fmt: skip


# Longer than gpt2-tiny's 64-token block: lm-evaluation-harness cuts the context from the left.
LONG_EXAMPLE = (
    " ".join(["The recipe begins with flour, water, salt and yeast, mixed by hand in a large bowl until smooth."] * 3),
    ["It rests for an hour.", "It is baked at once.", "It is frozen overnight.", "It is thrown away."],
    0,
)


def write_hellaswag(path, examples=EXAMPLES) -> None:
    """A file in HellaSwag's validation format, with its other fields too."""
    with open(path, "w") as f:
        for i, (ctx, endings, label) in enumerate(examples):
            record = {"ind": i, "activity_label": "Test", "ctx_a": ctx, "ctx_b": "", "ctx": ctx, "endings": endings,
                      "source_id": f"test~{i}", "split": "val", "split_type": "indomain", "label": label}  # fmt: skip
            f.write(json.dumps(record) + "\n")


def lm_eval_hellaswag(hf_dir, path) -> list[dict]:
    """lm-evaluation-harness on the directory, with a local task in HellaSwag's shape: the context, then
    " " + each ending; nothing downloads."""
    import lm_eval

    task = {
        "task": "hellaswag_local",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"validation": str(path)}},
        "validation_split": "validation",
        "output_type": "multiple_choice",
        "doc_to_text": "{{ctx}}",
        "doc_to_choice": "{{endings}}",
        "doc_to_target": "{{label}}",
        "metric_list": [{"metric": "acc"}],
    }
    results = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(hf_dir), "dtype": "float32"},
        tasks=[task],
        device="cpu",
        batch_size=1,
        log_samples=True,
    )
    return sorted(results["samples"]["hellaswag_local"], key=lambda sample: sample["doc_id"])


def test_hellaswag_agrees_with_lm_evaluation_harness_on_the_exported_model(tmp_path, token_dir, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out, hf_dir, path = tmp_path / "run", tmp_path / "hf", tmp_path / "hellaswag.jsonl"
    assert train.main(tiny_run_args(out, token_dir, max_steps=1, eval_interval=1, lr_rule="single")) == 0
    assert export.main([f"--out_dir={out}", f"--hf_dir={hf_dir}"]) == 0  # the CLI's own run: tests/test_export.py
    write_hellaswag(path, [*EXAMPLES, LONG_EXAMPLE])
    model = checkpoint.load_model(*checkpoint.latest(str(out))).eval()
    assert len(encode(LONG_EXAMPLE[0])) > model.config.block_size
    ours = hellaswag(model, read_hellaswag(str(path)), torch.device("cpu"), torch.autocast("cpu", enabled=False))
    assert ours["cut_to_block"] == 1
    theirs = lm_eval_hellaswag(hf_dir, path)
    for example, sample in zip(ours["per_example"], theirs):
        their_log_likelihoods = [resp[0] for resp in sample["filtered_resps"]]
        assert example["log_likelihoods"] == pytest.approx(their_log_likelihoods, abs=1e-4)
        assert example["choice"] == max(range(4), key=lambda i: their_log_likelihoods[i])
    assert ours["acc"] == pytest.approx(sum(sample["acc"] for sample in theirs) / len(theirs))


def test_hellaswag_from_the_command_line_on_a_directory_and_its_accuracies_by_hand(tmp_path, gpt2_dir):
    path, result_file = tmp_path / "hellaswag.jsonl", tmp_path / "result.json"
    write_hellaswag(path)
    command = ["eval.py", "hellaswag", f"--file={path}", f"--init_from={gpt2_dir}", "--device=cpu"]
    result = subprocess.run(
        [sys.executable, *command, f"--json={result_file}"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "hellaswag: acc " in result.stdout and "examples/s" in result.stdout
    scored = json.loads(result_file.read_text())
    labels = [label for _, _, label in EXAMPLES]
    lengths = [[len(e) for e in (encode(" " + ending) for ending in endings)] for _, endings, _ in EXAMPLES]
    acc = acc_norm = 0
    for example, label, length in zip(scored["per_example"], labels, lengths):
        sums = example["log_likelihoods"]
        by_sum, by_mean = max(range(4), key=lambda i: sums[i]), max(range(4), key=lambda i: sums[i] / length[i])
        assert (example["choice"], example["choice_norm"]) == (by_sum, by_mean)
        acc, acc_norm = acc + (by_sum == label), acc_norm + (by_mean == label)
    assert scored["acc"] == acc / 4 and scored["acc_norm"] == acc_norm / 4 and scored["examples"] == 4


def test_acc_takes_the_highest_sum_and_acc_norm_the_highest_mean_per_token(monkeypatch):
    import eval as evaluation

    # (sum of log-probabilities, tokens) per ending: by sum ending 2 (-9.0), by mean ending 1 (-2.0 a token)
    scores = [(-10.0, 2), (-12.0, 6), (-9.0, 1), (-30.0, 10)]
    monkeypatch.setattr(evaluation, "ending_log_probs", lambda *args: (scores, False))
    examples = [evaluation.Example("ctx", ["a", "b", "c", "d"], label) for label in (1, 2, 2)]
    result = evaluation.hellaswag(torch.nn.Module(), examples, None, None, say=lambda line: None)
    assert [(e["choice"], e["choice_norm"]) for e in result["per_example"]] == [(2, 1)] * 3
    assert (result["acc"], result["acc_norm"]) == (2 / 3, 1 / 3)


def test_an_ending_longer_than_the_block_keeps_its_last_block_size_tokens_scored():
    """By hand: the row is the ending's last block_size + 1 tokens; all but the first are scored."""
    import eval as evaluation
    from model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("gpt2-tiny", block_size=8)).eval()
    ending = " one two three four five six seven eight nine ten eleven"
    tokens = encode(ending)
    assert len(tokens) > 9
    example = evaluation.Example("Counting:", [ending, " a", " b", " c"], 0)
    scores, cut = evaluation.ending_log_probs(model, example, torch.device("cpu"), contextlib.nullcontext())
    row = torch.tensor([tokens[-9:]])
    logits, _ = model(row[:, :-1])
    expected = torch.log_softmax(logits, dim=-1)[0, torch.arange(8), row[0, 1:]].sum().item()
    assert cut and scores[0] == (pytest.approx(expected, abs=1e-5), 8)


def encode(text):
    from data.tokenizer import gpt2_encoding

    return gpt2_encoding().encode_ordinary(text)


@pytest.mark.parametrize(
    "line, said",
    [
        ("not json", "line 2: not JSON"),
        (json.dumps({"ctx": "x", "endings": ["a", "b", "c", "d"]}), "line 2: no label field"),
        (json.dumps({"ctx": "x", "endings": ["a", "b", "c"], "label": 0}), "line 2: endings must be a list of 4"),
        (json.dumps({"ctx": "x", "endings": ["a", "b", "c", "d"], "label": 4}), "line 2: label must be 0, 1, 2 or 3"),
    ],
)
def test_a_malformed_hellaswag_file_is_one_error_line_naming_the_line(tmp_path, line, said):
    path = tmp_path / "bad.jsonl"
    write_hellaswag(path, EXAMPLES[:1])
    with open(path, "a") as f:
        f.write(line + "\n")
    with pytest.raises(HellaSwagFileError) as error:
        read_hellaswag(str(path))
    assert str(error.value).startswith(f"{path}, {said}")
    if said.endswith("not JSON"):  # as the user meets it: one line, exit 2, before any model is loaded
        command = [sys.executable, "eval.py", "hellaswag", f"--file={path}", f"--out_dir={tmp_path / 'none'}"]
        assert_one_line_error(subprocess.run(command, cwd=ROOT, capture_output=True, text=True), f"{path}, {said}")
