"""What the benchmark scripts share: device synchronization and where results are written."""

import os

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so a wall-clock timer measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def results_base(out_dir: str, kind: str, device_name: str) -> str:
    """out_dir/<kind>-<device slug>: the path of a result file, without its extension."""
    os.makedirs(out_dir, exist_ok=True)
    slug = "".join(ch if ch.isalnum() else "-" for ch in device_name.lower()).strip("-")
    return os.path.join(out_dir, f"{kind}-{slug}")
