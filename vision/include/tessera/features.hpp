#pragma once
// Patch features and their principal components (the DINOv2 picture): the encoder's last hidden
// state at the patch tokens, laid out on the patch grid, and a PCA of them over many images whose
// first three components become RGB.
#include <opencv2/core.hpp>

#include <cstdint>
#include <vector>

#include "tessera/model.hpp"
#include "tessera/pipeline.hpp"
#include "tessera/tensor.hpp"

namespace tessera {

struct PatchFeatures {
  Tensor tokens;        // [gh, gw, D]: the final-norm output at the patch tokens, row-major grid
  cv::Rect2d region;    // where the grid lies in the original image (model_view_region)
  cv::Size original;    // the original image's size
};

// One RGB image through the model's encoder (any family Tessera loads: the ViT under classifiers,
// feature models, YOLOS and Segmenter). Prefix (class, distillation, register) and detection tokens
// are dropped.
PatchFeatures patch_features(const Model& model, const Preprocessor& pre, const cv::Mat& rgb, ModelWorkspace& ws);
// The same for several images: consecutive images that pre-process to one size share a forward
// pass; the results are those of one image at a time.
std::vector<PatchFeatures> patch_features(const Model& model, const Preprocessor& pre,
                                          const std::vector<cv::Mat>& rgbs, ModelWorkspace& ws);

// Principal components of the rows of x [n, d] (n >= 2): the covariance (1 / (n - 1), in double)
// diagonalised by Eigen's SelfAdjointEigenSolver. components [k, d], largest variance first, each
// signed so that its largest-magnitude entry is positive (eigenvectors have no sign of their own).
struct Pca {
  std::vector<double> mean;       // [d]
  std::vector<double> variances;  // [k] eigenvalues of the covariance
  Tensor components;              // [k, d]
};
Pca pca_fit(const float* x, int64_t n, int64_t d, int64_t k);
// (x - mean) · componentsᵀ: [n, k]
Tensor pca_project(const Pca& pca, const float* x, int64_t n);

// The DINOv2-style pictures for a set of images, their PCA taken over all of them together:
// the first three components, each min-max normalised over every token, as R, G, B. With
// background_threshold > 0, tokens whose first component (min-max normalised to [0, 1]) is below
// it are background: black, and the colours come from a second PCA over the foreground tokens
// only (as in DINOv2's demo). One [gh, gw] CV_8UC3 (BGR) picture per image, on the patch grid.
std::vector<cv::Mat> pca_pictures(const std::vector<PatchFeatures>& features, double background_threshold = 0);

}  // namespace tessera
