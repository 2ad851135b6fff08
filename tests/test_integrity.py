"""A finished stage that changed on disk is caught, never silently re-used.

Where it sits: the stage contract's file list (``pipeline.artifacts.output_files`` / ``verify_stage``), as the
runner checks it (a skipped stage: sizes, ``--verify``: hashes; an upstream a running stage consumes: hashes)
and as ``pipeline.inference.load`` checks it. One tiny prepare → sft → dpo → eval run is made per module;
each test damages a copy of it.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_pref_rows, tiny_sft_rows, write_jsonl

from pipeline.artifacts import FILES, MANIFEST, file_sha256, read_manifest
from pipeline.config import load_recipe
from pipeline.errors import PipelineError
from pipeline.runner import run_recipe

EVAL_PROMPTS = [
    {"prompt": "Describe the sea. Answer in all lowercase letters.",
     "instruction_id_list": ["change_case:english_lowercase"], "kwargs": [{}]},
    {"prompt": "Name a fruit. Do not use any commas.", "instruction_id_list": ["punctuation:no_comma"],
     "kwargs": [{}]},
]
# One output of each stage kind; dpo twice: its adapter and the merged SFT model it was trained on.
TARGETS = [("prepare", "sft_train/data-00000-of-00001.arrow"), ("sft", "adapter_model.safetensors"),
           ("dpo", "adapter_model.safetensors"), ("dpo", "sft_merged/model.safetensors"), ("eval", "report.md")]
ADAPTER_TARGETS = [t for t in TARGETS if t[0] in ("sft", "dpo")]


@pytest.fixture(autouse=True)
def single_thread():
    """One intra-op thread: the tiny model gains nothing from more on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir) -> Path:
    """A complete prepare → sft → dpo → eval run on the tiny model; returns its recipe file."""
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("finished")
    trainer = {"max_steps": 2, "per_device_train_batch_size": 2, "learning_rate": 1.0e-2, "max_length": 128,
               "save_steps": 2, "logging_steps": 1}
    raw = {"name": "tiny", "output_dir": str(tmp / "out"),
           "model": {"name_or_path": str(tiny_model_dir), "chat_template": "chatml"},
           "data": {"sft": [{"path": str(write_jsonl(tmp / "sft.jsonl", tiny_sft_rows())), "format": "alpaca"}],
                    "dpo": [{"path": str(write_jsonl(tmp / "prefs.jsonl", tiny_pref_rows()))}],
                    "eval_fraction": 0.2, "seed": 1},
           "lora": {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"}, "sft": trainer, "dpo": trainer,
           "eval": {"prompts": str(write_jsonl(tmp / "prompts.jsonl", EVAL_PROMPTS)), "models": ["sft", "dpo"],
                    "max_new_tokens": 4, "batch_size": 2, "num_samples": 1}}
    (tmp / "recipe.yaml").write_text(yaml.safe_dump(raw))
    run_recipe(load_recipe(tmp / "recipe.yaml"), log=lambda _: None)
    return tmp / "recipe.yaml"


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    """A private copy of the finished run (same fingerprints: they do not include the output directory)."""
    raw = yaml.safe_load(finished_run.read_text())
    shutil.copytree(raw["output_dir"], tmp_path / "out")
    raw["output_dir"] = str(tmp_path / "out")
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(raw))
    return tmp_path / "recipe.yaml"


def _out(recipe_file: Path) -> Path:
    return Path(yaml.safe_load(recipe_file.read_text())["output_dir"])


def _run(recipe_file: Path, **kwargs) -> dict[str, str]:
    return {o.stage: o.action for o in run_recipe(load_recipe(recipe_file), log=lambda _: None, **kwargs)}


