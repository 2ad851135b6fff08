"""Losses from the labelled positions only: the DPO stage's trainer (``stages/dpo.py``), and the turn-token
rows' LM head for the SFT stage's trainer (``stages/sft.py``).

TRL 1.16's ``DPOTrainer`` gets its log-probs from a fused LM head that, on devices without Triton (every
CPU), projects *every* position (prompt and padding too) onto the whole vocabulary and runs the backward in
float32 tiles. With Gemma's 262k-token vocabulary that head costs more than the transformer. This trainer
overrides the public ``compute_loss`` (and ``compute_ref_log_probs``, used by the reference pre-computation)
to send exactly the completion (row, position) pairs through the model's own LM head (``lm_head.labelled_log_probs``;
a model wrapped for DDP runs its own forward with ``logits_to_keep``, the positions' union across rows), and
then computes the same loss and logs the same metrics as TRL's path.

Only what ``tests/test_fast_dpo_loss.py`` proves equal to TRL (loss *and* gradients, each loss type alone and
combined, with and without pre-computed reference log-probs, LD-DPO's ``ld_alpha``) takes this path; any other
option falls back to TRL's own ``compute_loss`` (``LabelledPositionsDPOTrainer.loss_path`` says which one ran,
and a fallback is printed once with its reason). The equality was checked against TRL ``CHECKED_TRL``; another
TRL version falls back too.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any

import torch
import torch.nn.functional as F
import trl
from accelerate.utils import is_peft_model
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from trl import DPOTrainer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import use_adapter

from pipeline.lm_head import labelled_log_probs
from pipeline.stages.training import mixed_precision

CHECKED_TRL = SpecifierSet(">=1.16,<1.17")  # the TRL versions whose DPO loss this file was proven against
HANDLED_LOSS_TYPES = frozenset({"sigmoid", "hinge", "ipo", "robust", "apo_zero", "apo_down", "sigmoid_norm", "sft"})
_BATCH_KEYS = {"input_ids", "attention_mask", "completion_mask", "ref_chosen_logps", "ref_rejected_logps"}
_NOT_MODEL_INPUTS = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}


def unsupported_reason(args: Any, trl_version: str = trl.__version__) -> str | None:
    """Why the labelled-positions path cannot stand in for TRL's DPO loss under ``args``, or None if it can."""
    if Version(trl_version) not in CHECKED_TRL:
        return f"TRL {trl_version} is outside the checked range {CHECKED_TRL}"
    loss_types = args.loss_type if isinstance(args.loss_type, list) else [args.loss_type]
    if not set(loss_types) <= HANDLED_LOSS_TYPES:
        return f"loss_type {sorted(set(loss_types) - HANDLED_LOSS_TYPES)} is not handled"
    checks = {
        "f_divergence_type": args.f_divergence_type == "reverse_kl",
        "use_weighting": not args.use_weighting,
    }
    refused = [name for name, ok in checks.items() if not ok]
    return f"{', '.join(refused)} is not handled" if refused else None


def _packed(inputs: dict[str, Any]) -> tuple[dict[str, torch.Tensor], torch.Tensor] | None:
    """The batch's rows (chosen and rejected, right-padded to the longest) as one row of their tokens, positions
    restarting at each row's start (how transformers keeps packed sequences apart, as SFT's padding-free packing
    does), and the completion positions in that row; None when there is nothing to gain or the rows are not
    plain right-padded prefixes.

    TRL 1.16's preference collator pads every row to the batch's longest and its ``padding_free`` is switched off;
    a pair's shorter answer then carries padding through the decoder (and every LoRA layer's small matmuls run once
    per row). In one row the decoder sees exactly the real tokens, and each position the same earlier tokens."""
    attention = inputs.get("attention_mask")
    if attention is None or inputs["input_ids"].dim() != 2:
        return None
    attention = attention.bool()
    lengths = attention.sum(dim=1)
    positions = torch.arange(attention.shape[1], device=attention.device)
    if not torch.equal(attention, positions < lengths.unsqueeze(1)):  # left padding or holes: keep the rows
        return None
    if attention.shape[0] == 1 and bool(attention.all()):
        return None  # one unpadded row already
    # position p predicts token p + 1, within its own row: the completion mask shifted left, in packed order
    following = torch.zeros_like(attention)
    following[:, :-1] = inputs["completion_mask"][:, 1:].bool()
    labelled = following[attention][:-1].unsqueeze(0)
    model_kwargs = {"input_ids": inputs["input_ids"][attention].unsqueeze(0),
                    "position_ids": positions.expand_as(attention)[attention].unsqueeze(0)}
    return model_kwargs, labelled


