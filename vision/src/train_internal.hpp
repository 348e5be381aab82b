#pragma once
// What the training passes share inside the library (vit_train.cpp, yolos_train.cpp).
#include <string>
#include <vector>

#include "tessera/vit_train.hpp"

namespace tessera::detail {

// The checkpoint names and shapes, in buffer order, of an encoder of `c` under `base` ("vit.")
// with its head: the classifier of num_labels classes, or with c.num_detection_tokens > 0 the
// YOLOS detection tokens and heads (num_labels + 1 class outputs).
std::vector<TrainParam> vit_train_params(const VitConfig& c, const std::string& base, int64_t num_labels);

}  // namespace tessera::detail
