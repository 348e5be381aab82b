#pragma once
// The one place for parallelism: a TBB task_arena sized by one setting. The thread count comes
// from set_num_threads (the CLI's --threads), else TESSERA_NUM_THREADS, else every core.
#include <cstdint>
#include <functional>

namespace tessera {

void set_num_threads(int n);  // n <= 0: back to the default
int num_threads();

// Calls body(begin, end) on disjoint chunks covering [begin, end), each at least `grain` long
// (except the last), in parallel inside the arena. Every index belongs to exactly one chunk, so
// results never depend on the thread count as long as body writes only its own indices.
void parallel_for(int64_t begin, int64_t end, int64_t grain,
                  const std::function<void(int64_t, int64_t)>& body);

// Runs fn inside the arena (so nested TBB algorithms use its threads).
void run_in_arena(const std::function<void()>& fn);

}  // namespace tessera
