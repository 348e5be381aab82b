#include "tessera/safetensors.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <random>
#include <set>
#include <sstream>

#include "tessera/error.hpp"
#include "tessera/limits.hpp"

namespace tessera {

static_assert(std::endian::native == std::endian::little,
              "safetensors is little-endian; Tessera reads it in place and assumes a little-endian host");

namespace {

using json = nlohmann::json;

// The official reader's limit; a larger header means the file is not safetensors (or is corrupt).
constexpr uint64_t kMaxHeaderBytes = 100'000'000;

struct DType {
  const char* name;
  int bytes;
  bool as_float;  // Tessera can convert it to float32
};

// Every dtype the format defines with a whole number of bytes per element. F4/F6 (packed sub-byte)
// are not listed and are rejected as unsupported.
constexpr DType kDTypes[] = {
    {"F32", 4, true},      {"F16", 2, true},     {"BF16", 2, true},    {"F64", 8, true},
    {"I64", 8, true},      {"I32", 4, true},     {"I16", 2, true},     {"I8", 1, true},
    {"U64", 8, true},      {"U32", 4, true},     {"U16", 2, true},     {"U8", 1, true},
    {"BOOL", 1, true},     {"F8_E4M3", 1, true}, {"F8_E5M2", 1, true}, {"F8_E8M0", 1, true},
    {"C64", 8, false},
};

const DType* find_dtype(const std::string& name) {
  for (const DType& d : kDTypes)
    if (name == d.name) return &d;
  return nullptr;
}

std::string errno_text(int err) { return std::strerror(err); }

// A read-only, private mapping of a whole file; Tensors viewing it hold a shared_ptr to it.
struct Mapping {
  const uint8_t* data = nullptr;
  size_t size = 0;
  Mapping() = default;
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
  ~Mapping() {
    if (data) ::munmap(const_cast<uint8_t*>(data), size);
  }
};

// The file's descriptor, kept open for read() while the SafeTensors object lives (views of the
// mapping do not need it).
struct OpenFile {
  int fd = -1;
  OpenFile() = default;
  OpenFile(const OpenFile&) = delete;
  OpenFile& operator=(const OpenFile&) = delete;
  ~OpenFile() {
    if (fd >= 0) ::close(fd);
  }
};

struct Entry {
  TensorInfo info;
  const DType* dtype = nullptr;
  std::shared_ptr<const Mapping> mapping;
  std::shared_ptr<const OpenFile> file;
  const uint8_t* bytes = nullptr;  // start of the tensor's data inside the mapping
  uint64_t nbytes = 0;
  uint64_t offset = 0;  // the same, as an offset into the file
};

struct Shard {
  std::string path;
  std::map<std::string, Entry> entries;
  std::map<std::string, std::string> metadata;
};

// JSON fragments in messages stay on one line and short.
// (Values are at most kMaxJsonDepth deep, so dump() cannot recurse far.)
std::string brief(const json& value) {
  return brief_text(value.dump(-1, ' ', false, json::error_handler_t::replace));
}

// A tensor or key name as a message shows it: one line, not megabytes.
std::string name_str(const std::string& name) { return brief_text(name, 120); }

// SAX handler building the header's DOM (nlohmann's own DOM builder) while it counts tensors,
// notices a repeated name, and stops at kMaxJsonDepth. nlohmann's callback parser is not used:
// after each nested object it scans its parent for discarded values, quadratic in the tensor count.
struct HeaderSax {
  nlohmann::detail::json_sax_dom_parser<json> dom;
  int depth = 0;
  size_t tensors = 0;
  std::set<std::string> seen;
  std::string duplicate, problem;

