#!/usr/bin/env bash
# Device-machine entry point: install the package (editable, offline), build the CUDA backend
# into a cache that can be carried between runs, then run the given command (default: the GPU
# tests). Usage: scripts/gpu_run.sh [command ...]
set -o pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1
export DEEP_EP_OPS_CACHE="${DEEP_EP_OPS_CACHE:-$PWD/.jitcache}"
# Import the source tree as is (no install): repo root on the path, deep_ep_ops.meta -> meta/.
export DEEP_EP_OPS_ROOT="$PWD" PYTHONPATH="$PWD:$PWD/scripts/site:$PYTHONPATH"
python3 -m deep_ep_ops.build --quiet || exit 1
if [ $# -eq 0 ]; then set -- python3 -m pytest -q -x tests/gpu/test_moe_ops_gpu.py; fi
"$@"
rc=$?
# Bring the build back (only the module and its marker are needed to skip the rebuild).
if [ -n "$OUT" ]; then
  (cd "$DEEP_EP_OPS_CACHE" && tar czf "$OUT/jitcache.tgz" */*.so */.complete 2>/dev/null)
fi
exit $rc
