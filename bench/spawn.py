#!/usr/bin/env python3
"""Run the benchmark's steps from a small process, so their peak RSS is their own.

Linux charges a child's peak RSS with the memory of the process that forked it (the pages
it shared at fork, or with vfork the parent's high-water mark). bench/run.py grows while it
prepares images; a step started from it would report at least that much. This process stays
small and starts every step instead: one JSON request per line on stdin
(``{"argv", "env", "cwd", "stdout", "stderr"}``), one JSON answer per line on stdout
(``{"returncode", "wall", "cpu", "peak_rss"}``, from ``wait4``: the step and every
descendant it waited for).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time


def main() -> None:
    for line in sys.stdin:
        req = json.loads(line)
        with open(req["stdout"], "wb") as out, open(req["stderr"], "wb") as err:
            started = time.perf_counter()
            proc = subprocess.Popen(req["argv"], stdout=out, stderr=err, env=req["env"],
                                    cwd=req["cwd"], stdin=subprocess.DEVNULL)
            _, status, usage = os.wait4(proc.pid, 0)
            wall = time.perf_counter() - started
            proc.returncode = os.waitstatus_to_exitcode(status)
        answer = {"returncode": proc.returncode, "wall": wall,
                  "cpu": usage.ru_utime + usage.ru_stime, "peak_rss": usage.ru_maxrss * 1024}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
