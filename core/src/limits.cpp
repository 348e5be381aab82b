#include "tessera/limits.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "tessera/error.hpp"

namespace tessera {

namespace {
std::atomic<std::int64_t> g_max_tokens{0};  // 0: not set
}  // namespace

std::int64_t default_max_tokens() {
  const long pages = ::sysconf(_SC_PHYS_PAGES), page = ::sysconf(_SC_PAGE_SIZE);
  std::int64_t n = 16384;
  if (pages > 0 && page > 0) {
    const double bytes = static_cast<double>(pages) * static_cast<double>(page);
    n = std::min<std::int64_t>(n, static_cast<std::int64_t>(std::sqrt(bytes / 32.0)));
  }
  return std::max<std::int64_t>(n, 1024);
}

std::int64_t max_tokens() {
  if (const std::int64_t n = g_max_tokens.load(std::memory_order_relaxed)) return n;
  if (const char* env = std::getenv("TESSERA_MAX_TOKENS"); env && *env) {
    char* end = nullptr;
    errno = 0;
    const long long v = std::strtoll(env, &end, 10);
    if (errno != 0 || *end != '\0' || v <= 0)
      fail(std::string("TESSERA_MAX_TOKENS=") + brief_text(env) + ": must be a positive integer");
    return v;
  }
  return default_max_tokens();
}

void set_max_tokens(std::int64_t n) {
  if (n < 0) fail("--max-tokens must be positive (0: the default, " + std::to_string(default_max_tokens()) + ")");
  g_max_tokens.store(n, std::memory_order_relaxed);
}

void check_json_depth(std::string_view text, const std::string& file, int max_depth) {
  int depth = 0;
  bool in_string = false, escaped = false;
  for (const char c : text) {
    if (in_string) {
      if (escaped) escaped = false;
      else if (c == '\\') escaped = true;
      else if (c == '"') in_string = false;
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      if (++depth > max_depth)
        fail(file + ": JSON nests arrays/objects more than " + std::to_string(max_depth) +
             " levels deep; refused (no config Tessera reads nests that deep)");
    } else if (c == ']' || c == '}') {
      --depth;
    }
  }
}

std::string read_regular_file(const std::string& path, const std::string& what, std::uintmax_t max_bytes) {
  // O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused below anyway.
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) {
    const int err = errno;
    if (err == ENOENT) fail(path + ": no such file");
    fail(path + ": cannot open the " + what + " (" + std::strerror(err) + ")");
  }
  struct Closer {
    int fd;
    ~Closer() { ::close(fd); }
  } closer{fd};
  struct stat st {};
  if (::fstat(fd, &st) != 0) fail(path + ": cannot stat the " + what + " (" + std::strerror(errno) + ")");
  if (S_ISDIR(st.st_mode)) fail(path + ": is a directory, expected the " + what + " file");
  if (!S_ISREG(st.st_mode)) fail(path + ": is not a regular file (a device, FIFO or socket); expected the " + what);
  if (static_cast<std::uintmax_t>(st.st_size) > max_bytes)
    fail(path + ": " + what + " of " + std::to_string(st.st_size) + " bytes is larger than the limit of " +
         std::to_string(max_bytes) + " bytes");
  std::string text(static_cast<size_t>(st.st_size), '\0');
  size_t got = 0;
  while (got < text.size()) {
    const ssize_t n = ::read(fd, text.data() + got, text.size() - got);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) fail(path + ": cannot read the " + what + " (" + std::strerror(errno) + ")");
    if (n == 0) break;  // it shrank since fstat: what is there is what it holds
    got += static_cast<size_t>(n);
  }
  text.resize(got);
  return text;
}

std::string brief_text(std::string_view s, std::size_t max_chars) {
  std::string out(s.substr(0, s.size() > max_chars ? (max_chars > 3 ? max_chars - 3 : 0) : s.size()));
  for (char& c : out)
    if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f) c = '?';
  if (s.size() > max_chars) out += "...";
  return out;
}

}  // namespace tessera
