"""Outputs and messages: every command that writes refuses an existing output without --overwrite and an output it
cannot write (a file where a directory goes, a folder under a file, a read-only folder) before loading anything;
a refused command leaves nothing behind; a damaged checkpoint, an unknown flag, a bad value and a broken --config
YAML are each one line ``tide VERB: error: ...`` with exit status 2. Real tiny inputs throughout (a 3-block DiT saved
as a diffusers directory, a captured dataset, a saved SAE, its statistics, a trained run)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import pytest
import torch
from safetensors.torch import save_file

from tide.cli import main


def save_tiny_dit_dir(path: Path) -> Path:
    """tests/conftest.py's tiny DiT directory (that conftest is shadowed here by this folder's own)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_tests_conftest", Path(__file__).parents[1] / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.save_tiny_dit_dir(path)

HOOK = "blocks.1.hook_resid_post"
VERBS = ["hooks", "sample", "capture", "train", "eval", "stats", "dashboard", "profile", "steer", "export", "demo"]
TRAIN_YAML = """data: {data}
out: {out}
saes:
  - name: s
    hook: {hook}
    d_sae: 32
    k: 4
steps: 2
batch_size: 32
warmup_steps: 1
checkpoint_every: 1
shuffle_buffer: 256
device: cpu
progress: false
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> SimpleNamespace:
    """The shared inputs (read-only for every case): backbone directory, dataset, SAE, statistics, a trained run."""
    from tide.analysis import compute_feature_stats, save_feature_stats
    from tide.capture import CaptureConfig, capture
    from tide.sae import SAE, SAEConfig, save_sae

    root = tmp_path_factory.mktemp("world")
    dit = save_tiny_dit_dir(root / "tiny-dit")
    capture(CaptureConfig(backbone=str(dit), out=str(root / "ds"), hooks=[HOOK], num_samples=4, samples_per_shard=2,
                          num_steps=3, device="cpu"), progress=False)
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=16, d_sae=32, k=4, normalization="none", hook=HOOK))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn_like(sae.W_enc))
    sae_dir = save_sae(sae, root / "sae")
    stats = save_feature_stats(compute_feature_stats(sae_dir, root / "ds", top_k=4, device="cpu", progress=False),
                               root / "stats.h5")
    (root / "train.yaml").write_text(TRAIN_YAML.format(data=root / "ds", out=root / "run", hook=HOOK))
    assert main(["train", "--config", str(root / "train.yaml")]) == 0
    assert (root / "run" / "checkpoints" / "latest").is_file()
    return SimpleNamespace(root=root, dit=dit, ds=root / "ds", sae=sae_dir, stats=stats, run=root / "run")


@pytest.fixture
def ro(tmp_path) -> Path:
    """A directory this process cannot write: a chmod 555 folder, or (for root, whom modes do not stop) a folder on a
    read-only mount."""
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o555)
    if not os.access(d, os.W_OK):
        yield d
        d.chmod(0o755)
        return
    d.chmod(0o755)
    if os.path.isdir("/proc/sys") and not os.access("/proc/sys", os.W_OK):
        yield Path("/proc/sys")
        return
    pytest.skip("no read-only directory here (root, and /proc/sys is writable)")


# ---------------------------------------------------------------------------------------------- the cases
CASES: dict[str, tuple[str, Callable]] = {}


def case(name: str, match: str):
    """Register ``f(w, t, ro) -> argv`` (``w``: the shared inputs, ``t``: this case's empty folder, ``ro``: a
    read-only folder, a fixture only built when asked for) as a refusal that must print a line matching ``match``."""
    def register(f):
        assert name not in CASES
        CASES[name] = (match, f)
        return f
    return register


def _file(path: Path, text: str = "old\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


EXISTS = r"already exists: pass --overwrite to replace it"
IS_FILE = r"is a file, not a directory"
NOT_WRITABLE = r"is not writable; choose another --out"


def _eval(w, *more):
    return ["eval", "--sae", w.sae, "--data", w.ds, "--device", "cpu", "--splice-samples", "0", *more]


# eval: an output directory
case("eval-existing-eval-json", r"already holds an evaluation \(eval\.json\): pass --overwrite")(
    lambda w, t, ro: _eval(w, "--out", _file(t / "ev" / "eval.json").parent))
case("eval-existing-config-only", r"already holds an evaluation \(eval_config\.yaml\)")(
    lambda w, t, ro: _eval(w, "--out", _file(t / "ev" / "eval_config.yaml").parent))
case("eval-out-is-a-file", rf"--out .*ev {IS_FILE}")(lambda w, t, ro: _eval(w, "--out", _file(t / "ev")))
case("eval-out-under-a-file", r"cannot write --out .*f/ev: .*f is a file")(
    lambda w, t, ro: _eval(w, "--out", _file(t / "f") / "ev"))
case("eval-out-read-only", NOT_WRITABLE)(lambda w, t, ro: _eval(w, "--out", ro() / "ev"))
case("eval-bad-sae-writes-no-config", r"is not a tide SAE directory")(
    lambda w, t, ro: ["eval", "--sae", t / "nosae", "--data", w.ds, "--out", t / "ev", "--device", "cpu"])
case("eval-bad-data", r"dataset|manifest")(
    lambda w, t, ro: ["eval", "--sae", w.sae, "--data", t / "nodata", "--out", t / "ev", "--device", "cpu"])
case("eval-max-rows-zero", r"max_rows must be >= 1")(lambda w, t, ro: _eval(w, "--max-rows", "0", "--out", t / "ev"))


# stats: one file
def _stats(w, *more):
    return ["stats", "--sae", w.sae, "--data", w.ds, "--device", "cpu", *more]


case("stats-existing-file", EXISTS)(lambda w, t, ro: _stats(w, "--out", _file(t / "s.h5")))
case("stats-existing-in-a-dir", rf"feature_stats\.h5 {EXISTS}")(
    lambda w, t, ro: _stats(w, "--out", _file(t / "d" / "feature_stats.h5").parent))
case("stats-under-a-file", r"cannot write --out .*f/s\.h5: .*f is a file")(
    lambda w, t, ro: _stats(w, "--out", _file(t / "f") / "s.h5"))
case("stats-read-only", NOT_WRITABLE)(lambda w, t, ro: _stats(w, "--out", ro() / "s.h5"))
case("stats-bad-sae", r"is not a tide SAE directory")(
    lambda w, t, ro: ["stats", "--sae", t / "nosae", "--data", w.ds, "--out", t / "s.h5", "--device", "cpu"])
case("stats-bad-branch", r"cfg_branch")(lambda w, t, ro: _stats(w, "--cfg-branch", "x", "--out", t / "s.h5"))


# dashboard: a directory replaced as a whole
def _dash(w, *more):
    return ["dashboard", "--stats", w.stats, "--device", "cpu", "--no-progress", "--images-per-feature", "0", *more]


case("dashboard-existing", EXISTS)(lambda w, t, ro: _dash(w, "--out", _file(t / "dash" / "index.html").parent))
case("dashboard-overwrite-a-foreign-dir", r"refusing to --overwrite .*: it is not a tide dashboard")(
    lambda w, t, ro: _dash(w, "--overwrite", "--out", _file(t / "mine" / "notes.txt").parent))
case("dashboard-out-is-a-file", rf"--out .*dash {IS_FILE}")(lambda w, t, ro: _dash(w, "--out", _file(t / "dash")))
case("dashboard-out-under-a-file", r"cannot write --out .*f/dash: .*f is a file")(
    lambda w, t, ro: _dash(w, "--out", _file(t / "f") / "dash"))
case("dashboard-read-only", NOT_WRITABLE)(lambda w, t, ro: _dash(w, "--out", ro() / "dash"))
case("dashboard-feature-out-of-range", r"features \[999\] are out of range")(
    lambda w, t, ro: _dash(w, "--features", "999", "--out", t / "dash"))
case("dashboard-missing-stats", r"does not exist")(
    lambda w, t, ro: ["dashboard", "--stats", t / "none.h5", "--out", t / "dash"])
case("dashboard-broken-labels", r"not valid JSON")(
    lambda w, t, ro: _dash(w, "--labels", _file(t / "labels.json", "{oops"), "--out", t / "dash"))
case("dashboard-negative-effects", r"effect_features >= -1")(
    lambda w, t, ro: _dash(w, "--effect-features", "-2", "--out", t / "dash"))
case("dashboard-negative-strength", r"effect_strength must be >= 0, got -1.0")(
    lambda w, t, ro: _dash(w, "--effect-strength", "-1", "--out", t / "dash"))
case("dashboard-stats-of-an-old-schema", r"schema_version 2 but this tide reads version 3: recompute it")(
    lambda w, t, ro: _dash(w, "--stats", _old_stats(w, t), "--out", t / "dash"))


def _old_stats(w, t):
    """A copy of the world's statistics marked with the previous schema version."""
    import shutil

    import h5py

    path = t / "old_stats.h5"
    shutil.copyfile(w.stats, path)
    with h5py.File(path, "r+") as f:
        f.attrs["schema_version"] = 2
    return path


