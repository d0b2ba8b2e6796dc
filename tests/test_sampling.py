import pytest
import torch

from tide.errors import TideError
from tide.hooks import current_step
from tide.sampling import Intervention, SamplerConfig, sample


def test_same_seed_gives_the_same_image_and_other_seeds_differ(tiny_dit):
    cfg = SamplerConfig(num_steps=6, guidance_scale=1.5)
    a = sample(tiny_dit, [1, 2], seeds=[7, 8], config=cfg)
    b = sample(tiny_dit, [1, 2], seeds=[7, 8], config=cfg)
    c = sample(tiny_dit, [1, 2], seeds=[70, 80], config=cfg)
    assert torch.equal(a.images, b.images)
    assert (a.latents - c.latents).abs().max() > 0.1
    assert a.images.shape == (2, 1, 8, 8) and 0 <= a.images.min() and a.images.max() <= 1


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_sample_regenerated_alone_equals_its_slot_in_a_batch(tiny_dit, guidance):
    cfg = SamplerConfig(num_steps=6, guidance_scale=guidance, batch_size=3)  # 5 samples -> batches of 3 and 2
    batch = sample(tiny_dit, [0, 1, 2, 3, 0], seeds=[100, 101, 102, 103, 104], config=cfg)
    for i in (0, 2, 4):
        alone = sample(tiny_dit, [batch.conds[i].item()], seeds=[104 if i == 4 else 100 + i], config=cfg)
        # equal up to the float rounding of batched matrix products
        torch.testing.assert_close(alone.latents[0], batch.latents[i], atol=1e-4, rtol=1e-4)


def test_stochastic_scheduler_noise_is_per_sample_too(tiny_dit):
    cfg = SamplerConfig(num_steps=6, eta=1.0)
    batch = sample(tiny_dit, [0, 1], seeds=[5, 6], config=cfg)
    alone = sample(tiny_dit, [1], seeds=[6], config=cfg)
    torch.testing.assert_close(alone.latents[0], batch.latents[1], atol=1e-4, rtol=1e-4)


def test_cfg_changes_the_sample_and_guidance_one_runs_no_null_half(tiny_dit):
    sizes = []
    rec = Intervention("blocks.0.hook_resid_pre", lambda a, hook: sizes.append(a.shape[0]))
    plain = sample(tiny_dit, [1], seeds=[3], config=SamplerConfig(num_steps=4, guidance_scale=1.0), interventions=[rec])
    guided = sample(tiny_dit, [1], seeds=[3], config=SamplerConfig(num_steps=4, guidance_scale=4.0), interventions=[rec])
    assert sizes == [1] * 4 + [2] * 4
    assert (plain.latents - guided.latents).abs().max() > 1e-3


def test_guidance_defaults_to_the_family_pipeline_unless_tide_json_sets_it(tiny_dit):
    assert tiny_dit.default_guidance_scale == 4.0  # DiTPipeline's default
    default = sample(tiny_dit, [1], seeds=[3], config=SamplerConfig(num_steps=3))
    four = sample(tiny_dit, [1], seeds=[3], config=SamplerConfig(num_steps=3, guidance_scale=4.0))
    torch.testing.assert_close(default.latents, four.latents)
    tiny_dit.meta["guidance_scale"] = 1.0
    one = sample(tiny_dit, [1], seeds=[3], config=SamplerConfig(num_steps=3, guidance_scale=1.0))
    torch.testing.assert_close(sample(tiny_dit, [1], seeds=[3], config=SamplerConfig(num_steps=3)).latents, one.latents)


