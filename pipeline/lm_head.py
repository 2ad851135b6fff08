"""The LM head at labelled (row, position) pairs only: the positions that carry a label, and nothing else, go
through the (vocabulary x hidden) head, a chunk of positions at a time.

Used by the SFT stage's loss (``stages/sft.py``), the DPO stage's (``stages/fast_loss.py``), the eval's held-out
scoring (``evaluation.py``) and the time estimate (``estimate.py``). With Gemma's 262k-token vocabulary the head
costs more than the transformer, and its float32 log-probabilities and their gradients at every labelled position
were the largest tensors of a training step.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F

# positions x vocabulary entries per chunk of the head: 128 positions of a 262k vocabulary, 134 MB in float32
HEAD_CHUNK_ELEMENTS = 2**25

_SCRATCH: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _scratch(rows: int, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One chunk's (rows x vocabulary) working tensors (the logits, in the weight's dtype; two float32), kept for
    the next chunk and the next call. Fresh tensors this large cost more than the arithmetic on a CPU: glibc maps
    every allocation over 32 MB anew and the kernel faults in and zeroes its pages (measured on gemma-3-270m's head,
    2026-12-05, AMD Zen 4: forward + backward 2.6 instead of 4.1 ms a position). Held until :func:`free_scratch`;
    one set at a time (a call for more rows, another head or another device replaces it, and so does a call outside
    ``torch.inference_mode`` after one inside it, whose tensors autograd may not write to)."""
    key = (weight.shape[0], weight.dtype, weight.device)
    held = _SCRATCH.get(key)
    if (held is None or held[0].shape[0] < rows
            or (held[0].is_inference() and not torch.is_inference_mode_enabled())):
        _SCRATCH.clear()  # before allocating: never two sets at once
        shape = (rows, weight.shape[0])
        held = (torch.empty(shape, dtype=weight.dtype, device=weight.device),
                torch.empty(shape, dtype=torch.float32, device=weight.device),
                torch.empty(shape, dtype=torch.float32, device=weight.device))
        _SCRATCH[key] = held
    return held


def free_scratch() -> None:
    """Drop the head's working tensors (the runner does between stages)."""
    _SCRATCH.clear()


# Causal LMs whose forward is ``logits = lm_head(decoder(...).last_hidden_state[:, logits_to_keep])`` with nothing
# after the head when the config sets no logit softcapping (checked in transformers 5.23 and 5.25; tests cover
# llama, qwen2, gemma3)
_PLAIN_HEAD_MODELS = {"LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM",
                      "Gemma3ForCausalLM", "Gemma2ForCausalLM"}


@dataclasses.dataclass
class TrainedTokenRows:
    """The tied LM head of peft's trainable-token wrapper, computed without its 262k-row weight gradient.

    peft builds ``W' = W.index_copy(rows, delta)`` and runs ``linear(h, W')``, so autograd computes the gradient
    of the whole (vocabulary x hidden) matrix for the few trained rows (about 1.8 s of a 6-9 s gemma-3-270m SFT
    step). ``linear(h, W)`` with the frozen ``W``, its trained columns replaced by ``linear(h, delta)``, is the
    same function; its weight gradient is the (rows x hidden) one only. The columns of the trained rows are
    corrected in place (``+ linear(h, delta - W[rows])``): no copy of the (positions x vocabulary) logits in the
    forward or the backward. The tied input embedding has the same problem (a dense vocabulary x hidden gradient
    of ``W'`` for a lookup): :meth:`embed` looks up the frozen table and takes the trained rows' positions from
    ``delta``. The parameters are peft's own, so the saved adapter is unchanged.
    """

    backbone: Any
    weight: torch.Tensor
    rows: torch.Tensor
    delta: torch.Tensor
    embedding: Any = None  # the frozen input embedding module (its forward applies e.g. Gemma's scale), if tied

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        correction = F.linear(hidden, self.delta.to(self.weight.dtype) - self.weight[self.rows])
        return _add_to_columns(F.linear(hidden, self.weight), self.rows, correction)

    def hidden_states(self, model_inputs: dict[str, Any]) -> Any:
        """The backbone's outputs, its input embedding through :meth:`embed` where the embedding is tied."""
        if self.embedding is None:
            return self.backbone(**model_inputs, use_cache=False)
        rest = {k: v for k, v in model_inputs.items() if k != "input_ids"}
        return self.backbone(inputs_embeds=self.embed(model_inputs["input_ids"]), **rest, use_cache=False)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """peft's ``embedding(ids, W') * embed_scale`` without ``W'``: the same values, and a (rows x hidden)
        gradient instead of a dense (vocabulary x hidden) one."""
        embeds = self.embedding(input_ids)
        slot = input_ids.unsqueeze(-1) == self.rows
        hit = slot.any(dim=-1, keepdim=True)
        trained = F.embedding(slot.int().argmax(dim=-1), self.delta.to(self.weight.dtype))
        scale = getattr(self.embedding, "embed_scale", None)
        if scale is not None:  # as peft's wrapper (``_get_embed_scale``)
            trained = trained * (scale.to(trained.dtype) if torch.is_tensor(scale) else scale)
        return torch.where(hit, trained, embeds)