  explicit HeaderSax(json& root) : dom(root, true) {}
  bool null() { return dom.null(); }
  bool boolean(bool v) { return dom.boolean(v); }
  bool number_integer(json::number_integer_t v) { return dom.number_integer(v); }
  bool number_unsigned(json::number_unsigned_t v) { return dom.number_unsigned(v); }
  bool number_float(json::number_float_t v, const std::string& s) { return dom.number_float(v, s); }
  bool string(std::string& v) { return dom.string(v); }
  bool binary(json::binary_t& v) { return dom.binary(v); }
  bool open(bool object, size_t n) {
    if (++depth > kMaxJsonDepth) {
      problem = "header nests more than " + std::to_string(kMaxJsonDepth) + " levels deep";
      return false;
    }
    return object ? dom.start_object(n) : dom.start_array(n);
  }
  bool start_object(size_t n) { return open(true, n); }
  bool start_array(size_t n) { return open(false, n); }
  bool end_object() { --depth; return dom.end_object(); }
  bool end_array() { --depth; return dom.end_array(); }
  bool key(std::string& k) {
    if (depth == 1) {
      if (k != "__metadata__" && ++tensors > kMaxSafetensorsTensors) {
        problem = "header lists more than " + std::to_string(kMaxSafetensorsTensors) + " tensors";
        return false;
      }
      if (!seen.insert(k).second && duplicate.empty()) duplicate = k;
    }
    return dom.key(k);
  }
  template <class Exception>
  bool parse_error(size_t pos, const std::string& token, const Exception& e) {
    return dom.parse_error(pos, token, e);  // throws e
  }
};

// "[begin, end]" (built by appending: GCC 12 warns falsely on "[" + std::to_string(...)).
std::string range_str(uint64_t begin, uint64_t end) {
  std::string s = "[";
  s += std::to_string(begin);
  s += ", ";
  s += std::to_string(end);
  s += "]";
  return s;
}

std::string one_line(std::string s) {
  for (char& c : s)
    if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f) c = ' ';
  if (s.size() > 200) s = s.substr(0, 197) + "...";
  return s;
}

// Opens `path` for reading and returns the fd; every failure is an Error naming the path.
int open_readable(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    int err = errno;
    if (err == ENOENT) fail(path + ": no such file");
    if (err == EACCES) fail(path + ": cannot read it (permission denied)");
    fail(path + ": cannot open it (" + errno_text(err) + ")");
  }
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    int err = errno;
    ::close(fd);
    fail(path + ": cannot stat it (" + errno_text(err) + ")");
  }
  if (S_ISDIR(st.st_mode)) {
    ::close(fd);
    fail(path + ": is a directory; expected a .safetensors file or a model.safetensors.index.json");
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    fail(path + ": is not a regular file");
  }
  return fd;
}

// Maps the file and keeps its descriptor open in `file`.
std::shared_ptr<const Mapping> map_file(const std::string& path, std::shared_ptr<const OpenFile>& file) {
  auto open_file = std::make_shared<OpenFile>();
  open_file->fd = open_readable(path);
  const int fd = open_file->fd;
  struct stat st {};
  ::fstat(fd, &st);
  auto mapping = std::make_shared<Mapping>();
  mapping->size = static_cast<size_t>(st.st_size);
  if (mapping->size < 8)
    fail(path + ": file is " + std::to_string(mapping->size) +
         " bytes, too short for a safetensors file (the header length alone takes 8)");
  void* p = ::mmap(nullptr, mapping->size, PROT_READ, MAP_PRIVATE, fd, 0);
  if (p == MAP_FAILED) fail(path + ": cannot memory-map it (" + errno_text(errno) + ")");
  mapping->data = static_cast<const uint8_t*>(p);
  file = std::move(open_file);
  return mapping;
}

