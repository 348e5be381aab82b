// Patch features and PCA (tessera/features.hpp): the features are last_hidden_state's patch
// tokens; the PCA matches numpy's eigh (tests/reference/make_pca_fixture.py) up to sign; the
// pictures and `tessera features` files are what they claim.
#include <catch2/catch.hpp>

#include <sys/wait.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <opencv2/imgcodecs.hpp>
#include <unistd.h>

#include "tessera/features.hpp"
#include "tessera/image.hpp"
#include "tessera/safetensors.hpp"

namespace fs = std::filesystem;
using namespace tessera;

namespace {
std::string fixture(const std::string& rel) { return (fs::path(TESSERA_FIXTURES) / rel).string(); }
}  // namespace

TEST_CASE("features: the patch tokens of last_hidden_state, on the grid", "[features]") {
  for (const char* rel : {"conformance/dinov2-small-rand", "conformance/vit-tiny-rand", "conformance/deit-tiny-distilled-rand"}) {
    INFO(rel);
    const auto model = load_model(fixture(rel));
    const Preprocessor pre = model_preprocessor(*model);
    const cv::Mat rgb = load_image_rgb(fixture("preprocess/photos/chelsea.png"));
    ModelWorkspace ws;
    const PatchFeatures f = patch_features(*model, pre, rgb, ws);
    Tensor x = pre.image(rgb);
    x = x.reshape({1, x.dim(0), x.dim(1), x.dim(2)});
    const NamedTensors outputs = model_forward(*model, x, ws);  // kept: output() returns a reference into it
    const Tensor& h = output(outputs, "last_hidden_state");
    const VitConfig& c = model->encoder.config;
    const int64_t gh = x.dim(2) / c.patch_size, gw = x.dim(3) / c.patch_size, D = h.dim(2);
    REQUIRE(f.tokens.shape() == Shape{gh, gw, D});
    const float* patches = h.data() + c.num_prefix_tokens() * D;
    float worst = 0;
    for (int64_t i = 0; i < f.tokens.numel(); ++i) worst = std::max(worst, std::abs(f.tokens[i] - patches[i]));
    CHECK(worst == 0.0f);  // the same forward pass: bit-identical
  }
}

TEST_CASE("features: PCA matches numpy's eigh up to sign", "[features]") {
  const SafeTensors st = SafeTensors::open(fixture("pca/pca.safetensors"));
  const Tensor x = st.get("x"), want = st.get("components"), variances = st.get("variances");
  const int64_t n = x.dim(0), d = x.dim(1);
  const Pca p = pca_fit(x.data(), n, d, 3);
  for (int64_t i = 0; i < 3; ++i) {
    INFO("component " << i);
    // Eigenvalues to 1e-5 relative; vectors to 1e-4 per entry after matching the sign.
    CHECK(p.variances[i] == Approx(variances[i]).epsilon(1e-5));
    double dot = 0;
    for (int64_t j = 0; j < d; ++j) dot += p.components[i * d + j] * want[i * d + j];
    const float sign = dot < 0 ? -1.0f : 1.0f;
    float worst = 0;
    for (int64_t j = 0; j < d; ++j) worst = std::max(worst, std::abs(p.components[i * d + j] - sign * want[i * d + j]));
    CHECK(worst < 1e-4f);
  }
  // Projections are uncorrelated with variances equal to the eigenvalues (1e-4 relative).
  const Tensor proj = pca_project(p, x.data(), n);
  for (int64_t a = 0; a < 3; ++a)
    for (int64_t b = 0; b < 3; ++b) {
      double s = 0;
      for (int64_t r = 0; r < n; ++r) s += static_cast<double>(proj[r * 3 + a]) * proj[r * 3 + b];
      s /= static_cast<double>(n - 1);
      if (a == b) CHECK(s == Approx(p.variances[a]).epsilon(1e-4));
      else CHECK(std::abs(s) < 1e-4 * p.variances[0]);
    }
}

TEST_CASE("features: PCA pictures span the colour range; background is black", "[features]") {
  const auto model = load_model(fixture("conformance/dinov2-small-rand"));
  const Preprocessor pre = model_preprocessor(*model);
  ModelWorkspace ws;
  std::vector<PatchFeatures> f;
  for (const char* img : {"preprocess/photos/chelsea.png", "preprocess/photos/coffee_portrait.png"})
    f.push_back(patch_features(*model, pre, load_image_rgb(fixture(img)), ws));
  const auto pics = pca_pictures(f);
  REQUIRE(pics.size() == 2);
  for (size_t i = 0; i < 2; ++i) CHECK(pics[i].size() == cv::Size(static_cast<int>(f[i].tokens.dim(1)), static_cast<int>(f[i].tokens.dim(0))));
  // Over both images together each channel reaches 0 and 255 (min-max over all tokens).
  for (int c = 0; c < 3; ++c) {
    double lo = 255, hi = 0;
    for (const cv::Mat& p : pics) {
      std::vector<cv::Mat> ch;
      cv::split(p, ch);
      double a = 0, b = 0;
      cv::minMaxLoc(ch[c], &a, &b);
      lo = std::min(lo, a), hi = std::max(hi, b);
    }
    CHECK(lo == 0);
    CHECK(hi == 255);
  }
  const auto masked = pca_pictures(f, 0.5);
  int black = 0, total = 0;
  for (const cv::Mat& p : masked) {
    total += p.rows * p.cols;
    for (int y = 0; y < p.rows; ++y)
      for (int x = 0; x < p.cols; ++x) black += p.at<cv::Vec3b>(y, x) == cv::Vec3b(0, 0, 0);
  }
  CHECK(black > 0);
  CHECK(black < total);
}

TEST_CASE("features: tessera features writes the features and the pictures", "[features][cli]") {
  const char* cli = std::getenv("TESSERA_CLI");
  REQUIRE(cli != nullptr);
  const fs::path dir = fs::temp_directory_path() / ("tessera_features_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  const std::string cmd = std::string(cli) + " features --model " + fixture("conformance/dinov2-small-rand") + " --out " +
                          (dir / "f.safetensors").string() + " --pca " + (dir / "pca").string() + " " +
                          fixture("preprocess/photos/chelsea.png") + " " + (dir / "missing.png").string() + " > " +
                          (dir / "log").string() + " 2>&1";
  const int status = std::system(cmd.c_str());
  REQUIRE(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 1);  // the missing image is reported, the other still done
  const SafeTensors st = SafeTensors::open((dir / "f.safetensors").string());
  REQUIRE(st.names().size() == 1);
  const Tensor t = st.get("features.0");
  CHECK(t.ndim() == 3);
  const cv::Mat pca = cv::imread((dir / "pca" / "chelsea_pca.png").string(), cv::IMREAD_UNCHANGED);
  const cv::Mat photo = cv::imread(fixture("preprocess/photos/chelsea.png"));
  CHECK(pca.size() == photo.size());
  CHECK(fs::exists(dir / "pca" / "chelsea_pca_overlay.jpg"));
  fs::remove_all(dir);
}
