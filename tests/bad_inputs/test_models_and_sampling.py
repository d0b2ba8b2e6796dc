"""Bad input to the commands that load a backbone (`tide hooks`, `sample`, `capture`, `steer`, `profile`): a damaged
pipeline directory, a device tide does not know, a name that is not local, a request too large for memory or disk,
an unknown class, an --out that cannot or may not be written. Each is refused with exit status 2 and one stderr
line that names the problem and the fix; nothing around it changes, nothing is downloaded."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HOOK = "blocks.1.hook_resid_post"

# ------------------------------------------------------------------------------------------ damaged pipelines
# Each damages a copy of the real tiny DiT pipeline directory (tests/conftest.py: model_index.json, transformer/,
# scheduler/), in the ways a download, a copy or a hand edit goes wrong.


def _index(path: Path) -> dict:
    return json.loads((path / "model_index.json").read_text())


def _set_index(path: Path, **changes) -> None:
    index = _index(path)
    for key, value in changes.items():
        if value is ...:
            index.pop(key, None)
        else:
            index[key] = value
    (path / "model_index.json").write_text(json.dumps(index))


def _weights(path: Path) -> Path:
    return path / "transformer" / "diffusion_pytorch_model.safetensors"


def _pickled(path: Path) -> None:
    from diffusers import DiTTransformer2DModel

    model = DiTTransformer2DModel.from_pretrained(path / "transformer")
    shutil.rmtree(path / "transformer")
    model.save_pretrained(path / "transformer", safe_serialization=False)


def _sharded_missing_shard(path: Path) -> None:
    _weights(path).unlink()
    (path / "transformer" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"pos_embed.proj.weight": "diffusion_pytorch_model-00001-of-00002.safetensors"}}))


def _truncate(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


def _config_field(path: Path) -> None:
    cfg = json.loads((path / "transformer" / "config.json").read_text())
    cfg["num_layers"] = "three"
    (path / "transformer" / "config.json").write_text(json.dumps(cfg))


def _bare_without_class(path: Path) -> None:
    shutil.rmtree(path / "scheduler")
    (path / "model_index.json").unlink()
    for f in (path / "transformer").iterdir():
        f.rename(path / f.name)
    (path / "transformer").rmdir()
    cfg = json.loads((path / "config.json").read_text())
    del cfg["_class_name"]
    (path / "config.json").write_text(json.dumps(cfg))


DAMAGE = {
    # model_index.json
    "index-not-json": (lambda p: (p / "model_index.json").write_text("{not json"),
                       r"model_index\.json is not valid JSON .*damaged"),
    "index-empty": (lambda p: (p / "model_index.json").write_text(""), r"model_index\.json is not valid JSON"),
    "index-binary": (lambda p: (p / "model_index.json").write_bytes(b"\xff\xfe\x00garbage"),
                     r"model_index\.json is not valid JSON"),
    "index-list": (lambda p: (p / "model_index.json").write_text("[1, 2]"),
                   r"model_index\.json holds a JSON list, not an object .*save it again"),
    "index-string": (lambda p: (p / "model_index.json").write_text('"DiTPipeline"'),
                     r"model_index\.json holds a JSON str, not an object"),
    "index-no-class-name": (lambda p: _set_index(p, _class_name=...),
                            r"model_index\.json has no _class_name: it is not a diffusers pipeline index"),
    "index-unknown-transformer": (lambda p: _set_index(p, transformer=["diffusers", "FooTransformer2DModel"]),
                                  r"unsupported model class 'FooTransformer2DModel'; tide supports DiTTransformer2DModel"),
    "index-transformer-not-a-pair": (lambda p: _set_index(p, transformer="DiTTransformer2DModel"),
                                     r"gives transformer as 'DiTTransformer2DModel', not \[library, class\]"),
    "index-no-transformer": (lambda p: _set_index(p, transformer=...), r"lists no transformer: tide needs a transformer"),
    "index-unknown-scheduler": (lambda p: _set_index(p, scheduler=["diffusers", "NoSuchScheduler"]),
                                r"scheduler class 'NoSuchScheduler', which is not a diffusers class .*fix model_index"),
    "index-bad-id2label": (lambda p: _set_index(p, id2label={"0": "a", "2": "c"}),
                           r"id2label must map every class id 0\.\.N-1 to a name"),
    # transformer/
    "no-transformer-dir": (lambda p: shutil.rmtree(p / "transformer"),
                           r"lists a transformer \(DiTTransformer2DModel\) but .*transformer is missing.*never downloads"),
    "transformer-is-a-file": (lambda p: (shutil.rmtree(p / "transformer"), (p / "transformer").write_text("x")),
                              r"transformer is a file: the pipeline directory is incomplete"),
    "pickled-weights": (_pickled, r"weights are pickled \(diffusion_pytorch_model\.bin\) and tide never unpickles: "
                                  r"convert them to safetensors"),
    "no-weights": (lambda p: _weights(p).unlink(),
                   r"holds no transformer weights .*nothing is downloaded\): copy the complete checkpoint"),
    "empty-weights": (lambda p: _weights(p).write_bytes(b""),
                      r"diffusion_pytorch_model\.safetensors is not a safetensors file \(empty\).*save them again"),
    "garbage-weights": (lambda p: _weights(p).write_bytes(os.urandom(4096)),
                        r"is not a safetensors file .*damaged or truncated"),
    "text-as-weights": (lambda p: _weights(p).write_text("version https://git-lfs.github.com/spec/v1\n" * 3),
                        r"is not a safetensors file .*damaged or truncated"),
    "truncated-weights": (lambda p: _truncate(_weights(p)), r"safetensors is truncated \(\d+ bytes; its header needs \d+\)"),
    "missing-shard": (_sharded_missing_shard,
                      r"weight shard\(s\) \['diffusion_pytorch_model-00001-of-00002\.safetensors'\] .* are missing"),
    "config-not-json": (lambda p: (p / "transformer" / "config.json").write_text("{no"),
                        r"transformer/config\.json is not valid JSON"),
    "config-a-list": (lambda p: (p / "transformer" / "config.json").write_text("[]"),
                      r"transformer/config\.json holds a JSON list, not an object"),
    "config-missing": (lambda p: (p / "transformer" / "config.json").unlink(),
                       r"transformer/config\.json is missing: the checkpoint directory is incomplete"),
    "config-bad-field": (_config_field, r"cannot load the transformer from this local directory \(.*\); it needs"),
    # other components
    "no-scheduler-dir": (lambda p: shutil.rmtree(p / "scheduler"), r"lists a scheduler \(DDIMScheduler\) but .*missing"),
    "scheduler-config-not-json": (lambda p: (p / "scheduler" / "scheduler_config.json").write_text("]"),
                                  r"scheduler/scheduler_config\.json is not valid JSON"),
    "vae-listed-but-missing": (lambda p: _set_index(p, vae=["diffusers", "AutoencoderKL"]),
                               r"lists a vae \(AutoencoderKL\) but .*vae is missing"),
    "tide-json-bad-class-names": (lambda p: (p / "tide.json").write_text('{"class_names": 4}'),
                                  r"tide\.json: class_names must be a list of names.*fix tide\.json"),
    "tide-json-not-json": (lambda p: (p / "tide.json").write_text("class_names: [a]"), r"tide\.json is not valid JSON"),
    "bare-transformer-without-class": (_bare_without_class, r"config\.json has no _class_name: it is not a diffusers"),
}


@pytest.fixture
def damaged(tiny_dit_dir, tmp_path):
    """``damaged(name)``: a damaged copy of the tiny DiT pipeline directory (under tmp_path), and its message."""
    def make(name: str) -> tuple[Path, str]:
        path = tmp_path / f"bad-{name}"
        shutil.copytree(tiny_dit_dir, path)
        fn, match = DAMAGE[name]
        fn(path)
        return path, match

    return make


@pytest.fixture
def sae_dir(tmp_path) -> Path:
    """A tiny SAE reading the tiny DiT's blocks.1.hook_resid_post (for `tide steer` / `tide profile`)."""
    from tide.sae import SAE, SAEConfig, save_sae

    torch.manual_seed(0)
    return save_sae(SAE(SAEConfig(d_in=16, d_sae=32, k=4, normalization="none", hook=HOOK)), tmp_path / "sae")


