// tessera view: the detection overlay viewer, an OpenCV HighGUI window. Images, folders, video
// files and camera indices; a score-threshold trackbar that re-filters the kept raw outputs (the
// model runs once per image); keys for next/previous, save, labels, attention map, quit.
// A bad input is reported and skipped; the rest goes on. Without a display it says so.
#include <netdb.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <opencv2/core/utils/logger.hpp>
#include <opencv2/highgui.hpp>
#include <opencv2/imgproc.hpp>
#include <opencv2/videoio.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <thread>

#include "commands.hpp"
#include "tessera/attention_map.hpp"
#include "tessera/detection.hpp"
#include "tessera/draw.hpp"
#include "tessera/error.hpp"
#include "tessera/image.hpp"
#include "tessera/model.hpp"
#include "tessera/pipeline.hpp"
#include "tessera/text.hpp"

namespace fs = std::filesystem;

namespace tessera::cli {

namespace {

const char* const kWindow = "tessera view";
const char* const kTrackbar = "threshold %";
const char* const kKeysHelp = "n/p next/prev   +/- threshold   s save   l labels   a attention   q quit";

enum class SourceKind { Image, Video, Camera };
struct Source {
  SourceKind kind = SourceKind::Image;
  std::string path;  // file, or "camera N"
  int camera = -1;
};

bool is_video_name(const fs::path& p) {
  static const std::set<std::string> exts = {".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v",
                                             ".mpg", ".mpeg", ".wmv", ".mjpg", ".mjpeg", ".ogv"};
  std::string e = p.extension().string();
  std::transform(e.begin(), e.end(), e.begin(), ::tolower);
  return exts.count(e) > 0;
}

bool is_camera_index(const std::string& s) {
  std::error_code ec;
  return !s.empty() && s.size() < 4 && std::all_of(s.begin(), s.end(), ::isdigit) && !fs::exists(s, ec);
}

std::vector<Source> expand_sources(const std::vector<std::string>& args) {
  std::vector<Source> out;
  for (const std::string& arg : args) {
    std::error_code ec;
    if (is_camera_index(arg)) {
      out.push_back({SourceKind::Camera, "camera " + arg, std::stoi(arg)});
    } else if (is_video_name(arg) && !fs::is_directory(arg, ec)) {
      out.push_back({SourceKind::Video, arg, -1});
    } else {
      for (const std::string& p : expand_inputs({arg}))
        out.push_back({is_video_name(p) ? SourceKind::Video : SourceKind::Image, p, -1});
    }
  }
  return out;
}

// What a key does. The same function serves the window's keys and the test script.
enum class Command { None, Next, Previous, Save, ToggleLabels, ToggleAttention, ThresholdUp, ThresholdDown, Quit };

Command command_for_key(int key) {
  if (key < 0) return Command::None;
  switch (key) {
    // Arrows: GTK key symbols (0xff51..) and Qt key codes (0x1000012..), as HighGUI passes them on.
    case 'n': case ' ': case 0xff53: case 0xff54: case 0x1000014: case 0x1000015: return Command::Next;
    case 'p': case 'b': case 8: case 0xff51: case 0xff52: case 0x1000012: case 0x1000013: return Command::Previous;
    case 's': return Command::Save;
    case 'l': return Command::ToggleLabels;
    case 'a': return Command::ToggleAttention;
    case '+': case '=': return Command::ThresholdUp;
    case '-': case '_': return Command::ThresholdDown;
    case 'q': case 27: /* Esc */ return Command::Quit;
    default: return Command::None;
  }
}

// Detections given as JSON instead of a model (a hidden test hook):
// [{"image": PATH, "detections": [{"label": 1, "name": "cat", "score": 0.9, "box": [x0, y0, x1, y1]}]}]
std::map<std::string, std::vector<Detection>> read_detections_json(const std::string& path) {
  std::ifstream in(path);
  if (!in) fail(path + ": cannot read");
  nlohmann::json j;
  try {
    in >> j;
    std::map<std::string, std::vector<Detection>> out;
    for (const auto& item : j) {
      std::vector<Detection>& dets = out[item.at("image").get<std::string>()];
      for (const auto& d : item.at("detections")) {
        Detection det;
        det.label = d.at("label").get<int64_t>();
        det.name = d.value("name", std::to_string(det.label));
        det.score = d.at("score").get<float>();
        const auto& b = d.at("box");
        det.x0 = b.at(0).get<float>(), det.y0 = b.at(1).get<float>();
        det.x1 = b.at(2).get<float>(), det.y1 = b.at(3).get<float>();
        dets.push_back(det);
      }
    }
    return out;
  } catch (const nlohmann::json::exception& e) {
    fail(path + ": not a detections list (" + e.what() + ")");
  }
}

// Whether the X server named by DISPLAY accepts connections. GUI toolkits abort the process when
// it does not (Qt: "could not connect to display"), so the viewer asks first and says so itself.
bool x_display_reachable(const std::string& display) {
  const size_t colon = display.rfind(':');
  if (colon == std::string::npos) return false;
  const std::string host = display.substr(0, colon);
  const int number = std::atoi(display.c_str() + colon + 1);
  if (host.empty() || host == "unix") {
    const int fd = ::socket(AF_UNIX, SOCK_STREAM, 0);
    if (fd < 0) return false;
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::snprintf(addr.sun_path, sizeof(addr.sun_path), "/tmp/.X11-unix/X%d", number);
    const bool ok = ::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0;
    ::close(fd);
    return ok;
  }
  addrinfo hints{}, *res = nullptr;
  hints.ai_socktype = SOCK_STREAM;
  if (::getaddrinfo(host.c_str(), std::to_string(6000 + number).c_str(), &hints, &res) != 0) return false;
  bool ok = false;
  for (addrinfo* a = res; a && !ok; a = a->ai_next) {
    const int fd = ::socket(a->ai_family, a->ai_socktype, a->ai_protocol);
    if (fd < 0) continue;
    ok = ::connect(fd, a->ai_addr, a->ai_addrlen) == 0;
    ::close(fd);
  }
  ::freeaddrinfo(res);
  return ok;
}

struct Frame {
  cv::Mat bgr;
  std::string name;              // for the readout and the saved file's name
  bool has_raw = false;
  RawDetections raw;             // the detector's output, re-filtered on every threshold change
  std::vector<Detection> given;  // from --detections
  Tensor attention;              // rollout map, computed when first shown
};

struct Viewer {
  // Settings
  std::shared_ptr<const Model> model;
  Preprocessor pre;
  bool detector = false;
  std::map<std::string, std::vector<Detection>> given;
  bool have_given = false;
  PostProcessOptions post;
  DrawOptions draw;
  bool show_attention = false;
  fs::path save_dir;
  // State
  ModelWorkspace ws;
  std::vector<Source> sources;
  std::vector<bool> failed;
  size_t index = 0;
  Frame frame;
  cv::Mat overlay;  // the current annotated picture at full resolution (what 's' saves)
  bool dirty = true;
  bool window_open = false;
  // Video / camera
  cv::VideoCapture capture;
  bool live = false, ended = false;
  int64_t frame_number = 0;
  double source_fps = 0, fps = 0;  // the file's rate; frames shown per second (smoothed)
  double work_ms = 0;               // decode + detector (+ attention) per frame (smoothed)
  std::chrono::steady_clock::time_point last_frame_time;
  int failures = 0;
  // Test script (hidden --script)
  std::vector<std::string> script;
  size_t script_pos = 0;

