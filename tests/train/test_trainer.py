import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from tide.capture import CaptureConfig, capture
from tide.errors import TideError
from tide.sae import load_sae
from tide.train import SAESpec, TrainConfig, Trainer, TrainResult, train
import tide.train.trainer as trainer_module

HOOKS = ["blocks.1.hook_resid_post", "blocks.2.hook_resid_post"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from conftest import TINY_DIT
    from tide.models.dit import DiTBackbone

    torch.manual_seed(0)
    backbone = DiTBackbone.from_config(TINY_DIT)
    out = tmp_path_factory.mktemp("train") / "ds"
    capture(CaptureConfig(out=str(out), hooks=HOOKS, num_samples=32, samples_per_shard=8, num_steps=10), backbone,
            progress=False)
    return out


def _cfg(dataset, out, **kw):
    saes = kw.pop("saes", [SAESpec(name="tide", hook=HOOKS[0], d_sae=64, k=4, conditioning="tide"),
                           SAESpec(name="plain", hook=HOOKS[1], d_sae=64, k=4)])
    return TrainConfig(data=str(dataset), out=str(out), saes=saes, steps=kw.pop("steps", 40), batch_size=128,
                       shuffle_buffer=1024, warmup_steps=5, dead_after_rows=1000, progress=False, device="cpu", **kw)


def test_several_saes_train_from_one_pass_and_improve(dataset, tmp_path):
    summary = train(_cfg(dataset, tmp_path / "run", steps=60, log_every=5, checkpoint_every=20))
    first, last = summary.config, summary.final
    history = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert history["steps"] == 60 and set(summary.saes) == {"tide", "plain"}
    start = json.loads((tmp_path / "run" / "checkpoints" / "step-0000060" / "trainer.json").read_text())["history"][0]
    for name in ("tide", "plain"):
        assert last[name]["fvu"] < start[name]["fvu"]
        assert abs(last[name]["l0"] - 4) < 1e-6
        sae = load_sae(tmp_path / "run" / name)
        assert sae.cfg.hook == (HOOKS[0] if name == "tide" else HOOKS[1]) and sae.cfg.d_in == 16
        assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(1), atol=1e-5)
    assert first["steps"] == 60


def _random_batches(seed, d=16, batch=128, latents=8):
    """A factory ``batches(start)`` of endless (x_BD, t_B) pairs drawn from a fixed sparse dictionary (no dataset
    on disk); step i's batch depends only on (seed, i), so ``batches(s)`` continues ``batches(0)`` at step s."""
    dictionary_FD = torch.randn(latents, d, generator=torch.Generator().manual_seed(seed))

    def batches(start=0):
        for step in itertools.count(start):
            g = torch.Generator().manual_seed(seed * 100_003 + step + 1)
            code_BF = torch.rand(batch, latents, generator=g) * (torch.rand(batch, latents, generator=g) < 0.25)
            x_BD = code_BF @ dictionary_FD + 0.01 * torch.randn(batch, d, generator=g)
            yield x_BD, torch.rand(batch, generator=g) * 1000
    return batches


def _gen_cfg(out, **kw):
    return TrainConfig(out=str(out), saes=[SAESpec(name="gen", d_in=16, d_sae=32, k=4, normalization="none")],
                       batch_size=128, warmup_steps=5, dead_after_rows=1000, progress=False, device="cpu", **kw)


def test_trainer_fed_a_plain_generator_of_random_tensors_trains_and_lowers_fvu(tmp_path):
    cfg = _gen_cfg(tmp_path / "run", steps=60, lr=4e-3, log_every=5, checkpoint_every=0)
    result = Trainer(cfg, _random_batches(0)()).run()  # a generator object: no factory, no dataset
    assert isinstance(result, TrainResult) and result.saes == ("gen",) and result.steps == 60
    start = json.loads((tmp_path / "run" / "checkpoints" / "step-0000060" / "trainer.json").read_text())["history"][0]
    assert result.final["gen"]["fvu"] < 0.5 * start["gen"]["fvu"], (start, result.final)
    assert abs(result.final["gen"]["l0"] - 4) < 1e-6
    assert json.loads((tmp_path / "run" / "train_summary.json").read_text())["final"]["gen"] == result.final["gen"]
    assert load_sae(result.sae_dir("gen")).cfg.d_in == 16