def _damage(path: Path, how: str) -> str:
    """Damage a file; returns the part of the error message that names what happened to it."""
    data = path.read_bytes()
    if how == "truncate":  # a copy cut short by a full disk
        path.write_bytes(data[: len(data) // 2])
        return rf"is {len(data) // 2} bytes, the manifest recorded {len(data)}"
    if how == "delete":
        path.unlink()
        return "is missing"
    middle = len(data) // 2  # "alter": same size, one byte changed (bit rot, a careless edit)
    path.write_bytes(data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:])
    return r"has other contents \(sha256 "


def _changed(stage: str, rel: str, what: str, recipe_file: Path) -> str:
    return (rf"Stage '{stage}' in .*{stage} changed on disk after it completed: {re.escape(rel)} {what}.*"
            rf"nothing was deleted.*python scripts/run_recipe.py {re.escape(str(recipe_file))} --from {stage}")


# ------------------------------------------------------------------------------------------ what is recorded
def test_manifest_records_every_output_file_with_size_and_hash_and_no_bookkeeping(finished_run):
    out = _out(finished_run)
    for stage, expected in [("prepare", "report.json"), ("sft", "adapter_model.safetensors"),
                            ("dpo", "sft_merged/model.safetensors"), ("eval", "metrics.json")]:
        files = read_manifest(out / stage)[FILES]
        assert expected in files
        on_disk = {p.relative_to(out / stage).as_posix() for p in (out / stage).rglob("*") if p.is_file()}
        # prepare's folders also hold the tokenisation caches the training stages wrote later: not prepare's
        unrecorded = {rel for rel in on_disk - set(files) if not re.search(r"/cache-\w+\.arrow$", rel)}
        assert unrecorded == {MANIFEST}
        for rel, entry in files.items():
            assert entry == {"size": (out / stage / rel).stat().st_size, "sha256": file_sha256(out / stage / rel)}
    assert not any("checkpoints" in rel for stage in ("sft", "dpo") for rel in read_manifest(out / stage)[FILES])


# ------------------------------------------------------------------------------------------ re-run (skip path)
@pytest.mark.parametrize(("stage", "rel"), TARGETS)
@pytest.mark.parametrize("how", ["truncate", "delete"])
def test_truncated_or_deleted_file_stops_the_rerun_naming_the_file_and_the_stage(run_copy, stage, rel, how):
    path = _out(run_copy) / stage / rel
    what = _damage(path, how)
    with pytest.raises(PipelineError, match=_changed(stage, rel, what, run_copy)):
        _run(run_copy)
    assert read_manifest(path.parents[len(Path(rel).parts) - 1]) is not None  # the stage is not deleted


@pytest.mark.parametrize(("stage", "rel"), TARGETS)
def test_altered_file_of_the_same_size_is_caught_by_verify(run_copy, stage, rel):
    what = _damage(_out(run_copy) / stage / rel, "alter")
    with pytest.raises(PipelineError, match=_changed(stage, rel, what, run_copy)):
        _run(run_copy, verify=True)


def test_run_recipe_verify_flag_catches_what_sizes_cannot_and_exits_2(run_copy, capsys, monkeypatch):
    from pipeline.cli import main_run_recipe

    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "error")  # what the CLI sets; restored after the test
    what = _damage(_out(run_copy) / "eval" / "report.md", "alter")
    assert main_run_recipe([str(run_copy)]) == 0  # same size: the cheap check on skipping cannot see it
    assert main_run_recipe([str(run_copy), "--verify"]) == 2
    err = capsys.readouterr().err
    assert re.search("error: " + _changed("eval", "report.md", what, run_copy), err), err
    assert "Traceback" not in err


def test_altered_upstream_is_caught_before_a_stage_consumes_it(run_copy):
    # The SFT adapter, same size, other bytes; dpo re-runs and is about to merge it. Without --verify the
    # sizes match, so only the hash check of what a running stage consumes can catch this.
    out = _out(run_copy)
    what = _damage(out / "sft" / "adapter_model.safetensors", "alter")
    dpo_manifest = (out / "dpo" / MANIFEST).read_text()
    with pytest.raises(PipelineError, match=_changed("sft", "adapter_model.safetensors", what, run_copy)):
        _run(run_copy, stage="dpo", force=True)
    assert (out / "dpo" / MANIFEST).read_text() == dpo_manifest  # checked before dpo touched anything


def test_the_command_in_the_message_rebuilds_the_stage(run_copy):
    out = _out(run_copy)
    _damage(out / "dpo" / "adapter_model.safetensors", "truncate")
    with pytest.raises(PipelineError, match=r"--from dpo") as caught:
        _run(run_copy)
    assert re.search(r"run_recipe\.py (\S+) --from (\w+)", str(caught.value)).groups() == (str(run_copy), "dpo")
    assert _run(run_copy, from_stage="dpo") == {"dpo": "ran", "eval": "ran"}
    assert _run(run_copy, verify=True) == dict.fromkeys(("prepare", "sft", "dpo", "eval"), "skipped")


