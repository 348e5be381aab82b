// Evaluation metrics (see metrics.hpp). coco_evaluate follows pycocotools' cocoeval.py
// (evaluateImg, accumulate, summarize) step by step, including its stable sorts, so ties between
// scores resolve as they do there: by image (in sorted id order), then by the detection's order.
#include "tessera/metrics.hpp"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <numeric>
#include <set>
#include <sstream>

#include "tessera/error.hpp"

namespace fs = std::filesystem;

namespace tessera {

namespace {

constexpr int kThresholds = 10;     // IoU 0.50:0.05:0.95
constexpr int kRecallPoints = 101;  // recall 0:0.01:1
constexpr int kAreas = 4;           // all, small, medium, large
const double kAreaRange[kAreas][2] = {{0, 1e10}, {0, 32.0 * 32}, {32.0 * 32, 96.0 * 96}, {96.0 * 96, 1e10}};
constexpr int kMaxDets[3] = {1, 10, 100};

// np.linspace(.5, 0.95, 10) computes start + i * ((stop - start) / 9) and sets the last to stop.
double iou_threshold(int t) { return t == kThresholds - 1 ? 0.95 : 0.5 + t * ((0.95 - 0.5) / 9); }
double recall_threshold(int r) { return 0.01 * r; }     // np.linspace(.0, 1.00, 101)

// evaluateImg's result for one (image, category, area range).
struct ImageEval {
  std::vector<double> dt_scores;              // sorted descending (stable), at most 100
  std::vector<std::array<bool, kThresholds>> dt_matched, dt_ignored;
  std::vector<bool> gt_ignored;
};

}  // namespace

double coco_box_iou(const CocoObject& d, const CocoObject& g, bool crowd) {
  const double w = std::min(d.x + d.w, g.x + g.w) - std::max(d.x, g.x);
  if (w <= 0) return 0;
  const double h = std::min(d.y + d.h, g.y + g.h) - std::max(d.y, g.y);
  if (h <= 0) return 0;
  const double inter = w * h;
  const double uni = crowd ? d.w * d.h : d.w * d.h + g.w * g.h - inter;
  return inter / uni;
}

CocoEvalResult coco_evaluate(std::vector<int64_t> image_ids, std::vector<int64_t> category_ids,
                             const std::vector<CocoObject>& gt, const std::vector<CocoObject>& dt) {
  std::sort(image_ids.begin(), image_ids.end());
  image_ids.erase(std::unique(image_ids.begin(), image_ids.end()), image_ids.end());
  std::sort(category_ids.begin(), category_ids.end());
  category_ids.erase(std::unique(category_ids.begin(), category_ids.end()), category_ids.end());
  const size_t I = image_ids.size(), K = category_ids.size();
  std::map<int64_t, size_t> image_index, category_index;
  for (size_t i = 0; i < I; ++i) image_index[image_ids[i]] = i;
  for (size_t k = 0; k < K; ++k) category_index[category_ids[k]] = k;
  // Objects per (image, category), in input order.
  std::vector<std::vector<const CocoObject*>> gts(I * K), dts(I * K);
  for (const CocoObject& g : gt) {
    auto i = image_index.find(g.image_id);
    auto k = category_index.find(g.category_id);
    if (i != image_index.end() && k != category_index.end()) gts[k->second * I + i->second].push_back(&g);
  }
  for (const CocoObject& d : dt) {
    auto i = image_index.find(d.image_id);
    auto k = category_index.find(d.category_id);
    if (i != image_index.end() && k != category_index.end()) dts[k->second * I + i->second].push_back(&d);
  }

  // precision[t][r][k][a][m], recall[t][k][a][m]; -1 = not measured.
  const size_t M = 3;
  std::vector<double> precision(kThresholds * kRecallPoints * K * kAreas * M, -1.0);
  std::vector<double> recall(kThresholds * K * kAreas * M, -1.0);
  auto P = [&](int t, int r, size_t k, int a, size_t m) -> double& {
    return precision[(((t * kRecallPoints + r) * K + k) * kAreas + a) * M + m];
  };
  auto R = [&](int t, size_t k, int a, size_t m) -> double& { return recall[((t * K + k) * kAreas + a) * M + m]; };

  for (size_t k = 0; k < K; ++k) {
    // computeIoU: detections sorted by score (stable), at most maxDets[-1].
    std::vector<std::vector<const CocoObject*>> sorted_dt(I);
    for (size_t i = 0; i < I; ++i) {
      sorted_dt[i] = dts[k * I + i];
      std::stable_sort(sorted_dt[i].begin(), sorted_dt[i].end(),
                       [](const CocoObject* a, const CocoObject* b) { return a->score > b->score; });
      if (sorted_dt[i].size() > 100) sorted_dt[i].resize(100);
    }
    for (int a = 0; a < kAreas; ++a) {
      std::vector<ImageEval> evals;
      evals.reserve(I);
      for (size_t i = 0; i < I; ++i) {
        const auto& g_in = gts[k * I + i];
        const auto& d = sorted_dt[i];
        if (g_in.empty() && d.empty()) continue;  // evaluateImg returns None
        // Ground truth: not ignored first (stable).
        std::vector<const CocoObject*> g;
        std::vector<bool> g_ignore;
        for (int pass = 0; pass < 2; ++pass)
          for (const CocoObject* o : g_in) {
            const bool ig = o->crowd || o->area < kAreaRange[a][0] || o->area > kAreaRange[a][1];
            if (ig == (pass == 1)) {
              g.push_back(o);
              g_ignore.push_back(ig);
            }
          }
        ImageEval e;
        e.gt_ignored = g_ignore;
        e.dt_matched.assign(d.size(), {});
        e.dt_ignored.assign(d.size(), {});
        for (const CocoObject* o : d) e.dt_scores.push_back(o->score);
        std::vector<std::vector<double>> ious(d.size(), std::vector<double>(g.size()));
        for (size_t di = 0; di < d.size(); ++di)
          for (size_t gi = 0; gi < g.size(); ++gi) ious[di][gi] = coco_box_iou(*d[di], *g[gi], g[gi]->crowd);
        for (int t = 0; t < kThresholds; ++t) {
          std::vector<bool> g_matched(g.size(), false);
          for (size_t di = 0; di < d.size(); ++di) {
            double best = std::min(iou_threshold(t), 1 - 1e-10);
            int m = -1;
            for (size_t gi = 0; gi < g.size(); ++gi) {
              if (g_matched[gi] && !g[gi]->crowd) continue;
              if (m > -1 && !g_ignore[m] && g_ignore[gi]) break;
              if (ious[di][gi] < best) continue;
              best = ious[di][gi];
              m = static_cast<int>(gi);
            }
            if (m == -1) continue;
            e.dt_ignored[di][t] = g_ignore[m];
            e.dt_matched[di][t] = true;
            g_matched[m] = true;
          }
        }
        for (size_t di = 0; di < d.size(); ++di) {
          const bool out_of_range = d[di]->area < kAreaRange[a][0] || d[di]->area > kAreaRange[a][1];
          for (int t = 0; t < kThresholds; ++t)
            e.dt_ignored[di][t] = e.dt_ignored[di][t] || (!e.dt_matched[di][t] && out_of_range);
        }
        evals.push_back(std::move(e));
      }
      if (evals.empty()) continue;
      int64_t npig = 0;
      for (const ImageEval& e : evals)
        for (bool ig : e.gt_ignored) npig += !ig;
      for (size_t m = 0; m < M; ++m) {
        if (npig == 0) continue;
        const size_t max_det = static_cast<size_t>(kMaxDets[m]);
        struct Entry {
          double score;
          const ImageEval* e;
          size_t d;
        };
        std::vector<Entry> all;
        for (const ImageEval& e : evals)
          for (size_t di = 0; di < std::min(max_det, e.dt_scores.size()); ++di) all.push_back({e.dt_scores[di], &e, di});
        std::stable_sort(all.begin(), all.end(), [](const Entry& x, const Entry& y) { return x.score > y.score; });
        for (int t = 0; t < kThresholds; ++t) {
          std::vector<double> rc, pr;
          double tp = 0, fp = 0;
          for (const Entry& x : all) {
            const bool matched = x.e->dt_matched[x.d][t], ignored = x.e->dt_ignored[x.d][t];
            tp += matched && !ignored;
            fp += !matched && !ignored;
            rc.push_back(tp / static_cast<double>(npig));
            pr.push_back(tp / (fp + tp + std::numeric_limits<double>::epsilon()));
          }
          R(t, k, a, m) = rc.empty() ? 0 : rc.back();
          for (size_t i = pr.size(); i-- > 1;)
            if (pr[i] > pr[i - 1]) pr[i - 1] = pr[i];
          for (int r = 0; r < kRecallPoints; ++r) {
            const size_t pi = static_cast<size_t>(
                std::lower_bound(rc.begin(), rc.end(), recall_threshold(r)) - rc.begin());
            P(t, r, k, a, m) = pi < pr.size() ? pr[pi] : 0.0;
          }
        }
      }
    }
  }

  // summarize()
  auto mean_valid = [](const std::vector<double>& v) {
    double s = 0;
    int64_t n = 0;
    for (double x : v)
      if (x > -1) s += x, ++n;
    return n == 0 ? -1.0 : s / static_cast<double>(n);
  };
  auto ap = [&](int t_only, int a, size_t m) {  // t_only -1: every threshold
    std::vector<double> v;
    for (int t = 0; t < kThresholds; ++t)
      if (t_only < 0 || t == t_only)
        for (int r = 0; r < kRecallPoints; ++r)
          for (size_t k = 0; k < K; ++k) v.push_back(P(t, r, k, a, m));
    return mean_valid(v);
  };
  auto ar = [&](int a, size_t m) {
    std::vector<double> v;
    for (int t = 0; t < kThresholds; ++t)
      for (size_t k = 0; k < K; ++k) v.push_back(R(t, k, a, m));
    return mean_valid(v);
  };
  CocoEvalResult out;
  out.stats = {ap(-1, 0, 2), ap(0, 0, 2), ap(5, 0, 2), ap(-1, 1, 2), ap(-1, 2, 2), ap(-1, 3, 2),
               ar(0, 0),     ar(0, 1),    ar(0, 2),    ar(1, 2),     ar(2, 2),     ar(3, 2)};
  out.category_ids = category_ids;
  for (size_t k = 0; k < K; ++k) {
    std::vector<double> v;
    for (int t = 0; t < kThresholds; ++t)
      for (int r = 0; r < kRecallPoints; ++r) v.push_back(P(t, r, k, 0, 2));
    out.category_ap.push_back(mean_valid(v));
  }
  return out;
}

// ------------------------------------------------------------------------- COCO instances file

namespace {

std::string short_dump(const nlohmann::json& j) {
  std::string s = j.dump();
  return s.size() > 80 ? s.substr(0, 77) + "..." : s;
}

double finite_number(const nlohmann::json& j, const std::string& where) {
  if (!j.is_number()) fail(where + " is not a number: " + short_dump(j));
  const double v = j.get<double>();
  if (!std::isfinite(v)) fail(where + " is not finite");
  return v;
}

int64_t integer_id(const nlohmann::json& j, const std::string& where) {
  if (!j.is_number_integer()) fail(where + " is not an integer: " + short_dump(j));
  return j.get<int64_t>();
}

}  // namespace

CocoDataset load_coco_instances(const std::string& json_path) {
  std::error_code ec;
  const fs::path path(json_path);
  check(fs::exists(path, ec), json_path + ": no such file");
  check(fs::is_regular_file(path, ec), json_path + ": not a regular file");
  std::ifstream in(path, std::ios::binary);
  check(static_cast<bool>(in), json_path + ": cannot open");
  std::stringstream ss;
  ss << in.rdbuf();
  const std::string text = ss.str();
  // Nesting beyond a COCO file's few levels is refused before parsing: a hostile file must not
  // exhaust the stack.
  int depth = 0, max_depth = 0;
  bool in_string = false, escaped = false;
  for (char c : text) {
    if (in_string) {
      if (escaped) escaped = false;
      else if (c == '\\') escaped = true;
      else if (c == '"') in_string = false;
      continue;
    }
    if (c == '"') in_string = true;
    else if (c == '[' || c == '{') max_depth = std::max(max_depth, ++depth);
    else if (c == ']' || c == '}') --depth;
  }
  check(max_depth <= 32, json_path + ": JSON nested " + std::to_string(max_depth) + " levels deep (a COCO file has 4)");
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    fail(json_path + ": not valid JSON (" + std::string(e.what()) + ")");
  }
  CocoDataset out;
  out.json_path = json_path;
  const std::string f = json_path + ": ";
  check(j.is_object(), f + "not a COCO instances file (expected a JSON object)");
  for (const char* key : {"images", "annotations", "categories"})
    check(j.contains(key) && j[key].is_array(), f + "no \"" + key + "\" array (not a COCO instances file)");
  std::set<int64_t> category_set;
  for (size_t n = 0; n < j["categories"].size(); ++n) {
    const auto& c = j["categories"][n];
    const std::string where = f + "categories[" + std::to_string(n) + "]";
    check(c.is_object() && c.contains("id"), where + " has no id");
    CocoCategory cat;
    cat.id = integer_id(c["id"], where + ".id");
    check(cat.id >= 0, where + ".id is negative");
    check(category_set.insert(cat.id).second, where + ": category id " + std::to_string(cat.id) + " appears twice");
    cat.name = c.contains("name") && c["name"].is_string() ? c["name"].get<std::string>() : std::to_string(cat.id);
    out.categories.push_back(cat);
  }
  std::sort(out.categories.begin(), out.categories.end(), [](const CocoCategory& a, const CocoCategory& b) { return a.id < b.id; });
  std::map<int64_t, size_t> image_at;
  const fs::path folder = path.parent_path();
  for (size_t n = 0; n < j["images"].size(); ++n) {
    const auto& im = j["images"][n];
    const std::string where = f + "images[" + std::to_string(n) + "]";
    check(im.is_object() && im.contains("id") && im.contains("file_name") && im.contains("width") && im.contains("height"),
          where + " needs id, file_name, width and height");
    CocoImage image;
    image.id = integer_id(im["id"], where + ".id");
    check(im["file_name"].is_string(), where + ".file_name is not a string");
    image.file_name = im["file_name"].get<std::string>();
    check(!image.file_name.empty(), where + ".file_name is empty");
    const int64_t w = integer_id(im["width"], where + ".width"), h = integer_id(im["height"], where + ".height");
    check(w > 0 && h > 0 && w <= 1000000 && h <= 1000000,
          where + ": size " + std::to_string(w) + "x" + std::to_string(h) + " is not a real image size");
    image.width = static_cast<int>(w);
    image.height = static_cast<int>(h);
    image.path = (folder / image.file_name).string();
    check(image_at.emplace(image.id, out.images.size()).second, where + ": image id " + std::to_string(image.id) + " appears twice");
    out.images.push_back(image);
  }
  for (size_t n = 0; n < j["annotations"].size(); ++n) {
    const auto& a = j["annotations"][n];
    const std::string where = f + "annotations[" + std::to_string(n) + "]";
    check(a.is_object() && a.contains("image_id") && a.contains("category_id") && a.contains("bbox"),
          where + " needs image_id, category_id and bbox");
    CocoObject o;
    o.image_id = integer_id(a["image_id"], where + ".image_id");
    o.category_id = integer_id(a["category_id"], where + ".category_id");
    auto im = image_at.find(o.image_id);
    check(im != image_at.end(), where + ": image_id " + std::to_string(o.image_id) + " is not in \"images\"");
    check(category_set.count(o.category_id) != 0,
          where + ": category_id " + std::to_string(o.category_id) + " is not in \"categories\"");
    check(a["bbox"].is_array() && a["bbox"].size() == 4, where + ".bbox is not [x, y, w, h]");
    o.x = finite_number(a["bbox"][0], where + ".bbox[0]");
    o.y = finite_number(a["bbox"][1], where + ".bbox[1]");
    o.w = finite_number(a["bbox"][2], where + ".bbox[2]");
    o.h = finite_number(a["bbox"][3], where + ".bbox[3]");
    check(o.w >= 0 && o.h >= 0, where + ": bbox has a negative width or height");
    const CocoImage& image = out.images[im->second];
    char box[160];
    std::snprintf(box, sizeof box, "[%g, %g, %g, %g]", o.x, o.y, o.w, o.h);
    check(o.x >= -1 && o.y >= -1 && o.x + o.w <= image.width + 1 && o.y + o.h <= image.height + 1,
          where + ": bbox " + box + " lies outside image " + std::to_string(image.id) + " (" +
              std::to_string(image.width) + "x" + std::to_string(image.height) + ")");
    o.area = a.contains("area") ? finite_number(a["area"], where + ".area") : o.w * o.h;
    check(o.area >= 0, where + ".area is negative");
    o.crowd = a.contains("iscrowd") && a["iscrowd"].is_number() && a["iscrowd"].get<double>() != 0;
    out.annotations.push_back(o);
  }
  return out;
}

