"""The run log: console lines plus the same records as JSON lines in out_dir/log.jsonl (rank 0 only), the
layer statistics in out_dir/layers.jsonl, and wandb or tensorboard when asked for."""

import json
import os

from runtime.files import append_whole, open_for_append
from runtime.ranks import Runtime
from training.layer_stats import by_kind


class RunLog:
    """Console lines plus the same records as JSON lines in out_dir/log.jsonl (rank 0 only), and
    wandb or tensorboard when asked for."""

    def __init__(
        self,
        runtime: Runtime,
        out_dir: str,
        logger: str = "none",
        config: dict | None = None,
        project: str = "lwlr",
        echo=print,
    ):
        self.runtime, self.file, self.backend, self.echo, self.out_dir = runtime, None, None, echo, out_dir
        self.layers_file = None  # layers.jsonl, opened with the first layer record
        if not runtime.is_main:
            return
        self.file = open_for_append(os.path.join(out_dir, "log.jsonl"))
        if logger == "wandb":
            import wandb

            self.backend = wandb.init(project=project, config=config, dir=out_dir)
        elif logger == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.backend = SummaryWriter(os.path.join(out_dir, "tensorboard"))
        elif logger != "none":
            raise ValueError(f"logger={logger!r}: choose none, wandb or tensorboard")

    def record(self, kind: str, values: dict, line: str | None = None) -> None:
        if not self.runtime.is_main:
            return
        if line:
            self.echo(line)
        append_whole(self.file, (json.dumps({"kind": kind, **values}) + "\n").encode())
        step = values.get("step")
        if self.backend is not None and step is not None:
            numbers = {f"{kind}/{k}": v for k, v in values.items() if isinstance(v, (int, float)) and k != "step"}
            self._send(numbers, step)

    def layers(self, record: dict) -> None:
        """A layer statistics record (training.layer_stats): one line of out_dir/layers.jsonl, and its
        per-kind summary to wandb or tensorboard."""
        if not self.runtime.is_main:
            return
        if self.layers_file is None:
            self.layers_file = open_for_append(os.path.join(self.out_dir, "layers.jsonl"))
        append_whole(self.layers_file, (json.dumps(record, separators=(",", ":")) + "\n").encode())
        if self.backend is not None:
            self._send({f"layers/{key}": value for key, value in by_kind(record).items()}, record["step"])

    def _send(self, numbers: dict[str, float], step: int) -> None:
        if hasattr(self.backend, "add_scalar"):
            for key, value in numbers.items():
                self.backend.add_scalar(key, value, step)
        else:
            self.backend.log(numbers, step=step)

    def close(self) -> None:
        for fd in (self.file, self.layers_file):
            if fd is not None:
                os.close(fd)
        if self.backend is not None:
            getattr(self.backend, "finish", getattr(self.backend, "close", lambda: None))()
