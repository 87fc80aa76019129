"""Every shipped experiment config loads: a typo in a field, a section or a method name is
caught here rather than an hour into a run."""

import pathlib

import pytest

from jprag.pipeline import RunConfig

CONFIGS = sorted((pathlib.Path(__file__).resolve().parents[1] / "experiments").glob("*.toml"))


def test_configs_are_found():
    assert len(CONFIGS) >= 5, CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_experiment_config_loads(path):
    cfg = RunConfig.from_file(path)
    assert cfg.methods
    # run outputs belong under runs/ (ignored by git), never beside the sources
    assert pathlib.PurePath(cfg.out_dir).parts[0] == "runs", cfg.out_dir


def test_unknown_field_is_named(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('methods = ["prag"]\n[poly]\nn_skill = 3\n')
    with pytest.raises(ValueError, match=r"bad\.toml.*n_skill.*\[poly\]"):
        RunConfig.from_file(bad)
