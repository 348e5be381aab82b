// The README's example: classify one image with a model folder.
#include <tessera/model.hpp>
#include <tessera/pipeline.hpp>
#include <cstdio>

int main(int argc, char** argv) {
  if (argc != 3) return std::fprintf(stderr, "usage: %s MODEL_DIR IMAGE\n", argv[0]), 2;
  auto model = tessera::load_model(argv[1]);                 // a model folder
  tessera::Preprocessor pre = tessera::model_preprocessor(*model);
  tessera::Tensor pixels = pre.batch({argv[2]});             // [1, 3, H, W]
  tessera::ModelWorkspace ws;                                // reuse it: no allocation after the first call
  auto outputs = tessera::model_forward(*model, pixels, ws);
  auto top = tessera::top_k(tessera::output(outputs, "logits"), model->labels, 5);
  for (const auto& p : top[0]) std::printf("%.4f %s\n", p.probability, p.name.c_str());
}
