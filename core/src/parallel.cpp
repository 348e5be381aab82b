#include "tessera/parallel.hpp"

#include <tbb/blocked_range.h>
#include <tbb/global_control.h>
#include <tbb/info.h>
#include <tbb/parallel_for.h>
#include <tbb/task_arena.h>

#include <atomic>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <string>

#include "tessera/error.hpp"

namespace tessera {
namespace {

std::mutex g_mutex;
int g_requested = 0;
std::unique_ptr<tbb::task_arena> g_arena;
// The arena once made, read without the lock: every parallel loop asks for it, and two threads
// running training sub-batches side by side took turns on the mutex thousands of times a step.
std::atomic<tbb::task_arena*> g_arena_ready{nullptr};
// TBB caps workers at the core count unless told otherwise; --threads may ask for more.
std::unique_ptr<tbb::global_control> g_limit;

int default_threads() {
  if (const char* env = std::getenv("TESSERA_NUM_THREADS")) {
    char* end = nullptr;
    long n = std::strtol(env, &end, 10);
    if (end != env && *end == '\0' && n > 0 && n <= 1024) return static_cast<int>(n);
    fail(std::string("TESSERA_NUM_THREADS='") + env + "' is not a positive thread count");
  }
  return tbb::info::default_concurrency();
}

tbb::task_arena& arena() {
  if (tbb::task_arena* ready = g_arena_ready.load(std::memory_order_acquire)) return *ready;
  std::lock_guard<std::mutex> lock(g_mutex);
  if (!g_arena) {
    int n = g_requested > 0 ? g_requested : default_threads();
    g_limit = std::make_unique<tbb::global_control>(tbb::global_control::max_allowed_parallelism,
                                                    static_cast<size_t>(n));
    g_arena = std::make_unique<tbb::task_arena>(n);
    g_arena_ready.store(g_arena.get(), std::memory_order_release);
  }
  return *g_arena;
}

// Set while this thread runs one of parallel_tasks' pieces when the pieces are a multiple of the
// threads, or inside a SerialScope: Tessera's parallel loops started here then run on this
// thread alone (see parallel_tasks).
thread_local bool t_own_piece = false;

}  // namespace

void set_num_threads(int n) {
  std::lock_guard<std::mutex> lock(g_mutex);
  if (n > 1024) fail("--threads " + std::to_string(n) + " is more than 1024");
  g_requested = n;
  g_arena_ready.store(nullptr, std::memory_order_release);
  g_arena.reset();
}

int num_threads() { return t_own_piece ? 1 : arena().max_concurrency(); }

void parallel_for(int64_t begin, int64_t end, int64_t grain,
                  RangeBody body) {
  if (end <= begin) return;
  if (grain < 1) grain = 1;
  if (end - begin <= grain || t_own_piece) {
    body(begin, end);
    return;
  }
  arena().execute([&] {
    tbb::parallel_for(tbb::blocked_range<int64_t>(begin, end, grain),
                      [&](const tbb::blocked_range<int64_t>& r) { body(r.begin(), r.end()); },
                      tbb::simple_partitioner());
  });
}

void parallel_tasks(int64_t n, RangeBody body) {
  if (n <= 0) return;
  if (n == 1 || t_own_piece) {  // inside a piece: its own pieces run here, one after another
    for (int64_t i = 0; i < n; ++i) body(i, i + 1);
    return;
  }
  // With a piece for every thread, each thread keeps to its piece: its loops run as one chunk
  // and the GEMMs split for one thread (num_threads() is 1 inside). Left to TBB, a piece's loops
  // were cut for two threads while the other thread was busy with the other piece: smaller
  // micro-panels (12 rows, not 14), a task per chunk, and chunks stolen across the cores, whose
  // rows then crossed between their caches. Digits ViT, 2 threads (2 halves of each batch):
  // 2,572 -> 2,748 images/s (median of 5 alternating rounds); 1 thread 1,427 -> 1,489.
  // Only when the pieces share out evenly: with 3 pieces on 2 threads the second thread would sit
  // idle through the third, where its loops can still be shared.
  const int threads = num_threads();
  const bool own = n >= threads && n % threads == 0;
  arena().execute([&] {
    tbb::parallel_for(tbb::blocked_range<int64_t>(0, n, 1),
                      [&](const tbb::blocked_range<int64_t>& r) {
                        for (int64_t i = r.begin(); i < r.end(); ++i)
                          tbb::this_task_arena::isolate([&] {
                            if (!own) return body(i, i + 1);
                            const SerialScope piece;  // flag restored also when body throws
                            body(i, i + 1);
                          });
                      },
                      tbb::simple_partitioner());
  });
}

SerialScope::SerialScope() : saved_(t_own_piece) { t_own_piece = true; }
SerialScope::~SerialScope() { t_own_piece = saved_; }

void run_in_arena(const std::function<void()>& fn) { arena().execute(fn); }

}  // namespace tessera
