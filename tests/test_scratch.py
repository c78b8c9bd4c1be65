"""The scratch folders of ranks other than 0 carry their owner's process id; a folder whose owner has ended (a rank
killed with SIGKILL runs no exit handler) is removed by the next one made, and nothing else is."""
import subprocess
import sys

from qllm_pipeline.core import scratch


def test_orphaned_scratch_folders_are_removed_and_live_ones_kept(tmp_path, monkeypatch):
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(ended.stdout)
    monkeypatch.setattr(scratch.tempfile, "tempdir", str(tmp_path))
    orphan = tmp_path / f"qllm-rank1-{dead_pid}-abc_123"
    live = tmp_path / f"qllm-rank1-{scratch.os.getpid()}-def456"
    other = [tmp_path / "qllm-rank1-k2j3h4", tmp_path / f"other-{dead_pid}-x"]  # an earlier unnamed one; not ours
    for folder in (orphan, live, *other):
        folder.mkdir()
        (folder / "log").write_text("x")
    prefix = scratch.scratch_prefix("1")
    assert prefix == f"qllm-rank1-{scratch.os.getpid()}-"
    assert not orphan.exists() and live.exists() and all(p.exists() for p in other)
    assert scratch.remove_orphans(tmp_path) == []
