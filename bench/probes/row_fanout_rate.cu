// Probe: how fast can G SMs read rows once and store each to two places, with no routing work?
// The question behind it (bench/NOTES.md v14): at R = 2 the dispatch push reads 30 MB and
// writes 60 MB per rank, and at 24 SMs per rank its rows take ~80 us (~47 GB/s per SM) however
// the push hides its latency. Is that the SMs' limit for this traffic, or the push's?
//
// Both ranks' traffic runs in one process: 2 sources of T rows, each row stored to 2 places,
// over G CTAs (G = 2 x the per-rank SM count). Variants:
//   regs<W>: warp per row, the row held in registers (14 x 16 bytes per lane at H = 7168),
//            W warps per CTA (the push today: 16)
//   bulk<S>: one thread per CTA drives a ring of S row buffers in shared memory by bulk copies
//            (one bulk load per row, two bulk stores), up to S rows in flight per SM
// Build and run (device): nvcc -O3 -arch=sm_90 -o /tmp/probe bench/probes/row_fanout_rate.cu && /tmp/probe
#include <vector>

#include "probe_common.cuh"

struct Job {
  const char* src;  // [rows][kRowBytes]
  char* dst0;       // [rows][kRowBytes]
  char* dst1;
  int rows;
};

template <int W>
__global__ void __launch_bounds__(W * 32, 1) regs_fanout(Job j) {
  const int lane = threadIdx.x & 31;
  const int gw = blockIdx.x * W + threadIdx.x / 32, nw = gridDim.x * W;
  for (int r = gw; r < j.rows; r += nw) {
    const int4* s = reinterpret_cast<const int4*>(j.src + static_cast<long long>(r) * kRowBytes);
    int4* d0 = reinterpret_cast<int4*>(j.dst0 + static_cast<long long>(r) * kRowBytes);
    int4* d1 = reinterpret_cast<int4*>(j.dst1 + static_cast<long long>(r) * kRowBytes);
    int4 v[kVecPerLane];
#pragma unroll
    for (int i = 0; i < kVecPerLane; ++i) v[i] = __ldg(s + i * 32 + lane);
#pragma unroll
    for (int i = 0; i < kVecPerLane; ++i) {
      d0[i * 32 + lane] = v[i];
      d1[i * 32 + lane] = v[i];
    }
  }
}

__device__ __forceinline__ unsigned su32(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// Rows r = blockIdx.x + i * gridDim.x; thread 0 keeps S loads / store pairs in flight.
template <int S>
__global__ void __launch_bounds__(32, 1) bulk_fanout(Job j) {
  extern __shared__ __align__(128) char ring[];
  __shared__ __align__(8) unsigned long long bars[S];
  if (threadIdx.x != 0) return;
  for (int k = 0; k < S; ++k) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(su32(&bars[k])) : "memory");
  }
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
  const int n = j.rows > static_cast<int>(blockIdx.x)
                    ? (j.rows - 1 - static_cast<int>(blockIdx.x)) / gridDim.x + 1
                    : 0;
  auto row_of = [&](int i) { return static_cast<long long>(blockIdx.x) + static_cast<long long>(i) * gridDim.x; };
  auto load = [&](int i) {
    const int k = i % S;
    const unsigned bar = su32(&bars[k]), buf = su32(ring + k * kRowBytes);
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(kRowBytes) : "memory");
    asm volatile(
        "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(buf),
        "l"(j.src + row_of(i) * kRowBytes), "r"(kRowBytes), "r"(bar)
        : "memory");
  };
  const int pre = n < S ? n : S;
  for (int i = 0; i < pre; ++i) load(i);
  for (int i = 0; i < n; ++i) {
    const int k = i % S;
    const unsigned bar = su32(&bars[k]), buf = su32(ring + k * kRowBytes);
    const unsigned parity = (i / S) & 1u;
    unsigned done = 0;
    while (!done) {
      asm volatile(
          "{\n\t.reg .pred p;\n\tmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n\t"
          "selp.u32 %0, 1, 0, p;\n\t}"
          : "=r"(done)
          : "r"(bar), "r"(parity)
          : "memory");
    }
    asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(j.dst0 + row_of(i) * kRowBytes),
                 "r"(buf), "r"(kRowBytes)
                 : "memory");
    asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(j.dst1 + row_of(i) * kRowBytes),
                 "r"(buf), "r"(kRowBytes)
                 : "memory");
    asm volatile("cp.async.bulk.commit_group;" ::: "memory");
    // row i - L's stores have read its slot (at most L newer groups pending): reload the slot
    // with row i - L + S (issued L iterations before it is stored, L < S)
    constexpr int L = S / 2;
    if (i >= L && i - L + S < n) {
      asm volatile("cp.async.bulk.wait_group.read %0;" ::"n"(L) : "memory");
      load(i - L + S);
    }
  }
  asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
}