# steer: a grid, the JSON beside it, and the images .npz
def _steer(w, *more):
    return ["steer", "--sae", w.sae, "--backbone", w.dit, "--device", "cpu", "--features", "3", "--n", "1",
            "--num-steps", "2", *more]


case("steer-existing-grid", EXISTS)(lambda w, t, ro: _steer(w, "--out", _file(t / "s.png")))
case("steer-existing-json-beside-it", rf"s\.json {EXISTS}")(
    lambda w, t, ro: (_file(t / "s.json"), _steer(w, "--out", t / "s.png"))[1])
case("steer-existing-images", rf"s\.npz {EXISTS}, or choose another --save-images")(
    lambda w, t, ro: _steer(w, "--out", t / "s.png", "--save-images", _file(t / "s.npz")))
case("steer-out-is-json", r"must name an image file")(lambda w, t, ro: _steer(w, "--out", t / "s.json"))
case("steer-out-is-a-dir", r"is a directory: give a file name")(
    lambda w, t, ro: _steer(w, "--overwrite", "--out", _file(t / "d.png" / "x").parent))
case("steer-out-under-a-file", r"cannot write --out .*f/s\.png: .*f is a file")(
    lambda w, t, ro: _steer(w, "--out", _file(t / "f") / "s.png"))
case("steer-images-under-a-file", r"cannot write --save-images .*f/s\.npz")(
    lambda w, t, ro: _steer(w, "--out", t / "s.png", "--save-images", _file(t / "f") / "s.npz"))
