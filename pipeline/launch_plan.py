"""Launch plan: the GPU memory a recipe's training stages need, from the recipe and the model's ``config.json``.

Sits beside :mod:`pipeline.config` (recipe + ``config.json`` in, numbers out): it never imports torch at module
level, never loads weights and never writes a file. ``run_recipe.py RECIPE --dry-run`` prints what it computes
(see ``docs/recipes.md``).

The estimate is a sum of named parts per training stage, each with the formula in :func:`estimate_stage`:
weights, LoRA adapter (+ trained template-token rows), gradients and AdamW state, activations (with and without
activation checkpointing), logits, the DPO reference, the merge of the SFT adapter before DPO, and the CUDA
context. It is an upper bound on the tokens (every sequence padded or packed to ``max_length``), so a run on
shorter conversations peaks lower.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

from pipeline.config import Recipe
from pipeline.errors import PipelineError

GIB = 1024**3
MIB = 1024**2
# CUDA context, cuBLAS workspaces and kernels: 300 MiB to 1 GiB depending on GPU and driver; what
# torch.cuda.memory_allocated does not see but nvidia-smi does.
CUDA_CONTEXT_BYTES = 768 * MIB
# The caching allocator rounds blocks up and fragments; measured peaks "reserved" run a few % above "allocated".
ALLOCATOR_SLACK = 0.05
# bitsandbytes NF4 (QLoRA, models.quantization_config): 4 bits a weight, one absmax per block of 64 weights;
# with double quantization the absmax is stored in 8 bits plus one fp32 per 256 blocks (QLoRA paper, sec. 3).
NF4_BYTES = 0.5 + 4 / 64
NF4_DOUBLE_QUANT_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
# TRL's fused LM head (DPO always; SFT without trained template tokens on a GPU) scores tiles of
# 4096 tokens x 32768 vocabulary entries instead of whole logits (trl/kernels/chunked_logprob.py).
FUSED_TOKEN_TILE = 4096
FUSED_VOCAB_TILE = 32768
_DTYPE_BYTES = {"bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2, "float32": 4, "fp32": 4}
_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


# ----------------------------------------------------------------------------------------------- model shape
@dataclasses.dataclass(frozen=True)
class ModelShape:
    """The architecture numbers the estimate needs (a decoder-only transformer with a gated MLP)."""

    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    norms_per_layer: int = 2  # RMSNorms on the residual stream per layer (Gemma 3 has four)
    qk_norm: bool = False  # per-head RMSNorm on queries and keys (Gemma 3, Qwen 3)
    qkv_bias: bool = False

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ModelShape:
        """Read a Hugging Face ``config.json`` (multimodal ones through their ``text_config``)."""
        cfg = config.get("text_config") or config
        try:
            hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
            model_type = str(cfg.get("model_type", config.get("model_type", "")))
            gemma3 = model_type.startswith("gemma3")
            return cls(
                model_type=model_type,
                hidden=hidden,
                layers=int(cfg["num_hidden_layers"]),
                heads=heads,
                kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                intermediate=int(cfg["intermediate_size"]),
                vocab=int(cfg["vocab_size"]),
                tied=bool(cfg.get("tie_word_embeddings", config.get("tie_word_embeddings", True))),
                norms_per_layer=4 if gemma3 or model_type.startswith("gemma2") else 2,
                qk_norm=gemma3 or model_type.startswith("qwen3"),
                qkv_bias=model_type == "qwen2" or bool(cfg.get("attention_bias")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise PipelineError(f"The model's config.json lacks a field the memory estimate needs ({exc}).") from exc

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linear_layers(self) -> dict[str, tuple[int, int]]:
        """The linear layers of one decoder layer: name -> (in_features, out_features)."""
        h, i = self.hidden, self.intermediate
        return {"q_proj": (h, self.q_dim), "k_proj": (h, self.kv_dim), "v_proj": (h, self.kv_dim),
                "o_proj": (self.q_dim, h), "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def linear_params(self) -> int:
        """Parameters in the decoder layers' linear weights (what 4-bit quantization packs)."""
        return self.layers * sum(a * b for a, b in self.linear_layers().values())

    @property
    def other_params(self) -> int:
        """Embeddings, LM head (when untied), norms and biases: kept in the compute dtype even under QLoRA."""
        norms = self.layers * (self.norms_per_layer * self.hidden + (2 * self.head_dim if self.qk_norm else 0))
        bias = self.layers * (self.q_dim + 2 * self.kv_dim) if self.qkv_bias else 0
        head = 0 if self.tied else self.vocab * self.hidden
        return self.vocab * self.hidden + head + norms + bias + self.hidden

    @property
    def params(self) -> int:
        return self.linear_params + self.other_params

    def describe(self) -> str:
        tied = "tied" if self.tied else "untied"
        return (f"{self.params / 1e6:,.0f} M parameters ({self.model_type or 'decoder'}: {self.layers} layers, hidden "
                f"{self.hidden}, {self.heads}/{self.kv_heads} heads, MLP {self.intermediate}, vocabulary "
                f"{self.vocab:,}, {tied} embeddings)")


