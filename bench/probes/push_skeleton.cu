// Probe: the dispatch push's per-token work without its row bytes ("skeleton"), in one process,
// so ncu can profile it (the real push waits for another process and cannot be replayed).
// bench/NOTES.md v14: with DEEP_EP_OPS_PUSH_SKIP=12 the real push's skeleton took ~41 µs at 24
// CTAs (~4 µs per token and warp), about as long as the rows' whole copy floor.
//
// One rank of R = 2 at T = 4096, K = 8, E = 256: for each token a warp loads its routing (the
// destination mask, its K experts and weights, its ranks from the count kernel), the rows'
// bases (base + count-CTA prefix + rank), takes the next token from a ticket, and stores the
// handle's send row, its own receive row and routing tensors, and a metadata row per peer, as
// csrc/ep/dispatch.cu's pipelined loop does (the layout's outputs are made up here: what
// matters is the dependence between the loads, not their values). Variants:
//   ticket / stride: next token by atomic ticket (asked a token ahead) or a fixed stride
//   meta / nometa:   the routing, handle and metadata stores, or none
//   ahead:           the rows' bases of the next token loaded a token ahead too (routing two
//                    tokens ahead), so no load of a token's own waits inside its iteration
// at 16 and 24 warps per CTA, 24 and 66 CTAs.
// Build and run (device): nvcc -O3 -arch=sm_90 -o /tmp/skel bench/probes/push_skeleton.cu && /tmp/skel
// Profile: ncu --clock-control none -k regex:skeleton -c 4 /tmp/skel
#include <vector>

#include "probe_common.cuh"

constexpr int kT = 4096, kK = 8, kE = 256, kR = 2, kELoc = kE / kR, kW = 32, kMeta = 28;
constexpr int kCtaTokens = 256, kNC = kE + kR;

struct Routing {
  unsigned dmask;
  int e, rank;
  float w;
};

struct Args {
  const long long* topk;
  const float* weights;
  const unsigned* dmask;
  const int* rank;    // [T * K]
  const int* prefix;  // [T / kCtaTokens][kNC]
  const int* cbase;   // [R]
  int* send_rows;     // [T][W]
  int* recv_rows;     // [R * T][W]
  int* meta;          // [R * T][kMeta]
  long long* recv_idx;
  float* recv_w;
  unsigned* ticket;
};

__device__ __forceinline__ int lane_id() { return threadIdx.x & 31; }

__device__ __forceinline__ Routing load_routing(const Args& a, int t) {
  Routing r{a.dmask[t], -1, 0, 0.f};
  const int k = lane_id();
  if (k < kK) {
    r.e = static_cast<int>(a.topk[t * kK + k]);
    r.w = a.weights[t * kK + k];
    r.rank = a.rank[t * kK + k];
  }
  return r;
}

__device__ __forceinline__ int row_of(const Args& a, int t, const Routing& r) {
  if (r.e < 0) return -1;
  const int d = r.e / kELoc;
  return a.cbase[d] + a.prefix[(t / kCtaTokens) * kNC + kE + d] + (r.rank & 0xffff);
}

__device__ __forceinline__ void token_stores(const Args& a, int t, const Routing& r, int crow) {
  const int lane = lane_id();
  const int edst = r.e >= 0 ? r.e / kELoc : -1;
  a.send_rows[t * kW + lane] = lane < kK ? crow : __popc(r.dmask);
  for (unsigned rest = r.dmask; rest != 0; rest &= rest - 1) {
    const int d = __ffs(rest) - 1;
    const unsigned at_d = __ballot_sync(0xffffffffu, edst == d);
    const int row = __shfl_sync(0xffffffffu, crow, __ffs(at_d) - 1) & (kT - 1);
    const bool here = edst == d;
    if (d == 0) {  // this rank
      if (lane < kK) {
        a.recv_idx[(d * kT + row) * kK + lane] = here ? r.e - d * kELoc : -1;
        a.recv_w[(d * kT + row) * kK + lane] = here ? r.w : 0.f;
      }
      a.recv_rows[(d * kT + row) * kW + lane] = lane == 0 ? t : -1;
    } else {
      int* m = a.meta + (d * kT + row) * kMeta;
      if (lane < 4) m[lane] = lane == 1 ? t : 0;
      if (lane < kK) {
        m[4 + lane] = here ? r.e - d * kELoc : -1;
        m[4 + kK + lane] = -1;
        m[4 + 2 * kK + lane] = here ? __float_as_int(r.w) : 0;
      }
    }
  }
}

