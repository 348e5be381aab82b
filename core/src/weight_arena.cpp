// WeightArena: the packed weights of one model load, cut from 2 MiB-aligned slabs that ask for
// transparent huge pages.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <new>

#include "tessera/gemm.hpp"

namespace tessera {
namespace {

constexpr size_t kHugePage = size_t{2} << 20;
// Address space reserved per slab (MAP_NORESERVE: only the pages pieces touch become memory);
// big enough that a ViT-B's 330 MB of fp32 weights take two slabs.
constexpr size_t kSlabBytes = size_t{256} << 20;

size_t round_up(size_t n, size_t to) { return (n + to - 1) / to * to; }

// Cache file: magic, version, key length, key, piece count, piece sizes (uint64 each), zeros to
// the next 4 KiB, then the pieces back to back (each a multiple of 64 bytes).
constexpr char kMagic[8] = {'T', 'S', 'R', 'P', 'A', 'C', 'K', '1'};
constexpr size_t kDataAlign = 4096;

std::string errno_text() { return std::strerror(errno); }

// Writes all of [data, data + n) to fd; false on error.
bool write_all(int fd, const void* data, size_t n) {
  const auto* p = static_cast<const uint8_t*>(data);
  while (n > 0) {
    const ssize_t w = ::write(fd, p, std::min<size_t>(n, size_t{1} << 30));
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return false;
    p += w;
    n -= static_cast<size_t>(w);
  }
  return true;
}

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

// A cache file mapped private and writable (writes copy the page; the file never changes).
struct WeightArena::Mapping {
  uint8_t* base = nullptr;
  size_t size = 0;
  ~Mapping() {
    if (base) ::munmap(base, size);
  }
};

bool WeightArena::replay(const std::string& path, const std::string& key) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return false;
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) || st.st_size < 40) {
    ::close(fd);
    return false;
  }
  auto map = std::make_shared<Mapping>();
  map->size = static_cast<size_t>(st.st_size);
  void* p = ::mmap(nullptr, map->size, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
  ::close(fd);  // the mapping keeps the file's contents; no descriptor stays open
  if (p == MAP_FAILED) return false;
  map->base = static_cast<uint8_t*>(p);
  ::madvise(p, map->size, MADV_HUGEPAGE);   // pages read in from now on come as 2 MiB folios
  ::madvise(p, map->size, MADV_WILLNEED);  // start reading it in if it is not in the page cache
  const uint8_t* b = map->base;
  auto u64 = [&](size_t at) {
    uint64_t v;
    std::memcpy(&v, b + at, 8);
    return v;
  };
  if (std::memcmp(b, kMagic, 8) != 0 || u64(8) != static_cast<uint64_t>(kPackedLayoutVersion))
    return false;  // not ours, or another layout version: ignore it
  const uint64_t key_len = u64(16);
  if (key_len != key.size() || 24 + key_len + 8 > map->size ||
      std::memcmp(b + 24, key.data(), key.size()) != 0)
    return false;  // made from other files (or another dtype): a stale cache
  const uint64_t count = u64(24 + key_len);
  const size_t header = 32 + key_len;
  check(count <= (map->size - header) / 8, path + ": packed-weight cache is damaged (piece table)");
  std::vector<uint64_t> sizes(count);
  uint64_t total = 0;
  for (uint64_t i = 0; i < count; ++i) {
    sizes[i] = u64(header + 8 * i);
    check(sizes[i] % 64 == 0 && sizes[i] <= map->size, path + ": packed-weight cache is damaged (piece size)");
    total += sizes[i];
  }
  const size_t data = round_up(header + 8 * count, kDataAlign);
  if (data + total != map->size)
    fail(path + ": packed-weight cache is damaged (" + std::to_string(map->size) + " bytes, expected " +
         std::to_string(data + total) + ")");
  std::lock_guard<std::mutex> lock(mutex_);
  mapping_ = std::move(map);
  sizes_ = std::move(sizes);
  next_ = 0;
  offset_ = data;
  return true;
}

