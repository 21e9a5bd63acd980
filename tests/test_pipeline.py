"""The R1 pipeline end to end on a tiny model (real vLLM, every stage in its own process), and its parts:
rejection sampling's filters, evaluation's majority vote, stage references and resuming."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastgrpo import pipeline
from fastgrpo.config import ConfigError, load_config
from fastgrpo.evaluate import majority_correct
from fastgrpo.generation import Completion
from fastgrpo.pipeline import DEFAULT_STAGES, STAGES, PipelineConfig, finished, run, run_stage, stage_output
from fastgrpo.rejection import RejectionConfig, accepted_samples, repetitive
from fastgrpo.runs import RunError

CONFIG = Path(__file__).parents[1] / "configs" / "r1_tiny.yaml"
# Every stage a few steps: this checks the plumbing, not the learning (the README's results table does that).
QUICK = [
    # the cold start runs long enough that some samples are correct (0.3 pass@1): rejection sampling needs them
    "reward_model.train.steps=4", "cold_start.train.steps=200", "cold_start.log.save_every=200",
    "reasoning_rl.train.steps=2", "reasoning_rl.train.prompts_per_step=4", "reasoning_rl.log.save_every=2",
    "rejection_sampling.data.num_examples=32", "rejection_sampling.k=4",
    "sft.train.steps=2", "sft.log.save_every=2",
    "helpfulness_rl.train.steps=2", "helpfulness_rl.train.prompts_per_step=4", "helpfulness_rl.log.save_every=2",
    "eval.data.eval_examples=8", "eval.k=2",
]


def quick_config(tmp_path, *overrides):
    return load_config(PipelineConfig, CONFIG, [f"run_dir={tmp_path}", f"base.path={tmp_path / 'base'}", *QUICK,
                                                *overrides])


def test_all_stages_run_chain_and_rerun_as_no_ops(tmp_path):
    cfg = quick_config(tmp_path)
    table = run(cfg)
    assert cfg.stages == DEFAULT_STAGES and "process_reward_model" not in cfg.stages  # R1's own stages
    done = {s: json.loads((tmp_path / s / "DONE.json").read_text()) for s in cfg.stages}
    # each policy stage starts from the one before: the stage config that ran names the previous output
    for stage, previous in [("reasoning_rl", "cold_start"), ("sft", "reasoning_rl"), ("helpfulness_rl", "sft")]:
        ran = (tmp_path / stage / "stage.yaml").read_text()
        assert f"path: {done[previous]['output']}" in ran, stage
    assert f"reward_model: {done['reward_model']['output']}" in (tmp_path / "helpfulness_rl" / "stage.yaml").read_text()
    # stage 3's dataset: verified samples with their provenance, plus general rows
    rows = [json.loads(line) for line in open(done["rejection_sampling"]["output"])]
    sampled = [r for r in rows if r["source"] == "rejection_sampling"]
    assert {r["source"] for r in rows} <= {"rejection_sampling", "general"}
    assert any(r["source"] == "general" for r in rows)
    for r in sampled:
        assert r["provenance"]["rewards"]["accuracy"] == 1.0 and r["provenance"]["rewards"]["format"] == 1.0
        assert r["provenance"]["model"] == done["reasoning_rl"]["output"]
        assert r["completion"].endswith("</s>")
    for name in ["base", "cold_start", "reasoning_rl", "sft", "helpfulness_rl"]:
        ev = json.loads((tmp_path / "eval" / f"{name}.json").read_text())
        assert 0 <= ev["pass@1"] <= 1 and ev["prompts"] == 8 and "helpfulness" in ev, name
    assert table.count("\n") == 1 + 5 and (tmp_path / "RESULTS.md").read_text().count("|---|") == 1
    assert (tmp_path / "plots" / "stages.png").stat().st_size > 0
    assert (tmp_path / "plots" / "reasoning_rl.png").stat().st_size > 0

    logs = {s: (tmp_path / s / "stage.log").stat().st_mtime for s in cfg.stages}
    assert run(cfg) == table  # finished stages are skipped, evaluations reused
    assert logs == {s: (tmp_path / s / "stage.log").stat().st_mtime for s in cfg.stages}


def test_the_process_supervised_variant_trains_a_prm_on_the_cold_start_and_rl_keeps_training_it(tmp_path):
    """configs/r1_tiny_prm.yaml over r1_tiny.yaml: the PRM stage starts from the cold-start model and labels its
    samples; stage 2 gets step rewards from that PRM and updates it as it goes."""
    cfg = load_config(PipelineConfig, [CONFIG, CONFIG.with_name("r1_tiny_prm.yaml")], [
        f"run_dir={tmp_path}", f"base.path={tmp_path / 'base'}", *QUICK, "cold_start.train.steps=4",
        "cold_start.log.save_every=4", "stages=[cold_start,process_reward_model,reasoning_rl]",
        "process_reward_model.train.steps=4", "process_reward_model.data.num_examples=32",
        "process_reward_model.data.eval_examples=8", "process_reward_model.data.policy_prompts=4",
        "process_reward_model.data.policy_eval_prompts=2", "reasoning_rl.train.steps=2",
        "reasoning_rl.rewards.reward_model_updates.every=1", "reasoning_rl.rewards.reward_model_updates.steps=1"])
    run(cfg)
    done = {s: json.loads((tmp_path / s / "DONE.json").read_text()) for s in cfg.stages}
    prm = (tmp_path / "process_reward_model" / "stage.yaml").read_text()
    assert prm.count(f"{done['cold_start']['output']}") == 2  # the model it starts from, and the policy it samples
    assert done["process_reward_model"]["output"] == str(tmp_path / "process_reward_model" / "final")
    rl = (tmp_path / "reasoning_rl" / "stage.yaml").read_text()
    assert f"process_reward_model: {done['process_reward_model']['output']}" in rl
    metrics = [json.loads(line) for line in open(tmp_path / "reasoning_rl" / "metrics.jsonl")]
    assert all(m["steps/per_completion_mean"] >= 1 and "reward/process_reward_model" in m for m in metrics)
    assert all("reward_model/loss" in m for m in metrics)  # the PRM trained after each step


def test_an_interrupted_stage_resumes_from_its_checkpoint(tmp_path):
    cfg = quick_config(tmp_path, "stages=[cold_start]", "cold_start.train.steps=4", "cold_start.log.save_every=2",
                       "cold_start.log.keep_last=3")
    run(cfg)
    stage = tmp_path / "cold_start"
    # as if it had been killed after step 2: no DONE.json, no last checkpoint
    (stage / "DONE.json").unlink()
    final = stage / "checkpoints" / "step-00000004"
    for p in sorted(final.rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    final.rmdir()
    (stage / "checkpoints" / "latest").unlink(missing_ok=True)
    run(cfg)
    steps = [json.loads(line)["step"] for line in open(stage / "metrics.jsonl")]
    assert steps.count(0) == 1 and steps[-2:] == [2, 3]  # steps 2-3 ran again, 0-1 did not
    done = json.loads((stage / "DONE.json").read_text())
    assert done["output"].endswith("step-00000004")
    # the stage's time is both processes' (each of them imports, loads and trains: seconds, not milliseconds)
    processes = json.loads((stage / "seconds.json").read_text())["processes"]
    assert done["processes"] == len(processes) == 2 and min(processes) > 1
    assert done["seconds"] == pytest.approx(sum(processes))


def test_a_stage_alone_needs_what_it_starts_from(tmp_path):
    cfg = quick_config(tmp_path, "stages=[reasoning_rl]")
    with pytest.raises(ConfigError, match="reasoning_rl needs the output of cold_start, which has not finished"):
        run(cfg)
    with pytest.raises(ConfigError, match=r"stages: unknown \['stage2'\]"):
        run(quick_config(tmp_path, "stages=[stage2]"))


def test_a_stage_record_is_whole_and_counts_every_process(tmp_path, monkeypatch, capsys):
    cfg = quick_config(tmp_path, "stages=[cold_start]")
    monkeypatch.setattr(pipeline, "run_module", lambda *args, **kwargs: [3.0, 4.5])  # two processes ran it
    monkeypatch.setattr(pipeline, "stage_output", lambda *args: "out")
    assert run_stage(cfg, "cold_start") == {"stage": "cold_start", "output": "out", "seconds": 7.5, "processes": 2}
    assert finished(cfg, "cold_start")["seconds"] == 7.5

    done = tmp_path / "cold_start" / "DONE.json"
    done.write_text("")  # what a crash while writing it in place left
    assert finished(cfg, "cold_start") is None
    assert capsys.readouterr().err == f"warning: {done} is empty: cold_start runs again (it resumes where it was)\n"

    def killed(*args):
        raise KeyboardInterrupt  # the pipeline stopped while publishing DONE.json

    done.unlink()
    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        run_stage(cfg, "cold_start")
    assert not done.exists()


def test_a_stage_that_saved_no_checkpoint_is_reported(tmp_path):
    cfg = quick_config(tmp_path)
    (tmp_path / "reasoning_rl").mkdir()  # e.g. every step was non-finite: the trainer never saved
    with pytest.raises(RunError, match="reasoning_rl ended without error but produced no checkpoint in "
                                       f"{tmp_path / 'reasoning_rl' / 'checkpoints'}"):
        stage_output(cfg, "reasoning_rl", None)


def test_two_pipelines_never_share_a_run_dir(tmp_path):
    hold = "import sys; from fastgrpo.runs import lock_run_dir; lock_run_dir(sys.argv[1]); print(flush=True); " \
           "sys.stdin.read()"
    other = subprocess.Popen([sys.executable, "-c", hold, str(tmp_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        other.stdout.readline()
        with pytest.raises(RunError, match=f"run dir {tmp_path} is in use by process {other.pid} "):
            run(quick_config(tmp_path))
    finally:
        other.kill()
        other.wait()
    assert not (tmp_path / "pipeline.yaml").exists()


def alive(marker: str) -> list[int]:
    """The pids of the live processes whose command line holds `marker` (zombies are dead: nothing runs)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            found = proc.name.isdigit() and marker.encode() in (proc / "cmdline").read_bytes()
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] if found else "Z"
        except OSError:  # it ended meanwhile
            continue
        if state != "Z":
            pids.append(int(proc.name))
    return pids


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1"]


