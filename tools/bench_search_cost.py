"""Wall time of each recipe's default search on the built-in and tiny models, as `diffkiln optimize`
runs it (calibration included, a fresh cache each run).

Each (model, recipe) runs in a fresh process, one after another, so one run's warm caches do not
help the next. The issue's bound: every recipe's default search on a built-in or tiny model takes
at most 5 minutes on the CI machine (2 cores).

Usage:
    python tools/bench_search_cost.py --out tools/results/search_cost.json
    python tools/bench_search_cost.py --models tiny-sd15 --recipes mixed
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MODELS = ("shapes-unet", "shapes-dit", "tiny-sd15", "tiny-sdxl", "tiny-sd3", "tiny-flux", "tiny-pixart", "tiny-wan")
RECIPES = ("w8a8", "mixed")
BOUND_SECONDS = 300.0


def _run(model: str, recipe: str, work: Path) -> dict[str, Any]:
    out = work / f"{model}-{recipe}"
    cmd = [
        sys.executable,
        "-m",
        "diffkiln.cli",
        "optimize",
        model,
        "--recipe",
        recipe,
        "--out",
        str(out),
        "--cache-dir",
        str(work / f"cache-{model}-{recipe}"),
        "--no-progress",
    ]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    row: dict[str, Any] = {"model": model, "recipe": recipe, "seconds": round(seconds, 1), "rc": proc.returncode}
    if proc.returncode != 0:
        row["error"] = proc.stderr.strip().splitlines()[-1:] or [""]
        return row
    manifest = json.loads((out / "manifest.json").read_text())
    build = manifest.get("build_metrics", {})
    row.update(
        calibrate_seconds=build.get("calibrate_seconds"),
        plan_seconds=build.get("plan_seconds"),
        avg_weight_bits=manifest.get("quant", {}).get("avg_weight_bits"),
        quantized_layers=build.get("quantized_layers"),
    )
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated model names (default: all)")
    ap.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated recipes (default w8a8,mixed)")
    ap.add_argument("--out", type=Path, help="write the rows as JSON here (rewritten after each run)")
    a = ap.parse_args()
    rows: list[dict[str, Any]] = []
    machine = {
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "python": sys.version.split()[0],
    }
    with tempfile.TemporaryDirectory(prefix="diffkiln-search-cost-") as tmp:
        for model in a.models.split(","):
            for recipe in a.recipes.split(","):
                rows.append(_run(model, recipe, Path(tmp)))
                r = rows[-1]
                flag = "" if r["rc"] == 0 and r["seconds"] <= BOUND_SECONDS else "  <-- over the bound or failed"
                print(f"{model:12s} {recipe:6s} {r['seconds']:7.1f} s{flag}", flush=True)
                if a.out:
                    a.out.parent.mkdir(parents=True, exist_ok=True)
                    a.out.write_text(
                        json.dumps({"machine": machine, "bound_seconds": BOUND_SECONDS, "rows": rows}, indent=2) + "\n"
                    )
    print("| model | recipe | wall s | calibrate s | plan s | avg weight bits |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        cells = [r["model"], r["recipe"], r["seconds"], r.get("calibrate_seconds"), r.get("plan_seconds")]
        print("| " + " | ".join(str(c) for c in [*cells, r.get("avg_weight_bits")]) + " |")


if __name__ == "__main__":
    main()
