#include <catch2/catch.hpp>

#include "tessera/error.hpp"
#include "tessera/parallel.hpp"
#include "tessera/tensor.hpp"

#include <atomic>
#include <chrono>
#include <thread>
#include <vector>

using namespace tessera;

TEST_CASE("Tensor owns aligned zeroed storage and shares it on copy") {
  Tensor t({2, 3, 5});
  REQUIRE(t.numel() == 30);
  REQUIRE(reinterpret_cast<uintptr_t>(t.data()) % 64 == 0);
  for (int i = 0; i < 30; ++i) REQUIRE(t[i] == 0.0f);
  Tensor alias = t;
  alias[7] = 3.0f;
  REQUIRE(t[7] == 3.0f);
  Tensor deep = t.clone();
  deep[7] = 4.0f;
  REQUIRE(t[7] == 3.0f);
  REQUIRE(t.reshape({6, 5}).dim(0) == 6);
  REQUIRE_THROWS_AS(t.reshape({7, 5}), Error);
  Tensor rows = t.slice0(1, 2);
  REQUIRE(rows.numel() == 15);
  REQUIRE(rows.data() == t.data() + 15);
  REQUIRE(shape_str(t.shape()) == "[2, 3, 5]");
}

// Puts the thread count back when a test ends, failing or not.
struct ThreadsReset {
  ~ThreadsReset() { set_num_threads(0); }
};

TEST_CASE("parallel_for covers every index exactly once, at any thread count") {
  for (int threads : {1, 2, 3}) {
    set_num_threads(threads);
    REQUIRE(num_threads() == threads);
    std::vector<std::atomic<int>> hits(1000);
    parallel_for(0, 1000, 7, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) hits[i]++;
    });
    for (auto& h : hits) REQUIRE(h.load() == 1);
  }
  set_num_threads(0);
}

TEST_CASE("parallel_tasks: with a piece per thread, each piece's loops run on its own thread, whole") {
  // Sub-batches side by side: with at least as many pieces as threads a piece's parallel_for is
  // one call over the whole range on the piece's thread, and num_threads() is 1 inside (the GEMMs
  // split for one thread); with fewer pieces than threads the loops are shared as before.
  const ThreadsReset reset;
  for (int threads : {1, 2, 3}) {
    set_num_threads(threads);
    for (int64_t pieces : {1, 2, 3, 4}) {
      INFO("threads " << threads << " pieces " << pieces);
      std::vector<int> seen_threads(static_cast<size_t>(pieces)), calls(static_cast<size_t>(pieces));
      std::vector<std::atomic<int>> hits(static_cast<size_t>(pieces * 1000));
      parallel_tasks(pieces, [&](int64_t k0, int64_t k1) {
        for (int64_t k = k0; k < k1; ++k) {
          seen_threads[static_cast<size_t>(k)] = num_threads();
          std::atomic<int> n{0};
          parallel_for(0, 1000, 7, [&](int64_t b, int64_t e) {
            ++n;
            for (int64_t i = b; i < e; ++i) hits[static_cast<size_t>(k * 1000 + i)]++;
          });
          calls[static_cast<size_t>(k)] = n.load();
          // parallel_tasks inside a piece of its own: the inner pieces run here, in turn.
          const auto me = std::this_thread::get_id();
          std::atomic<int> inner{0}, elsewhere{0};
          parallel_tasks(2, [&](int64_t, int64_t) {
            ++inner;
            if (std::this_thread::get_id() != me) ++elsewhere;
          });
          CHECK(inner.load() == 2);
          if (pieces > 1 && pieces >= threads && pieces % threads == 0) CHECK(elsewhere.load() == 0);
        }
      });
      for (auto& h : hits) REQUIRE(h.load() == 1);
      const bool own = pieces > 1 && pieces >= threads && pieces % threads == 0;
      for (int64_t k = 0; k < pieces; ++k) {
        if (own) {
          CHECK(seen_threads[static_cast<size_t>(k)] == 1);
          CHECK(calls[static_cast<size_t>(k)] == 1);
        } else {
          CHECK(seen_threads[static_cast<size_t>(k)] == threads);
          if (threads > 1) CHECK(calls[static_cast<size_t>(k)] > 1);
        }
      }
    }
    REQUIRE(num_threads() == threads);  // outside the pieces: the arena's count again
    // A piece that throws leaves no thread believing it is still inside one.
    REQUIRE_THROWS_AS(parallel_tasks(2, [&](int64_t, int64_t) { throw Error("piece failed"); }), Error);
    std::atomic<int> chunks{0}, wrong{0};
    parallel_for(0, 1000, 7, [&](int64_t, int64_t) {
      ++chunks;
      if (num_threads() != threads) ++wrong;
    });
    CHECK(wrong.load() == 0);
    if (threads > 1) CHECK(chunks.load() > 1);
  }
  set_num_threads(0);
}

TEST_CASE("SerialScope: loops on this thread run inline while it lives") {
  const ThreadsReset reset;
  set_num_threads(2);
  {
    const SerialScope serial;
    {
      const SerialScope nested;  // ending, it leaves the outer scope's setting, not its own default
    }
    CHECK(num_threads() == 1);
    int calls = 0;
    std::vector<int> hits(1000);
    parallel_for(0, 1000, 7, [&](int64_t b, int64_t e) {
      ++calls;
      for (int64_t i = b; i < e; ++i) ++hits[static_cast<size_t>(i)];
    });
    CHECK(calls == 1);
    for (int h : hits) REQUIRE(h == 1);
  }
  CHECK(num_threads() == 2);
  std::atomic<int> calls{0};
  parallel_for(0, 1000, 7, [&](int64_t, int64_t) { ++calls; });
  CHECK(calls.load() > 1);
  set_num_threads(0);
}

TEST_CASE("parallel_tasks inside a piece of its own runs the inner pieces in turn on that thread") {
  // Two threads, two pieces: piece 1 returns at once, piece 0 calls parallel_tasks(2) whose
  // pieces each take ~2 ms; they must not overlap (one at a time) and must stay on piece 0's
  // thread, though the other thread is idle and would take one if it were offered.
  const ThreadsReset reset;
  set_num_threads(2);
  std::atomic<int> running{0}, most{0}, inner{0}, elsewhere{0};
  parallel_tasks(2, [&](int64_t k, int64_t) {
    if (k != 0) return;
    const auto me = std::this_thread::get_id();
    parallel_tasks(2, [&](int64_t, int64_t) {
      const int now = ++running;
      int seen = most.load();
      while (now > seen && !most.compare_exchange_weak(seen, now)) {
      }
      if (std::this_thread::get_id() != me) ++elsewhere;
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
      ++inner;
      --running;
    });
  });
  CHECK(inner.load() == 2);
  CHECK(most.load() == 1);
  CHECK(elsewhere.load() == 0);
}
