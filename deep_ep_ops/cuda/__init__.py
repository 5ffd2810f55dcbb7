"""CUDA backend of deep_ep_ops, JIT-built from csrc/ on first use (``loader``, ``extension``):
``transport`` picks the peer memory, ``ep`` glues dispatch / cached_dispatch / combine,
``channels`` pp / cp / engram. Importing this package compiles and loads nothing."""
