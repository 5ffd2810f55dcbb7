"""Package layout only; the metadata lives in pyproject.toml.

CUDA sources ship as package data and are JIT-built on first GPU use (see
deep_ep_ops/cuda/loader.py), so installing needs no compiler.
"""
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
# every folder of csrc/ ships (the JIT build compiles them all; a folder left out here
# breaks an installed, non-editable copy)
CSRC_FOLDERS = sorted(d for d in os.listdir(os.path.join(HERE, "csrc"))
                      if os.path.isdir(os.path.join(HERE, "csrc", d)))

setup(
    packages=find_packages(include=["deep_ep_ops", "deep_ep_ops.*"]) + [
        "deep_ep_ops.meta", "deep_ep_ops.cuda.csrc"],
    # meta/ and csrc/ stay top-level folders of the repository; installed, they become
    # deep_ep_ops.meta and deep_ep_ops/cuda/csrc (where the JIT loader looks for sources).
    package_dir={"deep_ep_ops.meta": "meta", "deep_ep_ops.cuda.csrc": "csrc"},
    package_data={"deep_ep_ops.cuda.csrc": [f"{d}/*" for d in CSRC_FOLDERS]},
)
