"""`tide capture --resume` checks the manifest (and the progress files) it resumes as every reader does, and refuses
before anything in the output directory changes: not one byte of the manifest, shards or progress files."""

import json
import shutil
from pathlib import Path

import pytest

from tide.capture import CaptureConfig, capture
from tide.cli import main
from tide.errors import TideError

ARGS = dict(hooks=["blocks.1.hook_resid_post"], num_samples=6, samples_per_shard=2, num_steps=3)


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def captured(tmp_path_factory):
    """A finished capture (tiny DiT) and one stopped after its first shard, as --resume finds it."""
    import torch

    from conftest import TINY_DIT
    from tide.models.dit import DiTBackbone

    torch.manual_seed(0)
    backbone = DiTBackbone.from_config(TINY_DIT)
    root = tmp_path_factory.mktemp("resume")
    capture(CaptureConfig(out=str(root / "done"), **ARGS), backbone, progress=False)
    partial = root / "partial"
    shutil.copytree(root / "done", partial)
    manifest = json.loads((partial / "manifest.json").read_text())
    for rec in manifest["shards"][1:]:
        (partial / rec["file"]).unlink()
    manifest.update(shards=manifest["shards"][:1], complete=False, total_rows=manifest["shards"][0]["rows"])
    (partial / "manifest.json").write_text(json.dumps(manifest, indent=1))
    (partial / "progress" / "rank-0.json").write_text(json.dumps({"rank": 0, "shards": manifest["shards"]}))
    return backbone, root


def _edit_manifest(edit):
    def apply(out: Path):
        path = out / "manifest.json"
        path.write_text(json.dumps(edit(json.loads(path.read_text())), indent=1))
    return apply


def _entry(**changes):
    def edit(m):
        m["shards"][0].update(changes)
        return m
    return edit


def _progress(text):
    def apply(out: Path):
        (out / "progress" / "rank-0.json").write_text(text)
    return apply


CASES = [
    ("newer-version", _edit_manifest(lambda m: dict(m, schema_version=99)),
     "written by a newer tide (version 99); upgrade tide"),
    ("other-schema", _edit_manifest(lambda m: dict(m, schema="someone.else")), "has schema 'someone.else'"),
    ("version-missing", _edit_manifest(lambda m: {k: v for k, v in m.items() if k != "schema_version"}),
     "has no 'schema_version' entry"),
    ("a-list", _edit_manifest(lambda m: [m]), "holds a list, not a JSON object"),
    ("not-json", lambda out: (out / "manifest.json").write_text("{\"schema\": "), "is not valid JSON"),
    ("shards-string", _edit_manifest(lambda m: dict(m, shards="all")), "has shards 'all', expected a list"),
    ("rows-string", _edit_manifest(_entry(rows="many")), "has rows 'many'"),
    ("absolute-path", _edit_manifest(_entry(file="/etc/passwd")), "which is an absolute path"),
    ("dotdot-path", _edit_manifest(_entry(file="../done/shard-000000.h5")), "which contains '..'"),
    ("progress-not-json", _progress("{oops"), "progress file"),
    ("progress-escapes", _progress(json.dumps({"shards": [{"index": 1, "file": "../x.h5", "rows": 1, "bytes": 1,
                                                           "sha256": "0" * 64}]})), "which contains '..'"),
    ("progress-list", _progress("[]"), "holds no list of shards"),
]


@pytest.mark.parametrize("damage, needle", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_resume_refuses_a_manifest_it_cannot_trust_and_changes_nothing(captured, tmp_path, damage, needle):
    backbone, root = captured
    out = tmp_path / "ds"
    shutil.copytree(root / "partial", out)
    damage(out)
    before = snapshot(out)
    with pytest.raises(TideError) as err:
        capture(CaptureConfig(out=str(out), resume=True, **ARGS), backbone, progress=False)
    message = str(err.value)
    assert needle in message and "\n" not in message, message
    assert snapshot(out) == before  # manifest bytes, shards and progress files untouched, nothing added


def test_resume_of_an_intact_partial_capture_still_finishes_it(captured, tmp_path):
    backbone, root = captured
    out = tmp_path / "ds"
    shutil.copytree(root / "partial", out)
    result = capture(CaptureConfig(out=str(out), resume=True, **ARGS), backbone, progress=False)
    done = json.loads((root / "done" / "manifest.json").read_text())
    assert result.complete and [s["sha256"] for s in result.manifest["shards"]] == [s["sha256"] for s in done["shards"]]


def test_cli_resume_of_a_newer_manifest_is_one_line_exit_2(tiny_dit_dir, tmp_path, capsys):
    argv = ["capture", "--backbone", str(tiny_dit_dir), "--out", str(tmp_path / "ds"), "--hooks", ARGS["hooks"][0],
            "--num-samples", "2", "--samples-per-shard", "2", "--num-steps", "2", "--device", "cpu"]
    assert main(argv) == 0
    path = tmp_path / "ds" / "manifest.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), schema_version=99, complete=False), indent=1))
    before = snapshot(tmp_path / "ds")
    capsys.readouterr()
    assert main(argv + ["--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "written by a newer tide (version 99); upgrade tide" in err[0], err
    assert snapshot(tmp_path / "ds") == before
    assert json.loads(path.read_text())["schema_version"] == 99
