#pragma once
// The one exception type of Tessera: a message a person can act on (which file, which tensor,
// what was expected, what was found). The CLI prints it as one line and exits non-zero.
#include <stdexcept>
#include <string>

namespace tessera {

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

[[noreturn]] inline void fail(const std::string& message) { throw Error(message); }

inline void check(bool condition, const std::string& message) {
  if (!condition) fail(message);
}

}  // namespace tessera
