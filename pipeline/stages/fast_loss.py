"""Losses from the labelled positions only: the DPO stage's trainer (``stages/dpo.py``), and the turn-token
rows' LM head for the SFT stage's trainer (``stages/sft.py``).

TRL 1.16's ``DPOTrainer`` gets its log-probs from a fused LM head that, on devices without Triton (every
CPU), projects *every* position (prompt and padding too) onto the whole vocabulary and runs the backward in
float32 tiles. With Gemma's 262k-token vocabulary that head costs more than the transformer. This trainer
overrides the public ``compute_loss`` (and ``compute_ref_log_probs``, used by the reference pre-computation)
to send exactly the completion (row, position) pairs through the model's own LM head (:func:`labelled_logits`;
a model wrapped for DDP runs its own forward with ``logits_to_keep``, the positions' union across rows), and
then computes the same loss and logs the same metrics as TRL's path.

Only what ``tests/test_fast_dpo_loss.py`` proves equal to TRL (loss *and* gradients, each loss type alone and
combined, with and without pre-computed reference log-probs) takes this path; any other option falls back to
TRL's own ``compute_loss`` (``LabelledPositionsDPOTrainer.loss_path`` says which one ran, and a fallback is
printed once with its reason). The equality was checked against TRL ``CHECKED_TRL``; another TRL version
falls back too.
"""

from __future__ import annotations

import contextlib
import dataclasses
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

CHECKED_TRL = SpecifierSet(">=1.16,<1.17")  # the TRL versions whose DPO loss this file was proven against
HANDLED_LOSS_TYPES = frozenset({"sigmoid", "hinge", "ipo", "robust", "apo_zero", "apo_down", "sigmoid_norm", "sft"})
_BATCH_KEYS = {"input_ids", "attention_mask", "completion_mask", "ref_chosen_logps", "ref_rejected_logps"}
_NOT_MODEL_INPUTS = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}


# Causal LMs whose forward is ``logits = lm_head(decoder(...).last_hidden_state[:, logits_to_keep])`` with nothing
# after the head when the config sets no logit softcapping (checked in transformers 5.23; tests cover llama, qwen2)
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
        logits = F.linear(hidden, self.weight)
        correction = F.linear(hidden, self.delta.to(self.weight.dtype) - self.weight[self.rows])
        return logits.index_add_(-1, self.rows, correction)  # in place: its backward passes the gradient through

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


def unsupported_reason(args: Any, trl_version: str = trl.__version__) -> str | None:
    """Why the labelled-positions path cannot stand in for TRL's DPO loss under ``args``, or None if it can."""
    if Version(trl_version) not in CHECKED_TRL:
        return f"TRL {trl_version} is outside the checked range {CHECKED_TRL}"
    loss_types = args.loss_type if isinstance(args.loss_type, list) else [args.loss_type]
    if not set(loss_types) <= HANDLED_LOSS_TYPES:
        return f"loss_type {sorted(set(loss_types) - HANDLED_LOSS_TYPES)} is not handled"
    checks = {
        "f_divergence_type": args.f_divergence_type == "reverse_kl",
        "ld_alpha": args.ld_alpha is None,
        "use_weighting": not args.use_weighting,
    }
    refused = [name for name, ok in checks.items() if not ok]
    return f"{', '.join(refused)} is not handled" if refused else None


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