# ----------------------------------------------------------------------------------------------- estimate
@dataclasses.dataclass
class MemoryPart:
    name: str
    bytes: float
    note: str = ""


@dataclasses.dataclass
class StageEstimate:
    """The memory one training stage needs on one device: its parts and the peak they add up to."""

    stage: str
    device: str
    setting: str  # batch x tokens, checkpointing, dtypes: what the numbers assume
    parts: list[MemoryPart]
    activation_checkpointing: bool
    activations_other: float  # activations with the other activation_checkpointing setting
    merge_peak: float = 0.0  # DPO start: merge: the SFT adapter merged into full-precision weights first

    @property
    def training_peak(self) -> float:
        tensors = sum(p.bytes for p in self.parts if p.name != "CUDA context")
        context = sum(p.bytes for p in self.parts if p.name == "CUDA context")
        return tensors * (1 + ALLOCATOR_SLACK) + context

    @property
    def peak(self) -> float:
        return max(self.training_peak, self.merge_peak)


def _dtype_bytes(name: str) -> int:
    if name not in _DTYPE_BYTES:
        raise PipelineError(f"model.dtype must be auto, bfloat16, float16 or float32, got {name!r}.")
    return _DTYPE_BYTES[name]


def compute_dtype_bytes(model_cfg: dict[str, Any], device: str) -> int:
    """Bytes per element of weights and activations: ``dtype: auto`` is bf16 on a GPU (Ampere or newer), fp32 on
    a CPU without a bf16 fast path (models.resolve_dtype decides at run time)."""
    if model_cfg["dtype"] != "auto":
        return _dtype_bytes(model_cfg["dtype"])
    if device == "cuda":
        return 2
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return 4
    return 2 if re.search(r"\b(amx_bf16|avx512_bf16)\b", flags) else 4


def lora_targets(shape: ModelShape, target_modules: Any) -> list[str]:
    """Which of a decoder layer's linear layers the recipe's ``lora.target_modules`` adapts."""
    names = list(shape.linear_layers())
    if target_modules in (None, "all-linear"):
        return names  # peft: every linear layer except the output head
    if isinstance(target_modules, str):  # peft: a regex matched against the full module name
        return [n for n in names if re.fullmatch(target_modules, f"model.layers.0.x.{n}")
                or re.fullmatch(target_modules, n)]
    return [n for n in names if any(n == t or n.endswith(str(t)) for t in target_modules)]


def lora_params(shape: ModelShape, rank: int, targets: list[str]) -> int:
    """LoRA A (r x in) and B (out x r) for every adapted layer."""
    layers = shape.linear_layers()
    return shape.layers * sum(rank * (layers[n][0] + layers[n][1]) for n in targets)