// Shape from JSON: an array of non-negative integers.
Shape parse_shape(const std::string& where, const json& value) {
  if (!value.is_array()) fail(where + ": shape " + brief(value) + " is not an array of integers");
  Shape shape;
  for (const json& d : value) {
    if (d.is_number_unsigned()) {
      if (d.get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
        fail(where + ": shape " + brief(value) + " has a dimension too large");
      shape.push_back(static_cast<int64_t>(d.get<uint64_t>()));
    } else if (d.is_number_integer()) {
      fail(where + ": shape " + brief(value) + " has a negative dimension");
    } else {
      fail(where + ": shape " + brief(value) + " has a dimension that is not an integer");
    }
  }
  return shape;
}

// numel * itemsize, or nullopt-like max() when it overflows 64 bits (the caller reports it).
uint64_t byte_size(const Shape& shape, int itemsize) {
  unsigned __int128 n = static_cast<unsigned>(itemsize);
  for (int64_t d : shape) {
    n *= static_cast<uint64_t>(d);
    if (n > std::numeric_limits<uint64_t>::max()) {
      // A zero later on still makes it empty.
      bool has_zero = std::find(shape.begin(), shape.end(), 0) != shape.end();
      return has_zero ? 0 : std::numeric_limits<uint64_t>::max();
    }
  }
  return static_cast<uint64_t>(n);
}

uint64_t parse_offset(const std::string& where, const json& offsets, const json& v) {
  if (!v.is_number_unsigned())
    fail(where + ": data_offsets " + brief(offsets) + " must be [begin, end] with non-negative integers");
  return v.get<uint64_t>();
}

// Reads and validates one .safetensors file.
Shard read_shard(const std::string& path) {
  Shard shard;
  shard.path = path;
  std::shared_ptr<const OpenFile> file;
  std::shared_ptr<const Mapping> mapping = map_file(path, file);
  const uint8_t* base = mapping->data;
  const uint64_t file_size = mapping->size;

  uint64_t header_len = 0;
  std::memcpy(&header_len, base, 8);
  if (header_len > kMaxHeaderBytes)
    fail(path + ": header length " + std::to_string(header_len) + " is absurd (more than " +
         std::to_string(kMaxHeaderBytes) + " bytes); not a safetensors file, or a corrupt one");
  if (header_len > file_size - 8)
    fail(path + ": header length " + std::to_string(header_len) + " runs past the end of the file (" +
         std::to_string(file_size) + " bytes); the file is truncated or not safetensors");

  const char* hbegin = reinterpret_cast<const char*>(base + 8);
  json header;
  HeaderSax sax(header);
  try {
    if (!json::sax_parse(hbegin, hbegin + header_len, &sax))
      fail(path + ": " + (sax.problem.empty() ? std::string("header is not valid JSON") : sax.problem) +
           "; not a safetensors file Tessera reads");
  } catch (const json::exception& e) {
    fail(path + ": header is not valid JSON (" + one_line(e.what()) + ")");
  }
  const std::string& duplicate = sax.duplicate;
  if (!header.is_object()) fail(path + ": header is JSON but not an object (it is a " + header.type_name() + ")");
  if (!duplicate.empty()) fail(path + ": header names tensor '" + name_str(duplicate) + "' twice");

  const uint8_t* data = base + 8 + header_len;
  const uint64_t data_size = file_size - 8 - header_len;

  for (auto it = header.begin(); it != header.end(); ++it) {
    const std::string& name = it.key();
    const json& value = it.value();
    if (name == "__metadata__") {
      if (!value.is_object()) fail(path + ": __metadata__ is not a map of strings to strings (it is " + brief(value) + ")");
      for (auto m = value.begin(); m != value.end(); ++m) {
        if (!m.value().is_string())
          fail(path + ": __metadata__ '" + name_str(m.key()) + "' is " + brief(m.value()) +
               ", not a string (__metadata__ must map strings to strings)");
        shard.metadata[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    const std::string where = path + ": tensor '" + name_str(name) + "'";
    if (!value.is_object()) fail(where + ": entry is " + brief(value) + ", not an object with dtype, shape, data_offsets");
    for (const char* key : {"dtype", "shape", "data_offsets"})
      if (!value.contains(key)) fail(where + ": entry has no '" + key + "'");

    const json& jdtype = value["dtype"];
    if (!jdtype.is_string()) fail(where + ": dtype " + brief(jdtype) + " is not a string");
    const std::string dtype_name = jdtype.get<std::string>();
    const DType* dtype = find_dtype(dtype_name);
    if (!dtype)
      fail(where + ": unknown or unsupported dtype '" + name_str(dtype_name) +
           "' (known: F32 F16 BF16 F64 I64 I32 I16 I8 U64 U32 U16 U8 BOOL F8_E4M3 F8_E5M2 F8_E8M0 C64)");

    Shape shape = parse_shape(where, value["shape"]);

    const json& offsets = value["data_offsets"];
    if (!offsets.is_array() || offsets.size() != 2)
      fail(where + ": data_offsets " + brief(offsets) + " is not [begin, end]");
    uint64_t begin = parse_offset(where, offsets, offsets[0]);
    uint64_t end = parse_offset(where, offsets, offsets[1]);
    const std::string range = range_str(begin, end);
    if (begin > end) fail(where + ": data_offsets " + range + " has begin > end");
    if (end > data_size)
      fail(where + ": data_offsets " + range + " run past the end of the data (" +
           std::to_string(data_size) + " bytes after the header); the file is truncated or corrupt");
    uint64_t need = byte_size(shape, dtype->bytes);
    if (end - begin != need)
      fail(where + ": data_offsets " + range + " hold " + std::to_string(end - begin) + " bytes but " +
           dtype_name + " " + shape_str(shape) + " needs " +
           (need == std::numeric_limits<uint64_t>::max() ? std::string("more than 2^64") : std::to_string(need)));
    // Every product of dimensions (what shape_numel and the loaders compute in int64) must fit,
    // even for an empty tensor whose byte size is 0: [2^62, 2^62, 0] would overflow on the way
    // (a non-empty one that large needs more bytes than any file has, refused just above).
    {
      unsigned __int128 product = 1;
      for (int64_t dim : shape) {
        if (dim == 0) continue;
        product *= static_cast<uint64_t>(dim);
        if (product > static_cast<unsigned __int128>(std::numeric_limits<int64_t>::max()))
          fail(where + ": shape " + brief(value["shape"]) + " has more than 2^63 elements");
      }
    }

    Entry entry;
    entry.info = TensorInfo{name, dtype_name, std::move(shape), path};
    entry.dtype = dtype;
    entry.mapping = mapping;
    entry.file = file;
    entry.bytes = data + begin;
    entry.nbytes = end - begin;
    entry.offset = 8 + header_len + begin;
    shard.entries.emplace(name, std::move(entry));
  }

  // Byte ranges must not overlap (empty tensors occupy nothing).
  std::vector<const Entry*> by_offset;
  for (const auto& [name, e] : shard.entries)
    if (e.nbytes) by_offset.push_back(&e);
  std::sort(by_offset.begin(), by_offset.end(), [](const Entry* a, const Entry* b) { return a->bytes < b->bytes; });
  for (size_t i = 1; i < by_offset.size(); ++i) {
    const Entry* a = by_offset[i - 1];
    const Entry* b = by_offset[i];
    if (a->bytes + a->nbytes > b->bytes) {
      auto range = [&](const Entry* e) {
        uint64_t off = static_cast<uint64_t>(e->bytes - data);
        return range_str(off, off + e->nbytes);
      };
      fail(path + ": tensors '" + a->info.name + "' " + range(a) + " and '" + b->info.name + "' " + range(b) +
           " overlap in the data section");
    }
  }
  return shard;
}

// --- conversion to float32 -------------------------------------------------------------------

float bits_to_float(uint32_t bits) { return std::bit_cast<float>(bits); }

float f16_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h >> 15) << 31;
  const uint32_t exp = (h >> 10) & 0x1f;
  const uint32_t mant = h & 0x3ff;
  if (exp == 0) {  // zero or subnormal: mant * 2^-24, exact in float32
    float v = std::ldexp(static_cast<float>(mant), -24);
    return sign ? -v : v;
  }
  if (exp == 31) return bits_to_float(sign | 0x7f800000u | (mant << 13));  // inf / NaN
  return bits_to_float(sign | ((exp + 112) << 23) | (mant << 13));
}

float bf16_to_float(uint16_t b) { return bits_to_float(static_cast<uint32_t>(b) << 16); }

// OCP FP8 E4M3 ("fn"): bias 7, no infinities, S.1111.111 is NaN.
float f8e4m3_to_float(uint8_t b) {
  const bool neg = b & 0x80;
  const int exp = (b >> 3) & 0xf;
  const int mant = b & 0x7;
  float v;
  if (exp == 15 && mant == 7) v = std::numeric_limits<float>::quiet_NaN();
  else if (exp == 0) v = std::ldexp(static_cast<float>(mant), -9);
  else v = std::ldexp(1.0f + mant / 8.0f, exp - 7);
  return neg ? -v : v;
}

// E5M2 is the top byte of an IEEE half.
float f8e5m2_to_float(uint8_t b) { return f16_to_float(static_cast<uint16_t>(b) << 8); }

// E8M0: an unsigned power of two, 0xFF is NaN.
float f8e8m0_to_float(uint8_t b) {
  if (b == 0xff) return std::numeric_limits<float>::quiet_NaN();
  return std::ldexp(1.0f, static_cast<int>(b) - 127);
}

template <typename T, typename F>
void convert(const uint8_t* src, float* dst, int64_t n, F f) {
  for (int64_t i = 0; i < n; ++i) {
    T v;
    std::memcpy(&v, src + i * sizeof(T), sizeof(T));  // the source may be unaligned
    dst[i] = f(v);
  }
}

// n elements of dtype d at s, as float32 into dst; false for a dtype that has no float value.
bool to_float32(const std::string& d, const uint8_t* s, int64_t n, float* dst) {
  auto cast = [](auto v) { return static_cast<float>(v); };
  if (d == "F32") std::memcpy(dst, s, static_cast<size_t>(n) * sizeof(float));
  else if (d == "F16") convert<uint16_t>(s, dst, n, f16_to_float);
  else if (d == "BF16") convert<uint16_t>(s, dst, n, bf16_to_float);
  else if (d == "F64") convert<double>(s, dst, n, cast);
  else if (d == "I64") convert<int64_t>(s, dst, n, cast);
  else if (d == "I32") convert<int32_t>(s, dst, n, cast);
  else if (d == "I16") convert<int16_t>(s, dst, n, cast);
  else if (d == "I8") convert<int8_t>(s, dst, n, cast);
  else if (d == "U64") convert<uint64_t>(s, dst, n, cast);
  else if (d == "U32") convert<uint32_t>(s, dst, n, cast);
  else if (d == "U16") convert<uint16_t>(s, dst, n, cast);
  else if (d == "U8") convert<uint8_t>(s, dst, n, cast);
  else if (d == "BOOL") convert<uint8_t>(s, dst, n, [](uint8_t v) { return v ? 1.0f : 0.0f; });
  else if (d == "F8_E4M3") convert<uint8_t>(s, dst, n, f8e4m3_to_float);
  else if (d == "F8_E5M2") convert<uint8_t>(s, dst, n, f8e5m2_to_float);
  else if (d == "F8_E8M0") convert<uint8_t>(s, dst, n, f8e8m0_to_float);
  else return false;
  return true;
}

[[noreturn]] void fail_not_float(const Entry& e) {
  fail(e.info.file + ": tensor '" + e.info.name + "' has dtype " + e.info.dtype + ", which cannot be read as float32");
}

// Reads n bytes at `offset` of the entry's file into dst; a short read (the file shrank after it
// was opened) or an I/O error is an Error naming the file and tensor.
void pread_all(const Entry& e, uint64_t offset, size_t n, void* dst) {
  auto* out = static_cast<uint8_t*>(dst);
  while (n > 0) {
    ssize_t got = ::pread(e.file->fd, out, n, static_cast<off_t>(offset));
    if (got < 0 && errno == EINTR) continue;
    if (got < 0) fail(e.info.file + ": tensor '" + e.info.name + "': cannot read it (" + errno_text(errno) + ")");
    if (got == 0)
      fail(e.info.file + ": tensor '" + e.info.name + "': the file ends at byte " + std::to_string(offset) +
           ", inside the tensor; was it truncated after it was opened?");
    out += got, offset += static_cast<uint64_t>(got), n -= static_cast<size_t>(got);
  }
}

size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<size_t> row(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    size_t diag = row[0];
    row[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      size_t up = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diag + (a[i - 1] != b[j - 1])});
      diag = up;
    }
  }
  return row[b.size()];
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

}  // namespace

