#!/usr/bin/env bash
# One device call's worth of checks after a kernel change, each step with its own time limit so
# one stuck step cannot eat the call: the bitwise suites of the EP kernels, then the R = 2
# benchmark with direct outputs and zero-copy combine, then the per-kernel profile. Logs and
# bench results go under $OUT (the device tool brings them back). Run it through gpu_run.sh so
# the build cache comes back too:
#   scripts/gpu_run.sh scripts/device_batch.sh [verify] [bench] [grid] [fused] [before] [base] [probes] [profile] [timeline] [knobs] [suites_a] [ep_rest] [comm] [suites_b] [regs] [bulk]
# (default: verify bench profile; suites_a / suites_b: the other GPU tests, all R, in two
# calls' worth, suites_a being ep_rest then comm; regs: the R = 2-4 bitwise suites and the
# bench again with DEEP_EP_OPS_COMBINE_SMEM=0, the combine reduce's register path, for an A/B;
# bulk: the same with DEEP_EP_OPS_BULK_COPY=1, rows of the dispatch and combine pushes by bulk
# copies).
# KIND labels the bench results (default nvidia-h200-x1; bench_ep appends -R2-2pergpu). The
# logs come back as one archive, logs-<time>-<pid>.tgz.
set -o pipefail
out="${OUT:-/tmp/device_batch}"
mkdir -p "$out/logs" "$out/bench"
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(verify bench profile)

step() {  # name, limit (s), command...
  local name=$1 limit=$2
  shift 2
  timeout "$limit" "$@" > "$out/logs/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc=$rc ($( [ $rc -eq 124 ] && echo "stopped at ${limit} s" || echo done))"
  # the summary lines, without the stack frames of a failing rank
  grep -v "^frame\|^  File\|^E   *File\|^E     " "$out/logs/$name.log" | grep "passed\|failed\|skipped\|FAILED\|Error\|^| " | tail -30
}

# the R = 2 benchmark: prefill with direct outputs and zero-copy combine beside the plain calls
bench_args=(--ranks 2 --ranks-per-gpu 2 --no-sweeps --direct-outputs 2 --zero-copy-combine
            --kind "${KIND:-nvidia-h200-x1}")

ab() {  # name, VAR=value, test files...: their bitwise suites at R = 2-4, then the bench, with VAR=value
  local name=$1 setting=$2
  shift 2
  mkdir -p "$out/bench_$name"
  step "${name}_verify" 240 env "$setting" python3 -m pytest -q -rfE --tb=short --timeout 150 \
    "$@" -k "bitwise and (2 or 3 or 4)"
  step "${name}_bench" 240 env "$setting" python3 -m bench.bench_ep "${bench_args[@]}" \
    --out "$out/bench_$name"
}

comm_step() {  # pp / cp / engram, the errors (the spanning-host ValueError among them), the transports
  step comm 330 python3 -m pytest -q -rfE --tb=short --timeout 200 \
    tests/gpu/test_comm_ops_gpu.py tests/gpu/test_errors_gpu.py tests/gpu/test_transport_gpu.py
}

for s in "${steps[@]}"; do
  case $s in
    verify)
      step verify 300 python3 -m pytest -q -rfE --tb=short --timeout 200 \
        tests/gpu/test_moe_ops_gpu.py tests/gpu/test_combine_input_gpu.py \
        tests/gpu/test_direct_outputs_gpu.py -k "bitwise and not 8" ;;
    bench)
      step bench 240 python3 -m bench.bench_ep "${bench_args[@]}" --out "$out/bench" ;;
    profile)
      DEEP_EP_OPS_PDL=0 step profile 200 python3 tests/gpu/bench_moe_ops.py --world 2 \
        --num-sms 0 24 --profile --direct-outputs 2 --zero-copy-combine ;;
    timeline)  # when each dispatch phase ran on each rank (the GPU's clock), default then bulk
      step timeline 200 python3 tests/gpu/bench_moe_ops.py --world 2 --num-sms 0 24 --iters 9 \
        --timeline --direct-outputs 2
      step timeline_bulk 200 env DEEP_EP_OPS_BULK_COPY=1 python3 tests/gpu/bench_moe_ops.py \
        --world 2 --num-sms 0 24 --iters 9 --timeline --direct-outputs 2 ;;
    knobs)  # the dispatch timeline with each tuning knob against the default (lone calls);
      # KNOBS="VAR=value ..." picks some
      default_knobs="DEEP_EP_OPS_NONE=0 DEEP_EP_OPS_BLOCK_WORDS=0 DEEP_EP_OPS_DISPATCH_FUSED=1
        DEEP_EP_OPS_PUSH_PIPELINE=0 DEEP_EP_OPS_PUSH_PREFETCH=1 DEEP_EP_OPS_PUSH_SKIP=1
        DEEP_EP_OPS_PUSH_SKIP=3 DEEP_EP_OPS_PUSH_SKIP=16 DEEP_EP_OPS_PUSH_SKIP=32 DEEP_EP_OPS_PUSH_SKIP=64"
      for setting in ${KNOBS:-$default_knobs}; do
        step "knob_${setting//[=]/_}" 120 env "$setting" python3 tests/gpu/bench_moe_ops.py \
          --world 2 --num-sms 0 24 --iters 7 --timeline-only --direct-outputs 2
      done ;;
    comm)
      comm_step ;;
    suites_a | ep_rest)  # the EP tests that are not bitwise (graph replay, stalled peer), then pp / cp / engram
      step ep_rest 200 python3 -m pytest -q -rfE --tb=short --timeout 200 \
        tests/gpu/test_moe_ops_gpu.py tests/gpu/test_combine_input_gpu.py \
        tests/gpu/test_direct_outputs_gpu.py -k "not bitwise"
      [ "$s" = ep_rest ] && continue
      comm_step ;;
    suites_b)  # multi-host simulation, autograd, compile, the nn layer
      step layers 540 python3 -m pytest -q -rfE --tb=short --timeout 200 \
        tests/gpu/test_multihost_gpu.py tests/gpu/test_interhost_gpu.py \
        tests/gpu/test_autograd_gpu.py tests/gpu/test_compile_gpu.py tests/gpu/test_nn_gpu.py ;;
    probes)  # the standalone probes (bench/probes): fan-out copy, push skeleton, IPC under MPS, the count
      for probe in row_fanout_rate push_skeleton ipc_fanout_rate count_phase; do
        nvcc -O3 -arch=sm_90 -o "/tmp/$probe" "bench/probes/$probe.cu" || continue
      done
      step probe_rows 60 /tmp/row_fanout_rate
      step probe_skeleton 120 /tmp/push_skeleton
      step probe_count 60 /tmp/count_phase
      step probe_ipc 120 python3 -c "