def activation_bytes_per_token(shape: ModelShape, b: int, targets: list[str], adapter_cast: bool,
                               lora_dropout: bool = False) -> float:
    """Bytes one decoder layer keeps for backward, per token, without activation checkpointing.

    Counted the way Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models",
    sec. 4.1) count GPT's 34·s·b·h, adapted to this stack (b = bytes of the compute dtype):
    - each RMSNorm keeps its input in float32 (transformers' RMSNorm upcasts): 4·h per norm, 4·head_dim per
      q/k-norm head;
    - attention (sdpa: flash / memory-efficient kernels keep no seq x seq matrix): q, k, v after RoPE and the
      output: b·(2·q_dim + 2·kv_dim);
    - gated MLP: the gate output (for the activation), the activation output and the up output (for the
      product): 3·b·intermediate;
    - frozen base weights keep no input for their (absent) weight gradient, but every LoRA-adapted layer keeps its
      input for LoRA A's gradient: shared with the tensors above when the adapter has the compute dtype,
      a separate copy per adapted layer when it does not (peft casts the input to the fp32 adapter's dtype, and
      autocast back: b·in_features each);
    - with ``lora_dropout`` > 0 each adapted layer's dropped-out input is a new tensor plus a one-byte mask:
      (b + 1)·in_features each, whatever the dtypes.
    attention_dropout is 0 in these models. The LoRA rank-r intermediates are negligible.
    """
    h = shape.hidden
    norms = 4 * h * shape.norms_per_layer + (4 * shape.head_dim * (shape.heads + shape.kv_heads) if shape.qk_norm
                                             else 0)
    attention = b * (2 * shape.q_dim + 2 * shape.kv_dim)
    mlp = 3 * b * shape.intermediate
    layers = shape.linear_layers()
    if lora_dropout:
        lora = sum((b + 1) * layers[n][0] for n in targets)
    elif adapter_cast:
        lora = sum(b * layers[n][0] for n in targets)
    else:  # inputs shared: the attention-norm output, the attention output (o_proj's input, already counted
        # by sdpa but reshaped into a contiguous copy), the MLP-norm output, the MLP product (down_proj's input)
        lora = (b * h * any(n in targets for n in ("q_proj", "k_proj", "v_proj"))
                + b * shape.q_dim * ("o_proj" in targets)
                + b * h * any(n in targets for n in ("gate_proj", "up_proj"))
                + b * shape.intermediate * ("down_proj" in targets))
    return norms + attention + mlp + lora


def _optimizer_state_bytes(optim: str, param_bytes: int) -> int:
    """Bytes of optimizer state per trainable parameter (AdamW: two moments)."""
    if "8bit" in optim:
        return 2  # bitsandbytes 8-bit AdamW: one byte per moment
    if "32bit" in optim or optim.startswith(("paged_adamw", "adamw_bnb")):
        return 8  # bitsandbytes 32-bit: fp32 moments whatever the parameter dtype
    return 2 * param_bytes  # torch AdamW keeps its moments in the parameter's dtype


def _weights_part(shape: ModelShape, b: int, four_bit: bool) -> MemoryPart:
    """4-bit NF4 packs the decoder layers' linear weights; embeddings, head and norms stay in the compute dtype
    (bitsandbytes quantizes nn.Linear layers only, and transformers keeps the LM head out)."""
    if four_bit:
        return MemoryPart("weights", shape.linear_params * NF4_DOUBLE_QUANT_BYTES + shape.other_params * b,
                          f"NF4 + double quant {NF4_DOUBLE_QUANT_BYTES * 8:.2f} bits/weight on "
                          f"{shape.linear_params / 1e6:,.0f} M, {b * 8}-bit rest")
    return MemoryPart("weights", shape.params * b, f"{shape.params / 1e6:,.0f} M x {b} bytes")