@pytest.mark.parametrize("launcher", [[], TORCHRUN], ids=["process", "torchrun"])
def test_a_stage_dies_with_the_pipeline(tmp_path, launcher):
    """SIGKILL leaves the pipeline no chance to stop its stage: the kernel must (and torchrun its workers)."""
    overrides = [f"run_dir={tmp_path}", f"base.path={tmp_path / 'base'}", "stages=[cold_start]",
                 "cold_start.train.steps=1000000", "launcher=[" + ",".join(f"'{a}'" for a in launcher) + "]"]
    main = subprocess.Popen([sys.executable, "-m", "fastgrpo.pipeline", str(CONFIG), *overrides],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=Path(__file__).parents[1])
    marker = str(tmp_path / "cold_start" / "stage.yaml")  # on the command line of the stage and of its workers
    try:
        deadline = time.time() + 300
        while len(alive(marker)) < 1 + bool(launcher) and time.time() < deadline:
            assert main.poll() is None, "the pipeline ended before its stage started"
            time.sleep(0.2)
        stage = alive(marker)
        assert len(stage) == 1 + bool(launcher)
        main.send_signal(signal.SIGKILL)
        main.wait()
        deadline = time.time() + 60
        while alive(marker) and time.time() < deadline:
            time.sleep(0.2)
        assert alive(marker) == []
    finally:
        for pid in alive(marker):  # an orphan would train on for hours
            os.kill(pid, signal.SIGKILL)
        main.kill()