def _argv(command: str, backbone, tmp_path: Path, sae: Path | None = None, device: str = "cpu") -> list[str]:
    """A command that would succeed with a good backbone, its outputs under tmp_path/out."""
    common = ["--backbone", str(backbone), "--device", device]
    out = tmp_path / "out"
    return {
        "hooks": ["hooks", *common],
        "sample": ["sample", *common, "--classes", "0,1", "--n", "2", "--num-steps", "2", "--out", out / "grid.png"],
        "capture": ["capture", *common, "--num-samples", "2", "--num-steps", "2", "--out", out / "ds"],
        "steer": ["steer", *common, "--sae", sae, "--features", "3", "--classes", "0", "--n", "1", "--num-steps", "2",
                  "--out", out / "steer.png"],
        "profile": ["profile", *common, "--sae", sae, "--conditions", "1", "--num-samples", "1", "--num-steps", "2",
                    "--out", out / "profile.h5"],
    }[command]


@pytest.fixture
def argv(tmp_path, sae_dir):
    (tmp_path / "out").mkdir()

    def make(command: str, backbone, device: str = "cpu") -> list[str]:
        return _argv(command, backbone, tmp_path, sae_dir if command in ("steer", "profile") else None, device)

    return make


@pytest.fixture
def quiet(caplog, recwarn):
    """``quiet()`` asserts that no library logged a warning or error and no Python warning was raised: on a terminal
    each would be one more stderr line (capsys, which ``refused`` reads, does not see them)."""
    caplog.set_level(logging.WARNING)

    def check() -> None:
        logged = [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.WARNING]
        assert not logged, f"logged while refusing: {logged}"
        assert not [str(w.message) for w in recwarn], f"warned while refusing: {[str(w.message) for w in recwarn]}"

    return check


