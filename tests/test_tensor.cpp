#include <catch2/catch.hpp>

#include "tessera/error.hpp"
#include "tessera/parallel.hpp"
#include "tessera/tensor.hpp"

#include <atomic>
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
