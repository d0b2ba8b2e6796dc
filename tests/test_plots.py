"""tide.plots: matplotlib loads on first use, figures never go through pyplot's global backend, and every
figure-making module of tide draws through it."""

import base64
import re
import subprocess
import sys
from pathlib import Path

from PIL import Image

import tide
from tide.plots import figure_png_base64, finite_or_nan, new_figure, save_figure

PNG = b"\x89PNG\r\n\x1a\n"


def test_save_figure_and_base64_write_pngs_of_the_figure_size(tmp_path):
    fig, ax = new_figure((3.0, 2.0))
    ax.plot([0, 1], [1, 0])
    path = save_figure(fig, tmp_path / "f.png", dpi=50, tight=False)
    assert path == tmp_path / "f.png" and Image.open(path).size == (150, 100)
    fig, axes = new_figure((4.0, 2.0), ncols=2, squeeze=False)
    assert axes.shape == (1, 2)
    assert base64.b64decode(figure_png_base64(fig, dpi=100)).startswith(PNG)


def test_finite_or_nan_turns_json_nulls_into_nan():
    out = finite_or_nan([1, None, 2.5])
    assert out[0] == 1 and out[2] == 2.5 and out[1] != out[1]


def test_figures_leave_pyplot_and_the_backend_alone(tmp_path):
    code = ("import sys, torch; from tide.images import save_grid; "
            f"save_grid(torch.rand(2, 1, 8, 8), {str(tmp_path / 'g.png')!r}, nrow=2, row_labels=['a'], title='t'); "
            "print(sorted(m for m in ('matplotlib.pyplot', 'matplotlib_inline') if m in sys.modules))")
    before = subprocess.run([sys.executable, "-c", "import sys, tide; print('matplotlib' in sys.modules)"],
                            capture_output=True, text=True, check=True)
    assert before.stdout.strip() == "False"  # import tide stays light
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]" and (tmp_path / "g.png").is_file()


def test_no_module_sets_the_matplotlib_backend_or_uses_pyplot_on_its_own():
    root = Path(tide.__file__).parent
    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py")
                 if re.search(r"matplotlib\.use\(|import matplotlib\.pyplot|from matplotlib import pyplot", p.read_text())]
    assert offenders == []