def _trainable_parts(shape: ModelShape, lora: dict[str, Any], adapter: int, template_rows: int, adapter_bytes: int,
                     b: int, optim: str) -> list[MemoryPart]:
    """LoRA A/B (+ the template-token rows SFT trains), the embedding copy those rows cost, gradients and AdamW."""
    trainable = adapter + template_rows
    parts = [MemoryPart("LoRA adapter", trainable * adapter_bytes,
                        f"r {lora['r']}, {adapter / 1e6:.1f} M params"
                        + (" + template-token rows" if template_rows else "") + f", {adapter_bytes * 8}-bit")]
    if template_rows:
        # peft's trainable-token layer writes the trained rows into a full copy of the embedding matrix on every
        # forward (TrainableTokensLayer.get_merged_weights); the tied LM head keeps that copy for its backward
        parts.append(MemoryPart("template-token copy", shape.vocab * shape.hidden * b,
                                "peft trainable tokens: embedding matrix copy with the trained rows"))
    state = _optimizer_state_bytes(optim, adapter_bytes)
    parts.append(MemoryPart("gradients + optimizer", trainable * (adapter_bytes + state),
                            f"{optim}: gradient {adapter_bytes} + state {state} bytes per trainable param"))
    return parts


def _logits_part(shape: ModelShape, tokens: int, b: int, labelled_positions_loss: bool) -> MemoryPart:
    """SFT's labelled-positions loss (stages/sft.py: on CPU, and whenever template tokens train) materialises
    positions x vocabulary in the compute dtype, a float32 log-softmax kept for backward and its float32 gradient.
    TRL's fused head (DPO; SFT otherwise) scores one tile at a time."""
    if labelled_positions_loss:
        return MemoryPart("logits", tokens * shape.vocab * (b + 4 + 4),
                          f"{tokens:,} positions x {shape.vocab:,} x (b + fp32 log-softmax + its fp32 gradient); "
                          "every position labelled")
    return MemoryPart("logits", _fused_tile(shape, tokens) * (b + 4) + tokens * shape.hidden * 4,
                      "TRL fused LM head: one 4096 x 32768 tile + fp32 hidden gradient")


def _fused_tile(shape: ModelShape, tokens: int) -> int:
    return min(tokens, FUSED_TOKEN_TILE) * min(shape.vocab, FUSED_VOCAB_TILE)


def _reference_part(shape: ModelShape, section: dict[str, Any], tokens: int, b: int, adapter_bytes: float
                    ) -> MemoryPart:
    if section.get("precompute_ref_log_probs"):
        return MemoryPart("reference", 0, "log-probs precomputed before training")
    # The reference is the same model with the adapter disabled (start: merge: the merged SFT model), run without
    # gradients after the policy's forward: two hidden states and one MLP intermediate at a time plus one logits
    # tile, on top of the policy's activations
    ref = tokens * b * (2 * shape.hidden + 2 * shape.intermediate) + _fused_tile(shape, tokens) * (b + 4)
    if section.get("start") == "continue_adapter":
        ref += adapter_bytes  # TRL's frozen copy of the SFT adapter
    return MemoryPart("reference", ref, "no-grad forward each step (precompute_ref_log_probs: false)")


