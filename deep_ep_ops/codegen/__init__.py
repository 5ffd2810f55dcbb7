"""C++ headers rendered from Python, for the rules Python and C++ must agree on.

Python holds the one source; the C++ build includes a rendering of it, never a hand-kept copy.
Each header is ``generated/<name>`` under an include root that the build adds to its include
path: the JIT build (deep_ep_ops/cuda/loader.py) writes it into its build folder,
scripts/compile_check.py into its temporary folder, the CPU tests into theirs. csrc/ has no copy
and includes them as ``"generated/<name>"``.

py_checks.py and py_autograd.py render the same tables as Python functions instead (the checks
of ep_checks.py, the autograd kernels of ep_autograd.py), which deep_ep_ops/validation.py and
deep_ep_ops/autograd.py compile at import; no file is written.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

SUBDIR = "generated"


def render_all() -> dict[str, str]:
    """Every generated header: file name -> text."""
    from deep_ep_ops.codegen import ep_autograd, ep_checks, handle_layout
    return {"handle_layout.hpp": handle_layout.render(), "ep_checks.hpp": ep_checks.render(),
            "ep_autograd_formulas.hpp": ep_autograd.render()}


def write_include_root(root: Path, texts: dict[str, str] | None = None) -> Path:
    """Write the headers (``texts``, default ``render_all()``) to ``root/generated/`` and return
    ``root``, the folder to add to the include path.

    A file whose text is already there is left untouched (its mtime too, so ninja does not
    rebuild); a changed one is replaced atomically (several processes may write one root)."""
    folder = Path(root) / SUBDIR
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in (render_all() if texts is None else texts).items():
        path = folder / name
        if path.is_file() and path.read_text() == text:
            continue
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    return Path(root)
