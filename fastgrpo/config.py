"""Typed configuration: dataclasses are the schema, YAML files and command-line `key=value` only set values.

    cfg = load_config(GRPOConfig, "configs/grpo_tiny.yaml", ["train.steps=20", "loss.beta=0.04"])

OmegaConf merges structured defaults, the YAML and the overrides in struct mode, so an unknown or mistyped key
fails at once with its full name; defaults live here and nowhere else.

A config is code, like a Python script: a run executes what its config names (`rewards.funcs` may import any
module, the pipeline's `launcher` is any command line), so run only configs you trust. Values may come from the
environment (`${oc.env:VAR}`); the files a run writes (config.yaml, stage.yaml) keep those as interpolations, never
their values, so that a token or password does not end up in a run directory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A configuration problem, reported in one line."""


@dataclass
class LoraConfig:
    """LoRA adapters through peft (fastgrpo/lora.py): only they train and carry optimizer state; the reference is the
    base with the adapters disabled, and vLLM samples from the base with the current adapters merged."""

    r: int = 16  # rank
    alpha: float = 32.0  # the adapters' output is scaled by alpha / r
    dropout: float = 0.0
    # the decoder's linear layers by their transformers names (Qwen2 / Llama / Mistral naming)
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    quantize: str | None = None  # nf4: a 4-bit base (QLoRA); refused where bitsandbytes cannot run it (lora.py)


@dataclass
class ModelConfig:
    path: str = "???"  # a local Hugging Face folder, or a hub name where the hub is reachable
    dtype: str = "float32"  # float32 | bfloat16: what the forward and backward compute in (fastgrpo/precision.py)
    param_dtype: str = "float32"  # trainable weights, gradients, optimizer state; bfloat16 loses small updates
    trust_remote_code: bool = False  # off unless turned on: loading a model must not run its code
    gradient_checkpointing: bool = False  # recompute each decoder layer in the backward: less activation memory
    # GRPO with loss.beta > 0, full fine-tuning: the reference model's weights and forward; None: model.dtype.
    # bfloat16 under fp32 training halves its memory (bench/MEMORY.md)
    reference_dtype: str | None = None
    # None: full fine-tuning. Setting any model.lora key turns LoRA on (fastgrpo/lora.py), the others then default:
    # r=16, alpha=32.0, dropout=0.0, target_modules=[q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]
    # (the decoder's linear layers), quantize=null (nf4: QLoRA, where bitsandbytes runs it); e.g. model.lora.r=8
    lora: LoraConfig | None = None


@dataclass
class DataConfig:
    source: str = "builtin:arithmetic"  # builtin:<task>, a .json/.jsonl/.parquet file, or a hub dataset name
    split: str = "train"
    prompt_column: str = "prompt"
    answer_column: str = "answer"
    max_prompt_length: int = 256
    long_prompts: str = "skip"  # skip (and count) | error
    num_examples: int = 2000  # size of a built-in task's training set
    eval_examples: int = 100  # held-out examples of a built-in task
    seed: int = 0
    general_source: str | None = None  # general (non-reasoning) prompts mixed in, e.g. builtin:assist (R1 stage 4)
    general_prompt_column: str = "prompt"  # general_source's prompt column: text, or chat messages (data.mix)
    general_fraction: float = 0.0  # share of the prompts drawn from general_source


@dataclass
class GenerationConfig:
    backend: str = "vllm"  # vllm | hf
    sync: str = "auto"  # auto | zero_copy | copy | reload (vllm only); auto: zero_copy where the weights can be
    # shared, copy where only the dtype differs (mixed precision), reload otherwise
    num_generations: int = 8  # G
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_completion_length: int = 256
    # CPU KV cache; None: the step's own need (vllm_bridge.kv_cache_gib_for). CUDA uses gpu_memory_utilization
    kv_cache_gib: float | None = None
    ignore_eos: bool = False  # every completion runs to max_completion_length (benchmarks)
    gpu_memory_utilization: float = 0.3
    # vLLM tensor parallel size (vllm only): each group of this many consecutive ranks runs one vLLM that splits the
    # weights over them, for a model that does not fit one GPU; must divide the number of ranks. docs/SCALING.md
    tensor_parallel_size: int = 1