def estimate_stage(recipe: Recipe, stage: str, shape: ModelShape, device: str = "cuda",
                   overrides: dict[str, Any] | None = None) -> StageEstimate:
    """Memory one device needs for training stage ``stage`` ("sft" or "dpo") of ``recipe``.

    ``overrides`` replaces keys of the stage section (and ``load_in_4bit`` of the model section) to answer
    "what if": the advice printed when a stage does not fit is computed with it.
    """
    section = {**(getattr(recipe, stage) or {}), **(overrides or {})}
    model_cfg = {**recipe.model, **{k: v for k, v in (overrides or {}).items() if k in recipe.model}}
    lora = recipe.stage_lora(stage)
    b = compute_dtype_bytes(model_cfg, device)
    four_bit = bool(model_cfg["load_in_4bit"]) and device == "cuda"
    targets = lora_targets(shape, lora["target_modules"])
    adapter = lora_params(shape, int(lora["r"]), targets)
    # the template's control tokens (turn start and end, + one to spare) get trained embedding rows in SFT
    template_rows = 3 * shape.hidden if stage == "sft" and lora.get("train_template_tokens") else 0
    # fp32 adapters (peft's default) unless the recipe asks for the model's dtype; TRL casts QLoRA adapters to bf16
    adapter_bytes = 2 if four_bit else (b if lora.get("adapter_dtype") == "model" else 4)
    parts = [_weights_part(shape, b, four_bit),
             *_trainable_parts(shape, lora, adapter, template_rows, adapter_bytes, b,
                               str(section.get("optim") or "adamw_torch"))]

    # Activations: every sequence padded or packed to max_length (an upper bound); DPO runs chosen and rejected
    batch = int(section.get("per_device_train_batch_size") or 8)
    max_length = int(section.get("max_length") or 1024)
    tokens = batch * max_length * (2 if stage == "dpo" else 1)
    per_token = activation_bytes_per_token(shape, b, targets, adapter_cast=adapter_bytes != b,
                                           lora_dropout=float(lora.get("lora_dropout") or 0) > 0)
    outside = tokens * (b * shape.hidden + 4 * shape.hidden)  # the embedding output, the final norm's fp32 input
    full = tokens * shape.layers * per_token + outside
    # with checkpointing each layer keeps only its input; backward recomputes one layer at a time
    checkpointed = tokens * shape.layers * b * shape.hidden + tokens * per_token + outside
    ckpt = bool(section.get("activation_checkpointing") or section.get("gradient_checkpointing"))
    parts.append(MemoryPart("activations", checkpointed if ckpt else full,
                            f"{tokens:,} tokens x {shape.layers} layers x {per_token / 1024:.1f} KiB"
                            + (", checkpointed" if ckpt else "")))
    parts.append(_logits_part(shape, tokens, b, stage == "sft" and (device == "cpu" or template_rows > 0)))

    merge_peak = 0.0
    if stage == "dpo":
        parts.append(_reference_part(shape, section, tokens, b, adapter * adapter_bytes))
        if section.get("start", "merge") == "merge":
            # dpo.merge_sft_adapter: base weights in the compute dtype (never 4-bit) + the SFT adapter, before training
            merge_peak = (shape.params * b + (adapter + 3 * shape.hidden) * 4) * (1 + ALLOCATOR_SLACK)
            merge_peak += CUDA_CONTEXT_BYTES if device == "cuda" else 0
    if device == "cuda":
        parts.append(MemoryPart("CUDA context", CUDA_CONTEXT_BYTES, "context, cuBLAS workspace, kernels"))

    setting = (f"batch {batch} x {max_length} tokens" + (" x 2 (chosen + rejected)" if stage == "dpo" else "")
               + f", activation checkpointing {'on' if ckpt else 'off'}, {b * 8}-bit compute"
               + (", 4-bit base" if four_bit else ""))
    return StageEstimate(stage, device, setting, parts, ckpt, full if ckpt else checkpointed, merge_peak)


