"""Builds a CPU-only torch extension from files of csrc/ and a test module of tests/csrc/, the
way the JIT build compiles them: csrc/ and the rendered generated/ headers on the include path
(deep_ep_ops.codegen). Used by the tests that check C++ code without CUDA."""
from __future__ import annotations

from pathlib import Path
from types import ModuleType

from torch.utils.cpp_extension import load

TEST_CSRC = Path(__file__).resolve().parent / "csrc"


def build_cpu_extension(name: str, csrc_files: list[str], test_module: str,
                        opt: str = "-O1") -> ModuleType:
    """Builds (or reuses) extension ``name`` from ``csrc_files`` (paths relative to csrc/) and
    ``tests/csrc/<test_module>``."""
    from deep_ep_ops import codegen
    from deep_ep_ops.cuda.loader import cache_dir, csrc_dir
    src = csrc_dir()
    # A fixed folder per extension: torch's extension cache keys on the include paths, ninja on
    # the header texts (write_include_root leaves unchanged ones untouched), so reruns reuse
    # the build.
    generated = codegen.write_include_root(cache_dir() / f"{name}_generated_include")
    return load(name=name, sources=[str(src / f) for f in csrc_files] + [str(TEST_CSRC / test_module)],
                extra_cflags=[opt, "-std=c++20"], extra_include_paths=[str(src), str(generated)],
                verbose=False)
