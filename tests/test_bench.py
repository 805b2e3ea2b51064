"""The benchmark scripts run end to end on CPU (tiny, few steps) and write complete reports. Speed is
never asserted here: figures come from running the scripts themselves."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT


def only_file(directory, prefix, suffix):
    files = [p for p in directory.iterdir() if p.name.startswith(prefix) and p.name.endswith(suffix)]
    assert len(files) == 1, files
    return files[0]


def run_bench(module, *args):
    """python -m bench.<module> args from the project root, which must succeed (a failure shows stderr's end)."""
    result = subprocess.run(
        [sys.executable, "-m", f"bench.{module}", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]


def test_bench_train_reports_every_row(tmp_path):
    from bench import bench_train

    rows = bench_train.main(
        [
            "--device=cpu",
            "--models",
            "gpt2-tiny",
            "--steps=2",
            "--warmup=1",
            "--block_size=32",
            "--micro_batch_size=2",
            "--compile=false",
            f"--out={tmp_path}",
        ]
    )
    assert [(r["optimizer"], r["lr_rule"], r["lw_curvature"] or "") for r in rows] == list(bench_train.ROWS)
    for row in rows:
        for key in ("ms_per_step", "tokens_per_s", "peak_mem_gib", "optimizer_ms", "optimizer_fraction"):
            assert row[key] > 0, key
        assert row["mfu"] is None  # no peak FLOPs are known for a CPU
    sophia = next(r for r in rows if r["optimizer"] == "sophiag")
    assert sophia["steps_timed"] == 10  # rounded up to a whole Hessian interval
    assert all(r["steps_timed"] == 5 for r in rows if r["lw_curvature"])  # and to a whole LW-AS refresh interval
    report = json.loads(only_file(tmp_path, "train-", ".json").read_text())
    assert report["env"]["torch"] and report["env"]["commit"] and len(report["ratios"]) == 4
    assert "| gpt2-tiny | adamw | lwlr |" in only_file(tmp_path, "train-", ".md").read_text()


def test_bench_optim_reports_ours_against_the_peers(tmp_path):
    run_bench("bench_optim", "--device=cpu", "--models", "gpt2-tiny", "--repeats=2", "--warmup=1", f"--out={tmp_path}")
    report = json.loads(only_file(tmp_path, "optim-", ".json").read_text())
    names = {row["optimizer"] for row in report["rows"]}
    assert {
        "torch AdamW fused, 1 group",
        "lion-pytorch",
        "sophia-opt",
        "adam-mini (official)",
        "ours SophiaG, per-layer groups",
        "ours Adam-mini, per-layer groups",
        "ours AdamW-LW step, per-layer groups",
        "ours SGD-m-LW step, per-layer groups",
    } <= names
    assert report["copy_GBps"] > 0 and all(row["GB/s"] > 0 for row in report["rows"])
    ours = next(row for row in report["rows"] if row["optimizer"] == "ours AdamW, per-layer groups")
    assert set(ours["speedup_vs"]) == {"torch AdamW fused, 1 group", "torch AdamW fused, per-layer groups"}


def test_bench_lwlr_extrapolates_the_measurement_cost(tmp_path):
    timed = 2
    run_bench(
        "bench_lwlr",
        "--device=cpu",
        "--model=gpt2-tiny",
        f"--T={timed}",
        "--micro_batch_size=2",
        "--block_size=32",
        f"--out={tmp_path}",
    )
    report = json.loads(only_file(tmp_path, "lwlr-gpt2-tiny", ".json").read_text())
    assert report["T_timed"] == timed and report["T_reported"] == 100 and report["env"]["commit"]


def test_bench_train_times_compared_variants_in_turns(tmp_path):
    from bench import bench_train

    rows = bench_train.main(
        [
            "--device=cpu",
            "--models",
            "gpt2-tiny",
            "--rows",
            "adamw:lwlr",
            "--compare",
            "loss_chunk_rows=0,16",
            "--steps=1",
            "--rounds=3",
            "--warmup=1",
            "--block_size=32",
            "--micro_batch_size=2",
            "--compile=false",
            f"--out={tmp_path}",
        ]
    )
    assert [r["variant"] for r in rows] == ["loss_chunk_rows=0", "loss_chunk_rows=16"]
    for row in rows:
        assert (
            len(row["ms_per_round"]) == 3 and row["ms_per_step"] == sorted(row["ms_per_round"])[1]
        )  # the median round
    table = next(tmp_path.glob("train-*.md")).read_text()
    assert "adamw, loss_chunk_rows=16" in table and "3 rounds in turns" in table
    assert "gpt2-tiny: adamw, loss_chunk_rows=16 (lwlr) takes" in table


def test_bench_precision_compares_bf16_with_fp32_over_seeds(tmp_path, token_dir):
    from bench import bench_precision

    summary = bench_precision.main(
        [
            "--seeds",
            "0",
            "1",
            "--max_steps=2",
            f"--out={tmp_path}",
            "--set",
            "model=gpt2-tiny",
            "lwlr_T=2",
            f"data_dir={token_dir}",
            "block_size=32",
            "micro_batch_size=4",
            "tokens_per_step=128",
            "eval_steps=2",
        ]
    )
    assert [(r["seed"], r["dtype"]) for r in summary["runs"]] == [
        (0, "float32"),
        (0, "bfloat16"),
        (1, "float32"),
        (1, "bfloat16"),
    ]
    assert summary["runs"][0]["val_loss"] != summary["runs"][1]["val_loss"]  # really two precisions
    assert 0 < summary["multiplier_max_relative_difference"] < 0.2
    table = only_file(tmp_path, "precision-", ".md").read_text()
    assert "| bfloat16 |" in table and "twice the seed noise" in table


def test_lwlr_against_fan_in_writes_both_multipliers_per_tensor_and_their_correlation(tmp_path, token_dir):
    from bench import lwlr_vs_fan_in

    results = lwlr_vs_fan_in.main(
        [
            "--models",
            "gpt2-tiny",
            "--T=1",
            "--block_size=32",
            f"--data_dir={token_dir}",
            f"--out_dir={tmp_path / 'out'}",
        ]
    )
    assert sorted(os.listdir(tmp_path / "out")) == ["figure.png", "results.json", "table.md"]
    tensors = results["models"]["gpt2-tiny"]["tensors"]
    fan_in = {t["name"]: t["fan_in"] for t in tensors}
    # 1 / sqrt(fan_in): the MLP's output matrix sees 4 x n_embd inputs, q's n_embd, so half q's multiplier
    q, mlp_out = fan_in["transformer.h.0.attn.q_proj.weight"], fan_in["transformer.h.0.mlp.c_proj.weight"]
    assert q == pytest.approx(2 * mlp_out)
    assert len({round(t["lwlr"], 6) for t in tensors}) > 10  # measured: not a rule of shapes
    assert lwlr_vs_fan_in.pearson([1.0, 2.0, 3.0], [2.0, 4.0, 6.0]) == pytest.approx(1.0)
    assert lwlr_vs_fan_in.pearson([1.0, 2.0, 3.0], [3.0, 2.0, 1.0]) == pytest.approx(-1.0)
    kinds = results["models"]["gpt2-tiny"]["summary"]["kinds"]
    assert sum(k["share_of_parameters"] for k in kinds.values()) == pytest.approx(1.0)


def test_no_benchmark_writes_into_the_committed_results_unless_told_to():
    """Every `--out` / `--out_dir` default of a bench/ script lies outside bench/results (out-bench/ is
    untracked), so running a benchmark as documented changes no committed file."""
    import ast

    defaults = {}
    for name in sorted(os.listdir(os.path.join(ROOT, "bench"))):
        if not name.endswith(".py"):
            continue
        tree = ast.parse(open(os.path.join(ROOT, "bench", name)).read())
        for node in ast.walk(tree):
            is_out = isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument"
            if is_out and node.args and getattr(node.args[0], "value", None) in ("--out", "--out_dir"):
                default = next((k.value for k in node.keywords if k.arg == "default"), None)
                defaults[name] = ast.unparse(default) if default is not None else "None"
    assert {"bench_train.py", "bench_optim.py", "kernel_report.py", "overfit.py", "lwlr_vs_fan_in.py"} <= set(defaults)
    assert not [name for name, default in defaults.items() if "RESULTS" in default or "results" in default], defaults
    from bench.common import LOCAL

    ignored = subprocess.run(["git", "check-ignore", "-q", os.path.join(LOCAL, "results.json")], cwd=ROOT)
    assert ignored.returncode == 0  # untracked, by .gitignore


def test_profile_step_times_each_phase_and_counts_the_operators(tmp_path):
    run_bench("profile_step", "--rounds=1", "--warmup=1", "--steps=1", f"--out={tmp_path}")
    report = json.loads(only_file(tmp_path, "profile-eager-", ".json").read_text())
    (ours,) = report["rows"]
    assert report["environment"]["commit"] and report["environment"]["cpu_capability"]
    assert ours["side"] == "ours" and len(ours["phases"]) == 4 and all(ms > 0 for ms in ours["phases"])
    assert ours["total"] >= max(ours["phases"]) and all(0 < share < 1 for share in ours["shares"])
    assert ours["ops"] > 100  # a GPT's step launches hundreds of aten operators; 0 if the profiler saw none
    text = only_file(tmp_path, "profile-eager-", ".md").read_text()
    assert "| forward + loss, ms (share of the step) |" in text and "| operators a step |" in text
