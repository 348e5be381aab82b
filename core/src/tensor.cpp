#include <sys/mman.h>

#include "tessera/tensor.hpp"

#include <cstdlib>
#include <cstring>
#include <new>

#include "tessera/error.hpp"

namespace tessera {

std::string shape_str(const Shape& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

int64_t shape_numel(const Shape& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::shared_ptr<float[]> aligned_floats(size_t n) {
  size_t bytes = ((n * sizeof(float) + 63) / 64) * 64;
  if (bytes == 0) bytes = 64;
  // Tensors of 2 MiB or more (activations at batch 8, qkv, images) ask for transparent huge
  // pages: kernels walk their rows thousands of floats apart (attention reads a head's 64 columns
  // of every qkv row), and on 4 KiB pages each row is a TLB miss.
  constexpr size_t kHuge = size_t{2} << 20;
  const bool huge = bytes >= kHuge;
  void* p = huge ? std::aligned_alloc(kHuge, (bytes + kHuge - 1) / kHuge * kHuge)
                 : std::aligned_alloc(64, bytes);
  if (!p) throw std::bad_alloc();
  if (huge) ::madvise(p, (bytes + kHuge - 1) / kHuge * kHuge, MADV_HUGEPAGE);  // a hint; may fail
  std::memset(p, 0, bytes);
  return std::shared_ptr<float[]>(static_cast<float*>(p), [](float* q) { std::free(q); });
}

Tensor::Tensor(Shape shape) : shape_(std::move(shape)) {
  for (int64_t d : shape_) check(d >= 0, "negative dimension in shape " + shape_str(shape_));
  auto storage = aligned_floats(static_cast<size_t>(numel()));
  ptr_ = storage.get();
  owner_ = std::move(storage);
}

Tensor Tensor::view(const float* data, Shape shape, std::shared_ptr<const void> owner) {
  Tensor t;
  t.ptr_ = const_cast<float*>(data);
  t.shape_ = std::move(shape);
  t.owner_ = std::move(owner);
  return t;
}

Tensor Tensor::reshape(Shape shape) const {
  check(shape_numel(shape) == numel(),
        "cannot reshape " + shape_str(shape_) + " to " + shape_str(shape));
  Tensor t = *this;
  t.shape_ = std::move(shape);
  return t;
}

Tensor Tensor::slice0(int64_t begin, int64_t end) const {
  check(ndim() >= 1 && 0 <= begin && begin <= end && end <= shape_[0],
        "slice [" + std::to_string(begin) + ", " + std::to_string(end) + ") out of " + shape_str(shape_));
  Tensor t = *this;
  int64_t row = numel() / (shape_[0] ? shape_[0] : 1);
  t.ptr_ = ptr_ + begin * row;
  t.shape_[0] = end - begin;
  return t;
}

Tensor Tensor::clone() const {
  Tensor t(shape_);
  if (numel()) std::memcpy(t.ptr_, ptr_, sizeof(float) * numel());
  return t;
}

}  // namespace tessera