import os, subprocess
from deep_ep_ops.local_ranks import mps_daemon
with mps_daemon() as env:
    os.environ.update(env)
    for n in ('24', '66'):
        subprocess.run(['/tmp/ipc_fanout_rate', n], timeout=50, check=True)
"
      cat "$out"/logs/probe_*.log ;;
    fused)  # the fused compact push (an experiment): its bitwise suites at R = 2-4, then the R = 2 bench
      ab fused DEEP_EP_OPS_DISPATCH_FUSED=1 tests/gpu/test_moe_ops_gpu.py \
        tests/gpu/test_direct_outputs_gpu.py ;;
    grid)  # the R = 2 bench with other automatic grids for the dispatch push and the combine
      for setting in ${GRIDS:-DEEP_EP_OPS_COMBINE_GRID_PCT=75 DEEP_EP_OPS_COMBINE_GRID_PCT=50 \
                     DEEP_EP_OPS_DISPATCH_GRID_PCT=60 DEEP_EP_OPS_DISPATCH_GRID_PCT=90}; do
        mkdir -p "$out/bench_${setting//[=]/_}"
        step "bench_${setting//[=]/_}" 120 env "$setting" python3 -m bench.bench_ep \
          "${bench_args[@]}" --out "$out/bench_${setting//[=]/_}"
      done ;;
    before)  # the R = 2 bench with the general push loop (the loop of before v14)
      mkdir -p "$out/bench_before"
      step bench_before 240 env DEEP_EP_OPS_PUSH_PIPELINE=0 \
        python3 -m bench.bench_ep "${bench_args[@]}" --out "$out/bench_before" ;;
    base)  # the R = 2 bench and lone-call timeline on another csrc tree, for an A/B of two builds
      # in one call: BASE_CSRC, e.g. `git archive <commit> csrc | tar -x -C base` in the repo
      # root (untracked, so it travels) and BASE_CSRC=base/csrc; it builds once more (~40 s)
      if [ ! -f "${BASE_CSRC:-}/torch/module.cpp" ]; then echo "base: set BASE_CSRC to a csrc tree"; continue; fi
      mkdir -p "$out/bench_base"
      step bench_base 300 env DEEP_EP_OPS_CSRC="$BASE_CSRC" python3 -m bench.bench_ep "${bench_args[@]}" \
        --out "$out/bench_base"
      step timeline_base 150 env DEEP_EP_OPS_CSRC="$BASE_CSRC" python3 tests/gpu/bench_moe_ops.py \
        --world 2 --num-sms 0 24 --iters 7 --timeline-only --direct-outputs 2 ;;
    regs)
      ab regs DEEP_EP_OPS_COMBINE_SMEM=0 tests/gpu/test_moe_ops_gpu.py \
        tests/gpu/test_combine_input_gpu.py ;;
    bulk)
      ab bulk DEEP_EP_OPS_BULK_COPY=1 tests/gpu/test_moe_ops_gpu.py \
        tests/gpu/test_direct_outputs_gpu.py tests/gpu/test_combine_input_gpu.py ;;
    *) echo "unknown step $s (verify, bench, grid, fused, before, base, probes, profile, timeline, knobs, ep_rest, comm, suites_a, suites_b, regs, bulk)"; exit 2 ;;
  esac
done
# One archive per run (the device tool brings back a limited number of files, and a call may run
# this script more than once into the same $OUT).
(cd "$out" && tar czf "logs-$(date +%H%M%S)-$$.tgz" logs && rm -rf logs)
