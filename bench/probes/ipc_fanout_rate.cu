// Probe: does writing rows into a peer process's memory (CUDA IPC, both processes on one GPU
// under MPS) cost more than writing them into one's own? bench/NOTES.md v14.
//
// Two processes (forked before CUDA starts), each with its MPS share, each owning T source rows
// and a receive buffer of 2T rows ([0, T): rank 0's rows, [T, 2T): rank 1's). Every rank
// sends all its rows to both ranks, as a two-rank dispatch does when every token goes to both.
// Variants, each timed by both ranks at once over many repetitions (a file barrier lines them up
// on the host; the repetitions make the skew negligible):
//   local2: both copies into the rank's own memory (what the single-process probe measured)
//   push:   one copy into its own receive buffer, one into the peer's (IPC), like the push
//   pull:   the rank reads the peer's rows (IPC) and its own, writing only its own buffer
// Build and run (device, MPS daemon running):
//   nvcc -O3 -arch=sm_90 -o /tmp/ipcprobe bench/probes/ipc_fanout_rate.cu && /tmp/ipcprobe 24
#include <string>
#include <sys/wait.h>
#include <unistd.h>

#include "probe_common.cuh"
constexpr int kT = 4096;

// rows r of src0 -> dst0[r], src1 -> ... : each warp copies row r of `a` to `da` and of `b` to
// `db` (a == b for the push: one read, two stores)
struct Job {
  const char* a;
  const char* b;
  char* da;
  char* db;
};

__global__ void __launch_bounds__(512, 1) two_copies(Job j, int same_source) {
  const int lane = threadIdx.x & 31;
  const int gw = blockIdx.x * 16 + threadIdx.x / 32, nw = gridDim.x * 16;
  for (int r = gw; r < kT; r += nw) {
    const long long off = static_cast<long long>(r) * kRowBytes;
    const int4* sa = reinterpret_cast<const int4*>(j.a + off);
    int4 v[kVecPerLane];
#pragma unroll
    for (int i = 0; i < kVecPerLane; ++i) v[i] = sa[i * 32 + lane];
#pragma unroll
    for (int i = 0; i < kVecPerLane; ++i) reinterpret_cast<int4*>(j.da + off)[i * 32 + lane] = v[i];
    if (!same_source) {
      const int4* sb = reinterpret_cast<const int4*>(j.b + off);
#pragma unroll
      for (int i = 0; i < kVecPerLane; ++i) v[i] = sb[i * 32 + lane];
    }
#pragma unroll
    for (int i = 0; i < kVecPerLane; ++i) reinterpret_cast<int4*>(j.db + off)[i * 32 + lane] = v[i];
  }
}

static void file_barrier(const std::string& dir, int rank, int step) {
  const std::string mine = dir + "/b" + std::to_string(rank) + "_" + std::to_string(step);
  FILE* f = std::fopen(mine.c_str(), "w");
  std::fclose(f);
  const std::string theirs = dir + "/b" + std::to_string(1 - rank) + "_" + std::to_string(step);
  while (access(theirs.c_str(), F_OK) != 0) usleep(50);
}

static int child(int rank, int ctas, const std::string& dir) {
  CK(cudaSetDevice(0));
  int sms = 0;
  CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  const size_t rows = static_cast<size_t>(kT) * kRowBytes;
  char *src, *recv, *mine2;
  CK(cudaMalloc(&src, rows));
  CK(cudaMalloc(&recv, 2 * rows));
  CK(cudaMalloc(&mine2, 2 * rows));  // local2's second destination
  CK(cudaMemset(src, 1 + rank, rows));
  cudaIpcMemHandle_t h;
  CK(cudaIpcGetMemHandle(&h, recv));
  cudaIpcMemHandle_t hs;
  CK(cudaIpcGetMemHandle(&hs, src));
  {
    const std::string path = dir + "/h" + std::to_string(rank);
    FILE* f = std::fopen((path + ".tmp").c_str(), "wb");
    std::fwrite(&h, sizeof(h), 1, f);
    std::fwrite(&hs, sizeof(hs), 1, f);
    std::fclose(f);
    std::rename((path + ".tmp").c_str(), path.c_str());
  }
  const std::string other = dir + "/h" + std::to_string(1 - rank);
  while (access(other.c_str(), F_OK) != 0) usleep(100);
  cudaIpcMemHandle_t ph, phs;
  {
    FILE* f = std::fopen(other.c_str(), "rb");
    if (std::fread(&ph, sizeof(ph), 1, f) != 1 || std::fread(&phs, sizeof(phs), 1, f) != 1) return 1;
    std::fclose(f);
  }
  char *peer_recv, *peer_src;
  CK(cudaIpcOpenMemHandle(reinterpret_cast<void**>(&peer_recv), ph, cudaIpcMemLazyEnablePeerAccess));
  CK(cudaIpcOpenMemHandle(reinterpret_cast<void**>(&peer_src), phs, cudaIpcMemLazyEnablePeerAccess));
  const size_t my_off = static_cast<size_t>(rank) * rows, their_off = static_cast<size_t>(1 - rank) * rows;
  struct Variant {
    const char* name;
    Job j;
    int same;
  } variants[] = {
      {"local2", {src, src, recv + my_off, mine2 + my_off}, 1},
      {"push", {src, src, recv + my_off, peer_recv + my_off}, 1},
      {"pull", {src, peer_src, recv + my_off, recv + their_off}, 0},
  };
  const int reps = 200;
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  int step = 0;
  for (const Variant& v : variants) {
    for (int w = 0; w < 5; ++w) two_copies<<<ctas, 512>>>(v.j, v.same);
    CK(cudaDeviceSynchronize());
    file_barrier(dir, rank, step++);
    CK(cudaEventRecord(a));
    for (int i = 0; i < reps; ++i) two_copies<<<ctas, 512>>>(v.j, v.same);
    CK(cudaEventRecord(b));
    CK(cudaEventSynchronize(b));
    float ms = 0;
    CK(cudaEventElapsedTime(&ms, a, b));
    std::printf("rank %d (%d SMs seen, %d CTAs) %-7s %7.1f us per copy of 2 x %.1f MB\n", rank, sms,
                ctas, v.name, ms * 1000.f / reps, rows / 1e6);
    std::fflush(stdout);
    file_barrier(dir, rank, step++);
  }
  CK(cudaIpcCloseMemHandle(peer_recv));
  CK(cudaIpcCloseMemHandle(peer_src));
  return 0;
}

int main(int argc, char** argv) {
  const int ctas = argc > 1 ? std::atoi(argv[1]) : 24;
  char tmpl[] = "/tmp/ipcprobeXXXXXX";
  const std::string dir = mkdtemp(tmpl);
  pid_t kids[2];
  for (int r = 0; r < 2; ++r) {
    kids[r] = fork();
    if (kids[r] == 0) {
      setenv("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", "50", 1);
      std::exit(child(r, ctas, dir));
    }
  }
  int bad = 0;
  for (pid_t k : kids) {
    int st = 0;
    waitpid(k, &st, 0);
    bad |= !(WIFEXITED(st) && WEXITSTATUS(st) == 0);
  }
  return bad;
}
