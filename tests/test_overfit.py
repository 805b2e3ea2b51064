import json

import pytest
import torch


def sweep_args(out_dir, token_dir, *extra):
    return [
        "--preset=tiny-cpu",
        f"--out_dir={out_dir}",
        f"--data_dir={token_dir}",
        "--optimizers",
        "adamw",
        "--rules",
        "single",
        "lwlr",
        "--steps=6",
        "--subset_batches=2",
        "--micro_batch_size=2",
        "--block_size=32",
        "--warmup_steps=1",
        "--lwlr_T=2",
        "--log_every=1",
        "--device=cpu",
        *extra,
    ]


def test_a_small_sweep_writes_json_table_and_plots_and_skips_finished_points(tmp_path, token_dir, capsys):
    from bench import overfit, overfit_report

    out = tmp_path / "sweep"
    threads = torch.get_num_threads()
    results = overfit.main(sweep_args(out, token_dir, "--lrs", "1e-3", "3e-3"))
    assert torch.get_num_threads() == threads  # the points' 2 threads end with them: later runs here keep ours
    assert len(results["runs"]) == 4 and all(run["threads"] == 2 for run in results["runs"].values())
    for run in results["runs"].values():
        assert (
            not run["diverged"] and run["final_loss"] < run["curve"][0][1]
        )  # a few steps on 2 batches already fit better
        assert len(run["curve"]) == 6
    saved = json.loads((out / "results.json").read_text())
    assert saved["runs"].keys() == results["runs"].keys() and saved["env"]["torch"]
    table = (out / "table.md").read_text()
    assert "| adamw single |" in table and "| adamw lwlr |" in table and table.count("**") == 4  # one best per row
    # The table's best rate of each rule is the run with the lowest final loss, and its value is that loss.
    for rule in ("single", "lwlr"):
        best = min((run for run in results["runs"].values() if run["rule"] == rule), key=lambda run: run["final_loss"])
        assert f"**{best['final_loss']:.3f}**" in next(
            line for line in table.splitlines() if f"| adamw {rule} |" in line
        )
    drawn = overfit_report.plot(results, str(out))  # what the two plots show: every run's final loss, the best curves
    for rule in ("single", "lwlr"):
        runs = sorted((run["lr"], run["final_loss"]) for run in results["runs"].values() if run["rule"] == rule)
        assert drawn["final_loss_vs_lr"][f"adamw {rule}"] == runs
        best = min((run for run in results["runs"].values() if run["rule"] == rule), key=lambda run: run["final_loss"])
        assert drawn["best_curves"][f"adamw {rule}"] == [tuple(point) for point in best["curve"]]
    (out / "table.md").unlink()
    overfit_report.main(str(out))  # redrawn from results.json alone
    assert (out / "table.md").read_text() == table
    capsys.readouterr()
    again = overfit.main(sweep_args(out, token_dir, "--lrs", "1e-3", "3e-3", "1e-2"))  # one lr more
    output = capsys.readouterr().out
    assert "4 of 6 points are in " in output and output.count("final loss") == 2 and len(again["runs"]) == 6
    with pytest.raises(ValueError, match="other steps"):
        overfit.main(sweep_args(out, token_dir, "--lrs", "1e-3", "--steps=7"))


def test_a_diverging_run_is_recorded_as_diverged(tmp_path, token_dir):
    from bench import overfit

    results = overfit.main(sweep_args(tmp_path / "div", token_dir, "--rules", "single", "--lrs", "1e-3", "30"))
    by_lr = {run["lr"]: run for run in results["runs"].values()}
    assert by_lr[30.0]["diverged"] and by_lr[30.0]["final_loss"] is None
    assert not by_lr[1e-3]["diverged"]
    assert "div" in (tmp_path / "div" / "table.md").read_text()


