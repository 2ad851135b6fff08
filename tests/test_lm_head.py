"""The LM head at labelled positions only (``pipeline/lm_head.py``): the model's own log-probs on every path, and the
chunked head's loss and gradients equal autograd's through the whole (positions x vocabulary) logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import build_tiny_model
from peft import LoraConfig, get_peft_model

from pipeline import lm_head
from pipeline.lm_head import TrainedTokenRows, decoder_and_head, head_log_probs, labelled_log_probs, logits_log_probs


class _Wrapper(torch.nn.Module):
    """Stands for a DDP / FSDP wrapper: only its own forward may run (it hooks the gradient sync in there)."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, **inputs):
        return self.module(**inputs)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_labelled_log_probs_are_the_models_own_on_every_path(tmp_path, arch):
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(build_tiny_model(tmp_path, arch)),
                           LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False))
    ids = torch.randint(4, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    labelled = torch.zeros(2, 8, dtype=torch.bool)
    labelled[0, 1:4], labelled[1, 3:8] = True, True
    targets = ids[:, 1:][labelled]
    with torch.no_grad():
        logps = F.log_softmax(model(input_ids=ids).logits[:, :-1][labelled].float(), dim=-1)
        expected = logps.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        entropy = -(logps.exp() * logps).sum(-1)
        assert decoder_and_head(_Wrapper(model)) is None  # a wrapper runs its forward (the rows' union path)
        for path in (model, model.get_base_model(), _Wrapper(model)):
            _, scored = labelled_log_probs(path, {"input_ids": ids}, labelled, targets, statistics=True)
            torch.testing.assert_close(scored["logp"], expected)
            torch.testing.assert_close(scored["entropy"], entropy)
            assert torch.equal(scored["is_top1"], logps.argmax(-1) == targets)
    assert decoder_and_head(model) is not None and decoder_and_head(model.get_base_model()) is not None


@pytest.mark.parametrize("chunk", [1, 3, 64])
@pytest.mark.parametrize("trained_rows", [False, True], ids=["plain-head", "trained-rows"])
def test_chunked_head_gives_autograds_values_and_gradients(chunk, trained_rows):
    generator = torch.Generator().manual_seed(0)
    vocabulary, width, count = 50, 8, 11
    weight = torch.randn(vocabulary, width, generator=generator)
    hidden = torch.randn(count, width, generator=generator, requires_grad=True)
    targets = torch.randint(0, vocabulary, (count,), generator=generator)
    rows = torch.tensor([3, 17]) if trained_rows else None
    delta = torch.randn(2, width, generator=generator, requires_grad=True) if trained_rows else None
    if trained_rows:
        targets[:3] = rows[0]  # the trained rows are targets too
    upstream = torch.randn(count, generator=generator)  # a per-position weighting, as DPO's sums give

    def reference():
        effective = weight.index_copy(0, rows, delta) if trained_rows else weight
        logps = F.log_softmax(F.linear(hidden, effective), dim=-1)
        return logps.gather(-1, targets.unsqueeze(-1)).squeeze(-1), logps

    expected, logps = reference()
    (expected * upstream).sum().backward()
    grads = [hidden.grad.clone()] + ([delta.grad.clone()] if trained_rows else [])
    hidden.grad = None
    if trained_rows:
        delta.grad = None
    scored = head_log_probs(hidden, targets, weight, rows, delta, statistics=True, chunk=chunk)
    (scored["logp"] * upstream).sum().backward()
    torch.testing.assert_close(scored["logp"], expected.detach())
    torch.testing.assert_close(hidden.grad, grads[0])
    if trained_rows:
        assert delta.grad.abs().sum() > 0
        torch.testing.assert_close(delta.grad, grads[1])
    torch.testing.assert_close(scored["entropy"], -(logps.exp() * logps).sum(-1).detach())
    assert torch.equal(scored["is_top1"], logps.argmax(-1) == targets)


def test_trained_rows_in_bf16_get_the_same_logits_as_index_add_without_a_whole_chunk_copy():
    # the trained rows' columns are corrected alone: index_add_ on a bf16 chunk accumulated through a float32 copy
    # of all of it (128 MB a chunk on gemma-3-270m) to give these same values
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(300, 16, generator=generator).to(torch.bfloat16)
    hidden = torch.randn(9, 16, generator=generator).to(torch.bfloat16).requires_grad_()
    rows = torch.tensor([5, 200, 7])
    delta = torch.randn(3, 16, generator=generator, requires_grad=True)
    targets = torch.tensor([5, 200, 7, 0, 1, 5, 299, 150, 7])
    logits = F.linear(hidden, weight).index_add_(-1, rows, F.linear(hidden, delta.to(weight.dtype) - weight[rows]))
    expected = F.log_softmax(logits, dim=-1, dtype=torch.float32).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    grads = torch.autograd.grad(expected.sum(), (hidden, delta))
    scored = head_log_probs(hidden, targets, weight, rows, delta, chunk=4)["logp"]
    scored.sum().backward()
    assert torch.equal(scored, expected.detach())
    torch.testing.assert_close(hidden.grad, grads[0])
    # delta's gradient is summed in float32 here, in bf16 by autograd's linear: bf16 tolerance
    torch.testing.assert_close(delta.grad, grads[1], rtol=1e-2, atol=1e-2)


def test_a_trainable_heads_trained_rows_give_peft_values_and_gradients():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(40, 8, generator=generator, requires_grad=True)
    delta = torch.randn(2, 8, generator=generator, requires_grad=True)
    hidden, rows = torch.randn(5, 8, generator=generator), torch.tensor([3, 30])
    expected = F.linear(hidden, weight.index_copy(0, rows, delta))  # peft's W'
    expected_grads = torch.autograd.grad(expected.square().sum(), (weight, delta))
    logits = TrainedTokenRows(backbone=None, weight=weight, rows=rows, delta=delta).logits(hidden)
    torch.testing.assert_close(logits, expected)
    for got, want in zip(torch.autograd.grad(logits.square().sum(), (weight, delta)), expected_grads, strict=True):
        torch.testing.assert_close(got, want)


def test_chunked_head_skips_the_gradient_work_without_grad():
    weight, hidden, targets = torch.randn(30, 4), torch.randn(5, 4, requires_grad=True), torch.arange(5)
    with torch.no_grad():
        scored = head_log_probs(hidden, targets, weight, chunk=2)
    assert not scored["logp"].requires_grad
    expected = F.log_softmax(hidden.detach() @ weight.T, dim=-1)[torch.arange(5), targets]
    torch.testing.assert_close(scored["logp"], expected)


def test_mean_logit_and_top1_equal_the_direct_computations_with_ties():
    from pipeline.lm_head import _statistics

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 40, generator=generator).to(torch.bfloat16)
    targets = logits.float().argmax(-1)
    logits[1, 3] = logits[1, targets[1]]  # a tie earlier than the target: argmax names the earlier one
    logits[2, 3:] = logits[2, 3:].clamp(max=0)
    logits[2, 39] = logits[2, 3] = 1.0  # a tie later than the target: the target (3) is still the first maximum
    targets[2], targets[4] = 3, 0 if targets[4] != 0 else 1  # row 4: a target that is not the maximum
    logps = F.log_softmax(logits, dim=-1, dtype=torch.float32)
    logp = logps.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    _, mean, top1 = _statistics(logits, logps, logps.exp(), targets, logp)
    torch.testing.assert_close(mean, logits.float().mean(-1))
    expected = logits.argmax(-1) == targets
    assert torch.equal(top1, expected) and expected.tolist()[:5] == [True, False, True, True, False]