# ----------------------------------------------------------------------------------------------- fit and advice
def parse_memory(text: str) -> int:
    """``24GiB``, ``24GB`` (read as GiB, as GPU makers' "24 GB" cards hold 24 GiB), ``80G``, ``16384MiB`` -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B?)\s*", text, flags=re.IGNORECASE)
    if not match:
        raise PipelineError(f"--gpu-memory {text!r}: give a size like 24GiB, 80GB or 16384MiB.")
    number, unit = float(match.group(1)), match.group(2).upper()
    if not unit:
        unit = "G"  # a bare number: GiB
    return int(number * 1024 ** "KMGT".index(unit) * 1024)


def format_bytes(value: float) -> str:
    if value >= GIB:
        return f"{value / GIB:.2f} GiB"
    return f"{value / MIB:.0f} MiB"


def advice(recipe: Recipe, stage: str, shape: ModelShape, budget: float) -> list[str]:
    """Changes that bring a stage that does not fit under ``budget``, each with the peak it would give."""
    section = getattr(recipe, stage) or {}
    base = estimate_stage(recipe, stage, shape)
    options: list[tuple[str, dict[str, Any]]] = []
    if not base.activation_checkpointing:
        options.append((f"{stage}.activation_checkpointing=true", {"activation_checkpointing": True}))
    batch = int(section.get("per_device_train_batch_size") or 8)
    accumulation = int(section.get("gradient_accumulation_steps") or 1)
    smaller = batch
    while smaller > 1:  # halve until it fits (same global batch through gradient accumulation)
        smaller //= 2
        factor = batch // smaller
        options.append((f"{stage}.per_device_train_batch_size={smaller} "
                        f"{stage}.gradient_accumulation_steps={accumulation * factor}",
                        {"per_device_train_batch_size": smaller}))
        if estimate_stage(recipe, stage, shape, overrides=options[-1][1]).peak <= budget:
            break
    max_length = int(section.get("max_length") or 1024)
    if max_length > 512:
        options.append((f"{stage}.max_length={max_length // 2}", {"max_length": max_length // 2}))
    if not recipe.model["load_in_4bit"]:
        options.append(("model.load_in_4bit=true (QLoRA)", {"load_in_4bit": True}))
    if not base.activation_checkpointing and batch > 1:
        options.append((f"{stage}.activation_checkpointing=true {stage}.per_device_train_batch_size={batch // 2} "
                        f"{stage}.gradient_accumulation_steps={accumulation * 2}",
                        {"activation_checkpointing": True, "per_device_train_batch_size": batch // 2}))
    lines = []
    for text, change in options:
        peak = estimate_stage(recipe, stage, shape, overrides=change).peak
        verdict = "fits" if peak <= budget else "still too much"
        lines.append(f"--set {text}  ->  {format_bytes(peak)} ({verdict})")
    return lines


def plan_memory(recipe: Recipe, shape: ModelShape, device: str = "cuda") -> list[StageEstimate]:
    """Estimates for the recipe's training stages, in pipeline order."""
    return [estimate_stage(recipe, stage, shape, device) for stage in ("sft", "dpo") if getattr(recipe, stage)]


def render_estimate(recipe: Recipe, shape: ModelShape, budget: float | None, budget_source: str,
                    device: str = "cuda") -> tuple[list[str], bool]:
    """Printable lines for every training stage, and whether all of them fit ``budget`` (True without one)."""
    lines, fits = [], True
    where = "one GPU" if device == "cuda" else "CPU RAM"
    for estimate in plan_memory(recipe, shape, device):
        lines.append(f"  {estimate.stage}: {estimate.setting}")
        for part in estimate.parts:
            lines.append(f"    {part.name:<24}{format_bytes(part.bytes):>12}   {part.note}")
        other = "off" if estimate.activation_checkpointing else "on"
        lines.append(f"    {'  (checkpointing ' + other + ')':<24}{format_bytes(estimate.activations_other):>12}   "
                     f"activations with activation_checkpointing {other}")
        if estimate.merge_peak:
            lines.append(f"    {'merge before training':<24}{format_bytes(estimate.merge_peak):>12}   "
                         "SFT adapter merged into full-precision weights (dpo.start: merge), then freed")
        lines.append(f"    {'peak on ' + where:<24}{format_bytes(estimate.peak):>12}   "
                     f"(tensors + {ALLOCATOR_SLACK:.0%} allocator slack"
                     + (" + CUDA context)" if device == "cuda" else ")"))
        if budget is not None:
            if estimate.peak <= budget:
                lines.append(f"    fits in {format_bytes(budget)} ({budget_source}), "
                             f"{estimate.peak / budget:.0%} used")
            else:
                fits = False
                lines.append(f"    WARNING: {estimate.stage} needs {format_bytes(estimate.peak)} and will not fit in "
                             f"{format_bytes(budget)} ({budget_source}). Change one of:")
                lines.extend(f"      {line}" for line in advice(recipe, estimate.stage, shape, budget))
    return lines, fits
