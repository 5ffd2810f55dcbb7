// Host-only driver of csrc/interhost/rail_stage.cpp for tests/test_rail_stage_cpu.py: the
// checks every inter-host stage shares (places, pieces, a destroyed or aborted stage), one line
// of output per case ("ok" or the exception's text), no GPU needed.
#include "interhost/rail_stage.hpp"

#include <cstdio>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace deo = deep_ep_ops;

namespace {

// A stage that moves nothing: it only runs the shared checks.
class CheckingStage final : public deo::InterHostStage {
 public:
  explicit CheckingStage(const deo::RailPlace& p) : InterHostStage(p) {}
  void exchange_rows(const char* op, const std::vector<deo::RailPiece>& pieces,
                     cudaStream_t) override {
    std::lock_guard<std::mutex> lock(calls_);
    check_alive(op);
    check_pieces(op, pieces);
  }
  void return_partials(const char* op, const std::vector<deo::RailPiece>& pieces,
                       cudaStream_t s) override {
    exchange_rows(op, pieces, s);
  }
  void exchange_counts(const char*, const int64_t*, int64_t*, cudaStream_t) override {}
  void destroy() override { alive_ = false; }
  const char* name() const override { return "checking"; }

  // What the watch's thread meets while the op's thread is inside a call.
  std::unique_lock<std::mutex> inside_a_call() { return std::unique_lock<std::mutex>(calls_); }
  int transport_aborts = 0;

 protected:
  void abort_transport() override { ++transport_aborts; }
};

// abort from another thread, as the stall watch calls it
bool abort_from_a_thread(CheckingStage& stage, const char* reason) {
  bool done = false;
  std::thread watch([&] { done = stage.abort(reason); });
  watch.join();
  return done;
}

void run(const char* name, const std::function<void()>& f) {
  try {
    f();
    std::printf("%s: ok\n", name);
  } catch (const std::exception& e) {
    std::printf("%s: %s\n", name, e.what());
  }
}

}  // namespace

int main() {
  run("place", [] {
    const deo::RailPlace p = deo::make_rail_place(5, 3, 2);  // host 2, local index 1
    std::printf("where: %s / %s\n", p.where().c_str(), p.peer(0).c_str());
  });
  run("place_out_of_range", [] { deo::make_rail_place(6, 3, 2); });
  CheckingStage stage(deo::make_rail_place(5, 3, 2));
  char buf[16];
  const std::vector<deo::RailPiece> good = {{0, buf, 8, buf, 8}, {1, buf, 0, nullptr, 0},
                                            {0, buf, 4, buf, 0}};
  run("good", [&] { stage.exchange_rows("dispatch", good, nullptr); });
  run("own_host", [&] { stage.exchange_rows("dispatch", {{2, buf, 8, buf, 8}}, nullptr); });
  run("bad_host", [&] { stage.exchange_rows("dispatch", {{3, buf, 8, buf, 8}}, nullptr); });
  run("negative", [&] { stage.return_partials("combine", {{1, buf, -1, buf, 8}}, nullptr); });
  run("null", [&] { stage.exchange_rows("dispatch", {{0, buf, 8, nullptr, 8}}, nullptr); });
  stage.destroy();
  run("destroyed", [&] { stage.exchange_rows("dispatch", good, nullptr); });

  CheckingStage stalled(deo::make_rail_place(1, 2, 1));
  const char* reason = "deep_ep.dispatch: rank 1 (host 1, local index 0) waits for host 0";
  {
    auto call = stalled.inside_a_call();
    std::printf("abort_inside_a_call: %d\n", abort_from_a_thread(stalled, reason));
  }
  std::printf("abort: %d\n", abort_from_a_thread(stalled, reason));
  std::printf("abort_again: %d\n", abort_from_a_thread(stalled, reason));
  std::printf("transport_aborts: %d alive: %d\n", stalled.transport_aborts, stalled.alive());
  run("aborted", [&] { stalled.return_partials("combine", {{0, buf, 8, buf, 8}}, nullptr); });
  return 0;
}
