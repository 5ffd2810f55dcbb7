"""The C++ kernels and the Python backends read the handle through the same column layout:
csrc/ep/handle_layout.hpp mirrors deep_ep_ops/handle.py name by name."""
from __future__ import annotations

import os
import re

from deep_ep_ops import handle as H

HEADER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc",
                      "ep", "handle_layout.hpp")


def _cpp_name(py_name: str) -> str:
    """HDR_VALID_ROWS -> kHdrValidRows."""
    return "k" + "".join(part.capitalize() for part in py_name.lower().split("_"))


def test_cpp_constants_match_python() -> None:
    cpp = dict((name, int(value)) for name, value in
               re.findall(r"constexpr int (k\w+) = (\d+);", open(HEADER).read()))
    py = {name: value for name, value in vars(H).items()
          if name.isupper() and isinstance(value, int)}
    assert py, "no constants found in deep_ep_ops.handle"
    for name, value in py.items():
        assert cpp.get(_cpp_name(name)) == value, f"{name}: python {value}, C++ " \
            f"{cpp.get(_cpp_name(name))}"
    extra = set(cpp) - {_cpp_name(n) for n in py}
    assert not extra, f"C++ has constants Python lacks: {extra}"

