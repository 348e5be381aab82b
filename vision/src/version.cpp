#include "tessera/version.hpp"
namespace tessera {
const char* version() { return "0.1.0"; }
}