case("steer-read-only", NOT_WRITABLE)(lambda w, t, ro: _steer(w, "--out", ro() / "s.png"))
case("steer-feature-out-of-range", r"0\.\.31")(lambda w, t, ro: _steer(w, "--features", "99", "--out", t / "s.png"))


# profile: one file
def _profile(w, *more):
    return ["profile", "--sae", w.sae, "--backbone", w.dit, "--device", "cpu", "--num-samples", "1",
            "--num-steps", "2", *more]


case("profile-existing", EXISTS)(lambda w, t, ro: _profile(w, "--out", _file(t / "p.h5")))
case("profile-out-is-a-dir", r"is a directory: give a file name")(
    lambda w, t, ro: _profile(w, "--overwrite", "--out", _file(t / "p.h5" / "x").parent))
case("profile-under-a-file", r"cannot write --out .*f/p\.h5: .*f is a file")(
    lambda w, t, ro: _profile(w, "--out", _file(t / "f") / "p.h5"))
case("profile-read-only", NOT_WRITABLE)(lambda w, t, ro: _profile(w, "--out", ro() / "p.h5"))


# train --resume over a damaged checkpoint: one line naming the file, and --overwrite as the way out
def _resume(w, t, damage) -> list:
    run = t / "run"
    shutil.copytree(w.run, run)
    latest = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    meta = json.loads((latest / "trainer.json").read_text())
    meta["config"]["out"] = str(run)  # the copy's own place: the run's config is otherwise unchanged
    (latest / "trainer.json").write_text(json.dumps(meta))
    damage(run / "checkpoints", latest)
    (t / "train.yaml").write_text(TRAIN_YAML.format(data=w.ds, out=run, hook=HOOK))
    return ["train", "--config", t / "train.yaml", "--resume"]


