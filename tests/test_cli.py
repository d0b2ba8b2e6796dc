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