@dataclass
class LossConfig:
    # grpo | bnpo | dapo | dr_grpo | luspo | cispo | sapo | vespo: the formulas in fastgrpo_kernels/grpo_loss.py
    loss_type: str = "dapo"
    importance_level: str = "token"  # token | sequence (GSPO)
    eps_low: float = 0.2
    eps_high: float = 0.28  # cispo: the cap on the ratio itself, so >= 1 (ScaleRL: 5.0)
    delta: float | None = None  # the clipped loss types only (not cispo, sapo, vespo)
    beta: float = 0.0  # 0 loads no reference model
    bias_correction_kl: bool = False  # the KL term times the ratio (TRL's use_bias_correction_kl, on by default there)
    sapo_temperature_pos: float = 1.0  # sapo's gate sharpness for advantages > 0 (TRL's defaults, this and below)
    sapo_temperature_neg: float = 1.05  # and <= 0
    vespo_k_pos: float = 2.0  # vespo's Gamma weight for advantages >= 0: power k and decay lambda
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0  # and < 0
    vespo_lambda_neg: float = 2.0
    advantage_scale: str = "group"  # group | batch | none
    tis_cap: float | None = None  # truncated importance sampling against the generator's log-probs
    # TRL's vllm_importance_sampling_mode against the generator's log-probs (None: off; tis_cap is token_truncate
    # with is_clip_max=tis_cap): token_* weighs each token by its own ratio, sequence_* by its sequence's product;
    # *_truncate clamps the ratio to [is_clip_min, is_clip_max], *_mask zeroes it outside. vespo: token_* only
    is_mode: str | None = None
    is_clip_min: float | None = None  # None: no lower bound (TRL's C_min default)
    is_clip_max: float | None = 3.0  # None: no upper bound (TRL's C_max default)
    mask_truncated: bool = False  # completions cut at max_completion_length get no loss
    overlong_buffer: int = 0  # DAPO soft overlong penalty over the last N tokens (0: off)

    def to_kernel(self, temperature: float, max_completion_length: int):
        """The loss op's GRPOLossConfig: every field from here (the kernel's own defaults never apply to a run)."""
        from fastgrpo_kernels import GRPOLossConfig  # here: loading a config needs no kernels

        return GRPOLossConfig(loss_type=self.loss_type, importance_level=self.importance_level, eps_low=self.eps_low,
                              eps_high=self.eps_high, delta=self.delta, beta=self.beta,
                              bias_correction_kl=self.bias_correction_kl, temperature=temperature,
                              max_completion_length=max_completion_length, compute_entropy=True,
                              sapo_temperature_pos=self.sapo_temperature_pos,
                              sapo_temperature_neg=self.sapo_temperature_neg, vespo_k_pos=self.vespo_k_pos,
                              vespo_lambda_pos=self.vespo_lambda_pos, vespo_k_neg=self.vespo_k_neg,
                              vespo_lambda_neg=self.vespo_lambda_neg)


@dataclass
class CodeConfig:
    """The "code" reward: how programs are scored and the sandbox they run in (fastgrpo/sandbox.py)."""

    scoring: str = "fraction"  # fraction: the share of the row's tests passed | all: 1.0 only if every test passes
    isolation: str = "auto"  # auto: bubblewrap where it runs, else limits only (said in one line) | bwrap: required
    workers: int = 0  # pre-started worker processes running programs in parallel; 0: one per usable CPU core
    timeout_s: float = 2.0  # wall clock per program, all its test cases together
    cpu_s: float = 2.0  # CPU time per process of a program
    memory_mb: int = 512  # address space per process
    max_processes: int = 8  # processes and threads of a program at once
    max_output_bytes: int = 1 << 20  # per file a program writes, its stdout and stderr included


@dataclass
class RewardModelUpdatesConfig:
    """Iterative RL: the reward model trained further on the policy's samples as RL goes (fastgrpo/iterative.py)."""

    every: int = 0  # GRPO steps between updates; 0: the reward model stays as loaded
    steps: int = 1  # optimizer steps per update
    pairs_per_step: int = 16
    replay_fraction: float = 0.1  # share of each batch drawn from older samples
    buffer_pairs: int = 4096  # older pairs kept for replay
    source: str = "verifier"  # verifier: right over wrong by accuracy | preferences: best over worst by the rest
    labeler: str | None = None  # a process reward model's step labels: a process reward by name (arithmetic_steps)
    # the label of a step the labeler abstains on (None); None: such steps are not trained on. 0.0 teaches the
    # process reward model that text the labeler does not recognize as a step is a wrong one, which is what keeps
    # a policy drifting to such text from being rewarded for it (docs/supervision/RESULTS.md)
    unlabeled: float | None = None
    lr: float = 1e-5
    max_grad_norm: float = 1.0


