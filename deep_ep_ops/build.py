"""Prebuild the CUDA backend: ``python -m deep_ep_ops.build`` (e.g. once per node or image).

Prints the cache folder of the build. Honors the loader's environment variables
(DEEP_EP_OPS_CACHE, DEEP_EP_OPS_CUDA_ARCHS, DEEP_EP_OPS_NCCL_HOME, DEEP_EP_OPS_CSRC).
"""
from __future__ import annotations

import argparse
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quiet", action="store_true", help="do not echo compiler commands")
    args = parser.parse_args()
    from deep_ep_ops.cuda import loader
    start = time.time()
    module = loader.load(verbose=not args.quiet)
    print(f"deep_ep_ops CUDA backend ready: {module.__file__} ({time.time() - start:.1f} s)")


if __name__ == "__main__":
    main()
