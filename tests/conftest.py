"""Shared fixtures: tiny real diffusers models, the device the suite runs on (the GPU when present), and the
bad-input suite's ``refused`` check."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Callable, Sequence

import pytest
import torch

from tide.device import resolve_device
from tide.models.dit import DiTBackbone

TINY_DIT = dict(num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=1, num_layers=3,
                sample_size=8, patch_size=2, num_embeds_ada_norm=4, norm_type="ada_norm_zero")


@pytest.fixture(scope="session")
def device() -> torch.device:
    return resolve_device("auto")


@pytest.fixture
def tiny_dit(device) -> DiTBackbone:
    """A 3-block, 4-class DiT on 8x8 single-channel images (16 tokens of width 16), randomly initialised."""
    torch.manual_seed(0)
    return DiTBackbone.from_config(TINY_DIT).to(device)


def save_tiny_dit_dir(path: Path) -> Path:
    """The tiny DiT (seed 0) saved as a diffusers pipeline directory: model_index.json, transformer/, scheduler/."""
    torch.manual_seed(0)
    backbone = DiTBackbone.from_config(TINY_DIT)
    backbone.transformer.save_pretrained(path / "transformer")
    backbone.scheduler.save_pretrained(path / "scheduler")
    (path / "model_index.json").write_text(json.dumps({
        "_class_name": "DiTPipeline", "transformer": ["diffusers", "DiTTransformer2DModel"],
        "scheduler": ["diffusers", "DDIMScheduler"]}))
    return path


@pytest.fixture
def tiny_dit_dir(tmp_path) -> Path:
    return save_tiny_dit_dir(tmp_path / "tiny-dit")


# ------------------------------------------------------------------ the bad-input suite (tests/bad_inputs)
# A refused command exits with its status, prints exactly one line naming the problem on stderr, and leaves every
# file around it as it was (nothing modified, nothing half-written).

def snapshot(*roots: Path) -> dict[str, str]:
    """Every path under ``roots`` with its SHA-256 (directories as 'dir')."""
    out = {}
    for root in roots:
        root = Path(root)
        if not root.exists():
            continue
        for p in sorted([root, *root.rglob("*")]):
            if p.is_symlink() or p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest() if p.exists() else "broken link"
            elif p.is_dir():
                out[str(p)] = "dir"
    return out


@pytest.fixture
def refused(capsys) -> Callable:
    """``refused(argv, match, roots, code=2)``: run ``tide argv`` in-process and assert the refusal (see the module
    docstring); ``roots`` are the directories that must stay byte-identical; returns the stderr line."""
    from tide.cli import main

    def check(argv: Sequence[str], match: str, roots: Sequence[Path], code: int = 2) -> str:
        before = snapshot(*roots)
        capsys.readouterr()
        try:
            got = main([str(a) for a in argv])
        except SystemExit as exc:  # argparse exits by itself
            got = exc.code
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert got == code, f"exit {got}, want {code}; stderr: {err}"
        assert len(lines) == 1, f"want one stderr line, got {len(lines)}:\n{err}"
        assert re.search(match, lines[0]), f"{lines[0]!r} does not match {match!r}"
        assert "Traceback" not in err
        assert snapshot(*roots) == before, "files changed by a refused command"
        return lines[0]

    return check