def _completion_logps(model: Any, inputs: dict[str, Any], statistics: bool = True) -> dict[str, torch.Tensor]:
    """Per-token log-probs (and the logged statistics) of each row's completion, (rows x positions - 1).

    Position ``p`` predicts token ``p + 1``; only the (row, position) pairs whose next token is a completion token
    go through the LM head (:func:`lm_head.labelled_log_probs`). Other entries are zero, as in TRL's fused head, so
    sums over positions equal TRL's.
    """
    mask = inputs["completion_mask"][:, 1:].bool()
    model_kwargs = {k: v for k, v in inputs.items() if k not in _NOT_MODEL_INPUTS}
    # packed: the same (row, position) pairs, in the same order, without the padding
    model_kwargs, labelled = _packed(inputs) or (model_kwargs, mask)
    _, scored = labelled_log_probs(model, model_kwargs, labelled, inputs["input_ids"][:, 1:][mask], statistics)

    def spread(values: torch.Tensor) -> torch.Tensor:  # one value per labelled pair -> (rows x positions - 1)
        return torch.zeros(mask.shape, dtype=values.dtype, device=values.device).masked_scatter(mask, values)

    return {"mask": mask, "per_token": spread(scored.pop("logp")), **{k: spread(v) for k, v in scored.items()}}


def _sequence_logps(per_token: torch.Tensor, mask: torch.Tensor, ld_alpha: float | None) -> torch.Tensor:
    """Each row's completion log-prob from its per-token ones (rows ``[chosen..., rejected...]``): their sum, or
    with ``ld_alpha`` (LD-DPO) the tokens past the shorter completion of the pair weighted by it (TRL 1.16's
    formula, term for term)."""
    if ld_alpha is None:
        return per_token.sum(dim=1)
    position = mask.cumsum(dim=1)
    chosen_lens, rejected_lens = mask.sum(dim=1).long().chunk(2, dim=0)
    shared_lens = torch.minimum(chosen_lens, rejected_lens)
    shared_lens = torch.cat([shared_lens, shared_lens], dim=0).unsqueeze(1)
    shared = (per_token * ((position > 0) & (position <= shared_lens))).sum(dim=1)
    tail = (per_token * (position > shared_lens)).sum(dim=1)
    return shared + ld_alpha * tail


