// Probe: the dispatch's count (csrc/ep/layout_phases.cuh count_block) alone, in one process.
// bench/NOTES.md v15: inside the real layout kernel at R = 2 / 24 SMs, the last count block had
// its routing loaded and ranked only 7-12 us after the kernel's start, for 256 KB of routing.
// This says whether that step costs so much by itself, or only beside what runs with it.
//
// T = 4096 tokens, K = 8 int64 experts each, E = 256, R = 2, as the layout kernel counts them:
// one warp per 32 tokens (lane = token), K loads per lane, each expert's lanes ORed into a
// shared mask word, ranks by popcount and ballots, a scan over the block's warps, the ranks and
// the block's histogram stored, a fence and a ticket. Stamps on the GPU's clock (us from the
// earliest CTA's start): the latest block with its routing loaded and ranked, the latest with
// its ranks stored, the last block past its ticket. Variants:
//   cold / warm:  the routing evicted from L2 before each launch (a 256 MB write) or not
//   pulls:        the warps' lane 0 first pull 1152 rows of 7392 bytes into L2 (8.5 MB: what the
//                 push's 576 warps pull at 24 SMs before they wait), competing with the loads
//   entry:        thread 0 of CTA 0 first stores to a second buffer and runs a system-scope
//                 fence (the layout's entry announcement) before counting its block
//   neighbours:   a kernel of 132 CTAs x 768 threads with 200 KB of shared memory each (one per
//                 SM, as the push CTAs the real layout shares its SMs with) is resident first,
//                 its thread 0 polling a flag with system-scope acquires until the count's last
//                 block raises it (bench/NOTES.md v16: the count inside the real layout kernel
//                 is ~3x slower than alone)
// for the layout kernel's shape (16 CTAs of 8 warps) and the fused push's (6 CTAs of 24).
// Build and run (device): nvcc -O3 -arch=sm_90 -o /tmp/count bench/probes/count_phase.cu && /tmp/count
// Profile: ncu --clock-control none -k regex:count_probe -c 4 /tmp/count
#include <algorithm>
#include <climits>
#include <ctime>
#include <vector>

#include "probe_common.cuh"

constexpr int kT = 4096, kK = 8, kE = 256, kR = 2, kELoc = kE / kR, kNC = kE + kR;
constexpr int kPullBytes = 7392;  // an FP8 row and its scale packs
constexpr int kPullRows = 1152;   // two per warp of a 24-CTA, 24-warp push

struct Args {
  const long long* topk;     // [T][K]
  int* tok_rank;             // [T][K]
  unsigned* tok_dmask;       // [T]
  int* agg;                  // [blocks][kNC]
  unsigned* done;            // [1]
  unsigned long long* ts;    // [4]: earliest start (min), loaded, stored, counted (max)
  const char* rows;          // rows the pulls prefetch
  long long* outs;           // the entry's stores
  unsigned* release;         // neighbours: raised by the last block (nullptr: none)
  int pulls, entry;
};

__device__ __forceinline__ unsigned long long now() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t));
  return t;
}

__device__ __forceinline__ unsigned lanes_below() {
  unsigned m;
  asm("mov.u32 %0, %%lanemask_lt;" : "=r"(m));
  return m;
}

// Shared memory: the warps' expert masks [kWarps][kE], then their histograms [kWarps][kNC]
// (dynamic: 24 warps take more than the 48 KB of static shared memory).
template <int kWarps>
constexpr int count_smem_bytes() {
  return kWarps * (kE + kNC) * 4;
}

template <int kWarps>
__global__ void __launch_bounds__(kWarps * 32) count_probe(Args a) {
  extern __shared__ unsigned smem[];
  auto mask = reinterpret_cast<unsigned(*)[kE]>(smem);
  auto cnt = reinterpret_cast<int(*)[kNC]>(smem + kWarps * kE);
  __shared__ int is_last;
  const int w = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (threadIdx.x == 0) atomicMin(a.ts, now());
  if (a.pulls && lane == 0)
    for (int row = blockIdx.x * kWarps + w; row < kPullRows; row += gridDim.x * kWarps)
      asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(a.rows + static_cast<long long>(row) * kPullBytes),
                   "r"(kPullBytes) : "memory");
  if (a.entry && blockIdx.x == 0 && threadIdx.x == 0) {
    a.outs[0] = 1;
    a.outs[1] = 2;
    __threadfence_system();
  }
  for (int e = lane; e < kE; e += 32) mask[w][e] = 0u;
  __syncwarp();
  const int t = (blockIdx.x * kWarps + w) * 32 + lane;
  const bool valid = t < kT;
  int ex[kK], rk[kK];
  unsigned dmask = 0;
