// The table behind handle_records.hpp and its Python bindings.
#include "handle_records.hpp"

#include <torch/extension.h>

#include <c10/core/StorageImpl.h>
#include <c10/util/intrusive_ptr.h>

#include <algorithm>
#include <mutex>
#include <unordered_map>

#include "generated/handle_layout.hpp"  // rendered from deep_ep_ops/handle.py (codegen)

namespace deep_ep_ops {
namespace {

// What identifies the recorded tensor beyond its StorageImpl (the key).
struct Record {
  c10::weak_intrusive_ptr<c10::StorageImpl> storage;  // pins the key's address, tells death
  const void* data;                                   // the storage's memory when recorded
  int64_t offset, rows, cols;                         // the view: [rows, cols] at offset
  int64_t version;                                    // -1: no version counter (inference)
  HandleFacts facts;
};

// Below this many records the table is never pruned; after a prune the next one waits until
// the table doubles, so pruning costs O(1) per record (amortised) and the table stays within
// about twice the live handles (+ kMinPrune).
constexpr size_t kMinPrune = 64;

struct Table {
  std::mutex mutex;
  std::unordered_map<const c10::StorageImpl*, Record> records;
  size_t prune_at = kMinPrune;
};

Table& table() {
  static auto* t = new Table();  // never destroyed: no weak-pointer release during exit
  return *t;
}

int64_t version_of(const at::Tensor& t) {
  const c10::VariableVersion& v = t.unsafeGetTensorImpl()->version_counter();
  return v.enabled() ? static_cast<int64_t>(v.current_version()) : -1;
}

// The view a record describes, read from a tensor. Only 2-D tensors with storage are handles.
bool describable(const at::Tensor& t) {
  return t.defined() && t.has_storage() && t.dim() == 2 && t.is_contiguous();
}

const void* data_of(const c10::StorageImpl* s) { return s->data_ptr().get(); }

bool matches(const Record& r, const at::Tensor& t, const c10::StorageImpl* s) {
  return !r.storage.expired() && r.data == data_of(s) && r.offset == t.storage_offset() &&
         r.rows == t.size(0) && r.cols == t.size(1) && r.version == version_of(t);
}

void prune_locked(Table& tab) {
  for (auto it = tab.records.begin(); it != tab.records.end();) {
    if (it->second.storage.expired())
      it = tab.records.erase(it);
    else
      ++it;
  }
  tab.prune_at = std::max(kMinPrune, 2 * tab.records.size());
}

void insert(const at::Tensor& handle, const HandleFacts& facts) {
  const c10::Storage& storage = handle.storage();
  const c10::StorageImpl* key = storage.unsafeGetStorageImpl();
  Record rec{storage.getWeakStorageImpl(), data_of(key), handle.storage_offset(),
             handle.size(0),               handle.size(1), version_of(handle), facts};
  Table& tab = table();
  std::lock_guard<std::mutex> lock(tab.mutex);
  if (tab.records.size() >= tab.prune_at) prune_locked(tab);
  tab.records.insert_or_assign(key, std::move(rec));
}

}  // namespace

void record_handle(const at::Tensor& handle, const HandleFacts& facts) {
  if (describable(handle)) insert(handle, facts);
}

std::optional<HandleFacts> recorded_handle(const at::Tensor& handle) {
  if (!describable(handle)) return std::nullopt;
  const c10::StorageImpl* key = handle.storage().unsafeGetStorageImpl();
  Table& tab = table();
  std::lock_guard<std::mutex> lock(tab.mutex);
  const auto it = tab.records.find(key);
  if (it == tab.records.end() || !matches(it->second, handle, key)) return std::nullopt;
  return it->second.facts;
}

bool record_trimmed_handle(const at::Tensor& static_handle, const at::Tensor& trimmed) {
  const std::optional<HandleFacts> from = recorded_handle(static_handle);
  if (!from || !describable(trimmed) || trimmed.size(1) != static_handle.size(1)) return false;
  HandleFacts facts = *from;
  facts.num_rows = trimmed.size(0) - handle::kHeaderRows - facts.num_tokens;
  if (facts.num_rows < 0 || facts.num_rows > from->num_rows) return false;
  insert(trimmed, facts);
  return true;
}

size_t handle_record_count() {
  Table& tab = table();
  std::lock_guard<std::mutex> lock(tab.mutex);
  return tab.records.size();
}

}  // namespace deep_ep_ops

// deep_ep_ops/cuda/ep.py (the trimmed handles of exact=True) and the tests.
void deep_ep_ops_bind_handle_records(pybind11::module_& m) {
  namespace deo = deep_ep_ops;
  m.def("record_trimmed_handle", &deo::record_trimmed_handle, pybind11::arg("static_handle"),
        pybind11::arg("trimmed"));
  m.def("handle_record", [](const at::Tensor& handle) -> pybind11::object {
    const std::optional<deo::HandleFacts> f = deo::recorded_handle(handle);
    if (!f) return pybind11::none();
    pybind11::dict d;
    d["buffer_id"] = f->buffer_id;
    d["num_ranks"] = f->num_ranks;
    d["topk"] = f->topk;
    d["num_tokens"] = f->num_tokens;
    d["num_rows"] = f->num_rows;
    return d;
  });
  m.def("handle_record_count", &deo::handle_record_count);
}