  void report(const std::string& message) {
    std::fprintf(stderr, "tessera: error: %s (skipped)\n", message.c_str());
    ++failures;
  }

  std::vector<Detection> current_detections() const {
    std::vector<Detection> out;
    if (frame.has_raw) {
      return post_process_detections(frame.raw.logits.data(), frame.raw.boxes.data(), frame.raw.logits.dim(0),
                                     frame.raw.logits.dim(1), frame.raw.width, frame.raw.height, model->labels,
                                     post);
    }
    for (const Detection& d : frame.given)
      if (d.score > post.threshold) out.push_back(d);
    return out;
  }

  // Runs the detector (or looks the given detections up) for the frame just loaded.
  void detect(const std::string& key) {
    frame.attention = Tensor();
    frame.has_raw = false;
    frame.given.clear();
    if (have_given) {
      auto it = given.find(key);
      if (it == given.end()) it = given.find(fs::path(key).filename().string());
      if (it != given.end()) frame.given = it->second;
      return;
    }
    cv::Mat rgb;
    cv::cvtColor(frame.bgr, rgb, cv::COLOR_BGR2RGB);
    std::vector<RawDetections> raw = run_detector(*model, pre, {rgb}, ws);
    check(raw.size() == 1, "run_detector returned " + std::to_string(raw.size()) + " results for one image");
    frame.raw = std::move(raw[0]);
    frame.has_raw = true;
  }