#pragma unroll
  for (int k = 0; k < kK; ++k) {
    ex[k] = valid ? static_cast<int>(a.topk[static_cast<long long>(t) * kK + k]) : -1;
    rk[k] = 0;
    if (ex[k] >= 0) {
      dmask |= 1u << (ex[k] / kELoc);
      atomicOr(&mask[w][ex[k]], 1u << lane);
    }
  }
  __syncwarp();
#pragma unroll
  for (int k = 0; k < kK; ++k)
    if (ex[k] >= 0) rk[k] = __popc(mask[w][ex[k]] & lanes_below()) << 16;
  unsigned mybal = 0;
  for (int d = 0; d < kR; ++d) {
    const unsigned bal = __ballot_sync(0xffffffffu, (dmask >> d) & 1u);
    if (lane == d) mybal = bal;
  }
#pragma unroll
  for (int k = 0; k < kK; ++k) {
    const unsigned bal = __shfl_sync(0xffffffffu, mybal, ex[k] >= 0 ? ex[k] / kELoc : 0);
    if (ex[k] >= 0) rk[k] |= __popc(bal & lanes_below());
  }
  for (int e = lane; e < kE; e += 32) cnt[w][e] = __popc(mask[w][e]);
  if (lane < kR) cnt[w][kE + lane] = __popc(mybal);
  __syncthreads();
  if (threadIdx.x == 0) atomicMax(a.ts + 1, now());
  for (int c = threadIdx.x; c < kNC; c += blockDim.x) {
    int run = 0;
    for (int v = 0; v < kWarps; ++v) {
      const int x = cnt[v][c];
      cnt[v][c] = run;
      run += x;
    }
    a.agg[blockIdx.x * kNC + c] = run;
  }
  __syncthreads();
  if (valid) {
#pragma unroll
    for (int k = 0; k < kK; ++k)
      if (ex[k] >= 0)
        a.tok_rank[static_cast<long long>(t) * kK + k] = rk[k] + (cnt[w][ex[k]] << 16) + cnt[w][kE + ex[k] / kELoc];
    a.tok_dmask[t] = dmask;
  }
  __syncthreads();
  if (threadIdx.x == 0) atomicMax(a.ts + 2, now());
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) is_last = atomicAdd(a.done, 1u) == gridDim.x - 1;
  __syncthreads();
  if (is_last && threadIdx.x == 0) {
    *a.done = 0u;
    a.ts[3] = now();
    if (a.release != nullptr) asm volatile("st.release.sys.global.u32 [%0], 1;" ::"l"(a.release) : "memory");
  }
}

// The neighbours: thread 0 polls `flag` (system-scope acquires, no pause, as the push's wait for
// the bases) until it is raised or 2 ms passed; the other threads wait at the barrier.
constexpr int kNeighbourSmem = 200 * 1024;
__global__ void __launch_bounds__(768) neighbours(const unsigned* flag) {
  extern __shared__ int4 held[];  // (only occupies the SM, as the push's row stages do)
  if (threadIdx.x == 0) {
    const unsigned long long start = now();
    unsigned v = 0;
    do {
      asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(flag) : "memory");
    } while (v == 0 && now() - start < 2000000ull);
    held[0] = make_int4(static_cast<int>(v), 0, 0, 0);
  }
  __syncthreads();
}

__global__ void evict_l2(int4* p, long long n) {
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<long long>(gridDim.x) * blockDim.x)
    p[i] = make_int4(static_cast<int>(i), 0, 0, 0);
}

