"""benchmarks/accuracy_all.py: every row of the accuracy table from one commit, resumable."""
import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import accuracy_all  # noqa: E402


def write_case(work: Path, name: str, commit: str, n: int | None = None, ppl: float = 10.0) -> None:
    rows = [{"tool": "t", "model": name, "method": f"m{i}", "quant": "w4a4", "dataset": "wiki_sample", "ppl": ppl,
             "fp": 5.0, "commit": commit} for i in range(accuracy_all.CASES[name][2] if n is None else n)]
    (work / name).mkdir(parents=True, exist_ok=True)
    (work / name / "accuracy.json").write_text(json.dumps({"rows": rows}))


def write_held_out(work: Path, name: str, label: str, shift: float = 0.0, wobble: float = 0.0) -> None:
    """A run's results.json with calib_heldout alone (no evaluation window): 32 windows of 512 tokens whose mean NLL
    per token is `shift` above a common base; `wobble` alternates ± per window (a tie when shift is 0)."""
    base = [511 * (3.0 + 0.05 * (i % 7)) for i in range(32)]
    nll = [b + 511 * shift + (wobble if i % 2 else -wobble) for i, b in enumerate(base)]
    ppl = lambda v: math.exp(sum(v) / (511 * len(v)))  # noqa: E731
    fp = [b - 511 * 0.5 for b in base]
    quant = name.rsplit("-", 1)[1]
    run = work / name / "runs" / "sweep" / quant / "0"
    run.mkdir(parents=True, exist_ok=True)
    (run / "results.json").write_text(json.dumps({
        "ppl": {"calib_heldout": {"fp": ppl(fp), "rtn": 1e4, label: ppl(nll)}},
        "window_nll": {"calib_heldout": {"fp": fp, "rtn": fp, label: nll}},
        "windows": {"calib_heldout": {"count": 32, "rule": "spread over documents v1", "seq_len": 512}}}))


def write_ladders(work: Path) -> None:
    """W4A4: + LRC ties with rotation + GPTQ, the full recipe is better; W4A8: + LRC better, the full recipe ties with
    it; W6A6: every rung ties."""
    for quant, (lrc, full) in {"w4a4": (0.0, -0.2), "w4a8": (-0.2, -0.2), "w6a6": (0.0, 0.0)}.items():
        write_held_out(work, f"gemma-rotation-{quant}", "rotation+gptq")
        write_held_out(work, f"gemma-best-no-e2e-{quant}", "rotation+lrc+gptq", lrc, wobble=40)
        write_held_out(work, f"gemma-best-{quant}", "rotation+lrc+e2e+gptq", full, wobble=40)