void WeightArena::finish_replay() const {
  if (mapping_ && next_ != sizes_.size())
    throw CacheMismatch("the packed-weight cache holds " + std::to_string(sizes_.size()) +
                        " pieces, the load used " + std::to_string(next_));
}

void WeightArena::save(const std::string& path, const std::string& key) const {
  check(!mapping_, "WeightArena::save while replaying a cache");
  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) fail(tmp + ": cannot create (" + errno_text() + ")");
  std::vector<uint8_t> header(32 + key.size() + 8 * pieces_.size());
  auto put = [&](size_t at, uint64_t v) { std::memcpy(header.data() + at, &v, 8); };
  std::memcpy(header.data(), kMagic, 8);
  put(8, static_cast<uint64_t>(kPackedLayoutVersion));
  put(16, key.size());
  std::memcpy(header.data() + 24, key.data(), key.size());
  put(24 + key.size(), pieces_.size());
  for (size_t i = 0; i < pieces_.size(); ++i) put(32 + key.size() + 8 * i, pieces_[i].second);
  header.resize(round_up(header.size(), kDataAlign), 0);
  // Written in whole 2 MiB blocks at 2 MiB offsets, so the page cache keeps the file in 2 MiB
  // folios, which a replay's mapping then gets as huge pages (with the pieces' own sizes, most
  // writes straddle block boundaries and leave small folios: ~30% of a ViT-B's).
  std::vector<uint8_t> block;
  block.reserve(kHugePage);
  bool ok = true;
  auto append = [&](const void* data, size_t n) {
    const auto* p = static_cast<const uint8_t*>(data);
    while (ok && n > 0) {
      const size_t take = std::min(n, kHugePage - block.size());
      block.insert(block.end(), p, p + take);
      p += take;
      n -= take;
      if (block.size() == kHugePage) {
        ok = write_all(fd, block.data(), block.size());
        block.clear();
      }
    }
  };
  append(header.data(), header.size());
  for (const auto& [data, bytes] : pieces_) append(data, bytes);
  if (ok && !block.empty()) ok = write_all(fd, block.data(), block.size());
  const std::string why = ok ? "" : errno_text();
  if (::close(fd) != 0 && ok) ok = false;
  if (!ok || ::rename(tmp.c_str(), path.c_str()) != 0) {
    const std::string reason = why.empty() ? errno_text() : why;
    ::unlink(tmp.c_str());
    fail(path + ": cannot write the packed-weight cache (" + reason + ")");
  }
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

std::shared_ptr<float[]> WeightArena::floats(size_t n) { return cut(n, false); }

std::shared_ptr<float[]> WeightArena::writable_floats(size_t n) { return cut(n, true); }

std::shared_ptr<float[]> WeightArena::cut(size_t n, bool writable) {
  const size_t bytes = round_up(std::max<size_t>(n * sizeof(float), 64), 64);
  std::lock_guard<std::mutex> lock(mutex_);
  if (mapping_) {
    if (next_ >= sizes_.size() || sizes_[next_] != bytes)
      throw CacheMismatch("the packed-weight cache's piece " + std::to_string(next_) +
                          " does not match the load");
    auto* p = reinterpret_cast<float*>(mapping_->base + offset_);
    offset_ += bytes;
    ++next_;
    if (!writable) return std::shared_ptr<float[]>(mapping_, p);
  }
  if (!slab_ || slab_->size - used_ < bytes) {
    retire();
    slab_ = new_slab(bytes);
  }
  auto* p = reinterpret_cast<float*>(slab_->base + used_);
  used_ += bytes;
  if (!mapping_) pieces_.emplace_back(p, bytes);  // what save() writes
  return std::shared_ptr<float[]>(slab_, p);  // shares the slab's ownership, points at the piece
}

}  // namespace tessera
