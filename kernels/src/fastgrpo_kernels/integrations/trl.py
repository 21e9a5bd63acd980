"""TRL 1.16's GRPOTrainer with its LM head and GRPO loss replaced by fastgrpo_kernels' fused-linear ops.

    from fastgrpo_kernels.integrations.trl import FastGRPOTrainer
    trainer = FastGRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...), train_dataset=...)

TRL computes log-probs with its own chunked LM head (`add_fused_lm_head`), then the loss from them. Here the
policy's loss is one `fused_linear_grpo_loss` call on the backbone's last hidden states and `lm_head.weight`, and the
old / reference log-prob passes are `fused_linear_logprobs`: no [B, T, V] logits and no [B, T] log-prob graph. The
objective is TRL's for every `loss_type` (grpo, dr_grpo, dapo, bnpo, cispo, sapo, luspo, vespo), with `beta`,
`use_bias_correction_kl`, `importance_sampling_level`, `epsilon` / `epsilon_high`, `delta`, `temperature`, the sapo /
vespo hyperparameters, the vLLM importance-sampling correction in all four `vllm_importance_sampling_mode`s (TRL
still computes the ratios; they enter as is_weights) and gradient accumulation, normalized as TRL does.
An option whose effect the fused loss cannot reproduce is refused at construction with a ValueError naming it
(top_entropy_quantile < 1, off_policy_mask_threshold, the entropy bonus, use_liger_kernel, an MoE aux loss, a
multimodal processor, FSDP / DeepSpeed, an LM head with a bias, a logit scale or softcap); so are multimodal inputs.
vespo sums the log IS ratios over completion tokens, TRL over every position: they agree where padding holds ratio
1, as TRL's own ratios do unless C_min > 1 or C_max < 1. cast_lm_head_to_fp32 and bf16 autocast are kept.

Logged metrics: kl, entropy, clip_ratio/{low,high,region}_mean (token means; at importance_sampling_level="sequence"
TRL's count sequences) and cispo_clip_ratio; TRL's clip_ratio/low_min, clip_ratio/high_max and vespo/phi_seq_mean
are not logged.
Tested with TRL 1.16.0 in a single process (tests/kernels/test_trl_integration.py); DDP and PEFT go through the
model's own forward as TRL's head does, but neither is tested here.
"""

from __future__ import annotations

import functools
import types

import torch
from transformers import ProcessorMixin
from trl import GRPOTrainer

from ..fused_linear import fused_linear_grpo_loss, fused_linear_logprobs
from ..grpo_loss import GRPOLossConfig

# TRL's trainer keys for multimodal inputs: the fused head here takes the text backbone's hidden states only.
MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "num_tiles",
                   "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")


def loss_config(trainer) -> GRPOLossConfig:
    """GRPOLossConfig from a GRPOTrainer's resolved options (its attributes and `args`): TRL's names -> ours."""
    args = trainer.args
    return GRPOLossConfig(
        loss_type=trainer.loss_type, importance_level=trainer.importance_sampling_level,
        eps_low=trainer.epsilon_low, eps_high=trainer.epsilon_high, delta=args.delta, beta=trainer.beta,
        bias_correction_kl=args.use_bias_correction_kl, temperature=trainer.temperature,
        max_completion_length=trainer.max_completion_length, compute_entropy=True,
        sapo_temperature_pos=args.sapo_temperature_pos, sapo_temperature_neg=args.sapo_temperature_neg,
        vespo_k_pos=args.vespo_k_pos, vespo_lambda_pos=args.vespo_lambda_pos, vespo_k_neg=args.vespo_k_neg,
        vespo_lambda_neg=args.vespo_lambda_neg,
    )