// ------------------------------------------------------------------------------ segmentation

SegmentationConfusion::SegmentationConfusion(int64_t num_classes, int ignore_label)
    : n_(num_classes), ignore_(ignore_label), counts_(static_cast<size_t>(num_classes * num_classes), 0) {
  check(num_classes >= 1, "segmentation metrics: need at least one class");
}

void SegmentationConfusion::add(const cv::Mat& truth, const cv::Mat& predicted, const std::string& source) {
  check(truth.size() == predicted.size(),
        source + ": mask is " + std::to_string(truth.cols) + "x" + std::to_string(truth.rows) + ", the image " +
            std::to_string(predicted.cols) + "x" + std::to_string(predicted.rows));
  auto value = [](const cv::Mat& m, int y, int x) -> int {
    return m.depth() == CV_16U ? m.at<uint16_t>(y, x) : m.at<uint8_t>(y, x);
  };
  check((truth.type() == CV_8UC1 || truth.type() == CV_16UC1), source + ": mask is not a one-channel 8- or 16-bit image");
  check((predicted.type() == CV_8UC1 || predicted.type() == CV_16UC1), "segmentation metrics: prediction is not a label map");
  for (int y = 0; y < truth.rows; ++y)
    for (int x = 0; x < truth.cols; ++x) {
      const int t = value(truth, y, x);
      if (t == ignore_) continue;
      check(t < n_, source + ": mask label " + std::to_string(t) + " at (" + std::to_string(x) + ", " + std::to_string(y) +
                        ") is not a class of the model (" + std::to_string(n_) + " classes; " +
                        std::to_string(ignore_) + " = ignore)");
      const int p = value(predicted, y, x);
      check(p < n_, "segmentation metrics: predicted label out of range");
      ++counts_[static_cast<size_t>(t * n_ + p)];
    }
}