  // The rollout map of the current frame, if it is shown. A failure turns the map off (said once)
  // but never costs the frame its boxes.
  void compute_attention() {
    if (!show_attention || !model || !frame.attention.empty()) return;
    try {
      cv::Mat rgb;
      cv::cvtColor(frame.bgr, rgb, cv::COLOR_BGR2RGB);
      frame.attention = attention_map(*model, pre, rgb, ws);
    } catch (const Error& e) {
      std::fprintf(stderr, "tessera: error: attention map: %s (turned off)\n", e.what());
      show_attention = false;
    }
  }

  // Opens sources[index]; false (reported) if it cannot be shown.
  bool open_current() {
    const Source& s = sources[index];
    live = false;
    ended = false;
    capture.release();
    try {
      if (s.kind == SourceKind::Image) {
        cv::Mat rgb = load_image_rgb(s.path);
        cv::cvtColor(rgb, frame.bgr, cv::COLOR_RGB2BGR);
        frame.name = fs::path(s.path).stem().string();
        detect(s.path);
        compute_attention();
        return true;
      }
      // Video file or camera: OpenCV's own warnings would bury the one-line message.
      const auto level = cv::utils::logging::getLogLevel();
      cv::utils::logging::setLogLevel(cv::utils::logging::LOG_LEVEL_SILENT);
      if (s.kind == SourceKind::Video) {
        std::error_code ec;
        if (!fs::exists(s.path, ec)) {
          cv::utils::logging::setLogLevel(level);
          fail(s.path + ": no such file");
        }
        capture.open(s.path);
      } else {
        capture.open(s.camera);
      }
      cv::utils::logging::setLogLevel(level);
      if (!capture.isOpened())
        fail(s.kind == SourceKind::Video ? s.path + ": cannot open as a video (unreadable, or no decoder for its format)"
                                         : s.path + ": cannot open the camera (no such device, or it is busy)");
      source_fps = s.kind == SourceKind::Video ? capture.get(cv::CAP_PROP_FPS) : 0;
      frame_number = 0;
      fps = 0, work_ms = 0;
      live = true;
      frame.name = s.kind == SourceKind::Video ? fs::path(s.path).stem().string()
                                               : "camera" + std::to_string(s.camera);
      if (!next_video_frame())
        fail(s.path + (s.kind == SourceKind::Video ? ": the video has no readable frames" : ": the camera gives no frames"));
      return true;
    } catch (const Error& e) {
      report(e.what());
    } catch (const cv::Exception& e) {
      report(s.path + ": " + e.err);
    }
    live = false;
    capture.release();
    return false;
  }

  // Reads, detects and times the next frame of a video or camera; false at the end.
  bool next_video_frame() {
    const auto start = std::chrono::steady_clock::now();
    cv::Mat bgr;
    if (!capture.read(bgr) || bgr.empty()) return false;
    if (bgr.channels() == 1) cv::cvtColor(bgr, bgr, cv::COLOR_GRAY2BGR);
    frame.bgr = bgr;
    ++frame_number;
    detect(sources[index].path);
    compute_attention();
    const auto now = std::chrono::steady_clock::now();
    const double ms = std::chrono::duration<double, std::milli>(now - start).count();
    work_ms = work_ms > 0 ? 0.8 * work_ms + 0.2 * ms : ms;
    if (frame_number > 1) {
      const double dt = std::chrono::duration<double>(now - last_frame_time).count();
      const double instant = dt > 0 ? 1.0 / dt : 0;
      fps = fps > 0 ? 0.8 * fps + 0.2 * instant : instant;  // smoothed
    }
    last_frame_time = now;
    dirty = true;
    return true;
  }

  // Moves to the next source that opens, in `step` direction (wrapping); false if none does.
  bool move(int step) {
    const size_t n = sources.size();
    for (size_t tries = 0; tries < n; ++tries) {
      index = (index + n + step) % n;
      if (failed[index]) continue;
      if (open_current()) {
        dirty = true;
        return true;
      }
      failed[index] = true;
    }
    return false;
  }