@pytest.mark.parametrize("name", sorted(DAMAGE))
def test_a_damaged_pipeline_is_one_line_through_tide_hooks(name, damaged, argv, refused, quiet, tmp_path):
    path, match = damaged(name)
    refused(argv("hooks", path), match, [tmp_path])
    quiet()


@pytest.mark.parametrize("name", ["no-weights"])
def test_a_damaged_pipeline_is_one_line_on_the_real_stderr(name, damaged, tmp_path):
    """The same refusal from a fresh `python -m tide.cli`: nothing but tide's line reaches the terminal."""
    path, match = damaged(name)
    proc = subprocess.run([sys.executable, "-m", "tide.cli", "hooks", "--backbone", str(path), "--device", "cpu"],
                          capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert re.search(match, lines[0]) and lines[0].startswith("tide hooks: error: ")


@pytest.mark.parametrize("command", ["sample", "capture", "steer", "profile"])
@pytest.mark.parametrize("name", ["index-list", "no-transformer-dir", "pickled-weights", "garbage-weights",
                                  "config-a-list"])
def test_a_damaged_pipeline_is_one_line_through_every_command_that_loads_it(name, command, damaged, argv, refused,
                                                                          quiet, tmp_path):
    path, match = damaged(name)
    refused(argv(command, path), match, [tmp_path])
    quiet()
    assert not any((tmp_path / "out").iterdir())  # no output begun


def _vocab(path: Path, **changes) -> None:
    file = path / "text_encoder" / "vocab.json"
    spec = json.loads(file.read_text())
    for key, value in changes.items():
        if value is ...:
            del spec[key]
        else:
            spec[key] = value
    file.write_text(json.dumps(spec))


TEXT_DAMAGE = {
    "vocab-without-words": (lambda p: _vocab(p, words=...), r"vocab\.json is damaged \(no 'words' entry\): restore"),
    "vocab-words-not-a-list": (lambda p: _vocab(p, words=7), r"vocab\.json is damaged \(words is not a list"),
    "vocab-not-json": (lambda p: (p / "text_encoder" / "vocab.json").write_text("{"), r"vocab\.json is not valid JSON"),
    "prompt-embeds-garbage": (lambda p: (p / "prompt_embeds.safetensors").write_bytes(b"\x00" * 64),
                              r"cannot read prompt-embedding file .*prompt_embeds\.safetensors.*expected a safetensors"),
}


@pytest.mark.parametrize("name", sorted(TEXT_DAMAGE))
def test_a_damaged_text_encoder_or_prompt_file_is_one_line(name, tmp_path, refused, argv):
    from tide.config import EMBEDDED

    path = tmp_path / "pixart"
    shutil.copytree(EMBEDDED["fmnist-pixart"], path)
    fn, match = TEXT_DAMAGE[name]
    fn(path)
    refused(argv("hooks", path), match, [tmp_path])


# ------------------------------------------------------------------------------------------ devices
BAD_DEVICES = {
    "gpu0": r"unknown device 'gpu0': use cpu, cuda, cuda:N \(N a GPU index\) or auto",
    "cuda:x": r"unknown device 'cuda:x': use cpu, cuda, cuda:N",
    "mps": r"unknown device 'mps': use cpu, cuda, cuda:N",
    "": r"unknown device '': use cpu, cuda, cuda:N",
    "cuda:-1": r"unknown device 'cuda:-1': use cpu",
    "cpu,cuda": r"unknown device 'cpu,cuda': use cpu",
    # present or not, no machine has 10000 GPUs
    "cuda:9999": (r"only \d+ CUDA GPU\(s\) are visible .*choose one of those, or --device cpu" if torch.cuda.is_available()
                  else r"device 'cuda:9999' requested but no CUDA GPU is visible: use --device cpu"),
}


@pytest.mark.parametrize("command", ["hooks", "sample", "capture", "steer", "profile"])
@pytest.mark.parametrize("device", sorted(BAD_DEVICES))
def test_an_unknown_device_names_the_accepted_forms(device, command, tiny_dit_dir, argv, refused, tmp_path):
    refused(argv(command, tiny_dit_dir, device=device), BAD_DEVICES[device], [tmp_path])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_cuda_without_a_gpu_says_to_use_the_cpu(device, tiny_dit_dir, argv, refused, tmp_path):
    refused(argv("sample", tiny_dit_dir, device=device), rf"device '{device}' requested but no CUDA GPU is visible: "
            r"use --device cpu", [tmp_path])


# ------------------------------------------------------------------------------------------ never the network
@pytest.fixture
def no_network(monkeypatch):
    """Every socket connection raises (and is recorded): tide must not try one."""
    tried = []

    def connect(self, address, *args):
        tried.append(address)
        raise OSError(f"test: tide tried to connect to {address}")

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect)
    return tried


