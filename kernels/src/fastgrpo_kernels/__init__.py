"""fastgrpo_kernels: fused GRPO ops in Triton (CUDA) with memory-efficient chunked PyTorch paths elsewhere.

Depends on torch and triton only. Every op takes backend=None ("triton" for CUDA tensors, "torch" otherwise),
or a backend named explicitly.
"""

from .advantages import group_advantages, process_advantages
from .fused_linear import fused_linear_cross_entropy, fused_linear_grpo_loss, fused_linear_logprobs
from .grpo_loss import GRPOLossConfig, grpo_loss, rollout_is_weights, truncated_is_weights
from .logprobs import selective_logprobs

__version__ = "0.1.0"

__all__ = [
    "GRPOLossConfig",
    "fused_linear_cross_entropy",
    "fused_linear_grpo_loss",
    "fused_linear_logprobs",
    "grpo_loss",
    "group_advantages",
    "process_advantages",
    "rollout_is_weights",
    "selective_logprobs",
    "truncated_is_weights",
]
