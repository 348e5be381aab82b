#pragma once
// safetensors I/O. Reading memory-maps the file and validates everything before any tensor is
// used: header length and JSON, dtypes, shapes against byte ranges, offsets that overlap or run
// past the data. get() uses F32 tensors in place; F16/BF16/F64 are converted to F32 once; read()
// copies through pread instead, for weights that must not keep the mapping resident. A sharded
// checkpoint (model.safetensors.index.json) opens as one. Every error names the file and tensor.
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "tessera/tensor.hpp"

namespace tessera {

struct TensorInfo {
  std::string name;
  std::string dtype;  // as written: "F32", "F16", "BF16", "F64", "I64", ...
  Shape shape;
  std::string file;   // the file that holds it
};

class SafeTensors {
 public:
  // path: a .safetensors file, or a model.safetensors.index.json naming shards (any path ending
  // in ".json" is read as an index; shard file names are relative to its directory). For an
  // index, metadata() is the index's "metadata" (non-strings as JSON text, e.g. total_size)
  // plus the shards' __metadata__ keys it does not already have.
  static SafeTensors open(const std::string& path);

  const std::string& path() const;
  std::vector<std::string> names() const;  // sorted
  bool contains(const std::string& name) const;
  const TensorInfo& info(const std::string& name) const;  // Error if missing
  const std::map<std::string, std::string>& metadata() const;

  // The tensor as float32 (in place when stored as F32, converted otherwise).
  // In place means a view of the read-only mapping (kept alive by the Tensor, also after this
  // object is gone): clone() before writing into it. F16/BF16/F64, the integer dtypes, BOOL and
  // the F8 kinds are converted into a fresh Tensor on every call (integers beyond 2^24 round);
  // C64 throws. The file must not be truncated while mapped (the OS would raise SIGBUS).
  Tensor get(const std::string& name) const;
  // Same, checking its shape: "FILE: tensor 'NAME' has shape [..], expected [..]".
  Tensor get(const std::string& name, const Shape& expected) const;

  // Copies instead of views: elements [begin, begin + count) of the tensor (flattened), as
  // float32 (converted as get() does) into dst, read from the file with pread rather than through
  // the mapping. The mapping's pages then never count in this process's memory, and nothing
  // keeps them alive: this is how a model loader reads weights it re-packs, or keeps. Safe to call
  // from several threads at once. A file that shrank after open() is an Error, not a SIGBUS.
  void read(const std::string& name, int64_t begin, int64_t count, float* dst) const;
  // The whole tensor, read that way into a fresh Tensor.
  Tensor read(const std::string& name) const;

 private:
  struct Impl;
  std::shared_ptr<const Impl> impl_;
};

// Writes F32 tensors (and string metadata) to `path` atomically: a temporary file in the same
// directory, then rename.
void save_safetensors(const std::string& path,
                      const std::vector<std::pair<std::string, Tensor>>& tensors,
                      const std::map<std::string, std::string>& metadata = {});

}  // namespace tessera
