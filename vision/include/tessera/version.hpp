#pragma once
namespace tessera {
const char* version();
}
