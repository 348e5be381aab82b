// safetensors reader/writer. Files are built byte by byte here (8-byte length, JSON header, data),
// so every malformed case is exactly the one named, and values are checked against the IEEE
// definitions rather than against the code under test.
#include <unistd.h>

#include <bit>
#include <chrono>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <vector>
#include <limits>
#include <nlohmann/json.hpp>
#include <sstream>

#include "tessera/error.hpp"
#include "tessera/limits.hpp"
#include "tessera/safetensors.hpp"

namespace fs = std::filesystem;
using tessera::Error;
using tessera::SafeTensors;
using tessera::Shape;
using tessera::Tensor;

namespace {

struct TempDir {
  fs::path path;
  TempDir() {
    std::string templ = (fs::temp_directory_path() / "tessera_st_XXXXXX").string();
    REQUIRE(::mkdtemp(templ.data()) != nullptr);
    path = templ;
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  std::string file(const std::string& name) const { return (path / name).string(); }
};

std::string le64(uint64_t n) {
  std::string s(8, '\0');
  std::memcpy(s.data(), &n, 8);
  return s;
}

// A safetensors file: 8-byte little-endian header length, the header text, the data.
std::string st_bytes(const std::string& header, const std::string& data = "") {
  return le64(header.size()) + header + data;
}

// The header padded with spaces so the data section starts 8-byte aligned.
std::string padded(std::string header) {
  while ((8 + header.size()) % 8 != 0) header += ' ';
  return header;
}

template <typename T>
std::string raw(std::initializer_list<T> values) {
  std::string s;
  for (T v : values) s.append(reinterpret_cast<const char*>(&v), sizeof(T));
  return s;
}

std::string write_file(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  REQUIRE(out.good());
  return path;
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

// The message of the tessera::Error that f throws; fails the test when it throws nothing.
std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  FAIL("expected a tessera::Error");
  return {};
}

// open(path) must throw an Error whose one-line message contains every one of `parts`.
void require_open_error(const std::string& path, std::initializer_list<std::string> parts) {
  std::string message = error_of([&] { SafeTensors::open(path); });
  INFO("message: " << message);
  CHECK(message.find('\n') == std::string::npos);
  CHECK(message.find(path) != std::string::npos);
  for (const std::string& part : parts) CHECK(message.find(part) != std::string::npos);
}

bool same_bits(float a, float b) { return std::bit_cast<uint32_t>(a) == std::bit_cast<uint32_t>(b); }

// IEEE binary16 by its definition, in double: (-1)^s * 2^(e-15) * (1 + m/1024), subnormals 2^-14 * m/1024.
double f16_reference(uint16_t h) {
  int s = h >> 15, e = (h >> 10) & 31, m = h & 1023;
  double sign = s ? -1.0 : 1.0;
  if (e == 31) return m ? std::numeric_limits<double>::quiet_NaN() : sign * std::numeric_limits<double>::infinity();
  if (e == 0) return sign * std::ldexp(m / 1024.0, -14);
  return sign * std::ldexp(1.0 + m / 1024.0, e - 15);
}

}  // namespace

TEST_CASE("save_safetensors then open round-trips values, shapes, metadata, 0-d and empty tensors") {
  TempDir dir;
  Tensor matrix({2, 3});
  for (int i = 0; i < 6; ++i) matrix[i] = 0.5f * i - 1.0f;
  Tensor scalar(Shape{});
  scalar[0] = 3.25f;
  Tensor empty({0, 4});
  Tensor vec({3});
  vec[0] = -0.0f, vec[1] = std::numeric_limits<float>::infinity(), vec[2] = 1e-40f;  // subnormal
  const std::map<std::string, std::string> meta = {{"format", "pt"}, {"note", "tiny \"quoted\" text"}};
  const std::string path = dir.file("model.safetensors");
  tessera::save_safetensors(path, {{"z.matrix", matrix}, {"a.scalar", scalar}, {"m.empty", empty}, {"b.vec", vec}},
                            meta);

  // Nothing but the file itself is left in the directory (the temporary was renamed).
  int count = 0;
  for (const auto& entry : fs::directory_iterator(dir.path)) {
    count += 1;
    CHECK(entry.path().filename() == "model.safetensors");
  }
  CHECK(count == 1);

  // The layout, read independently: header padded to a multiple of 8, offsets contiguous.
  const std::string bytes = read_file(path);
  uint64_t header_len;
  std::memcpy(&header_len, bytes.data(), 8);
  CHECK(header_len % 8 == 0);
  auto header = nlohmann::json::parse(bytes.substr(8, header_len));
  CHECK(header["__metadata__"]["note"] == "tiny \"quoted\" text");
  CHECK(header["z.matrix"]["dtype"] == "F32");
  CHECK(header["z.matrix"]["shape"] == nlohmann::json({2, 3}));
  CHECK(header["a.scalar"]["shape"] == nlohmann::json::array());
  uint64_t end = header["z.matrix"]["data_offsets"][1];
  CHECK(bytes.size() == 8 + header_len + end);
  uint64_t begin = header["z.matrix"]["data_offsets"][0];
  CHECK(std::memcmp(bytes.data() + 8 + header_len + begin, matrix.data(), 24) == 0);

  SafeTensors st = SafeTensors::open(path);
  CHECK(st.path() == path);
  CHECK(st.names() == std::vector<std::string>{"a.scalar", "b.vec", "m.empty", "z.matrix"});
  CHECK(st.metadata() == meta);
  CHECK(st.contains("b.vec"));
  CHECK_FALSE(st.contains("c"));
  CHECK(st.info("z.matrix").dtype == "F32");
  CHECK(st.info("z.matrix").file == path);
  CHECK(st.info("z.matrix").shape == Shape{2, 3});

  Tensor m = st.get("z.matrix", {2, 3});
  for (int i = 0; i < 6; ++i) CHECK(m[i] == 0.5f * i - 1.0f);
  Tensor s = st.get("a.scalar", {});
  CHECK(s.ndim() == 0);
  CHECK(s.numel() == 1);
  CHECK(s[0] == 3.25f);
  Tensor e = st.get("m.empty");
  CHECK(e.shape() == Shape{0, 4});
  CHECK(e.numel() == 0);
  Tensor v = st.get("b.vec");
  CHECK(same_bits(v[0], -0.0f));
  CHECK(v[1] == std::numeric_limits<float>::infinity());
  CHECK(same_bits(v[2], 1e-40f));

  // No metadata: no __metadata__ key at all.
  tessera::save_safetensors(path, {{"x", matrix}});
  const std::string bytes2 = read_file(path);
  std::memcpy(&header_len, bytes2.data(), 8);
  CHECK_FALSE(nlohmann::json::parse(bytes2.substr(8, header_len)).contains("__metadata__"));
  CHECK(SafeTensors::open(path).metadata().empty());
  CHECK(SafeTensors::open(path).names() == std::vector<std::string>{"x"});
}

TEST_CASE("save_safetensors fails cleanly: Error naming the path, no file or temporary left") {
  TempDir dir;
  Tensor t({2});
  const std::string missing_dir = dir.file("no/such/dir/model.safetensors");
  std::string message = error_of([&] { tessera::save_safetensors(missing_dir, {{"t", t}}); });
  CHECK(message.find(missing_dir) != std::string::npos);
  CHECK(message.find('\n') == std::string::npos);

  // The target is a directory: the temporary is written, the rename fails, the temporary is removed.
  const std::string target = dir.file("taken");
  fs::create_directory(target);
  message = error_of([&] { tessera::save_safetensors(target, {{"t", t}}); });
  INFO(message);
  CHECK(message.find(target) != std::string::npos);
  CHECK(message.find("renam") != std::string::npos);
  int count = 0;
  for (const auto& entry : fs::directory_iterator(dir.path)) {
    count += 1;
    CHECK(entry.path().filename() == "taken");
  }
  CHECK(count == 1);

  // Requests the format cannot hold.
  const std::string path = dir.file("m.safetensors");
  CHECK(error_of([&] { tessera::save_safetensors(path, {{"t", t}, {"t", t}}); }).find("'t' twice") != std::string::npos);
  CHECK(error_of([&] { tessera::save_safetensors(path, {{"__metadata__", t}}); }).find("reserved") != std::string::npos);
  CHECK(error_of([&] { tessera::save_safetensors(path, {{"nothing", Tensor()}}); }).find("no data") != std::string::npos);
  CHECK_FALSE(fs::exists(path));

  // Overwriting an existing file replaces it whole.
  write_file(path, "old contents");
  tessera::save_safetensors(path, {{"t", t}});
  CHECK(SafeTensors::open(path).names() == std::vector<std::string>{"t"});

  // Saving views of a file's own mapping back over that file: the rename leaves the old mapping intact.
  Tensor u({3});
  u[0] = 1, u[1] = 2, u[2] = 3;
  tessera::save_safetensors(path, {{"u", u}});
  Tensor view = SafeTensors::open(path).get("u");
  tessera::save_safetensors(path, {{"u", view}, {"v", view}});
  SafeTensors again = SafeTensors::open(path);
  CHECK(again.get("v")[2] == 3.f);
  CHECK(view[2] == 3.f);
}

TEST_CASE("the conformance ViT checkpoint reads, byte for byte, in place") {
  const std::string path = std::string(TESSERA_FIXTURES) + "/conformance/vit-tiny-rand/model.safetensors";
  REQUIRE(fs::exists(path));
  // Independent reading: the header parsed by nlohmann::json, data compared as raw bytes.
  const std::string bytes = read_file(path);
  uint64_t header_len;
  std::memcpy(&header_len, bytes.data(), 8);
  auto header = nlohmann::json::parse(bytes.substr(8, header_len));

  SafeTensors st = SafeTensors::open(path);
  CHECK(st.names().size() + 1 == header.size());  // + __metadata__
  CHECK(st.metadata().at("format") == "pt");
  CHECK(st.info("vit.embeddings.cls_token").shape == Shape{1, 1, 64});
  for (const std::string& name : st.names()) {
    INFO(name);
    const auto& h = header.at(name);
    CHECK(h["dtype"] == "F32");
    CHECK(nlohmann::json(st.info(name).shape) == h["shape"]);
    uint64_t begin = h["data_offsets"][0], end = h["data_offsets"][1];
    Tensor t = st.get(name);
    REQUIRE(static_cast<uint64_t>(t.numel()) * 4 == end - begin);
    CHECK(std::memcmp(t.data(), bytes.data() + 8 + header_len + begin, end - begin) == 0);
    CHECK(st.get(name).data() == t.data());  // the mapping itself, not a copy
  }
}

TEST_CASE("aligned F32 tensors are views of the mapping, which outlives the SafeTensors object") {
  TempDir dir;
  const std::string path = write_file(
      dir.file("w.safetensors"),
      st_bytes(padded(R"({"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},"h":{"dtype":"F16","shape":[1],"data_offsets":[16,18]}})"),
               raw<float>({1.f, 2.f, 3.f, 4.f}) + raw<uint16_t>({0x3C00})));
  Tensor w;
  {
    SafeTensors st = SafeTensors::open(path);
    w = st.get("w");
    CHECK(reinterpret_cast<uintptr_t>(w.data()) % 4 == 0);
    CHECK(st.get("w").data() == w.data());           // same memory twice: in place
    CHECK(st.get("h").data() != st.get("h").data());  // converted: a fresh copy per call
  }
  // The SafeTensors object is gone; the view keeps the mapping alive.
  CHECK(w[0] == 1.f);
  CHECK(w[3] == 4.f);
  Tensor copy = w.clone();
  CHECK(copy.data() != w.data());
}

