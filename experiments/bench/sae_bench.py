"""TopK SAE training throughput: tide against SAELens, EleutherAI sparsify and a naive dense PyTorch TopK.

One shape (d_in 256, dictionary 4096, k 32, batch 4096, float32), at 1 and 2 threads, each with and without a
competing single-thread job (a loaded machine), the same
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
LOCAL = ("tide", "tide_every_row", "tide_every_2nd_row", "naive", "matmul")
COMPETITORS = ("saelens", "saelens_sparse", "sparsify", "sparsify_passive")
WAIT_POLICY = {"OMP_WAIT_POLICY": "PASSIVE"}
"""Extra environment per implementation (the others inherit this process's environment). tide sets
OMP_WAIT_POLICY=PASSIVE itself when imported (its workers import it before torch); sparsify_passive is
sparsify with the same setting, to separate the effect of the wait policy from the code's."""
RUN_AS = {"sparsify_passive": ("sparsify", WAIT_POLICY)}


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
        worker_impl, extra_env = RUN_AS.get(impl, (impl, {}))
        cmd = [str(python), str(WORKER), "--impl", worker_impl, "--device", args.device, "--threads", str(args.threads),
               "--d", str(args.d), "--f", str(args.f), "--k", str(args.k), "--k-aux", str(args.k_aux),
               "--batch", str(args.batch), "--dead-fraction", str(args.dead_fraction)]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads), "PYTHONWARNINGS": "ignore",
               **extra_env}
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


LOAD_CODE = ("import torch\ntorch.set_num_threads(1)\na = torch.randn(1024, 1024)\nwhile True:\n    a @ a\n")
"""A competing job: one thread of matrix products, as another training on the same machine would run."""


def start_load(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", LOAD_CODE], env={**os.environ, "OMP_NUM_THREADS": "1"})
            for _ in range(n)]