// ---------------------------------------------------------------------------------------------

struct SafeTensors::Impl {
  std::string path;
  std::map<std::string, Entry> entries;
  std::map<std::string, std::string> metadata;
};

namespace {

// model.safetensors.index.json: {"metadata": {...}, "weight_map": {tensor: shard file}}.
void read_index(const std::string& path, std::map<std::string, Entry>& entries,
                std::map<std::string, std::string>& metadata) {
  ::close(open_readable(path));  // the same clear messages for missing / unreadable / directory
  const std::string text = read_regular_file(path, "safetensors index");
  check_json_depth(text, path);
  json index;
  try {
    index = json::parse(text);
  } catch (const json::exception& e) {
    fail(path + ": not valid JSON (" + one_line(e.what()) + ")");
  }
  if (!index.is_object()) fail(path + ": not a JSON object with a 'weight_map'");
  if (!index.contains("weight_map")) fail(path + ": has no 'weight_map' (expected {\"weight_map\": {tensor: shard file}})");
  const json& weight_map = index["weight_map"];
  if (!weight_map.is_object()) fail(path + ": 'weight_map' is not a map from tensor names to shard files");

  if (index.contains("metadata") && !index["metadata"].is_null()) {
    const json& m = index["metadata"];
    if (!m.is_object()) fail(path + ": 'metadata' is " + brief(m) + ", not an object");
    // Hugging Face writes {"total_size": N}; non-strings are kept as their JSON text.
    for (auto it = m.begin(); it != m.end(); ++it)
      metadata[it.key()] = it.value().is_string() ? it.value().get<std::string>() : it.value().dump();
  }

  const std::filesystem::path dir = std::filesystem::path(path).parent_path();
  std::map<std::string, std::string> shard_of;  // tensor -> shard file as written
  std::vector<std::string> shard_files;         // distinct, in order of first mention
  std::set<std::string> shard_set;              // the same, to look up in log time
  for (auto it = weight_map.begin(); it != weight_map.end(); ++it) {
    if (!it.value().is_string())
      fail(path + ": weight_map entry for tensor '" + name_str(it.key()) + "' is " + brief(it.value()) + ", not a shard file name");
    const std::string file = it.value().get<std::string>();
    const std::filesystem::path rel(file);
    bool escapes = file.empty() || rel.is_absolute();
    for (const auto& part : rel) escapes = escapes || part == "..";
    if (escapes)
      fail(path + ": weight_map puts tensor '" + name_str(it.key()) + "' in '" + name_str(file) +
           "', which is not a file name relative to the index's directory");
    shard_of[it.key()] = file;
    if (shard_set.insert(file).second) shard_files.push_back(file);
  }

  std::map<std::string, std::string> found_in;  // tensor -> shard that holds it
  for (const std::string& file : shard_files) {
    const std::string shard_path = (dir / file).string();
    Shard shard;
    try {
      shard = read_shard(shard_path);
    } catch (const Error& e) {
      fail(path + ": shard '" + name_str(file) + "': " + e.what());
    }
    for (auto& [name, entry] : shard.entries) {
      auto [pos, inserted] = found_in.emplace(name, file);
      if (!inserted)
        fail(path + ": tensor '" + name_str(name) + "' is in two shards, '" + name_str(pos->second) + "' and '" + name_str(file) + "'");
      auto listed = shard_of.find(name);
      if (listed == shard_of.end())
        fail(path + ": shard '" + name_str(file) + "' holds tensor '" + name_str(name) + "', which the weight_map does not list");
      if (listed->second != file)
        fail(path + ": weight_map puts tensor '" + name_str(name) + "' in '" + name_str(listed->second) + "', but shard '" + file +
             "' holds it");
      entries.emplace(name, std::move(entry));
    }
    for (const auto& [key, value] : shard.metadata) metadata.emplace(key, value);  // index keys win
  }
  for (const auto& [name, file] : shard_of)
    if (!found_in.count(name))
      fail(path + ": weight_map puts tensor '" + name_str(name) + "' in '" + name_str(file) + "', but that shard has no tensor '" + name_str(name) + "'");
}

}  // namespace