TEST_CASE("an F32 tensor at an unaligned offset is copied, with the right values") {
  TempDir dir;
  std::string header = R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"w":{"dtype":"F32","shape":[3],"data_offsets":[1,13]}})";
  while ((8 + header.size()) % 4 != 0) header += ' ';  // data section aligned, "w" at data + 1 is not
  const std::string path = write_file(dir.file("u.safetensors"),
                                      st_bytes(header, raw<uint8_t>({7}) + raw<float>({1.5f, -2.f, 1e30f})));
  SafeTensors st = SafeTensors::open(path);
  Tensor w = st.get("w");
  CHECK(reinterpret_cast<uintptr_t>(w.data()) % 4 == 0);
  CHECK(w[0] == 1.5f);
  CHECK(w[1] == -2.f);
  CHECK(w[2] == 1e30f);
  CHECK(st.get("a")[0] == 7.f);
}

TEST_CASE("F16 converts exactly: known values and all 65536 bit patterns against the IEEE definition") {
  TempDir dir;
  std::string data;
  for (uint32_t h = 0; h < 65536; ++h) data += raw<uint16_t>({static_cast<uint16_t>(h)});
  const std::string path = write_file(
      dir.file("f16.safetensors"), st_bytes(R"({"all":{"dtype":"F16","shape":[256,256],"data_offsets":[0,131072]}})", data));
  Tensor t = SafeTensors::open(path).get("all", {256, 256});
  CHECK(t[0x3C00] == 1.0f);
  CHECK(t[0xC100] == -2.5f);
  CHECK(t[0x7BFF] == 65504.0f);
  CHECK(t[0x0001] == 5.9604644775390625e-8f);  // smallest subnormal, 2^-24
  CHECK(t[0x03FF] == 6.0975551605224609375e-5f);  // largest subnormal, 1023 * 2^-24
  CHECK(t[0x0400] == 6.103515625e-5f);            // smallest normal, 2^-14
  CHECK(t[0x3555] == 0.333251953125f);
  CHECK(t[0x7C00] == std::numeric_limits<float>::infinity());
  CHECK(t[0xFC00] == -std::numeric_limits<float>::infinity());
  CHECK(std::isnan(t[0x7E00]));
  CHECK(same_bits(t[0x8000], -0.0f));
  int mismatches = 0;
  for (uint32_t h = 0; h < 65536; ++h) {
    double ref = f16_reference(static_cast<uint16_t>(h));
    bool ok = std::isnan(ref) ? std::isnan(t[h]) : (static_cast<double>(t[h]) == ref && std::signbit(t[h]) == std::signbit(ref));
    mismatches += !ok;
  }
  CHECK(mismatches == 0);  // exact: every half is representable in float32

  // read() converts the same way, also in ranges that straddle its 32 KiB read slices.
  SafeTensors st = SafeTensors::open(path);
  CHECK(std::memcmp(st.read("all").data(), t.data(), 65536 * sizeof(float)) == 0);
  std::vector<float> part(40000);
  st.read("all", 1000, 40000, part.data());
  CHECK(std::memcmp(part.data(), t.data() + 1000, part.size() * sizeof(float)) == 0);
}

