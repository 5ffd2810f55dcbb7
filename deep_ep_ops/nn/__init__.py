"""Layers built on the deep_ep ops."""
from deep_ep_ops.nn.hf import (HFExpertParallelBlock, allreduce_replicated_grads,
                               replicated_parameters, shard_moe_blocks)
from deep_ep_ops.nn.moe import (ExpertParallelMoE, LocalExperts, StackedGLUExperts, TopKRouter,
                                dequantize_fp8, is_expert_parameter, quantize_fp8)

__all__ = ["ExpertParallelMoE", "LocalExperts", "StackedGLUExperts", "TopKRouter",
           "HFExpertParallelBlock", "shard_moe_blocks", "allreduce_replicated_grads",
           "replicated_parameters", "is_expert_parameter", "quantize_fp8", "dequantize_fp8"]
