"""The README is a manual whose commands run: each shell command in its code blocks is run by CI (.ci/run) or by a
named test, and its "your model, your data, your reward" config and reward function train on a tiny local model.

A command counts as exercised when a line of .ci/run runs it (possibly with more arguments), or when EXERCISED names
the test that runs it and that test exists and contains the command's essential parts. A command added to the README
without either fails test_every_readme_command_is_exercised, naming it. Nothing here runs the commands themselves.
"""

import ast
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
SHELL_BLOCKS = {"", "bash", "sh", "shell", "console"}
COMMAND_START = re.compile(r"^ {4,}(\$ )?(python|bash|torchrun|\.venv/|[A-Z_]+=)")

# command (whitespace-normalized) -> (the test that runs it, what that test's file must contain). A command that
# reaches its entry point in process (through main() or train()/run()) counts: the CLI adds only argument parsing.
EXERCISED = {
    ".venv/bin/python -m fastgrpo.pipeline configs/r1_tiny.yaml":
        ("tests/test_pipeline.py::test_all_stages_run_chain_and_rerun_as_no_ops", ["r1_tiny.yaml", "fastgrpo.pipeline"]),
    "python -m fastgrpo.grpo my_run.yaml":
        ("tests/test_readme.py::test_the_readme_config_and_reward_train", ["fastgrpo.grpo", "my_run.yaml"]),
    "python -m fastgrpo.pipeline configs/r1_tiny.yaml 'stages=[cold_start]'":
        ("tests/test_pipeline.py::test_an_interrupted_stage_resumes_from_its_checkpoint",
         ["r1_tiny.yaml", "stages=[cold_start]"]),
    # the pipeline starts every stage as `python -m MODULE RUN_DIR/<stage>/stage.yaml`
    "python -m fastgrpo.sft runs/r1_tiny/cold_start/stage.yaml":
        ("tests/test_pipeline.py::test_all_stages_run_chain_and_rerun_as_no_ops", ["stage.yaml", "cold_start"]),
    "python -m fastgrpo.evaluate runs/r1_tiny/cold_start/checkpoints/step-00000200 k=8":
        ("tests/test_summary.py::test_evaluate_prints_its_scores_and_a_command_that_repeats_it",
         ["fastgrpo.evaluate", "k="]),
    # fastgrpo.grpo.train under torchrun on 2 ranks (gloo on CPU), against 1 rank
    "torchrun --nproc-per-node 8 -m fastgrpo.grpo CONFIG":
        ("tests/test_distributed.py::test_trainers_on_one_and_two_ranks_and_resume_across_world_sizes",
         ["torch.distributed.run", "--nproc-per-node", "fastgrpo.grpo"]),
    # CI runs the same script with every part at toy sizes on the CPU; the full sizes need the GPU machine
    "FASTGRPO_COMMIT=$(git rev-parse --short HEAD) bash scripts/gpu_check.sh":
        ("tests/test_gpu_check.py::test_dry_run_reports_every_part", ["gpu_check.sh"]),
    "bash scripts/gpu_check.sh --dry-run":
        ("tests/test_gpu_check.py::test_dry_run_reports_every_part", ["gpu_check.sh", "--dry-run"]),
}


def code_blocks(markdown: str) -> list[tuple[str, str]]:
    """(info string, text) of every fenced code block."""
    return [(m.group(1).strip(), m.group(2)) for m in re.finditer(r"^```([^\n]*)\n(.*?)^```", markdown, re.M | re.S)]


def shell_commands(markdown: str) -> list[str]:
    """Every command of the shell code blocks: continuation lines joined, comments dropped, `a && b` split in two,
    whitespace normalized."""
    commands = []
    for info, text in code_blocks(markdown):
        if info not in SHELL_BLOCKS:
            continue
        for line in text.replace("\\\n", " ").splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line).strip()
            commands += [" ".join(part.split()) for part in line.split("&&") if part.strip()]
    return commands


def unfenced_commands(markdown: str) -> list[str]:
    """Indented lines outside fenced blocks that look like commands: an indented code block hides from the check."""
    outside = re.sub(r"^```.*?^```", "", markdown, flags=re.M | re.S)
    return [line.strip() for line in outside.splitlines() if COMMAND_START.match(line)]


def find_test(node_id: str) -> str | None:
    """The source of the test function `path::name`, or None when there is none."""
    path, _, name = node_id.partition("::")
    source = (ROOT / path).read_text()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return ast.get_source_segment(source, node)
    return None