template <typename F>
float time_us(F launch, int reps) {
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  for (int i = 0; i < 3; ++i) launch();
  CK(cudaEventRecord(a));
  for (int i = 0; i < reps; ++i) launch();
  CK(cudaEventRecord(b));
  CK(cudaEventSynchronize(b));
  float ms = 0;
  CK(cudaEventElapsedTime(&ms, a, b));
  CK(cudaGetLastError());
  return ms * 1000.f / reps;
}

int main() {
  const int T = 4096, ranks = 2;
  const long long bytes = static_cast<long long>(ranks) * T * kRowBytes;  // both sources
  char *src, *d0, *d1;
  CK(cudaMalloc(&src, bytes));
  CK(cudaMalloc(&d0, bytes));
  CK(cudaMalloc(&d1, bytes));
  CK(cudaMemset(src, 7, bytes));
  Job j{src, d0, d1, ranks * T};
  const double moved_mb = 3.0 * bytes / 1e6;
  std::printf("rows %d x %d bytes from %d sources, each stored twice: %.1f MB read, %.1f MB written\n",
              ranks * T, kRowBytes, ranks, bytes / 1e6, 2.0 * bytes / 1e6);
  const int reps = 20;
  {
    const float us = time_us([&] { CK(cudaMemcpyAsync(d0, src, bytes, cudaMemcpyDeviceToDevice)); CK(cudaMemcpyAsync(d1, src, bytes, cudaMemcpyDeviceToDevice)); }, reps);
    std::printf("%-10s %4s %9.1f us  %5.2f TB/s\n", "memcpy x2", "-", us, moved_mb / us);
  }
  const std::vector<int> grids = {48, 66, 96, 132};
  auto smem_for = [](int s) { return s * kRowBytes; };
  CK(cudaFuncSetAttribute(bulk_fanout<8>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_for(8)));
  CK(cudaFuncSetAttribute(bulk_fanout<16>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_for(16)));
  CK(cudaFuncSetAttribute(bulk_fanout<28>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_for(28)));
  for (int g : grids) {
    const auto report = [&](const char* name, float us) {
      // MB per us = TB/s (bytes read + written)
      std::printf("%-10s %4d %9.1f us  %5.2f TB/s total  %6.1f GB/s per SM\n", name, g, us,
                  moved_mb / us, moved_mb / us * 1e3 / g);
    };
    report("regs16", time_us([&] { regs_fanout<16><<<g, 512>>>(j); }, reps));
    report("regs32", time_us([&] { regs_fanout<32><<<g, 1024>>>(j); }, reps));
    report("bulk8", time_us([&] { bulk_fanout<8><<<g, 32, smem_for(8)>>>(j); }, reps));
    report("bulk16", time_us([&] { bulk_fanout<16><<<g, 32, smem_for(16)>>>(j); }, reps));
    report("bulk28", time_us([&] { bulk_fanout<28><<<g, 32, smem_for(28)>>>(j); }, reps));
  }
  // check: the last variant's stores are the source bytes
  std::vector<char> h(kRowBytes);
  CK(cudaMemcpy(h.data(), d1 + bytes - kRowBytes, kRowBytes, cudaMemcpyDeviceToHost));
  for (char c : h)
    if (c != 7) {
      std::printf("MISMATCH\n");
      return 1;
    }
  std::printf("check ok\n");
  return 0;
}