def test_a_batch_factory_is_positioned_at_the_checkpoint_step_and_resumes_bit_for_bit(tmp_path):
    batches = _random_batches(3, batch=64)
    Trainer(_gen_cfg(tmp_path / "ref", steps=20, checkpoint_every=5), batches).run()
    with pytest.raises(TideError, match="ran out after step 12 of 20"):  # stops between checkpoints 10 and 15
        Trainer(_gen_cfg(tmp_path / "cut", steps=20, checkpoint_every=5),
                lambda start: itertools.islice(batches(start), 12)).run()
    assert (tmp_path / "cut" / "checkpoints" / "latest").read_text() == "step-0000010"
    starts = []

    def factory(start):
        starts.append(start)
        return batches(start)
    result = Trainer(_gen_cfg(tmp_path / "cut", steps=20, checkpoint_every=5, resume=True), factory).run()
    assert result.resumed and starts == [10]
    ref = load_file(str(tmp_path / "ref" / "gen" / "sae.safetensors"))
    got = load_file(str(tmp_path / "cut" / "gen" / "sae.safetensors"))
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)


def test_wandb_offline_writes_a_local_run_and_sends_nothing(dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    train(_cfg(dataset, tmp_path / "run", steps=10, log_every=5, wandb="offline"))
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].rglob("*.wandb"))


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(dataset, tmp_path, monkeypatch):
    real = trainer_module.train_step
    calls = {"n": 0}

    def poisoned(sae, *args, **kwargs):
        calls["n"] += 1
        losses, out = real(sae, *args, **kwargs)
        if calls["n"] > 2 * 12:  # two SAEs per step: step 12 onwards
            losses = losses._replace(loss=torch.tensor(float("nan")))
        return losses, out

    monkeypatch.setattr(trainer_module, "train_step", poisoned)
    with pytest.raises(TideError, match=r"loss became nan at step 12; stopped\. The last good checkpoint"):
        train(_cfg(dataset, tmp_path / "run", steps=30, checkpoint_every=10))
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step-0000010"
    assert not (tmp_path / "run" / "tide").exists()


def test_bad_configs_are_refused_with_the_fix_named(dataset, tmp_path):
    with pytest.raises(TideError, match=r"hook 'blocks.7.hook_resid_post' is not in dataset .* it holds"):
        train(_cfg(dataset, tmp_path / "a", saes=[SAESpec(name="x", hook="blocks.7.hook_resid_post")]))
    with pytest.raises(TideError, match="d_in=32 but the dataset's blocks.1.hook_resid_post activations have width 16"):
        train(_cfg(dataset, tmp_path / "b", saes=[SAESpec(name="x", hook=HOOKS[0], d_in=32)]))
    with pytest.raises(TideError, match=r"aux_row_stride must be >= 1 \(1: AuxK on every row\), got 0"):
        train(_cfg(dataset, tmp_path / "d", aux_row_stride=0))
    assert not (tmp_path / "d").exists()
    train(_cfg(dataset, tmp_path / "c", steps=2))
    with pytest.raises(TideError, match="not empty: pass --resume"):
        train(_cfg(dataset, tmp_path / "c", steps=2))
    with pytest.raises(TideError, match=r"different config \(steps: 2 -> 5\)"):
        train(_cfg(dataset, tmp_path / "c", steps=5, resume=True))