def test_heldout_mode_scores_val_loss_over_seeds_and_resumes(tmp_path, token_dir, capsys):
    from bench import overfit

    args = [
        "--preset=heldout-quick",
        f"--out_dir={tmp_path / 'heldout'}",
        f"--data_dir={token_dir}",
        "--model=gpt2-tiny",
        "--optimizers",
        "adamw",
        "--rules",
        "single",
        "lwlr",
        "--lrs",
        "1e-3",
        "3e-3",
        "--seeds",
        "0",
        "1",
        "--steps=4",
        "--warmup_steps=1",
        "--micro_batch_size=2",
        "--block_size=32",
        "--lwlr_T=2",
        "--log_every=1",
        "--eval_every=2",
        "--eval_steps=2",
        "--device=cpu",
    ]
    results = overfit.main(args)
    assert len(results["runs"]) == 8 and results["sweep"]["heldout"]
    for run in results["runs"].values():
        assert [step for step, _ in run["val_curve"]] == [2, 4] and run["final_loss"] == run["val_curve"][-1][1]
    seeds = {
        run["seed"]: run["final_loss"]
        for run in results["runs"].values()
        if run["rule"] == "single" and run["lr"] == 1e-3
    }
    assert seeds[0] != seeds[1]  # the seed changes the init and the batches
    table = (tmp_path / "heldout" / "table.md").read_text()
    assert "## Each rule at its own best rate" in table and "| adamw | lwlr |" in table and "(2) |" in table
    from bench import overfit_report

    drawn = overfit_report.plot(results, str(tmp_path / "heldout"))  # each point: the mean val loss over the seeds
    for lr in (1e-3, 3e-3):
        losses = [run["final_loss"] for run in results["runs"].values() if run["rule"] == "lwlr" and run["lr"] == lr]
        assert dict(drawn["final_loss_vs_lr"]["adamw lwlr"])[lr] == pytest.approx(sum(losses) / 2, rel=1e-12)
    capsys.readouterr()
    overfit.main(args)
    assert "8 of 8 points are in " in capsys.readouterr().out


def test_rule_summary_compares_best_rates_against_the_seed_noise():
    from bench import overfit_report

    def runs(rule, lr, losses):
        return {
            f"{rule}{lr}{i}": {
                "optimizer": "adamw",
                "rule": rule,
                "lr": lr,
                "residual_scale": False,
                "seed": i,
                "final_loss": loss,
                "diverged": False,
            }
            for i, loss in enumerate(losses)
        }

    results = {
        "sweep": {"optimizers": ["adamw"], "rules": ["single", "lwlr", "fan_in"]},
        "runs": {
            **runs("single", 1e-3, [3.1, 3.0, 2.9]),
            **runs("single", 3e-3, [3.5, 3.6, 3.4]),
            **runs("lwlr", 1e-3, [2.6, 2.5, 2.4]),
            **runs("fan_in", 1e-3, [3.05, 2.85, 3.0]),
        },
    }
    lines = overfit_report.rule_summary(results)
    # single's best is lr 1e-3: mean 3.0, std 0.1. lwlr: -0.5 against a standard error of sqrt(2 * 0.01 / 3) = 0.082.
    assert "| adamw | single | 0.001 | 3.0000 +- 0.1000 (3) |  |  |  |" in lines
    assert "| adamw | lwlr | 0.001 | 2.5000 +- 0.1000 (3) | -0.5000 | yes, better |  |" in lines
    # fan_in: mean 2.9667, std 0.1041; -0.0333 is within 2 standard errors (0.166).
    assert "| adamw | fan_in | 0.001 | 2.9667 +- 0.1041 (3) | -0.0333 | no |  |" in lines
    one_seed = {"sweep": results["sweep"], "runs": {**runs("single", 1e-3, [3.0]), **runs("lwlr", 1e-3, [2.0])}}
    assert (
        "| adamw | lwlr | 0.001 | 2.0000 +- 0.0000 (1) | -1.0000 | one seed: unknown |  |"
        in overfit_report.rule_summary(one_seed)
    )


def test_a_gpt2_overfit_table_sets_each_optimizer_beside_the_papers_numbers():
    from bench import overfit_report

    def run(optimizer, rule, lr, loss):
        return {
            f"{optimizer}{rule}{lr}": {
                "optimizer": optimizer,
                "rule": rule,
                "lr": lr,
                "residual_scale": False,
                "seed": 0,
                "final_loss": loss,
                "diverged": loss is None,
            }
        }

    results = {
        "sweep": {
            "model": "gpt2",
            "optimizers": ["adamw", "lion"],
            "rules": ["single", "lwlr"],
            "subset_batches": 8,
            "micro_batch_size": 8,
            "block_size": 1024,
            "steps": 300,
        },
        "runs": {
            **run("adamw", "single", 3e-4, 2.0),
            **run("adamw", "single", 6e-4, 1.6),
            **run("adamw", "lwlr", 6e-4, None),
            **run("adamw", "lwlr", 3e-4, 0.8),
            **run("lion", "single", 3e-5, 1.0),
        },
    }
    lines = overfit_report.paper_comparison(results)
    assert (
        "| adamw | 1.600 (lr 0.0006) | 0.800 (lr 0.0003) | 1.430 | 0.560 | 0.50 | 0.39 |" in lines
    )  # the best finished rate
    assert "| lion | 1.000 (lr 3e-05) |  | 0.704 | 0.179 |  | 0.25 |" in lines
    assert "| sophiag |  |  | 0.989 | 0.538 |  | 0.54 |" in lines
    assert "Beside the paper's table" in overfit_report.write_table(results, "/dev/null")
    assert "Beside the paper's table" not in overfit_report.write_table(
        {**results, "sweep": {**results["sweep"], "model": "gpt2-tiny"}}, "/dev/null"
    )