def _truncate(path: Path, keep: int = 20) -> None:
    path.write_bytes(path.read_bytes()[:keep])


RESTART = r"pass --overwrite to start the run again"
case("train-resume-pointer-to-nothing", rf"latest names the checkpoint .*step-0000009, which does not exist: {RESTART}")(
    lambda w, t, ro: _resume(w, t, lambda ck, last: (ck / "latest").write_text("step-0000009")))
case("train-resume-pointer-garbage", rf"pointer .*latest .*{RESTART}")(
    lambda w, t, ro: _resume(w, t, lambda ck, last: (ck / "latest").write_bytes(b"\xff\xfe\x00garbage")))
case("train-resume-trainer-json-garbage", rf"cannot read .*trainer\.json .*damaged; {RESTART}")(
    lambda w, t, ro: _resume(w, t, lambda ck, last: (last / "trainer.json").write_text("{not json")))
case("train-resume-trainer-json-not-a-state", rf"trainer\.json is not a tide training state.*{RESTART}")(
    lambda w, t, ro: _resume(w, t, lambda ck, last: (last / "trainer.json").write_text("[1, 2]")))
case("train-resume-trainer-json-missing", rf"has no trainer\.json: it is incomplete; {RESTART}")(
    lambda w, t, ro: _resume(w, t, lambda ck, last: (last / "trainer.json").unlink()))
case("train-resume-state-truncated", rf"cannot read .*state\.safetensors .*damaged; {RESTART}")(
    lambda w, t, ro: _resume(w, t, lambda ck, last: _truncate(last / "state.safetensors")))
case("train-resume-state-garbage", rf"cannot read .*state\.safetensors .*{RESTART}")(
    lambda w, t, ro: _resume(w, t, lambda ck, last: (last / "state.safetensors").write_bytes(os.urandom(256))))
case("train-resume-state-missing", rf"has no state\.safetensors: it is incomplete; {RESTART}")(
    lambda w, t, ro: _resume(w, t, lambda ck, last: (last / "state.safetensors").unlink()))
case("train-resume-state-without-the-sae", rf"optimizer state of SAE 's' .*damaged or missing.*{RESTART}")(
    lambda w, t, ro: _resume(w, t, lambda ck, last: save_file({"other": torch.zeros(1)}, str(last / "state.safetensors"))))
case("train-resume-sae-weights-truncated", rf"checkpoint's SAE .*/s is damaged .*sae\.safetensors.*{RESTART}")(
    lambda w, t, ro: _resume(w, t, lambda ck, last: _truncate(last / "s" / "sae.safetensors", 100)))
case("train-resume-sae-missing", rf"checkpoint's SAE .*/s is damaged.*{RESTART}")(
    lambda w, t, ro: _resume(w, t, lambda ck, last: shutil.rmtree(last / "s")))
case("train-not-empty-without-resume", r"is not empty: pass --resume to continue it or --overwrite")(
    lambda w, t, ro: _resume(w, t, lambda ck, last: None)[:-1])


# demo: a run directory, validated before its first file
def _demo(w, *more):
    return ["demo", "--backbone", w.dit, "--device", "cpu", "--num-steps", "2", *more]


case("demo-out-is-a-file", rf"--out .*demo {IS_FILE}")(lambda w, t, ro: _demo(w, "--out", _file(t / "demo")))
case("demo-out-under-a-file", r"cannot write --out .*f/demo: .*f is a file")(
    lambda w, t, ro: _demo(w, "--out", _file(t / "f") / "demo"))
