// What a model load cannot beat on this machine: the memory and file work it has to do, without
// any packing. For a checkpoint FILE and T threads it times, in one process:
//   fresh  - writing PACKED_MB of new memory once (2 MiB-aligned, MADV_HUGEPAGE, as the packed
//            weights' arena): the kernel zeroes each huge page on first touch, then the write;
//   pread  - reading the whole file from the page cache in 256 KiB preads (as the loader does);
//   memcpy - copying PACKED_MB between buffers that are already faulted in.
// A load of that file into PACKED_MB of packed weights needs at least about fresh + pread.
// Build: g++ -O2 -std=c++20 -pthread bench/load_floor.cpp -o build/load_floor
// Usage: build/load_floor FILE [threads=1] [packed_mb=329.2]
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

namespace {

double now_ms() {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// `bytes` of fresh anonymous memory, 2 MiB-aligned, asking for transparent huge pages.
char* huge_page_buffer(size_t bytes) {
  constexpr size_t kHuge = size_t{2} << 20;
  void* p = ::mmap(nullptr, bytes + kHuge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) std::exit(1);
  char* aligned = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(p) + kHuge - 1) & ~(kHuge - 1));
  ::madvise(aligned, bytes, MADV_HUGEPAGE);
  return aligned;
}

// body(begin, end) on `threads` threads over [0, total), split at 4 KiB boundaries.
template <class Body>
void in_parallel(int threads, size_t total, Body body) {
  std::vector<std::thread> pool;
  for (int i = 0; i < threads; ++i) {
    const size_t begin = total * i / threads / 4096 * 4096;
    const size_t end = i + 1 == threads ? total : total * (i + 1) / threads / 4096 * 4096;
    pool.emplace_back([=] { body(begin, end); });
  }
  for (auto& t : pool) t.join();
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s FILE [threads=1] [packed_mb=329.2]\n", argv[0]);
    return 2;
  }
  const int threads = argc > 2 ? std::atoi(argv[2]) : 1;
  const size_t packed = static_cast<size_t>((argc > 3 ? std::atof(argv[3]) : 329.2) * 1024 * 1024);
  const int fd = ::open(argv[1], O_RDONLY | O_CLOEXEC);
  struct stat st {};
  if (fd < 0 || ::fstat(fd, &st) != 0) {
    std::perror(argv[1]);
    return 1;
  }
  const size_t file_size = static_cast<size_t>(st.st_size);

  double t0 = now_ms();
  char* fresh = huge_page_buffer(packed);
  in_parallel(threads, packed, [&](size_t b, size_t e) { std::memset(fresh + b, 1, e - b); });
  const double fresh_ms = now_ms() - t0;

  t0 = now_ms();
  in_parallel(threads, file_size, [&](size_t b, size_t e) {
    std::vector<char> buffer(256 << 10);
    for (size_t at = b; at < e; at += buffer.size())
      if (::pread(fd, buffer.data(), std::min(buffer.size(), e - at), static_cast<off_t>(at)) < 0) std::exit(1);
  });
  const double pread_ms = now_ms() - t0;

  char* source = huge_page_buffer(packed);
  std::memset(source, 2, packed);
  t0 = now_ms();
  in_parallel(threads, packed, [&](size_t b, size_t e) { std::memcpy(fresh + b, source + b, e - b); });
  const double memcpy_ms = now_ms() - t0;

  std::printf("%d threads: fresh %.0f MB %.1f ms, pread %.0f MB %.1f ms, memcpy %.1f ms\n", threads,
              packed / 1e6, fresh_ms, file_size / 1e6, pread_ms, memcpy_ms);
  return 0;
}
