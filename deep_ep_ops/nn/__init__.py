"""Layers built on the deep_ep ops."""
from deep_ep_ops.nn.moe import ExpertParallelMoE, LocalExperts, TopKRouter

__all__ = ["ExpertParallelMoE", "LocalExperts", "TopKRouter"]