def test_depth_study_runs_one_sweep_per_depth_and_tabulates_lwlr_gain(tmp_path, token_dir):
    from bench import overfit, overfit_report

    by_depth = overfit.main(
        [
            "--preset=depth-cpu",
            f"--out_dir={tmp_path / 'depth'}",
            f"--data_dir={token_dir}",
            "--depths",
            "2",
            "4",
            "--optimizers",
            "adamw",
            "--lrs",
            "1e-3",
            "--steps=2",
            "--warmup_steps=1",
            "--micro_batch_size=2",
            "--block_size=32",
            "--lwlr_T=2",
            "--log_every=1",
            "--eval_every=2",
            "--eval_steps=1",
            "--device=cpu",
        ]
    )
    assert sorted(by_depth) == [2, 4] and by_depth[4]["sweep"]["model"] == "narrow-4"
    assert all(len(results["runs"]) == 4 for results in by_depth.values())  # 2 rules x 2 residual scalings
    table = (tmp_path / "depth" / "depth.md").read_text()
    assert "| adamw | L=2 | L=4 |" in table and "| adamw + residual 1/sqrt(L) | L=2 | L=4 |" in table
    single, lwlr = (by_depth[4]["runs"][overfit.run_key("adamw", rule, 1e-3, False, 0)] for rule in ("single", "lwlr"))
    gain = single["final_loss"] - lwlr["final_loss"]
    assert (
        "| val gain of lwlr | " in table and f"{gain:+.3f} |" in table.split("| val gain of lwlr |")[1].split("\n")[0]
    )
    assert (tmp_path / "depth" / "L2" / "table.md").exists()
    overfit_report.main(str(tmp_path / "depth"))  # redrawn from the L*/results.json files alone
    assert (tmp_path / "depth" / "depth.md").read_text() == table


def test_ablations_are_rules_with_settings_and_carry_their_measuring_cost(tmp_path, token_dir):
    from bench import overfit

    assert overfit.parse_rule("lwlr:T=10") == ("lwlr", {"lwlr_T": 10}) and overfit.parse_rule("single") == (
        "single",
        {},
    )
    with pytest.raises(ValueError, match="unknown setting 'depth'"):
        overfit.parse_rule("lwlr:depth=3")
    results = overfit.main(
        [
            "--preset=ablations-cpu",
            f"--out_dir={tmp_path / 'ablations'}",
            f"--data_dir={token_dir}",
            "--model=gpt2-tiny",
            "--rules",
            "single",
            "lwlr",
            "lwlr:T=1",
            "lwlr:power=0.25",
            "--lrs",
            "3e-3",
            "--seeds",
            "0",
            "--steps=3",
            "--warmup_steps=1",
            "--micro_batch_size=2",
            "--block_size=32",
            "--lwlr_T=4",
            "--log_every=1",
            "--eval_every=3",
            "--eval_steps=1",
            "--device=cpu",
        ]
    )
    losses = {run["rule"]: run["final_loss"] for run in results["runs"].values()}
    assert len(set(losses.values())) == 4  # each setting gives other multipliers, so another run
    assert set(results["measurement_seconds"]) == {"lwlr", "lwlr:T=1", "lwlr:power=0.25"}
    table = (tmp_path / "ablations" / "table.md").read_text()
    assert "| adamw | lwlr:T=1 | 0.003 |" in table and "| measuring, s |" in table


def test_steps_to_target_interpolates_between_evals_by_hand():
    from bench.overfit_report import first_step_at

    curve = [[50, 3.0], [100, 2.0], [150, 1.5]]
    assert first_step_at(curve, 2.5) == 75.0  # halfway from 3.0 at step 50 to 2.0 at step 100
    assert first_step_at(curve, 3.2) == 50.0  # already there at the first eval
    assert first_step_at(curve, 1.0) is None


def test_a_point_comes_out_bitwise_the_same_whatever_runs_beside_it(tmp_path, token_dir):
    from bench import overfit

    alone = overfit.main(sweep_args(tmp_path / "alone", token_dir, "--lrs", "1e-3", "3e-3", "--threads=1", "--jobs=1"))
    beside = overfit.main(
        sweep_args(tmp_path / "beside", token_dir, "--lrs", "1e-3", "3e-3", "--threads=1", "--jobs=2")
    )
    assert alone["runs"].keys() == beside["runs"].keys() and len(alone["runs"]) == 4
    for key, run in alone["runs"].items():
        other = beside["runs"][key]
        assert (run["curve"], run["final_loss"]) == (other["curve"], other["final_loss"]), key
        assert run["threads"] == other["threads"] == 1
