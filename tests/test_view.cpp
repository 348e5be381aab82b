// Drawing, attention rollout, and the viewer. Box pixels are checked at coordinates the test
// computes itself; the rollout is checked against a full double-precision matrix product of the
// recorded attention (and a hand-computed case); the viewer runs in a real X server (Xvfb), and
// its screenshot and saved overlays are checked for the box colours.
#include <catch2/catch.hpp>

#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>
#include <opencv2/videoio.hpp>
#include <sstream>
#include <thread>

#include "cli_util.hpp"
#include "tessera/attention_map.hpp"
#include "tessera/draw.hpp"
#include "tessera/text.hpp"
#include "tessera/image.hpp"
#include "tessera/model.hpp"
#include "tessera/pipeline.hpp"
#include "tessera/vit.hpp"

namespace fs = std::filesystem;
using namespace tessera;

namespace {

fs::path scratch(const std::string& sub) {
  fs::path p = fs::temp_directory_path() / ("tessera_view_" + std::to_string(::getpid())) / sub;
  fs::remove_all(p);
  fs::create_directories(p);
  return p;
}

using test::slurp;

std::string fixture(const std::string& rel) { return (fs::path(TESSERA_FIXTURES) / rel).string(); }

cv::Vec3b bgr_of(const cv::Scalar& s) {
  return {static_cast<uchar>(s[0]), static_cast<uchar>(s[1]), static_cast<uchar>(s[2])};
}

Detection det(int64_t label, const std::string& name, float score, float x0, float y0, float x1, float y1) {
  Detection d;
  d.label = label, d.name = name, d.score = score;
  d.x0 = x0, d.y0 = y0, d.x1 = x1, d.y1 = y1;
  return d;
}

int count_colour(const cv::Mat& img, const cv::Vec3b& c, cv::Rect where = {}) {
  if (where.empty()) where = cv::Rect(0, 0, img.cols, img.rows);
  int n = 0;
  for (int y = where.y; y < where.y + where.height; ++y)
    for (int x = where.x; x < where.x + where.width; ++x) n += img.at<cv::Vec3b>(y, x) == c;
  return n;
}

using Run = test::CliRun;

// The viewer under a time limit: a window that never closes fails the test instead of hanging it.
Run run_cli(const std::string& args, const std::string& env = "") {
  return test::run_cli(args, (env.empty() ? "" : env + " ") + "timeout 120");
}

int lines(const std::string& s) {
  int n = 0;
  for (char c : s) n += c == '\n';
  return n;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Drawing

TEST_CASE("class colours are stable and distinct") {
  for (int64_t a = 0; a < 91; ++a) {
    CHECK(class_colour(a) == class_colour(a));
    const cv::Scalar ca = class_colour(a);
    for (int64_t b = a + 1; b < std::min<int64_t>(a + 6, 91); ++b) {  // neighbours: far apart
      const cv::Scalar cb = class_colour(b);
      const double dist = std::abs(ca[0] - cb[0]) + std::abs(ca[1] - cb[1]) + std::abs(ca[2] - cb[2]);
      CHECK(dist > 60);
    }
  }
  // Text contrast: black on yellow, white on dark blue.
  CHECK(text_colour_on(cv::Scalar(0, 230, 255)) == cv::Scalar(0, 0, 0));
  CHECK(text_colour_on(cv::Scalar(120, 20, 0)) == cv::Scalar(255, 255, 255));
}

TEST_CASE("boxes at known coordinates have the class colour on their edges and nowhere else") {
  for (cv::Size size : {cv::Size(320, 240), cv::Size(4000, 3000)}) {
    CAPTURE(size);
    const double s = size.width / 320.0;
    const cv::Vec3b grey(100, 110, 120);
    cv::Mat img(size, CV_8UC3, cv::Scalar(grey[0], grey[1], grey[2]));
    const Detection d = det(2, "dog", 0.87f, 40 * s, 60 * s, 200 * s, 180 * s);
    DrawOptions opt;
    opt.labels = false;
    draw_detections(img, {d}, opt);
    const cv::Vec3b c = bgr_of(class_colour(2));
    const int t = auto_thickness(size);
    CHECK(t == (size.width == 320 ? 1 : 9));
    const int x0 = static_cast<int>(std::lround(d.x0)), y0 = static_cast<int>(std::lround(d.y0));
    const int x1 = static_cast<int>(std::lround(d.x1)), y1 = static_cast<int>(std::lround(d.y1));
    const int ym = (y0 + y1) / 2, xm = (x0 + x1) / 2;
    // Every pixel across the line width (centred on the coordinate) is the class colour.
    for (int k = -(t / 2); k <= t / 2; ++k) {
      CHECK(img.at<cv::Vec3b>(ym, x0 + k) == c);
      CHECK(img.at<cv::Vec3b>(ym, x1 + k) == c);
      CHECK(img.at<cv::Vec3b>(y0 + k, xm) == c);
      CHECK(img.at<cv::Vec3b>(y1 + k, xm) == c);
    }
    // Just outside and inside the line: untouched.
    CHECK(img.at<cv::Vec3b>(ym, x0 - t / 2 - 2) == grey);
    CHECK(img.at<cv::Vec3b>(ym, x0 + t / 2 + 2) == grey);
    CHECK(img.at<cv::Vec3b>(ym, xm) == grey);
    // The coloured pixels are exactly the four edges: perimeter × thickness (± corners).
    // The coloured pixels are the four edges: perimeter × thickness (OpenCV's thick lines cover
    // up to two more pixels: t = 9 covers x0 - 5 ... x0 + 5) plus the corners.
    const int perimeter = 2 * ((x1 - x0) + (y1 - y0));
    const int expected = perimeter * (t == 1 ? 1 : t + 2) + 4 * (t + 2) * (t + 2);
    CHECK(count_colour(img, c) >= perimeter * t);
    CHECK(count_colour(img, c) <= expected);

    // With the tag: a filled block of the class colour right above the top edge, text inside it.
    cv::Mat tagged(size, CV_8UC3, cv::Scalar(grey[0], grey[1], grey[2]));
    draw_detections(tagged, {d}, DrawOptions{});
    const TagLayout L = layout_tag(size, d, DrawOptions{});
    CHECK(L.text == "dog 0.87");
    CHECK(L.tag.y + L.tag.height <= y0 + t);  // above the box (overlapping its line)
    CHECK(L.tag.x <= x0);
    CHECK(tagged.at<cv::Vec3b>(L.tag.y + 1, L.tag.x + 1) == c);
    // Text in the tag: anti-aliased, so count the pixels far from the tag colour, towards the ink.
    const cv::Vec3d ink(bgr_of(text_colour_on(class_colour(2))));
    int text_pixels = 0;
    for (int y = L.tag.y; y < L.tag.y + L.tag.height; ++y)
      for (int x = L.tag.x; x < L.tag.x + L.tag.width; ++x) {
        const cv::Vec3d p(tagged.at<cv::Vec3b>(y, x));
        text_pixels += cv::norm(p - ink) < cv::norm(p - cv::Vec3d(c)) && cv::norm(p - cv::Vec3d(c)) > 60;
      }
    CHECK(text_pixels > L.tag.area() / 20);
    // Everything else is left alone: only the edges and the tag changed.
    CHECK(size.area() - count_colour(tagged, grey) <= expected + L.tag.area());
  }
}

TEST_CASE("tags stay inside the image for boxes touching every border, small and large") {
  for (cv::Size size : {cv::Size(64, 48), cv::Size(4000, 3000)}) {
    const float W = static_cast<float>(size.width), H = static_cast<float>(size.height);
    const std::vector<Detection> boxes = {
        det(0, "person", 0.91f, 0, 0, W / 3, H / 3),                  // top-left corner
        det(1, "cat", 0.55f, W * 2 / 3, 0, W - 1, H / 3),             // top-right
        det(3, "traffic light", 0.5f, 0, H * 2 / 3, W / 4, H - 1),    // bottom-left, long name
        det(4, "car", 0.99f, W * 3 / 4, H * 2 / 3, W - 1, H - 1),     // bottom-right
        det(5, "bus", 0.7f, 0, 0, W - 1, H - 1),                      // the whole image
        det(6, "dog", 0.6f, -W / 4, -H / 4, W / 2, H / 2),            // sticking out top-left
        det(7, "cup", 0.6f, W - 3, H / 2, W + 50, H / 2 + 2),         // a sliver at the right edge
        det(8, "x", 0.8f, W / 2, H - 2, W / 2 + 1, H + 10),           // a sliver at the bottom
    };
    for (const Detection& d : boxes) {
      CAPTURE(size, d.name, d.x0, d.y0, d.x1, d.y1);
      const TagLayout L = layout_tag(size, d, DrawOptions{});
      REQUIRE(!L.box.empty());
      REQUIRE(!L.tag.empty());
      CHECK((L.tag & cv::Rect(0, 0, size.width, size.height)) == L.tag);
      // The text's extent in the font it is drawn with (32 px per unit of font scale).
      const TextExtent ts = text_extent(L.text, L.font_scale * 32);
      CHECK(L.text_origin.x >= L.tag.x);
      CHECK(L.text_origin.x + ts.width <= L.tag.x + L.tag.width);
      CHECK(L.text_origin.y - ts.ascent >= L.tag.y);
      CHECK(L.text_origin.y + ts.descent <= L.tag.y + L.tag.height);
      CHECK(L.text.find(d.name.substr(0, 1)) == 0);
      // Drawn: the tag's colour is there, inside the image.
      cv::Mat img(size, CV_8UC3, cv::Scalar(0, 0, 0));
      draw_detections(img, {d}, DrawOptions{});
      CHECK(count_colour(img, bgr_of(class_colour(d.label)), L.tag) > L.tag.area() / 3);
    }
    // Fully outside: nothing drawn.
    cv::Mat img(size, CV_8UC3, cv::Scalar(0, 0, 0));
    draw_detections(img, {det(1, "cat", 0.9f, W + 5, 0, W + 50, 10)}, DrawOptions{});
    CHECK(cv::countNonZero(img.reshape(1)) == 0);
  }
  // Sizes grow with the image.
  CHECK(auto_thickness({64, 48}) == 1);
  CHECK(auto_font_scale({4000, 3000}) > 3 * auto_font_scale({640, 480}));
}

TEST_CASE("heat map overlay: size, blend, and the region the model saw") {
  cv::Mat img(90, 120, CV_8UC3, cv::Scalar(200, 100, 50));
  Tensor map({3, 4});
  map[1 * 4 + 2] = 1.0f;  // the hottest cell: row 1, column 2
  for (float alpha : {0.0f, 0.4f, 1.0f}) {
    cv::Mat out = heatmap_overlay(img, map, alpha);
    REQUIRE(out.size() == img.size());
    REQUIRE(out.type() == CV_8UC3);
    if (alpha == 0) CHECK(cv::norm(out, img, cv::NORM_INF) == 0);
  }
  // alpha = 1 is the colour map itself: at the hot cell's centre, turbo(255); far away, turbo(0).
  cv::Mat out = heatmap_overlay(img, map, 1.0f);
  cv::Mat lut(1, 2, CV_8U);
  lut.at<uchar>(0) = 0, lut.at<uchar>(1) = 255;
  cv::Mat turbo;
  cv::applyColorMap(lut, turbo, cv::COLORMAP_TURBO);
  const cv::Vec3b cold = turbo.at<cv::Vec3b>(0, 0), hot = turbo.at<cv::Vec3b>(0, 1);
  CHECK(cv::norm(cv::Vec3d(out.at<cv::Vec3b>(45, 75)) - cv::Vec3d(hot)) <= 4);   // cell (1, 2) centre: x=75, y=45
  CHECK(cv::norm(cv::Vec3d(out.at<cv::Vec3b>(5, 5)) - cv::Vec3d(cold)) <= 4);
  // A region: the heat only there, the rest dimmed to 40 %.
  cv::Mat part = heatmap_overlay(img, map, 0.5f, cv::Rect2d(30, 0, 60, 90));
  CHECK(part.at<cv::Vec3b>(45, 10) == cv::Vec3b(80, 40, 20));
  CHECK(part.at<cv::Vec3b>(45, 100) == cv::Vec3b(80, 40, 20));
  CHECK(part.at<cv::Vec3b>(45, 60) != cv::Vec3b(80, 40, 20));
  // Bad map shape: one-line error.
  CHECK_THROWS_WITH(heatmap_overlay(img, Tensor({5}), 0.5f), Catch::Contains("[grid_height, grid_width]"));
}

TEST_CASE("the region a map belongs to follows the processor's resize and center crop") {
  PreprocessConfig cfg;
  cfg.resize_rule = ResizeRule::shortest_edge;
  cfg.shortest_edge = 256;
  cfg.do_center_crop = true;
  cfg.crop_height = cfg.crop_width = 224;
  // 640x480 → 341x256 (int(256 · 640 / 480)), crop 224 at ((341 - 224) // 2, (256 - 224) // 2) = (58, 16).
  const cv::Rect2d r = model_view_region({640, 480}, cfg, 16);
  CHECK(r.x == Approx(58 * 640.0 / 341));
  CHECK(r.y == Approx(16 * 480.0 / 256));
  CHECK(r.width == Approx(224 * 640.0 / 341));
  CHECK(r.height == Approx(224 * 480.0 / 256));
  // No crop, exact resize: the whole image (patch grid covers all of 224).
  PreprocessConfig plain;
  const cv::Rect2d all = model_view_region({640, 480}, plain, 16);
  CHECK(all.x == 0);
  CHECK(all.width == Approx(640));
  CHECK(all.height == Approx(480));
}

// ---------------------------------------------------------------------------------------------
// Attention rollout

TEST_CASE("rollout of a hand-computed two-token case") {
  // A = [[0.2, 0.8], [0.6, 0.4]] → Â = 0.5 A + 0.5 I = [[0.6, 0.4], [0.3, 0.7]].
  Tensor a({1, 2, 2});
  a[0] = 0.2f, a[1] = 0.8f, a[2] = 0.6f, a[3] = 0.4f;
  Tensor one = attention_rollout_row({a}, 0, {0});
  CHECK(one[0] == Approx(0.6).margin(1e-7));
  CHECK(one[1] == Approx(0.4).margin(1e-7));
  // Two layers: row 0 of Â² = [0.6·0.6 + 0.4·0.3, 0.6·0.4 + 0.4·0.7] = [0.48, 0.52].
  Tensor two = attention_rollout_row({a, a}, 0, {0});
  CHECK(two[0] == Approx(0.48).margin(1e-7));
  CHECK(two[1] == Approx(0.52).margin(1e-7));
  // The mean of rows 0 and 1 of Â: [0.45, 0.55].
  Tensor mean = attention_rollout_row({a}, 0, {0, 1});
  CHECK(mean[0] == Approx(0.45).margin(1e-7));
  CHECK_THROWS_WITH(attention_rollout_row({}, 0, {0}), Catch::Contains("no attention was recorded"));
}

TEST_CASE("rollout matches a full double-precision product of the recorded attention (vit-tiny-rand)") {
  auto model = load_model(fixture("conformance/vit-tiny-rand"));
  const VitConfig& c = model->encoder.config;
  Preprocessor pre = model_preprocessor(*model);
  const cv::Mat rgb = load_image_rgb(fixture("conformance/vit-tiny-rand/cases/e2e/images/0_chelsea.png"));
  const Tensor chw = pre.image(rgb);
  const Tensor x = chw.reshape({1, chw.dim(0), chw.dim(1), chw.dim(2)});
  ModelWorkspace ws;
  ws.vit.record_attention = true;
  vit_forward(model->encoder, x, ws.vit);
  const int64_t H = x.dim(2), W = x.dim(3), T = vit_num_tokens(c, H, W);
  REQUIRE(ws.vit.attention.size() == static_cast<size_t>(c.num_hidden_layers));

  // Independent: R = Â_L ⋯ Â_1 as full T x T matrices in double.
  std::vector<double> R(T * T, 0.0), Ahat(T * T), next(T * T);
  for (int64_t i = 0; i < T; ++i) R[i * T + i] = 1;
  for (const Tensor& A : ws.vit.attention) {
    for (int64_t i = 0; i < T; ++i) {
      double sum = 0;
      for (int64_t j = 0; j < T; ++j) sum += Ahat[i * T + j] = 0.5 * A[i * T + j] + (i == j ? 0.5 : 0.0);
      for (int64_t j = 0; j < T; ++j) Ahat[i * T + j] /= sum;
    }
    for (int64_t i = 0; i < T; ++i)
      for (int64_t j = 0; j < T; ++j) {
        double s = 0;
        for (int64_t k = 0; k < T; ++k) s += Ahat[i * T + k] * R[k * T + j];
        next[i * T + j] = s;
      }
    R.swap(next);
  }
  for (int64_t i = 0; i < T; ++i) {  // every row of the rollout sums to 1
    double sum = 0;
    for (int64_t j = 0; j < T; ++j) sum += R[i * T + j];
    CHECK(sum == Approx(1.0).margin(1e-9));
  }
  // The map: row 0 (class token), patch columns, on the 4x4 grid. Tolerance 1e-6 (float output).
  const Tensor map = attention_rollout(ws.vit.attention, 0, c, H, W);
  REQUIRE(map.shape() == Shape{H / c.patch_size, W / c.patch_size});
  const int64_t prefix = c.num_prefix_tokens();
  for (int64_t p = 0; p < map.numel(); ++p) CHECK(map[p] == Approx(R[prefix + p]).margin(1e-6));
  const Tensor row = attention_rollout_row(ws.vit.attention, 0, {0});
  double sum = 0;
  for (int64_t j = 0; j < T; ++j) sum += row[j];
  CHECK(sum == Approx(1.0).margin(1e-5));
  // Another token, and a mean over tokens (rows are linear).
  const Tensor r5 = attention_rollout_row(ws.vit.attention, 0, {5});
  const Tensor r27 = attention_rollout_row(ws.vit.attention, 0, {2, 7});
  for (int64_t j = 0; j < T; ++j) {
    CHECK(r5[j] == Approx(R[5 * T + j]).margin(1e-6));
    CHECK(r27[j] == Approx(0.5 * (R[2 * T + j] + R[7 * T + j])).margin(1e-6));
  }
  // attention_map() runs the encoder itself and gives the same map.
  ModelWorkspace ws2;
  const Tensor again = attention_map(*model, pre, rgb, ws2);
  for (int64_t p = 0; p < map.numel(); ++p) CHECK(again[p] == Approx(map[p]).margin(1e-6));
  CHECK(ws2.vit.attention.empty());  // not kept when the caller did not ask to record
}

TEST_CASE("which token's row the map is") {
  VitConfig c;
  c.image_height = c.image_width = 32;
  c.patch_size = 8;
  CHECK(rollout_query_tokens(c, 32, 32) == std::vector<int64_t>{0});  // class token
  c.num_detection_tokens = 3;  // YOLOS: the mean over the detection tokens, after the 16 patches
  CHECK(rollout_query_tokens(c, 32, 32) == std::vector<int64_t>{17, 18, 19});
  c.num_detection_tokens = 0;
  c.class_token = false;  // neither: the mean over the patches
  CHECK(rollout_query_tokens(c, 16, 16).size() == 4);
  CHECK(rollout_query_tokens(c, 16, 16, 2) == std::vector<int64_t>{2});
  CHECK_THROWS_WITH(rollout_query_tokens(c, 16, 16, 4), Catch::Contains("token 4 does not exist"));
}

TEST_CASE("tessera classify --attention writes one heat map per image") {
  const std::string model = fixture("conformance/vit-tiny-rand");
  const std::string imgs = fixture("conformance/vit-tiny-rand/cases/e2e/images");
  fs::path dir = scratch("classify_attention");
  Run one = run_cli("classify --model " + model + " --attention " + (dir / "one.png").string() + " " + imgs +
                    "/0_chelsea.png");
  REQUIRE(one.code == 0);
  CHECK(one.out.find("attention map: " + (dir / "one.png").string()) != std::string::npos);
  cv::Mat original = cv::imread(imgs + "/0_chelsea.png");
  cv::Mat heat = cv::imread((dir / "one.png").string());
  REQUIRE(!heat.empty());
  CHECK(heat.size() == original.size());
  CHECK(cv::norm(heat, original, cv::NORM_L1) > original.total());  // it is not the photo unchanged

  Run two = run_cli("classify --json --model " + model + " --attention " + (dir / "att.png").string() + " " + imgs);
  REQUIRE(two.code == 0);
  CHECK(fs::exists(dir / "att_0_0_chelsea.png"));
  CHECK(fs::exists(dir / "att_1_1_coffee.png"));
  auto j = nlohmann::json::parse(two.out);
  CHECK(j[1]["attention"] == (dir / "att_1_1_coffee.png").string());

  Run bad = run_cli("classify --model " + model + " --attention " + (dir / "noext").string() + " " + imgs +
                    "/0_chelsea.png");
  CHECK(bad.code == 1);
  CHECK(bad.err.find("noext: no file extension") != std::string::npos);
}

// ---------------------------------------------------------------------------------------------
// The viewer

TEST_CASE("tessera view without a display says so and points to tessera detect --out") {
  Run r = run_cli("view --model " + fixture("conformance/yolos-tiny-rand") + " x.png", "env -u DISPLAY -u WAYLAND_DISPLAY");
  CHECK(r.code == 1);
  CHECK(lines(r.err) == 1);
  CHECK(r.err.find("no display") != std::string::npos);
  CHECK(r.err.find("tessera detect") != std::string::npos);
  CHECK(r.err.find("--out") != std::string::npos);
}

TEST_CASE("tessera view with a display that does not answer says so (instead of the toolkit aborting)") {
  fs::path dir = scratch("nodisplay");
  cv::imwrite((dir / "a.png").string(), cv::Mat(40, 40, CV_8UC3, cv::Scalar(1, 2, 3)));
  { std::ofstream(dir / "dets.json") << "[]"; }
  Run r = run_cli("view --detections " + (dir / "dets.json").string() + " " + (dir / "a.png").string(),
                  "env DISPLAY=:12345");
  CHECK(r.code == 1);
  CHECK(lines(r.err) == 1);
  CHECK(r.err.find("cannot connect to the display :12345") != std::string::npos);
  CHECK(r.err.find("tessera detect") != std::string::npos);
}

TEST_CASE("tessera view with a model that is not a detector says so") {
  Run r = run_cli("view --model " + fixture("conformance/vit-tiny-rand") + " x.png", "env DISPLAY=:12345");
  CHECK(r.code == 1);
  CHECK(lines(r.err) == 1);
  CHECK(r.err.find("is not a detector") != std::string::npos);
}

namespace {

// An X server of our own for the viewer tests (skipped, with the reason, if Xvfb is missing).
struct Xvfb {
  int display = -1;
  pid_t pid = -1;
  Xvfb() {
    if (std::system("command -v Xvfb >/dev/null 2>&1") != 0) return;
    for (int attempt = 0; attempt < 20 && pid < 0; ++attempt) {
      const int n = 100 + (::getpid() + attempt * 37) % 800;
      const fs::path sock = "/tmp/.X11-unix/X" + std::to_string(n);
      if (fs::exists(sock) || fs::exists("/tmp/.X" + std::to_string(n) + "-lock")) continue;
      const pid_t child = fork();
      if (child == 0) {
        const std::string d = ":" + std::to_string(n);
        std::freopen("/dev/null", "w", stderr);
        std::freopen("/dev/null", "w", stdout);
        execlp("Xvfb", "Xvfb", d.c_str(), "-screen", "0", "1600x1200x24", "-nolisten", "tcp", (char*)nullptr);
        _exit(127);
      }
      for (int i = 0; i < 100 && !fs::exists(sock); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(50));
      if (fs::exists(sock)) {
        pid = child, display = n;
      } else {
        kill(child, SIGTERM);
        waitpid(child, nullptr, 0);
      }
    }
  }
  ~Xvfb() {
    if (pid > 0) {
      kill(pid, SIGTERM);
      waitpid(pid, nullptr, 0);
    }
  }
  std::string env() const { return "env DISPLAY=:" + std::to_string(display); }
};

// A picture with some structure (so boxes and heat maps have something to sit on).
cv::Mat test_picture(int w, int h, int seed) {
  cv::Mat img(h, w, CV_8UC3);
  for (int y = 0; y < h; ++y)
    for (int x = 0; x < w; ++x)
      img.at<cv::Vec3b>(y, x) = cv::Vec3b(static_cast<uchar>(40 + (x * 120) / w), static_cast<uchar>(60 + (y * 100) / h),
                                          static_cast<uchar>(90 + seed * 40));
  cv::circle(img, {w / 2, h / 2}, h / 4, cv::Scalar(30, 30, 30), cv::FILLED);
  return img;
}

bool wait_for(const fs::path& file, const std::string& text, int seconds) {
  for (int i = 0; i < seconds * 20; ++i) {
    if (slurp(file).find(text) != std::string::npos) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return false;
}

}  // namespace

TEST_CASE("the viewer under Xvfb: opens, draws, reacts to keys, saves overlays, skips a bad image") {
  Xvfb x;
  if (x.pid < 0 || std::system("command -v import >/dev/null 2>&1") != 0) {
    WARN("Xvfb or ImageMagick's import is not installed: the viewer window test is skipped "
         "(scripts/install-deps.sh installs xvfb and imagemagick)");
    return;
  }
  fs::path dir = scratch("viewer");
  fs::create_directories(dir / "in");
  cv::imwrite((dir / "in" / "a_street.png").string(), test_picture(320, 240, 0));
  { std::ofstream((dir / "in" / "b_broken.png").string()) << "not a png at all"; }
  cv::imwrite((dir / "in" / "c_field.png").string(), test_picture(320, 240, 1));
  // Known detections (a hidden hook of the viewer): label 0 and 3 on a, label 2 on c.
  nlohmann::json dets = nlohmann::json::array();
  dets.push_back({{"image", "a_street.png"},
                  {"detections",
                   {{{"label", 0}, {"name", "person"}, {"score", 0.92}, {"box", {20, 40, 150, 200}}},
                    {{"label", 3}, {"name", "cup"}, {"score", 0.64}, {"box", {180, 100, 300, 220}}}}}});
  dets.push_back({{"image", "c_field.png"},
                  {"detections", {{{"label", 2}, {"name", "dog"}, {"score", 0.8}, {"box", {60, 10, 260, 230}}}}}});
  { std::ofstream(dir / "dets.json") << dets.dump(); }

  const fs::path go = dir / "go", shot = dir / "screenshot.png", saves = dir / "saved";
  // Keys: wait for the screenshot, save, next (b is broken: skipped to c), save, labels off, save,
  // attention on, save, threshold 0.85 (the dog at 0.8 goes away), save, quit.
  const std::string script = "pause=" + go.string() + ",s,n,s,l,s,a,s,t=0.85,s,q";
  const std::string args = "view --model " + fixture("conformance/vit-tiny-rand") + " --detections " +
                           (dir / "dets.json").string() + " --save-dir " + saves.string() + " --threshold 0.3" +
                           " --script " + script + " " + (dir / "in").string();
  const fs::path out = dir / "out", err = dir / "err";
  const char* cli = std::getenv("TESSERA_CLI");
  REQUIRE(cli != nullptr);
  int status = -1;
  std::thread viewer([&] {
    status = std::system((x.env() + " timeout 120 " + cli + " " + args + " >" + out.string() + " 2>" + err.string()).c_str());
  });
  const bool shown = wait_for(out, "showing 1/3", 60);
  // The window paints asynchronously: on a busy machine, try the screenshot again a few times.
  for (int attempt = 0; shown && attempt < 20; ++attempt) {
    std::this_thread::sleep_for(std::chrono::milliseconds(500));
    std::system(("import -display :" + std::to_string(x.display) + " -window root " + shot.string()).c_str());
    const cv::Mat s = cv::imread(shot.string());
    if (!s.empty() && count_colour(s, bgr_of(class_colour(0))) > 400 && count_colour(s, bgr_of(class_colour(3))) > 400)
      break;
  }
  { std::ofstream(go.string()) << "go"; }
  viewer.join();
  INFO("stdout: " << slurp(out) << "\nstderr: " << slurp(err));
  REQUIRE(shown);
  CHECK(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 1);  // one input could not be shown
  const std::string e = slurp(err);
  CHECK(e.find("b_broken.png") != std::string::npos);
  CHECK(e.find("(skipped)") != std::string::npos);
  CHECK(e.find("1 input could not be shown") != std::string::npos);

  // The screenshot of the real window shows both boxes of the first image, in their class colours.
  cv::Mat screen = cv::imread(shot.string());
  REQUIRE(!screen.empty());
  CHECK(count_colour(screen, bgr_of(class_colour(0))) > 400);
  CHECK(count_colour(screen, bgr_of(class_colour(3))) > 400);
  CHECK(count_colour(screen, bgr_of(class_colour(2))) == 0);  // the dog is on the third image

  // The saved overlays, at the original resolution, against the expected box pixels.
  const cv::Mat a = cv::imread((dir / "in" / "a_street.png").string());
  const cv::Mat c = cv::imread((dir / "in" / "c_field.png").string());
  const cv::Mat sa = cv::imread((saves / "a_street_view.png").string());
  const cv::Mat s1 = cv::imread((saves / "c_field_view.png").string());    // labels on
  const cv::Mat s2 = cv::imread((saves / "c_field_view_2.png").string());  // labels off
  const cv::Mat s3 = cv::imread((saves / "c_field_view_3.png").string());  // + attention
  const cv::Mat s4 = cv::imread((saves / "c_field_view_4.png").string());  // threshold 0.85
  REQUIRE(!sa.empty());
  REQUIRE(!s1.empty());
  REQUIRE(!s2.empty());
  REQUIRE(!s3.empty());
  REQUIRE(!s4.empty());
  CHECK(slurp(out).find("saved " + (saves / "a_street_view.png").string()) != std::string::npos);
  const cv::Vec3b person = bgr_of(class_colour(0)), cup = bgr_of(class_colour(3)), dog = bgr_of(class_colour(2));
  CHECK(sa.at<cv::Vec3b>(120, 20) == person);  // left edge of the person box
  CHECK(sa.at<cv::Vec3b>(200, 85) == person);  // its bottom edge
  CHECK(sa.at<cv::Vec3b>(160, 300) == cup);    // right edge of the cup box
  CHECK(sa.at<cv::Vec3b>(120, 85) == a.at<cv::Vec3b>(120, 85));  // inside: the picture
  CHECK(s1.at<cv::Vec3b>(120, 60) == dog);
  CHECK(s1.at<cv::Vec3b>(230, 160) == dog);
  // The dog's tag flips inside the box at the top edge (y0 = 10 leaves no room above): with labels
  // on it covers the box's top-left corner area; with labels off that area is the picture again.
  const cv::Rect tag_area(62, 12, 20, 6);
  CHECK(count_colour(s1, dog, tag_area) > 0);
  CHECK(count_colour(s2, dog, tag_area) == 0);
  CHECK(cv::norm(s2(tag_area), c(tag_area), cv::NORM_INF) == 0);
  // Attention: the inside of the box is no longer the plain picture, the box edge still is the dog's.
  CHECK(cv::norm(s3(cv::Rect(100, 60, 100, 100)), c(cv::Rect(100, 60, 100, 100)), cv::NORM_L1) > 1000);
  CHECK(s3.at<cv::Vec3b>(120, 60) == dog);
  // Threshold 0.85 > 0.8: the dog is filtered away (same overlay without boxes: the heat map only).
  CHECK(count_colour(s4, dog) < 5);
  CHECK(s4.at<cv::Vec3b>(120, 60) != dog);
}

TEST_CASE("the viewer plays a video with an fps readout, and reports an unreadable video and a missing camera") {
  Xvfb x;
  if (x.pid < 0) {
    WARN("Xvfb is not installed: the viewer video test is skipped (scripts/install-deps.sh installs xvfb)");
    return;
  }
  fs::path dir = scratch("video");
  const fs::path video = dir / "clip.avi";
  {
    cv::VideoWriter writer(video.string(), cv::VideoWriter::fourcc('M', 'J', 'P', 'G'), 10, cv::Size(160, 120));
    REQUIRE(writer.isOpened());
    for (int i = 0; i < 12; ++i) writer.write(test_picture(160, 120, i % 3));
  }
  { std::ofstream((dir / "broken.avi").string()) << "this is not a video"; }
  nlohmann::json dets = nlohmann::json::array();
  dets.push_back({{"image", video.string()},
                  {"detections", {{{"label", 4}, {"name", "car"}, {"score", 0.9}, {"box", {30, 30, 130, 100}}}}}});
  { std::ofstream(dir / "dets.json") << dets.dump(); }
  const fs::path saves = dir / "saved";
  Run r = run_cli("view --detections " + (dir / "dets.json").string() + " --save-dir " + saves.string() +
                      " --script s,s,s,q " + (dir / "broken.avi").string() + " " + video.string() + " 7",
                  x.env());
  INFO(r.out << r.err);
  CHECK(r.code == 1);
  CHECK(r.err.find("broken.avi: cannot open as a video") != std::string::npos);
  CHECK(r.out.find("showing 2/3") != std::string::npos);
  // Three saves of three consecutive frames, each with the car box.
  int saved = 0;
  for (const auto& entry : fs::directory_iterator(saves)) {
    ++saved;
    cv::Mat img = cv::imread(entry.path().string());
    CHECK(entry.path().filename().string().find("clip_frame0000") == 0);
    CHECK(img.at<cv::Vec3b>(65, 30) == bgr_of(class_colour(4)));
  }
  CHECK(saved == 3);

  Run cam = run_cli("view --detections " + (dir / "dets.json").string() + " --script q 7", x.env());
  CHECK(cam.code == 1);
  CHECK(cam.err.find("camera 7: cannot open the camera") != std::string::npos);
  CHECK(cam.err.find("none of the inputs could be shown") != std::string::npos);
}

TEST_CASE("the viewer under Xvfb takes real key presses (xdotool): save, next image, quit") {
  Xvfb x;
  if (x.pid < 0 || std::system("command -v xdotool >/dev/null 2>&1") != 0) {
    WARN("Xvfb or xdotool is not installed: the real-key viewer test is skipped "
         "(scripts/install-deps.sh installs xvfb and xdotool)");
    return;
  }
  fs::path dir = scratch("keys");
  cv::imwrite((dir / "one.png").string(), test_picture(400, 300, 0));
  cv::imwrite((dir / "two.png").string(), test_picture(400, 300, 2));
  nlohmann::json dets = nlohmann::json::array();
  dets.push_back({{"image", "one.png"},
                  {"detections", {{{"label", 7}, {"name", "truck"}, {"score", 0.9}, {"box", {50, 50, 350, 250}}}}}});
  dets.push_back({{"image", "two.png"},
                  {"detections", {{{"label", 9}, {"name", "boat"}, {"score", 0.9}, {"box", {10, 120, 390, 290}}}}}});
  { std::ofstream(dir / "dets.json") << dets.dump(); }
  const fs::path out = dir / "out", err = dir / "err", saves = dir / "saved";
  const char* cli = std::getenv("TESSERA_CLI");
  REQUIRE(cli != nullptr);
  int status = -1;
  std::thread viewer([&] {
    status = std::system((x.env() + " timeout 120 " + cli + " view --detections " + (dir / "dets.json").string() +
                          " --save-dir " + saves.string() + " " + (dir / "one.png").string() + " " +
                          (dir / "two.png").string() + " >" + out.string() + " 2>" + err.string())
                             .c_str());
  });
  const std::string xdo = x.env() + " xdotool ";
  // Keys go to the window that has the focus: find it, focus it, then type.
  auto key = [&](const std::string& k) {
    std::system((xdo + "search --name 'tessera view' windowfocus --sync key " + k + " >/dev/null 2>&1").c_str());
  };
  bool ok = wait_for(out, "showing 1/2", 60);
  if (ok) {
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    key("s");
    ok = wait_for(out, "saved", 20);
  }
  if (ok) {
    key("Right");
    ok = wait_for(out, "showing 2/2", 20);
  }
  if (ok) {
    key("s");
    ok = wait_for(out, "two_view.png", 20);
  }
  key("q");
  viewer.join();
  INFO("stdout: " << slurp(out) << "\nstderr: " << slurp(err));
  REQUIRE(ok);
  CHECK(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 0);
  const cv::Mat one = cv::imread((saves / "one_view.png").string());
  const cv::Mat two = cv::imread((saves / "two_view.png").string());
  REQUIRE(!one.empty());
  REQUIRE(!two.empty());
  CHECK(one.at<cv::Vec3b>(150, 50) == bgr_of(class_colour(7)));
  CHECK(two.at<cv::Vec3b>(200, 390) == bgr_of(class_colour(9)));
}

// ---------------------------------------------------------------------------------------------
// With a real detector (yolos-tiny-rand: random weights, so its boxes mean nothing; a low
// threshold gives some).

TEST_CASE("rollout from the detection tokens of a YOLOS model matches the full product (yolos-tiny-rand)") {
  auto model = load_model(fixture("conformance/yolos-tiny-rand"));
  const VitConfig& c = model->encoder.config;
  Preprocessor pre = model_preprocessor(*model);
  const cv::Mat rgb = load_image_rgb(fixture("conformance/vit-tiny-rand/cases/e2e/images/0_chelsea.png"));
  const Tensor chw = pre.image(rgb);
  const Tensor x = chw.reshape({1, chw.dim(0), chw.dim(1), chw.dim(2)});
  ModelWorkspace ws;
  ws.vit.record_attention = true;
  vit_forward(model->encoder, x, ws.vit);
  const int64_t H = x.dim(2), W = x.dim(3), T = vit_num_tokens(c, H, W);
  const int64_t gh = H / c.patch_size, gw = W / c.patch_size, prefix = c.num_prefix_tokens();
  REQUIRE(c.num_detection_tokens == 10);
  // Independent: full products in double, then the mean of the detection tokens' rows.
  std::vector<double> R(T * T, 0.0), Ahat(T * T), next(T * T);
  for (int64_t i = 0; i < T; ++i) R[i * T + i] = 1;
  for (const Tensor& A : ws.vit.attention) {
    for (int64_t i = 0; i < T; ++i) {
      double sum = 0;
      for (int64_t j = 0; j < T; ++j) sum += Ahat[i * T + j] = 0.5 * A[i * T + j] + (i == j ? 0.5 : 0.0);
      for (int64_t j = 0; j < T; ++j) Ahat[i * T + j] /= sum;
    }
    for (int64_t i = 0; i < T; ++i)
      for (int64_t j = 0; j < T; ++j) {
        double s = 0;
        for (int64_t k = 0; k < T; ++k) s += Ahat[i * T + k] * R[k * T + j];
        next[i * T + j] = s;
      }
    R.swap(next);
  }
  const Tensor map = attention_rollout(ws.vit.attention, 0, c, H, W);
  REQUIRE(map.shape() == Shape{gh, gw});
  const int64_t first_det = prefix + gh * gw;
  for (int64_t p = 0; p < gh * gw; ++p) {
    double mean = 0;
    for (int64_t t = first_det; t < T; ++t) mean += R[t * T + prefix + p] / c.num_detection_tokens;
    CHECK(map[p] == Approx(mean).margin(1e-6));
  }
}

TEST_CASE("tessera detect --attention writes the detection-token rollout over the image") {
  fs::path dir = scratch("detect_attention");
  const std::string img = fixture("conformance/vit-tiny-rand/cases/e2e/images/0_chelsea.png");
  Run r = run_cli("detect --model " + fixture("conformance/yolos-tiny-rand") + " --threshold 0.2 --attention " +
                  (dir / "att.png").string() + " " + img);
  REQUIRE(r.code == 0);
  CHECK(r.out.find("attention map: " + (dir / "att.png").string()) != std::string::npos);
  cv::Mat heat = cv::imread((dir / "att.png").string());
  REQUIRE(!heat.empty());
  CHECK(heat.size() == cv::imread(img).size());
}

TEST_CASE("the viewer's saved overlay is exactly tessera detect --out's picture; the trackbar re-filters") {
  Xvfb x;
  if (x.pid < 0) {
    WARN("Xvfb is not installed: the viewer/detect comparison is skipped (scripts/install-deps.sh installs xvfb)");
    return;
  }
  fs::path dir = scratch("view_vs_detect");
  const std::string img = fixture("conformance/vit-tiny-rand/cases/e2e/images/0_chelsea.png");
  const std::string model = fixture("conformance/yolos-tiny-rand");
  Run det = run_cli("detect --model " + model + " --threshold 0.2 --out " + (dir / "detect").string() + " " + img);
  REQUIRE(det.code == 0);
  REQUIRE(det.out.find("0 detections") == std::string::npos);  // random weights, but some boxes at 0.2
  Run view = run_cli("view --model " + model + " --threshold 0.2 --save-dir " + (dir / "view").string() +
                         " --script s,t=0.95,s,q " + img,
                     x.env());
  INFO(view.out << view.err);
  REQUIRE(view.code == 0);
  const cv::Mat from_detect = cv::imread((dir / "detect" / "0_chelsea.png").string());
  const cv::Mat from_view = cv::imread((dir / "view" / "0_chelsea_view.png").string());
  const cv::Mat refiltered = cv::imread((dir / "view" / "0_chelsea_view_2.png").string());
  REQUIRE(!from_detect.empty());
  REQUIRE(!from_view.empty());
  REQUIRE(!refiltered.empty());
  CHECK(cv::norm(from_view, from_detect, cv::NORM_INF) == 0);
  // At 0.95 no random-weight box is left: the picture itself.
  CHECK(cv::norm(refiltered, cv::imread(img), cv::NORM_INF) == 0);
}