TEST_CASE("BF16, F64, integer and bool tensors convert to float32; C64 is refused by name") {
  TempDir dir;
  struct Case {
    std::string name, dtype, bytes;
    std::vector<float> expected;
  };
  const float inf = std::numeric_limits<float>::infinity();
  const std::vector<Case> cases = {
      {"bf", "BF16", raw<uint16_t>({0x3F80, 0xC020, 0x4049, 0x7F80, 0x0001, 0x8000}),
       {1.0f, -2.5f, 3.140625f, inf, std::ldexp(1.0f, -133), -0.0f}},
      {"f64", "F64", raw<double>({0.1, -3.5, 1e-3}), {0.1f, -3.5f, 1e-3f}},
      {"i64", "I64", raw<int64_t>({-7, 0, 1 << 20}), {-7.f, 0.f, 1048576.f}},
      {"i32", "I32", raw<int32_t>({-1, 42}), {-1.f, 42.f}},
      {"i16", "I16", raw<int16_t>({-32768, 5}), {-32768.f, 5.f}},
      {"i8", "I8", raw<int8_t>({-128, 127}), {-128.f, 127.f}},
      {"u8", "U8", raw<uint8_t>({0, 255}), {0.f, 255.f}},
      {"u16", "U16", raw<uint16_t>({65535}), {65535.f}},
      {"u32", "U32", raw<uint32_t>({123456}), {123456.f}},
      {"bool", "BOOL", raw<uint8_t>({0, 1}), {0.f, 1.f}},
      {"e4m3", "F8_E4M3", raw<uint8_t>({0x38, 0x7E, 0x01, 0xC4}), {1.0f, 448.f, std::ldexp(1.0f, -9), -3.0f}},
      {"e5m2", "F8_E5M2", raw<uint8_t>({0x3C, 0x7B, 0x7C, 0xC1}), {1.0f, 57344.f, inf, -2.5f}},
      {"e8m0", "F8_E8M0", raw<uint8_t>({127, 128, 0}), {1.0f, 2.0f, std::ldexp(1.0f, -127)}},
  };
  nlohmann::json header;
  std::string data;
  for (const Case& c : cases) {
    header[c.name] = {{"dtype", c.dtype}, {"shape", {c.expected.size()}}, {"data_offsets", {data.size(), data.size() + c.bytes.size()}}};
    data += c.bytes;
  }
  header["c64"] = {{"dtype", "C64"}, {"shape", {1}}, {"data_offsets", {data.size(), data.size() + 8}}};
  data += raw<float>({1.f, 2.f});
  header["nan8"] = {{"dtype", "F8_E4M3"}, {"shape", {1}}, {"data_offsets", {data.size(), data.size() + 1}}};
  data += raw<uint8_t>({0x7F});
  const std::string path = write_file(dir.file("mixed.safetensors"), st_bytes(header.dump(), data));

  SafeTensors st = SafeTensors::open(path);
  for (const Case& c : cases) {
    INFO(c.dtype);
    CHECK(st.info(c.name).dtype == c.dtype);
    Tensor t = st.get(c.name);
    REQUIRE(t.numel() == static_cast<int64_t>(c.expected.size()));
    for (size_t i = 0; i < c.expected.size(); ++i) CHECK(same_bits(t[i], c.expected[i]));
    Tensor r = st.read(c.name);  // the pread path converts the same way
    REQUIRE(r.numel() == t.numel());
    for (size_t i = 0; i < c.expected.size(); ++i) CHECK(same_bits(r[i], c.expected[i]));
  }
  CHECK(std::isnan(st.get("nan8")[0]));
  CHECK(st.info("c64").dtype == "C64");
  std::string message = error_of([&] { st.get("c64"); });
  CHECK(message == path + ": tensor 'c64' has dtype C64, which cannot be read as float32");
  CHECK(error_of([&] { st.read("c64"); }) == message);
}