case("demo-read-only", NOT_WRITABLE)(lambda w, t, ro: _demo(w, "--out", ro() / "demo"))
case("demo-existing", r"already holds a demo \(demo_config\.yaml\): pass --overwrite")(
    lambda w, t, ro: _demo(w, "--out", _file(t / "demo" / "demo_config.yaml").parent))
case("demo-bad-backbone-writes-nothing", r"no embedded model or checkpoint directory named")(
    lambda w, t, ro: ["demo", "--backbone", t / "nomodel", "--out", t / "demo"])
case("demo-bad-size-writes-nothing", r"n_per_class must be >= 1")(
    lambda w, t, ro: _demo(w, "--n-per-class", "0", "--out", t / "demo"))
case("demo-k-above-d-sae", r"k \(64\) must not exceed d_sae \(32\)")(
    lambda w, t, ro: _demo(w, "--k", "64", "--d-sae", "32", "--out", t / "demo"))
case("demo-unknown-hook-writes-nothing", r"unknown hook name\(s\) \['blocks\.9\.hook_resid_post'\]")(
    lambda w, t, ro: _demo(w, "--capture-hooks", "blocks.9.hook_resid_post", "--out", t / "demo"))


# export (already protected): the same refusals
def _export(w, *more):
    return ["export", "--sae", w.sae, *more]


case("export-existing", EXISTS)(lambda w, t, ro: _export(w, "--out", _file(t / "x" / "tide_export.json").parent))
case("export-out-is-a-file", r"is a file")(lambda w, t, ro: _export(w, "--out", _file(t / "x")))
case("export-out-under-a-file", r"cannot write --out .*f/x: .*f is a file")(
    lambda w, t, ro: _export(w, "--out", _file(t / "f") / "x"))
case("export-read-only", NOT_WRITABLE)(
    lambda w, t, ro: _export(w, "--out", ro() / "x"))
case("export-missing-sae", r"does not exist: pass --sae")(lambda w, t, ro: ["export", "--sae", t / "no", "--out", t / "x"])


# the command line itself: one line, `tide VERB: error: ...`, exit 2, on every verb
for verb in VERBS + ["data info", "data verify"]:
    v = verb.split()
    key = verb.replace(" ", "-")
    tail = ["DIR"] if verb.startswith("data") else []
    case(f"{key}-unknown-flag", rf"^tide {verb}: error: unknown flag --no-such-flag \(see tide {verb} --help\)$")(
        lambda w, t, ro, v=v, tail=tail: [*v, *[t if a == "DIR" else a for a in tail], "--no-such-flag", "1"])
    case(f"{key}-yaml-syntax", rf"^tide {verb}: error: .*bad\.yaml:2:\d+: not valid YAML: .*; fix the file there$")(
        lambda w, t, ro, v=v, tail=tail: [*v, *[t if a == "DIR" else a for a in tail], "--config",
                                          _file(t / "bad.yaml", "device: cpu\n  out: [x\n")])
for verb in VERBS:
    typo, right = ("formt", "format") if verb == "export" else ("devise", "device")
    case(f"{verb}-yaml-list", rf"^tide {verb}: error: config file .*list\.yaml must hold a mapping .*not a list$")(
        lambda w, t, ro, verb=verb: [verb, "--config", _file(t / "list.yaml", "- a\n- b\n")])
    case(f"{verb}-yaml-missing", rf"^tide {verb}: error: config file .*none\.yaml does not exist: check the path")(
        lambda w, t, ro, verb=verb: [verb, "--config", t / "none.yaml"])
    case(f"{verb}-yaml-unknown-key", rf"^tide {verb}: error: config file .*: unknown keys '{typo}', 'zzz' \(did you "
                                     rf"mean '{right}' for '{typo}'\?\); valid keys: .*{right}")(
        lambda w, t, ro, verb=verb, typo=typo: [verb, "--config", _file(t / "k.yaml", f"{typo}: cpu\nzzz: 1\n")])
