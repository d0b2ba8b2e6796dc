"""TopK SAE training throughput: tide against SAELens, EleutherAI sparsify and a naive dense PyTorch TopK.

One run, one shape (d_in 256, dictionary 4096, k 32, batch 4096, float32, 2 threads by default), the same
data and the same dead latents (half the dictionary) for every implementation, each with AuxK on and
again with it off. Every implementation runs in its own process (tide, the naive baseline and the
matmul roofline in this environment; SAELens and sparsify in ``.bench-venv/``, created on first use:
sae-lens needs transformer-lens < 4, which the project's environment cannot hold). The processes stay
up and are commanded in turn, so the implementations are interleaved round by round; each round runs
warm-up steps and then timed steps, and the reported step time is the median of all timed steps.

    python experiments/bench/sae_bench.py                  # CPU, writes experiments/results/bench_sae.json
    python experiments/bench/sae_bench.py --device cuda    # GPU: tide, naive and the matmul only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("sae_bench_worker.py")
BENCH_VENV = ROOT / ".bench-venv"
COMPETITOR_REQUIREMENTS = ["sae-lens==6.54.*", "eai-sparsify==1.3.3"]
LOCAL = ("tide", "tide_kaux256", "naive", "matmul")
COMPETITORS = ("saelens", "saelens_sparse", "sparsify")


def bench_python() -> Path:
    return BENCH_VENV / "bin" / "python"


def ensure_bench_venv(torch_version: str) -> Path:
    """A separate environment with the competitors, torch pinned to this environment's version (so pip
    takes the same local CPU wheel and every process runs the same torch)."""
    py = bench_python()
    check = [str(py), "-c", "import sae_lens, sparsify, torch; print(torch.__version__)"]
    if py.exists() and subprocess.run(check, capture_output=True, text=True).returncode == 0:
        return py
    print(f"creating {BENCH_VENV} (torch=={torch_version} {' '.join(COMPETITOR_REQUIREMENTS)})", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(BENCH_VENV)], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", f"torch=={torch_version}", *COMPETITOR_REQUIREMENTS], check=True)
    subprocess.run(check, check=True, capture_output=True)
    return py


class Worker:
    def __init__(self, impl: str, python: Path, args: argparse.Namespace):
        cmd = [str(python), str(WORKER), "--impl", impl, "--device", args.device, "--threads", str(args.threads),
               "--d", str(args.d), "--f", str(args.f), "--k", str(args.k), "--k-aux", str(args.k_aux),
               "--batch", str(args.batch), "--dead-fraction", str(args.dead_fraction)]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads), "PYTHONWARNINGS": "ignore"}
        self.impl = impl
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        self.hello = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.impl} worker exited with {self.proc.wait()}")
        return json.loads(line)

    def run(self, aux: bool, warmup: int, steps: int) -> list[float]:
        self.proc.stdin.write(json.dumps({"aux": aux, "warmup": warmup, "steps": steps}) + "\n")
        self.proc.stdin.flush()
        return self._read()["times"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu, or cuda (competitors are skipped there)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--f", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--k-aux", type=int, default=128, help="tide's and the naive baseline's AuxK k (SAELens and sparsify use d_in // 2)")
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--dead-fraction", type=float, default=0.5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5, help="timed steps per round")
    p.add_argument("--impls", default=None, help="comma-separated subset of " + ",".join(LOCAL + COMPETITORS))
    p.add_argument("--out", default=str(ROOT / "experiments" / "results" / "bench_sae.json"))
    args = p.parse_args()

    import torch

    impls = args.impls.split(",") if args.impls else list(LOCAL + COMPETITORS)
    if args.device != "cpu":
        skipped = [i for i in impls if i in COMPETITORS]
        if skipped:
            print(f"skipping {skipped} on {args.device}: the comparison is a CPU one", flush=True)
        impls = [i for i in impls if i not in COMPETITORS]
    competitor_python = ensure_bench_venv(torch.__version__.split("+")[0]) if any(i in COMPETITORS for i in impls) else None

    workers = {}
    for impl in impls:
        workers[impl] = Worker(impl, competitor_python if impl in COMPETITORS else Path(sys.executable), args)
        print(f"{impl}: ready ({workers[impl].hello['info']})", flush=True)

    load_before = load_average()
    times: dict[str, dict[str, list[float]]] = {i: {"on": [], "off": []} for i in impls}
    started = time.time()
    for r in range(args.rounds):
        order = impls[r % len(impls):] + impls[:r % len(impls)]  # rotate who goes first
        for aux in (True, False):
            for impl in order:
                if impl == "matmul" and aux:
                    continue
                t = workers[impl].run(aux, args.warmup, args.steps)
                times[impl]["on" if aux else "off"] += t
                print(f"round {r + 1}/{args.rounds} {impl:15s} AuxK {'on ' if aux else 'off'}: "
                      f"median {statistics.median(t) * 1e3:7.1f} ms/step", flush=True)
    hellos = {i: w.hello for i, w in workers.items()}
    for w in workers.values():
        w.close()

    mm = statistics.median(times["matmul"]["off"]) if "matmul" in times else None
    results = {}
    for impl in impls:
        if impl == "matmul":
            continue
        entry = {"info": hellos[impl]["info"], "packages": hellos[impl]["packages"]}
        for key in ("on", "off"):
            med = statistics.median(times[impl][key])
            entry[f"auxk_{key}"] = {"median_step_s": med, "vectors_per_s": args.batch / med,
                                    "roofline_fraction": (mm / med) if mm else None,
                                    "step_s": times[impl][key]}
        results[impl] = entry
    report = {
        "shape": {"d_in": args.d, "d_sae": args.f, "k": args.k, "batch": args.batch, "dtype": "float32",
                  "dead_fraction": args.dead_fraction, "tide_and_naive_k_aux": args.k_aux},
        "device": args.device, "threads": args.threads, "rounds": args.rounds, "warmup_steps": args.warmup,
        "timed_steps_per_round": args.steps,
        "machine": {"platform": platform.platform(), "cpu": cpu_model(), "cpu_count": os.cpu_count(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
                    "load_average_before": load_before, "load_average_after": load_average(),
                    "wall_s": round(time.time() - started, 1)},
        "matmul": None if mm is None else {
            "what": "torch.addmm(b_enc, x, W_enc.T, out=preallocated): the encoder product alone",
            "median_step_s": mm, "gflops": 2 * args.batch * args.f * args.d / mm / 1e9, "vectors_per_s": args.batch / mm,
            "step_s": times["matmul"]["off"]},
        "implementations": results,
    }
    if "tide" in results:
        ratios = {}
        for other in ("saelens", "saelens_sparse", "sparsify", "naive"):
            if other in results:
                for key in ("on", "off"):
                    ratios[f"tide/{other} auxk_{key}"] = (results["tide"][f"auxk_{key}"]["vectors_per_s"]
                                                         / results[other][f"auxk_{key}"]["vectors_per_s"])
        report["speedups"] = ratios
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out}")
    print(f"{'implementation':16s} {'AuxK on vec/s':>14s} {'AuxK off vec/s':>15s} {'roofline on':>12s} {'off':>6s}")
    for impl, e in results.items():
        on, off = e["auxk_on"], e["auxk_off"]
        frac = (lambda v: f"{v:.0%}" if v else "-")
        print(f"{impl:16s} {on['vectors_per_s']:14.0f} {off['vectors_per_s']:15.0f} {frac(on['roofline_fraction']):>12s} "
              f"{frac(off['roofline_fraction']):>6s}")
    if mm:
        print(f"matmul alone: {report['matmul']['gflops']:.0f} GFLOP/s = {report['matmul']['vectors_per_s']:.0f} vectors/s")
    for k, v in report.get("speedups", {}).items():
        print(f"{k}: {v:.2f}x")


if __name__ == "__main__":
    main()
