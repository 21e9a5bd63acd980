"""Iterative RL (DeepSeekMath 4.1.3): the reward model keeps learning from the policy's own samples, with replay.

    rewards:
      funcs: [reward_model, accuracy]
      reward_model: runs/reward_model/final
      reward_model_updates: {every: 10, steps: 2, replay_fraction: 0.1, source: verifier}

Every `every` GRPO steps the reward model that scores the run (the "reward_model" function: a sequence-classification
model, Bradley-Terry on pairs) takes `steps` optimizer steps on pairs made from the policy's recent rollouts, and RL
goes on with the updated model (the reward function holds the very model that trains). The pairs of a group come
from the rule rewards, never from the reward model itself:
  verifier      a completion the accuracy reward marks right over one it marks wrong (zipped within the group);
  preferences   the group's best completion over its worst by the run's other rewards (weighted sum), when they differ.
A process reward model (the "process_reward_model" function, rewards.step_pattern set) learns instead the step
labels of `labeler` (a process reward function by name, e.g. arithmetic_steps: the rule it stands in for) on each
sample's steps, with binary cross-entropy at each step's last token (ProcessRewardModelLearner).
Each update's batch draws (1 - replay_fraction) of its examples from the samples since the last update and the rest
from older ones (a buffer of the last `buffer_pairs`), as DeepSeekMath's replay keeps ~10% historical data.
The draws are a function of (train.seed, step), and the model, its optimizer and the buffer are part of every GRPO
checkpoint, so a resumed run continues as the uninterrupted one.
"""

from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F

from .config import GRPOConfig, RewardModelUpdatesConfig
from .data import decode, encode_prompt
from .prm import Chain, ProcessRewardModelReward, collate, step_loss, token_logits
from .reward_model import margins
from .rewards import RewardModelReward, render_conversation, resolve_reward
from .steps import find_steps

SOURCES = ("verifier", "preferences")


