"""Hugging Face GPT-2 directories in and out: reading one (config.json plus model.safetensors or
pytorch_model.bin) into our GPT, and writing ours in GPT-2's own layout, which
transformers.GPT2LMHeadModel.from_pretrained loads as it is (export.py). Local directories only: no
hub access, ever; download a directory yourself first.

GPT-2's layout differs from ours in two ways: q, k and v are fused into one `c_attn` (ours are three
Linear layers, so each can carry its own learning rate), and its Conv1D stores weights as (in, out).
"""

import json
import os
import pickle

import torch

from model import GPT, PRESETS, GPTConfig
from runtime.errors import UserError


class PretrainedError(UserError):
    """A directory that is not a GPT-2 checkpoint this model can load, or a model GPT-2's format cannot hold."""


def read_config(path: str, **overrides) -> GPTConfig:
    """The GPTConfig of the GPT2LMHeadModel saved in directory `path`."""
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise PretrainedError(
            f"{config_path} not found: expected a Hugging Face GPT-2 directory (config.json and model.safetensors "
            "or pytorch_model.bin); nothing is downloaded, so download one first"
        )
    try:
        with open(config_path, "rb") as f:
            hf = json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError) as e:  # ValueError: JSON syntax and undecodable bytes alike
        raise PretrainedError(f"{config_path}: not a readable JSON file ({type(e).__name__}: {e})") from None
    if not isinstance(hf, dict):
        raise PretrainedError(f"{config_path}: expected a JSON object, as transformers writes it")
    if hf.get("model_type", "gpt2") != "gpt2":
        raise PretrainedError(f"{config_path}: model_type {hf['model_type']!r} is not gpt2")
    activation = hf.get("activation_function", "gelu_new")
    if activation not in ("gelu_new", "gelu_pytorch_tanh"):
        raise PretrainedError(f"{config_path}: activation_function {activation!r} is not GPT-2's tanh GELU")
    missing = [key for key in ("n_layer", "n_head", "n_embd") if key not in hf]
    if missing:
        raise PretrainedError(f"{config_path}: no {', '.join(missing)}, which a GPT-2 config.json holds")
    shape = {
        "block_size": hf.get("n_positions", 1024),
        "vocab_size": hf.get("vocab_size", 50257),
        "n_layer": hf["n_layer"],
        "n_head": hf["n_head"],
        "n_embd": hf["n_embd"],
    }
    wrong = [f"{key}={value!r}" for key, value in shape.items() if type(value) is not int or value < 1]
    if wrong:
        raise PretrainedError(f"{config_path}: {', '.join(wrong)} (positive whole numbers expected)")
    if shape["n_embd"] % shape["n_head"]:
        raise PretrainedError(f"{config_path}: n_embd={shape['n_embd']} is not divisible by n_head={shape['n_head']}")
    return GPTConfig(**{**shape, **overrides})


def preset_of(config: GPTConfig) -> str:
    """The model.py preset with this config's shape (layers, heads, width)."""
    for name, shape in PRESETS.items():
        if (shape["n_layer"], shape["n_head"], shape["n_embd"]) == (config.n_layer, config.n_head, config.n_embd):
            return name
    raise PretrainedError(
        f"no preset in model.py has {config.n_layer} layers, {config.n_head} heads and width {config.n_embd}; "
        "add one to model.PRESETS"
    )


def load_weights(model: GPT, path: str) -> None:
    """Directory `path`'s weights into `model`, whose shape must be the directory's; a shorter
    block_size keeps the first positions of the position embedding (nanoGPT's crop_block_size)."""
    theirs = {name.removeprefix("transformer."): tensor for name, tensor in _load_hf_state_dict(path).items()}
    positions = theirs.get("wpe.weight")
    if positions is not None and positions.shape[0] < model.config.block_size:
        raise PretrainedError(
            f"{path} covers {positions.shape[0]} positions, fewer than block_size={model.config.block_size}"
        )
    with torch.no_grad():
        for param, name, layout, slot in gpt2_layout(model):
            if name not in theirs:
                raise PretrainedError(f"{path} holds no {name}: not a GPT2LMHeadModel of config.json's shape")
            value = _ours_from_gpt2(theirs[name], layout, slot, f"{path}: {name}")
            if name == "wpe.weight":
                value = value[: model.config.block_size]
            if value.shape != param.shape:
                raise PretrainedError(
                    f"{path}: {name} is {list(value.shape)} where config.json implies {list(param.shape)}"
                )
            if not value.is_floating_point():
                raise PretrainedError(f"{path}: {name} holds {value.dtype} values, not floating-point weights")
            value = value.to(param.dtype)  # what the model holds: a float64 1e300 is inf in float32
            if not torch.isfinite(value).all():
                raise PretrainedError(
                    f"{path}: {name} holds NaN or infinite values (as {param.dtype}); a model cannot train from them"
                )
            param.copy_(value)


def from_pretrained(path: str, **overrides) -> GPT:
    """A GPT holding directory `path`'s model; overrides (dropout, block_size, ...) go to its GPTConfig."""
    model = GPT(read_config(path, **overrides))
    load_weights(model, path)
    return model


