"""The loaded CUDA extension (``loader.load()`` JIT-builds it on first use) and the steps that
must follow its loading, in order: the registry's C++ copy is attached, then the layers above
(ops.py: the C++ kernels replace the Python ones) run the hooks they registered. Hooks are how
an upper layer reacts to the load without this package importing it."""
from __future__ import annotations

import threading
from types import ModuleType
from typing import Callable, Optional

from deep_ep_ops import registry
from deep_ep_ops.cuda import loader

_ext: Optional[ModuleType] = None
_hooks: list[Callable[[ModuleType], None]] = []
_LOCK = threading.RLock()


def on_load(hook: Callable[[ModuleType], None]) -> None:
    """Call ``hook(ext)`` once the extension is loaded (at once if it already is)."""
    with _LOCK:
        _hooks.append(hook)
        if _ext is not None:
            hook(_ext)


def module() -> ModuleType:
    """The extension, loading (and building) it first if needed."""
    global _ext
    if _ext is not None:
        return _ext
    with _LOCK:
        if _ext is None:
            ext = loader.load()
            registry.attach_kernel_table(ext)
            for hook in _hooks:
                hook(ext)
            _ext = ext
    return _ext


def loaded() -> Optional[ModuleType]:
    """The extension if it is loaded, else None (never loads it)."""
    return _ext
