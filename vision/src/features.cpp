// Patch features and PCA pictures (see features.hpp).
#include "tessera/features.hpp"

#include <Eigen/Dense>

#include <algorithm>
#include <cmath>

#include "tessera/attention_map.hpp"
#include "tessera/detection.hpp"
#include "tessera/error.hpp"
#include "tessera/preprocess.hpp"
#include "tessera/vit.hpp"

namespace tessera {

PatchFeatures patch_features(const Model& model, const Preprocessor& pre, const cv::Mat& rgb, ModelWorkspace& ws) {
  return patch_features(model, pre, std::vector<cv::Mat>{rgb}, ws).at(0);
}

std::vector<PatchFeatures> patch_features(const Model& model, const Preprocessor& pre,
                                          const std::vector<cv::Mat>& rgbs, ModelWorkspace& ws) {
  const VitConfig& c = model.encoder.config;
  std::vector<Tensor> xs;
  for (const cv::Mat& rgb : rgbs) xs.push_back(pre.image(rgb));
  std::vector<PatchFeatures> out(rgbs.size());
  for (size_t lo = 0; lo < xs.size();) {
    size_t hi = lo + 1;  // a run of images of one pre-processed size
    while (hi < xs.size() && xs[hi].shape() == xs[lo].shape()) ++hi;
    const int64_t n = static_cast<int64_t>(hi - lo), C = xs[lo].dim(0), H = xs[lo].dim(1), W = xs[lo].dim(2);
    Tensor x({n, C, H, W});
    for (size_t i = lo; i < hi; ++i) std::copy_n(xs[i].data(), xs[i].numel(), x.data() + (i - lo) * xs[i].numel());
    const int64_t gh = H / c.patch_size, gw = W / c.patch_size;
    Tensor hidden;
    int64_t first = c.num_prefix_tokens();
    if (model.detection && model.detection->window > 0) {  // a windowed DETR encoder: its merged rows
      hidden = windowed_encoder_forward(model, x, ws);
      first = 0;
    } else {
      hidden = vit_forward(model.encoder, x, ws.vit);
      check(hidden.dim(1) == c.num_prefix_tokens() + gh * gw + c.num_detection_tokens,
            model.dir + ": the encoder's tokens do not match its patch grid");
    }
    const int64_t T = hidden.dim(1), D = hidden.dim(2);
    for (size_t i = lo; i < hi; ++i) {
      PatchFeatures& f = out[i];
      f.tokens = Tensor({gh, gw, D});
      std::copy_n(hidden.data() + (static_cast<int64_t>(i - lo) * T + first) * D, gh * gw * D, f.tokens.data());
      f.original = rgbs[i].size();
      f.region = model_view_region(rgbs[i].size(), pre.config, c.patch_size);
    }
    lo = hi;
  }
  return out;
}

Pca pca_fit(const float* x, int64_t n, int64_t d, int64_t k) {
  check(n >= 2, "PCA needs at least two feature vectors");
  check(k >= 1 && k <= d, "PCA: asked for " + std::to_string(k) + " components of " + std::to_string(d) + " dimensions");
  const Eigen::Map<const Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>> X(x, n, d);
  const Eigen::MatrixXd Xd = X.cast<double>();
  const Eigen::RowVectorXd mean = Xd.colwise().mean();
  const Eigen::MatrixXd centred = Xd.rowwise() - mean;
  const Eigen::MatrixXd cov = (centred.transpose() * centred) / static_cast<double>(n - 1);
  const Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> solver(cov);
  check(solver.info() == Eigen::Success, "PCA: the eigen decomposition did not converge");
  Pca p;
  p.mean.assign(mean.data(), mean.data() + d);
  p.components = Tensor({k, d});
  for (int64_t i = 0; i < k; ++i) {
    const int64_t col = d - 1 - i;  // eigenvalues come in increasing order
    Eigen::VectorXd v = solver.eigenvectors().col(col);
    Eigen::Index at = 0;
    v.cwiseAbs().maxCoeff(&at);
    if (v(at) < 0) v = -v;
    p.variances.push_back(solver.eigenvalues()(col));
    for (int64_t j = 0; j < d; ++j) p.components[i * d + j] = static_cast<float>(v(j));
  }
  return p;
}

Tensor pca_project(const Pca& pca, const float* x, int64_t n) {
  const int64_t k = pca.components.dim(0), d = pca.components.dim(1);
  Tensor out({n, k});
  for (int64_t r = 0; r < n; ++r)
    for (int64_t i = 0; i < k; ++i) {
      double s = 0;
      for (int64_t j = 0; j < d; ++j) s += (x[r * d + j] - pca.mean[j]) * static_cast<double>(pca.components[i * d + j]);
      out[r * k + i] = static_cast<float>(s);
    }
  return out;
}

namespace {
// Columns of p [n, k] min-max normalised to [0, 1] over the rows where `use` is set.
void normalise_columns(Tensor& p, const std::vector<uint8_t>& use) {
  const int64_t n = p.dim(0), k = p.dim(1);
  for (int64_t i = 0; i < k; ++i) {
    float lo = INFINITY, hi = -INFINITY;
    for (int64_t r = 0; r < n; ++r)
      if (use[r]) lo = std::min(lo, p[r * k + i]), hi = std::max(hi, p[r * k + i]);
    for (int64_t r = 0; r < n; ++r) p[r * k + i] = hi > lo ? (p[r * k + i] - lo) / (hi - lo) : 0.5f;
  }
}
}  // namespace

std::vector<cv::Mat> pca_pictures(const std::vector<PatchFeatures>& features, double background_threshold) {
  check(!features.empty(), "PCA pictures: no images");
  const int64_t D = features[0].tokens.dim(2);
  int64_t n = 0;
  for (const PatchFeatures& f : features) {
    check(f.tokens.dim(2) == D, "PCA pictures: images with different feature widths");
    n += f.tokens.dim(0) * f.tokens.dim(1);
  }
  Tensor all({n, D});
  int64_t at = 0;
  for (const PatchFeatures& f : features) {
    std::copy_n(f.tokens.data(), f.tokens.numel(), all.data() + at * D);
    at += f.tokens.dim(0) * f.tokens.dim(1);
  }
  const int64_t k = std::min<int64_t>(3, D);
  Tensor proj = pca_project(pca_fit(all.data(), n, D, k), all.data(), n);
  std::vector<uint8_t> foreground(static_cast<size_t>(n), 1);
  if (background_threshold > 0) {
    normalise_columns(proj, foreground);
    int64_t kept = 0;
    for (int64_t r = 0; r < n; ++r) kept += foreground[r] = proj[r * k] >= background_threshold;
    if (kept >= 2) {  // the colours from the foreground's own components
      Tensor fg({kept, D});
      int64_t w = 0;
      for (int64_t r = 0; r < n; ++r)
        if (foreground[r]) std::copy_n(all.data() + r * D, D, fg.data() + (w++) * D);
      proj = pca_project(pca_fit(fg.data(), kept, D, k), all.data(), n);
    }
  }
  normalise_columns(proj, foreground);
  std::vector<cv::Mat> out;
  at = 0;
  for (const PatchFeatures& f : features) {
    const int gh = static_cast<int>(f.tokens.dim(0)), gw = static_cast<int>(f.tokens.dim(1));
    cv::Mat pic(gh, gw, CV_8UC3, cv::Scalar(0, 0, 0));
    for (int y = 0; y < gh; ++y)
      for (int x = 0; x < gw; ++x, ++at) {
        if (!foreground[at]) continue;
        cv::Vec3b& p = pic.at<cv::Vec3b>(y, x);
        for (int c = 0; c < 3; ++c) {
          const float v = c < k ? proj[at * k + c] : 0.0f;
          p[2 - c] = static_cast<uchar>(std::lround(std::clamp(v, 0.0f, 1.0f) * 255));  // component c → R, G, B
        }
      }
    out.push_back(pic);
  }
  return out;
}

}  // namespace tessera