class Scripted:
    """A generator that answers each addition prompt with scripted texts chosen to hit every filter."""

    def __init__(self, tokenizer, texts_for):
        self.tokenizer, self.texts_for = tokenizer, texts_for

    def generate(self, prompts, sampling):
        def completion(text, reason="stop"):
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            return Completion(ids, [0.0] * len(ids), reason)

        out = []
        for ids in prompts:
            question = self.tokenizer.decode(ids).removeprefix("<|user|>").removesuffix("<|assistant|>")
            a, b = question.removesuffix("=").split("+")
            out.append([completion(*t) for t in self.texts_for(str(int(a) + int(b)))])
        return out


def test_rejection_sampling_keeps_only_verified_distinct_completions():
    from fastgrpo.tiny import char_tokenizer

    tok = char_tokenizer()
    good = "<think>1+2=3</think>Answer: {}"
    texts_for = lambda a: [  # noqa: E731
        (good.format(a),), (good.format(a),),  # a duplicate
        ("Answer: " + a,),  # no reasoning: format
        (good.format(int(a) + 1),),  # incorrect
        (good.format(a), "length"),  # truncated
        ("<think>" + "1+" * 30 + "</think>Answer: " + a,),  # repetitive
        ("<think>x</think>Answer: " + a,), ("<think>y</think>Answer: " + a,),  # correct, but one too many
    ]
    cfg = RejectionConfig(model="m", k=8, max_per_prompt=2, general_source=None)
    cfg.data.num_examples = 3
    rows, counts = accepted_samples(Scripted(tok, texts_for), tok, cfg)
    assert counts == {"sampled": 24, "kept": 6, "duplicate": 3, "format": 3, "incorrect": 3, "truncated": 3,
                      "repetitive": 3, "enough": 3}
    for row in rows:
        a = row["provenance"]["answer"]
        assert row["completion"] in (good.format(a) + "</s>", "<think>x</think>Answer: " + a + "</s>")


def test_repetition_and_majority_vote():
    assert repetitive([5, 6, 7] * 10, n=3, max_repeats=4) and not repetitive(list(range(30)), n=3, max_repeats=4)
    assert majority_correct(["3", "4", "4", None], [1.0, 0.0, 0.0, 0.0]) == 0.0
    assert majority_correct(["3", "3", "4", None], [1.0, 1.0, 0.0, 0.0]) == 1.0
    assert majority_correct([None, None], [0.0, 0.0]) == 0.0
