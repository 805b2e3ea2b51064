"""What each rank holds of a run: fp32 parameters, gradients and optimizer state (the optimizer's state
per parameter from its registry entry), under ddp or fsdp. The run's first lines say it; the table in
docs/distributed.md is printed by

    python -m training.memory
"""

from optimizers.registry import spec


def memory_per_rank(num_params: int, optimizer: str, world_size: int, mode: str) -> dict[str, float]:
    """Bytes each rank holds for fp32 parameters, gradients and optimizer state (activations aside)."""
    share = world_size if mode == "fsdp" else 1
    return {
        "parameters": 4 * num_params / share,
        "gradients": 4 * num_params / share,
        "optimizer state": 4 * num_params * spec(optimizer).state_per_parameter / share,
    }


def size_text(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def memory_line(num_params: int, optimizer: str, world_size: int, mode: str) -> str:
    sizes = memory_per_rank(num_params, optimizer, world_size, mode)
    parts = ", ".join(f"{name} {size_text(value)}" for name, value in sizes.items())
    gathered = "; plus the blocks being gathered" if mode == "fsdp" else ""
    return (
        f"memory per rank ({mode}, {world_size} ranks, fp32, before activations{gathered}): {parts}; "
        f"{size_text(sum(sizes.values()))} in all"
    )


# GPT-2's published parameter counts (vocabulary 50,257, tied head counted once).
GPT2_SIZES = {"gpt2": 124_439_808, "gpt2-medium": 354_823_168, "gpt2-large": 774_030_080, "gpt2-xl": 1_557_611_200}


def memory_table(optimizer: str = "adamw", world_sizes=(2, 4, 8)) -> str:
    """docs/distributed.md's table: fp32 parameters + gradients + optimizer state per rank, in GiB. DDP
    holds all of it on every rank at any count; fsdp a 1/N share."""
    per_rank = lambda count, n, mode: sum(memory_per_rank(count, optimizer, n, mode).values()) / 2**30  # noqa: E731
    header = " | ".join(f"fsdp, {n} GPUs" for n in world_sizes)
    rows = [f"| model | parameters | ddp, any number | {header} |", "|---|---:|---:|" + "---:|" * len(world_sizes)]
    for model, count in GPT2_SIZES.items():
        cells = [f"{per_rank(count, 1, 'ddp'):.1f}"] + [f"{per_rank(count, n, 'fsdp'):.1f}" for n in world_sizes]
        rows.append(f"| {model} | {count / 1e6:,.0f}M | {' | '.join(cells)} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(memory_table())