std::vector<double> SegmentationConfusion::class_iou() const {
  std::vector<double> out(static_cast<size_t>(n_));
  for (int64_t c = 0; c < n_; ++c) {
    int64_t tp = count(c, c), fn = 0, fp = 0;
    for (int64_t o = 0; o < n_; ++o)
      if (o != c) fn += count(c, o), fp += count(o, c);
    const int64_t uni = tp + fn + fp;
    out[static_cast<size_t>(c)] = uni == 0 ? std::nan("") : static_cast<double>(tp) / static_cast<double>(uni);
  }
  return out;
}

double SegmentationConfusion::mean_iou() const {
  double s = 0;
  int64_t n = 0;
  for (double v : class_iou())
    if (!std::isnan(v)) s += v, ++n;
  return n == 0 ? std::nan("") : s / static_cast<double>(n);
}

int64_t SegmentationConfusion::pixels() const { return std::accumulate(counts_.begin(), counts_.end(), int64_t{0}); }

double SegmentationConfusion::pixel_accuracy() const {
  int64_t correct = 0;
  for (int64_t c = 0; c < n_; ++c) correct += count(c, c);
  const int64_t total = pixels();
  return total == 0 ? std::nan("") : static_cast<double>(correct) / static_cast<double>(total);
}

}  // namespace tessera
