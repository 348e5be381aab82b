#pragma once
// The error measure the training tests state their tolerance in: max |got − want| / max |want|
// (max |got − want| when want is all zero), with kTol = 1e-4 as issue 13 asks for fp32.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <vector>

#include "tessera/tensor.hpp"

namespace tessera::test {

constexpr double kTol = 1e-4;

template <class A, class B>
double rel_err(const A& got, const B& want) {
  REQUIRE(got.size() == want.size());
  double num = 0, den = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    num = std::max(num, std::abs(static_cast<double>(got[i]) - static_cast<double>(want[i])));
    den = std::max(den, std::abs(static_cast<double>(want[i])));
  }
  return den > 0 ? num / den : num;
}

inline std::vector<float> values(const Tensor& t) { return {t.data(), t.data() + t.numel()}; }

}  // namespace tessera::test