@pytest.mark.parametrize("command", ["hooks", "sample", "capture"])
def test_a_relative_pipeline_without_transformer_opens_no_socket(command, tiny_dit_dir, tmp_path, monkeypatch,
                                                                   no_network, argv, refused, quiet):
    pipe = tmp_path / "my-pipeline"
    shutil.copytree(tiny_dit_dir, pipe)
    shutil.rmtree(pipe / "transformer")
    monkeypatch.chdir(tmp_path)
    refused(argv(command, "my-pipeline"), r"my-pipeline/model_index\.json lists a transformer .*my-pipeline/transformer "
            r"is missing.*never downloads", [tmp_path])
    assert no_network == []
    quiet()  # diffusers never took "my-pipeline/transformer" for a Hub repo id (its hub code warns on the way)


@pytest.mark.parametrize("name", ["facebook/DiT-XL-2-256", "PixArt-alpha/PixArt-XL-2-512x512", "fmnist-dit2",
                                  "./not-here"])
def test_a_name_that_is_not_local_is_refused_not_downloaded(name, tmp_path, monkeypatch, no_network, argv, refused):
    monkeypatch.chdir(tmp_path)
    refused(argv("hooks", name), rf"no embedded model or checkpoint directory named '{name}' was found locally, and "
            r"tide never downloads models: give an embedded model \(fmnist-dit, fmnist-pixart\) or the path", [tmp_path])
    assert no_network == []


def test_an_empty_backbone_is_not_the_current_directory(tiny_dit_dir, tmp_path, monkeypatch, argv, refused):
    # "" would be Path("."): with a checkpoint in the working directory it would silently load that
    for f in tiny_dit_dir.iterdir():
        shutil.move(str(f), tmp_path / f.name)
    monkeypatch.chdir(tmp_path)
    refused(argv("hooks", ""), r"no backbone named \(an empty --backbone\): give an embedded model", [tmp_path])