SafeTensors SafeTensors::open(const std::string& path) {
  auto impl = std::make_shared<Impl>();
  impl->path = path;
  if (ends_with(path, ".json")) {
    read_index(path, impl->entries, impl->metadata);
  } else {
    Shard shard = read_shard(path);
    impl->entries = std::move(shard.entries);
    impl->metadata = std::move(shard.metadata);
  }
  SafeTensors st;
  st.impl_ = std::move(impl);
  return st;
}

const std::string& SafeTensors::path() const {
  check(impl_ != nullptr, "SafeTensors: used before open()");
  return impl_->path;
}

std::vector<std::string> SafeTensors::names() const {
  check(impl_ != nullptr, "SafeTensors: used before open()");
  std::vector<std::string> out;
  out.reserve(impl_->entries.size());
  for (const auto& [name, e] : impl_->entries) out.push_back(name);
  return out;
}

bool SafeTensors::contains(const std::string& name) const {
  return impl_ && impl_->entries.count(name) > 0;
}

const TensorInfo& SafeTensors::info(const std::string& name) const {
  check(impl_ != nullptr, "SafeTensors: used before open()");
  auto it = impl_->entries.find(name);
  if (it == impl_->entries.end()) {
    std::string message = impl_->path + ": no tensor '" + name_str(name) + "'";
    // Point at the likely intended name (a missing "vit." prefix, a typo).
    const std::string* best = nullptr;
    size_t best_distance = std::max<size_t>(3, name.size() / 4) + 1;
    for (const auto& [candidate, e] : impl_->entries) {
      // The distance is at least the length difference: skip those that cannot win (cheaply, so a
      // header of 10^5 long names does not turn one missing tensor into minutes of work).
      const size_t gap = name.size() > candidate.size() ? name.size() - candidate.size() : candidate.size() - name.size();
      if (gap >= best_distance) continue;
      size_t d = edit_distance(name, candidate);
      if (d < best_distance) best_distance = d, best = &candidate;
    }
    if (best) message += "; did you mean '" + name_str(*best) + "'?";
    fail(message);
  }
  return it->second.info;
}

