import json

import pytest


def sweep_args(out_dir, token_dir, *extra):
    return ["--preset=tiny-cpu", f"--out_dir={out_dir}", f"--data_dir={token_dir}", "--optimizers", "adamw", "--rules", "single", "lwlr",
            "--steps=6", "--subset_batches=2", "--micro_batch_size=2", "--block_size=32", "--warmup_steps=1", "--lwlr_T=2",
            "--log_every=1", "--device=cpu", *extra]


def test_a_small_sweep_writes_json_table_and_plots_and_skips_finished_points(tmp_path, token_dir, capsys):
    import overfit  # bench/overfit.py

    out = tmp_path / "sweep"
    results = overfit.main(sweep_args(out, token_dir, "--lrs", "1e-3", "3e-3"))
    assert len(results["runs"]) == 4
    for run in results["runs"].values():
        assert not run["diverged"] and run["final_loss"] < run["curve"][0][1]  # a few steps on 2 batches already fit better
        assert len(run["curve"]) == 6
    saved = json.loads((out / "results.json").read_text())
    assert saved["runs"].keys() == results["runs"].keys() and saved["env"]["torch"]
    table = (out / "table.md").read_text()
    assert "| adamw single |" in table and "| adamw lwlr |" in table and table.count("**") == 4  # one best per row
    for plot in ("final_loss_vs_lr.png", "best_curves.png"):
        assert (out / plot).stat().st_size > 10_000
    capsys.readouterr()
    again = overfit.main(sweep_args(out, token_dir, "--lrs", "1e-3", "3e-3", "1e-2"))  # one lr more
    output = capsys.readouterr().out
    assert output.count("done before, skipped") == 4 and len(again["runs"]) == 6
    with pytest.raises(ValueError, match="other steps"):
        overfit.main(sweep_args(out, token_dir, "--lrs", "1e-3", "--steps=7"))


def test_a_diverging_run_is_recorded_as_diverged(tmp_path, token_dir):
    import overfit  # bench/overfit.py

    results = overfit.main(sweep_args(tmp_path / "div", token_dir, "--rules", "single", "--lrs", "1e-3", "30"))
    by_lr = {run["lr"]: run for run in results["runs"].values()}
    assert by_lr[30.0]["diverged"] and by_lr[30.0]["final_loss"] is None
    assert not by_lr[1e-3]["diverged"]
    assert "div" in (tmp_path / "div" / "table.md").read_text()
