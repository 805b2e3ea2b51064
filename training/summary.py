"""The end of a run's story: one block saying what it did (steps, time by phase, throughput, the final
and the best val loss, where the checkpoint and the model are) and out_dir/summary.json holding the
same figures, on every device. The val losses come from log.jsonl, so a run resumed any number of times
reports its whole history."""

import json
import os
import statistics

from runtime.files import write_json
from runtime.progress import duration
from training import checkpoint


def records(out_dir: str, kind: str) -> list[dict]:
    """The log's records of one kind, in order ("train", "eval", ...)."""
    path = os.path.join(out_dir, "log.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [record for record in map(json.loads, f) if record.get("kind") == kind]


def summarize(c, first_step: int, last_step: int, seconds: dict[str, float], run_id: str | None) -> dict:
    """The figures of a finished run: seconds by phase (this process's), the steps' tokens/s (the median
    log interval of this process's steps), and the val losses of the whole run."""
    evals = [(r["step"], r["val_loss"]) for r in records(c.out_dir, "eval")]
    intervals = [r["tokens_per_s"] for r in records(c.out_dir, "train") if r["step"] > first_step]
    best = min(evals, key=lambda e: e[1]) if evals else None
    own = checkpoint.own_steps(c.out_dir, run_id)
    return {
        "steps": {"from": first_step, "to": last_step},
        "seconds": {**seconds, "total": sum(seconds.values())},
        "tokens_per_s": statistics.median(intervals) if intervals else None,
        "final_val_loss": {"step": evals[-1][0], "value": evals[-1][1]} if evals else None,
        "best_val_loss": {"step": best[0], "value": best[1]} if best else None,
        "checkpoint": checkpoint.step_dir(c.out_dir, own[0]) if own else None,
        "model": os.path.join(c.out_dir, "model.safetensors"),
    }


def block(summary: dict) -> str:
    """The summary as the run's last lines."""
    steps, seconds = summary["steps"], summary["seconds"]
    phases = ", ".join(f"{name} {duration(s)}" for name, s in seconds.items() if name != "total" and s > 0)
    rate = f" | {summary['tokens_per_s']:,.0f} tok/s" if summary["tokens_per_s"] else ""
    lines = [f"done: steps {steps['from']} to {steps['to']} in {duration(seconds['total'])} ({phases}){rate}"]
    final, best = summary["final_val_loss"], summary["best_val_loss"]
    if final:
        lines.append(
            f"val loss: {final['value']:.4f} at step {final['step']} (final), best {best['value']:.4f} at step "
            f"{best['step']}"
        )
    lines.append(
        f"checkpoint: {summary['checkpoint']} | model: {summary['model']} | "
        f"summary: {os.path.join(os.path.dirname(summary['model']), 'summary.json')}"
    )
    return "\n".join(lines)


def write(out_dir: str, summary: dict) -> None:
    write_json(os.path.join(out_dir, "summary.json"), summary)
