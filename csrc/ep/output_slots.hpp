// Direct-output slots of a Buffer (Buffer(direct_outputs=N)): which of the N slots of the EP
// window (ep_window.hpp, [slots]) hold a dispatch's outputs that are still alive.
//
// A dispatch takes a free slot for its recv_x and recv_scales; each of the two tensors holds
// one use, and the slot is free again when both are gone (their deleters run on whatever
// thread drops the last reference). Freed on the host is safe for the next dispatch on the same
// stream: the peers write into a slot only after that dispatch's layout kernel published it,
// which the stream runs after every earlier use of the old tensors. No torch types here.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>

namespace deep_ep_ops {

class OutputSlots {
 public:
  explicit OutputSlots(int n) : n_(n), uses_(new std::atomic<int>[n > 0 ? n : 1]) {
    for (int i = 0; i < n; ++i) uses_[i].store(0);
  }

  // A free slot, now held by `uses` tensors; -1 when every slot is taken.
  int acquire(int uses) {
    for (int i = 0; i < n_; ++i) {
      int expected = 0;
      if (uses_[i].compare_exchange_strong(expected, uses)) return i;
    }
    return -1;
  }
  void release(int i) { uses_[i].fetch_sub(1); }

  int size() const { return n_; }
  int busy() const {
    int b = 0;
    for (int i = 0; i < n_; ++i) b += uses_[i].load() != 0;
    return b;
  }

  // How dispatches with more than one rank placed their outputs (tests and benchmarks read it).
  std::atomic<int64_t> direct{0}, staged{0};

 private:
  int n_;
  std::unique_ptr<std::atomic<int>[]> uses_;
};

}  // namespace deep_ep_ops
