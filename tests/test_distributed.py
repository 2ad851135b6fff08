"""Two processes under ``accelerate launch`` on CPU (gloo): data-parallel training that equals one process.

Each launch is the documented ``accelerate launch --config_file recipes/accelerate/ddp.yaml scripts/run_recipe.py``
in a subprocess (torchrun starts two processes, which join over gloo on this CPU-only machine); the reference runs
are one process, in this test process, with the
same global batch: ``per_device_train_batch_size`` 2 in one process vs 1 in each of two. fp32, no dropout, one seed:
the Trainer's seeded sampler gives process k the batches k, k+2, ... of one permutation, which is exactly the
one-process batch of two, so the adapters agree to float rounding (measured: 4e-7; a global batch of one differs
by 5e-2).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_pref_rows, tiny_sft_rows, write_jsonl
from safetensors.torch import load_file

from pipeline.config import validate_recipe
from pipeline.runner import run_recipe

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = ROOT / "recipes" / "accelerate"
TOLERANCE = 1e-5  # float rounding of a sum split over two processes; different batches differ by >1e-3
EVAL_PROMPTS = [
    {"key": 1, "prompt": "Name a fruit. Do not use any commas.", "instruction_id_list": ["punctuation:no_comma"],
     "kwargs": [{}]},
    {"key": 2, "prompt": "Describe the sea. Answer in all lowercase letters.",
     "instruction_id_list": ["change_case:english_lowercase"], "kwargs": [{}]},
]
INTERRUPT_AFTER_STEP_2 = '''
import sys
from transformers import TrainerCallback
import pipeline.stages.sft as sft_stage
from pipeline.cli import main_run_recipe

class InterruptAfterSaving(TrainerCallback):  # stands in for a kill right after checkpoint-2, in every process
    def on_save(self, args, state, control, **kwargs):
        if state.global_step == 2:
            raise KeyboardInterrupt

sft_stage.StopOnNonFiniteLoss = InterruptAfterSaving  # our own module, as in test_reliability
sys.exit(main_run_recipe())
'''


def _recipe(root: Path, name: str, per_device: int, model_dir: Path, stages: tuple[str, ...]) -> dict:
    trainer = {"max_steps": 4, "per_device_train_batch_size": per_device, "learning_rate": 1.0e-2,
               "max_length": 128, "save_steps": 2, "logging_steps": 1}
    raw = {
        "name": name,
        "output_dir": str(root / "runs" / name),
        "model": {"name_or_path": str(model_dir), "chat_template": "chatml", "dtype": "float32"},
        "data": {"sft": [{"path": str(root / "sft.jsonl"), "format": "alpaca"}],
                 "dpo": [{"path": str(root / "prefs.jsonl")}], "eval_fraction": 0.2, "seed": 1},
        "lora": {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"},
        "sft": trainer,
        # TRL's precomputed reference log-probs are computed on each process's shard and gathered back in order
        "dpo": {**trainer, "precompute_ref_log_probs": True},
        "eval": {"prompts": str(root / "prompts.jsonl"), "models": ["dpo"], "max_new_tokens": 2, "batch_size": 2},
    }
    return {key: value for key, value in raw.items() if key not in ("sft", "dpo", "eval") or key in stages}


def _write(raw: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def _free_port() -> int:  # other test runs on this machine may hold accelerate's default 29500
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(*args: str, script: Path = ROOT / "scripts" / "run_recipe.py", config: Path | None = ACCELERATE / "ddp.yaml",
            launch_args: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    for name in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "ACCELERATE_USE_CPU"):
        env.pop(name, None)
    command = [sys.executable, "-m", "accelerate.commands.launch", *launch_args]
    if config is not None:
        command += ["--config_file", str(config), "--main_process_port", str(_free_port())]
    return subprocess.run([*command, str(script), *args], env=env, capture_output=True, text=True, timeout=900)


def _adapter(run: dict, stage: str) -> dict[str, torch.Tensor]:
    return load_file(str(Path(run["output_dir"]) / stage / "adapter_model.safetensors"))


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[key] - b[key]).abs().max().item() for key in a)


def _history(run: dict, stage: str) -> list[dict]:
    rows = json.loads((Path(run["output_dir"]) / stage / "log_history.json").read_text())
    return [row for row in rows if "loss" in row]


def _manifest(run: dict, stage: str) -> dict:
    return json.loads((Path(run["output_dir"]) / stage / "manifest.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict:
    """Data, and the one-process reference runs: global batch 2 (the SFT, DPO and eval stages) and 1 (SFT)."""
    root = tmp_path_factory.mktemp("distributed")
    write_jsonl(root / "sft.jsonl", tiny_sft_rows())
    write_jsonl(root / "prefs.jsonl", tiny_pref_rows())
    write_jsonl(root / "prompts.jsonl", EVAL_PROMPTS)
    one = _recipe(root, "one_process_batch_2", 2, tiny_model_dir, ("sft", "dpo", "eval"))
    batch_1 = _recipe(root, "one_process_batch_1", 1, tiny_model_dir, ("sft",))
    for raw in (one, batch_1):
        run_recipe(validate_recipe(raw), log=lambda _: None)
    return {"root": root, "model": tiny_model_dir, "one_process": one, "batch_1": batch_1}


def test_two_processes_train_like_one_process_with_the_same_global_batch(runs):
    two = _recipe(runs["root"], "two_processes", 1, runs["model"], ("sft", "dpo", "eval"))
    recipe = _write(two, runs["root"] / "two_processes.yaml")
    launched = _launch(str(recipe))
    assert launched.returncode == 0, launched.stderr[-3000:]

    one = runs["one_process"]
    for stage in ("sft", "dpo"):
        assert _max_difference(_adapter(two, stage), _adapter(one, stage)) < TOLERANCE, stage
        # the logged loss and gradient norm too (the Trainer averages them over the processes)
        for mine, reference in zip(_history(two, stage), _history(one, stage), strict=True):
            assert mine["loss"] == pytest.approx(reference["loss"], rel=1e-5)
            assert mine["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-4)
        assert _manifest(two, stage)["processes"] == 2
    # the tolerance tells global batches apart: one process with a global batch of 1 is far off
    assert _max_difference(_adapter(two, "sft"), _adapter(runs["batch_1"], "sft")) > 1e-3

    # one manifest per stage, written once by the main process; no leftovers; eval ran on the main process
    out = Path(two["output_dir"])
    for stage in ("prepare", "sft", "dpo", "eval"):
        assert _manifest(two, stage)["stage"] == stage
        assert launched.stdout.count(f"[{stage}] running") == 1 and launched.stdout.count(f"[{stage}] done") == 1
        assert not (out / stage / "checkpoints").exists() and not (out / stage / "in_progress.json").exists()
    assert (out / "eval" / "generations_dpo.jsonl").is_file()
    assert launched.stdout.count("finished two_processes") == 1

    # a second launch finds everything done: every stage skipped, nothing rewritten
    finished = {stage: _manifest(two, stage)["finished_at"] for stage in ("prepare", "sft", "dpo", "eval")}
    again = _launch(str(recipe))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "finished two_processes in" in again.stdout and again.stdout.count("skipped: up to date") == 4
    assert {stage: _manifest(two, stage)["finished_at"] for stage in finished} == finished


def test_sft_interrupted_under_two_processes_resumes_under_two_processes(runs):
    two = _recipe(runs["root"], "two_processes_resumed", 1, runs["model"], ("sft",))
    recipe = _write(two, runs["root"] / "two_processes_resumed.yaml")
    driver = runs["root"] / "interrupt_after_step_2.py"
    driver.write_text(INTERRUPT_AFTER_STEP_2, encoding="utf-8")

    interrupted = _launch(str(recipe), script=driver)
    assert interrupted.returncode != 0
    sft_dir = Path(two["output_dir"]) / "sft"
    assert not (sft_dir / "manifest.json").exists()
    checkpoint = sft_dir / "checkpoints" / "checkpoint-2"
    assert {p.name for p in checkpoint.glob("rng_state_*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}

    resumed = _launch(str(recipe))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "[prepare] skipped" in resumed.stdout and "[sft] done" in resumed.stdout
    assert resumed.stdout.count("resuming from") == 1  # said once, by the main process
    assert _manifest(two, "sft")["resumed_from_step"] == 2
    # resuming loses nothing: the same adapter as an uninterrupted run with the same global batch
    assert _max_difference(_adapter(two, "sft"), _adapter(runs["one_process"], "sft")) < TOLERANCE


@pytest.mark.parametrize(("launch", "message"), [
    # accelerate's plain launcher: one process without mpirun. It used to train alone with a global batch of one
    # and report success.
    (("--cpu", "--num_processes", "2"), "asked for more than one process but started only this one"),
    # accelerate applies FSDP to GPU processes only; CPU processes would train as plain DDP copies
    (("--config_file", str(ACCELERATE / "fsdp.yaml")), "asks for FSDP, but its processes run on CPUs"),
], ids=["cpu-flag-starts-one-process", "fsdp-on-cpus"])
def test_launch_that_would_not_do_what_it_asks_is_refused_before_anything_is_written(runs, tmp_path, launch,
                                                                                     message):
    raw = _recipe(runs["root"], "refused", 1, runs["model"], ("sft",))
    raw["output_dir"] = str(tmp_path / "refused")
    launched = _launch(str(_write(raw, tmp_path / "refused.yaml")), config=None,
                       launch_args=(*launch, "--main_process_port", str(_free_port())))
    assert launched.returncode != 0
    assert message in launched.stderr
    assert "recipes/accelerate/ddp.yaml" in launched.stderr
    assert not Path(raw["output_dir"]).exists()


def test_busy_output_dir_stops_every_process_with_the_main_process_error(runs, tmp_path):
    from pipeline.artifacts import run_lock

    raw = _recipe(runs["root"], "busy", 1, runs["model"], ("sft",))
    raw["output_dir"] = str(tmp_path / "busy")
    with run_lock(Path(raw["output_dir"])):  # another run holds the directory
        launched = _launch(str(_write(raw, tmp_path / "busy.yaml")))
    assert launched.returncode != 0
    # the main process found the lock taken and handed its error to the other process, which stopped with it
    # instead of waiting for a decision (torchrun would only have killed it)
    assert launched.stderr.count("is in use by another run") == 2
    assert not (tmp_path / "busy" / "prepare").exists()