TEST_CASE("read copies through pread: get's values, in owned memory, any range; a file cut short after open is an Error") {
  const std::string fixture = std::string(TESSERA_FIXTURES) + "/conformance/vit-tiny-rand/model.safetensors";
  SafeTensors st = SafeTensors::open(fixture);
  for (const std::string& name : st.names()) {
    INFO(name);
    Tensor view = st.get(name), copy = st.read(name);
    REQUIRE(copy.shape() == view.shape());
    CHECK(copy.data() != view.data());
    CHECK(std::memcmp(copy.data(), view.data(), sizeof(float) * view.numel()) == 0);
    if (view.numel() >= 3) {  // a range in the middle
      std::vector<float> mid(view.numel() - 2);
      st.read(name, 1, view.numel() - 2, mid.data());
      CHECK(std::memcmp(mid.data(), view.data() + 1, sizeof(float) * mid.size()) == 0);
    }
  }
  const std::string name = "vit.embeddings.cls_token";  // 64 elements
  float x = 0;
  st.read(name, 64, 0, &x);  // an empty range at the end is fine
  CHECK(error_of([&] { st.read(name, 60, 5, &x); }) ==
        fixture + ": tensor '" + name + "': elements [60, 65) asked for, but it has 64");
  CHECK(error_of([&] { st.read(name, -1, 1, &x); }).find("elements [-1, 0)") != std::string::npos);
  CHECK(error_of([&] { st.read("embeddings.cls_token"); }).find("did you mean 'vit.embeddings.cls_token'") != std::string::npos);

  TempDir dir;
  std::string header = R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"w":{"dtype":"F32","shape":[3],"data_offsets":[1,13]}})";
  while ((8 + header.size()) % 4 != 0) header += ' ';  // "w" sits at an unaligned offset
  const std::string path = write_file(dir.file("u.safetensors"),
                                      st_bytes(header, raw<uint8_t>({7}) + raw<float>({1.5f, -2.f, 1e30f})));
  SafeTensors u = SafeTensors::open(path);
  Tensor w = u.read("w");
  CHECK(w[0] == 1.5f);
  CHECK(w[1] == -2.f);
  CHECK(w[2] == 1e30f);
  // The file shrinks after open: read() says so (through the mapping, get() would crash on SIGBUS).
  fs::resize_file(path, 8 + header.size() + 5);
  std::string message = error_of([&] { u.read("w"); });
  INFO(message);
  CHECK(message.find('\n') == std::string::npos);
  CHECK(message.find(path + ": tensor 'w': the file ends at byte") == 0);
  CHECK(message.find("truncated after it was opened") != std::string::npos);
}