int main() {
  std::vector<long long> topk(kT * kK);
  unsigned seed = 12345;
  for (auto& e : topk) e = ((seed = seed * 1664525u + 1013904223u) >> 8) % kE;
  Args a{};
  long long* d_topk;
  CK(cudaMalloc(&d_topk, topk.size() * sizeof(long long)));
  CK(cudaMemcpy(d_topk, topk.data(), topk.size() * sizeof(long long), cudaMemcpyHostToDevice));
  a.topk = d_topk;
  CK(cudaMalloc(&a.tok_rank, kT * kK * 4));
  CK(cudaMalloc(&a.tok_dmask, kT * 4));
  CK(cudaMalloc(&a.agg, (kT / 32) * kNC * 4));
  CK(cudaMalloc(&a.done, 4));
  CK(cudaMemset(a.done, 0, 4));
  CK(cudaMalloc(&a.ts, 4 * 8));
  char* rows;
  CK(cudaMalloc(&rows, static_cast<long long>(kPullRows) * kPullBytes));
  a.rows = rows;
  CK(cudaMalloc(&a.outs, 16));
  const long long evict_n = (256LL << 20) / 16;
  int4* evict;
  CK(cudaMalloc(&evict, evict_n * 16));
  const int reps = 20;
  std::printf("count probe, T = %d, K = %d int64, E = %d, R = %d; us from the earliest CTA's start "
              "(median of %d): loaded / stored / counted, and the kernel (events)\n",
              kT, kK, kE, kR, reps);
  CK(cudaFuncSetAttribute(count_probe<24>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                          count_smem_bytes<24>()));
  unsigned* flag;
  CK(cudaMalloc(&flag, 4));
  CK(cudaFuncSetAttribute(neighbours, cudaFuncAttributeMaxDynamicSharedMemorySize, kNeighbourSmem));
  cudaStream_t count_stream, neighbour_stream;
  CK(cudaStreamCreateWithFlags(&count_stream, cudaStreamNonBlocking));
  CK(cudaStreamCreateWithFlags(&neighbour_stream, cudaStreamNonBlocking));
  const auto run = [&](const char* name, auto kernel, int ctas, int threads, int smem, bool cold,
                       int pulls, int entry, bool with_neighbours = false) {
    a.pulls = pulls;
    a.entry = entry;
    a.release = with_neighbours ? flag : nullptr;
    std::vector<float> loaded, stored, counted, kernel_us;
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    for (int i = 0; i < reps + 2; ++i) {
      if (cold) evict_l2<<<264, 512>>>(evict, evict_n);
      const unsigned long long init[4] = {ULLONG_MAX, 0, 0, 0};
      CK(cudaMemcpy(a.ts, init, sizeof(init), cudaMemcpyHostToDevice));
      CK(cudaMemset(flag, 0, 4));
      CK(cudaDeviceSynchronize());
      cudaStream_t st = 0;
      if (with_neighbours) {  // resident first (the host waits well past their launch)
        neighbours<<<132, 768, kNeighbourSmem, neighbour_stream>>>(flag);
        const unsigned long long t0 = clock();
        while (static_cast<double>(clock() - t0) / CLOCKS_PER_SEC < 2e-4) {}
        st = count_stream;
      }
      CK(cudaEventRecord(e0, st));
      kernel<<<ctas, threads, smem, st>>>(a);
      CK(cudaEventRecord(e1, st));
      CK(cudaEventSynchronize(e1));
      CK(cudaDeviceSynchronize());
      unsigned long long ts[4];
      CK(cudaMemcpy(ts, a.ts, sizeof(ts), cudaMemcpyDeviceToHost));
      float ms = 0;
      CK(cudaEventElapsedTime(&ms, e0, e1));
      if (i < 2) continue;
      loaded.push_back((ts[1] - ts[0]) / 1e3f);
      stored.push_back((ts[2] - ts[0]) / 1e3f);
      counted.push_back((ts[3] - ts[0]) / 1e3f);
      kernel_us.push_back(ms * 1e3f);
    }
    const auto med = [](std::vector<float> v) {
      std::sort(v.begin(), v.end());
      return v[v.size() / 2];
    };
    std::printf("%-44s %6.1f %6.1f %6.1f   %6.1f\n", name, med(loaded), med(stored), med(counted),
                med(kernel_us));
    CK(cudaGetLastError());
  };
  for (int cold : {0, 1}) {
    for (int pulls : {0, 1}) {
      for (int entry : {0, 1}) {
        char name[96];
        std::snprintf(name, sizeof(name), "%s%s%s", cold ? "cold" : "warm", pulls ? " pulls" : "",
                      entry ? " entry" : "");
        char l[128], f[128];
        std::snprintf(l, sizeof(l), "16 CTAs x 8 warps, %s", name);
        std::snprintf(f, sizeof(f), " 6 CTAs x 24 warps, %s", name);
        run(l, count_probe<8>, 16, 256, count_smem_bytes<8>(), cold, pulls, entry);
        run(f, count_probe<24>, 6, 768, count_smem_bytes<24>(), cold, pulls, entry);
      }
    }
  }
  run("16 CTAs x 8 warps, warm, neighbours", count_probe<8>, 16, 256, count_smem_bytes<8>(), false, 0, 0, true);
  run("16 CTAs x 8 warps, cold, neighbours", count_probe<8>, 16, 256, count_smem_bytes<8>(), true, 0, 0, true);
  return 0;
}