def _add_to_columns(logits: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``logits[:, rows] += values`` in place (distinct ``rows``; autograd passes the gradient through), touching
    those columns only: ``index_add_`` gives the same values, but on bf16 it accumulates through a float32 copy of
    the whole (positions x vocabulary) tensor (torch 2.14, CPU: 128 MB of fresh pages a chunk of gemma-3-270m)."""
    logits[:, rows] = logits[:, rows] + values
    return logits


def trained_token_rows(model: Any) -> TrainedTokenRows | None:
    """The two-part head for ``model`` when it is a PEFT model whose tied LM head is peft's trainable-token
    wrapper with one active, unmerged adapter on a plain-head architecture; else None (use the model's forward)."""
    from peft import PeftModel
    from peft.utils.other import TrainableTokensWrapper

    # Only the bare PEFT model: a DDP / FSDP / DeepSpeed wrapper must run its own forward, which is where it
    # hooks in the gradient synchronisation (calling the backbone inside it would bypass that).
    if not isinstance(model, PeftModel):
        return None
    base = model.get_base_model()
    head = base.get_output_embeddings()
    config = base.config.get_text_config()
    if (not isinstance(head, TrainableTokensWrapper) or type(base).__name__ not in _PLAIN_HEAD_MODELS
            or getattr(config, "final_logit_softcapping", None) is not None):
        return None
    layer = head.token_adapter
    active = layer.active_adapters
    if layer.disable_adapters or layer.merged or len(active) != 1 or not isinstance(layer.base_layer, torch.nn.Linear):
        return None
    name = active[0]
    if len(set(layer.token_indices[name])) != len(layer.token_indices[name]):
        return None  # a row listed twice: peft's index_copy keeps one of its values; the model's forward decides
    rows = torch.tensor(layer.token_indices[name], device=layer.base_layer.weight.device)
    return TrainedTokenRows(backbone=base.get_decoder(), weight=layer.base_layer.weight, rows=rows,
                            delta=layer.trainable_tokens_delta[name], embedding=_tied_embedding(base, layer, name))


def _tied_embedding(base: Any, head_layer: Any, name: str) -> Any:
    """The frozen embedding module under the input embedding's trainable-token wrapper when it trains the same rows
    with the same parameter as the head (peft's tied adapter) and is a plain lookup; else None."""
    from peft.utils.other import TrainableTokensWrapper

    wrapper = base.get_input_embeddings()
    if not isinstance(wrapper, TrainableTokensWrapper):
        return None
    layer = wrapper.token_adapter
    table = layer.base_layer
    plain = (isinstance(table, torch.nn.Embedding) and table.max_norm is None and not table.scale_grad_by_freq
             and not table.sparse and table.weight is head_layer.base_layer.weight)
    same = (not layer.disable_adapters and not layer.merged and layer.active_adapters == [name]
            and layer.trainable_tokens_delta[name] is head_layer.trainable_tokens_delta[name]
            and list(layer.token_indices[name]) == list(head_layer.token_indices[name]))
    if not (plain and same) or (table.padding_idx is not None and table.padding_idx in layer.token_indices[name]):
        return None
    return table


def decoder_and_head(model: Any) -> tuple[Any, Any] | None:
    """The decoder and the LM head of ``model`` when its logits are exactly ``head(decoder(...).last_hidden_state)``:
    a bare model of a plain-head architecture without logit softcapping, or a bare (not prompt-learning) PEFT
    model on one. None for anything else, whose own forward must run: a DDP / FSDP / DeepSpeed wrapper hooks the
    gradient synchronisation into its forward, and calling the decoder inside it would bypass that."""
    from peft import PeftModel
    from transformers import PreTrainedModel

    if isinstance(model, PeftModel):
        if model.active_peft_config.is_prompt_learning:
            return None
        base = model.get_base_model()
    elif isinstance(model, PreTrainedModel):
        base = model
    else:
        return None
    config = base.config.get_text_config()
    if type(base).__name__ not in _PLAIN_HEAD_MODELS or getattr(config, "final_logit_softcapping", None) is not None:
        return None
    return base.get_decoder(), base.get_output_embeddings()


class _ChunkedHeadLogProbs(torch.autograd.Function):
    """``log_softmax(linear(hidden, W'))[target]`` at each position, a chunk of positions at a time, with the frozen
    ``W`` whose ``rows`` are replaced by the trainable ``delta`` (``W' = W`` without rows).

    Each position's output is one number, so its gradient with respect to the position's hidden state is one
    vector times the upstream gradient: ``(onehot(target) - softmax) @ W'``. The forward computes that vector (and
    the ``rows`` columns of ``onehot - softmax``, for ``delta``'s gradient) chunk by chunk, with the same bf16 /
    float32 casts autograd's backward makes, and the backward only scales them. The same arithmetic as
    ``log_softmax(linear(...))`` followed by autograd's backward, without keeping any (positions x vocabulary)
    tensor beyond one chunk. Statistics (entropy, mean logit, target is top-1) are optional and carry no gradient.
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                rows: torch.Tensor | None, targets: torch.Tensor, chunk: int, statistics: bool,
                grad_enabled: bool) -> tuple:
        wants_hidden, wants_delta = grad_enabled and ctx.needs_input_grad[0], grad_enabled and ctx.needs_input_grad[1]
        correction = None if rows is None else delta.to(weight.dtype) - weight[rows]
        count = hidden.shape[0]
        logp = torch.empty(count, dtype=torch.float32, device=hidden.device)
        stats = [torch.empty(count if statistics else 0, dtype=dtype, device=hidden.device)
                 for dtype in (torch.float32, torch.float32, torch.bool)]
        grad_hidden = torch.empty(count if wants_hidden else 0, hidden.shape[-1], dtype=hidden.dtype,
                                  device=hidden.device)
        grad_rows = torch.empty(count if wants_delta else 0, 0 if rows is None else len(rows), dtype=torch.float32,
                                device=hidden.device)
        logits_buffer, work, logps_buffer = _scratch(min(chunk, count), weight)
        device = hidden.device.type
        in_place = hidden.dtype == weight.dtype and (not torch.is_autocast_enabled(device)
                                                     or torch.get_autocast_dtype(device) == weight.dtype)
        for start in range(0, count, chunk):
            part, target = slice(start, start + chunk), targets[start:start + chunk].unsqueeze(-1)
            rows_here = target.shape[0]
            if in_place:
                logits = torch.mm(hidden[part], weight.t(), out=logits_buffer[:rows_here])
            else:  # another dtype, or autocast to a third: F.linear decides it
                logits = F.linear(hidden[part], weight)
            if rows is not None:
                _add_to_columns(logits, rows, F.linear(hidden[part], correction))
            # log_softmax(logits, dtype=float32) is this float32 copy and a log-softmax of it
            logps = torch.log_softmax(work[:rows_here].copy_(logits), dim=-1, out=logps_buffer[:rows_here])
            logp[part] = logps.gather(-1, target).squeeze(-1)
            probs = None
            if statistics:
                probs = torch.exp(logps, out=work[:rows_here])
                values = _statistics(logits, logps, probs, target.squeeze(-1), logp[part])
                for store, value in zip(stats, values, strict=True):
                    store[part] = value
            if wants_hidden or wants_delta:
                probs = torch.exp(logps, out=work[:rows_here]) if probs is None else probs
                # d logp / d logits = onehot(target) - softmax, cast to the logits' dtype as autograd's would be
                grad_logits = probs.neg_().scatter_add_(-1, target, torch.ones_like(logp[part]).unsqueeze(-1))
                grad_logits = logits.copy_(grad_logits)  # the logits are used up: their buffer takes the cast
                if wants_hidden:
                    grad_hidden[part] = grad_logits @ weight
                    if rows is not None:
                        grad_hidden[part] += grad_logits[:, rows] @ correction
                if wants_delta:
                    grad_rows[part] = grad_logits[:, rows].float()
        ctx.mark_non_differentiable(*stats)
        ctx.save_for_backward(grad_hidden, grad_rows, hidden if wants_delta else None)
        ctx.delta_dtype = None if delta is None else delta.dtype
        return (logp, *stats)

    @staticmethod
    def backward(ctx: Any, grad_logp: torch.Tensor, *_: Any) -> tuple:
        grad_hidden, grad_rows, hidden = ctx.saved_tensors
        scale = grad_logp.unsqueeze(-1)
        d_hidden = (grad_hidden * scale).to(grad_hidden.dtype) if ctx.needs_input_grad[0] else None
        d_delta = None
        if ctx.needs_input_grad[1]:
            d_delta = ((grad_rows * scale).transpose(0, 1) @ hidden.float()).to(ctx.delta_dtype)
        return d_hidden, d_delta, None, None, None, None, None, None


def _statistics(logits: torch.Tensor, logps: torch.Tensor, probs: torch.Tensor, targets: torch.Tensor,
                logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each position's entropy, mean logit, and whether its target is the logits' ``argmax`` (the first maximum),
    from float32 passes over ``logps`` where bf16 passes over ``logits`` are 4-12x slower on CPU (2026-12-04, Zen 4).

    The mean logit is the mean log-prob plus the log-partition (a token's logit minus its log-prob). The top-1 test:
    ``log_softmax`` shifts each row by one number, so a target at the row's maximum logit with no earlier
    log-prob as large is the first maximum; a row at the maximum whose log-prob ``argmax`` is another token (a tie,
    or two logits rounded to one float32 log-prob) gets ``logits.argmax`` itself.
    """
    # a float32 dot product per row: no (positions x vocabulary) product tensor, and no autocast (einsum and bmm
    # are on CPU autocast's bf16 list: under the trainer's autocast they cast both operands to fresh bf16 copies,
    # 107 instead of 9 ms a chunk of 128 positions, 0.03 nats off; 2026-12-05, Zen 4)
    entropy = -torch.stack([p.dot(q) for p, q in zip(probs, logps, strict=True)]) if len(probs) else probs.new_zeros(0)
    target_logits = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    mean = logps.mean(-1) + (target_logits.float() - logp)  # + the log-partition
    at_top = target_logits == logits.amax(-1)
    first = logps.argmax(-1) == targets
    top1 = at_top & first
    unsure = at_top & ~first
    if unsure.any():
        top1[unsure] = logits[unsure].argmax(-1) == targets[unsure]
    return entropy, mean, top1


def head_log_probs(hidden: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor | None = None,
                   delta: torch.Tensor | None = None, statistics: bool = False,
                   chunk: int | None = None) -> dict[str, torch.Tensor]:
    """``log p(target)`` of each position (``hidden``: positions x hidden) through the frozen head ``weight``
    (vocabulary x hidden), its ``rows`` replaced by ``delta`` if given, without (positions x vocabulary) tensors
    beyond a chunk of ``chunk`` positions (default: ``HEAD_CHUNK_ELEMENTS`` entries); with ``statistics``, also
    each position's entropy, mean logit and whether the target is the top-1 token."""
    chunk = chunk or max(1, HEAD_CHUNK_ELEMENTS // weight.shape[0])
    # the forward runs with autograd off: it needs to know whether the caller's mode records a backward
    logp, entropy, mean_logits, is_top1 = _ChunkedHeadLogProbs.apply(hidden, delta, weight, rows, targets, chunk,
                                                                     statistics, torch.is_grad_enabled())
    scored = {"logp": logp}
    if statistics:
        scored.update(entropy=entropy, mean_logits=mean_logits, is_top1=is_top1)
    return scored


def logits_log_probs(logits: torch.Tensor, targets: torch.Tensor, statistics: bool = False) -> dict[str, torch.Tensor]:
    """What :func:`head_log_probs` returns, from (positions x vocabulary) logits already computed."""
    # log_softmax casts to float32 itself: the same values as cross_entropy(logits.float()), without a
    # separate float32 copy of the logits
    logps = F.log_softmax(logits, dim=-1, dtype=torch.float32)
    scored = {"logp": logps.gather(-1, targets.unsqueeze(-1)).squeeze(-1)}
    if statistics:
        with torch.no_grad():
            stats = _statistics(logits, logps, logps.exp(), targets, scored["logp"])
        scored.update(zip(("entropy", "mean_logits", "is_top1"), stats, strict=True))
    return scored


def _frozen_plain_head(head: Any) -> bool:
    """A bias-free linear head that gets no gradient: frozen, or run where autograd records nothing."""
    frozen = not head.weight.requires_grad or not torch.is_grad_enabled()
    return type(head) is torch.nn.Linear and head.bias is None and frozen


def labelled_log_probs(model: Any, model_inputs: dict[str, Any], labelled: torch.Tensor, targets: torch.Tensor,
                       statistics: bool = False) -> tuple[Any, dict[str, torch.Tensor]]:
    """The model's outputs and ``log p(target)`` (see :func:`head_log_probs`) at the (row, position) pairs where
    ``labelled`` (rows x positions - 1; position ``p`` predicts token ``p + 1``) is true, rows flattened in order;
    ``targets`` holds those pairs' next tokens.

    Exactly the labelled pairs go through the LM head, in chunks: the turn-token rows' two-part head when the model
    has one (:func:`trained_token_rows`), else its own frozen head after its decoder (:func:`decoder_and_head`).
    A trainable or adapted head runs whole; a model that must run its own forward (a DDP wrapper) does, with
    ``logits_to_keep``, which keeps the same positions in every row (their union), and the others are dropped.
    """
    token_rows = trained_token_rows(model)
    if token_rows is not None:
        outputs = token_rows.hidden_states(model_inputs)
        hidden = outputs.last_hidden_state[:, :-1][labelled]
        if token_rows.weight.requires_grad:
            return outputs, logits_log_probs(token_rows.logits(hidden), targets, statistics)
        return outputs, head_log_probs(hidden, targets, token_rows.weight, token_rows.rows, token_rows.delta,
                                       statistics)
    split = decoder_and_head(model)
    if split is not None:
        decoder, head = split
        # use_cache=False: packed rows are only kept apart (position_ids restarting) without a cache
        outputs = decoder(**model_inputs, use_cache=False)
        hidden = outputs.last_hidden_state[:, :-1][labelled]
        if _frozen_plain_head(head):
            return outputs, head_log_probs(hidden, targets, head.weight, statistics=statistics)
        return outputs, logits_log_probs(head(hidden), targets, statistics)
    keep = labelled.any(dim=0).nonzero().flatten()
    outputs = model(**model_inputs, use_cache=False, logits_to_keep=keep)
    return outputs, logits_log_probs(outputs.logits[labelled[:, keep]], targets, statistics)


def labelled_nll(model: Any, inputs: dict[str, Any]) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """The model's outputs, the summed negative log-likelihood of the tokens ``inputs["labels"]`` trains (those not
    -100; position ``p`` predicts token ``p + 1``) through :func:`labelled_log_probs`, and how many there are."""
    targets = inputs["labels"][:, 1:]
    labelled = targets != -100
    model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    outputs, scored = labelled_log_probs(model, model_inputs, labelled, targets[labelled])
    return outputs, -scored["logp"].sum(), labelled.sum()