class RewardModelLearner:
    """The run's reward model, trained further on (chosen ids, rejected ids) pairs from its rollouts."""

    def __init__(self, reward: RewardModelReward, cfg: RewardModelUpdatesConfig, judge: list[int],
                 judge_weights: list[float], seed: int):
        """reward: the run's RewardModelReward (its model is the one that learns); judge, judge_weights: the per_func
        columns whose weighted sum makes the pairs (verifier: the accuracy column alone)."""
        if cfg.source not in SOURCES:
            raise ValueError(f"rewards.reward_model_updates.source={cfg.source!r}: use one of {SOURCES}")
        if not 0 <= cfg.replay_fraction < 1:
            raise ValueError(f"rewards.reward_model_updates.replay_fraction={cfg.replay_fraction} must be in [0, 1)")
        self.reward, self.cfg, self.seed = reward, cfg, seed
        self.judge, self.judge_weights = judge, torch.tensor(judge_weights, dtype=torch.float32)
        self.optimizer = torch.optim.AdamW(reward.model.parameters(), lr=cfg.lr, weight_decay=0.0)
        self.recent: list[tuple[list[int], list[int]]] = []  # pairs since the last update
        self.history: list[tuple[list[int], list[int]]] = []  # older pairs, the last buffer_pairs of them

    def encode(self, prompt, completion: str) -> list[int]:
        """Token ids of a (prompt, completion) exactly as the reward function scores it."""
        tokenizer = self.reward.tokenizer
        return tokenizer(render_conversation(tokenizer, prompt, completion), add_special_tokens=False)["input_ids"]

    def observe(self, prompts: list, completions: list[str], per_func: torch.Tensor, G: int) -> None:
        """Pairs from one step's S = B*G samples (prompts and completion texts group by group, per_func (S, F))."""
        columns = per_func[:, self.judge]  # (S, J)
        judged = (columns * self.judge_weights).nansum(1).masked_fill(columns.isnan().all(1), math.nan)  # (S,)
        for g in range(0, len(completions), G):
            scores = judged[g:g + G].tolist()
            for i, j in self._pairs(scores):
                self.recent.append((self.encode(prompts[g + i], completions[g + i]),
                                    self.encode(prompts[g + j], completions[g + j])))

    def _pairs(self, scores: list[float]) -> list[tuple[int, int]]:
        """(chosen, rejected) indices within a group."""
        valid = [i for i, s in enumerate(scores) if not math.isnan(s)]
        if self.cfg.source == "verifier":
            right = [i for i in valid if scores[i] > 0.5]
            wrong = [i for i in valid if scores[i] <= 0.5]
            return list(zip(right, wrong))
        if not valid:
            return []
        best = max(valid, key=lambda i: (scores[i], -i))
        worst = min(valid, key=lambda i: (scores[i], i))
        return [(best, worst)] if scores[best] > scores[worst] else []

    def update(self, step: int) -> dict:
        """cfg.steps optimizer steps on batches of recent and replayed examples; then the recent ones join the
        buffer. Returns the update's metrics (no loss when there was nothing new to learn from)."""
        cfg, model = self.cfg, self.reward.model
        rng = random.Random(self.seed * 1_000_003 + step)
        metrics = {"reward_model/pairs_new": float(len(self.recent)),
                   "reward_model/pairs_replay": float(len(self.history))}
        if not self.recent:
            return metrics
        model.train()
        losses, accuracies = [], []
        # the head's dropout draws from torch's generator: seeded per update, and the policy's stream left as it was
        cuda = [model.device.index or 0] if model.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(self.seed * 1_000_003 + step)
            for _ in range(cfg.steps):
                self.optimizer.zero_grad(set_to_none=True)
                loss, accuracy = self.loss(self._batch(rng))
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                if torch.isfinite(grad_norm):
                    self.optimizer.step()
                losses.append(loss.item())
                accuracies.append(accuracy)
        self.optimizer.zero_grad(set_to_none=True)
        model.eval()
        self.history = (self.history + self.recent)[-cfg.buffer_pairs:]
        self.recent = []
        return {**metrics, "reward_model/loss": sum(losses) / len(losses),
                "reward_model/train_accuracy": sum(accuracies) / len(accuracies)}

    def _batch(self, rng: random.Random) -> list[tuple[list[int], list[int]]]:
        """cfg.pairs_per_step pairs: a replay_fraction share from the buffer (when it has any), the rest recent."""
        n = self.cfg.pairs_per_step
        replay = round(n * self.cfg.replay_fraction) if self.history else 0
        return ([rng.choice(self.recent) for _ in range(n - replay)] +
                [rng.choice(self.history) for _ in range(replay)])

    def loss(self, pairs) -> tuple[torch.Tensor, float]:
        """Bradley-Terry on (chosen, rejected) pairs, as the reward-model stage trains: (loss, the share of pairs
        ranked right)."""
        margin = margins(self.reward.model, self.reward.tokenizer, pairs)  # (P,)
        return -F.logsigmoid(margin).mean(), (margin.detach() > 0).float().mean().item()

    def state(self) -> dict:
        """What a checkpoint keeps: the weights, the optimizer and the pairs (JSON and tensors, no pickle)."""
        return {"weights": {k: v.detach().clone() for k, v in self.reward.model.state_dict().items()},
                "optimizer": self.optimizer.state_dict(), "recent": [self.stored(x) for x in self.recent],
                "history": [self.stored(x) for x in self.history]}

    def load_state(self, state: dict) -> None:
        self.reward.model.load_state_dict(state["weights"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.recent = [self.example(p) for p in state["recent"]]
        self.history = [self.example(p) for p in state["history"]]

    @staticmethod
    def stored(example):
        return example

    @staticmethod
    def example(stored):
        return tuple(stored)


class ProcessRewardModelLearner(RewardModelLearner):
    """The run's process reward model, trained further on the policy's samples with step labels from `labeler`."""

    def __init__(self, reward: ProcessRewardModelReward, cfg: RewardModelUpdatesConfig, seed: int):
        if cfg.labeler is None:
            raise ValueError("rewards.reward_model_updates.labeler names the process reward (e.g. arithmetic_steps) "
                             "whose step labels the process reward model learns")
        super().__init__(reward, cfg, judge=[], judge_weights=[], seed=seed)
        self.labeler = resolve_reward(cfg.labeler)

    def observe_steps(self, prompts: list, completions: list[str], completion_ids: list[list[int]], steps: list,
                      columns: dict) -> None:
        """A chain per sample with a labelled step: prompt ids + completion ids, the steps' end tokens and the
        labeler's step rewards (clamped to [0, 1]; None: cfg.unlabeled). steps: (texts, ends) per sample."""
        labels = self.labeler(prompts=prompts, completions=completions, completion_ids=completion_ids,
                              steps=[t for t, _ in steps], step_ends=[e for _, e in steps], **columns)
        for prompt, ids, (_, ends), step_labels in zip(prompts, completion_ids, steps, labels, strict=True):
            if not isinstance(step_labels, (list, tuple)) or len(step_labels) != len(ends):
                raise ValueError(f"rewards.reward_model_updates.labeler={self.cfg.labeler!r} must return one label "
                                 f"per step")
            values = [self.label(x) for x in step_labels]
            if ends and not all(math.isnan(v) for v in values):
                prompt_ids = list(encode_prompt(self.reward.tokenizer, prompt))
                self.recent.append(Chain(prompt_ids + list(ids), [len(prompt_ids) + e for e in ends], values))

    def label(self, x) -> float:
        """A labeler's step reward as a training label in [0, 1]; NaN: not trained on."""
        if x is None:
            return math.nan if self.cfg.unlabeled is None else float(self.cfg.unlabeled)
        return min(max(float(x), 0.0), 1.0)

    def loss(self, chains) -> tuple[torch.Tensor, float]:
        """Binary cross-entropy at the labelled step ends: (loss, the share of those steps on the right side of
        0.5)."""
        model = self.reward.model
        input_ids, attention_mask, targets = collate(chains, self.reward.tokenizer.pad_token_id, model.device)
        logits = token_logits(model, input_ids, attention_mask)
        labelled = ~targets.isnan()
        right = ((logits[labelled] > 0) == (targets[labelled] > 0.5)).float().mean().item()
        return step_loss(logits, targets), right

    @staticmethod
    def stored(example: Chain):
        return [example.ids, example.ends, [None if math.isnan(v) else v for v in example.labels]]

    @staticmethod
    def example(stored) -> Chain:
        ids, ends, labels = stored
        return Chain(list(ids), list(ends), [math.nan if v is None else v for v in labels])


def make_learner(cfg: GRPOConfig, funcs: list, weights: list[float], reward_names: list[str]):
    """Iterative RL's learner of the run's reward model (rewards.reward_model_updates.every > 0), else None."""
    updates = cfg.rewards.reward_model_updates
    if updates.every <= 0:
        return None
    process = [f for f in funcs if isinstance(f, ProcessRewardModelReward)]
    if process:
        return ProcessRewardModelLearner(process[0], updates, cfg.train.seed)
    models = [i for i, f in enumerate(funcs) if isinstance(f, RewardModelReward)]
    if not models:
        raise ValueError("rewards.reward_model_updates trains the run's reward model: add reward_model (or "
                         "process_reward_model) to rewards.funcs")
    if updates.source == "verifier":
        if "accuracy_reward" not in reward_names:
            raise ValueError("rewards.reward_model_updates.source=verifier labels samples by the accuracy reward: "
                             "add accuracy to rewards.funcs")
        judge = [reward_names.index("accuracy_reward")]
    else:
        judge = [i for i in range(len(funcs)) if i != models[0]]
    return RewardModelLearner(funcs[models[0]], updates, judge, [weights[i] for i in judge], cfg.train.seed)


def learn_from_rollout(learner: RewardModelLearner, cfg: GRPOConfig, tokenizer, rollout, step: int) -> dict:
    """The GRPO step's samples (a grpo.Rollout) become pairs or labelled chains; every
    rewards.reward_model_updates.every steps the reward model trains on them (and replayed older ones), and the
    next step's rewards come from the updated model. Returns the update's metrics ({} between updates)."""
    texts = [decode(tokenizer, ids) for ids in rollout.completion_ids]
    prompts = [row[cfg.data.prompt_column] for row in rollout.rows]
    if isinstance(learner, ProcessRewardModelLearner):
        steps = [find_steps(tokenizer, ids, cfg.rewards.step_pattern) for ids in rollout.completion_ids]
        columns = {k: [row[k] for row in rollout.rows] for k in rollout.rows[0] if k != cfg.data.prompt_column}
        learner.observe_steps(prompts, texts, rollout.completion_ids, steps, columns)
    else:
        learner.observe(prompts, texts, rollout.per_func, cfg.generation.num_generations)
    if (step + 1) % cfg.rewards.reward_model_updates.every:
        return {}
    return learner.update(step)