TEST_CASE("get checks names and shapes with messages that name file, tensor, found and expected") {
  TempDir dir;
  const std::string path = write_file(
      dir.file("model.safetensors"),
      st_bytes(R"({"vit.embeddings.cls_token":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]}})",
               raw<float>({1, 2, 3, 4, 5, 6})));
  SafeTensors st = SafeTensors::open(path);
  CHECK(error_of([&] { st.get("vit.embeddings.cls_token", {3, 2}); }) ==
        path + ": tensor 'vit.embeddings.cls_token' has shape [2, 3], expected [3, 2]");
  CHECK(error_of([&] { st.get("classifier.weight"); }) == path + ": no tensor 'classifier.weight'");
  CHECK(error_of([&] { st.info("classifier.weight"); }) == path + ": no tensor 'classifier.weight'");
  CHECK(error_of([&] { st.get("embeddings.cls_token"); }) ==
        path + ": no tensor 'embeddings.cls_token'; did you mean 'vit.embeddings.cls_token'?");
  CHECK(st.get("vit.embeddings.cls_token", {2, 3})[5] == 6.f);
}

TEST_CASE("every malformed file is refused with an Error naming the file and the problem") {
  TempDir dir;
  int n = 0;
  // Writes `bytes` to a fresh file and requires open() to fail with all of `parts` in the message.
  auto bad = [&](const std::string& bytes, std::initializer_list<std::string> parts) {
    const std::string path = write_file(dir.file("bad" + std::to_string(n++) + ".safetensors"), bytes);
    require_open_error(path, parts);
  };
  const std::string f32x4 = R"("dtype":"F32","shape":[4])";
  const std::string data16 = raw<float>({1, 2, 3, 4});

  SECTION("too short or unreadable") {
    bad("", {"0 bytes", "too short"});
    bad(std::string("\x05\0\0\0\0", 5), {"5 bytes", "too short"});
    require_open_error(dir.file("absent.safetensors"), {"no such file"});
    require_open_error(dir.path.string(), {"is a directory"});
    if (::geteuid() != 0) {  // root reads anything
      const std::string locked = write_file(dir.file("locked.safetensors"), st_bytes("{}"));
      fs::permissions(locked, fs::perms::none);
      require_open_error(locked, {"permission denied"});
    }
  }
  SECTION("header length") {
    bad(le64(uint64_t{1} << 40) + "{}", {"header length 1099511627776", "absurd"});
    bad(le64(1000) + R"({"a":1})", {"header length 1000", "runs past the end of the file"});
  }
  SECTION("header JSON") {
    bad(st_bytes("not json{"), {"header is not valid JSON"});
    bad(st_bytes("{\"a\":\n"), {"header is not valid JSON"});
    bad(st_bytes(""), {"header is not valid JSON"});
    bad(st_bytes("[1, 2]"), {"header is JSON but not an object", "array"});
    bad(st_bytes(R"({"t":{)" + f32x4 + R"(,"data_offsets":[0,16]},"t":{)" + f32x4 + R"(,"data_offsets":[0,16]}})", data16),
        {"tensor 't' twice"});
  }
  SECTION("entries") {
    bad(st_bytes(R"({"t":5})"), {"tensor 't'", "not an object"});
    bad(st_bytes(R"({"t":{"shape":[4],"data_offsets":[0,16]}})", data16), {"tensor 't'", "no 'dtype'"});
    bad(st_bytes(R"({"t":{"dtype":"F32","data_offsets":[0,16]}})", data16), {"tensor 't'", "no 'shape'"});
    bad(st_bytes(R"({"t":{"dtype":"F32","shape":[4]}})", data16), {"tensor 't'", "no 'data_offsets'"});
    bad(st_bytes(R"({"t":{"dtype":"F17","shape":[4],"data_offsets":[0,16]}})", data16), {"tensor 't'", "dtype 'F17'"});
    bad(st_bytes(R"({"t":{"dtype":"F4","shape":[4],"data_offsets":[0,2]}})", data16), {"tensor 't'", "dtype 'F4'"});
    bad(st_bytes(R"({"t":{"dtype":32,"shape":[4],"data_offsets":[0,16]}})", data16), {"tensor 't'", "dtype 32 is not a string"});
  }
  SECTION("shapes") {
    bad(st_bytes(R"({"t":{"dtype":"F32","shape":[-4],"data_offsets":[0,16]}})", data16), {"tensor 't'", "negative dimension"});
    bad(st_bytes(R"({"t":{"dtype":"F32","shape":[2.5],"data_offsets":[0,16]}})", data16), {"tensor 't'", "not an integer"});
    bad(st_bytes(R"({"t":{"dtype":"F32","shape":["4"],"data_offsets":[0,16]}})", data16), {"tensor 't'", "not an integer"});
    bad(st_bytes(R"({"t":{"dtype":"F32","shape":4,"data_offsets":[0,16]}})", data16), {"tensor 't'", "shape 4 is not an array"});
    bad(st_bytes(R"({"t":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,16]}})", data16),
        {"tensor 't'", "needs more than 2^64"});
  }
  SECTION("data_offsets") {
    bad(st_bytes(R"({"t":{"dtype":"F32","shape":[4],"data_offsets":[16,0]}})", data16), {"tensor 't'", "[16, 0] has begin > end"});
    bad(st_bytes(R"({"t":{"dtype":"F32","shape":[4],"data_offsets":[0]}})", data16), {"tensor 't'", "not [begin, end]"});
    bad(st_bytes(R"({"t":{"dtype":"F32","shape":[4],"data_offsets":[0,16,32]}})", data16), {"tensor 't'", "not [begin, end]"});
    bad(st_bytes(R"({"t":{"dtype":"F32","shape":[4],"data_offsets":"0-16"}})", data16), {"tensor 't'", "not [begin, end]"});
    bad(st_bytes(R"({"t":{"dtype":"F32","shape":[4],"data_offsets":[-4,12]}})", data16), {"tensor 't'", "non-negative integers"});
    bad(st_bytes(R"({"t":{"dtype":"F32","shape":[4],"data_offsets":[0,16.0]}})", data16), {"tensor 't'", "non-negative integers"});
    bad(st_bytes(R"({"t":{"dtype":"F32","shape":[4],"data_offsets":[0,20]}})", data16),
        {"tensor 't'", "[0, 20] run past the end of the data (16 bytes"});
    bad(st_bytes(R"({"vit.embeddings.cls_token":{"dtype":"F32","shape":[1,1,64],"data_offsets":[0,100]}})", std::string(256, '\0')),
        {"tensor 'vit.embeddings.cls_token': data_offsets [0, 100] hold 100 bytes but F32 [1, 1, 64] needs 256"});
    bad(st_bytes(R"({"h":{"dtype":"F16","shape":[4],"data_offsets":[0,16]}})", data16),
        {"tensor 'h'", "hold 16 bytes but F16 [4] needs 8"});
    bad(st_bytes(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", data16),
        {"tensors 'a' [0, 8] and 'b' [4, 12] overlap"});
    bad(st_bytes(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})", data16),
        {"'a' [0, 16] and 'b' [8, 16] overlap"});
  }
  SECTION("__metadata__") {
    bad(st_bytes(R"({"__metadata__":"pt"})"), {"__metadata__ is not a map of strings to strings"});
    bad(st_bytes(R"({"__metadata__":{"format":"pt","epochs":3}})"), {"__metadata__ 'epochs' is 3, not a string"});
  }
  SECTION("a truncated file: a valid header claiming more data than is present") {
    const std::string whole = st_bytes(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})", data16);
    CHECK_NOTHROW(SafeTensors::open(write_file(dir.file("whole.safetensors"), whole)));
    bad(whole.substr(0, whole.size() - 5), {"tensor 'b'", "[8, 16] run past the end of the data (11 bytes", "truncated"});
    bad(whole.substr(0, 20), {"runs past the end of the file"});
  }
  // Zero-byte tensors occupy nothing, so they may share an offset with anything.
  const std::string ok = write_file(
      dir.file("empties.safetensors"),
      st_bytes(R"({"e":{"dtype":"F32","shape":[0,3],"data_offsets":[4,4]},"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", data16));
  CHECK(SafeTensors::open(ok).get("e").numel() == 0);
}

TEST_CASE("a sharded checkpoint (model.safetensors.index.json) opens as one") {
  TempDir dir;
  Tensor a({2}), b({3}), c({1, 1});
  a[0] = 1, a[1] = 2, b[2] = 9, c[0] = -1;
  tessera::save_safetensors(dir.file("model-00001-of-00002.safetensors"), {{"a", a}, {"b", b}}, {{"format", "pt"}});
  tessera::save_safetensors(dir.file("model-00002-of-00002.safetensors"), {{"c", c}}, {{"format", "pt"}});
  const std::string index = write_file(dir.file("model.safetensors.index.json"), R"({
    "metadata": {"total_size": 24},
    "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00001-of-00002.safetensors",
                   "c": "model-00002-of-00002.safetensors"}})");

  SafeTensors st = SafeTensors::open(index);
  CHECK(st.path() == index);
  CHECK(st.names() == std::vector<std::string>{"a", "b", "c"});
  CHECK(st.info("a").file == dir.file("model-00001-of-00002.safetensors"));
  CHECK(st.info("c").file == dir.file("model-00002-of-00002.safetensors"));
  CHECK(st.get("a")[1] == 2.f);
  CHECK(st.get("b", {3})[2] == 9.f);
  CHECK(st.get("c", {1, 1})[0] == -1.f);
  CHECK(st.metadata().at("total_size") == "24");
  CHECK(st.metadata().at("format") == "pt");
  CHECK(error_of([&] { st.get("c", {1}); }) ==
        dir.file("model-00002-of-00002.safetensors") + ": tensor 'c' has shape [1, 1], expected [1]");
  CHECK(error_of([&] { st.get("d"); }).rfind(index + ": no tensor 'd'", 0) == 0);

  auto bad_index = [&](const std::string& text, std::initializer_list<std::string> parts) {
    const std::string path = write_file(dir.file("bad.index.json"), text);
    require_open_error(path, parts);
  };
  const std::string s1 = "\"model-00001-of-00002.safetensors\"", s2 = "\"model-00002-of-00002.safetensors\"";
  bad_index(R"({"weight_map": {"a": "missing.safetensors"}})",
            {"shard 'missing.safetensors'", dir.file("missing.safetensors") + ": no such file"});
  bad_index(R"({"weight_map": {"a": )" + s1 + R"(, "b": )" + s1 + R"(, "c": )" + s2 + R"(, "x": )" + s2 + "}}",
            {"tensor 'x'", "model-00002-of-00002.safetensors", "has no tensor 'x'"});
  bad_index(R"({"weight_map": {"a": )" + s1 + "}}", {"holds tensor 'b'", "does not list"});
  bad_index(R"({"weight_map": {"a": )" + s1 + R"(, "b": )" + s2 + R"(, "c": )" + s2 + "}}",
            {"puts tensor 'b' in 'model-00002-of-00002.safetensors'", "shard 'model-00001-of-00002.safetensors' holds it"});
  bad_index(R"({"weight_map": {"a": "/etc/passwd"}})", {"tensor 'a'", "not a file name relative"});
  bad_index(R"({"weight_map": {"a": "../model.safetensors"}})", {"tensor 'a'", "not a file name relative"});
  bad_index(R"({"weight_map": {"a": 3}})", {"tensor 'a'", "not a shard file name"});
  bad_index(R"({"metadata": {}})", {"no 'weight_map'"});
  bad_index(R"({"weight_map": [1]})", {"'weight_map' is not a map"});
  bad_index(R"({"weight_map": )", {"not valid JSON"});
  require_open_error(dir.file("absent.index.json"), {"no such file"});

  // The same tensor in two shards.
  tessera::save_safetensors(dir.file("dup.safetensors"), {{"a", a}});
  bad_index(R"({"weight_map": {"a": )" + s1 + R"(, "b": )" + s1 + R"(, "z": "dup.safetensors"}})",
            {"tensor 'a' is in two shards", "model-00001-of-00002.safetensors", "dup.safetensors"});
  // A malformed shard is reported through the index.
  write_file(dir.file("broken.safetensors"), "abc");
  bad_index(R"({"weight_map": {"q": "broken.safetensors"}})", {"shard 'broken.safetensors'", "too short"});
}

