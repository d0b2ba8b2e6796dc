"""The CLI: each error is one line on stderr and exit status 2; no traceback."""

import json
import subprocess
import sys

import pytest

from tide.cli import main


def test_hooks_lists_every_name_with_its_shape(tiny_dit_dir, capsys):
    assert main(["hooks", "--backbone", str(tiny_dit_dir), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "blocks.2.hook_resid_post" in out and "(16, 16)" in out
    assert sum(line.startswith("blocks.") for line in out.splitlines()) == 12


def test_sample_writes_a_grid(tiny_dit_dir, tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["sample", "--backbone", str(tiny_dit_dir), "--classes", "0,2", "--n", "3", "--num-steps", "3",
                 "--out", str(out), "--device", "cpu"]) == 0
    from PIL import Image

    assert Image.open(out).size[0] > 3 * 8
    assert "wrote" in capsys.readouterr().out


def test_sample_reads_a_yaml_config_and_flags_override_it(tiny_dit_dir, tmp_path):
    cfg = tmp_path / "s.yaml"
    cfg.write_text(f"backbone: {tiny_dit_dir}\nclasses: [1]\nn: 2\nnum_steps: 2\nout: {tmp_path / 'a.png'}\ndevice: cpu\n")
    assert main(["sample", "--config", str(cfg), "--out", str(tmp_path / "b.png")]) == 0
    assert (tmp_path / "b.png").exists() and not (tmp_path / "a.png").exists()


@pytest.mark.parametrize("argv, message", [
    (["hooks", "--backbone", "/no/such/dir"], "no embedded model or checkpoint directory named '/no/such/dir'"),
    (["sample", "--backbone", "TINY", "--classes", "7"], r"unknown class id(s) [7]: valid ids are 0..3"),
    (["sample", "--backbone", "TINY", "--num-steps", "0"], "num_steps must be >= 1"),
    (["hooks", "--backbone", "UNSUPPORTED"], "unsupported model class 'UNet2DConditionModel'"),
])
def test_cli_errors_are_one_clear_line_and_exit_2(argv, message, tiny_dit_dir, tmp_path):
    unsupported = tmp_path / "unet"
    unsupported.mkdir()
    (unsupported / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    argv = [{"TINY": str(tiny_dit_dir), "UNSUPPORTED": str(unsupported)}.get(a, a) for a in argv]
    proc = subprocess.run([sys.executable, "-m", "tide.cli", *argv, "--device", "cpu", "--out", str(tmp_path / "x.png")]
                          if argv[0] == "sample" else [sys.executable, "-m", "tide.cli", *argv, "--device", "cpu"],
                          capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.png").exists()


def test_stats_and_dashboard_commands(tiny_dit_dir, tmp_path, capsys):
    import torch

    from tide.capture import CaptureConfig, capture
    from tide.sae import SAE, SAEConfig, save_sae

    hook = "blocks.1.hook_resid_post"
    capture(CaptureConfig(backbone=str(tiny_dit_dir), out=str(tmp_path / "ds"), hooks=[hook], num_samples=4,
                          num_steps=3, device="cpu"), progress=False)
    torch.manual_seed(0)
    save_sae(SAE(SAEConfig(d_in=16, d_sae=32, k=4, normalization="none", hook=hook)), tmp_path / "sae")
    assert main(["stats", "--sae", str(tmp_path / "sae"), "--data", str(tmp_path / "ds"),
                 "--out", str(tmp_path / "stats.h5"), "--device", "cpu"]) == 0
    assert main(["dashboard", "--stats", str(tmp_path / "stats.h5"), "--out", str(tmp_path / "dash"),
                 "--max-features", "2", "--images-per-feature", "1", "--device", "cpu", "--no-progress"]) == 0
    assert (tmp_path / "dash" / "index.html").exists()
    assert "open it in a browser" in capsys.readouterr().out
    assert main(["stats", "--sae", str(tmp_path / "sae"), "--data", str(tmp_path / "ds"), "--cfg-branch", "x",
                 "--out", str(tmp_path / "s2.h5"), "--device", "cpu"]) == 2


def test_top_level_help_imports_no_stage():
    """`tide --help` lists every command without importing torch, diffusers or any stage."""
    code = ("import sys\nfrom tide.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = sorted(m for m in ('torch', 'diffusers', 'transformer_lens', 'h5py', 'tide.models') if m in sys.modules)\n"
            "print('HEAVY', heavy)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "HEAVY []" in proc.stdout
    for name in ("hooks", "sample", "capture", "train", "eval", "stats", "dashboard", "steer", "demo", "data"):
        assert name in proc.stdout


def test_a_backbone_that_does_not_exist_is_refused_before_any_model_import(tmp_path):
    code = ("import sys\nfrom tide.cli import main\nrc = main(['hooks', '--backbone', 'no-such-model'])\n"
            "print('RC', rc, 'HEAVY', sorted(m for m in ('torch', 'diffusers', 'transformer_lens') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path)
    assert "RC 2 HEAVY []" in proc.stdout
    assert "no embedded model or checkpoint directory named 'no-such-model'" in proc.stderr


@pytest.mark.parametrize("argv, line", [
    (["eval", "--bogus", "1"], "tide eval: error: unknown flag --bogus (see tide eval --help)"),
    (["stats", "--top-k"], "tide stats: error: argument --top-k: expected one argument (see tide stats --help)"),
    ([], "tide: error: give a command (tide --help lists them)"),
])
def test_argparse_errors_are_one_line_without_the_usage_block(argv, line):
    proc = subprocess.run([sys.executable, "-m", "tide.cli", *argv], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip() == line and proc.stdout == ""


def test_help_still_prints_usage_and_exits_0():
    proc = subprocess.run([sys.executable, "-m", "tide.cli", "stats", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: tide stats") and "--overwrite" in proc.stdout