def hf_config(config: GPTConfig) -> dict:
    """config.json of the Hugging Face GPT2LMHeadModel that computes what this model computes."""
    if config.residual_scale:
        raise PretrainedError(
            "residual_scale is on: GPT-2 has no residual-branch scaling, so GPT2LMHeadModel would compute another "
            "function"
        )
    if not config.bias:
        raise PretrainedError("bias=False: GPT-2 has a bias in every Linear and LayerNorm")
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "tie_word_embeddings": True,
        "bos_token_id": 50256,
        "eos_token_id": 50256,
        "torch_dtype": "float32",
    }


def to_hf_state_dict(model: GPT) -> dict:
    """Our weights in GPT-2's own layout, as GPT2LMHeadModel names them (gpt2_layout): q, k, v fused into
    c_attn, Linear weights transposed into Conv1D's (in, out); the tied lm_head is left out (transformers
    ties it)."""
    parts: dict[str, list] = {}
    for param, name, layout, _ in gpt2_layout(model):  # q, k and v come in that order, c_attn's
        parts.setdefault(f"transformer.{name}", []).append((layout, param.detach()))
    out = {}
    for name, pieces in parts.items():
        layout = pieces[0][0]
        tensor = torch.cat([piece for _, piece in pieces])
        out[name] = (tensor.t() if layout in (CONV1D, QKV_WEIGHT) else tensor).contiguous()
    return out


# How GPT-2 (Hugging Face) stores one of our parameters: as it is, as a Conv1D weight (in, out), or as a
# third of the fused q, k, v projection (c_attn), weight or bias.
AS_IS, CONV1D, QKV_WEIGHT, QKV_BIAS = "as is", "conv1d", "qkv weight", "qkv bias"


def gpt2_layout(model: GPT):
    """(our parameter, GPT-2's name for the tensor that holds it, how it is held there, its third of c_attn)
    for every parameter of the model, read from the model's modules: ours are GPT-2's, but for q, k and v."""
    t = model.transformer
    yield t.wte.weight, "wte.weight", AS_IS, None
    yield t.wpe.weight, "wpe.weight", AS_IS, None
    for i, block in enumerate(t.h):
        prefix = f"h.{i}."
        for theirs, norm in (("ln_1", block.ln_1), ("ln_2", block.ln_2)):
            yield norm.weight, f"{prefix}{theirs}.weight", AS_IS, None
            yield norm.bias, f"{prefix}{theirs}.bias", AS_IS, None
        for slot, linear in enumerate((block.attn.q_proj, block.attn.k_proj, block.attn.v_proj)):
            yield linear.weight, f"{prefix}attn.c_attn.weight", QKV_WEIGHT, slot
            yield linear.bias, f"{prefix}attn.c_attn.bias", QKV_BIAS, slot
        linears = (("attn.c_proj", block.attn.o_proj), ("mlp.c_fc", block.mlp.c_fc), ("mlp.c_proj", block.mlp.c_proj))
        for theirs, linear in linears:
            yield linear.weight, f"{prefix}{theirs}.weight", CONV1D, None
            yield linear.bias, f"{prefix}{theirs}.bias", AS_IS, None
    yield t.ln_f.weight, "ln_f.weight", AS_IS, None
    yield t.ln_f.bias, "ln_f.bias", AS_IS, None


def weights_file(path: str) -> str:
    """The directory's weights: model.safetensors, else pytorch_model.bin."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        if os.path.isfile(os.path.join(path, name)):
            return os.path.join(path, name)
    raise PretrainedError(f"{path} holds neither model.safetensors nor pytorch_model.bin")


def _load_hf_state_dict(path: str) -> dict:
    """The weights file's tensors by name. Anything but tensors in a pytorch_model.bin (a pickle that would
    run code) is refused by weights_only, never loaded; a file that is no weights file is said as such."""
    weights = weights_file(path)
    try:
        if weights.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(weights)
        else:
            state = torch.load(weights, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [line for line in str(e).splitlines() if line.strip()]  # torch's reason is its second paragraph
        reason = lines[1] if len(lines) > 1 else lines[0] if lines else type(e).__name__
        raise PretrainedError(f"{weights}: holds more than tensors, so it is not loaded ({reason})") from None
    except Exception as e:  # noqa: BLE001 safetensors' and torch's readers raise their own kinds for a bad file
        message = (str(e).strip().splitlines() or [""])[0]
        raise PretrainedError(f"{weights}: not a readable weights file ({type(e).__name__}: {message})") from None
    if not isinstance(state, dict) or not all(torch.is_tensor(t) for t in state.values()):
        raise PretrainedError(f"{weights}: expected a state dict of tensors")
    return state


def _ours_from_gpt2(tensor: torch.Tensor, layout: str, slot: int | None, where: str) -> torch.Tensor:
    """Our parameter's value from the GPT-2 tensor that holds it (gpt2_layout); a tensor of another rank
    is a PretrainedError naming it (where), before any reshaping fails on it."""
    dims = 2 if layout in (CONV1D, QKV_WEIGHT) else 1 if layout == QKV_BIAS else tensor.dim()
    if tensor.dim() != dims or (layout in (QKV_WEIGHT, QKV_BIAS) and tensor.shape[-1] % 3):
        raise PretrainedError(f"{where} is {list(tensor.shape)}, not a tensor of GPT-2's layout for it")
    if layout == CONV1D:
        return tensor.t()
    if layout == QKV_WEIGHT:
        return tensor.t().chunk(3, dim=0)[slot]
    if layout == QKV_BIAS:
        return tensor.chunk(3, dim=0)[slot]
    return tensor