def test_intervention_acts_only_inside_its_step_window(tiny_dit):
    cfg = SamplerConfig(num_steps=8)
    clean = sample(tiny_dit, [2], seeds=[1], config=cfg)
    active = []

    def zero(act, hook):
        active.append(current_step().step_index)
        return torch.zeros_like(act)

    late = sample(tiny_dit, [2], seeds=[1], config=cfg, interventions=[Intervention("blocks.1.hook_resid_post", zero, steps=(6, 8))])
    assert active == [6, 7]
    assert (late.latents - clean.latents).abs().max() > 1e-4
    # a timestep window selects the same steps by value
    ts = []
    sample(tiny_dit, [2], seeds=[1], config=cfg,
           interventions=[Intervention("blocks.1.hook_resid_post", lambda a, hook: ts.append(current_step().timestep), timesteps=(0, 300))])
    assert ts and all(t <= 300 for t in ts)


def test_branch_restricted_intervention_leaves_the_other_branch_alone(tiny_dit):
    seen = {}

    def zero(act, hook):
        return torch.zeros_like(act)

    def after(act, hook):
        seen["act"] = act.clone()

    cfg = SamplerConfig(num_steps=2, guidance_scale=2.0)
    sample(tiny_dit, [1, 2], seeds=[1, 2], config=cfg,
           interventions=[Intervention("blocks.0.hook_resid_post", zero, branch="uncond"),
                          Intervention("blocks.1.hook_resid_pre", after)])
    act = seen["act"]  # block 1's input = block 0's output, rows [cond, cond, uncond, uncond]
    assert act[2:].abs().max() == 0
    assert act[:2].abs().max() > 0


def test_window_outside_the_schedule_and_bad_conditions_are_refused(tiny_dit):
    cfg = SamplerConfig(num_steps=5)
    with pytest.raises(TideError, match="active at no step of the 5-step schedule"):
        sample(tiny_dit, [0], config=cfg, interventions=[Intervention("blocks.0.hook_resid_post", lambda a, hook: None, steps=(7, 9))])
    with pytest.raises(TideError, match=r"unknown class id\(s\) \[9\]: valid ids are 0..3"):
        sample(tiny_dit, [9], config=cfg)
    with pytest.raises(TideError, match="one seed per sample"):
        sample(tiny_dit, [0, 1], seeds=[1], config=cfg)
    with pytest.raises(TideError, match="branch"):
        Intervention("blocks.0.hook_resid_post", lambda a, hook: None, branch="positive")


# ------------------------------------------------------------------------------------------ the `tide sample` grid
def _grid_config(tmp_path, **kw):
    from tide.sampling import GenerateConfig

    return GenerateConfig(**{"classes": [0, 1], "n": 2, "num_steps": 2, "device": "cpu", "out": str(tmp_path / "g.png"),
                             **kw})


def test_generate_grid_replaces_an_existing_grid_only_with_overwrite(tiny_dit, tmp_path):
    from tide.sampling import generate_grid

    out = tmp_path / "g.png"
    out.write_bytes(b"old")
    with pytest.raises(TideError, match="already exists: pass --overwrite"):
        generate_grid(_grid_config(tmp_path), tiny_dit.cpu(), progress=False)
    assert out.read_bytes() == b"old"
    _, path = generate_grid(_grid_config(tmp_path, overwrite=True), tiny_dit.cpu(), progress=False)
    assert path == out and out.read_bytes().startswith(b"\x89PNG")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.png"]  # no temporary file left beside it


