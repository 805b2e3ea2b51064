"""Hugging Face GPT-2 directories in and out: reading one (config.json plus model.safetensors or
pytorch_model.bin) into our GPT, and writing ours in GPT-2's own layout, which
transformers.GPT2LMHeadModel.from_pretrained loads as it is (export.py). Local directories only: no
hub access, ever; download a directory yourself first.

GPT-2's layout differs from ours in two ways: q, k and v are fused into one `c_attn` (ours are three
Linear layers, so each can carry its own learning rate), and its Conv1D stores weights as (in, out).
"""

import json
import os

import torch

from errors import UserError
from model import GPT, PRESETS, GPTConfig


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
    with open(config_path) as f:
        hf = json.load(f)
    if hf.get("model_type", "gpt2") != "gpt2":
        raise PretrainedError(f"{config_path}: model_type {hf['model_type']!r} is not gpt2")
    activation = hf.get("activation_function", "gelu_new")
    if activation not in ("gelu_new", "gelu_pytorch_tanh"):
        raise PretrainedError(f"{config_path}: activation_function {activation!r} is not GPT-2's tanh GELU")
    return GPTConfig(
        **{
            "block_size": hf.get("n_positions", 1024),
            "vocab_size": hf.get("vocab_size", 50257),
            "n_layer": hf["n_layer"],
            "n_head": hf["n_head"],
            "n_embd": hf["n_embd"],
            **overrides,
        }
    )


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
    state = _convert_hf_state_dict(_load_hf_state_dict(path), model.config.n_layer)
    positions = state["transformer.wpe.weight"]
    if positions.shape[0] < model.config.block_size:
        raise PretrainedError(
            f"{path} covers {positions.shape[0]} positions, fewer than block_size={model.config.block_size}"
        )
    state["transformer.wpe.weight"] = positions[: model.config.block_size]
    model.load_state_dict(state, strict=True)


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
    """Our weights in GPT-2's own layout, the inverse of _convert_hf_state_dict: q, k, v fused into c_attn,
    Linear weights transposed into Conv1D's (in, out); the tied lm_head is left out (transformers ties it)."""
    ours = model.state_dict()
    out = {
        f"transformer.{name}": ours[f"transformer.{name}"]
        for name in ("wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias")
    }
    for i in range(model.config.n_layer):
        hf_block, block = f"transformer.h.{i}.", f"transformer.h.{i}."
        for ln in ("ln_1", "ln_2"):
            out[hf_block + ln + ".weight"], out[hf_block + ln + ".bias"] = (
                ours[block + ln + ".weight"],
                ours[block + ln + ".bias"],
            )
        qkv = ("q_proj", "k_proj", "v_proj")
        out[hf_block + "attn.c_attn.weight"] = torch.cat([ours[f"{block}attn.{n}.weight"] for n in qkv]).t()
        out[hf_block + "attn.c_attn.bias"] = torch.cat([ours[f"{block}attn.{n}.bias"] for n in qkv])
        for theirs, mine in (("attn.c_proj", "attn.o_proj"), ("mlp.c_fc", "mlp.c_fc"), ("mlp.c_proj", "mlp.c_proj")):
            out[f"{hf_block}{theirs}.weight"] = ours[f"{block}{mine}.weight"].t()
            out[f"{hf_block}{theirs}.bias"] = ours[f"{block}{mine}.bias"]
    return {name: tensor.detach().contiguous() for name, tensor in out.items()}


def weights_file(path: str) -> str:
    """The directory's weights: model.safetensors, else pytorch_model.bin."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        if os.path.isfile(os.path.join(path, name)):
            return os.path.join(path, name)
    raise PretrainedError(f"{path} holds neither model.safetensors nor pytorch_model.bin")


def _load_hf_state_dict(path: str) -> dict:
    weights = weights_file(path)
    if weights.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(weights)
    return torch.load(weights, map_location="cpu", weights_only=True)


def _convert_hf_state_dict(hf_state: dict, n_layer: int) -> dict:
    """HF GPT-2 names and layout -> ours. HF's Conv1D stores weights as (in, out): transpose them;
    its fused c_attn (C, 3C) splits into q, k, v."""
    hf_state = {k.removeprefix("transformer."): v for k, v in hf_state.items()}
    out = {
        "transformer.wte.weight": hf_state["wte.weight"],
        "transformer.wpe.weight": hf_state["wpe.weight"],
        "transformer.ln_f.weight": hf_state["ln_f.weight"],
        "transformer.ln_f.bias": hf_state["ln_f.bias"],
        "lm_head.weight": hf_state["wte.weight"],
    }
    for i in range(n_layer):
        hf_block, block = f"h.{i}.", f"transformer.h.{i}."
        for ln in ("ln_1", "ln_2"):
            out[block + ln + ".weight"] = hf_state[hf_block + ln + ".weight"]
            out[block + ln + ".bias"] = hf_state[hf_block + ln + ".bias"]
        q, k, v = hf_state[hf_block + "attn.c_attn.weight"].t().chunk(3, dim=0)
        qb, kb, vb = hf_state[hf_block + "attn.c_attn.bias"].chunk(3, dim=0)
        for name, weight, bias in (("q_proj", q, qb), ("k_proj", k, kb), ("v_proj", v, vb)):
            out[f"{block}attn.{name}.weight"] = weight.contiguous()
            out[f"{block}attn.{name}.bias"] = bias
        for ours, theirs in (("attn.o_proj", "attn.c_proj"), ("mlp.c_fc", "mlp.c_fc"), ("mlp.c_proj", "mlp.c_proj")):
            out[f"{block}{ours}.weight"] = hf_state[f"{hf_block}{theirs}.weight"].t().contiguous()
            out[f"{block}{ours}.bias"] = hf_state[f"{hf_block}{theirs}.bias"]
    return out