def unexercised(markdown: str, ci: str, exercised: dict) -> list[str]:
    """Each command of `markdown` that neither a line of `ci` runs nor `exercised` maps to an existing test whose
    file holds the command's essential parts; and each command in an unfenced block."""
    ci_lines = [" ".join(line.split()) for line in ci.replace("\\\n", " ").splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    problems = [f"{c}: in an indented block, not a fenced one" for c in unfenced_commands(markdown)]
    for command in shell_commands(markdown):
        if any(command in line for line in ci_lines):
            continue
        if command not in exercised:
            problems.append(f"{command}: run by no test (add it to tests/test_readme.py's EXERCISED) nor by .ci/run")
            continue
        node_id, parts = exercised[command]
        if find_test(node_id) is None:
            problems.append(f"{command}: {node_id} does not exist")
            continue
        file_text = (ROOT / node_id.partition("::")[0]).read_text()
        missing = [p for p in parts if p not in file_text]
        if missing:
            problems.append(f"{command}: {node_id}'s file does not contain {missing}")
    return problems


README = (ROOT / "README.md").read_text()
CI = (ROOT / ".ci" / "run").read_text()


def test_every_readme_command_is_exercised():
    assert shell_commands(README), "no shell command found in the README: is the extraction broken?"
    assert unexercised(README, CI, EXERCISED) == []


def test_the_readme_test_command_is_the_one_ci_runs():
    (ci_command,) = [line for line in CI.splitlines() if line.strip() and not line.startswith(("#", "set ", "cd "))]
    assert any(ci_command in text.splitlines() for info, text in code_blocks(README) if info in SHELL_BLOCKS)


def test_a_new_untested_command_is_reported():
    extra = "python -m fastgrpo.grpo configs/grpo_tiny.yaml train.steps=5"
    added = README + f"\n```bash\n{extra}   # a new example\n```\n"
    assert unexercised(added, CI, EXERCISED) == [
        f"{extra}: run by no test (add it to tests/test_readme.py's EXERCISED) nor by .ci/run"]
    continued = README + "\n```bash\npython -m fastgrpo.sft \\\n    configs/sft_tiny.yaml && bash scripts/setup.sh\n```\n"
    assert [p.split(":")[0] for p in unexercised(continued, CI, EXERCISED)] == [
        "python -m fastgrpo.sft configs/sft_tiny.yaml"]  # joined across the continuation; setup.sh is CI's
    indented = README + "\nRun it:\n\n    python -m fastgrpo.prm configs/prm_tiny.yaml\n"
    assert unexercised(indented, CI, EXERCISED) == [
        "python -m fastgrpo.prm configs/prm_tiny.yaml: in an indented block, not a fenced one"]


def test_a_mapping_to_a_missing_test_or_one_without_the_command_is_reported():
    command = "python -m fastgrpo.grpo my_run.yaml"
    gone = {command: ("tests/test_readme.py::test_that_does_not_exist", ["fastgrpo.grpo"])}
    readme = f"```bash\n{command}\n```\n"
    assert unexercised(readme, CI, gone) == [f"{command}: tests/test_readme.py::test_that_does_not_exist does not exist"]
    unrelated = {command: ("tests/test_gpu_check.py::test_dry_run_reports_every_part", ["my_run.yaml"])}
    assert unexercised(readme, CI, unrelated) == [
        f"{command}: tests/test_gpu_check.py::test_dry_run_reports_every_part's file does not contain ['my_run.yaml']"]


def section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end if end != -1 else None]


def test_the_readme_config_and_reward_train(tmp_path, monkeypatch):
    """The config and reward function of "Your model, your data, your reward", as printed, on a tiny local model
    (`python -m fastgrpo.grpo my_run.yaml` through main(), with sizes overridden on the command line)."""
    from fastgrpo.grpo import main
    from fastgrpo.tiny import build_tiny_model

    blocks = dict(code_blocks(section("Your model, your data, your reward"))[:2])
    assert set(blocks) == {"yaml", "python"}, "the section's first two blocks are the config and the reward"
    (tmp_path / "my_run.yaml").write_text(blocks["yaml"])
    (tmp_path / "my_reward.py").write_text(blocks["python"])
    (tmp_path / "my_prompts.jsonl").write_text("".join(
        json.dumps({"question": f"{a}+{b}=", "answer": str(a + b)}) + "\n" for a in range(10, 18) for b in (3, 40)))
    model = build_tiny_model(tmp_path / "tiny")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))  # `python -m` puts the working directory first on sys.path

    main(["my_run.yaml", f"model.path={model}", "model.dtype=float32", "generation.backend=hf",
          "generation.num_generations=2", "generation.max_completion_length=8", "data.max_prompt_length=32",
          "train.steps=1", "train.prompts_per_step=2", "log.tensorboard=false"])
    (step,) = [json.loads(line) for line in (tmp_path / "runs" / "my_run" / "metrics.jsonl").read_text().splitlines()]
    assert -0.1 < step["reward/right_and_short"] <= 1.0
    assert (tmp_path / "runs" / "my_run" / "checkpoints" / "step-00000001").is_dir()

    from my_reward import right_and_short

    assert right_and_short(["1+2="], ["<think>1+2=3</think>Answer: 3", "Answer: 4"], [[0] * 10, [0] * 5],
                           answer=["3", "3"]) == pytest.approx([0.99, -0.005])