def labelled_logits(model: Any, model_inputs: dict[str, Any], labelled: torch.Tensor) -> tuple[Any, torch.Tensor]:
    """The model's outputs and its logits, (positions x vocabulary), at the (row, position) pairs where ``labelled``
    (rows x positions - 1; position ``p`` predicts token ``p + 1``) is true, rows flattened in order.

    Exactly the labelled pairs go through the LM head: through the turn-token rows' two-part head when the model
    has one (:func:`trained_token_rows`), else through its own head after its decoder (:func:`decoder_and_head`).
    Any other model runs its own forward with ``logits_to_keep``, which keeps the same positions in every row
    (their union); the unlabelled ones are dropped after the head.
    """
    token_rows = trained_token_rows(model)
    if token_rows is not None:
        outputs = token_rows.hidden_states(model_inputs)
        return outputs, token_rows.logits(outputs.last_hidden_state[:, :-1][labelled])
    split = decoder_and_head(model)
    if split is not None:
        decoder, head = split
        # use_cache=False: packed rows are only kept apart (position_ids restarting) without a cache
        outputs = decoder(**model_inputs, use_cache=False)
        return outputs, head(outputs.last_hidden_state[:, :-1][labelled])
    keep = labelled.any(dim=0).nonzero().flatten()
    outputs = model(**model_inputs, use_cache=False, logits_to_keep=keep)
    return outputs, outputs.logits[labelled[:, keep]]


def _completion_logps(model: Any, inputs: dict[str, Any], statistics: bool = True) -> dict[str, torch.Tensor]:
    """Per-token log-probs (and the logged statistics) of each row's completion, (rows x positions - 1).

    Position ``p`` predicts token ``p + 1``; only the (row, position) pairs whose next token is a completion token
    go through the LM head (:func:`labelled_logits`). Other entries are zero, as in TRL's fused head, so sums over
    positions equal TRL's.
    """
    mask = inputs["completion_mask"][:, 1:].bool()
    targets = inputs["input_ids"][:, 1:][mask]
    model_kwargs = {k: v for k, v in inputs.items() if k not in _NOT_MODEL_INPUTS}
    _, logits = labelled_logits(model, model_kwargs, mask)
    # log_softmax casts to float32 itself: TRL's head also folds the logits in float32
    logps = F.log_softmax(logits, dim=-1, dtype=torch.float32)

    def spread(values: torch.Tensor) -> torch.Tensor:  # one value per labelled pair -> (rows x positions - 1)
        return torch.zeros(mask.shape, dtype=values.dtype, device=values.device).masked_scatter(mask, values)

    per_token = spread(logps.gather(-1, targets.unsqueeze(-1)).squeeze(-1))
    if not statistics:  # the reference needs only the log-probs: skip two more (positions x vocab) tensors
        return {"per_token": per_token, "mask": mask}
    with torch.no_grad():  # the statistics TRL's fused head returns for its metrics
        entropy = -(logps.exp() * logps).sum(-1)
        mean_logits = logits.float().mean(-1)
        is_top1 = logits.argmax(-1) == targets  # argmax takes the first maximum, like TRL's kernel
    return {"per_token": per_token, "mask": mask, "entropy": spread(entropy), "mean_logits": spread(mean_logits),
            "is_top1": spread(is_top1)}


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

    def compute_ref_log_probs(self, model: Any, inputs: dict[str, Any]) -> Any:
        reason = self._fallback_reason(model, inputs, return_outputs=False)
        if reason:
            self._note_fallback(reason)
            return super().compute_ref_log_probs(model, inputs)
        with (torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
              self._reference_context(), self.accelerator.autocast()):
            ref_logps = _completion_logps(model, inputs, statistics=False)["per_token"].sum(dim=1)
        return ref_logps.chunk(2, dim=0)

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
        policy = _completion_logps(model, inputs)
        per_token, mask = policy["per_token"], policy["mask"]
        chosen_logps, rejected_logps = per_token.sum(dim=1).chunk(2, dim=0)  # batch is [chosen, rejected]
        if self.precompute_ref_logps:
            ref_chosen_logps, ref_rejected_logps = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            reference = self.ref_model if self.ref_model is not None else self.model
            with (torch.no_grad(),
                  disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
                  self._reference_context()):
                ref_logps = _completion_logps(reference, inputs, statistics=False)["per_token"].sum(dim=1)
            ref_chosen_logps, ref_rejected_logps = ref_logps.chunk(2, dim=0)

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