  void render() {
    const cv::Mat base = show_attention && !frame.attention.empty()
                             ? render_attention(frame.bgr, frame.attention, pre.config,
                                                model->encoder.config.patch_size, 0.5f)
                             : frame.bgr;
    const std::vector<Detection> dets = current_detections();
    overlay = base.clone();  // full resolution: what 's' saves
    draw_detections(overlay, dets, draw);

    // The window: the picture fitted to the screen (small ones enlarged), with the boxes drawn
    // again at screen resolution so lines and tags are crisp at any zoom; readouts in a header
    // and footer strip, off the picture.
    const int w = frame.bgr.cols, h = frame.bgr.rows;
    double scale = 1;
    if (w < 640 && h < 480) scale = std::min(640.0 / w, 480.0 / h);
    else scale = std::min({1.0, 1280.0 / w, 800.0 / h});
    cv::Mat shown;
    if (scale == 1) shown = base.clone();
    else cv::resize(base, shown, cv::Size(), scale, scale, scale > 1 ? cv::INTER_LINEAR : cv::INTER_AREA);
    std::vector<Detection> scaled = dets;
    for (Detection& d : scaled) d.x0 *= scale, d.y0 *= scale, d.x1 *= scale, d.y1 *= scale;
    draw_detections(shown, scaled, draw);
    if (live) {  // the frame-rate readout, on the frame
      char fps_line[128];
      if (source_fps > 0)
        std::snprintf(fps_line, sizeof(fps_line), "%.1f fps (video %.1f)   decode+model %.1f ms   frame %lld%s", fps,
                      source_fps, work_ms, (long long)frame_number, ended ? "  (end)" : "");
      else
        std::snprintf(fps_line, sizeof(fps_line), "%.1f fps   decode+model %.1f ms   frame %lld", fps, work_ms,
                      (long long)frame_number);
      draw_text_panel(shown, {fps_line}, true, {}, 0.5);
    }

    const double px = 17;  // the viewer's own chrome: a fixed, comfortable size
    const int line_h = 22, pad = 8;
    const cv::Scalar bg(38, 34, 32), fg(240, 240, 240), dim(170, 170, 170);
    const int header_h = 3 * line_h + pad, footer_h = line_h + pad / 2;
    cv::Mat canvas(header_h + shown.rows + footer_h, std::max(shown.cols, 560), CV_8UC3, bg);
    shown.copyTo(canvas(cv::Rect(0, header_h, shown.cols, shown.rows)));
    char line[512];
    std::snprintf(line, sizeof(line), "%zu/%zu   %s   %dx%d", index + 1, sources.size(), frame.name.c_str(), w, h);
    draw_text(canvas, line, {pad, pad + 14}, px, fg);
    std::snprintf(line, sizeof(line), "threshold %.2f   %zu box%s%s%s", post.threshold, dets.size(),
                  dets.size() == 1 ? "" : "es", draw.labels ? "" : "   labels off",
                  show_attention ? "   attention rollout" : "");
    draw_text(canvas, line, {pad, pad + line_h + 14}, px, fg);
    // Legend: each class present, in its colour, with its count.
    std::map<int64_t, std::pair<std::string, int>> classes;
    for (const auto& d : dets) {
      auto& c = classes[d.label];
      c.first = d.name.empty() ? std::to_string(d.label) : d.name;
      ++c.second;
    }
    int x = pad;
    const int y = pad + 2 * line_h + 14;
    if (classes.empty()) draw_text(canvas, "no boxes above the threshold", {x, y}, px, dim);
    for (const auto& [label, c] : classes) {
      const std::string text = c.first + " " + std::to_string(c.second);
      const int tw = text_extent(text, px).width;
      if (x + 16 + tw > canvas.cols - pad) {
        draw_text(canvas, "...", {x, y}, px, dim);
        break;
      }
      cv::rectangle(canvas, cv::Rect(x, y - 11, 12, 12), class_colour(label), cv::FILLED);
      draw_text(canvas, text, {x + 16, y}, px, fg);
      x += 16 + tw + 18;
    }
    draw_text(canvas, kKeysHelp, {pad, header_h + shown.rows + 16}, 15, dim);
    cv::imshow(kWindow, canvas);
    dirty = false;
  }

  void save() {
    std::error_code ec;
    fs::create_directories(save_dir, ec);
    std::string name = frame.name;
    if (live) {
      char buf[32];
      std::snprintf(buf, sizeof(buf), "_frame%06lld", (long long)frame_number);
      name += buf;
    }
    // Never over an earlier save: name_view.png, name_view_2.png, ...
    fs::path path = save_dir / (name + "_view.png");
    for (int k = 2; fs::exists(path, ec); ++k) path = save_dir / (name + "_view_" + std::to_string(k) + ".png");
    try {
      write_image_atomic(path.string(), overlay);
      std::printf("saved %s\n", path.string().c_str());
      std::fflush(stdout);
    } catch (const Error& e) {
      std::fprintf(stderr, "tessera: error: %s\n", e.what());
      ++failures;
    }
  }

