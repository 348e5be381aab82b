// Small standalone benchmark of tessera::linear on ViT-B shapes against Eigen (single thread).
// Build (after `cmake --build build --target tessera_core`):
//   g++ -O3 -march=native -std=c++20 -DNDEBUG -Icore/include -I/usr/include/eigen3 \
//       bench/gemm_bench.cpp build/core/libtessera_core.a -ltbb -o build/gemm_bench
// Usage: build/gemm_bench [rounds=9] [eigen=1]; prints median GFLOP/s per shape.
#include <Eigen/Core>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <random>
#include <vector>

#include "tessera/gemm.hpp"
#include "tessera/parallel.hpp"

using namespace tessera;

template <class F>
double median_seconds(F&& f, int reps) {
  std::vector<double> t;
  f();  // warm up
  for (int i = 0; i < reps; ++i) {
    auto a = std::chrono::steady_clock::now();
    f();
    t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - a).count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

int main(int argc, char** argv) {
  int reps = argc > 1 ? std::atoi(argv[1]) : 9;
  bool eigen = argc > 2 ? std::atoi(argv[2]) != 0 : true;
  Eigen::setNbThreads(1);
  std::printf("kernels %s, %s; GFLOP/s (median)\n%5s %5s %5s  %8s %8s %8s %8s %8s %8s\n",
              linear_kernel_name(WeightType::F32).c_str(), linear_kernel_name(WeightType::BF16).c_str(),
              "M", "K", "N", "f32x1", "f32x2", "eigen1", "bf16x1", "bf16x2", "f32x1cpu");
  int shapes[][3] = {{197, 768, 2304}, {197, 768, 768},   {197, 768, 3072}, {197, 3072, 768},
                     {1576, 768, 2304}, {1576, 768, 3072}, {1576, 3072, 768}};
  std::mt19937 rng(1);
  std::uniform_real_distribution<float> d(-1, 1);
  for (auto& s : shapes) {
    int M = s[0], K = s[1], N = s[2];
    std::vector<float> x(size_t(M) * K), w(size_t(N) * K), b(N), y(size_t(M) * N);
    for (auto& v : x) v = d(rng);
    for (auto& v : w) v = d(rng);
    for (auto& v : b) v = d(rng);
    PackedLinear pw = pack_linear(w.data(), b.data(), N, K);
    PackedLinear pb = pack_linear(w.data(), b.data(), N, K, WeightType::BF16);
    double flop = 2.0 * M * N * K, g[5] = {0, 0, 0, 0, 0};
    // 1- and 2-thread runs interleaved in rounds, so a burst of load from other processes hits
    // both alike; the median over all timed runs is reported.
    // times[0..1]: fp32 on 1, 2 threads; times[2..3]: bf16 on 1, 2 threads.
    std::vector<double> times[4], cpu1;  // cpu1: thread CPU time of the 1-thread fp32 runs
    for (int round = 0; round < reps; ++round)
      for (int t = 1; t <= 2; ++t) {
        set_num_threads(t);
        for (int type = 0; type < 2; ++type) {
          const PackedLinear& pl = type ? pb : pw;
          linear(x.data(), M, K, pl, y.data(), N);  // warm up the arena
          for (int i = 0; i < 3; ++i) {
            timespec c0, c1;
            clock_gettime(CLOCK_THREAD_CPUTIME_ID, &c0);
            auto a = std::chrono::steady_clock::now();
            linear(x.data(), M, K, pl, y.data(), N);
            clock_gettime(CLOCK_THREAD_CPUTIME_ID, &c1);
            if (t == 1 && type == 0)
              cpu1.push_back(double(c1.tv_sec - c0.tv_sec) + 1e-9 * double(c1.tv_nsec - c0.tv_nsec));
            times[2 * type + t - 1].push_back(
                std::chrono::duration<double>(std::chrono::steady_clock::now() - a).count());
          }
        }
      }
    std::sort(cpu1.begin(), cpu1.end());
    double g_cpu1 = flop / cpu1[cpu1.size() / 2] * 1e-9;
    for (int t = 0; t < 4; ++t) {
      std::sort(times[t].begin(), times[t].end());
      g[t < 2 ? t : t + 1] = flop / times[t][times[t].size() / 2] * 1e-9;
    }
    if (eigen) {
      using RowMat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
      Eigen::Map<const RowMat> X(x.data(), M, K), W(w.data(), N, K);
      Eigen::Map<RowMat> Y(y.data(), M, N);
      g[2] = flop / median_seconds([&] { Y.noalias() = X * W.transpose(); }, reps) * 1e-9;
    }
    std::printf("%5d %5d %5d  %8.1f %8.1f %8.1f %8.1f %8.1f %8.1f\n", M, K, N, g[0], g[1], g[2], g[3],
                g[4], g_cpu1);
  }
}