def test_the_offline_switches_are_set_for_the_hugging_face_libraries():
    import huggingface_hub.constants

    import tide

    for name, value in tide.OFFLINE_ENV.items():
        assert os.environ[name] == value
    assert huggingface_hub.constants.HF_HUB_OFFLINE is True
    assert huggingface_hub.constants.is_offline_mode()


# ------------------------------------------------------------------------------------------ tide sample
def _sample(tiny_dit_dir, out, *extra) -> list:
    return ["sample", "--backbone", tiny_dit_dir, "--device", "cpu", "--num-steps", "2", "--out", out, *extra]


@pytest.mark.parametrize("classes, match", [
    ("-1", r"unknown class id\(s\) \[-1\]: valid ids are 0\.\.3 \(0, 1, 2, 3\); -1 \(the null condition\) is not"),
    ("0,-1", r"unknown class id\(s\) \[-1\]: valid ids are 0\.\.3"),
    ("4", r"unknown class id\(s\) \[4\]: valid ids are 0\.\.3"),
    ("1,99,-5", r"unknown class id\(s\) \[-5, 99\]: valid ids are 0\.\.3"),
    (",", r"--classes is empty: give at least one condition id"),
], ids=["null", "null-among-others", "past-the-last", "several", "empty"])
def test_sample_refuses_class_ids_outside_the_backbone(classes, match, tiny_dit_dir, tmp_path, refused):
    refused(_sample(tiny_dit_dir, tmp_path / "g.png", "--classes", classes), match, [tmp_path])
    assert not (tmp_path / "g.png").exists()


@pytest.mark.parametrize("extra, match", [
    (["--n", "10000000"], r"--n 10000000 for 4 --classes rows \(40,000,000 samples\) needs about \d+ TiB of memory "
                          r"\(estimate\) but .* are available: lower --n or pass fewer --classes"),
    (["--n", "100000000000", "--classes", "2"], r"--n 100000000000 needs about \d+ TiB of memory \(estimate\) but .* "
                                               r"are available: lower --n$"),
    (["--n", "1000", "--classes", ",".join(["0", "1", "2", "3"] * 50000)],
     r"--n 1000 for 200,000 --classes rows \(200,000,000 samples\) needs about .* lower --n or pass fewer --classes"),
], ids=["huge-n", "huge-n-one-class", "huge-classes-list"])
def test_sample_refuses_a_grid_far_too_large_for_memory_up_front(extra, match, tiny_dit_dir, tmp_path, refused):
    refused(_sample(tiny_dit_dir, tmp_path / "g.png", *extra), match, [tmp_path])


@pytest.fixture
def meminfo(tmp_path, monkeypatch):
    """``meminfo(kib)``: the host's MemAvailable as tide.memory reads it, and no cgroup limit."""
    import tide.memory

    def set_available(kib: int) -> None:
        fake = tmp_path / "meminfo"
        fake.write_text(f"MemTotal:       {4 * kib} kB\nMemFree:        {kib} kB\nMemAvailable:   {kib} kB\n")
        monkeypatch.setattr(tide.memory, "MEMINFO", fake)
        monkeypatch.setattr(tide.memory, "CGROUP_MEMORY", tmp_path / "no-cgroup")

    return set_available


def test_sample_compares_its_estimate_with_memavailable(tiny_dit_dir, tmp_path, meminfo, refused):
    meminfo(4096)  # 4 MiB: the grid of 4 x 50 samples alone needs ~400 MiB
    refused(_sample(tiny_dit_dir, tmp_path / "g.png", "--n", "50"),
            r"--n 50 for 4 --classes rows \(200 samples\) needs about \d+ MiB of memory \(estimate\) but 4\.0 MiB are "
            r"available: lower --n or pass fewer --classes", [tmp_path])


