// The CPU memory arena (cpu_arena.cpp), exposed by resnet_fused._C.
#pragma once
#include <cstddef>

namespace resnet_fused {
bool cpu_arena_install();  // once; true if it is the CPU allocator now
void cpu_arena_enter();    // allocations on this thread come from the arena until the matching exit
void cpu_arena_exit();
std::size_t cpu_arena_cached_bytes();  // bytes freed into the arena, ready for reuse
void cpu_arena_empty_cache();          // give them back to the system
}  // namespace resnet_fused