for verb, flag, field in [("sample", "--n", "n"), ("capture", "--num-samples", "num_samples"),
                          ("train", "--steps", "steps"), ("eval", "--batch-size", "batch_size"),
                          ("stats", "--top-k", "top_k"), ("dashboard", "--max-features", "max_features"),
                          ("profile", "--keep", "keep"), ("steer", "--n", "n"), ("demo", "--k", "k"),
                          ("export", "--timesteps", "timesteps")]:
    kind = "float" if verb == "export" else "int"
    case(f"{verb}-bad-number", rf"^tide {verb}: error: config field '{field}': cannot read 'abc' as {kind}: give a")(
        lambda w, t, ro, verb=verb, flag=flag: [verb, flag, "abc", "--out", t / "o"])
case("yaml-bad-value-names-the-file", r"^tide stats: error: config file .*v\.yaml: config field 'top_k': cannot read")(
    lambda w, t, ro: ["stats", "--config", _file(t / "v.yaml", "top_k: many\n")])
case("yaml-is-a-directory", r"config file .* is a directory: pass a YAML file")(
    lambda w, t, ro: ["stats", "--config", t])
case("flag-without-its-value", r"^tide eval: error: argument --sae: expected one argument \(see tide eval --help\)$")(
    lambda w, t, ro: ["eval", "--sae"])
case("stray-positional", r"^tide stats: error: unexpected argument 'extra': every value follows its --flag")(
    lambda w, t, ro: ["stats", "extra"])
case("no-command", r"^tide: error: give a command \(tide --help lists them\)$")(lambda w, t, ro: [])
case("unknown-command", r"^tide: error: argument COMMAND: invalid choice: 'evl'")(lambda w, t, ro: ["evl"])
case("data-without-action", r"^tide data: error: give an action: info or verify")(lambda w, t, ro: ["data"])
case("close-flag-is-suggested", r"unknown flag --overwirte \(did you mean --overwrite for --overwirte\?\)")(
    lambda w, t, ro: ["stats", "--overwirte"])


@pytest.mark.parametrize("name", list(CASES))
def test_refused_in_one_line_with_nothing_touched(name, world, tmp_path, refused, request):
    match, build = CASES[name]
    t = tmp_path / "case"
    t.mkdir()
    argv = build(world, t, lambda: request.getfixturevalue("ro"))
    refused(argv, match, [t, world.root])
    assert not [p for p in t.rglob("*") if ".tmp" in p.name], "temporary files left behind"


def test_there_are_enough_cases():
    assert len(CASES) >= 45


# ---------------------------------------------------------------------------------------------- --overwrite
def _no_temporaries(*roots: Path) -> None:
    left = [p for root in roots for p in root.rglob("*") if ".tmp" in p.name]
    assert not left, f"temporary files left behind: {left}"


