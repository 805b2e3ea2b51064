"""How a torchrun run spreads its model over the ranks: parallel=ddp or parallel=fsdp.

    ddp   DistributedDataParallel: every rank holds the whole model, its gradients and its optimizer state,
          and gradients are all-reduced.
    fsdp  FSDP2 (torch.distributed.fsdp.fully_shard, torchtitan's engine): each transformer block, then the
          root, is sharded along dim 0, so each rank holds 1/N of every parameter, gradient and optimizer
          state; a block's weights are all-gathered for its forward and backward and its gradients
          reduce-scattered. On CUDA the gathered weights compute in bf16 and gradients reduce in fp32 over
          fp32 master weights; on CPU everything stays fp32.

The optimizers step on each rank's shards (local()): elementwise updates need nothing more; a statistic
over a whole tensor sums its shards' parts over the ranks (sum_over_shards). A
checkpoint under fsdp holds each rank's shards (training/sharded.py) and reads back as full tensors, so a run
saved under one mode and world size resumes under any other (shard_optimizer_state cuts a rank's shard back out
of them); full() gathers the whole model for the export.
"""

import contextlib

import torch
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor


def fully_shard_model(
    model: torch.nn.Module, units, device: torch.device, compile_units: bool = False
) -> torch.nn.Module:
    """Each of units (GPT's transformer blocks) its own FSDP unit (one all-gather in flight at a time,
    prefetched), then the root, which holds the rest (GPT's embeddings, tied output layer and last
    LayerNorm). compile_units compiles each unit's forward (torchtitan's way: the all-gathers and
    reduce-scatters stay outside the graphs)."""
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if device.type == "cuda"
        else MixedPrecisionPolicy()
    )
    for unit in units:
        if compile_units:
            unit.compile()
        fully_shard(unit, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


@contextlib.contextmanager
def gradient_sync(model, sync: bool):
    """fsdp's no_sync, for the micro-steps before an accumulation's last: gradients accumulate unsharded
    (in fp32) and unreduced, and the gathered weights stay gathered after the backward, so the next
    micro-step's forward all-gathers nothing. One reduce-scatter and one all-gather per block a step saved
    per extra micro-step, for the unsharded weights and gradients held in between."""
    model.set_requires_gradient_sync(sync)
    model.set_reshard_after_backward(sync)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)
        model.set_reshard_after_backward(True)


def full(value, keep: bool = True):
    """A state dict with every DTensor gathered into a full CPU tensor, one at a time (a collective: every
    rank calls it, in the same order, which a state dict's order gives); other values as they are. A rank
    that does not keep them (not the one that writes) gets None for each. A tensor under several names is
    gathered once and every name gets the same full tensor."""
    gathered = {}

    def gather(item):
        if isinstance(item, DTensor):
            if id(item) not in gathered:
                whole_tensor = item.full_tensor().detach()
                gathered[id(item)] = whole_tensor.cpu() if keep else None
            return gathered[id(item)]
        if isinstance(item, dict):
            return {key: gather(inner) for key, inner in item.items()}
        if isinstance(item, list):
            return [gather(inner) for inner in item]
        return item

    return gather(value)


def full_model_state(model: torch.nn.Module, keep: bool = True) -> dict:
    """The model's state dict gathered (full), its parameters themselves as the keys' values, so the tied
    wte / lm_head is gathered once and held once, under both names, as an unsharded state dict holds it
    (a checkpoint stores it once)."""
    return full(model.state_dict(keep_vars=True), keep)


def local(t: torch.Tensor) -> torch.Tensor:
    """The part of a tensor this rank holds: a DTensor's local shard, which shares its storage, so an
    in-place update of it updates the parameter; any other tensor as it is. The optimizers step on these:
    an elementwise step on every shard is the step on the whole tensor."""
    return t.to_local() if isinstance(t, DTensor) else t


def whole(t: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
    """The whole of a tensor on every rank, on its device (a collective): a DTensor gathered; a local shard
    of a tensor laid out as `like` (a sharded parameter: an optimizer's update direction) gathered as that
    parameter would be; any other tensor as it is."""
    if isinstance(like, DTensor) and not isinstance(t, DTensor):
        t = DTensor.from_local(
            t, like.device_mesh, like.placements, run_check=False, shape=like.shape, stride=like.stride()
        )
    return t.full_tensor() if isinstance(t, DTensor) else t


def sum_over_shards(partial_sums: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    """Sums over this rank's shards of `params` (a value per tensor, or per block of one), summed over the
    ranks in place: each a sum over the whole tensor, the same on every rank. Whole parameters: as they are."""
    sharded = next((p for p in params if isinstance(p, DTensor)), None)
    if sharded is not None:
        torch.distributed.all_reduce(partial_sums, group=sharded.device_mesh.get_group())
    return partial_sums


def shard_rows(p: torch.Tensor) -> range:
    """The rows (dim 0) of the whole tensor this rank's shard holds: torch.chunk's pieces, one per rank,
    ceil(rows / ranks) each, the last ones shorter or empty, as fully_shard cuts; all of them unsharded."""
    rows = p.shape[0]
    if not isinstance(p, DTensor):
        return range(rows)
    (placement,) = p.placements
    assert placement.is_shard(0), placement  # fully_shard's layout, the only one made here
    per_rank = -(-rows // p.device_mesh.size())
    first = min(p.device_mesh.get_local_rank() * per_rank, rows)
    return range(first, min(first + per_rank, rows))


def shard_of(full_tensor: torch.Tensor, like: DTensor) -> DTensor:
    """This rank's shard of a full tensor, laid out as `like` (a sharded parameter) is."""
    mesh, rows = like.device_mesh, shard_rows(like)
    local_rows = full_tensor.narrow(0, rows.start, len(rows))
    expected = like.to_local().shape
    if local_rows.shape != expected:  # an internal invariant: fully_shard cut another way than torch.chunk
        raise AssertionError(
            f"shard of {tuple(full_tensor.shape)} came out {tuple(local_rows.shape)}, not {tuple(expected)}"
        )
    return DTensor.from_local(
        local_rows.to(like.device, like.dtype).contiguous(),
        mesh,
        like.placements,
        run_check=False,
        shape=like.shape,
        stride=like.stride(),
    )


def shard_optimizer_state(state: dict, optimizer: torch.optim.Optimizer) -> dict:
    """A full optimizer state dict (as every checkpoint holds) with each tensor shaped like its parameter
    cut to this rank's shard, ready for optimizer.load_state_dict. An optimizer of parts (muon.Muon:
    {"muon": ..., "adamw": ...}) has each part's state dict cut by that part."""
    if "state" not in state:
        return {name: part and shard_optimizer_state(part, getattr(optimizer, name)) for name, part in state.items()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    sharded = {}
    for index, values in state["state"].items():
        p = params[int(index)]
        sharded[index] = {
            name: shard_of(v, p) if isinstance(p, DTensor) and torch.is_tensor(v) and v.shape == p.shape else v
            for name, v in values.items()
        }
    return {**state, "state": sharded}
