#include <cstdio>
#include "tessera/version.hpp"
int main() { std::printf("tessera %s\n", tessera::version()); }
