"""JIT build of the CUDA backend (``csrc/``) with ``torch.utils.cpp_extension.load`` (ninja).

* Sources: ``$DEEP_EP_OPS_CSRC``, else ``deep_ep_ops/cuda/csrc`` (package data of an installed
  wheel), else ``csrc/`` of the source tree; plus the headers rendered from Python
  (deep_ep_ops/codegen), written to ``<build folder>/generated_include/generated/``.
* Cache: ``$DEEP_EP_OPS_CACHE`` (default ``~/.cache/deep_ep_ops``), one folder per hash of the
  sources (generated headers included), torch version, CUDA version, NCCL version, target
  arches and flags.
* One build per node at a time: an ``fcntl.flock`` on ``<cache>/<name>.lock``. The kernel drops
  the lock when its holder dies, so a killed build never blocks later ones (torch's own
  ``lock`` file inside the build folder, which can go stale, is removed while we hold ours).
* NCCL: headers and ``libnccl.so.2`` of the nvidia-nccl-cu13/-cu12 wheel torch loads
  (``$DEEP_EP_OPS_NCCL_HOME`` overrides), linked as ``-l:libnccl.so.2`` with an rpath. Without
  ``nccl_device.h`` (NCCL < 2.28) the build has only the CUDA IPC transport.
* Arches: ``$DEEP_EP_OPS_CUDA_ARCHS`` (``;`` or ``,`` separated, default ``90``), e.g. ``90;100``.
"""
from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import os
import re
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import Optional

from deep_ep_ops import codegen

_MODULE: Optional[ModuleType] = None
_LOCK = threading.Lock()



def sources(src: Path) -> list[str]:
    """Every translation unit under ``src`` (each folder of csrc/), relative paths."""
    return sorted(str(p.relative_to(src)) for p in src.rglob("*") if p.suffix in (".cu", ".cpp"))


def csrc_dir() -> Path:
    env = os.environ.get("DEEP_EP_OPS_CSRC")
    candidates = [Path(env)] if env else []
    here = Path(__file__).resolve().parent
    candidates += [here / "csrc", here.parent.parent / "csrc"]
    for c in candidates:
        if (c / "torch" / "module.cpp").is_file():
            return c
    raise RuntimeError("deep_ep_ops: CUDA sources not found (looked in "
                       f"{[str(c) for c in candidates]}); set DEEP_EP_OPS_CSRC")


def nccl_home() -> Path:
    env = os.environ.get("DEEP_EP_OPS_NCCL_HOME")
    if env:
        roots = [Path(env)]
    else:
        try:
            import nvidia.nccl as nccl_pkg  # namespace package of the nvidia-nccl-cu* wheel
        except ImportError as exc:
            raise RuntimeError("deep_ep_ops: NCCL headers not found: install the "
                               "nvidia-nccl-cu13 (or -cu12) wheel matching torch, or set "
                               "DEEP_EP_OPS_NCCL_HOME") from exc
        roots = [Path(p) for p in nccl_pkg.__path__]
    for root in roots:
        if (root / "include" / "nccl.h").is_file():
            return root
    raise RuntimeError(f"deep_ep_ops: no include/nccl.h under {roots}")


def nccl_version_code(root: Path) -> int:
    text = (root / "include" / "nccl.h").read_text()
    m = re.search(r"#define\s+NCCL_VERSION_CODE\s+(\d+)", text)
    if not m:
        raise RuntimeError(f"deep_ep_ops: cannot read NCCL_VERSION_CODE from {root}/include/nccl.h")
    return int(m.group(1))


def cuda_arches() -> list[str]:
    raw = os.environ.get("DEEP_EP_OPS_CUDA_ARCHS", "90")
    return [a.strip() for a in re.split(r"[;, ]+", raw) if a.strip()]


