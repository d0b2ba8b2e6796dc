"""CLI start-up time: `tide --help` and a one-line error (`tide hooks --backbone /no/such/dir`), each in a
fresh interpreter, for one or more source trees side by side (interleaved repeats, medians and ranges).

    python experiments/bench/cli_startup.py --trees before=/path/to/old/checkout after=. \\
        --out experiments/results/bench_cli_startup.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = {"help": ["--help"], "error": ["hooks", "--backbone", "/no/such/dir"]}


def run_once(tree: Path, argv: list[str]) -> float:
    # run from the tree itself: `python -m` puts the working directory ahead of PYTHONPATH
    env = {**os.environ, "PYTHONPATH": str(tree)}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "tide.cli", *argv], env=env, cwd=tree, capture_output=True, text=True,
                          check=False)
    if proc.returncode not in (0, 2) or (proc.returncode == 2 and "error:" not in proc.stderr):
        raise RuntimeError(f"tide {' '.join(argv)} in {tree} failed: {proc.stderr[-500:]}")
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trees", nargs="+", default=["current=."], help="NAME=PATH of each source tree")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default="experiments/results/bench_cli_startup.json")
    args = ap.parse_args()
    trees = dict(t.split("=", 1) for t in args.trees)
    times = {name: {cmd: [] for cmd in COMMANDS} for name in trees}
    for name, path in trees.items():  # warm the file cache once per tree
        run_once(Path(path).resolve(), COMMANDS["help"])
    for _ in range(args.repeats):
        for cmd, argv in COMMANDS.items():
            for name, path in trees.items():
                times[name][cmd].append(run_once(Path(path).resolve(), argv))
    summary = {name: {cmd: {"median_s": round(statistics.median(v), 3), "min_s": round(min(v), 3),
                            "max_s": round(max(v), 3)} for cmd, v in per.items()} for name, per in times.items()}
    result = {"python": sys.version.split()[0], "cpu_count": os.cpu_count(), "repeats": args.repeats,
              "commands": {k: "tide " + " ".join(v) for k, v in COMMANDS.items()}, "trees": trees,
              "summary": summary, "runs_s": times}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
