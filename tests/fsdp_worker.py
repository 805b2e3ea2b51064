"""Run under torchrun by tests/test_fsdp.py: for each optimizer, the same steps of gpt2-tiny under
parallel=fsdp, under DDP on the same ranks, and (where nothing is drawn at random per rank) in one
process, all in this one launch; rank 0 writes each one's worst relative weight difference and the
optimizer state each rank holds to the JSON file given.

    torchrun --nproc_per_node=2 tests/fsdp_worker.py DATA_DIR OUT.json OPTIMIZER:BACKEND ...
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import build  # noqa: E402
import parallel  # noqa: E402
import train  # noqa: E402
from model import GPT  # noqa: E402
from parallel import local  # noqa: E402
from runtime import Runtime, init_runtime  # noqa: E402

STEPS = {"torch": 20, "triton": 4}  # Triton's interpreter takes about half a second a launch on CPU


def trainer(c, rt, scales) -> train.Trainer:
    """In float64 on the torch path, where rounding is too small to hide a missing or partial reduction:
    the sharded run must then equal the replicated one to many more digits than fp32 holds. The Triton
    kernels take fp32."""
    torch.manual_seed(c.seed)
    model = GPT(build.gpt_config(c))
    if c.optimizer_backend == "torch":
        model.double()
    return train.Trainer(c, rt, model, scales, backend=(c.optimizer_backend, "test"))


def state_tensors(state: dict) -> dict[tuple[str, str], torch.Tensor]:
    """(parameter name, state name) -> tensor of an optimizer's full state dict; Muon's holds two parts."""
    if "state" not in state:  # muon.Muon: {"muon": ..., "adamw": ...}
        return {key: t for part in state.values() if part for key, t in state_tensors(part).items()}
    names = [name for group in state["param_groups"] for name in group["names"]]
    return {(names[int(i)], key): t for i, values in state["state"].items() for key, t in values.items() if t.dim()}


def state_bytes(optimizer) -> int:
    """The optimizer state this rank holds: its shards under fsdp."""
    return sum(local(t).numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if t.dim())


def main(data_dir: str, out_path: str, cases: list[str]) -> None:
    rt = init_runtime("cpu")
    report = {}
    for case in cases:
        optimizer, backend = case.split(":")
        settings = dict(
            data_dir=data_dir,
            out_dir="unused",
            model="gpt2-tiny",
            block_size=32,
            micro_batch_size=4,
            tokens_per_step=256,  # 2 ranks x 1 micro-step, or 1 process x 2
            max_steps=STEPS[backend],
            warmup_steps=2,
            device="cpu",
            dtype="float32",
            compile="false",
            optimizer=optimizer,
            optimizer_backend=backend,
            lr=2e-3 if optimizer == "lion" else 3e-3,
            grad_clip=0.5,  # below the gradients' norm (about 1.7): the global norm acts on every step
            hess_interval=2,
            muon_ns_dtype="float32",  # bf16 Newton-Schulz would round float64's agreement away
        )
        c = train.parse_config([f"--{k}={v}" for k, v in settings.items()])
        names = [name for name, _ in GPT(build.gpt_config(c)).named_parameters()]
        scales = {name: 0.5 + (i % 5) / 4 for i, name in enumerate(names)}  # a layer-wise rate per tensor
        runs = {
            "fsdp": trainer(
                train.parse_config([f"--{k}={v}" for k, v in settings.items()] + ["--parallel=fsdp"]), rt, scales
            ),
            "ddp": trainer(c, rt, scales),
        }
        if optimizer != "sophiag" and backend == "torch":  # SophiaG samples labels per rank: one process draws others
            runs["one process"] = trainer(c, Runtime(0, 0, 1, torch.device("cpu")), scales)
        for name, run in runs.items():
            for step in range(STEPS[backend]):
                run.step(step)
        weights = {name: run.full_model() for name, run in runs.items()}
        states = {name: state_tensors(parallel.full(run.optimizer.state_dict())) for name, run in runs.items()}
        memory = {name: state_bytes(run.optimizer) for name, run in runs.items() if name != "one process"}
        if rt.is_main:
            reference = dict(weights["ddp"].named_parameters())
            compared = {  # the key biases' gradient is zero by construction: rounding noise, left out
                name: [(p, reference[key]) for key, p in model.named_parameters() if not key.endswith("k_proj.bias")]
                for name, model in weights.items()
                if name != "ddp"
            }
            report[case] = {
                "worst_relative": {
                    name: max(((p - q).abs().max() / q.abs().max()).item() for p, q in pairs)
                    for name, pairs in compared.items()
                },
                "worst_state_relative": {
                    name: max(
                        (
                            (value - states["ddp"][key]).abs().max() / states["ddp"][key].abs().max().clamp(min=1e-30)
                        ).item()
                        for key, value in state.items()
                        if not key[0].endswith("k_proj.bias")
                    )
                    for name, state in states.items()
                    if name != "ddp"
                },
                "state_bytes": memory,
            }
        assert parallel.shards(runs["fsdp"].c, rt)
    if rt.is_main:
        with open(out_path, "w") as f:
            json.dump(report, f, indent=1)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