  void set_threshold(double t) {
    t = std::clamp(t, 0.0, 0.99);
    cv::setTrackbarPos(kTrackbar, kWindow, static_cast<int>(std::lround(t * 100)));  // → on_trackbar
    post.threshold = static_cast<float>(t);
    dirty = true;
  }

  static void on_trackbar(int pos, void* self) {
    auto* v = static_cast<Viewer*>(self);
    v->post.threshold = pos / 100.0f;
    v->dirty = true;
  }

  // The next key: from the script while it lasts (pumping the window's events all the same),
  // else from the window. -1: none within `delay_ms`.
  int next_key(int delay_ms) {
    while (script_pos < script.size()) {
      const std::string tok = script[script_pos++];
      if (tok.rfind("wait=", 0) == 0) {
        const auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(std::stoi(tok.substr(5)));
        while (std::chrono::steady_clock::now() < until) cv::waitKeyEx(20);
        return -1;
      }
      if (tok.rfind("pause=", 0) == 0) {  // until the file exists (a test took its screenshot)
        const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(60);
        std::error_code ec;
        while (!fs::exists(tok.substr(6), ec) && std::chrono::steady_clock::now() < until) cv::waitKeyEx(20);
        return -1;
      }
      if (tok.rfind("t=", 0) == 0) {
        set_threshold(std::stod(tok.substr(2)));
        cv::waitKeyEx(1);
        return -1;
      }
      cv::waitKeyEx(1);
      if (tok == "right") return 0xff53;
      if (tok == "left") return 0xff51;
      if (tok == "esc") return 27;
      if (tok == "space") return ' ';
      if (tok.size() == 1) return static_cast<unsigned char>(tok[0]);
      fail("--script: unknown step '" + tok + "'");
    }
    return cv::waitKeyEx(delay_ms);
  }

  void announce() {
    std::printf("showing %zu/%zu %s\n", index + 1, sources.size(), sources[index].path.c_str());
    std::fflush(stdout);
  }