class LabelledPositionsDPOTrainer(DPOTrainer):
    """DPOTrainer whose policy and reference log-probs come from the completion positions' logits only.

    Same loss, gradients and metrics as TRL's path for ``HANDLED_LOSS_TYPES`` (any mix and weights), with or
    without pre-computed reference log-probs, a PEFT adapter (reference: adapter disabled, or TRL's ``ref``
    adapter) or a separate reference model. Anything else: ``super().compute_loss``.
    """

    loss_path: str | None = None  # "labelled_positions" or "trl": which path computed the last loss
    _reported_fallback = False

    def _fallback_reason(self, model: Any, inputs: dict[str, Any], return_outputs: bool) -> str | None:
        reason = unsupported_reason(self.args)
        if reason:
            return reason
        if getattr(self, "aux_loss_enabled", False):
            return "the MoE router auxiliary loss is not handled"
        if return_outputs:
            return "return_outputs=True (logits for compute_metrics) is not handled"
        if getattr(self, "_is_vision_dataset", False) or not set(inputs) <= _BATCH_KEYS:
            return f"batch keys {sorted(set(inputs) - _BATCH_KEYS)} are not handled"
        unwrapped = self.accelerator.unwrap_model(model)
        if is_peft_model(unwrapped) and unwrapped.active_peft_config.is_prompt_learning:
            return "prompt-learning PEFT adapters are not handled"
        base = unwrapped.get_base_model() if is_peft_model(unwrapped) else unwrapped
        if "logits_to_keep" not in inspect.signature(base.forward).parameters:
            return f"{type(base).__name__}.forward takes no logits_to_keep"
        return None

    def _note_fallback(self, reason: str) -> None:
        self.loss_path = "trl"
        if not self._reported_fallback:
            self._reported_fallback = True
            print(f"  DPO loss: TRL's own path ({reason})", flush=True)

    def _reference_context(self) -> Any:
        """What TRL does to turn the policy into the reference: disable the adapter, or switch to ``ref``."""
        if self.ref_model is None and is_peft_model(self.model):
            unwrapped = self.accelerator.unwrap_model(self.model)
            return use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
        return contextlib.nullcontext()

    def _scored(self, model: Any, inputs: dict[str, Any], statistics: bool = True) -> dict[str, torch.Tensor]:
        """:func:`_completion_logps` under the accelerator's autocast: TRL's path runs the model's own forward,
        which accelerate wraps in it for mixed precision (bf16 LoRA products on float32 adapters)."""
        with mixed_precision(self, model):
            return _completion_logps(model, inputs, statistics)

    def compute_ref_log_probs(self, model: Any, inputs: dict[str, Any]) -> Any:
        reason = self._fallback_reason(model, inputs, return_outputs=False)
        if reason:
            self._note_fallback(reason)
            return super().compute_ref_log_probs(model, inputs)
        with (torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
              self._reference_context()):
            per_token = self._scored(model, inputs, statistics=False)["per_token"]
        return _sequence_logps(per_token, inputs["completion_mask"][:, 1:], self.ld_alpha).chunk(2, dim=0)

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        reason = self._fallback_reason(model, inputs, return_outputs)
        if reason:
            self._note_fallback(reason)
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self.loss_path = "labelled_positions"
        return self._labelled_positions_loss(model, inputs)

    def _labelled_positions_loss(self, model: Any, inputs: dict[str, Any]) -> torch.Tensor:
        mode = "train" if self.model.training else "eval"
        policy = self._scored(model, inputs)
        per_token, mask = policy["per_token"], policy["mask"]
        # batch is [chosen, rejected]
        chosen_logps, rejected_logps = _sequence_logps(per_token, mask, self.ld_alpha).chunk(2, dim=0)
        if self.precompute_ref_logps:
            ref_chosen_logps, ref_rejected_logps = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            reference = self.ref_model if self.ref_model is not None else self.model
            with (torch.no_grad(),
                  disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
                  self._reference_context()):
                ref_per_token = self._scored(reference, inputs, statistics=False)["per_token"]
            ref_chosen_logps, ref_rejected_logps = _sequence_logps(ref_per_token, mask, self.ld_alpha).chunk(2, dim=0)

        chosen_logratios = chosen_logps - ref_chosen_logps
        rejected_logratios = rejected_logps - ref_rejected_logps
        loss = 0.0
        for loss_type, weight in zip(self.loss_types, self.loss_weights, strict=True):
            per_sequence = self._per_sequence_loss(loss_type, chosen_logratios, rejected_logratios,
                                                   inputs["completion_mask"], per_token, mask)
            loss += per_sequence.mean() * weight
        self._log_metrics(mode, inputs, policy, chosen_logps, rejected_logps, chosen_logratios, rejected_logratios)
        return loss

    def _per_sequence_loss(self, loss_type: str, chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor,
                           completion_mask: torch.Tensor, per_token: torch.Tensor,
                           mask: torch.Tensor) -> torch.Tensor:
        """TRL 1.16's formula for one loss type (reverse-KL scores: the log-ratios themselves)."""
        beta, delta = self.beta, chosen_logratios - rejected_logratios
        if loss_type == "sigmoid":
            return -F.logsigmoid(beta * delta)
        if loss_type == "hinge":
            return torch.relu(1 - beta * delta)
        if loss_type in ("ipo", "sigmoid_norm"):  # both normalise by the completion length
            chosen_len, rejected_len = completion_mask.chunk(2, dim=0)
            norm_delta = (chosen_logratios / chosen_len.sum(dim=1).clamp(min=1.0)
                          - rejected_logratios / rejected_len.sum(dim=1).clamp(min=1.0))
            return (norm_delta - 1 / (2 * beta)) ** 2 if loss_type == "ipo" else -F.logsigmoid(beta * norm_delta)
        if loss_type == "robust":
            smoothing = self.label_smoothing
            clean = -(1 - smoothing) * F.logsigmoid(beta * delta)
            flipped = -smoothing * F.logsigmoid(-beta * delta)
            return (clean - flipped) / (1 - 2 * smoothing)
        if loss_type == "apo_zero":
            return 1 - torch.sigmoid(beta * chosen_logratios) + torch.sigmoid(beta * rejected_logratios)
        if loss_type == "apo_down":
            return torch.sigmoid(beta * chosen_logratios) + 1 - torch.sigmoid(beta * delta)
        if loss_type == "sft":  # NLL of the chosen completions, a scalar spread over the batch like TRL's
            chosen_per_token, _ = per_token.chunk(2, dim=0)
            chosen_mask, _ = mask.chunk(2, dim=0)
            return (-chosen_per_token[chosen_mask].mean()).expand(chosen_per_token.size(0))
        raise AssertionError(f"unhandled loss type {loss_type}")  # unsupported_reason keeps these out

    def _log_metrics(self, mode: str, inputs: dict[str, Any], policy: dict[str, torch.Tensor],
                     chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, chosen_logratios: torch.Tensor,
                     rejected_logratios: torch.Tensor) -> None:
        """The metrics TRL 1.16's DPO loss logs, computed the same way (gathered across processes)."""
        gather, gather_m, metrics = self.accelerator.gather, self.accelerator.gather_for_metrics, self._metrics[mode]
        mask = policy["mask"]
        entropy_sum = gather_m((policy["entropy"] * mask).sum()).sum()
        total = gather_m(mask.sum()).sum()
        metrics["entropy"].append((entropy_sum / total).item() if total > 0 else 0.0)
        if mode == "train":
            self._total_train_tokens += gather_m(inputs["attention_mask"].sum()).sum().item() // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]
        chosen_mask, rejected_mask = mask.chunk(2, dim=0)
        chosen_mean, rejected_mean = policy["mean_logits"].chunk(2, dim=0)
        for name, values, rows in (("chosen", chosen_mean, chosen_mask), ("rejected", rejected_mean, rejected_mask)):
            total_logits = gather_m(values[rows].sum()).sum().item()
            count = gather_m(rows.sum()).sum().item()
            metrics[f"logits/{name}"].append(total_logits / count if count > 0 else 0.0)
        chosen_top1, _ = policy["is_top1"].chunk(2, dim=0)
        correct = gather_m((chosen_top1 & chosen_mask).sum()).sum()
        count = gather_m(chosen_mask.sum()).sum()
        metrics["mean_token_accuracy"].append((correct / count).item() if count > 0 else 0.0)
        chosen_rewards = self.beta * chosen_logratios.detach()
        rejected_rewards = self.beta * rejected_logratios.detach()
        metrics["rewards/chosen"].append(gather(chosen_rewards).mean().item())
        metrics["rewards/rejected"].append(gather(rejected_rewards).mean().item())
        metrics["rewards/accuracies"].append(gather((chosen_rewards > rejected_rewards).float()).mean().item())
        metrics["rewards/margins"].append(gather(chosen_rewards - rejected_rewards).mean().item())
        metrics["logps/chosen"].append(gather(chosen_logps.detach()).mean().item())
        metrics["logps/rejected"].append(gather(rejected_logps.detach()).mean().item())
