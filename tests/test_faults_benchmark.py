"""benchmarks/faults.py refuses bad command-line input with one error line (its scenarios run in tens of minutes:
the results are in benchmarks/results/faults.md; the behaviours it exercises are unit-tested in test_cache.py,
test_pipeline.py and test_sweep_and_logging.py)."""
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.parametrize("args, needle", [
    (["--kills", "-1"], "--kills=-1 must be >= 0"),
    (["--layers", "0"], "--layers=0 must be >= 1"),
    (["--bogus"], "unrecognized arguments"),
])
def test_faults_bad_input_is_one_error_line(args, needle):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "faults.py"), *args], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], proc.stderr