def test_entropy_is_float32_under_the_trainers_bf16_autocast():
    from pipeline.lm_head import _statistics

    generator = torch.Generator().manual_seed(0)
    logits = (4 * torch.randn(5, 4096, generator=generator)).to(torch.bfloat16)
    targets = torch.randint(0, 4096, (5,), generator=generator)
    logps = F.log_softmax(logits, dim=-1, dtype=torch.float32)
    logp = logps.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    expected = -(logps.double().exp() * logps.double()).sum(-1)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # einsum / bmm would run in bf16 here (errors of 1e-2)
        entropy, _, _ = _statistics(logits, logps, logps.exp(), targets, logp)
    assert entropy.dtype == torch.float32
    torch.testing.assert_close(entropy.double(), expected, rtol=0, atol=1e-5)
    assert _statistics(logits[:0], logps[:0], logps[:0].exp(), targets[:0], logp[:0])[0].shape == (0,)


def _check_against_autograd(weight, count, chunk, generator):
    hidden = torch.randn(count, weight.shape[1], generator=generator, requires_grad=True)
    targets = torch.randint(0, weight.shape[0], (count,), generator=generator)
    logps = F.log_softmax(F.linear(hidden, weight), dim=-1)
    expected = logps.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    (grad,) = torch.autograd.grad(expected.sum(), hidden)
    scored = head_log_probs(hidden, targets, weight, statistics=True, chunk=chunk)
    scored["logp"].sum().backward()
    torch.testing.assert_close(scored["logp"], expected.detach())
    torch.testing.assert_close(hidden.grad, grad)
    torch.testing.assert_close(scored["entropy"], -(logps.exp() * logps).sum(-1).detach())


