"""Fake (meta) implementations and the shape functions every backend shares.

Installed as ``deep_ep_ops.meta`` (``setup.py`` maps this folder with ``package_dir``).
"""