const std::map<std::string, std::string>& SafeTensors::metadata() const {
  check(impl_ != nullptr, "SafeTensors: used before open()");
  return impl_->metadata;
}

Tensor SafeTensors::get(const std::string& name) const {
  info(name);  // throws the helpful message when missing
  const Entry& e = impl_->entries.at(name);
  const bool aligned = reinterpret_cast<uintptr_t>(e.bytes) % alignof(float) == 0;
  if (e.info.dtype == "F32" && aligned && e.nbytes > 0)
    return Tensor::view(reinterpret_cast<const float*>(e.bytes), e.info.shape, e.mapping);
  if (!e.dtype->as_float) fail_not_float(e);
  Tensor t(e.info.shape);
  if (t.numel() > 0 && !to_float32(e.info.dtype, e.bytes, t.numel(), t.data())) fail_not_float(e);
  return t;
}

void SafeTensors::read(const std::string& name, int64_t begin, int64_t count, float* dst) const {
  info(name);  // throws the helpful message when missing
  const Entry& e = impl_->entries.at(name);
  const int64_t numel = shape_numel(e.info.shape);
  if (begin < 0 || count < 0 || begin > numel || count > numel - begin)
    fail(e.info.file + ": tensor '" + name + "': elements [" + std::to_string(begin) + ", " +
         std::to_string(begin + count) + ") asked for, but it has " + std::to_string(numel));
  if (!e.dtype->as_float) fail_not_float(e);
  const uint64_t item = static_cast<uint64_t>(e.dtype->bytes);
  const uint64_t offset = e.offset + static_cast<uint64_t>(begin) * item;
  if (e.info.dtype == "F32") return pread_all(e, offset, static_cast<size_t>(count) * sizeof(float), dst);
  // Other dtypes: read a slice at a time into a small buffer and convert it.
  alignas(64) uint8_t buffer[32 * 1024];
  const int64_t per_slice = static_cast<int64_t>(sizeof(buffer) / item);
  for (int64_t i = 0; i < count; i += per_slice) {
    const int64_t n = std::min(per_slice, count - i);
    pread_all(e, offset + static_cast<uint64_t>(i) * item, static_cast<size_t>(n) * item, buffer);
    if (!to_float32(e.info.dtype, buffer, n, dst + i)) fail_not_float(e);
  }
}

