"""A capture killed with SIGKILL at random moments and resumed equals an uninterrupted capture, byte for byte;
so does a capture split over two torchrun ranks."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

ARGS = ["--num-samples", "24", "--samples-per-shard", "2", "--num-steps", "25", "--guidance-scale", "2",
        "--cfg-branch", "both", "--token-fraction", "0.5", "--device", "cpu",
        "--hooks", "blocks.1.hook_resid_post,blocks.2.hook_mlp_out"]


def _env(threads: int = 1) -> dict:
    # equal thread counts give bitwise-equal floats; torchrun also runs each rank on one thread
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}


def _capture_cmd(backbone, out, *extra):
    return [sys.executable, "-m", "tide.cli", "capture", "--backbone", str(backbone), "--out", str(out), *ARGS, *extra]


def _shards(out):
    manifest = json.loads((out / "manifest.json").read_text())
    return manifest["complete"], [(s["index"], s["rows"], s["sha256"]) for s in manifest["shards"]]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    from conftest import save_tiny_dit_dir

    root = tmp_path_factory.mktemp("crash")
    backbone = save_tiny_dit_dir(root / "tiny-dit")
    out = root / "reference"
    subprocess.run(_capture_cmd(backbone, out), env=_env(), check=True, capture_output=True)
    complete, shards = _shards(out)
    assert complete and len(shards) == 12
    return backbone, root, shards


def test_capture_killed_at_random_moments_resumes_to_the_same_dataset(reference):
    backbone, root, expected = reference
    out = root / "killed"
    rng = random.Random(1234)
    kills = []
    for attempt in range(4):
        cmd = _capture_cmd(backbone, out, *(["--resume"] if (out / "manifest.json").exists() else []))
        proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if attempt == 0:
            time.sleep(rng.uniform(0.5, 2.5))  # somewhere in start-up
        else:
            deadline = time.time() + 60
            while not any((out / "progress").glob("rank-*.json")) and proc.poll() is None and time.time() < deadline:
                time.sleep(0.02)  # wait until shards are being written, then strike at a random moment
            time.sleep(rng.uniform(0.0, 1.0))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        done = len(_shards(out)[1]) if (out / "manifest.json").exists() else 0
        kills.append(done)
    assert any(0 < k < 12 for k in kills), f"no kill landed mid-capture (shards done after each kill: {kills})"
    cmd = _capture_cmd(backbone, out, *(["--resume"] if (out / "manifest.json").exists() else []))
    subprocess.run(cmd, env=_env(), check=True, capture_output=True)
    complete, shards = _shards(out)
    assert complete
    assert shards == expected
    assert not list(out.glob("*.tmp"))


def test_resuming_with_another_config_is_refused_with_the_difference_named(reference):
    backbone, root, _ = reference
    out = root / "other"
    shutil.copytree(root / "reference", out)
    proc = subprocess.run(_capture_cmd(backbone, out, "--resume", "--num-steps", "30"), env=_env(),
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "num_steps: captured with 25, now 30" in proc.stderr


def test_two_torchrun_ranks_equal_one_process(reference):
    backbone, root, expected = reference
    out = root / "ranks"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(29500 + os.getpid() % 1000)]
    proc = subprocess.run([*torchrun, *_capture_cmd(backbone, out)[1:]], env=_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    complete, shards = _shards(out)
    assert complete and shards == expected
    ranks = [s["rank"] for s in json.loads((out / "manifest.json").read_text())["shards"]]
    assert sorted(set(ranks)) == [0, 1]
