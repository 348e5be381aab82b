// Communicator helpers (tessera/communicator.hpp).
#include "tessera/communicator.hpp"

namespace tessera {

void allreduce_mean(Communicator* comm, std::span<float> values) {
  if (!comm || comm->size() <= 1) return;
  comm->allreduce_sum(values);
  const float scale = 1.0f / static_cast<float>(comm->size());
  for (float& v : values) v *= scale;
}

}  // namespace tessera
