"""Compile every CUDA-backend translation unit on a machine without a GPU (no link, no load):
``python scripts/compile_check.py [file ...]`` with nvcc and the NCCL headers
(``DEEP_EP_OPS_NCCL_HOME`` or the nvidia-nccl wheel). Objects go to a temporary folder; the
flags and include paths are the JIT build's (deep_ep_ops/cuda/loader.py), with the headers
rendered from Python (deep_ep_ops/codegen) written into that folder as the build does. Headers
the toolkit lacks here (cusparse.h, cublas_v2.h, which ATen/cuda includes) come from the
nvidia-cusparse / nvidia-cublas wheels through ``CPATH``."""
from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from torch.utils import cpp_extension

from deep_ep_ops import codegen
from deep_ep_ops.cuda import loader

# A CPU-only torch finds no CUDA home of its own; nvcc's toolkit has the headers.
cpp_extension.CUDA_HOME = cpp_extension.CUDA_HOME or os.environ.get("CUDA_HOME", "/usr/local/cuda")


def main() -> int:
    src = loader.csrc_dir()
    root = loader.nccl_home()
    cflags, cuda_flags, _ = loader._flags(root)
    out = Path(tempfile.mkdtemp(prefix="deo_cc_"))
    generated = codegen.write_include_root(out / "generated_include")
    includes = cpp_extension.include_paths(device_type="cuda") + [
        sysconfig.get_paths()["include"], str(root / "include"), str(src), str(generated)]
    inc = [f"-I{p}" for p in includes]
    abi = [f"-D_GLIBCXX_USE_CXX11_ABI={int(cpp_extension.torch._C._GLIBCXX_USE_CXX11_ABI)}",
           "-DTORCH_EXTENSION_NAME=compile_check", "-DTORCH_API_INCLUDE_EXTENSION_H"]
    wanted = sys.argv[1:] or loader.sources(src)

    def one(rel: str) -> tuple[str, int, str]:
        path = src / rel
        obj = out / (rel.replace("/", "_") + ".o")
        if path.suffix == ".cu":
            cmd = ["nvcc", "-c", str(path), "-o", str(obj), "-Xptxas", "-v"] + cuda_flags + inc + abi
        else:
            cmd = ["c++", "-c", str(path), "-o", str(obj), "-fPIC", "-Wall"] + cflags + inc + abi
        run = subprocess.run(cmd, capture_output=True, text=True)
        return rel, run.returncode, run.stderr
    failed = 0
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        for rel, rc, err in pool.map(one, wanted):
            spills = [ln for ln in err.splitlines() if "spill" in ln and " 0 bytes spill" not in ln]
            errors = [ln for ln in err.splitlines() if "error" in ln or "warning" in ln.lower()]
            print(f"{'ok  ' if rc == 0 else 'FAIL'} {rel}")
            for ln in (errors if rc else errors[:5]) + spills:
                print("     " + ln)
            failed += rc != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
