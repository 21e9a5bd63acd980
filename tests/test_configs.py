"""Every YAML under configs/ opens with its launch command and loads into the schema of the module it launches."""

import importlib
import re
from pathlib import Path

import pytest

from fastgrpo.config import load_config

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
    load_config(schema_of(launch), path)
