"""Renders ``generated/handle_layout.hpp``, the C++ view of deep_ep_ops/handle.py: one
``constexpr int`` per upper-case int constant (``HDR_VALID_ROWS`` -> ``kHdrValidRows``) and
``send_dst_row`` / ``rail_dst_slot`` / ``handle_width`` from handle.py's column terms, all in
``deep_ep_ops::handle``, usable from device code (``DEO_HOST_DEVICE``)."""
from __future__ import annotations

from deep_ep_ops import handle as H

# A comment opens each group of constants (by name prefix), as a reader of the header expects.
_SECTIONS = {
    "HDR": "header (row 0)",
    "SEND": "send part (rows 1 .. T)",
    "RAIL": "rail send part of a multi-host handle (rows 1 .. T; the virtual part, V rows, follows)",
    "RECV": "receive part (the last C rows), per row",
    "GROUP": "receive part, per group",
}


def cpp_name(py_name: str) -> str:
    """HDR_VALID_ROWS -> kHdrValidRows."""
    return "k" + "".join(part.capitalize() for part in py_name.lower().split("_"))


def constants() -> dict[str, int]:
    """handle.py's upper-case int constants, in the order the module defines them."""
    return {name: value for name, value in vars(H).items()
            if name.isupper() and type(value) is int}


def _term(base: int, per_slot: int) -> str:
    """C++ text of ``base + per_slot * num_topk``."""
    slots = {0: "", 1: "num_topk"}.get(per_slot, f"{per_slot} * num_topk")
    if not slots:
        return str(base)
    return slots if base == 0 else f"{base} + {slots}"


def render() -> str:
    lines = [
        "// GENERATED from deep_ep_ops/handle.py (which documents every field) by",
        "// deep_ep_ops/codegen/handle_layout.py; the build writes it, do not edit.",
        "// Column layout of the int32 routing handle [1 + T + V + C, W] (V = 0 on one host).",
        "#pragma once",
        "",
        "// Usable from device code and from host-only C++ (no CUDA headers needed there).",
        '#include "device/shared_types.hpp"  // DEO_HOST_DEVICE',
        "",
        "namespace deep_ep_ops {",
        "namespace handle {",
        "",
    ]
    section = None
    for name, value in constants().items():
        prefix = name.split("_")[0]
        if prefix in _SECTIONS and prefix != section:
            section = prefix
            lines += ["", f"// {_SECTIONS[prefix]}"]
        lines.append(f"constexpr int {cpp_name(name)} = {value};")
    lines += [
        "",
        "DEO_HOST_DEVICE constexpr int send_dst_row(int num_topk) {",
        f"  return {_term(*H.SEND_DST_ROW_TERM)};",
        "}",
        "",
        "DEO_HOST_DEVICE constexpr int rail_dst_slot(int num_topk) {",
        f"  return {_term(*H.RAIL_DST_SLOT_TERM)};",
        "}",
        "",
        "// The widest part of the handle.",
        "DEO_HOST_DEVICE constexpr int handle_width(int num_topk) {",
        f"  int width = {_term(*H.WIDTH_TERMS[0])};",
    ]
    for term in H.WIDTH_TERMS[1:]:
        text = _term(*term)
        lines.append(f"  width = width > {text} ? width : {text};")
    lines += [
        "  return width;",
        "}",
        "",
        "}  // namespace handle",
        "}  // namespace deep_ep_ops",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(), end="")
