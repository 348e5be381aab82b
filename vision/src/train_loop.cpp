// The training loop: seeded shuffling and augmentation, minibatches cut into fixed slices that run
// in parallel (one gradient buffer each, summed in slice order: the same bits for any thread
// count), AdamW with a warmup + cosine learning rate, and OpenCV's digits data set.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>

#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>

#include "tessera/error.hpp"
#include "tessera/parallel.hpp"
#include "tessera/train.hpp"

namespace tessera {

uint64_t TrainRng::next() {
  uint64_t z = (state += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

double TrainRng::uniform() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }

double TrainRng::normal() {
  const double u1 = 1.0 - uniform(), u2 = uniform();  // u1 in (0, 1]
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * M_PI * u2);
}

uint64_t mix_seed(uint64_t seed, uint64_t stream, uint64_t index) {
  TrainRng a(seed ^ (stream * 0xd1b54a32d192ed03ULL));
  TrainRng b(a.next() ^ (index * 0x8cb92ba72f3d8dd7ULL));
  return b.next();
}

cv::Mat augment_digit(const cv::Mat& image, uint64_t seed) {
  TrainRng rng(seed);
  const double angle = rng.uniform(-12, 12) * M_PI / 180.0;
  const double scale = rng.uniform(0.9, 1.1);
  const double shear = rng.uniform(-0.15, 0.15);
  const double tx = rng.uniform(-2, 2), ty = rng.uniform(-2, 2);
  const bool blur = rng.uniform() < 0.3;
  const double sigma = rng.uniform(0.3, 0.9);
  const double gain = rng.uniform(0.6, 1.0);
  // dst = A (src − c) + c + t, A = scale · rotation · shear, about the image centre c.
  const double cx = (image.cols - 1) / 2.0, cy = (image.rows - 1) / 2.0;
  const double ca = std::cos(angle) * scale, sa = std::sin(angle) * scale;
  const double a00 = ca, a01 = ca * shear - sa, a10 = sa, a11 = sa * shear + ca;
  cv::Matx23d m(a00, a01, cx + tx - a00 * cx - a01 * cy,  //
                a10, a11, cy + ty - a10 * cx - a11 * cy);
  cv::Mat out;
  cv::warpAffine(image, out, m, image.size(), cv::INTER_LINEAR, cv::BORDER_CONSTANT, cv::Scalar::all(0));
  if (blur) cv::GaussianBlur(out, out, cv::Size(3, 3), sigma);
  out.convertTo(out, -1, gain, 0);
  return out;
}

void image_to_pixels(const cv::Mat& image, const PreprocessConfig& pre, float* out) {
  check(image.depth() == CV_8U && (image.channels() == 1 || image.channels() == 3),
        "train: images must be 8-bit gray or RGB");
  cv::Mat rgb;
  if (image.channels() == 1)
    cv::cvtColor(image, rgb, cv::COLOR_GRAY2RGB);  // as decoding a gray image file gives
  else
    rgb = image;
  Tensor t = preprocess(rgb, pre);
  std::memcpy(out, t.data(), sizeof(float) * t.numel());
}

VitTrainer::VitTrainer(const TrainVitConfig& config, const TrainOptions& options, const PreprocessConfig& pre)
    : config_(config), options_(options), pre_(pre) {
  config_.validate();
  check(options_.batch_size > 0, "train: batch size must be positive");
  check(options_.epochs > 0, "train: epochs must be positive");
  check(options_.grad_slices > 0, "train: grad_slices must be positive");
  const cv::Size out = preprocess_output_size(cv::Size(config_.image_size, config_.image_size), pre_);
  check(out.width == config_.image_size && out.height == config_.image_size,
        "train: the processor makes " + std::to_string(out.width) + "x" + std::to_string(out.height) +
            " inputs, the model takes " + std::to_string(config_.image_size));
  const int64_t n = param_count(config_);
  params_.assign(n, 0), grads_.assign(n, 0), adam_m_.assign(n, 0), adam_v_.assign(n, 0);
  init_params(config_, params_.data(), options_.seed);
}

double VitTrainer::learning_rate(int64_t step, int64_t total) const {
  const double peak = options_.learning_rate;
  const int64_t warmup =
      std::min<int64_t>(total, std::llround(total * options_.warmup_epochs / options_.epochs));
  if (step < warmup) return peak * static_cast<double>(step + 1) / static_cast<double>(warmup);
  const double progress = static_cast<double>(step - warmup) / std::max<int64_t>(1, total - warmup);
  const double lo = options_.min_lr_ratio;
  return peak * (lo + (1 - lo) * 0.5 * (1 + std::cos(M_PI * std::min(1.0, progress))));
}

EpochStats VitTrainer::train_epoch(const LabeledImages& data, int64_t epoch) {
  const int64_t B = options_.batch_size, K = config_.num_labels;
  const int64_t steps = static_cast<int64_t>(data.size()) / B;
  check(steps > 0, "train: " + std::to_string(data.size()) + " samples make no batch of " + std::to_string(B));
  const int64_t total = steps * options_.epochs;
  const int64_t S = std::min(B, options_.grad_slices);
  const int64_t pixels_per_image = config_.num_channels * config_.image_size * config_.image_size;
  const int64_t n_params = static_cast<int64_t>(params_.size());
  if (static_cast<int64_t>(slice_grads_.size()) != S) {
    slice_grads_.assign(S, std::vector<float>(n_params, 0.0f));
    slice_acts_.assign(S, VitActivations<float>{});
  }
  std::vector<std::vector<float>> slice_pixels(S);
  std::vector<std::vector<int64_t>> slice_labels(S);
  std::vector<double> slice_loss(S);
  std::vector<int64_t> slice_correct(S);
  const VitParams<float> weights = bind_params(config_, params_.data());
  std::vector<VitParams<float>> slice_views;
  for (auto& g : slice_grads_) slice_views.push_back(bind_params(config_, g.data()));
  std::vector<uint8_t> decay(n_params, 0);
  for (const ParamTensor& t : param_layout(config_))
    if (t.decay) std::fill(decay.begin() + t.offset, decay.begin() + t.offset + shape_numel(t.shape), 1);

  // A seeded permutation of the samples for this epoch.
  std::vector<int64_t> order(data.size());
  std::iota(order.begin(), order.end(), 0);
  TrainRng shuffle(mix_seed(options_.seed, 1, epoch));
  for (int64_t i = static_cast<int64_t>(order.size()) - 1; i > 0; --i) std::swap(order[i], order[shuffle.below(i + 1)]);

  EpochStats stats;
  double loss_sum = 0;
  int64_t correct = 0;
  for (int64_t s = 0; s < steps; ++s, ++step_) {
    const float lr = static_cast<float>(learning_rate(step_, total));
    parallel_for(0, S, 1, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t lo = k * B / S, hi = (k + 1) * B / S, n = hi - lo;
        slice_pixels[k].resize(n * pixels_per_image);
        slice_labels[k].resize(n);
        for (int64_t i = lo; i < hi; ++i) {
          const int64_t sample = order[s * B + i];
          const cv::Mat& image = data.images[sample];
          const cv::Mat input = options_.augment
                                    ? augment_digit(image, mix_seed(options_.seed, 2, step_ * B + i))
                                    : image;
          image_to_pixels(input, pre_, slice_pixels[k].data() + (i - lo) * pixels_per_image);
          slice_labels[k][i - lo] = data.labels[sample];
        }
        VitActivations<float>& acts = slice_acts_[k];
        vit_train_forward(config_, weights, slice_pixels[k].data(), n, acts);
        slice_correct[k] = 0;
        // The loss is the batch mean, so each sample's gradient is scaled by 1/B.
        slice_loss[k] = softmax_cross_entropy(acts.logits.data(), slice_labels[k].data(), n, K,
                                              1.0f / static_cast<float>(B), acts.dlogits.data(),
                                              &slice_correct[k]);
        std::fill(slice_grads_[k].begin(), slice_grads_[k].end(), 0.0f);
        vit_train_backward(config_, weights, slice_views[k], acts, acts.dlogits.data());
      }
    });
    for (int64_t k = 0; k < S; ++k) loss_sum += slice_loss[k], correct += slice_correct[k];
    // Sum the slices' gradients in slice order, then AdamW (decoupled weight decay on matrices).
    const float b1 = options_.beta1, b2 = options_.beta2;
    const float bc1 = 1.0f - std::pow(b1, static_cast<float>(step_ + 1));
    const float bc2 = 1.0f - std::pow(b2, static_cast<float>(step_ + 1));
    const float wd = options_.weight_decay, eps = options_.adam_eps;
    parallel_for(0, n_params, 4096, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        float g = 0;
        for (int64_t k = 0; k < S; ++k) g += slice_grads_[k][i];
        grads_[i] = g;
        float& m = adam_m_[i];
        float& v = adam_v_[i];
        m = b1 * m + (1 - b1) * g;
        v = b2 * v + (1 - b2) * g * g;
        const float update = (m / bc1) / (std::sqrt(v / bc2) + eps) + (decay[i] ? wd * params_[i] : 0.0f);
        params_[i] -= lr * update;
      }
    });
    stats.learning_rate = lr;
  }
  stats.steps = steps;
  stats.loss = loss_sum / static_cast<double>(steps * B);
  stats.accuracy = static_cast<double>(correct) / static_cast<double>(steps * B);
  return stats;
}

