// WeightArena: the packed weights of one model load, cut from 2 MiB-aligned slabs that ask for
// transparent huge pages.
#include <sys/mman.h>

#include <algorithm>
#include <cstdint>
#include <new>

#include "tessera/gemm.hpp"

namespace tessera {
namespace {

constexpr size_t kHugePage = size_t{2} << 20;
// Address space reserved per slab (MAP_NORESERVE: only the pages pieces touch become memory);
// big enough that a ViT-B's 330 MB of fp32 weights take two slabs.
constexpr size_t kSlabBytes = size_t{256} << 20;

size_t round_up(size_t n, size_t to) { return (n + to - 1) / to * to; }

}  // namespace

// An anonymous mapping, 2 MiB-aligned; every piece cut from it holds a reference.
struct WeightArena::Slab {
  uint8_t* base = nullptr;
  size_t size = 0;
  Slab() = default;
  Slab(const Slab&) = delete;
  Slab& operator=(const Slab&) = delete;
  ~Slab() {
    if (base) ::munmap(base, size);
  }
};

std::shared_ptr<WeightArena::Slab> WeightArena::new_slab(size_t at_least) {
  auto slab = std::make_shared<Slab>();
  for (size_t size : {std::max(kSlabBytes, round_up(at_least, kHugePage)), round_up(at_least, kHugePage)}) {
    // Over-map by 2 MiB and cut the ends, so the slab starts on a huge-page boundary.
    const size_t span = size + kHugePage;
    void* p = ::mmap(nullptr, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) continue;  // a strict overcommit policy may refuse the reserve: try the minimum
    auto* raw = static_cast<uint8_t*>(p);
    auto* base = reinterpret_cast<uint8_t*>(round_up(reinterpret_cast<uintptr_t>(raw), kHugePage));
    if (base > raw) ::munmap(raw, static_cast<size_t>(base - raw));
    if (raw + span > base + size) ::munmap(base + size, static_cast<size_t>(raw + span - (base + size)));
    ::madvise(base, size, MADV_HUGEPAGE);  // a hint: without THP the pages are 4 KiB, and that works too
    slab->base = base;
    slab->size = size;
    return slab;
  }
  throw std::bad_alloc();
}

void WeightArena::retire() {
  if (!slab_) return;
  // Give back the 2 MiB chunks no piece reaches; the pieces keep the rest until they go.
  const size_t keep = round_up(used_, kHugePage);
  if (keep < slab_->size) {
    ::munmap(slab_->base + keep, slab_->size - keep);
    slab_->size = keep;
  }
  slab_.reset();
  used_ = 0;
}

WeightArena::~WeightArena() { retire(); }

std::shared_ptr<float[]> WeightArena::floats(size_t n) {
  const size_t bytes = round_up(std::max<size_t>(n * sizeof(float), 64), 64);
  std::lock_guard<std::mutex> lock(mutex_);
  if (!slab_ || slab_->size - used_ < bytes) {
    retire();
    slab_ = new_slab(bytes);
  }
  auto* p = reinterpret_cast<float*>(slab_->base + used_);
  used_ += bytes;
  return std::shared_ptr<float[]>(slab_, p);  // shares the slab's ownership, points at the piece
}

}  // namespace tessera