// ------------------------------------------------------------------------- hostile files (issue 17)

TEST_CASE("hostile headers: deep nesting, 10^5 tensors, too many tensors, huge names, devices") {
  TempDir dir;
  SECTION("JSON nested 100,000 levels deep is refused before anything recurses over it") {
    const std::string deep = std::string(100000, '[') + std::string(100000, ']');
    for (const std::string& header :
         {R"({"t":{"dtype":"F32","shape":)" + deep + R"(,"data_offsets":[0,0]}})",
          R"({"__metadata__":{"a":)" + deep + "}}"}) {
      const std::string path = write_file(dir.file("deep.safetensors"), st_bytes(header));
      require_open_error(path, {"nests more than 64 levels"});
    }
    // The same in an index (and a number out of range there is a message too, not a library error).
    require_open_error(write_file(dir.file("deep.index.json"), R"({"weight_map":)" + deep + "}"),
                       {"nests arrays/objects more than 64 levels"});
    require_open_error(write_file(dir.file("big.index.json"), R"({"weight_map":{}, "metadata":{"n":1e999}})"),
                       {"not valid JSON", "number overflow"});
  }
  SECTION("a 7 MB header of 100,000 tensors opens in linear time") {
    const int n = 100000;
    std::string header = "{";
    for (int i = 0; i < n; ++i)
      header += (i ? "," : "") + std::string("\"layer.") + std::to_string(i) + R"(.weight":{"dtype":"F32","shape":[1],"data_offsets":[)" +
                std::to_string(4 * i) + "," + std::to_string(4 * i + 4) + "]}";
    header += "}";
    const std::string path = write_file(dir.file("many.safetensors"), st_bytes(header, std::string(4 * n, '\0')));
    const auto t0 = std::chrono::steady_clock::now();
    SafeTensors st = SafeTensors::open(path);
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    CHECK(st.names().size() == static_cast<size_t>(n));
    CHECK(st.get("layer.99999.weight").shape() == Shape{1});
    // The quadratic parse took minutes here; linear takes well under a second (10 s: sanitizers, load).
    INFO("open took " << seconds << " s");
    CHECK(seconds < 10.0);
    // A missing name among them is still found quickly, with a suggestion.
    CHECK(error_of([&] { st.get("layer.5.weigh"); }).find("did you mean 'layer.5.weight'") != std::string::npos);
  }
  SECTION("more tensors than the limit is refused while parsing") {
    std::string header = "{";
    for (size_t i = 0; i <= tessera::kMaxSafetensorsTensors; ++i)
      header += (i ? "," : "") + std::string("\"t") + std::to_string(i) + R"(":{"dtype":"F32","shape":[0],"data_offsets":[0,0]})";
    header += "}";
    require_open_error(write_file(dir.file("toomany.safetensors"), st_bytes(header)), {"more than 262144 tensors"});
  }
  SECTION("a megabyte name or value never lands whole in a message") {
    const std::string name(1 << 20, 'n');
    const std::string path = write_file(dir.file("name.safetensors"),
                                        st_bytes("{\"" + name + R"(":{"dtype":"Q9","shape":[1],"data_offsets":[0,4]}})", "abcd"));
    const std::string message = error_of([&] { SafeTensors::open(path); });
    CHECK(message.size() < 600);
    CHECK(message.find("unknown or unsupported dtype 'Q9'") != std::string::npos);
    const std::string value(1 << 20, '7');
    const std::string path2 = write_file(dir.file("value.safetensors"),
                                         st_bytes(R"({"t":{"dtype":"F32","shape":")" + value + R"(","data_offsets":[0,4]}})", "abcd"));
    CHECK(error_of([&] { SafeTensors::open(path2); }).size() < 600);
  }
  SECTION("shapes whose element count overflows int64 are refused, empty or not") {
    for (const char* shape : {"[4611686018427387904,4611686018427387904,0]", "[0,9223372036854775807,2]"}) {
      const std::string path = write_file(dir.file("overflow.safetensors"),
                                          st_bytes(std::string(R"({"t":{"dtype":"F32","shape":)") + shape +
                                                   R"(,"data_offsets":[0,0]}})"));
      require_open_error(path, {"has more than 2^63 elements"});
    }
  }
  SECTION("an index or checkpoint that is a link to a device is refused, not read") {
    fs::create_symlink("/dev/zero", dir.path / "model.safetensors.index.json");
    require_open_error(dir.file("model.safetensors.index.json"), {"not a regular file"});
    fs::create_symlink("/dev/zero", dir.path / "zero.safetensors");
    require_open_error(dir.file("zero.safetensors"), {"not a regular file"});
  }
}