  int run() {
    failed.assign(sources.size(), false);
    // The first source that opens.
    index = sources.size() - 1;
    if (!move(+1)) fail("none of the inputs could be shown");
    const char* display = std::getenv("DISPLAY");
    if (display && *display && !x_display_reachable(display))
      fail(std::string("cannot connect to the display ") + display + " (no X server there?): tessera view needs a "
           "window; to write annotated images instead, use tessera detect --model DIR --out DIR INPUT...");
    try {
      cv::namedWindow(kWindow, cv::WINDOW_AUTOSIZE | cv::WINDOW_GUI_NORMAL);  // no Qt toolbar
    } catch (const cv::Exception& e) {
      fail(std::string("cannot open a window (") + e.err + "); to write annotated images instead, use "
           "tessera detect --model DIR --out DIR INPUT...");
    }
    window_open = true;
    cv::createTrackbar(kTrackbar, kWindow, nullptr, 99, &Viewer::on_trackbar, this);
    cv::setTrackbarPos(kTrackbar, kWindow, static_cast<int>(std::lround(post.threshold * 100)));
    bool announced = false;
    for (;;) {
      if (dirty) {
        render();
        if (!announced) {
          cv::waitKeyEx(1);  // let the window draw before saying it is shown
          announce();
          announced = true;
        }
      }
      // A video file plays at its own rate (if the model keeps up); a camera as fast as it comes.
      int delay = 30;
      if (live && !ended) {
        delay = 1;
        if (source_fps > 0) {
          const auto due = last_frame_time + std::chrono::duration<double>(1.0 / source_fps);
          const double left = std::chrono::duration<double, std::milli>(due - std::chrono::steady_clock::now()).count();
          delay = std::max(1, static_cast<int>(left));
        }
      }
      const int key = next_key(delay);
      const Command cmd = command_for_key(key);
      if (cmd == Command::Quit) break;
      if (cmd == Command::None && key < 0 && cv::getWindowProperty(kWindow, cv::WND_PROP_VISIBLE) < 1) break;
      switch (cmd) {
        case Command::Next:
        case Command::Previous:
          if (!move(cmd == Command::Next ? +1 : -1)) fail("none of the inputs could be shown");
          announced = false;
          break;
        case Command::Save:
          if (dirty) render();
          save();
          break;
        case Command::ToggleLabels:
          draw.labels = !draw.labels;
          dirty = true;
          break;
        case Command::ToggleAttention:
          if (!model) {
            std::fprintf(stderr, "tessera: the attention map needs --model\n");
            break;
          }
          show_attention = !show_attention;
          compute_attention();
          dirty = true;
          break;
        case Command::ThresholdUp: set_threshold(post.threshold + 0.05); break;
        case Command::ThresholdDown: set_threshold(post.threshold - 0.05); break;
        case Command::Quit:
        case Command::None: break;
      }
      if (live && !ended && cmd != Command::Next && cmd != Command::Previous) {
        bool more = false;
        try {
          more = next_video_frame();
        } catch (const Error& e) {  // a frame the model cannot take: report it, stop this input
          report(sources[index].path + ": frame " + std::to_string(frame_number) + ": " + e.what());
        }
        if (!more) {
          ended = true;  // hold the last frame until the next key
          dirty = true;
        }
      }
    }
    cv::destroyAllWindows();
    cv::waitKey(1);
    if (failures) std::fprintf(stderr, "tessera: %d input%s could not be shown\n", failures, failures == 1 ? "" : "s");
    return failures ? 1 : 0;
  }
};

bool have_display() {
  const char* x = std::getenv("DISPLAY");
  const char* wl = std::getenv("WAYLAND_DISPLAY");
  return (x && *x) || (wl && *wl);
}

}  // namespace

void add_view(CLI::App& app, Action& action) {
  auto* cmd = app.add_subcommand("view", "Detection viewer: boxes over images, folders, videos or a camera");
  static std::string model_dir, save_dir = ".", script, detections_json;
  static std::vector<std::string> inputs;
  static float threshold = 0.5f;
  static int threads = 0;
  static bool no_labels = false, attention = false;
  cmd->add_option("--model", model_dir, "Detector model folder (default: the bundled digit detector)");
  cmd->add_option("--threshold", threshold, "Initial score threshold (a trackbar changes it)")
      ->check(CLI::Range(0.0, 0.99));
  cmd->add_option("--save-dir", save_dir, "Where the save key writes the current overlay (PNG)");
  cmd->add_flag("--no-labels", no_labels, "Start with the label tags hidden");
  cmd->add_flag("--attention", attention, "Start with the attention rollout map shown");
  cmd->add_option("--threads", threads, "Threads (default: TESSERA_NUM_THREADS or all cores)");
  // Hidden test hooks: keys fed to the same handler as the window's; detections from a file.
  cmd->add_option("--script", script)->group("");
  cmd->add_option("--detections", detections_json)->group("");
  cmd->add_option("inputs", inputs, "Images, folders, @list.txt, video files, or a camera index (0, 1, ...)")
      ->required();
  cmd->footer(std::string("Keys: ") + kKeysHelp + " (Esc quits too; arrows move)");
  cmd->callback([&action] {
    action = [] {
      if (!have_display())
        fail("no display (DISPLAY is not set): tessera view needs a window; to write annotated images "
             "instead, use tessera detect --model DIR --out DIR INPUT...");
      if (model_dir.empty() && detections_json.empty()) model_dir = bundled_model("detect");
      apply_threads(threads);
      Viewer v;
      if (!model_dir.empty()) {
        v.model = load_model(model_dir);
        v.detector = v.model->family == ModelFamily::Detector || v.model->detection != nullptr;
        if (!v.detector && detections_json.empty())
          fail(model_dir + ": " + v.model->architecture +
               " is not a detector (tessera view draws boxes; for a classifier's attention map use "
               "tessera classify --attention OUT.png)");
        v.pre = model_preprocessor(*v.model);
      }
      if (!detections_json.empty()) {
        v.given = read_detections_json(detections_json);
        v.have_given = true;
      }
      if (v.detector) v.post = model_post_process(*v.model);  // the folder's labels per query and NMS
      v.post.threshold = threshold;
      v.draw.labels = !no_labels;
      v.show_attention = attention && v.model;
      v.save_dir = save_dir;
      std::stringstream ss(script);
      for (std::string tok; std::getline(ss, tok, ',');)
        if (!tok.empty()) v.script.push_back(tok);
      v.sources = expand_sources(inputs);
      if (v.sources.empty()) fail("no images or videos found in the given inputs");
      return v.run();
    };
  });
}

}  // namespace tessera::cli
