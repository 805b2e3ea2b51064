import copy
import math

import pytest
import torch

from model import GPT, PRESETS, GPTConfig, init_weights
from training import hf

GPT2_COUNTS = {"gpt2": 124_439_808, "gpt2-medium": 354_823_168, "gpt2-large": 774_030_080, "gpt2-xl": 1_557_611_200}


@pytest.mark.parametrize("preset", GPT2_COUNTS)
def test_parameter_counts_match_gpt2(preset):
    with torch.device("meta"):
        model = GPT(GPTConfig.from_preset(preset))
    assert model.num_params() == GPT2_COUNTS[preset]


def test_unknown_preset_and_override_are_rejected():
    with pytest.raises(ValueError, match="unknown model preset 'gpt3'"):
        GPTConfig.from_preset("gpt3")
    with pytest.raises(ValueError, match="n_layers"):
        GPTConfig.from_preset("gpt2", n_layers=3)


def tiny(**overrides):
    torch.manual_seed(0)
    return GPT(GPTConfig.from_preset("gpt2-tiny", **overrides)).eval()


def test_q_k_v_are_separate_parameters_and_the_tie_survives_copies_and_loads():
    """lwlr measures on a deep copy and resumes load a state dict: a tie lost there would give the head
    and the embedding separate multipliers and updates."""
    model = tiny()
    names = dict(model.named_parameters())
    for part in ("q_proj", "k_proj", "v_proj"):
        assert f"transformer.h.0.attn.{part}.weight" in names
    copied = copy.deepcopy(model)
    copied.load_state_dict(tiny(residual_scale=True).state_dict())
    assert copied.lm_head.weight is copied.transformer.wte.weight and "lm_head.weight" not in dict(
        copied.named_parameters()
    )


def test_the_model_keys_help_names_every_preset():
    """training/config.py cannot import model.py (torch): its help lists the presets by hand."""
    from training.config import FIELDS

    said = FIELDS["model"].metadata["help"]
    for name in PRESETS:
        assert (name if not name.startswith("narrow-") else "narrow-N") in said, name


def test_causality_future_tokens_do_not_change_past_logits():
    model = tiny()
    idx = torch.randint(0, 50257, (2, 20))
    changed = idx.clone()
    changed[:, 12:] = torch.randint(0, 50257, (2, 8))
    logits, _ = model(idx)
    logits_changed, _ = model(changed)
    torch.testing.assert_close(logits[:, :12], logits_changed[:, :12], rtol=0, atol=0)
    assert not torch.allclose(logits[:, 12:], logits_changed[:, 12:])


def test_loss_at_init_is_near_uniform():
    model = tiny()
    idx, targets = torch.randint(0, 50257, (2, 4, 64))  # targets independent of the inputs
    _, loss = model(idx, targets)
    assert abs(loss.item() - math.log(50257)) < 0.1


def test_residual_scale_multiplies_both_branches():
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("gpt2-tiny", n_layer=4, residual_scale=True)).eval()
    block = model.transformer.h[0]
    assert block.residual_beta == 0.5  # 1 / sqrt(4)
    x = torch.randn(2, 8, 32)
    h = x + 0.5 * block.attn(block.ln_1(x))
    torch.testing.assert_close(block(x), h + 0.5 * block.mlp(block.ln_2(h)))


@pytest.mark.parametrize("scheme", ["gpt2", "fan_out", "fan_in"])
def test_init_schemes(scheme):
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("gpt2-tiny", n_embd=64, n_head=2))
    init_weights(model, scheme)
    params = dict(model.named_parameters())
    q = params["transformer.h.0.attn.q_proj.weight"]  # (64, 64)
    fc = params["transformer.h.0.mlp.c_fc.weight"]  # (256, 64): fan_out 256, fan_in 64
    o = params["transformer.h.0.attn.o_proj.weight"]
    expected_fc = {"gpt2": 0.02, "fan_out": 256**-0.5, "fan_in": 64**-0.5}[scheme]
    assert fc.std().item() == pytest.approx(expected_fc, rel=0.05)
    if scheme == "gpt2":
        assert o.std().item() == pytest.approx(0.02 / math.sqrt(2 * 2), rel=0.05)
        assert q.std().item() == pytest.approx(0.02, rel=0.05)
    else:
        assert torch.count_nonzero(params["transformer.wpe.weight"]) == 0  # position embedding as a bias
    assert torch.count_nonzero(params["transformer.h.0.attn.q_proj.bias"]) == 0
    assert torch.all(params["transformer.ln_f.weight"] == 1)
    with pytest.raises(ValueError, match="unknown init scheme"):
        init_weights(model, "xavier")