def test_the_heads_scratch_tensors_serve_every_call_until_freed():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(50, 8, generator=generator)
    lm_head.free_scratch()
    _check_against_autograd(weight, count=7, chunk=4, generator=generator)  # two chunks through 4-row tensors
    (held,) = lm_head._SCRATCH.values()
    assert [t.shape for t in held] == [(4, 50)] * 3
    _check_against_autograd(weight, count=3, chunk=4, generator=generator)  # fewer rows: the same tensors
    assert [t.data_ptr() for t in next(iter(lm_head._SCRATCH.values()))] == [t.data_ptr() for t in held]
    _check_against_autograd(weight, count=9, chunk=16, generator=generator)  # more rows: replaced, one set held
    assert [t.shape[0] for t in next(iter(lm_head._SCRATCH.values()))] == [9] * 3 and len(lm_head._SCRATCH) == 1
    lm_head.free_scratch()
    assert not lm_head._SCRATCH


def test_scratch_tensors_made_under_inference_mode_are_replaced_for_training():
    """Scoring (the eval's inference mode) and then training in one process: the training call must not write into
    inference tensors (it did: 'Inplace update to inference tensor outside InferenceMode')."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(50, 8, generator=generator)
    lm_head.free_scratch()
    with torch.inference_mode():
        head_log_probs(torch.randn(6, 8, generator=generator), torch.arange(6), weight, chunk=4)
    assert all(t.is_inference() for t in next(iter(lm_head._SCRATCH.values())))
    _check_against_autograd(weight, count=3, chunk=4, generator=generator)
    assert not any(t.is_inference() for t in next(iter(lm_head._SCRATCH.values())))
    lm_head.free_scratch()


def test_chunked_head_under_autocast_to_another_dtype_computes_as_the_linear_layer_does():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(50, 8, generator=generator)  # float32 head, bf16 autocast: F.linear gives bf16 logits
    hidden = torch.randn(7, 8, generator=generator, requires_grad=True)
    targets = torch.randint(0, 50, (7,), generator=generator)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = logits_log_probs(F.linear(hidden, weight), targets)["logp"]
        (grad,) = torch.autograd.grad(expected.sum(), hidden)
        scored = head_log_probs(hidden, targets, weight, chunk=3)["logp"]
    scored.sum().backward()
    torch.testing.assert_close(scored, expected.detach())
    torch.testing.assert_close(hidden.grad, grad)