template <int kWarps, bool kTicket, bool kMetaStores, bool kAhead>
__global__ void __launch_bounds__(kWarps * 32, 1) skeleton(Args a) {
  const int lane = lane_id(), warps = kWarps, first_round = gridDim.x * warps;
  int t = blockIdx.x * warps + threadIdx.x / 32;
  unsigned asked = 0, asked2 = 0;
  int sink = 0;  // keeps the loads of the variants without stores alive
  const auto keep = [&] {
    if (sink == 0x7fffffff) a.send_rows[0] = sink;
  };
  const auto next_of = [&](int cur, unsigned& ask) {
    if (!kTicket) return cur + first_round;
    const int n = first_round + static_cast<int>(__shfl_sync(0xffffffffu, ask, 0));
    if (lane == 0) ask = atomicAdd(a.ticket, 1u);
    return n;
  };
  if (lane == 0 && kTicket) asked = atomicAdd(a.ticket, 1u);
  Routing r = load_routing(a, t < kT ? t : 0);
  if (!kAhead) {
    while (t < kT) {
      const int crow = row_of(a, t, r);
      const int nt = next_of(t, asked);
      Routing rn{};
      if (nt < kT) rn = load_routing(a, nt);
      if (kMetaStores) token_stores(a, t, r, crow);
      else sink += crow + static_cast<int>(r.dmask);
      t = nt;
      r = rn;
    }
    keep();
    return;
  }
  // a token ahead: the next token's bases, two ahead its routing
  if (lane == 0 && kTicket) asked2 = atomicAdd(a.ticket, 1u);
  int crow = t < kT ? row_of(a, t, r) : -1;
  int nt = next_of(t, asked);
  Routing rn{};
  if (nt < kT) rn = load_routing(a, nt);
  while (t < kT) {
    const int ncrow = nt < kT ? row_of(a, nt, rn) : -1;
    const int nnt = nt < kT ? next_of(nt, asked2) : kT;
    Routing rnn{};
    if (nnt < kT) rnn = load_routing(a, nnt);
    if (kMetaStores) token_stores(a, t, r, crow);
    else sink += crow + static_cast<int>(r.dmask);
    t = nt;
    r = rn;
    crow = ncrow;
    nt = nnt;
    rn = rnn;
    unsigned tmp = asked;  // the ticket asked two tokens ago is the next one to take
    asked = asked2;
    asked2 = tmp;
  }
  keep();
}

template <typename F>
float time_us(F launch, unsigned* ticket, int reps) {
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  for (int i = 0; i < 3; ++i) {
    CK(cudaMemsetAsync(ticket, 0, 4));
    launch();
  }
  float total = 0;
  for (int i = 0; i < reps; ++i) {
    CK(cudaMemsetAsync(ticket, 0, 4));
    CK(cudaEventRecord(a));
    launch();
    CK(cudaEventRecord(b));
    CK(cudaEventSynchronize(b));
    float ms = 0;
    CK(cudaEventElapsedTime(&ms, a, b));
    total += ms;
  }
  CK(cudaGetLastError());
  return total * 1000.f / reps;
}

template <typename T>
T* upload(const std::vector<T>& h) {
  T* d;
  CK(cudaMalloc(&d, h.size() * sizeof(T)));
  CK(cudaMemcpy(d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
  return d;
}

int main() {
  std::vector<long long> topk(kT * kK);
  std::vector<float> w(kT * kK, 0.5f);
  std::vector<unsigned> dmask(kT);
  std::vector<int> rank(kT * kK), prefix((kT / kCtaTokens) * kNC), cbase(kR, 0);
  unsigned seed = 12345;
  const auto rnd = [&] { return seed = seed * 1664525u + 1013904223u; };
  for (int t = 0; t < kT; ++t) {
    unsigned m = 0;
    for (int k = 0; k < kK; ++k) {
      const int e = static_cast<int>((rnd() >> 8) % kE);
      topk[t * kK + k] = e;
      m |= 1u << (e / kELoc);
      rank[t * kK + k] = static_cast<int>(((t % kCtaTokens) << 16) | (t % kCtaTokens));
    }
    dmask[t] = m;
  }
  for (size_t i = 0; i < prefix.size(); ++i) prefix[i] = static_cast<int>((i / kNC) * kCtaTokens);
  Args a{};
  a.topk = upload(topk);
  a.weights = upload(w);
  a.dmask = upload(dmask);
  a.rank = upload(rank);
  a.prefix = upload(prefix);
  a.cbase = upload(cbase);
  CK(cudaMalloc(&a.send_rows, kT * kW * 4));
  CK(cudaMalloc(&a.recv_rows, kR * kT * kW * 4));
  CK(cudaMalloc(&a.meta, kR * kT * kMeta * 4));
  CK(cudaMalloc(&a.recv_idx, kR * kT * kK * 8));
  CK(cudaMalloc(&a.recv_w, kR * kT * kK * 4));
  CK(cudaMalloc(&a.ticket, 4));
  const int reps = 50;
  std::printf("push skeleton, T = %d per rank, K = %d, E = %d, R = %d; us per launch (mean of %d)\n", kT,
              kK, kE, kR, reps);
  for (int g : {24, 66}) {
    const auto run = [&](const char* name, auto kernel, int warps) {
      const float us = time_us([&] { kernel<<<g, warps * 32>>>(a); }, a.ticket, reps);
      std::printf("%3d CTAs %2d warps %-22s %7.1f us  %5.2f us per token and warp\n", g, warps, name, us,
                  us / (static_cast<float>(kT) / (g * warps)));
    };
    run("ticket meta", skeleton<16, true, true, false>, 16);
    run("stride meta", skeleton<16, false, true, false>, 16);
    run("ticket nometa", skeleton<16, true, false, false>, 16);
    run("ticket meta ahead", skeleton<16, true, true, true>, 16);
    run("ticket meta", skeleton<24, true, true, false>, 24);
    run("ticket meta ahead", skeleton<24, true, true, true>, 24);
    run("ticket meta", skeleton<32, true, true, false>, 32);
  }
  return 0;
}