def test_capture_refuses_a_shard_batch_larger_than_memory(tiny_dit_dir, tmp_path, meminfo, refused):
    meminfo(1024)
    refused(["capture", "--backbone", tiny_dit_dir, "--device", "cpu", "--num-steps", "4", "--num-samples", "512",
             "--samples-per-shard", "512", "--out", tmp_path / "ds"],
            r"--samples-per-shard 512 needs about .* of memory \(estimate\) but 1\.0 MiB are available: lower "
            r"--samples-per-shard", [tmp_path])
    assert not (tmp_path / "ds").exists()


@pytest.mark.parametrize("extra, match", [
    (["--num-samples", "1000000000000"],
     r"--num-samples 1,000,000,000,000 \(32 rows per sample\) needs about \d+ TiB of disk \(estimate\) but .* are free: "
     r"lower --num-samples, record fewer steps \(--record-steps\) or tokens \(--token-fraction\)"),
    (["--num-samples", "1000000000000", "--record-steps", "0", "--token-fraction", "0.1"],
     r"--num-samples 1,000,000,000,000 \(2 rows per sample\) needs about \d+ TiB of disk"),
    (["--num-samples", "100000000", "--samples-per-shard", "100000000"],
     r"--samples-per-shard 100000000 needs about \d+(\.\d)? TiB of memory \(estimate\) .*lower --samples-per-shard"),
], ids=["disk", "disk-fewer-rows", "memory-per-shard"])
def test_capture_refuses_a_dataset_too_large_for_the_disk_or_memory(extra, match, tiny_dit_dir, tmp_path, refused):
    refused(["capture", "--backbone", tiny_dit_dir, "--device", "cpu", "--num-steps", "2", "--out", tmp_path / "ds",
             *extra], match, [tmp_path])
    assert not (tmp_path / "ds").exists()


def _out_cases(tmp_path: Path) -> dict:
    folder_file = tmp_path / "a-file"
    folder_file.write_text("not a folder")
    existing = tmp_path / "old.png"
    existing.write_bytes(b"\x89PNG old grid")
    (tmp_path / "a-dir.png").mkdir()
    return {
        "existing": (existing, r"--out .*old\.png already exists: pass --overwrite to replace it, or choose another"),
        "folder-under-a-file": (folder_file / "deeper" / "g.png", r"cannot write --out .*g\.png: .*a-file is a file, "
                                                                  r"not a directory"),
        "folder-is-a-file": (folder_file / "g.png", r"cannot write --out .*g\.png: .*a-file is a file, not a directory"),
        "a-directory": (tmp_path / "a-dir.png", r"--out .*a-dir\.png is a directory: give a \.png file name"),
        "not-png": (tmp_path / "g.jpg", r"--out '.*g\.jpg' is not a \.png file name: tide sample writes a PNG grid"),
        "no-suffix": (tmp_path / "grid", r"is not a \.png file name"),
    }


@pytest.mark.parametrize("case", ["existing", "folder-under-a-file", "folder-is-a-file", "a-directory", "not-png",
                                  "no-suffix"])
def test_sample_refuses_an_out_it_may_not_or_cannot_write_before_loading(case, tmp_path, refused, monkeypatch):
    out, match = _out_cases(tmp_path)[case]
    import tide.models.loading

    def never(*args, **kwargs):
        raise AssertionError("the backbone was loaded before --out was checked")

    monkeypatch.setattr(tide.models.loading, "load_backbone", never)
    refused(_sample("fmnist-dit", out), match, [tmp_path])


def test_sample_refuses_an_out_in_a_read_only_folder(tiny_dit_dir, tmp_path, refused):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        if os.access(locked, os.W_OK):  # root: modes do not stop it, a read-only mount does
            assert os.path.isdir("/proc/sys") and not os.access("/proc/sys", os.W_OK)
            locked = Path("/proc/sys")
        refused(_sample(tiny_dit_dir, locked / "g.png"), r"cannot write --out .*g\.png: .* is not writable",
                [tmp_path])
    finally:
        (tmp_path / "locked").chmod(0o755)


@pytest.mark.parametrize("n", ["0", "-3"])
def test_sample_refuses_n_below_one(n, tiny_dit_dir, tmp_path, refused):
    refused(_sample(tiny_dit_dir, tmp_path / "g.png", "--n", n), rf"--n must be >= 1, got {n}", [tmp_path])