def test_a_failed_grid_write_leaves_the_old_file_and_no_temporary(tiny_dit, tmp_path, monkeypatch):
    import tide.images
    from tide.sampling import generate_grid

    out = tmp_path / "g.png"
    out.write_bytes(b"old")

    def half_written(images, path, **kwargs):
        path.write_bytes(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(tide.images, "save_grid", half_written)
    with pytest.raises(OSError, match="disk full"):
        generate_grid(_grid_config(tmp_path, overwrite=True), tiny_dit.cpu(), progress=False)
    assert out.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["g.png"]


def test_generate_grid_refuses_the_null_condition_as_a_row(tiny_dit, tmp_path):
    from tide.sampling import generate_grid

    with pytest.raises(TideError, match=r"unknown class id\(s\) \[-1\].*null condition"):
        generate_grid(_grid_config(tmp_path, classes=[0, -1]), tiny_dit.cpu(), progress=False)
    assert not (tmp_path / "g.png").exists()


def test_the_memory_estimate_refuses_by_memavailable_and_passes_what_fits(tiny_dit, tmp_path, monkeypatch):
    import tide.memory
    from tide.sampling import generate_grid

    def available(kib):
        (tmp_path / "meminfo").write_text(f"MemTotal: {2 * kib} kB\nMemAvailable:   {kib} kB\n")

    monkeypatch.setattr(tide.memory, "MEMINFO", tmp_path / "meminfo")
    monkeypatch.setattr(tide.memory, "CGROUP_MEMORY", tmp_path / "no-cgroup")
    need = tide.memory.sample_output_bytes(tiny_dit, 4, grid=True) + tide.memory.batch_bytes(tiny_dit, 4, None)
    available(need // 1024 - 1)
    with pytest.raises(TideError, match=r"--n 2 for 2 --classes rows \(4 samples\) needs about .* lower --n"):
        generate_grid(_grid_config(tmp_path), tiny_dit.cpu(), progress=False)
    available(need // 1024 + 1)
    generate_grid(_grid_config(tmp_path), tiny_dit.cpu(), progress=False)
    assert (tmp_path / "g.png").exists()


def test_the_memory_estimate_is_above_a_measured_peak_and_scales_with_the_request(tiny_dit):
    import tide.memory

    # measured on the CPU (tide/memory.py): the embedded 28x28 models' grid took ~1.6 MB per sample, a 49-token
    # d_model-128 batch ~320 KB per model row; the estimate stays above both
    per_sample = tide.memory.sample_output_bytes(tiny_dit, 1, grid=True)
    assert tide.memory.sample_output_bytes(tiny_dit, 1000, grid=True) == 1000 * per_sample
    assert tide.memory.grid_pixels(tiny_dit) * tide.memory.GRID_BYTES_PER_PIXEL >= 1.2 * 122 * (8 * 14 + 2) ** 2
    rows = tide.memory.batch_bytes(tiny_dit, 10, 4.0, decode=False)  # CFG: 20 rows
    assert rows == 2 * tide.memory.batch_bytes(tiny_dit, 10, 1.0, decode=False)
    assert rows / 20 >= 16 * 16 * 4 * 16  # > 16x tokens x d_model x float32 per row
    assert tide.memory.human_bytes(312 * 2**30) == "312 GiB" and tide.memory.human_bytes(3 * 2**20) == "3.0 MiB"


def test_on_a_gpu_the_batch_is_checked_against_its_memory_and_the_outputs_against_the_host(tiny_dit, monkeypatch):
    import tide.memory

    monkeypatch.setattr(tide.memory, "available_device_bytes", lambda device: 1 << 20)  # a 1 MiB "GPU"
    monkeypatch.setattr(tide.memory, "available_host_bytes", lambda: 1 << 40)
    with pytest.raises(TideError, match=r"--batch-size 5000 needs about .* of GPU memory \(estimate\) but 1\.0 MiB are "
                                        r"available: lower --batch-size"):
        tide.memory.check_sample(tiny_dit, 5000, 1, 5000, 4.0)
    tide.memory.check_sample(tiny_dit, 5000, 1, 10, 4.0)  # small batches fit the GPU; the outputs live on the host
    monkeypatch.setattr(tide.memory, "available_host_bytes", lambda: 1 << 20)
    with pytest.raises(TideError, match=r"--n 5000 needs about .* of memory \(estimate\) but 1\.0 MiB are available"):
        tide.memory.check_sample(tiny_dit, 5000, 1, 10, 4.0)


def test_generate_grid_creates_a_missing_folder(tiny_dit, tmp_path):
    from tide.sampling import generate_grid

    cfg = _grid_config(tmp_path)
    cfg.out = str(tmp_path / "new" / "deeper" / "g.png")
    _, path = generate_grid(cfg, tiny_dit.cpu(), progress=False)
    assert path.read_bytes().startswith(b"\x89PNG") and sorted(p.name for p in path.parent.iterdir()) == ["g.png"]
