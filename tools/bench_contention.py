"""A diffkiln command on a machine busy with another job: ``--threads`` set to every core (torch's
own default, what diffkiln did before) against diffkiln's default (the cores the other job leaves
idle), side by side, and each against the idle machine.

    python tools/bench_contention.py BUNDLE [--eval-size 10] [--repeat 1]

The other job is a torch process running float32 matrix products on every core. The command timed
is the demo's last one, ``diffkiln report BUNDLE`` (smaller). Results go to
tools/results/bench_contention.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

_JOB = """
import torch
torch.set_num_threads({threads})
a = torch.randn(1024, 1024)
while True:
    a = (a @ a).clamp_(-1, 1)
"""


def _timed(argv: list[str]) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "diffkiln", *argv], capture_output=True, text=True, env=env)
    if r.returncode:
        raise SystemExit(r.stderr[-3000:])
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--eval-size", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("tools/results/bench_contention.json"))
    a = ap.parse_args()
    cpus = len(os.sched_getaffinity(0))
    report = ["report", str(a.bundle), "--eval-size", str(a.eval_size), "--no-progress", "--out"]
    rows: dict[str, list[float]] = {"idle, default threads": [], "busy, --threads all": [], "busy, default threads": []}
    for _ in range(a.repeat):
        rows["idle, default threads"].append(_timed([*report, "/tmp/bench-contention-idle"]))
        job = subprocess.Popen([sys.executable, "-c", _JOB.format(threads=cpus)])
        try:
            time.sleep(3)  # the job's threads are running before the command looks
            rows["busy, --threads all"].append(_timed(["--threads", str(cpus), *report, "/tmp/bench-contention-all"]))
            rows["busy, default threads"].append(_timed([*report, "/tmp/bench-contention-default"]))
        finally:
            job.kill()
            job.wait()
        time.sleep(3)
    result = {
        "cpus": cpus,
        "command": " ".join(["diffkiln", *report[:-1]]),
        "other_job": f"torch float32 1024x1024 matmuls on {cpus} threads",
        "seconds": rows,
        "median_seconds": {k: sorted(v)[len(v) // 2] for k, v in rows.items()},
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["median_seconds"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