# ------------------------------------------------------------------------------------ processes
def _yaml(dataset, out, path, steps=40):
    path.write_text(f"""data: {dataset}
out: {out}
steps: {steps}
batch_size: 128
shuffle_buffer: 1024
warmup_steps: 5
dead_after_rows: 1000
checkpoint_every: 5
device: cpu
progress: false
saes:
  - {{name: tide, hook: {HOOKS[0]}, d_sae: 64, k: 4, conditioning: tide}}
  - {{name: plain, hook: {HOOKS[1]}, d_sae: 64, k: 4, sparsity: batchtopk}}
""")
    return path


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _weights(run):
    return {name: load_file(str(run / name / "sae.safetensors")) for name in ("tide", "plain")}


def test_training_killed_with_sigkill_and_resumed_ends_with_the_same_weights(dataset, tmp_path):
    ref_cfg = _yaml(dataset, tmp_path / "ref", tmp_path / "ref.yaml")
    subprocess.run([sys.executable, "-m", "tide.cli", "train", "--config", str(ref_cfg)], env=_env(), check=True,
                   capture_output=True)
    cfg = _yaml(dataset, tmp_path / "killed", tmp_path / "killed.yaml")
    cmd = [sys.executable, "-m", "tide.cli", "train", "--config", str(cfg)]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = tmp_path / "killed" / "checkpoints" / "latest"
    deadline = time.time() + 120
    while not latest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step_killed = latest.read_text() if latest.exists() else None
    assert step_killed is not None and step_killed != "step-0000040", "the kill landed after the run finished"
    subprocess.run(cmd + ["--resume"], env=_env(), check=True, capture_output=True)
    ref, got = _weights(tmp_path / "ref"), _weights(tmp_path / "killed")
    for name in ref:
        assert ref[name].keys() == got[name].keys()
        for key in ref[name]:
            assert torch.equal(ref[name][key], got[name][key]), (name, key)


def test_two_gloo_ranks_match_one_process_with_the_same_global_batch(dataset, tmp_path):
    one = _yaml(dataset, tmp_path / "one", tmp_path / "one.yaml", steps=15)
    subprocess.run([sys.executable, "-m", "tide.cli", "train", "--config", str(one)], env=_env(), check=True,
                   capture_output=True)
    two = _yaml(dataset, tmp_path / "two", tmp_path / "two.yaml", steps=15)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(29600 + os.getpid() % 1000), "-m", "tide.cli", "train", "--config", str(two)],
                          env=_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert json.loads((tmp_path / "two" / "train_summary.json").read_text())["world_size"] == 2
    for name in ("tide",):  # row-local TopK; BatchTopK selects over each rank's half and may differ more
        for key in ("W_enc", "W_dec", "b_dec"):
            diff = (a[name][key] - b[name][key]).norm() / a[name][key].norm()
            assert diff < 2e-2, (name, key, float(diff))


# ------------------------------------------------------------------------------------ shard checksums
def _flip_activation_byte(shard, hook):
    """Flip the low bit of one stored activation: same size, still finite, a different SHA-256."""
    import h5py

    with h5py.File(shard, "r") as f:
        offset = f["acts"][hook].id.get_offset() + 5
    with open(shard, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)[0]
        fh.seek(offset)
        fh.write(bytes([byte ^ 0x01]))


def _files(root):
    return {str(p): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_training_refuses_a_shard_whose_bytes_changed_unless_verification_is_off(dataset, tmp_path, capsys):
    from tide.cli import main

    data = tmp_path / "ds"
    shutil.copytree(dataset, data)
    _flip_activation_byte(data / "shard-000002.h5", HOOKS[1])
    before = _files(data)
    cfg = _yaml(data, tmp_path / "run", tmp_path / "run.yaml", steps=6)
    capsys.readouterr()
    assert main(["train", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "shard shard-000002.h5 does not match its SHA-256 in the manifest" in err[0]
    assert f"run `tide data verify {data}` for details" in err[0]
    assert _files(data) == before and not (tmp_path / "run").exists()  # refused before statistics or the run dir

    assert main(["train", "--config", str(cfg), "--no-verify-checksums"]) == 0
    assert json.loads((tmp_path / "run" / "train_summary.json").read_text())["steps"] == 6
