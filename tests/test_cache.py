import subprocess
import sys

import pytest
import torch

from conftest import REPO
from qllm_pipeline.core.cache import ArtifactCache, artifact_key


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


def test_clean_partial_removes_only_writers_that_are_gone(tmp_path):
    cache = ArtifactCache(tmp_path)
    (tmp_path / "s").mkdir()
    abandoned = tmp_path / "s" / "k.tmp-otherhost-123-abcd"  # its writer (any host) holds no lock any more
    abandoned.mkdir()
    with cache.lock("s", "other"):  # a live writer holds its key's lock while its temp directory exists
        live = cache.writer("s", "other")
        assert cache.clean_partial() == 1
        assert live.tmp.exists()
        assert not abandoned.exists()
        live.abort()


def _write(cache, key="k", value=3):
    def compute(w):
        w.save_tensors("t.safetensors", {"a": torch.arange(value)})
        w.save_json("m.json", {"x": value})
    return cache.produce("s", key, compute)


def test_manifest_lists_every_file_with_sha256_and_size(tmp_path):
    import hashlib
    import json

    art, computed = _write(ArtifactCache(tmp_path))
    assert computed
    manifest = json.loads((art.path / "manifest.json").read_text())["files"]
    assert sorted(manifest) == ["m.json", "t.safetensors"]
    for name, entry in manifest.items():
        data = (art.path / name).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def _truncate(p):
    p.write_bytes(p.read_bytes()[:-7])


def _flip(p):
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x10
    p.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, reason", [
    (lambda a: _truncate(a / "t.safetensors"), "t.safetensors has 81 bytes, expected 88"),
    (lambda a: _flip(a / "t.safetensors"), "t.safetensors fails its sha256"),
    (lambda a: _flip(a / "m.json"), "m.json fails its sha256"),
    (lambda a: (a / "m.json").unlink(), "missing m.json"),
    (lambda a: (a / "manifest.json").unlink(), "no manifest"),
    (lambda a: (a / "manifest.json").write_text("{"), "unreadable manifest"),
    (lambda a: (a / "stray.bin").write_bytes(b"x"), "unlisted file stray.bin"),
])
def test_corrupt_artifact_gives_one_warning_and_is_recomputed(tmp_path, caplog, damage, reason):
    art, _ = _write(ArtifactCache(tmp_path))
    damage(art.path)
    cache = ArtifactCache(tmp_path)  # a new process: nothing verified yet
    with caplog.at_level("WARNING", logger="qllm_pipeline.core.cache"):
        assert cache.get("s", "k") is None
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [f"artifact s/k is corrupt ({reason}); computing it again"]
    art, computed = _write(cache)
    assert computed and torch.equal(art.tensors("t.safetensors")["a"], torch.arange(3))
    assert ArtifactCache(tmp_path).get("s", "k") is not None
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["k"]  # the damaged copy is gone


def test_parallel_jobs_compute_a_key_once(tmp_path):
    script = f"""
import sys, time, torch
sys.path.insert(0, {str(REPO)!r})
from qllm_pipeline.core.cache import ArtifactCache
cache = ArtifactCache({str(tmp_path / 'cache')!r})
def compute(w):
    with open({str(tmp_path / 'computed.log')!r}, 'a') as f:
        f.write('x')
    time.sleep(1.5)
    w.save_tensors('t.safetensors', {{'a': torch.arange(5)}})
art, computed = cache.produce('s', 'k', compute)
print(int(computed), art.tensors('t.safetensors')['a'].tolist())
"""
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=120)[0].split(maxsplit=1) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sorted(int(o[0]) for o in outs) == [0, 0, 1]  # one computed, two waited and read it
    assert all(o[1].strip() == "[0, 1, 2, 3, 4]" for o in outs)
    assert (tmp_path / "computed.log").read_text() == "x"


def test_forced_recompute_replaces_the_artifact(tmp_path):
    cache = ArtifactCache(tmp_path)
    _write(cache, value=3)
    art, computed = cache.produce("s", "k", lambda w: w.save_json("m.json", {"x": 4}), force=True)
    assert computed and art.json("m.json") == {"x": 4} and not art.has("t.safetensors")
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["k"]


def test_unwritable_cache_dir_is_one_clear_error(tmp_path):
    from qllm_pipeline.core.errors import PipelineError

    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(PipelineError, match=r"pipeline.cache_dir=.*/file/cache is not writable .*choose a directory you can write"):
        ArtifactCache(blocker / "cache")


def test_disk_full_at_commit_leaves_the_cache_valid(tmp_path, monkeypatch):
    import errno

    from qllm_pipeline.core import cache as cache_mod
    from qllm_pipeline.core.errors import PipelineError

    cache = ArtifactCache(tmp_path)
    _write(cache, key="kept")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache_mod.os, "replace", full)
    with pytest.raises(PipelineError, match="no space left on the device while writing .*free disk space"):
        _write(cache, key="new")
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["kept"]  # no temp directory, no half artifact
    assert ArtifactCache(tmp_path).get("s", "kept") is not None
