#pragma once
// Tensor: a float32 array with a shape, row-major and contiguous. Storage is shared (copies are
// cheap and alias, as in PyTorch); it is either owned (64-byte aligned, zeroed) or a view into
// memory kept alive by an opaque owner (e.g. a memory-mapped safetensors file).
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <span>
#include <string>
#include <vector>

namespace tessera {

using Shape = std::vector<int64_t>;

std::string shape_str(const Shape& shape);  // "[2, 3, 224, 224]"
int64_t shape_numel(const Shape& shape);

// Allocates n floats aligned to 64 bytes (one cache line, one AVX-512 register).
std::shared_ptr<float[]> aligned_floats(size_t n);

class Tensor {
 public:
  Tensor() = default;
  explicit Tensor(Shape shape);  // owned, zero-filled
  Tensor(std::initializer_list<int64_t> shape) : Tensor(Shape(shape)) {}
  // A view of `data` (not copied); `owner` keeps that memory alive.
  static Tensor view(const float* data, Shape shape, std::shared_ptr<const void> owner = {});

  float* data() { return ptr_; }
  const float* data() const { return ptr_; }
  const Shape& shape() const { return shape_; }
  int64_t dim(int i) const { return shape_.at(i < 0 ? shape_.size() + i : i); }
  int ndim() const { return static_cast<int>(shape_.size()); }
  int64_t numel() const { return shape_numel(shape_); }
  bool empty() const { return ptr_ == nullptr; }
  std::span<float> span() { return {ptr_, static_cast<size_t>(numel())}; }
  std::span<const float> span() const { return {ptr_, static_cast<size_t>(numel())}; }
  float& operator[](int64_t i) { return ptr_[i]; }
  float operator[](int64_t i) const { return ptr_[i]; }

  // Same storage, another shape of the same element count.
  Tensor reshape(Shape shape) const;
  // Rows [begin, end) of the first dimension, sharing storage.
  Tensor slice0(int64_t begin, int64_t end) const;
  // A deep copy into owned storage.
  Tensor clone() const;

 private:
  std::shared_ptr<const void> owner_;
  float* ptr_ = nullptr;
  Shape shape_;
};

}  // namespace tessera
