"""Crash test: SIGKILL ``scripts/run_recipe.py`` at random moments, re-run it, compare with an unbroken run.

Where it sits: a reliability check over the whole CLI path (runner → stages → artifacts), not a unit test.
It builds a tiny random model (the test fixtures' ``build_tiny_model``), writes a prepare → sft → dpo recipe,
runs it once without interruption (the reference), then per trial starts the same command as a child
process, kills it with SIGKILL (no cleanup code runs, like an OOM kill or a power cut), re-runs it until it
completes (a re-run may itself be killed again) and compares the final weights with the reference.

    python scripts/crash_test.py                       # 20 trials, fp32 (bit-exact resume expected)
    python scripts/crash_test.py --trials 6 --dtype auto --tolerance 1e-2   # the default bf16 on AMX CPUs
    python scripts/crash_test.py --trials 4 --jobs 2 --sft-steps 4 --dpo-steps 4  # quick (used by the tests)

Kill times are stratified over five phases of the reference run: prepare, sft setup (model load, dataset
tokenising), sft training (steps, checkpoints, final save), dpo setup (SFT merge, loads) and dpo training.
Trial ``i`` targets phase ``i mod 5`` and is killed a uniform random delay (seeded RNG) after the child
enters that phase (its "[stage] running" line, or its first logged training step), the delay spanning
the phase's length in the reference run. So every stage gets kills, from its first moment to its last
(including writing the manifest). A re-run is killed again with probability ``--rekill`` (at most 3 kills
per trial), which tests resuming a resumed run. Each completed trial's stages are also checked against
their manifests (every file's size and sha256, as ``run_recipe.py --verify`` does). The last line is
``trials=N resumed=R mismatches=M max_abs_diff=X``; the exit status is 1 when a trial's weights differ by
more than ``--tolerance``, a trial did not complete, or its files do not match its manifests.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import importlib.util
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's pipeline package (the integrity check), as run_recipe.py does
RUN_RECIPE = ROOT / "scripts" / "run_recipe.py"
STAGES = ("prepare", "sft", "dpo")
# Weight files compared with the reference: both adapters and the merged SFT model DPO starts from.
COMPARED = ("sft/adapter_model.safetensors", "dpo/adapter_model.safetensors", "dpo/sft_merged/model.safetensors")
MAX_RUNS_PER_TRIAL = 4  # the last allowed run is never killed, so every trial terminates

_RUNNING = re.compile(r"\[(\w+)\] running")
_DONE = re.compile(r"\[(\w+)\] done")
_SKIPPED = re.compile(r"\[(\w+)\] skipped")
_RESUMING = re.compile(r"resuming from .*checkpoint-(\d+)")
_TRAINING = "{'loss':"  # the Trainer's per-step log line (logging_steps: 1): the stage is training


def _fixtures() -> Any:
    """The test suite's tiny-model builders (tests/conftest.py), loaded by path: tests/ is no package."""
    spec = importlib.util.spec_from_file_location("pipeline_test_fixtures", ROOT / "tests" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_recipe(path: Path, output_dir: Path, model_dir: Path, data_dir: Path, sft_steps: int,
                 dpo_steps: int) -> Path:
    """A prepare → sft → dpo recipe on the tiny model that checkpoints every 2 steps."""
    trainer = "per_device_train_batch_size: 2, learning_rate: 1.0e-2, max_length: 128, save_steps: 2, logging_steps: 1"
    path.write_text(
        f"name: crash\n"
        f"output_dir: {output_dir}\n"
        f"model: {{name_or_path: {model_dir}, chat_template: chatml}}\n"
        f"data:\n"
        f"  sft: [{{path: {data_dir / 'sft.jsonl'}, format: alpaca}}]\n"
        f"  dpo: [{{path: {data_dir / 'prefs.jsonl'}}}]\n"
        f"  eval_fraction: 0.2\n"
        f"  seed: 1\n"
        f"lora: {{r: 4, lora_alpha: 8, target_modules: all-linear}}\n"
        f"sft: {{max_steps: {sft_steps}, {trainer}}}\n"
        f"dpo: {{max_steps: {dpo_steps}, {trainer}}}\n",
        encoding="utf-8",
    )
    return path


def build_workdir(work: Path) -> tuple[Path, Path]:
    """Tiny model + data under ``work``; returns (model_dir, data_dir)."""
    fixtures = _fixtures()
    model_dir = work / "model"
    if not (model_dir / "config.json").is_file():
        model_dir.mkdir(parents=True, exist_ok=True)
        fixtures.build_tiny_model(model_dir)
    data_dir = work / "data"
    fixtures.write_jsonl(data_dir / "sft.jsonl", fixtures.tiny_sft_rows())
    fixtures.write_jsonl(data_dir / "prefs.jsonl", fixtures.tiny_pref_rows())
    return model_dir, data_dir


@dataclasses.dataclass(frozen=True)
class Window:
    """A phase of the run to kill in: from when ``stage`` starts (``training``: its first logged step) for
    ``length`` seconds, as measured in the reference run."""

    stage: str
    training: bool
    length: float

    @property
    def name(self) -> str:
        return f"{self.stage} {'training' if self.training else 'setup'}" if self.stage != "prepare" else "prepare"


class _Progress:
    """Follows a child's output: the stage it is in, and whether that stage has started training."""

    def __init__(self) -> None:
        self.stage, self.training = "startup", False

    def feed(self, line: str) -> None:
        if m := _RUNNING.search(line):
            self.stage, self.training = m.group(1), False
        elif m := _DONE.search(line):
            self.stage, self.training = f"after {m.group(1)}", False
        elif _TRAINING in line:
            self.training = True

    def reached(self, window: Window) -> bool:
        return self.stage == window.stage and self.training >= window.training

    @property
    def label(self) -> str:
        if self.stage in ("sft", "dpo"):
            return f"{self.stage} {'training/saving' if self.training else 'setup'}"
        return self.stage


@dataclasses.dataclass
class RunResult:
    """One invocation of run_recipe.py."""

    returncode: int
    killed: bool
    elapsed: float
    lines: list[tuple[float, str]]
    kill_label: str = ""

    def resumed_work(self) -> list[str]:
        """What this run did not redo: skipped stages and checkpoints it resumed from."""
        found = []
        for _, line in self.lines:
            if m := _SKIPPED.search(line):
                found.append(f"{m.group(1)} skipped")
            elif m := _RESUMING.search(line):
                found.append(f"resumed@{m.group(1)}")
        return found


def _on_disk(output_dir: Path, label: str) -> str:
    """What the killed stage had written: its checkpoints (and for DPO, whether the merged SFT model)."""
    stage = label.removeprefix("after ").split(" ")[0]
    stage_dir = output_dir / stage
    # A checkpoint is complete once the Trainer has written its trainer_state.json (it writes it last).
    steps = sorted((int(p.name.split("-")[1]), (p / "trainer_state.json").is_file())
                   for p in (stage_dir / "checkpoints").glob("checkpoint-*"))
    parts = ["ckpts [" + ", ".join(f"{n}" if whole else f"{n} partial" for n, whole in steps) + "]"] if steps else []
    if stage == "dpo" and not label.startswith("after"):
        parts.append("merged" if (stage_dir / "sft_merged" / "config.json").is_file() else "not merged")
    return f" ({', '.join(parts)})" if parts else ""


def run_once(recipe: Path, extra: list[str], kill: tuple[Window, float] | None, log_path: Path,
             threads: int) -> RunResult:
    """Run the recipe as a child process; with ``kill = (window, delay)``, SIGKILL it ``delay`` seconds after
    it enters ``window``.

    Anchoring the kill on the child's own output ("[sft] running", its first logged step), rather than on
    the clock since start, keeps kills inside the intended phase when start-up time varies (a busy
    machine, a cold disk cache).
    """
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "OMP_NUM_THREADS": str(threads)}
    start = time.monotonic()
    child = subprocess.Popen([sys.executable, str(RUN_RECIPE), str(recipe), *extra], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    lines: list[tuple[float, str]] = []
    progress = _Progress()
    anchor: list[float] = []  # when the child entered the window to kill in

    def read() -> None:  # a thread, so the pipe never fills up while we wait for the kill moment
        for line in child.stdout:
            now = time.monotonic()
            lines.append((now - start, line.rstrip("\n")))
            progress.feed(line)
            if kill and not anchor and progress.reached(kill[0]):
                anchor.append(now)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    killed, label = False, ""
    while child.poll() is None:
        if kill and anchor and time.monotonic() >= anchor[0] + kill[1]:
            label = progress.label  # read before the kill: what the child had announced
            os.kill(child.pid, signal.SIGKILL)  # only the child we started, by pid
            child.wait()
            killed = True
            break
        time.sleep(0.005)
    reader.join()
    elapsed = time.monotonic() - start
    with open(log_path, "a", encoding="utf-8") as log:
        where = f"{kill[0].name} + {kill[1]:.2f}s" if kill else "none"
        log.write(f"$ run_recipe.py {recipe} {' '.join(extra)}  (kill: {where})\n")
        log.writelines(f"{t:7.2f} {line}\n" for t, line in lines)
        log.write(f"-> returncode {child.returncode}{' (SIGKILL)' if killed else ''} after {elapsed:.1f}s\n\n")
    return RunResult(child.returncode, killed, elapsed, lines, label)


def max_abs_diff(reference: Path, candidate: Path) -> float:
    """Largest absolute difference over all tensors of two safetensors files (inf if their keys differ)."""
    from safetensors.torch import load_file

    if not candidate.is_file():
        return float("inf")
    ref, got = load_file(reference), load_file(candidate)
    if ref.keys() != got.keys():
        return float("inf")
    return max(((ref[k].float() - got[k].float()).abs().max().item() for k in ref), default=0.0)


def leftovers(output_dir: Path) -> list[str]:
    """Files a finished run should not hold: checkpoints of complete stages, temp files, the lock."""
    found = [str(p.relative_to(output_dir)) for p in output_dir.rglob("*")
             if p.name == "checkpoints" or p.name == ".lock" or p.name.endswith(".tmp")]
    return sorted(found)


@dataclasses.dataclass
class TrialResult:
    index: int
    completed: bool
    resumed: bool
    kills: list[str]
    runs: int
    diffs: dict[str, float]
    what_resumed: list[str]
    manifest_resumed: dict[str, int]
    leftovers: list[str]
    seconds: float
    integrity: str = ""  # why the finished stages' files do not match their manifests, if they do not

    @property
    def max_diff(self) -> float:
        return max(self.diffs.values(), default=float("inf"))


def _manifest_resumes(output_dir: Path) -> dict[str, int]:
    import json

    found = {}
    for stage in ("sft", "dpo"):
        path = output_dir / stage / "manifest.json"
        if path.is_file():
            step = json.loads(path.read_text()).get("resumed_from_step", 0)
            if step:
                found[stage] = step
    return found


def integrity_problem(output_dir: Path) -> str:
    """The first stage whose files differ from what its manifest recorded (sizes and hashes), or ''."""
    from pipeline.artifacts import read_manifest, verify_stage
    from pipeline.errors import PipelineError

    for stage in STAGES:
        manifest = read_manifest(output_dir / stage)
        if manifest is None:
            return f"{stage}: no manifest"
        try:
            verify_stage(output_dir / stage, manifest, hashed=True)
        except PipelineError as exc:
            return str(exc)
    return ""


def run_trial(index: int, work: Path, windows: list[Window], args: argparse.Namespace, extra: list[str],
              reference: Path) -> TrialResult:
    """Kill one run inside window ``index mod len(windows)``, then re-run (maybe killing again) until done."""
    rng = random.Random(f"{args.seed}-{index}")  # per trial, so results do not depend on --jobs scheduling
    trial_dir = work / f"trial-{index:02d}"
    shutil.rmtree(trial_dir, ignore_errors=True)
    trial_dir.mkdir(parents=True)
    output_dir = trial_dir / "out"
    recipe = write_recipe(trial_dir / "recipe.yaml", output_dir, args.model_dir, args.data_dir,
                          args.sft_steps, args.dpo_steps)
    log_path = trial_dir / "log.txt"
    window = windows[index % len(windows)]
    kill: tuple[Window, float] | None = (window, rng.uniform(0.0, window.length))
    started = time.monotonic()
    kills: list[str] = []
    what_resumed: list[str] = []
    completed = False
    for attempt in range(MAX_RUNS_PER_TRIAL):
        result = run_once(recipe, extra, kill, log_path, args.threads)
        if attempt > 0:
            what_resumed += result.resumed_work()
        if result.killed:
            kills.append(f"{kill[0].name}+{kill[1]:.2f}s: in {result.kill_label}"
                         f"{_on_disk(output_dir, result.kill_label)}")
        elif result.returncode == 0:
            completed = True
            break
        else:
            break  # failed without being killed: a real error, see the trial's log.txt
        # Kill a re-run again now and then (resume from a resumed run), but the last run always finishes.
        last = attempt + 1 == MAX_RUNS_PER_TRIAL - 1
        if last or rng.random() >= args.rekill:
            kill = None
        else:
            window = rng.choice(windows)
            kill = (window, rng.uniform(0.0, window.length))
    diffs = {}
    if completed:
        diffs = {name: max_abs_diff(reference / name, output_dir / name) for name in COMPARED}
    return TrialResult(index, completed, bool(what_resumed), kills, attempt + 1, diffs, what_resumed,
                       _manifest_resumes(output_dir), leftovers(output_dir) if completed else [],
                       time.monotonic() - started, integrity_problem(output_dir) if completed else "")


def _format(trial: TrialResult) -> str:
    diffs = " ".join(f"{name.split('/')[0]}{'/merged' if 'merged' in name else ''}={value:.3g}"
                     for name, value in trial.diffs.items())
    status = "ok" if trial.completed else "DID NOT COMPLETE"
    resumed = ", ".join(trial.what_resumed) or "nothing (started from zero)"
    extra = f" manifest resumed_from_step={trial.manifest_resumed}" if trial.manifest_resumed else ""
    left = f" leftovers={trial.leftovers}" if trial.leftovers else ""
    integrity = f" INTEGRITY: {trial.integrity}" if trial.integrity else ""
    return (f"trial {trial.index:02d}: kills=[{'; '.join(trial.kills) or 'none (run finished first)'}] "
            f"runs={trial.runs} reused: {resumed};{extra} {status} max_abs_diff {diffs} "
            f"({trial.seconds:.0f}s){left}{integrity}")


def reference_run(work: Path, args: argparse.Namespace, extra: list[str]) -> tuple[Path, RunResult]:
    ref_dir = work / "reference"
    shutil.rmtree(ref_dir, ignore_errors=True)
    ref_dir.mkdir(parents=True)
    recipe = write_recipe(ref_dir / "recipe.yaml", ref_dir / "out", args.model_dir, args.data_dir,
                          args.sft_steps, args.dpo_steps)
    result = run_once(recipe, extra, None, ref_dir / "log.txt", args.threads)
    if result.returncode != 0:
        tail = "\n".join(line for _, line in result.lines[-20:])
        raise SystemExit(f"the reference run failed (exit {result.returncode}):\n{tail}")
    return ref_dir / "out", result


def kill_windows(result: RunResult) -> list[Window]:
    """The reference run cut into phases: prepare, then setup (load, merge, tokenise) and training (steps,
    checkpoints, final save) of sft and dpo. Each phase ends where the next one starts."""
    progress, marks = _Progress(), []
    for t, line in result.lines:
        before = (progress.stage, progress.training)
        progress.feed(line)
        if (progress.stage, progress.training) != before:
            marks.append((t, progress.stage, progress.training))
    windows = []
    for (t, stage, training), (t_next, _, _) in zip(marks, marks[1:], strict=False):
        if stage in STAGES:
            windows.append(Window(stage, training, t_next - t))
    found = {w.name for w in windows}
    expected = ["prepare", "sft setup", "sft training", "dpo setup", "dpo training"]
    if [name for name in expected if name not in found]:
        raise SystemExit(f"the reference run did not show every phase {expected}; found {sorted(found)}")
    return windows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill times")
    parser.add_argument("--dtype", default="float32", help="model.dtype for every run (auto = bf16 on AMX CPUs)")
    parser.add_argument("--tolerance", type=float, default=1e-6, help="largest allowed weight difference")
    parser.add_argument("--sft-steps", type=int, default=16)
    parser.add_argument("--dpo-steps", type=int, default=14)
    parser.add_argument("--rekill", type=float, default=0.3, help="chance that a re-run is killed again")
    parser.add_argument("--phases", help="kill only in these phases (comma-separated, e.g. 'sft training,dpo "
                        "training'); default: all of prepare, sft setup, sft training, dpo setup, dpo training")
    parser.add_argument("--threads", type=int, default=1,
                        help="OMP_NUM_THREADS of every run (same for all, so results stay comparable)")
    parser.add_argument("--jobs", type=int, default=1, help="trials run side by side (timings get noisier)")
    parser.add_argument("--work-dir", type=Path, help="default: a fresh temporary directory")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, outputs)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="crash-test-"))
    work.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    try:
        args.model_dir, args.data_dir = build_workdir(work)
        extra = ["--set", f"model.dtype={args.dtype}"]
        reference, ref = reference_run(work, args, extra)
        windows = kill_windows(ref)
        if args.phases:
            wanted = [name.strip() for name in args.phases.split(",")]
            unknown = sorted(set(wanted) - {w.name for w in windows})
            if unknown:
                raise SystemExit(f"--phases: unknown {unknown}; choose from {[w.name for w in windows]}")
            windows = [w for w in windows if w.name in wanted]
        print(f"reference run: {ref.elapsed:.1f}s; kill windows "
              + ", ".join(f"{w.name} {w.length:.2f}s" for w in windows) + f"; work dir {work}", flush=True)
        trials: list[TrialResult] = []
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(args.jobs, 1)) as pool:
            futures = [pool.submit(run_trial, i, work, windows, args, extra, reference)
                       for i in range(args.trials)]
            for future in concurrent.futures.as_completed(futures):
                trials.append(future.result())
                print(_format(trials[-1]), flush=True)
        trials.sort(key=lambda t: t.index)
        by_phase: dict[str, int] = {}
        for trial in trials:
            for kill in trial.kills:
                phase = kill.split(": in ", 1)[1].split(" (")[0]
                by_phase[phase] = by_phase.get(phase, 0) + 1
        incomplete = sum(not t.completed for t in trials)
        unverified = sum(bool(t.integrity) for t in trials)
        mismatches = sum(t.completed and t.max_diff > args.tolerance for t in trials)
        worst = max((t.max_diff for t in trials if t.completed), default=0.0)
        print(f"kills by phase: {dict(sorted(by_phase.items()))}; incomplete trials: {incomplete}; "
              f"files not matching their manifests: {unverified}; dtype={args.dtype}; "
              f"wall {time.monotonic() - began:.0f}s")
        print(f"trials={len(trials)} resumed={sum(t.resumed for t in trials)} mismatches={mismatches} "
              f"max_abs_diff={worst:.3g}", flush=True)
        return 1 if mismatches or incomplete or unverified else 0
    finally:
        if not args.keep and args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