@pytest.mark.parametrize("safe_serialization", [True, False])
def test_logits_match_transformers_gpt2(tmp_path, safe_serialization):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    theirs = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=128, vocab_size=50257)).eval()
    theirs.save_pretrained(tmp_path, safe_serialization=safe_serialization)
    ours = hf.from_pretrained(str(tmp_path)).eval()
    idx = torch.randint(0, 50257, (2, 40))
    with torch.no_grad():
        expected = theirs(idx).logits
        logits, _ = ours(idx)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)


def test_from_pretrained_names_a_missing_directory(tmp_path):
    with pytest.raises(hf.PretrainedError, match="config.json"):
        hf.from_pretrained(str(tmp_path))


def test_greedy_generation_takes_the_argmax_of_the_full_forward_at_each_prefix_past_block_size():
    model = tiny().eval()
    block = model.config.block_size
    idx = torch.randint(0, 50257, (2, 5))
    out = model.generate(idx, block + 3, temperature=0)  # the context window slides for the last tokens
    assert out.shape == (2, 5 + block + 3) and torch.equal(out[:, :5], idx)
    with torch.no_grad():
        for t in range(5, out.shape[1]):
            logits, _ = model(
                out[:, :t][:, -block:]
            )  # every position's logits, as before generate needed only the last
            assert torch.equal(out[:, t], logits[:, -1].argmax(dim=-1)), t
    assert model.generate(idx, 3, top_k=5).shape == (2, 8)


def test_a_tiny_batch_overfits():
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("gpt2-tiny", vocab_size=512))  # a small vocab keeps it fast
    idx = torch.randint(0, 512, (2, 32))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(250):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert loss.item() < 0.05


def test_every_parameter_has_the_role_its_name_says():
    from model import ParamRole, param_role

    expected = {  # by hand, for a 2-block model
        "transformer.wte.weight": ParamRole("embedding", False, None),
        "transformer.wpe.weight": ParamRole("position", False, None),
        "transformer.h.1.attn.q_proj.weight": ParamRole("q", False, 1),
        "transformer.h.0.attn.k_proj.bias": ParamRole("k", True, 0),
        "transformer.h.0.attn.v_proj.weight": ParamRole("v", False, 0),
        "transformer.h.1.attn.o_proj.bias": ParamRole("attn_out", True, 1),
        "transformer.h.0.mlp.c_fc.weight": ParamRole("mlp_in", False, 0),
        "transformer.h.1.mlp.c_proj.weight": ParamRole("mlp_out", False, 1),
        "transformer.h.0.ln_1.weight": ParamRole("layernorm", False, 0),
        "transformer.h.1.ln_2.bias": ParamRole("layernorm", True, 1),
        "transformer.ln_f.weight": ParamRole("layernorm", False, None),
    }
    names = {name for name, _ in GPT(GPTConfig.from_preset("gpt2-tiny")).named_parameters()}
    assert set(expected) <= names
    assert {name: param_role(name) for name in expected} == expected
    assert all(param_role(name) for name in names)  # every parameter has one
    assert param_role("transformer.h.0.mlp.gate.weight") == ParamRole("other", False, 0)  # a module GPT does not have


def causal_attention_by_hand(q, k, v):  # float64: softmax(q k^T / sqrt(hs) + causal mask) v
    q, k, v = q.double(), k.double(), v.double()
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.size(-1))
    T = q.size(-2)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return scores.softmax(-1) @ v


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_causal_attention_equals_the_formula_and_bf16_on_a_cpu_takes_sdpa_math(dtype):
    from torch.profiler import ProfilerActivity, profile

    from model import causal_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 16, 32, generator=g).to(dtype).requires_grad_() for _ in range(3))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        y = causal_attention(q, k, v, 0.0)
        y.float().square().sum().backward()
    ops = {e.key for e in prof.key_averages()}
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2  # bf16 keeps 8 bits of mantissa
    assert torch.allclose(y.double(), causal_attention_by_hand(q, k, v), atol=tolerance, rtol=tolerance)
    if dtype == torch.bfloat16:  # the math backend, which the compiled bf16 step runs faster on a CPU
        assert "aten::_scaled_dot_product_attention_math" in ops
        assert not any("flash" in op for op in ops), sorted(op for op in ops if "flash" in op)