# ------------------------------------------------------------------------------------------ inference.load
@pytest.mark.parametrize(("stage", "rel"), ADAPTER_TARGETS)
@pytest.mark.parametrize("how", ["truncate", "delete", "alter"])
def test_load_refuses_a_damaged_stage_naming_the_file_and_the_stage(finished_run, run_copy, stage, rel, how):
    from pipeline.inference import load

    what = _damage(_out(run_copy) / stage / rel, how)
    # load() knows the stage directory only: the command names the recipe recorded in the manifest (the
    # recipe of the run this copy was made from)
    with pytest.raises(PipelineError, match=_changed(stage, rel, what, finished_run)):
        load(_out(run_copy) / stage)  # default: the tiny stages are far under the hashing budget


def test_load_hashes_the_merged_model_only_when_asked_once_the_stage_is_over_budget(finished_run, run_copy,
                                                                                    monkeypatch):
    import pipeline.inference as inference

    stage_dir = _out(run_copy) / "dpo"
    manifest = read_manifest(stage_dir)
    merged = {rel: f["size"] for rel, f in manifest[FILES].items() if rel.startswith("sft_merged/")}
    own = sum(f["size"] for f in manifest[FILES].values()) - sum(merged.values())
    assert set(inference._files_to_hash(manifest, None)) == set(manifest[FILES])  # all of it fits the budget
    monkeypatch.setattr(inference, "HASH_BUDGET_BYTES", own)  # the adapter fits, adapter + merged model do not
    assert set(inference._files_to_hash(manifest, None)) == set(manifest[FILES]) - set(merged)
    monkeypatch.setattr(inference, "HASH_BUDGET_BYTES", own - 1)
    assert inference._files_to_hash(manifest, None) == []  # sizes only
    what = _damage(stage_dir / "sft_merged" / "model.safetensors", "alter")
    model, _ = inference.load(stage_dir)  # same size: not caught without hashing it
    assert model is not None
    with pytest.raises(PipelineError, match=_changed("dpo", "sft_merged/model.safetensors", what, finished_run)):
        inference.load(stage_dir, verify=True)


# ------------------------------------------------------------------------------------------ older manifests
def _drop_file_lists(out: Path) -> None:
    for stage in ("prepare", "sft", "dpo", "eval"):
        manifest = json.loads((out / stage / MANIFEST).read_text())
        del manifest[FILES]
        (out / stage / MANIFEST).write_text(json.dumps(manifest))


def test_manifest_without_a_file_list_still_skips_and_loads(run_copy):
    from pipeline.inference import load

    _drop_file_lists(_out(run_copy))
    logged: list[str] = []
    outcomes = run_recipe(load_recipe(run_copy), log=logged.append, verify=True)
    assert [o.action for o in outcomes] == ["skipped"] * 4
    assert any("manifest without file sizes" in line for line in logged)
    model, _ = load(_out(run_copy) / "dpo")
    assert model is not None


@pytest.mark.parametrize(("stage", "rel", "how", "what"), [
    ("sft", "adapter_model.safetensors", "truncate", r"is \d+ bytes, its header describes \d+"),
    ("dpo", "sft_merged/model.safetensors", "truncate", r"is \d+ bytes, its header describes \d+"),
    ("sft", "adapter_config.json", "delete", "is missing"),
    ("eval", "report.md", "delete", "is missing"),
])
def test_manifest_without_a_file_list_gets_the_checks_that_need_none(run_copy, stage, rel, how, what):
    from pipeline.inference import load

    _drop_file_lists(_out(run_copy))
    _damage(_out(run_copy) / stage / rel, how)
    message = rf"Stage '{stage}' .*predates recorded file sizes and hashes.*: {re.escape(rel)} {what}.*--from {stage}"
    with pytest.raises(PipelineError, match=message):
        _run(run_copy)
    if stage != "eval":
        with pytest.raises(PipelineError, match=message):
            load(_out(run_copy) / stage)


# ------------------------------------------------------------------------------------------ the DPO hand-off
def test_dpo_merges_the_new_sft_adapter_after_sft_reruns(run_copy):
    out = _out(run_copy)
    merged = out / "dpo" / "sft_merged" / "model.safetensors"
    before = file_sha256(merged)
    raw = yaml.safe_load(run_copy.read_text())
    raw["sft"]["learning_rate"] = 2.0e-2
    run_copy.write_text(yaml.safe_dump(raw))
    assert _run(run_copy, stage="sft") == {"sft": "ran"}
    assert _run(run_copy, stage="dpo") == {"dpo": "ran"}
    assert file_sha256(merged) != before  # not the merge of the old SFT adapter
