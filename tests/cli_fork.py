"""The `fspo` command run as a user runs it, without paying its imports once per run.

A table of a hundred command lines (tests/test_bad_input.py) spent most of its time importing torch,
transformers and fspo again for each line. Here one process (the *zygote*) imports them once, then
forks a child per command line: the child is a fresh process as far as the command can tell (its own
pid, working directory, standard streams on a file, stdin on /dev/null, `fspo.cli.main` as the entry
point, its exit status the command's), and nothing one command does reaches the next, since each
runs in a copy of the zygote that exits when it is done. A command still running after `timeout_s`
is killed and reported as such.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

from conftest import CLI_ENV

ZYGOTE = r"""
import json, os, sys, time
import torch, transformers  # the imports every model-loading command pays
import fspo.cli, fspo.train.cli, fspo.serve.cli, fspo.eval.cli  # noqa: F401
from fspo.cli import main

for line in sys.stdin:
    job = json.loads(line)
    out = os.open(job["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    pid = os.fork()
    if pid == 0:
        os.chdir(job["cwd"])
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out, 1)
        os.dup2(out, 2)
        sys.argv = ["fspo", *job["args"]]
        code = 0
        try:
            main()
        except SystemExit as done:
            code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
        except BaseException:
            import traceback

            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    os.close(out)
    deadline = time.monotonic() + job["timeout_s"]
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            code = os.waitstatus_to_exitcode(status)
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            code = None
            break
        time.sleep(0.01)
    print(json.dumps({"code": code}), flush=True)
"""


class ForkedCLI:
    """`run(args, cwd)` -> (exit status, stdout and stderr together); one command at a time per instance
    (use one instance per worker thread)."""

    def __init__(self, scratch: Path):
        self.scratch = scratch
        self.count = 0
        self.lock = threading.Lock()
        self.zygote = subprocess.Popen(
            [sys.executable, "-c", ZYGOTE],
            env=CLI_ENV,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def run(self, args: list[str], cwd: Path, timeout_s: float) -> tuple[int | None, str]:
        """None for the status of a command killed after `timeout_s`."""
        with self.lock:
            self.count += 1
            out = self.scratch / f"output-{id(self)}-{self.count}.txt"
            job = {"args": args, "cwd": str(cwd), "out": str(out), "timeout_s": timeout_s}
            assert self.zygote.stdin is not None and self.zygote.stdout is not None
            self.zygote.stdin.write(json.dumps(job) + "\n")
            self.zygote.stdin.flush()
            reply = self.zygote.stdout.readline()
            if not reply:
                raise RuntimeError(f"the zygote process died (exit {self.zygote.poll()})")
            output = out.read_text(errors="replace")
            out.unlink()
            return json.loads(reply)["code"], output

    def close(self) -> None:
        if self.zygote.stdin is not None:
            self.zygote.stdin.close()
        self.zygote.wait(timeout=30)