Tensor VitTrainer::logits(const std::vector<cv::Mat>& images) const {
  const int64_t N = static_cast<int64_t>(images.size()), K = config_.num_labels, chunk = 32;
  const int64_t pixels_per_image = config_.num_channels * config_.image_size * config_.image_size;
  Tensor out({N, K});
  const VitParams<float> weights = bind_params(config_, const_cast<float*>(params_.data()));
  parallel_for(0, (N + chunk - 1) / chunk, 1, [&](int64_t c0, int64_t c1) {
    VitActivations<float> acts;
    std::vector<float> pixels;
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t lo = c * chunk, n = std::min(N, lo + chunk) - lo;
      pixels.resize(n * pixels_per_image);
      for (int64_t i = 0; i < n; ++i) image_to_pixels(images[lo + i], pre_, pixels.data() + i * pixels_per_image);
      vit_train_forward(config_, weights, pixels.data(), n, acts);
      std::memcpy(out.data() + lo * K, acts.logits.data(), sizeof(float) * n * K);
    }
  });
  return out;
}

double VitTrainer::accuracy(const LabeledImages& data) const {
  if (data.size() == 0) return 0;
  const Tensor z = logits(data.images);
  const int64_t K = config_.num_labels;
  int64_t correct = 0;
  for (size_t i = 0; i < data.size(); ++i) {
    const float* row = z.data() + i * K;
    if (std::max_element(row, row + K) - row == data.labels[i]) ++correct;
  }
  return static_cast<double>(correct) / static_cast<double>(data.size());
}

