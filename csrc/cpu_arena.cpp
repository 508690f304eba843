// A CPU memory arena for the fused layers' outputs, and in training for what their stages save for the backward:
// blocks freed by tensors allocated inside an arena scope are kept (up to a cap) and handed out again to allocations
// of the same size, so a repeated forward pass writes into memory that is already mapped instead of page-faulting
// fresh pages (what ONNX Runtime's arena does). Installed as the process's CPU allocator, it passes every allocation
// made outside a scope straight to the allocator it replaced; scopes are per thread
// (resnet_fused._C.cpu_arena_enter / cpu_arena_exit, from resnet_fused.ops.arena).
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <cstdlib>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "cpu_arena.h"

namespace resnet_fused {
namespace {

constexpr size_t kPage = 4096;
constexpr size_t kMinBytes = 64 * 1024;  // smaller blocks come from malloc's own free lists, no page faults

thread_local int scope_depth = 0;

size_t cap_from_env() {
  const char* mb = std::getenv("RESNET_FUSED_CPU_ARENA_MB");  // 0 turns the arena off
  return (mb != nullptr ? std::strtoull(mb, nullptr, 10) : 1024) << 20;
}

class Arena final : public c10::Allocator {
 public:
  explicit Arena(c10::Allocator* base) : base_(base), cap_(cap_from_env()) {}

  c10::DataPtr allocate(size_t nbytes) override {
    if (scope_depth == 0 || nbytes < kMinBytes || cap_ == 0) {
      return base_->allocate(nbytes);
    }
    const size_t size = (nbytes + kPage - 1) / kPage * kPage;
    void* ptr = nullptr;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto& blocks = free_[size];
      if (!blocks.empty()) {
        ptr = blocks.back();
        blocks.pop_back();
        cached_ -= size;
      }
    }
    if (ptr == nullptr) {
      ptr = c10::alloc_cpu(size);
      std::lock_guard<std::mutex> lock(mu_);
      sizes_[ptr] = size;
    }
    return {ptr, ptr, &Arena::release, c10::Device(c10::DeviceType::CPU)};
  }

  // raw_allocate / raw_deallocate (oneDNN's scratchpads come from them): every block's context is its
  // data pointer, the arena's own and the replaced allocator's alike (release tells them apart)
  c10::DeleterFnPtr raw_deleter() const override { return base_->raw_deleter() != nullptr ? &Arena::release : nullptr; }

  void copy_data(void* dest, const void* src, std::size_t count) const override { default_copy_data(dest, src, count); }

  size_t cached_bytes() {
    std::lock_guard<std::mutex> lock(mu_);
    return cached_;
  }

  void empty_cache() {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& [size, blocks] : free_) {
      for (void* p : blocks) {
        sizes_.erase(p);
        c10::free_cpu(p);
      }
      blocks.clear();
    }
    cached_ = 0;
  }

 private:
  static void release(void* ptr);

  c10::Allocator* base_;
  size_t cap_;
  std::mutex mu_;
  std::unordered_map<size_t, std::vector<void*>> free_;  // size -> blocks ready for reuse
  std::unordered_map<void*, size_t> sizes_;  // every block the arena owns (in use or free) -> size
  size_t cached_ = 0;  // bytes in free_
};

Arena* g_arena = nullptr;  // never destroyed: tensors may outlive static destruction

void Arena::release(void* ptr) {
  Arena& a = *g_arena;
  std::unique_lock<std::mutex> lock(a.mu_);
  const auto it = a.sizes_.find(ptr);
  if (it == a.sizes_.end()) {  // a raw allocation made outside a scope: the replaced allocator's
    lock.unlock();
    a.base_->raw_deleter()(ptr);
    return;
  }
  const size_t size = it->second;
  if (a.cached_ + size <= a.cap_) {
    a.free_[size].push_back(ptr);
    a.cached_ += size;
  } else {
    a.sizes_.erase(ptr);
    c10::free_cpu(ptr);
  }
}

}  // namespace

bool cpu_arena_install() {
  static std::once_flag once;
  std::call_once(once, [] {
    c10::Allocator* current = c10::GetCPUAllocator();
    g_arena = new Arena(current);
    c10::SetCPUAllocator(g_arena, /*priority=*/1);
  });
  return c10::GetCPUAllocator() == g_arena;  // a higher-priority allocator (another library's) keeps its place
}

void cpu_arena_enter() { ++scope_depth; }
void cpu_arena_exit() { --scope_depth; }
size_t cpu_arena_cached_bytes() { return g_arena != nullptr ? g_arena->cached_bytes() : 0; }
void cpu_arena_empty_cache() {
  if (g_arena != nullptr) g_arena->empty_cache();
}

}  // namespace resnet_fused
