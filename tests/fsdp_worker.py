"""Run under torchrun by tests/test_fsdp.py: for each optimizer, the same steps of gpt2-tiny under
parallel=fsdp, under DDP on the same ranks, and (where nothing is drawn at random per rank) in one
process, all in this one launch; rank 0 writes each one's worst relative weight difference, its last
step's layer statistics' against DDP's, and the optimizer state each rank holds to the JSON file given.

    torchrun --nproc_per_node=2 tests/fsdp_worker.py DATA_DIR OUT.json OPTIMIZER:BACKEND ...
"""

import copy
import json
import sys

import torch

from model import GPT
from optimizers import curvature
from runtime import fsdp
from runtime.fsdp import local
from runtime.ranks import Runtime, all_reduce_mean, init_runtime
from training import build
from training.config import parse_config
from training.layer_stats import FIGURES, LayerStats
from training.trainer import Trainer

STEPS = {"torch": 8, "triton": 3}  # LW-AS refreshes at 2, 4, 6; Triton's interpreter takes ~0.5 s a launch
LR = {"lion": 2e-3, "sgdm_lw": 1.0, "adamw_lw": 1.0}  # LW-AS: lr multiplies its own step sizes
SAMPLES_LABELS = ("sophiag", "sgdm_lw", "adamw_lw")  # curvature from labels sampled per rank


def trainer(c, rt, scales) -> Trainer:
    """In float64 on the torch path, where rounding is too small to hide a missing or partial reduction:
    the sharded run must then equal the replicated one to many more digits than fp32 holds. The Triton
    kernels take fp32."""
    torch.manual_seed(c.seed)
    model = GPT(build.gpt_config(c))
    if c.optimizer_backend == "torch":
        model.double()
    return Trainer(c, rt, model, scales, backend=(c.optimizer_backend, "test"))


def state_tensors(state: dict) -> dict[tuple[str, str], torch.Tensor]:
    """(parameter name, state name) -> tensor of an optimizer's full state dict, 0-dim ones too (LW-AS's
    step sizes); Muon's holds two parts."""
    if "state" not in state:  # muon.Muon: {"muon": ..., "adamw": ...}
        return {key: t for part in state.values() if part for key, t in state_tensors(part).items()}
    names = [name for group in state["param_groups"] for name in group["names"]]
    return {(names[int(i)], key): t for i, values in state["state"].items() for key, t in values.items()}


