import dataclasses

import pytest

from tide.config import field_docs, from_dict, load_yaml, save_yaml, to_dict
from tide.errors import TideError
from tide.sampling import GenerateConfig


def test_every_config_field_has_a_docstring():
    from tide.demo import DemoConfig

    for cls in (GenerateConfig, DemoConfig):
        docs = field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert not missing, f"{cls.__name__} fields without a docstring: {missing}"


def test_yaml_round_trip_and_type_coercion(tmp_path):
    cfg = from_dict(GenerateConfig, {"classes": "0,3", "n": "4", "guidance_scale": 2, "prompts": "none"})
    assert cfg.classes == [0, 3] and cfg.n == 4 and cfg.guidance_scale == 2.0 and cfg.prompts is None
    save_yaml(cfg, tmp_path / "c.yaml")
    assert to_dict(load_yaml(GenerateConfig, tmp_path / "c.yaml")) == to_dict(cfg)


def test_unknown_keys_and_bad_values_are_named(tmp_path):
    with pytest.raises(TideError, match=r"unknown GenerateConfig key\(s\) \['num_step'\]; valid keys: .*'num_steps'"):
        from_dict(GenerateConfig, {"num_step": 3})
    with pytest.raises(TideError, match="'n': cannot read 'many' as int"):
        from_dict(GenerateConfig, {"n": "many"})
    (tmp_path / "bad.yaml").write_text("- a\n- b\n")
    with pytest.raises(TideError, match="mapping"):
        load_yaml(GenerateConfig, tmp_path / "bad.yaml")
    with pytest.raises(TideError, match="does not exist"):
        load_yaml(GenerateConfig, tmp_path / "missing.yaml")


def test_a_choice_field_refuses_values_outside_its_choices_by_name():
    from tide.capture import CaptureConfig

    assert from_dict(CaptureConfig, {"cfg_branch": "both"}).cfg_branch == "both"
    with pytest.raises(TideError, match="config field 'cfg_branch' must be one of 'cond', 'uncond', 'both', got 'neither'"):
        from_dict(CaptureConfig, {"cfg_branch": "neither"})