def check_args(args) -> None:
    """ValueError naming the first GRPOConfig option whose effect FastGRPOTrainer does not reproduce."""
    refused = [
        ("use_liger_kernel", args.use_liger_kernel, "the LM head and loss are fastgrpo_kernels' already"),
        ("top_entropy_quantile", args.top_entropy_quantile < 1.0, "the fused loss keeps no per-token entropies"),
        ("off_policy_mask_threshold", args.off_policy_mask_threshold is not None,
         "the off-policy mask needs the current per-token log-probs outside the fused loss"),
        ("entropy_coef", args.entropy_coef != 0.0 or args.use_adaptive_entropy, "no entropy bonus in the fused loss"),
        ("router_aux_loss_coef", bool(args.router_aux_loss_coef), "no MoE auxiliary loss in the fused loss"),
    ]
    for name, bad, why in refused:
        if bad:
            raise ValueError(f"FastGRPOTrainer does not support {name}={getattr(args, name)!r}: {why}")


def _check_model(trainer) -> None:
    model = trainer.accelerator.unwrap_model(trainer.model)
    text_config = model.config.get_text_config()
    head = model.get_output_embeddings()
    refused = [
        ("multimodal processing_class", isinstance(trainer.processing_class, ProcessorMixin)),
        ("FSDP", trainer.is_fsdp_enabled), ("DeepSpeed", trainer.is_deepspeed_enabled),
        ("an LM head with a bias", getattr(head, "bias", None) is not None),
        ("final_logit_softcapping", getattr(text_config, "final_logit_softcapping", None) is not None),
        ("MoE router aux loss", trainer.aux_loss_enabled),
    ]
    refused += [(name, getattr(text_config, name, None) not in (None, 1.0))
                for name in ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")]
    for name, bad in refused:
        if bad:
            raise ValueError(f"FastGRPOTrainer does not support {name} ({type(model).__name__})")


def add_hidden_states_output(model) -> None:
    """Let `model(..., fastgrpo_hidden_states=True)` return (the backbone's last hidden states [B, L - 1, H], each
    position's state for predicting the next token; lm_head.weight [V, H]). Going through the model's own forward
    keeps what wraps it (DDP, PEFT) in the loop; any other call is the forward as it was."""
    forward = model.forward

    @functools.wraps(type(model).forward)
    def hidden_states_forward(self, *args, fastgrpo_hidden_states=False, **kwargs):
        if not fastgrpo_hidden_states:
            return forward(*args, **kwargs)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state[:, :-1]
        return hidden, self.get_output_embeddings().weight

    model.forward = types.MethodType(hidden_states_forward, model)


class FastGRPOTrainer(GRPOTrainer):
    """GRPOTrainer whose GRPO loss and old / reference log-probs come from fastgrpo_kernels (module docstring)."""

    def __init__(self, *args, **kwargs):
        grpo_args = kwargs.get("args", args[2] if len(args) > 2 else None)
        if grpo_args is not None:
            check_args(grpo_args)
        super().__init__(*args, **kwargs)
        check_args(self.args)
        _check_model(self)
        self.loss_config = loss_config(self)  # GRPOLossConfig validates the combination (e.g. delta with sapo)
        policy = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        add_hidden_states_output(policy)
        if self.ref_model is not None:
            add_hidden_states_output(self.accelerator.unwrap_model(self.ref_model))

    def _completion_hidden_states(self, model, input_ids, attention_mask, logits_to_keep):
        """(hidden [B, T, H] of the positions predicting the last logits_to_keep tokens, lm_head.weight)."""
        with self.accelerator.autocast():
            hidden, weight = model(input_ids=input_ids, attention_mask=attention_mask, fastgrpo_hidden_states=True)
        hidden = hidden[:, -logits_to_keep:]
        return (hidden.float(), weight) if self.args.cast_lm_head_to_fp32 else (hidden, weight)

    def _head_context(self):
        """Where the fused ops run: TRL's autocast, or none with cast_lm_head_to_fp32 (an fp32 head, as TRL's)."""
        if self.args.cast_lm_head_to_fp32:
            return torch.autocast(self.accelerator.device.type, enabled=False)
        return self.accelerator.autocast()

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **extra):
        """The old / reference passes: log-probs [B, T] (0 where masked), one fused matmul per chunk of rows. Calls
        that need more (entropies, an aux loss, images) go to TRL's own head."""
        if compute_entropy or compute_aux_loss or any(v is not None for v in extra.values()):
            return super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep,
                                                              batch_size, compute_entropy, compute_aux_loss, **extra)
        batch_size = batch_size or input_ids.size(0)
        logps = []
        for start in range(0, input_ids.size(0), batch_size):
            ids, attention = input_ids[start: start + batch_size], attention_mask[start: start + batch_size]
            hidden, weight = self._completion_hidden_states(model, ids, attention, logits_to_keep)
            with self._head_context():
                logp = fused_linear_logprobs(hidden, weight, ids[:, -logits_to_keep:], self.temperature)
            logps.append(logp.masked_fill(attention[:, -logits_to_keep:] == 0, 0.0))  # (rows, T)
        return torch.cat(logps), None, None

    def _normalizers(self, inputs, num_rows):
        """The kernel's normalizers that give TRL's micro-batch loss: TRL divides each micro-batch's mean by the
        accumulation steps (grpo, sapo, bnpo, dr_grpo, luspo), or the dapo / cispo / vespo sum by the generation
        batch's tokens over processes, rescaled to one accumulation window."""
        train = self.model.training
        accumulation = self.current_gradient_accumulation_steps if train else 1
        if self.loss_config.loss_type in ("dapo", "cispo", "vespo"):
            num_items = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if train:
                num_items = num_items * accumulation / self.args.steps_per_generation
            return dict(num_items=num_items)
        return dict(num_sequences=num_rows * accumulation, num_batches=accumulation)

    def _compute_loss(self, model, inputs):
        present = [key for key in MULTIMODAL_KEYS if inputs.get(key) is not None]
        if present:
            raise ValueError(f"FastGRPOTrainer does not support multimodal inputs ({', '.join(present)})")
        completion_ids, mask = inputs["completion_ids"], inputs["completion_mask"]
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        hidden, weight = self._completion_hidden_states(model, input_ids, attention_mask, completion_ids.size(1))
        advantages = inputs["advantages"]  # (B,), or (B, T) from subclasses that give per-token advantages
        per_token = advantages.dim() == 2
        is_weights = None
        if self.use_vllm and self.vllm_importance_sampling_correction:
            is_weights = inputs["importance_sampling_ratio"].expand_as(mask)  # (B, T) or (B, 1) -> (B, T)
        with self._head_context():
            loss, metrics = fused_linear_grpo_loss(
                hidden, weight, completion_ids, None if per_token else advantages, mask,
                inputs.get("old_per_token_logps"), inputs.get("ref_per_token_logps"), self.loss_config,
                is_weights=is_weights, token_advantages=advantages if per_token else None,
                **self._normalizers(inputs, completion_ids.size(0)))
        self._log_loss_metrics(metrics)
        return loss

    def _log_loss_metrics(self, metrics):
        """TRL's names, each a token mean over every process (its global_masked_mean)."""
        names = {"entropy": "entropy"} | ({"kl": "kl"} if self.beta != 0.0 else {})
        if self.loss_type == "cispo":
            names["clip_high"] = "cispo_clip_ratio"
        elif self.loss_type not in ("sapo", "vespo"):
            names |= {"clip_low": "clip_ratio/low_mean", "clip_high": "clip_ratio/high_mean",
                      "clip_region": "clip_ratio/region_mean"}
        tokens = metrics["tokens"]
        sums = torch.stack([metrics[name] * tokens for name in names] + [tokens])
        totals = self.accelerator.reduce(sums, reduction="sum")
        mode = "train" if self.model.training else "eval"
        for trl_name, total in zip(names.values(), (totals[:-1] / totals[-1].clamp(min=1.0)).tolist()):
            self._metrics[mode][trl_name].append(total)
