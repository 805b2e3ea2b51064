"""model.linear_cross_entropy, the chunked output layer and loss, against F.cross_entropy on the full
logits: values and gradients, odd sizes (rows not a multiple of the chunk, a vocabulary not a multiple of
64), ignored targets, and the GPT forward that uses it."""

import pytest
import torch
import torch.nn.functional as F

from conftest import TEST_DEVICE
from model import GPT, GPTConfig, linear_cross_entropy


def reference_and_ours(rows, width, vocab, chunk_rows, ignored=(), dtype=torch.float64):
    generator = torch.Generator().manual_seed(rows * vocab)
    hidden = torch.randn(rows, width, generator=generator, dtype=dtype)
    weight = torch.randn(vocab, width, generator=generator, dtype=dtype) * 0.3
    targets = torch.randint(0, vocab, (rows,), generator=generator)
    targets[list(ignored)] = -1
    hidden, weight, targets = hidden.to(TEST_DEVICE), weight.to(TEST_DEVICE), targets.to(TEST_DEVICE)
    results = []
    for compute in (
        lambda h, w: F.cross_entropy(h @ w.t(), targets, ignore_index=-1),
        lambda h, w: linear_cross_entropy(h, w, targets, chunk_rows),
    ):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = compute(h, w)
        (3.0 * loss).backward()  # a gradient that is not 1 reaches backward
        results.append((loss.detach(), h.grad, w.grad))
    return results


@pytest.mark.parametrize(
    "rows, vocab, chunk_rows, ignored",
    [
        (37, 101, 8, ()),  # 5 chunks, the last of 5 rows; 101 padded to 128
        (64, 128, 64, ()),  # one chunk, no padding
        (1, 7, 4, ()),  # a single row
        (50, 257, 16, (0, 17, 49)),  # ignored targets leave the mean and gradients of the others
    ],
)
def test_values_and_gradients_equal_the_full_logits_loss(rows, vocab, chunk_rows, ignored):
    (loss, grad_h, grad_w), (our_loss, our_grad_h, our_grad_w) = reference_and_ours(
        rows, 24, vocab, chunk_rows, ignored
    )
    torch.testing.assert_close(our_loss, loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(our_grad_h, grad_h, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(our_grad_w, grad_w, rtol=1e-10, atol=1e-12)


def test_fp32_on_gpt2_shapes_agrees_to_rounding():
    (loss, grad_h, grad_w), (our_loss, our_grad_h, our_grad_w) = reference_and_ours(
        200, 64, 50257, 128, dtype=torch.float32
    )
    torch.testing.assert_close(our_loss, loss, rtol=1e-6, atol=0)
    for ours, reference in ((our_grad_h, grad_h), (our_grad_w, grad_w)):  # fp32 rounding, relative to the largest entry
        torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5 * reference.abs().max().item())


def test_without_gradients_only_the_loss_is_computed():
    hidden, weight, targets = torch.randn(10, 8), torch.randn(13, 8), torch.randint(0, 13, (10,))
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, targets, 3)
    torch.testing.assert_close(loss, F.cross_entropy(hidden @ weight.t(), targets), rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="chunk_rows=0"):
        linear_cross_entropy(hidden, weight, targets, 0)


def test_gpt_with_chunked_loss_trains_like_the_full_logits_model():
    """Same init, same batch: loss and every parameter's gradient (the tied wte / lm_head included) agree."""
    models = []
    for chunk_rows in (0, 7):
        torch.manual_seed(0)
        models.append(GPT(GPTConfig.from_preset("gpt2-tiny", vocab_size=1000, loss_chunk_rows=chunk_rows)))
    models = [model.to(TEST_DEVICE) for model in models]
    idx = torch.randint(0, 1000, (3, 17)).to(TEST_DEVICE)
    (plain_logits, plain_loss), (no_logits, chunked_loss) = (model(idx[:, :-1], idx[:, 1:]) for model in models)
    assert plain_logits is not None and no_logits is None  # the chunked forward never builds the logits
    torch.testing.assert_close(chunked_loss, plain_loss, rtol=1e-6, atol=0)
    plain_loss.backward(), chunked_loss.backward()
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-7, msg=name)


def test_under_bf16_autocast_the_loss_and_its_log_softmax_stay_fp32():
    """bf16 matmuls, fp32 everything after them: the loss equals fp32 cross-entropy over the bf16 logits."""
    hidden, weight = torch.randn(37, 24), torch.randn(101, 24, requires_grad=True)
    targets = torch.randint(0, 101, (37,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(hidden, weight, targets, 8)
    assert loss.dtype == torch.float32
    logits = (hidden.bfloat16() @ weight.detach().bfloat16().t()).float()
    torch.testing.assert_close(loss, F.cross_entropy(logits, targets), rtol=1e-6, atol=0)
    loss.backward()
    assert weight.grad.dtype == torch.float32