def worst_relative(pairs) -> float:
    """The largest max |a - b| / max |b| over (a, b) pairs, b the reference; 0 for no pairs."""
    return max((((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item() for a, b in pairs), default=0.0)


def state_bytes(optimizer) -> int:
    """The optimizer state this rank holds: its shards under fsdp."""
    return sum(local(t).numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if t.dim())


def gauss_newton_curvature_of_the_whole_batch(rt) -> dict[str, float]:
    """LW-AS's gauss_newton curvature on two ranks, each holding half of one batch, against one process
    holding all of it: the block terms N (d_l . g_hat_l)^2 count every rank's tokens in N and g_hat, and the
    joint term is the whole batch's mean, under DDP (whole model, reduce_mean) and under fsdp (shards, the
    staged JVP against one process's through the whole model). The labels are the logits' argmax instead
    of samples, so the three see the same ones."""
    sampled = curvature.sampled_label_loss
    curvature.sampled_label_loss = lambda logits: torch.nn.functional.cross_entropy(
        logits.view(-1, logits.size(-1)), logits.argmax(-1).view(-1)
    )
    try:
        return _curvatures_against_the_whole_batch(rt)
    finally:
        curvature.sampled_label_loss = sampled  # the cases after this one sample their labels


def _curvatures_against_the_whole_batch(rt) -> dict[str, float]:
    c = parse_config(["--model=gpt2-tiny", "--block_size=16", "--device=cpu"])
    torch.manual_seed(0)
    model = GPT(build.gpt_config(c)).double()
    batch = torch.randint(0, model.config.vocab_size, (4, 16))
    directions = {name: torch.randn_like(p) for name, p in model.named_parameters()}
    mine = batch.chunk(2)[rt.rank]

    def terms_of(model, x, reduce=None, sharded=False):
        params = list(model.parameters())
        names = [name for name, _ in model.named_parameters()]
        cut = [local(fsdp.shard_of(directions[n], p)) if sharded else directions[n] for n, p in zip(names, params)]
        terms = curvature.Curvature("gauss_newton", model, x, None, reduce=reduce, sharded=sharded)
        return torch.cat([terms.block_terms(params, cut), terms.joint_term(params, cut).view(1)])

    whole = terms_of(model, batch)
    replicated = terms_of(model, mine, all_reduce_mean)
    twin = copy.deepcopy(model)
    fsdp.fully_shard_model(twin, twin.transformer.h, torch.device("cpu"))
    sharded = terms_of(twin, mine, all_reduce_mean, True)
    return {
        name: ((got - whole).abs() / whole.abs()).max().item() for name, got in (("ddp", replicated), ("fsdp", sharded))
    }


def main(data_dir: str, out_path: str, cases: list[str]) -> None:
    rt = init_runtime("cpu")
    report = {}
    for case in cases:
        if case == "gauss_newton_curvature":
            report[case] = gauss_newton_curvature_of_the_whole_batch(rt)
            continue
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
            lr=LR.get(optimizer, 3e-3),
            grad_clip=0.5,  # below the gradients' norm (about 1.7): the global norm acts on every step
            hess_interval=2,
            lw_interval=2,  # LW-AS: new step sizes from the curvature on every other step, from step 2 on
            lw_warmup_steps=2,
            muon_ns_dtype="float32",  # bf16 Newton-Schulz would round float64's agreement away
        )
        c = parse_config([f"--{k}={v}" for k, v in settings.items()])
        names = [name for name, _ in GPT(build.gpt_config(c)).named_parameters()]
        scales = {name: 0.5 + (i % 5) / 4 for i, name in enumerate(names)}  # a layer-wise rate per tensor
        runs = {
            "fsdp": trainer(
                parse_config([f"--{k}={v}" for k, v in settings.items()] + ["--parallel=fsdp"]), rt, scales
            ),
            "ddp": trainer(c, rt, scales),
        }
        if optimizer not in SAMPLES_LABELS and backend == "torch":  # one process would draw other labels
            runs["one process"] = trainer(c, Runtime(0, 0, 1, torch.device("cpu")), scales)
        layer_records = {}  # the last step's layer statistics: sums over shards and ranks under fsdp
        for name, run in runs.items():
            for step in range(STEPS[backend] - 1):
                run.step(step)
            layer_records[name] = run.step(STEPS[backend] - 1, LayerStats(run.raw_model))[4]
        weights = {name: run.full_model() for name, run in runs.items()}
        states = {name: state_tensors(fsdp.full(run.optimizer.state_dict())) for name, run in runs.items()}
        memory = {name: state_bytes(run.optimizer) for name, run in runs.items() if name != "one process"}
        if rt.is_main:
            reference = dict(weights["ddp"].named_parameters())
            compared = {  # the key biases' gradient is zero by construction: rounding noise, left out
                name: [(p, reference[key]) for key, p in model.named_parameters() if not key.endswith("k_proj.bias")]
                for name, model in weights.items()
                if name != "ddp"
            }

            def against_ddp(state: dict, scalars: bool) -> float:
                return worst_relative(
                    (value, states["ddp"][key])
                    for key, value in state.items()
                    if not key[0].endswith("k_proj.bias") and (value.dim() == 0) == scalars
                )

            others = {name: state for name, state in states.items() if name != "ddp"}

            def layer_stats_against_ddp(record: dict) -> float:
                reference = layer_records["ddp"]
                return max(
                    abs(got - want) / max(abs(want), 1e-30)
                    for figure in FIGURES
                    for tensor, got, want in zip(record["names"], record[figure], reference[figure])
                    if not tensor.endswith("k_proj.bias")
                )

            report[case] = {
                "worst_relative": {name: worst_relative(pairs) for name, pairs in compared.items()},
                "worst_state_relative": {name: against_ddp(state, False) for name, state in others.items()},
                # LW-AS's step sizes and curvature averages: float32 scalars, whatever the weights' dtype
                "worst_scalar_state_relative": {name: against_ddp(state, True) for name, state in others.items()},
                "state_bytes": memory,
                "worst_layer_stats_relative": {
                    name: layer_stats_against_ddp(record) for name, record in layer_records.items() if name != "ddp"
                },
            }
        assert build.shards(runs["fsdp"].c, rt)
    if rt.is_main:
        with open(out_path, "w") as f:
            json.dump(report, f, indent=1)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
