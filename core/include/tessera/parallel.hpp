#pragma once
// The one place for parallelism: a TBB task_arena sized by one setting. The thread count comes
// from set_num_threads (the CLI's --threads), else TESSERA_NUM_THREADS, else every core.
#include <cstdint>
#include <functional>
#include <memory>
#include <type_traits>

namespace tessera {

// n <= 0: back to the default. Not while any parallel work runs: the arena it replaces is freed.
void set_num_threads(int n);
// The threads a parallel loop started here may use: the arena's, or 1 inside one of
// parallel_tasks' pieces when the pieces are a multiple of the threads, and inside a SerialScope.
int num_threads();

// A non-owning reference to a callable body(begin, end): unlike std::function it never
// allocates, so a forward pass made of parallel_for calls stays allocation-free. The callable
// must outlive the call (a lambda passed directly does).
class RangeBody {
 public:
  template <class F, class = std::enable_if_t<!std::is_same_v<std::decay_t<F>, RangeBody>>>
  RangeBody(F&& f)  // NOLINT: implicit, so lambdas pass straight through
      : object_(const_cast<void*>(static_cast<const void*>(std::addressof(f)))),
        call_([](void* o, int64_t b, int64_t e) { (*static_cast<std::remove_reference_t<F>*>(o))(b, e); }) {}
  void operator()(int64_t begin, int64_t end) const { call_(object_, begin, end); }

 private:
  void* object_;
  void (*call_)(void*, int64_t, int64_t);
};

// Calls body(begin, end) on disjoint chunks covering [begin, end), each at least `grain` long
// (except the last), in parallel inside the arena. Every index belongs to exactly one chunk, so
// results never depend on the thread count as long as body writes only its own indices.
void parallel_for(int64_t begin, int64_t end, int64_t grain,
                  RangeBody body);

// Calls body(i, i + 1) for every i in [0, n), in parallel inside the arena, each call isolated
// (tbb::this_task_arena::isolate): a thread that waits inside one call's own parallel_for takes
// only that call's work, never another call, while idle threads may still help any call. For
// independent pieces of work that each use parallel_for inside (a batch split into sub-batches):
// the pieces run side by side instead of one after another with every thread inside each.
// When n is a multiple of num_threads(), each piece runs on one thread: parallel_for inside it
// calls its body once for the whole range, on that thread (so loop bodies must not assume chunks
// of at most some size), num_threads() is 1 there, and parallel_tasks there runs its pieces in
// turn.
void parallel_tasks(int64_t n, RangeBody body);

// While one lives, Tessera's parallel loops started on this thread run inline, on this thread
// alone (OpenCV's own, inside its calls, are not affected), and num_threads() is 1 here: for a background thread (a trainer's loader preparing the next batch)
// that must not take the arena's threads from the step it overlaps, nor wait for them.
class SerialScope {
 public:
  SerialScope();
  ~SerialScope();
  SerialScope(const SerialScope&) = delete;
  SerialScope& operator=(const SerialScope&) = delete;

 private:
  bool saved_;
};
// Runs fn inside the arena (so nested TBB algorithms use its threads).
void run_in_arena(const std::function<void()>& fn);

}  // namespace tessera
