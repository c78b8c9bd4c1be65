import os
import subprocess
import sys

import pytest
import torch

from qllm_pipeline.cache import ArtifactCache, artifact_key


def test_key_depends_on_config_upstream_and_version():
    base = artifact_key("fuse", 1, {"quant": {"wbits": 4}}, {"train": "abc"})
    assert base == artifact_key("fuse", 1, {"quant": {"wbits": 4}}, {"train": "abc"})
    assert base != artifact_key("fuse", 1, {"quant": {"wbits": 8}}, {"train": "abc"})
    assert base != artifact_key("fuse", 1, {"quant": {"wbits": 4}}, {"train": "abd"})
    assert base != artifact_key("fuse", 2, {"quant": {"wbits": 4}}, {"train": "abc"})
    assert base != artifact_key("fuse", 1, {"quant": {"wbits": 4}}, {"train": "abc"}, extra={"block": 1})


def test_writer_commits_atomically(tmp_path):
    cache = ArtifactCache(tmp_path)
    with cache.writer("s", "k") as w:
        w.save_tensors("t.safetensors", {"a": torch.arange(3)})
        w.save_json("m.json", {"x": 1})
        assert cache.get("s", "k") is None  # invisible until committed
    art = cache.get("s", "k")
    assert torch.equal(art.tensors("t.safetensors")["a"], torch.arange(3))
    assert art.json("m.json") == {"x": 1}


def test_failed_write_leaves_nothing(tmp_path):
    cache = ArtifactCache(tmp_path)
    with pytest.raises(RuntimeError):
        with cache.writer("s", "k") as w:
            w.save_json("m.json", {})
            raise RuntimeError("boom")
    assert cache.get("s", "k") is None
    assert list((tmp_path / "s").iterdir()) == []


def test_clean_partial_removes_dead_writers_only(tmp_path):
    cache = ArtifactCache(tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / f"k.tmp-{dead_pid}-abcd").mkdir()
    live = cache.writer("s", "other")  # this process is alive
    assert cache.clean_partial() == 1
    assert live.tmp.exists()
    assert not (tmp_path / "s" / f"k.tmp-{dead_pid}-abcd").exists()
    live.abort()
