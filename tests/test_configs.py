"""Every YAML under configs/ opens with its launch command and loads into the schema of the module it launches."""

import importlib
import re
from pathlib import Path

import pytest

from fastgrpo.config import ConfigError, GRPOConfig, load_cli_config, load_config

CONFIGS = sorted((Path(__file__).parents[1] / "configs").rglob("*.yaml"))
SCHEMAS = {  # module launched -> its config schema
    "fastgrpo.grpo": "fastgrpo.config:GRPOConfig",
    "fastgrpo.sft": "fastgrpo.sft:SFTConfig",
    "fastgrpo.reward_model": "fastgrpo.reward_model:RewardModelConfig",
    "fastgrpo.prm": "fastgrpo.prm:PRMConfig",
    "fastgrpo.pipeline": "fastgrpo.pipeline:PipelineConfig",
}


def schema_of(launch: str):
    modules = re.findall(r"-m (fastgrpo\.\w+)", launch)
    module = next(m for m in reversed(modules) if m in SCHEMAS)  # the last one runs this config
    name, _, attr = SCHEMAS[module].partition(":")
    return getattr(importlib.import_module(name), attr)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_every_config_loads(path):
    lines = path.read_text().splitlines()
    launch = next(line for line in lines[:4] if "python" in line)  # opens with its launch command
    assert lines[0].startswith("#") and launch.startswith("#"), path
    assert any("Sized for" in line for line in lines[:6]), f"{path} does not say what hardware it was sized for"
    # a variant is launched over the config it changes ("python -m fastgrpo.pipeline BASE.yaml VARIANT.yaml")
    layers = [path.parents[1] / p for p in re.findall(r"(configs/\S+\.yaml)", launch)] or [path]
    assert layers[-1] == path, f"{path}'s launch command does not end with it"
    load_config(schema_of(launch), layers)


def test_later_config_files_override_earlier_ones_and_a_missing_one_is_named(tmp_path):
    (tmp_path / "base.yaml").write_text("model: {path: m}\ntrain: {steps: 5, lr: 0.1}\nloss: {beta: 0.04}\n")
    (tmp_path / "variant.yaml").write_text("train: {steps: 7}\n")
    cfg = load_cli_config(GRPOConfig, [str(tmp_path / "base.yaml"), str(tmp_path / "variant.yaml"), "loss.beta=0"])
    assert (cfg.train.steps, cfg.train.lr, cfg.loss.beta) == (7, 0.1, 0.0)
    with pytest.raises(ConfigError, match="config file .*nowhere.yaml' does not exist"):
        load_cli_config(GRPOConfig, [str(tmp_path / "base.yaml"), str(tmp_path / "nowhere.yaml")])
    (tmp_path / "bad.yaml").write_text("train: {stepz: 1}\n")
    with pytest.raises(ConfigError, match=r"in .*base.yaml \+ .*bad.yaml: train.stepz"):
        load_cli_config(GRPOConfig, [str(tmp_path / "base.yaml"), str(tmp_path / "bad.yaml")])
