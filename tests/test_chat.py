"""scripts/chat.py (``pipeline.cli.main_chat``): one prompt or a multi-turn session, on a stage or an export."""

from __future__ import annotations

import io

import pytest

import pipeline.inference
from pipeline.cli import main_chat
from pipeline.errors import PipelineError
from pipeline.export import export

MAX_NEW = "12"


@pytest.fixture
def recorded_histories(monkeypatch: pytest.MonkeyPatch) -> list[list[dict]]:
    """Every conversation the chat hands to our ``inference.stream`` (wrapped, still generating for real)."""
    seen: list[list[dict]] = []
    real = pipeline.inference.stream

    def recording(model, tokenizer, messages, *args, **kwargs):
        seen.append([dict(m) for m in messages])
        return real(model, tokenizer, messages, *args, **kwargs)

    monkeypatch.setattr(pipeline.inference, "stream", recording)
    return seen


def _chat(capsys, *argv: str) -> str:
    assert main_chat([*argv, "--max-new-tokens", MAX_NEW]) == 0
    return capsys.readouterr().out


def test_one_prompt_gets_the_same_answer_from_the_stage_its_merged_export_and_its_gguf(
        sft_stage, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PIPELINE_CACHE", str(tmp_path / "cache"))  # the GGUF's converted copy goes here
    export(sft_stage, tmp_path / "merged", fmt="merged", dtype="float32", log=lambda *_: None)
    export(sft_stage, tmp_path / "gguf", fmt="gguf", dtype="float32", log=lambda *_: None)
    gguf_file = next((tmp_path / "gguf").glob("*.gguf"))
    answers = [_chat(capsys, str(path), "--prompt", "Write one line about the sea.")
               for path in (sft_stage, tmp_path / "merged", gguf_file)]
    assert len(answers[0]) > 1 and answers[0] == answers[1] == answers[2]


def test_chat_keeps_the_history_and_reset_starts_over_keeping_the_system_prompt(
        sft_stage, capsys, monkeypatch, recorded_histories):
    monkeypatch.setattr("sys.stdin", io.StringIO("Say hello.\nAnd again?\n/reset\nSay hello.\n"))
    out = _chat(capsys, str(sft_stage), "--system", "Be brief.")
    system = {"role": "system", "content": "Be brief."}
    first, second, third = recorded_histories
    assert first == [system, {"role": "user", "content": "Say hello."}]
    assert second[:2] == first and second[2]["role"] == "assistant" and second[3]["content"] == "And again?"
    assert third == first  # after /reset: the system prompt and the new question only
    assert "(history cleared)" in out


def test_sampling_is_repeatable_with_a_seed_and_greedy_by_default(sft_stage, capsys):
    prompt = ("--prompt", "Write one line about a cat.")
    greedy = _chat(capsys, str(sft_stage), *prompt)
    assert _chat(capsys, str(sft_stage), *prompt, "--temperature", "0") == greedy
    sampled = [_chat(capsys, str(sft_stage), *prompt, "--temperature", "1.5", "--top-p", "0.95", "--seed", str(s))
               for s in (1, 1, 2, 3)]
    assert sampled[0] == sampled[1]
    assert any(answer != greedy for answer in sampled)


def test_bad_sampling_options_and_paths_are_user_errors(sft_stage, tmp_path, capsys):
    assert main_chat([str(sft_stage), "--prompt", "hi", "--top-p", "0"]) == 2
    assert "top_p in (0, 1]" in capsys.readouterr().err
    with pytest.raises(PipelineError, match="neither a stage directory, a merged export"):
        pipeline.inference.load_model(tmp_path)
