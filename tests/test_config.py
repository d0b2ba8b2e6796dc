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


def test_a_broken_yaml_file_is_one_line_with_its_line_and_column(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("n: 3\nclasses: [1, 2\nout: x.png\n")
    with pytest.raises(TideError) as exc:
        load_yaml(GenerateConfig, path)
    message = str(exc.value)
    assert "\n" not in message and message.startswith(f"{path}:3:4: not valid YAML: ") and "fix the file there" in message
    path.write_text("n: 3\nnum-steps: 4\n")
    with pytest.raises(TideError, match=r"bad\.yaml: unknown key 'num-steps' \(did you mean 'num_steps' for "
                                        r"'num-steps'\?\); valid keys: .*num_steps"):
        load_yaml(GenerateConfig, path)
    path.write_text("n: many\n")
    with pytest.raises(TideError, match=r"bad\.yaml: config field 'n': cannot read 'many' as int: give a whole number"):
        load_yaml(GenerateConfig, path)
    with pytest.raises(TideError, match="is a directory: pass a YAML file"):
        load_yaml(GenerateConfig, tmp_path)