@dataclass
class RewardConfig:
    funcs: list[str] = field(default_factory=lambda: ["accuracy", "format"])  # built-in names or module:function
    weights: list[float] = field(default_factory=lambda: [1.0, 0.5])
    reward_model: str | None = None  # sequence-classification checkpoint for the "reward_model" function
    # token-classification checkpoint (fastgrpo.prm) for the "process_reward_model" function; needs step_pattern
    process_reward_model: str | None = None
    code: CodeConfig = field(default_factory=CodeConfig)  # the "code" reward (runs the completions' code)
    # process supervision: a regex a decoded completion is cut after, into the steps that reward functions get as
    # `steps` / `step_ends` and may score one by one (fastgrpo/steps.py); None: no steps are found
    step_pattern: str | None = None
    reward_model_updates: RewardModelUpdatesConfig = field(default_factory=RewardModelUpdatesConfig)


@dataclass
class TrainConfig:
    steps: int = 100
    prompts_per_step: int = 8  # B; B * G completions per step
    # token budget of one packed micro-batch (a longer sequence goes alone): it bounds activation memory, and
    # smaller costs little - at 180M parameters and 16 x 512-token completions, 2048 instead of 8192 took the
    # step's peak from 7.5 to 5.9 GB at the same speed (bench/STEP_512.md)
    micro_batch_tokens: int = 2048
    num_iterations: int = 1  # mu: optimizer updates per rollout batch
    lr: float = 1e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    dynamic_sampling: bool = False  # DAPO: drop groups whose rewards are all equal and refill the batch
    # the reward those groups are judged by: a reward function's logged name, or "total" (the weighted sum);
    # None: accuracy_reward where the run has it (as DAPO and verl filter on accuracy), else the total
    dynamic_sampling_reward: str | None = None
    max_refills: int = 3
    max_bad_steps: int = 5  # consecutive non-finite steps before stopping (the last good checkpoint is kept)
    # adamw: torch's fused AdamW, state in model.param_dtype | adamw_8bit: bitsandbytes' AdamW8bit, both moments in
    # 8 bits (a quarter of adamw's state; fastgrpo/precision.py)
    optimizer: str = "adamw"
    seed: int = 0


@dataclass
class ToolsConfig:
    """Multi-turn rollouts (fastgrpo/episodes.py): functions the model may call, or an environment; off with neither."""

    # built-in tools (calculator, python: the code reward's sandbox) or module:function, TRL-style tool functions
    funcs: list[str] = field(default_factory=list)
    # module:factory, called once per episode: a TRL environment_factory (reset, tool methods, get_reward) or a
    # fastgrpo.tools.Environment; funcs are added to its tools
    environment: str | None = None
    # the model's turns per episode; generation.max_completion_length bounds the episode's tokens after the prompt
    max_turns: int = 4
    max_turn_tokens: int | None = None  # a turn's tokens; one reaching it goes to the environment as it is
    timeout_s: float = 10.0  # per tool call, and per environment step
    max_concurrency: int = 16  # tool calls (environment steps) running at once


@dataclass
class LogConfig:
    run_dir: str = "runs/grpo"
    save_every: int = 50
    keep_last: int = 2
    tensorboard: bool = True
    wandb_project: str | None = None


@dataclass
class GRPOConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    rewards: RewardConfig = field(default_factory=RewardConfig)
    tools: ToolsConfig = field(default_factory=ToolsConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)


CHOICES = {
    "model.dtype": ("float32", "bfloat16"),
    "model.param_dtype": ("float32", "bfloat16"),
    "model.reference_dtype": ("float32", "bfloat16"),
    "train.optimizer": ("adamw", "adamw_8bit"),
    "model.lora.quantize": ("nf4",),
    "dtype": ("auto", "float32", "bfloat16"),  # evaluation and rejection sampling: vLLM's
    "data.long_prompts": ("skip", "error"),
    "generation.backend": ("vllm", "hf"),
    "generation.sync": ("auto", "zero_copy", "copy", "reload"),
    "loss.loss_type": ("grpo", "bnpo", "dapo", "dr_grpo", "luspo", "cispo", "sapo", "vespo"),
    "loss.importance_level": ("token", "sequence"),
    "loss.is_mode": ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask"),
    "loss.advantage_scale": ("group", "batch", "none"),
    "rewards.code.scoring": ("fraction", "all"),
    "rewards.code.isolation": ("auto", "bwrap"),
}