LabeledImages load_opencv_digits(const std::string& path) {
  cv::Mat all = cv::imread(path, cv::IMREAD_GRAYSCALE);
  check(!all.empty(), path + ": cannot read the digits image (Debian: apt-get install opencv-doc; "
                             "or pass --digits-png PATH to OpenCV's samples/data/digits.png)");
  check(all.cols == 2000 && all.rows == 1000,
        path + ": expected OpenCV's 2000x1000 digits.png, got " + std::to_string(all.cols) + "x" +
            std::to_string(all.rows));
  LabeledImages out;
  for (int r = 0; r < 50; ++r)
    for (int c = 0; c < 100; ++c) {
      out.images.push_back(all(cv::Rect(c * 20, r * 20, 20, 20)).clone());
      out.labels.push_back(r / 5);
    }
  return out;
}

std::pair<LabeledImages, LabeledImages> split_stratified(const LabeledImages& data, double test_fraction,
                                                         uint64_t seed) {
  check(test_fraction >= 0 && test_fraction < 1, "train: test fraction must be in [0, 1)");
  const int64_t classes = data.labels.empty() ? 0 : *std::max_element(data.labels.begin(), data.labels.end()) + 1;
  std::vector<uint8_t> is_test(data.size(), 0);
  for (int64_t c = 0; c < classes; ++c) {
    std::vector<int64_t> members;
    for (size_t i = 0; i < data.size(); ++i)
      if (data.labels[i] == c) members.push_back(static_cast<int64_t>(i));
    TrainRng rng(mix_seed(seed, 3, c));
    for (int64_t i = static_cast<int64_t>(members.size()) - 1; i > 0; --i) std::swap(members[i], members[rng.below(i + 1)]);
    const int64_t n_test = std::llround(test_fraction * static_cast<double>(members.size()));
    for (int64_t i = 0; i < n_test; ++i) is_test[members[i]] = 1;
  }
  std::pair<LabeledImages, LabeledImages> out;
  for (size_t i = 0; i < data.size(); ++i) {
    LabeledImages& dst = is_test[i] ? out.second : out.first;
    dst.images.push_back(data.images[i]);
    dst.labels.push_back(data.labels[i]);
  }
  return out;
}

}  // namespace tessera