def test_held_out_rule_along_the_ladder_changes_only_beyond_the_paired_interval(tmp_path, capsys):
    work, out = tmp_path / "work", tmp_path / "out"
    write_ladders(work)
    assert accuracy_all.main([f"--work={work}", f"--out={out}", "--choose"]) == 0
    steps = json.loads((out / "accuracy_choice.json").read_text())["steps"]
    assert [(s["quant"], s["candidate"], s["against"], s["chosen"]) for s in steps] == [
        ("w4a4", "+ LRC, no e2e", "rotation + GPTQ", "rotation + GPTQ"),  # a tie keeps what was chosen
        ("w4a4", "full recipe", "rotation + GPTQ", "full recipe"),
        ("w4a8", "+ LRC, no e2e", "rotation + GPTQ", "+ LRC, no e2e"),
        ("w4a8", "full recipe", "+ LRC, no e2e", "+ LRC, no e2e"),  # compared with the rung chosen so far
        ("w6a6", "+ LRC, no e2e", "rotation + GPTQ", "rotation + GPTQ"),
        ("w6a6", "full recipe", "rotation + GPTQ", "rotation + GPTQ"),
    ]
    tie, better = steps[0], steps[1]
    assert tie["ci"][0] < 0 < tie["ci"][1] and better["ci"][1] < 0
    # × FP to 4 decimals, as heldout_sweep.py's rows
    assert (better["candidate_ratio"], better["against_ratio"]) == (round(math.exp(0.5 - 0.2), 4), round(math.exp(0.5), 4))
    assert "| gemma3_270m | w4a4 | full recipe (1.3499×) | rotation + GPTQ (1.6487×) |" in capsys.readouterr().out
    assert accuracy_all.main([f"--work={tmp_path / 'empty'}", f"--out={out}", "--choose"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: case gemma-rotation-w4a4 has 0 results.json under {tmp_path / 'empty' / 'gemma-rotation-w4a4' / 'runs'}"
        ", not 1; run it first"]


def test_a_case_is_done_only_with_all_its_rows_from_this_commit(tmp_path):
    write_case(tmp_path, "smollm2-best-w4a4", "abc1234")
    assert accuracy_all.done(tmp_path, "smollm2-best-w4a4", "abc1234")
    assert not accuracy_all.done(tmp_path, "smollm2-best-w4a4", "def5678")  # another commit: run again
    write_case(tmp_path, "smollm2-peers", "abc1234", n=11)  # one of its 12 rows missing (a failed oneshot)
    assert not accuracy_all.done(tmp_path, "smollm2-peers", "abc1234")
    write_case(tmp_path, "gemma-peers", "abc1234", ppl=None)
    assert not accuracy_all.done(tmp_path, "gemma-peers", "abc1234")
    assert not accuracy_all.done(tmp_path, "gemma-best-w4a4", "abc1234")  # never run


def test_all_cases_done_writes_the_table_in_case_order_and_runs_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(accuracy_all, "code_commit", lambda: "abc1234")
    work, out = tmp_path / "work", tmp_path / "out"
    out.mkdir()
    for name in reversed(list(accuracy_all.CASES)):
        write_case(work, name, "abc1234")
    write_ladders(work)
    assert accuracy_all.main([f"--work={work}", f"--out={out}", "--peers-python=/nonexistent"]) == 0
    rows = json.loads((out / "accuracy.json").read_text())["rows"]
    assert [r["model"] for r in rows] == [n for n, (_, _, count) in accuracy_all.CASES.items() for _ in range(count)]
    assert {r["commit"] for r in rows} == {"abc1234"}
    assert "0 case(s) to run" in capsys.readouterr().out
    assert (out / "accuracy.md").read_text().startswith("# Accuracy")
    steps = json.loads((out / "accuracy_choice.json").read_text())["steps"]  # the held-out choice beside the table
    assert [s["chosen"] for s in steps if s["candidate"] == "full recipe"] == ["full recipe", "+ LRC, no e2e",
                                                                              "rotation + GPTQ"]
    assert {s["commit"] for s in steps} == {"abc1234"}


def test_the_table_is_not_written_while_cases_are_missing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(accuracy_all, "code_commit", lambda: "abc1234")
    work, out = tmp_path / "work", tmp_path / "out"
    write_case(work, "smollm2-default-w4a4", "abc1234")
    assert accuracy_all.main([f"--work={work}", f"--out={out}", "--only=smollm2-default-w4a4"]) == 0
    assert not (out / "accuracy.json").exists()
    assert "cases still to run: smollm2-best-w4a4" in capsys.readouterr().out
    assert accuracy_all.main([f"--work={work}", "--list"]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert listing[0].split()[:2] == ["smollm2-default-w4a4", "done"]
    assert [line.split()[1] for line in listing[1:]] == ["pending"] * (len(accuracy_all.CASES) - 1)


@pytest.mark.parametrize("argv, commit, message", [
    ([], "abc1234+dirty", "error: the working tree has uncommitted changes; every row must come from one commit: "
                          "commit or stash them, then run again"),
    (["--only=smollm2-peers", "--peers-python=/nonexistent/python"], "abc1234",
     "error: --peers-python /nonexistent/python does not exist; install llm-compressor's environment "
     "(benchmarks/peers.py says how) or leave the peers' cases out with --only"),
    (["--only=smollm2-best-w8a8"], "abc1234", "error: --only: unknown case 'smollm2-best-w8a8'; choose from "
                                              + ", ".join(accuracy_all.CASES)),
])
def test_bad_settings_end_in_one_error_line_before_any_run(tmp_path, monkeypatch, capsys, argv, commit, message):
    monkeypatch.setattr(accuracy_all, "code_commit", lambda: commit)
    ran = []
    monkeypatch.setattr(accuracy_all.subprocess, "run", lambda *a, **k: ran.append(a))
    assert accuracy_all.main([f"--work={tmp_path}", *argv]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [message]
    assert ran == []


def test_all_done_without_a_run_folder_writes_the_table_then_one_error_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(accuracy_all, "code_commit", lambda: "abc1234")
    work, out = tmp_path / "work", tmp_path / "out"
    for name in accuracy_all.CASES:
        write_case(work, name, "abc1234")  # rows, but no run's results.json to choose from
    assert accuracy_all.main([f"--work={work}", f"--out={out}"]) == 1
    assert (out / "accuracy.json").is_file() and not (out / "accuracy_choice.json").exists()
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: case gemma-rotation-w4a4 has 0 results.json under {work / 'gemma-rotation-w4a4' / 'runs'}, not 1; "
        "run it first"]