Tensor SafeTensors::read(const std::string& name) const {
  Tensor t(info(name).shape);
  if (t.numel() > 0) read(name, 0, t.numel(), t.data());
  return t;
}

Tensor SafeTensors::get(const std::string& name, const Shape& expected) const {
  const TensorInfo& i = info(name);
  if (i.shape != expected)
    fail(i.file + ": tensor '" + name + "' has shape " + shape_str(i.shape) + ", expected " + shape_str(expected));
  return get(name);
}

// --- writing ---------------------------------------------------------------------------------

namespace {

// Writes all of [p, p+n) or returns false with errno set.
bool write_all(int fd, const void* p, size_t n) {
  const char* c = static_cast<const char*>(p);
  while (n > 0) {
    ssize_t w = ::write(fd, c, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      return false;
    }
    c += w;
    n -= static_cast<size_t>(w);
  }
  return true;
}

}  // namespace

void save_safetensors(const std::string& path, const std::vector<std::pair<std::string, Tensor>>& tensors,
                      const std::map<std::string, std::string>& metadata) {
  // Validate and lay out first, so nothing is written for a bad request.
  std::map<std::string, const Tensor*> sorted;
  for (const auto& [name, t] : tensors) {
    if (name == "__metadata__") fail(path + ": cannot save a tensor named '__metadata__' (reserved by the format)");
    if (!sorted.emplace(name, &t).second) fail(path + ": cannot save tensor '" + name + "' twice");
    for (int64_t d : t.shape())
      if (d < 0) fail(path + ": cannot save tensor '" + name + "' with shape " + shape_str(t.shape()));
    if (t.empty() && t.numel() != 0) fail(path + ": cannot save tensor '" + name + "': it has no data");
  }
  json header = json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  uint64_t offset = 0;
  for (const auto& [name, t] : sorted) {
    const uint64_t nbytes = static_cast<uint64_t>(t->numel()) * sizeof(float);
    header[name] = {{"dtype", "F32"}, {"shape", t->shape()}, {"data_offsets", {offset, offset + nbytes}}};
    offset += nbytes;
  }
  std::string text = header.dump();
  // Pad with spaces so the data section starts 8-byte aligned, as the official writer does.
  text.append((8 - text.size() % 8) % 8, ' ');
  const uint64_t header_len = text.size();

  // A temporary in the same directory (so rename is atomic), created with 0666 & ~umask.
  const std::filesystem::path target(path);
  const std::filesystem::path dir = target.has_parent_path() ? target.parent_path() : std::filesystem::path(".");
  static std::atomic<unsigned> counter{0};
  std::random_device rd;
  std::string tmp;
  int fd = -1;
  for (int attempt = 0; attempt < 100 && fd < 0; ++attempt) {
    std::string name = ".";
    name += target.filename().string();
    name += ".tmp." + std::to_string(::getpid()) + "." + std::to_string(counter++) + "." + std::to_string(rd());
    tmp = (dir / name).string();
    fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
    if (fd < 0 && errno != EEXIST) break;
  }
  if (fd < 0) fail(path + ": cannot write it (creating a temporary file in " + dir.string() + ": " + errno_text(errno) + ")");

  auto abandon = [&](const std::string& what) {
    int err = errno;
    ::close(fd);
    ::unlink(tmp.c_str());
    fail(path + ": cannot write it (" + what + ": " + errno_text(err) + ")");
  };
  if (!write_all(fd, &header_len, 8) || !write_all(fd, text.data(), text.size())) abandon("writing the header");
  for (const auto& [name, t] : sorted)
    if (t->numel() > 0 && !write_all(fd, t->data(), static_cast<size_t>(t->numel()) * sizeof(float)))
      abandon("writing tensor '" + name + "'");
  if (::fsync(fd) != 0) abandon("fsync");
  if (::close(fd) != 0) {
    int err = errno;
    ::unlink(tmp.c_str());
    fail(path + ": cannot write it (close: " + errno_text(err) + ")");
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    int err = errno;
    ::unlink(tmp.c_str());
    fail(path + ": cannot write it (renaming the temporary file into place: " + errno_text(err) + ")");
  }
  // Make the rename itself durable; failure here does not undo a complete file, so it is ignored.
  int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
}

}  // namespace tessera
