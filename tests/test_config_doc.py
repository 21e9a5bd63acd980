"""docs/CONFIG.md and --help, both read off the typed config schemas (fastgrpo.config_doc)."""

import importlib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from fastgrpo.config_doc import ENTRY_POINTS, field_comments, format_value, keys, reference

ROOT = Path(__file__).resolve().parents[1]
COMMAND = "python -m fastgrpo.config_doc > docs/CONFIG.md"


def schema_of(module: str, name: str) -> type:
    return getattr(importlib.import_module(module), name)


def test_the_config_reference_is_current():
    written = (ROOT / "docs" / "CONFIG.md").read_text()
    assert written == reference(), f"docs/CONFIG.md is stale: regenerate it with `{COMMAND}`"


@dataclass
class Commented:
    plain: int = 1
    trailing: str = "a"  # the trailing comment
    # a comment above,
    # on two lines
    above: float = 0.5
    both: bool = True  # starts here and
    # goes on here
    next_one: int | None = None  # its own
    spread: list[str] = field(  # one field over
        default_factory=lambda: ["x"])  # three lines


def test_comments_are_read_from_beside_and_above_each_field():
    assert field_comments(Commented) == {
        "plain": ("int", ""),
        "trailing": ("str", "the trailing comment"),
        "above": ("float", "a comment above, on two lines"),
        "both": ("bool", "starts here and goes on here"),
        "next_one": ("int | None", "its own"),
        "spread": ("list[str]", "one field over three lines"),
    }


@pytest.mark.parametrize("entry,module,name", [e for e in ENTRY_POINTS if e[0] != "fastgrpo.pipeline"])
def test_every_key_is_documented_with_its_default(entry, module, name):
    """The documented leaves are the schema's, each with the default OmegaConf gives it (a section's default set
    by the field holding it, e.g. SFTConfig's log.run_dir=runs/sft, included)."""
    defaults = OmegaConf.to_container(OmegaConf.structured(schema_of(module, name)))
    flat = {}

    def walk(node, prefix=""):
        for k, v in node.items():
            walk(v, f"{prefix}{k}.") if isinstance(v, dict) else flat.setdefault(prefix + k, v)

    walk(defaults)
    documented = {k.name: k.default for k in keys(schema_of(module, name)()) if k.section is None}
    assert set(documented) == set(flat)
    assert documented == {key: format_value(value) for key, value in flat.items()}


def test_pipeline_stage_sections_name_their_schema_and_what_they_change():
    by_name = {k.name: k for k in keys(schema_of("fastgrpo.pipeline", "PipelineConfig")())}
    assert by_name["reasoning_rl"].stage == "fastgrpo.grpo"
    assert by_name["reasoning_rl"].default == "model.path=@previous"
    assert by_name["sft"].default == "model.path=@previous, data.source=@rejection_sampling"
    assert "reasoning_rl.loss.beta" not in by_name and by_name["base.path"].default == "???"


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_on_every_entry_point_lists_its_keys_and_defaults(capsys, flag):
    for entry, module, name in ENTRY_POINTS:
        importlib.import_module(entry).main([flag])
        out = capsys.readouterr().out
        doc = importlib.import_module(entry).__doc__
        assert out.startswith(doc.rstrip()), entry
        for key in keys(schema_of(module, name)()):
            if key.section is None:
                assert f"  {key.name}: {key.type} = {key.default}\n" in out, (entry, key.name)
            elif key.stage:
                assert f"  {key.name}: {key.type}, the keys of python -m {key.stage} --help\n" in out, (entry, key.name)