def _check_choices(cfg) -> None:
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None and value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of {allowed}")
    if OmegaConf.select(cfg, "model.param_dtype", default=None) is not None:
        check_precision(cfg.model)
    lora = OmegaConf.select(cfg, "model.lora", default=None)
    if OmegaConf.select(cfg, "model.reference_dtype", default=None) and lora is not None:
        raise ConfigError(f"model.reference_dtype={cfg.model.reference_dtype} with model.lora: the reference is the "
                          f"policy's own base with the adapters disabled, there is no separate reference to store")
    quantize = OmegaConf.select(cfg, "model.lora.quantize", default=None)
    if quantize is not None and OmegaConf.select(cfg, "generation.backend", default=None) == "vllm":
        raise ConfigError(f"model.lora.quantize={quantize} needs generation.backend=hf: vLLM can neither share nor "
                          f"load bitsandbytes' 4-bit base")
    if OmegaConf.select(cfg, "loss.loss_type", default=None) == "cispo" and cfg.loss.eps_high < 1:
        raise ConfigError(f"loss.eps_high={cfg.loss.eps_high} is cispo's cap on the ratio itself: below 1 it caps "
                          f"every token's weight; set it >= 1 (ScaleRL uses 5.0)")
    if OmegaConf.select(cfg, "loss.is_mode", default=None) is not None:
        check_rollout_correction(cfg.loss)


def check_rollout_correction(loss: LossConfig) -> None:
    """loss.is_mode's combinations that fastgrpo_kernels.rollout_is_weights (or TRL) refuses, as one line each."""
    lo, hi = loss.is_clip_min, loss.is_clip_max
    if loss.tis_cap is not None:
        raise ConfigError(f"loss.tis_cap={loss.tis_cap} and loss.is_mode={loss.is_mode} both correct for the "
                          f"generator: set one (tis_cap is is_mode=token_truncate with is_clip_max=tis_cap)")
    if loss.loss_type == "vespo" and loss.is_mode.startswith("sequence_"):
        raise ConfigError(f"loss.is_mode={loss.is_mode} with loss.loss_type=vespo: vespo folds the weights into its "
                          f"own sequence weight, so it takes token_truncate or token_mask (as TRL)")
    if lo is not None and hi is not None and not lo < hi:
        raise ConfigError(f"loss.is_clip_min={lo} must be less than loss.is_clip_max={hi}")
    if loss.is_mode.endswith("_truncate") and lo is None and hi is None:
        raise ConfigError(f"loss.is_mode={loss.is_mode} needs loss.is_clip_min or loss.is_clip_max (both are null)")


def check_precision(model: ModelConfig) -> None:
    if model.param_dtype == "bfloat16" and model.dtype == "float32":
        raise ConfigError("model.param_dtype=bfloat16 is narrower than model.dtype=float32: compute in the weights' "
                          "dtype, or keep wider weights")


def _read_yaml(path):
    """OmegaConf.load; a file that is not YAML, or not a mapping of keys, is a one-line ConfigError naming it."""
    import yaml

    try:
        node = OmegaConf.load(path)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"config file {path}{where}: {err.problem or err.context} (not valid YAML)") from None
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {path} is not valid YAML: {' '.join(str(err).split())}") from None
    if not OmegaConf.is_dict(node):
        raise ConfigError(f"config file {path} holds a list, not a mapping of keys to values")
    return node


def load_config(schema: type, path: str | Path | list | None = None, overrides: list[str] = ()):
    """Defaults from `schema`, then the YAML at `path` (or each of a list of paths, later ones over earlier ones),
    then `key=value` overrides; returns a typed object."""
    paths = [] if path is None else [path] if isinstance(path, (str, Path)) else list(path)
    for p in paths:
        if not Path(p).is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
    try:
        cfg = OmegaConf.structured(schema)
        OmegaConf.set_struct(cfg, True)
        cfg = OmegaConf.merge(cfg, *map(_read_yaml, paths), *map(_override, overrides))
        missing = sorted(OmegaConf.missing_keys(cfg))
        if missing:
            raise ConfigError(f"missing required config value(s): {', '.join(missing)}")
        _record_environment(cfg)
    except OmegaConfBaseException as err:
        where = f" in {' + '.join(map(str, paths))}" if paths else ""
        key = getattr(err, "full_key", None)
        message = str(err).splitlines()[0]
        prefix = f"{key}: " if key and key not in message else ""
        raise ConfigError(f"config error{where}: {prefix}{message}") from None
    _check_choices(cfg)
    return OmegaConf.to_object(cfg)


def _override(item: str):
    """One `key=value` override as a config layer; a value that is not YAML is a one-line ConfigError."""
    try:
        return OmegaConf.from_dotlist([item])
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"config error: the override '{item}' is not valid YAML ({problem}); a value with "
                          f"backslashes goes in single quotes, key='a\\d'") from None


