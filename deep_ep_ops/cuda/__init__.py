"""CUDA backend of deep_ep_ops: JIT-built from csrc/ on first use (see ``loader``).

Importing this package compiles and loads nothing; ``backend`` builds on its first call.
"""