def stop_load(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        proc.kill()
        proc.wait()


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def run_setting(impls: list[str], threads: int, load: int, args: argparse.Namespace, competitor_python) -> dict:
    """Every implementation at one thread count, with ``load`` competing single-thread jobs running."""
    args.threads = threads
    workers = {}
    for impl in impls:
        workers[impl] = Worker(impl, competitor_python if impl in COMPETITORS else Path(sys.executable), args)
        print(f"{impl}: ready ({workers[impl].hello['info']})", flush=True)
    loaders = start_load(load)
    load_before = load_average()
    times: dict[str, dict[str, list[list[float]]]] = {i: {"on": [], "off": []} for i in impls}
    started = time.time()
    try:
        for r in range(args.rounds):
            order = impls[r % len(impls):] + impls[:r % len(impls)]  # rotate who goes first
            for aux in (True, False):
                for impl in order:
                    if impl == "matmul" and aux:
                        continue
                    t = workers[impl].run(aux, args.warmup, args.steps)
                    times[impl]["on" if aux else "off"].append(t)
                    print(f"threads {threads} load {load} round {r + 1}/{args.rounds} {impl:15s} AuxK "
                          f"{'on ' if aux else 'off'}: median {statistics.median(t) * 1e3:7.1f} ms/step", flush=True)
    finally:
        stop_load(loaders)
    load_after = load_average()
    hellos = {i: w.hello for i, w in workers.items()}
    for w in workers.values():
        w.close()

    def flat(rounds: list[list[float]]) -> list[float]:
        return [t for r in rounds for t in r]

    mm = statistics.median(flat(times["matmul"]["off"])) if "matmul" in times else None
    results = {}
    for impl in impls:
        if impl == "matmul":
            continue
        entry = {"info": hellos[impl]["info"], "packages": hellos[impl]["packages"]}
        for key in ("on", "off"):
            med = statistics.median(flat(times[impl][key]))
            entry[f"auxk_{key}"] = {"median_step_s": med, "vectors_per_s": args.batch / med,
                                    "roofline_fraction": (mm / med) if mm else None,
                                    "round_medians_s": [statistics.median(r) for r in times[impl][key]],
                                    "step_s": flat(times[impl][key])}
        results[impl] = entry
    setting = {"threads": threads, "competing_jobs": load, "load_average_before": load_before,
               "load_average_after": load_after, "wall_s": round(time.time() - started, 1),
               "matmul": None if mm is None else {
                   "what": "torch.mm(x, W_enc.T, out=preallocated): the encoder product alone, no bias",
                   "median_step_s": mm, "gflops": 2 * args.batch * args.f * args.d / mm / 1e9,
                   "vectors_per_s": args.batch / mm, "step_s": flat(times["matmul"]["off"])},
               "implementations": results}
    # ratios per round (the implementations ran side by side within a round): their median and range
    per_round = {}

    def ratio(num: str, den: str, key_num: str, key_den: str) -> dict:
        return spread([a / b for a, b in zip(results[num][key_num]["round_medians_s"], results[den][key_den]["round_medians_s"])])

    for mine in ("tide", "tide_every_row", "tide_every_2nd_row"):
        for other in ("sparsify", "sparsify_passive", "saelens", "saelens_sparse", "naive"):
            if mine in results and other in results and (mine == "tide" or other == "sparsify"):
                for key in ("on", "off"):
                    per_round[f"{mine}/{other} auxk_{key}"] = ratio(other, mine, f"auxk_{key}", f"auxk_{key}")
    for impl in ("tide", "tide_every_row", "tide_every_2nd_row", "sparsify", "sparsify_passive"):
        if impl in results:
            per_round[f"{impl} auxk on/off step"] = ratio(impl, impl, "auxk_on", "auxk_off")
    setting["speedups"] = per_round
    return setting


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu, or cuda (competitors are skipped there)")
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts, one setting each")
    p.add_argument("--load", default="0,1", help="comma-separated numbers of competing single-thread jobs, one setting each")
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--f", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--k-aux", type=int, default=128, help="tide's and the naive baseline's AuxK k (SAELens and sparsify use d_in // 2)")
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--dead-fraction", type=float, default=0.5)
    p.add_argument("--rounds", type=int, default=5)
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

    started = time.time()
    grid = [(int(th), int(load)) for load in args.load.split(",") for th in args.threads.split(",")]
    settings = [run_setting(impls, th, load, args, competitor_python) for th, load in grid]
    report = {
        "shape": {"d_in": args.d, "d_sae": args.f, "k": args.k, "batch": args.batch, "dtype": "float32",
                  "dead_fraction": args.dead_fraction, "tide_and_naive_k_aux": args.k_aux},
        "device": args.device, "rounds": args.rounds, "warmup_steps": args.warmup, "timed_steps_per_round": args.steps,
        "competing_job": LOAD_CODE,
        "machine": {"platform": platform.platform(), "cpu": cpu_model(), "cpu_count": os.cpu_count(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
                    "wall_s": round(time.time() - started, 1)},
        "settings": settings,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out}")
    for st in settings:
        print(f"\n{st['threads']} thread(s), {st['competing_jobs']} competing job(s)")
        print(f"{'implementation':16s} {'AuxK on vec/s':>14s} {'AuxK off vec/s':>15s} {'roofline on':>12s} {'off':>6s}")
        for impl, e in st["implementations"].items():
            on, off = e["auxk_on"], e["auxk_off"]
            frac = (lambda v: f"{v:.0%}" if v else "-")
            print(f"{impl:16s} {on['vectors_per_s']:14.0f} {off['vectors_per_s']:15.0f} "
                  f"{frac(on['roofline_fraction']):>12s} {frac(off['roofline_fraction']):>6s}")
        for k, v in st["speedups"].items():
            print(f"{k}: {v['median']:.2f}x (rounds {v['min']:.2f}-{v['max']:.2f})")


if __name__ == "__main__":
    main()