def load_cli_config(schema: type, argv: list[str]):
    """`CONFIG.yaml [VARIANT.yaml ...] [key=value ...]`, or only `key=value ...`: the schema's defaults, then each
    YAML file over the one before (a variant file holds only what it changes), then the overrides."""
    n = next((i for i, arg in enumerate(argv) if "=" in arg), len(argv))
    return load_config(schema, argv[:n] or None, argv[n:])


# What load_config read from the environment, by the dotted key it was set at: (the value, the interpolation it came
# from). Kept for the whole process: the pipeline writes its stages' configs long after loading its own.
_FROM_ENVIRONMENT: dict[str, tuple[object, str]] = {}


def _leaves(node, prefix: str = "", into_lists: bool = True):
    """(dotted key, value) of every leaf of a plain container; with into_lists=False a list is one leaf."""
    if isinstance(node, dict):
        items = node.items()
    elif isinstance(node, list) and into_lists:
        items = enumerate(node)
    else:
        yield prefix.removesuffix("."), node
        return
    for key, value in items:
        yield from _leaves(value, f"{prefix}{key}.", into_lists)


def _record_environment(cfg) -> None:
    """Note every value of `cfg` that comes from the environment: an `oc.env` interpolation, or an interpolation of
    a key that holds one."""
    raw = dict(_leaves(OmegaConf.to_container(cfg, resolve=False)))
    interpolated = {key: value for key, value in raw.items() if isinstance(value, str) and "${" in value}
    from_env = {key: OmegaConf.select(cfg, key) for key, value in interpolated.items() if "oc.env" in value}
    secrets = [str(v) for v in from_env.values() if v is not None and str(v)]
    for key, value in interpolated.items():
        resolved = OmegaConf.select(cfg, key)
        if key in from_env or any(secret in str(resolved) for secret in secrets):
            _FROM_ENVIRONMENT[key] = (resolved, value)


def to_yaml(cfg) -> str:
    """`cfg` (a typed config) as YAML, each value that came from the environment written as its interpolation.

    A value is matched by key and value, the key compared by its end: a stage's `log.wandb_project` matches the
    pipeline's `reasoning_rl.log.wandb_project`.
    """
    node = OmegaConf.structured(cfg)
    for key, value in _leaves(OmegaConf.to_container(node)):
        for where, (resolved, raw) in _FROM_ENVIRONMENT.items():
            if (where == key or where.endswith("." + key)) and resolved == value:
                *parents, last = key.split(".")
                parent = OmegaConf.select(node, ".".join(parents)) if parents else node
                parent[int(last) if OmegaConf.is_list(parent) else last] = raw
                break
    return OmegaConf.to_yaml(node)


def resume_changes(saved: Path, cfg, may_change: tuple[str, ...]) -> list[str]:
    """Compare the config a run was saved under (`saved`, its config.yaml) with the one it resumes under.

    Returns one line per changed key that `may_change` allows (a dotted key, or a section such as "log."); raises
    ConfigError naming every other changed key. Keys the saved config lacks (a newer schema) are reported, not
    refused; values from the environment compare as their interpolations.
    """
    old = dict(_leaves(OmegaConf.to_container(OmegaConf.load(saved), resolve=False), into_lists=False))
    new = dict(_leaves(OmegaConf.to_container(OmegaConf.create(to_yaml(cfg)), resolve=False), into_lists=False))
    changed = [key for key in new if key in old and old[key] != new[key]]
    refused = [key for key in changed if not key.startswith(may_change)]
    if refused:
        listed = ", ".join(f"{key} ({old[key]!r} -> {new[key]!r})" for key in refused)
        raise ConfigError(f"cannot resume {saved.parent} with a changed {listed}: its checkpoints were trained with "
                          f"the values in {saved}; restore them, or start a new run (another log.run_dir)")
    return ([f"resume: {key} changed from {old[key]!r} to {new[key]!r}, applied" for key in changed] +
            [f"resume: {key}={new[key]!r} (not in {saved})" for key in new if key not in old])


def write_run_config(run_dir, cfg, resuming: bool, may_change: tuple[str, ...], write: bool = True) -> None:
    """run_dir/config.yaml := cfg, after a resumed run's changes are checked against it (resume_changes) and printed.

    Under torchrun every rank checks (so that all refuse together) and rank 0 alone writes (write=True): atomically,
    since the other ranks may be reading it.
    """
    saved = Path(run_dir) / "config.yaml"
    if resuming and saved.is_file():
        for line in resume_changes(saved, cfg, may_change):
            if write:
                print(line, flush=True)
    if write:
        saved.parent.mkdir(parents=True, exist_ok=True)
        tmp = saved.with_name(".tmp-config.yaml")
        tmp.write_text(to_yaml(cfg))
        os.replace(tmp, saved)
