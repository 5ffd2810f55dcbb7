"""The C++ kernels read the handle through generated/handle_layout.hpp, rendered from
deep_ep_ops/handle.py (deep_ep_ops/codegen/handle_layout.py): the rendered header compiles and
every constant and formula in it equals handle.py's (static_asserts checked by the compiler)."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from deep_ep_ops import codegen
from deep_ep_ops import handle as H
from deep_ep_ops.codegen import handle_layout
from deep_ep_ops.cuda.loader import csrc_dir

KS = range(0, 65)  # every topk the formulas may see (kMaxTopk = 32), and more


def _program() -> str:
    lines = ['#include "generated/handle_layout.hpp"', "namespace h = deep_ep_ops::handle;"]
    for name, value in handle_layout.constants().items():
        lines.append(f'static_assert(h::{handle_layout.cpp_name(name)} == {value}, "{name}");')
    for k in KS:
        lines.append(f'static_assert(h::send_dst_row({k}) == {H.send_dst_row(k)}, '
                     f'"send_dst_row({k})");')
        lines.append(f'static_assert(h::rail_dst_slot({k}) == {H.rail_dst_slot(k)}, '
                     f'"rail_dst_slot({k})");')
        lines.append(f'static_assert(h::handle_width({k}) == {H.handle_width(k)}, '
                     f'"handle_width({k})");')
    return "\n".join(lines) + "\nint main() { return 0; }\n"


@pytest.mark.skipif(shutil.which("c++") is None, reason="needs a C++ compiler")
def test_generated_header_compiles_and_equals_handle_py(tmp_path: Path) -> None:
    root = codegen.write_include_root(tmp_path / "include")
    (tmp_path / "check.cpp").write_text(_program())
    run = subprocess.run(["c++", "-std=c++20", "-fsyntax-only", "-Wall", "-Werror",
                          f"-I{root}", f"-I{csrc_dir()}", str(tmp_path / "check.cpp")],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def test_every_constant_is_rendered_once() -> None:
    text = handle_layout.render()
    rendered = re.findall(r"constexpr int (k\w+) = ", text)
    assert sorted(rendered) == sorted(handle_layout.cpp_name(n) for n in handle_layout.constants())
    assert len(handle_layout.constants()) >= 20, "constants of deep_ep_ops.handle not found"


def test_formulas_are_the_documented_ones() -> None:
    """W = max(1 + 2K, 7 + K, 11) (docs/contract.md) and the destination rows after the K
    destination ranks."""
    for k in KS:
        assert H.handle_width(k) == max(1 + 2 * k, H.GROUP_MEMBER + k, H.NUM_HEADER_FIELDS)
        assert H.send_dst_row(k) == H.SEND_DST_RANK + k
        assert H.rail_dst_slot(k) == H.RAIL_DST_HOST + k
