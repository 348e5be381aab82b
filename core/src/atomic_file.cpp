// Crash-consistent file publication (see atomic_file.hpp).
#include "tessera/atomic_file.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>

#include "tessera/error.hpp"

namespace tessera {

void write_file_atomic(const std::string& path, const void* data, size_t size, const std::string& temp_name) {
  namespace fs = std::filesystem;
  const std::string temp = temp_name.empty() ? path + ".partial" : temp_name;
  const int fd = ::open(temp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) fail(path + ": cannot write (" + std::strerror(errno) + ")");
  const char* p = static_cast<const char*>(data);
  size_t left = size;
  bool ok = true;
  while (left > 0 && ok) {
    const ssize_t n = ::write(fd, p, left);
    if (n < 0 && errno == EINTR) continue;
    ok = n > 0;
    if (ok) p += n, left -= static_cast<size_t>(n);
  }
  const int saved = errno;
  ok = ok && ::fsync(fd) == 0;
  ok = (::close(fd) == 0) && ok;
  if (!ok) {
    ::unlink(temp.c_str());
    fail(path + ": cannot write (" + std::strerror(saved ? saved : errno) + ")");
  }
  if (::rename(temp.c_str(), path.c_str()) != 0) {
    const int e = errno;
    ::unlink(temp.c_str());
    fail(path + ": cannot rename into place (" + std::strerror(e) + ")");
  }
  // The rename is durable once the folder's entry is on disk.
  const std::string dir = fs::path(path).parent_path().empty() ? "." : fs::path(path).parent_path().string();
  const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
}

}  // namespace tessera
