"""Atomic training checkpoints on top of `Accelerator.save_state`, and finding the latest one.

`save_state` writes model, optimizer, registered objects (the lr scheduler) and every process's RNG
states, but into the folder it is given, file by file: a kill midway would leave a folder that looks
like a checkpoint and is not. So each checkpoint is written to ``checkpoints/.tmp-step-N`` and
renamed to ``checkpoints/step-N`` only when complete (a rename is atomic); a ``.tmp-*`` folder is
never read. The data position needs no state of its own: it is a function of the step
(`fspo.train.buckets.batch_order`). What a killed run logged after its last checkpoint is dropped on
resume (`drop_records_after`): those steps run again and are logged again.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from fspo.core.files import atomic_write_json, atomic_write_text

STATE_FILE = "trainer_state.json"


def checkpoint_dir(out: Path) -> Path:
    return out / "checkpoints"


def latest_checkpoint(out: Path) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    root = checkpoint_dir(out)
    if not root.is_dir():
        return None
    done = [p for p in root.glob("step-*") if p.is_dir() and (p / STATE_FILE).is_file()]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def save_checkpoint(accelerator: Any, out: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Collective: every process must call it. Returns the final checkpoint folder."""
    root = checkpoint_dir(out)
    tmp = root / f".tmp-step-{step:08d}"
    final = root / f"step-{step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_json(tmp / STATE_FILE, {**state, "step": step})
        _fsync_dir(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_dir(root)
        for old in sorted(root.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Any, path: Path) -> dict[str, Any]:
    accelerator.load_state(str(path))
    return json.loads((path / STATE_FILE).read_text())


def drop_records_after(path: Path, step: int) -> int:
    """Rewrite the JSONL log `path` without its records past `step`; returns how many were dropped.

    A run killed after its checkpoint at `step` may have logged later steps (and a finished run its
    end); the resumed run redoes and logs them, so without this every such step would be in the log
    twice, with the killed run's throughput. A line torn by the kill is dropped too.
    """
    if not path.is_file():
        return 0
    kept: list[str] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and int(record.get("step", 0)) <= step:
            kept.append(line + "\n")
    if len(kept) != len(lines):
        atomic_write_text(path, "".join(kept))
    return len(lines) - len(kept)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
