"""The README's MoE example runs (compiled, forward and backward) on 2 gloo ranks."""
from __future__ import annotations

import os
import re

from tests.dist_utils import run_ranks

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _example_source() -> str:
    text = open(README).read()
    block = re.search(r"## An MoE layer in 25 lines\n.*?```python\n(.*?)```", text,
                      re.S).group(1)
    assert len(block.strip().splitlines()) <= 30, "the README example grew past 25 lines"
    # the test harness owns the process group
    return block.replace('dist.init_process_group("gloo")', "pass").replace(
        "dist.destroy_process_group()", "pass")


def _body(rank: int, R: int, source: str) -> None:
    scope: dict = {}
    exec(compile(source, README, "exec"), scope)
    assert scope["moe"].router.weight.grad is not None  # the router learns through topk_weights


def test_readme_example_runs() -> None:
    run_ranks(_body, 2, _example_source())