def test_eval_overwrite_replaces_the_evaluation_and_drops_stale_samples(world, tmp_path, refused):
    out = tmp_path / "ev"
    base = ["eval", "--sae", world.sae, "--data", world.ds, "--device", "cpu", "--out", out]
    assert main([str(a) for a in base + ["--splice-samples", "1"]]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["eval.json", "eval.png", "eval_config.yaml", "eval_samples.png"]
    refused(base + ["--splice-samples", "0"], r"already holds an evaluation .*pass --overwrite", [tmp_path])
    assert main([str(a) for a in base + ["--splice-samples", "0", "--max-rows", "50", "--overwrite"]]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["eval.json", "eval.png", "eval_config.yaml"]
    assert json.loads((out / "eval.json").read_text())["reconstruction"]["rows"] == 50
    _no_temporaries(tmp_path)


def test_stats_overwrite_replaces_the_file(world, tmp_path, refused):
    from tide.analysis import load_feature_stats

    out = _file(tmp_path / "s.h5", "not statistics")
    base = ["stats", "--sae", world.sae, "--data", world.ds, "--device", "cpu", "--top-k", "2", "--out", out]
    refused(base, EXISTS, [tmp_path])
    assert main([str(a) for a in base + ["--overwrite"]]) == 0
    assert load_feature_stats(out).topk_value.shape[1] == 2
    _no_temporaries(tmp_path)


def test_dashboard_overwrite_replaces_the_whole_directory(world, tmp_path, refused):
    out = tmp_path / "dash"
    base = ["dashboard", "--stats", world.stats, "--device", "cpu", "--no-progress", "--images-per-feature", "0",
            "--out", out]
    assert main([str(a) for a in base + ["--max-features", "3"]]) == 0
    assert len(list((out / "features").glob("f*.html"))) == 3
    refused(base + ["--max-features", "1"], EXISTS, [tmp_path])
    assert main([str(a) for a in base + ["--max-features", "1", "--overwrite"]]) == 0
    assert len(list((out / "features").glob("f*.html"))) == 1  # no page of the old dashboard survives
    assert len(json.loads((out / "dashboard.json").read_text())["features"]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dash"]
    _no_temporaries(tmp_path)


def test_steer_overwrite_replaces_grid_json_and_images(world, tmp_path, refused):
    import numpy as np

    base = ["steer", "--sae", world.sae, "--backbone", world.dit, "--device", "cpu", "--features", "3", "--n", "1",
            "--num-steps", "2", "--classes", "0", "--out", tmp_path / "s.png", "--save-images", tmp_path / "s.npz"]
    assert main([str(a) for a in base]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.json", "s.npz", "s.png"]
    refused(base + ["--alpha", "9"], EXISTS, [tmp_path])
    assert main([str(a) for a in base + ["--alpha", "9", "--overwrite"]]) == 0
    assert json.loads((tmp_path / "s.json").read_text())["config"]["alpha"] == 9.0
    with np.load(tmp_path / "s.npz") as got:
        assert got["after"].shape == (1, 1, 8, 8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.json", "s.npz", "s.png"]


def test_profile_overwrite_replaces_the_file(world, tmp_path, refused):
    from tide.analysis.steering_profile import load_profile

    out = tmp_path / "p.h5"
    base = ["profile", "--sae", world.sae, "--backbone", world.dit, "--device", "cpu", "--num-samples", "1",
            "--num-steps", "2", "--out", out]
    assert main([str(a) for a in base + ["--conditions", "1"]]) == 0
    refused(base + ["--conditions", "2"], EXISTS, [tmp_path])
    assert main([str(a) for a in base + ["--conditions", "2", "--overwrite"]]) == 0
    assert [c for _, c in load_profile(out).shifts] == [2]
    _no_temporaries(tmp_path)


def test_a_failure_while_writing_leaves_the_old_outputs_and_no_temporaries(tmp_path):
    """The staged writer all-or-nothing: an error after some files were written puts nothing in place."""
    from tide.io import building_dir, staged_outputs

    old = {name: _file(tmp_path / "out" / name, f"old {name}") for name in ("a.json", "b.png")}
    with pytest.raises(RuntimeError):
        with staged_outputs() as stage:
            stage(tmp_path / "out" / "a.json").write_text("new")
            stage(tmp_path / "out" / "new" / "c.txt").write_text("new")
            raise RuntimeError("disk full")
    assert {p.name: p.read_text() for p in (tmp_path / "out").iterdir()} == {n: f"old {n}" for n in old}
    with pytest.raises(RuntimeError):
        with building_dir(tmp_path / "out") as tmp:
            (tmp / "index.html").write_text("new")
            raise RuntimeError("disk full")
    assert {p.name: p.read_text() for p in (tmp_path / "out").iterdir()} == {n: f"old {n}" for n in old}
    with building_dir(tmp_path / "out") as tmp:
        (tmp / "index.html").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["index.html"]


def test_help_is_unchanged_and_exits_0(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: tide eval") and "--overwrite" in out


@pytest.mark.parametrize("argv,flag", [
    (["eval", "--n", "3"], "--n"),                          # would have been --num-steps
    (["sample", "--overwrit"], "--overwrit"),               # would have been --overwrite
    (["steer", "--tow", "3"], "--tow"),                     # would have been --toward
])
def test_abbreviated_flags_are_unknown_flags(refused, tmp_path, argv, flag):
    refused(argv, f"unknown flag {flag}", [tmp_path])
