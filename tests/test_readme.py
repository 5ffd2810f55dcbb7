"""The README's MoE example runs (compiled, forward and backward) on 2 gloo ranks."""
from __future__ import annotations

import os
import re

import torch

from tests.dist_utils import run_ranks

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _example_source() -> str:
    text = open(README).read()
    block = re.search(r"## An MoE layer in 20 lines\n\n```python\n(.*?)```", text, re.S).group(1)
    assert len(block.strip().splitlines()) <= 22, "the README example grew past 20 lines"
    # the test harness has already initialised the process group
    return block.replace('dist.init_process_group("gloo")', "pass")


def _body(rank: int, R: int, source: str) -> None:
    scope: dict = {}
    exec(compile(source, README, "exec"), scope)
    moe, buf = scope["moe"], scope["buf"]
    x = torch.randn(16, buf.hidden, requires_grad=True)
    y = moe(x)
    y.square().sum().backward()
    assert y.shape == x.shape and x.grad is not None and torch.isfinite(x.grad).all()
    assert moe.router.weight.grad is not None  # the router learns through topk_weights
    buf.destroy()


def test_readme_example_runs() -> None:
    run_ranks(_body, 2, _example_source())