def _flags(root: Path) -> tuple[list[str], list[str], list[str]]:
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in cuda_arches()]
    # torch >= 2.10 builds itself and its extensions as C++20; the headers assume it.
    cflags = ["-O3", "-std=c++20"]
    cuda_flags = ["-O3", "-std=c++20", "-lineinfo", "--expt-relaxed-constexpr"] + gencode
    lib = root / "lib"
    ldflags = [f"-L{lib}", "-l:libnccl.so.2", f"-Wl,-rpath,{lib}"]
    return cflags, cuda_flags, ldflags


def build_key() -> tuple[str, Path, Path]:
    """(hash, csrc dir, nccl root) of the build the current environment asks for."""
    import torch
    src = csrc_dir()
    root = nccl_home()
    h = hashlib.sha256()
    for path in sorted(p for p in src.rglob("*") if p.is_file() and p.suffix in
                       (".cu", ".cuh", ".cpp", ".hpp", ".h")):
        h.update(str(path.relative_to(src)).encode())
        h.update(path.read_bytes())
    for name, text in sorted(codegen.render_all().items()):
        h.update(f"{codegen.SUBDIR}/{name}".encode())
        h.update(text.encode())
    cflags, cuda_flags, ldflags = _flags(root)
    for part in (torch.__version__, str(torch.version.cuda), str(nccl_version_code(root)),
                 sys.version.split()[0], " ".join(cflags + cuda_flags + ldflags)):
        h.update(part.encode())
    return h.hexdigest()[:16], src, root


def cache_dir() -> Path:
    return Path(os.environ.get("DEEP_EP_OPS_CACHE",
                               os.path.join(os.path.expanduser("~"), ".cache", "deep_ep_ops")))


def _import_built(name: str, build_dir: Path) -> Optional[ModuleType]:
    marker = build_dir / ".complete"
    so = build_dir / f"{name}.so"
    if not (marker.is_file() and so.is_file()):
        return None
    spec = importlib.util.spec_from_file_location(name, so)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load(verbose: Optional[bool] = None) -> ModuleType:
    """The compiled backend module, building it first if this environment has no build."""
    global _MODULE
    if _MODULE is not None:
        return _MODULE
    with _LOCK:
        if _MODULE is not None:
            return _MODULE
        key, src, root = build_key()
        name = f"deep_ep_ops_cuda_{key}"
        base = cache_dir()
        build_dir = base / name
        module = _import_built(name, build_dir)
        if module is None:
            base.mkdir(parents=True, exist_ok=True)
            with open(base / f"{name}.lock", "w") as lock_file:
                fcntl.flock(lock_file, fcntl.LOCK_EX)  # released by the kernel if we die
                try:
                    module = _import_built(name, build_dir)  # another process built it
                    if module is None:
                        module = _build(name, build_dir, src, root, verbose)
                finally:
                    fcntl.flock(lock_file, fcntl.LOCK_UN)
        _MODULE = module
        return module


def _build(name: str, build_dir: Path, src: Path, root: Path,
           verbose: Optional[bool]) -> ModuleType:
    from torch.utils import cpp_extension
    build_dir.mkdir(parents=True, exist_ok=True)
    stale = build_dir / "lock"  # torch's FileBaton; only a dead build leaves it behind here
    if stale.exists():
        stale.unlink()
    if verbose is None:
        verbose = os.environ.get("DEEP_EP_OPS_VERBOSE_BUILD", "0") == "1"
    cflags, cuda_flags, ldflags = _flags(root)
    generated = codegen.write_include_root(build_dir / "generated_include")
    module = cpp_extension.load(
        name=name,
        sources=[str(src / s) for s in sources(src)],
        extra_cflags=cflags,
        extra_cuda_cflags=cuda_flags,
        extra_ldflags=ldflags,
        extra_include_paths=[str(root / "include"), str(src), str(generated)],
        build_directory=str(build_dir),
        verbose=verbose,
        with_cuda=True,
        is_python_module=True,
    )
    (build_dir / ".complete").write_text("ok\n")
    return module
