"""`fspo quickstart` killed (SIGKILL) during its `generate` stage and run again ends with the same files,
byte for byte, as a run that was never interrupted: the finished stages are served from their verified
markers, and generation resumes from its append log (`<system>.jsonl.partial`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fspo.core.stages import MARKER
from fspo.quickstart import generated_systems, load_profile

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def _command(out: Path) -> list[str]:
    return [sys.executable, "-c", "from fspo.cli import main; main()", "quickstart", "--profile", "tiny",
            "--out", str(out)]  # fmt: skip


def _has_a_line(path: Path) -> bool:
    try:
        return b"\n" in path.read_bytes()
    except FileNotFoundError:  # renamed away between the listing and the read
        return False


def _kill_mid_generation(out: Path) -> None:
    """Start the quickstart; SIGKILL it once a system's generation log holds a whole record."""
    gen = out / "generate"
    proc = subprocess.Popen(_command(out), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    try:
        while time.time() < deadline:
            if any(_has_a_line(p) for p in gen.glob("*.partial")):
                break
            if proc.poll() is not None or (gen / MARKER).exists():
                pytest.fail("generation finished before it could be killed mid-system; make it longer")
            time.sleep(0.002)
        else:
            pytest.fail("the quickstart never reached its generate stage")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()  # no-op once it is dead; never leave it running when the test fails
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (gen / MARKER).exists(), "killed too late: the generate stage had finished"


@pytest.mark.slow
def test_quickstart_killed_during_generate_resumes_byte_identical(tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    subprocess.run(_command(straight), env=ENV, check=True, capture_output=True, timeout=300)

    out = tmp_path / "killed"
    _kill_mid_generation(out)
    assert list((out / "generate").glob("*.partial")), "nothing to resume from"

    again = subprocess.run(_command(out), env=ENV, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    log = again.stdout
    assert "• pop_ipo: cached" in log and "• sim: cached" in log  # stages before the kill were not redone
    assert "✓ generate" in log and "Traceback" not in log + again.stderr

    generated = sorted(p.name for p in (straight / "generate").glob("*.jsonl"))
    assert len(generated) == len(generated_systems(load_profile("tiny")))
    assert sorted(p.name for p in (out / "generate").iterdir() if not p.name.startswith("_")) == generated
    for name in generated:  # no leftover .partial, and every record the same
        assert (out / "generate" / name).read_bytes() == (straight / "generate" / name).read_bytes(), name
    results = (out / "report" / "results.json").read_bytes()
    assert results == (straight / "report" / "results.json").read_bytes()
    assert b"win_rate" in results
