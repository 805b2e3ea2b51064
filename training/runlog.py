"""The run log: console lines plus the same records as JSON lines in out_dir/log.jsonl (rank 0 only), and
wandb or tensorboard when asked for."""

import json
import os

from runtime.files import append_whole, open_for_append
from runtime.ranks import Runtime


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
        self.runtime, self.file, self.backend, self.echo = runtime, None, None, echo
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
            if hasattr(self.backend, "add_scalar"):
                for key, value in numbers.items():
                    self.backend.add_scalar(key, value, step)
            else:
                self.backend.log(numbers, step=step)

    def close(self) -> None:
        if self.file is not None:
            os.close(self.file)
        if self.backend is not None:
            getattr(self.backend, "finish", getattr(self.backend, "close", lambda: None))()
