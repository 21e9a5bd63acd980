"""The configuration reference, read off the typed config schemas: docs/CONFIG.md and each entry point's --help.

    python -m fastgrpo.config_doc > docs/CONFIG.md

Every key of each entry point's schema with its type, its default (the entry point's own: a section's default set
by the schema holding it wins over the section class's) and the comments beside its field in the source, plus the
values config.CHOICES allows. The pipeline's stage sections are the stages' own schemas, listed once each: for
them the pipeline's entry gives only the defaults it changes. tests/test_config_doc.py fails when docs/CONFIG.md
differs from what this prints.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib
import inspect
import io
import sys
import textwrap
import tokenize
from dataclasses import dataclass

from .config import CHOICES

# (entry point, its schema's module, the schema's name), in the pipeline's order of stages
ENTRY_POINTS = [
    ("fastgrpo.grpo", "fastgrpo.config", "GRPOConfig"),
    ("fastgrpo.sft", "fastgrpo.sft", "SFTConfig"),
    ("fastgrpo.reward_model", "fastgrpo.reward_model", "RewardModelConfig"),
    ("fastgrpo.prm", "fastgrpo.prm", "PRMConfig"),
    ("fastgrpo.rejection", "fastgrpo.rejection", "RejectionConfig"),
    ("fastgrpo.evaluate", "fastgrpo.evaluate", "EvalConfig"),
    ("fastgrpo.pipeline", "fastgrpo.pipeline", "PipelineConfig"),
]
ENTRY_OF = {(module, name): entry for entry, module, name in ENTRY_POINTS}


@dataclass
class Key:
    """One documented key: a leaf (section None), or a section (section: its dataclass' docstring, or "")."""

    name: str  # dotted, from the schema's root
    type: str  # as annotated in the source
    default: str  # formatted as YAML writes it
    comment: str
    section: str | None = None  # None: a leaf
    stage: str | None = None  # a pipeline stage section: the entry point whose schema it is


@functools.cache
def field_comments(cls) -> dict[str, tuple[str, str]]:
    """{field: (annotation, comment)} from the class' source: a field's trailing `# ...` and the comment-only lines
    right above it. Comment-only lines between two fields that both have trailing comments continue the first's."""
    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.splitlines()
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    alone = {row for row in comments if lines[row - 1].lstrip().startswith("#")}
    fields = [node for node in ast.parse(source).body[0].body if isinstance(node, ast.AnnAssign)]
    found, previous = {}, None
    for node in fields:
        trailing = [comments[r] for r in range(node.lineno, node.end_lineno + 1) if r in comments and r not in alone]
        above, row = [], node.lineno - 1
        while row in alone:
            above.insert(0, comments[row])
            row -= 1
        if above and trailing and previous is not None and found[previous][2]:
            annotation, text, _ = found[previous]
            found[previous] = (annotation, " ".join([text, *above]), True)
            above = []
        name = node.target.id
        found[name] = (ast.get_source_segment(source, node.annotation), " ".join(above + trailing), bool(trailing))
        previous = name
    return {name: (annotation, text) for name, (annotation, text, _) in found.items()}


def format_value(value) -> str:
    """A default as a YAML value: null, true, [a, b], a string unquoted unless it would read as something else."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(map(format_value, value)) + "]"
    if isinstance(value, str) and (not value or value.strip() != value or value.lower() in ("null", "true", "false")):
        return repr(value)
    return str(value)


def leaves(obj, prefix: str = "") -> dict[str, object]:
    """{dotted key: value} of every leaf of a dataclass instance."""
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        out.update(leaves(value, f"{prefix}{f.name}.") if dataclasses.is_dataclass(value) else {prefix + f.name: value})
    return out


def keys(obj, prefix: str = "") -> list[Key]:
    """Every key of the dataclass instance `obj` (sections before their keys, in source order); a section holding
    another entry point's schema is one Key that names that entry point and lists the defaults it changes."""
    out = []
    for f in dataclasses.fields(obj):
        annotation, comment = field_comments(type(obj))[f.name]
        value, name = getattr(obj, f.name), prefix + f.name
        if not dataclasses.is_dataclass(value):
            out.append(Key(name, annotation, format_value(value), comment))
            continue
        cls = type(value)
        stage = ENTRY_OF.get((cls.__module__, cls.__name__))
        if stage:
            own = leaves(cls())
            changed = ", ".join(f"{k}={format_value(v)}" for k, v in leaves(value).items() if own[k] != v)
            out.append(Key(name, annotation, changed, comment, section="", stage=stage))
            continue
        out.append(Key(name, annotation, "", comment, section=class_doc(cls)))
        out.extend(keys(value, name + "."))
    return out


def class_doc(cls) -> str:
    """A dataclass' own docstring on one line; "" for the signature dataclasses write in its place."""
    own = cls.__doc__ or ""
    return "" if own.startswith(cls.__name__ + "(") else " ".join(own.split())


def choices(name: str) -> tuple[str, ...] | None:
    """config.CHOICES' allowed values for a key, matched by its longest dotted ending (a pipeline stage's
    reasoning_rl.loss.loss_type is checked as loss.loss_type when the stage loads its config)."""
    matches = [key for key in CHOICES if name == key or name.endswith("." + key)]
    return CHOICES[max(matches, key=len)] if matches else None


def describe(key: Key) -> str:
    """What a key's entry says after its name, type and default: a stage section's changed defaults, a section's
    docstring, the comments, the allowed values."""
    allowed = choices(key.name)
    parts = [f"here with {key.default}" if key.stage and key.default else "", key.section or key.comment,
             f"one of: {', '.join(allowed)}" if allowed else ""]
    return "; ".join(p for p in parts if p)


def markdown(entry: str, schema: type, entry_doc: str) -> str:
    """One entry point's section of docs/CONFIG.md."""
    summary = " ".join(entry_doc.strip().split("\n\n")[0].split())
    out = [f"## `python -m {entry}` ({schema.__name__})", "", summary, ""]
    for key in keys(schema()):
        if key.stage:
            head = f"`{key.name}` ({key.type}): the keys of [`{key.stage}`](#{anchor(key.stage)})"
        elif key.section is not None:
            head = f"`{key.name}` ({key.type})"
        else:
            head = f"`{key.name}` ({key.type}, default `{key.default}`)"
        text, sep = describe(key), "; " if key.stage else ": "
        out.append(f"{'  ' * key.name.count('.')}- {head}" + (sep + text if text else ""))
    return "\n".join(out) + "\n"


def anchor(entry: str) -> str:
    """GitHub's heading anchor of `markdown`'s heading for `entry`."""
    name = next(n for e, _, n in ENTRY_POINTS if e == entry)
    return f"python--m-{entry}-{name}".lower().replace(".", "")


def reference() -> str:
    """docs/CONFIG.md."""
    head = ["# Configuration reference", "",
            "Generated from the typed config schemas by `python -m fastgrpo.config_doc > docs/CONFIG.md` (a test "
            "fails when this file is stale); `python -m <entry point> --help` prints the same keys.", "",
            "Every entry point takes `CONFIG.yaml [VARIANT.yaml ...] [key=value ...]`: the schema's defaults below, "
            "then each YAML file over the one before, then the `key=value` overrides (`loss.beta=0.04`, "
            "`rewards.funcs=[accuracy,format]`). An unknown or mistyped key fails at once with its name; `???` marks "
            "a value that must be set.", ""]
    head += [f"- [`{entry}`](#{anchor(entry)})" for entry, _, _ in ENTRY_POINTS] + [""]
    sections = []
    for entry, module, name in ENTRY_POINTS:
        schema = getattr(importlib.import_module(module), name)
        sections.append(markdown(entry, schema, importlib.import_module(entry).__doc__ or ""))
    return "\n".join(head) + "\n" + "\n".join(sections)


def help_text(entry_doc: str, schema: type) -> str:
    """An entry point's --help: its docstring, then every key of `schema` with its type, default and comment."""
    out = [entry_doc.rstrip(), "", f"Config keys ({schema.__name__}) and their defaults (docs/CONFIG.md):"]
    for key in keys(schema()):
        indent = "  " * (key.name.count(".") + 1)
        if key.stage:
            out.append(f"{indent}{key.name}: {key.type}, the keys of python -m {key.stage} --help")
        elif key.section is not None:
            out.append(f"{indent}{key.name}:")
        else:
            out.append(f"{indent}{key.name}: {key.type} = {key.default}")
        if describe(key):
            out.append(textwrap.fill(describe(key), 116, initial_indent=indent + "    ",
                                     subsequent_indent=indent + "    ", break_long_words=False, break_on_hyphens=False))
    return "\n".join(out)


if __name__ == "__main__":
    sys.stdout.write(reference())
