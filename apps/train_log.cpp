// TrainLog (train_args.hpp): the progress line, DIR/log.csv, DIR/val.csv and DIR/curves.png.
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>

#include "tessera/atomic_file.hpp"
#include "tessera/error.hpp"
#include "tessera/text.hpp"
#include "train_args.hpp"

namespace fs = std::filesystem;

namespace tessera::cli {

namespace {

using Clock = std::chrono::steady_clock;

std::string duration_text(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "?";
  const long s = std::lround(seconds);
  char buf[32];
  if (s >= 3600)
    std::snprintf(buf, sizeof buf, "%ld:%02ld:%02ld", s / 3600, (s / 60) % 60, s % 60);
  else
    std::snprintf(buf, sizeof buf, "%ld:%02ld", s / 60, s % 60);
  return buf;
}

// Keeps the rows of a CSV whose first column (a step or epoch number) is below `limit`.
void truncate_csv(const fs::path& path, int64_t limit) {
  std::ifstream in(path);
  if (!in) return;
  std::string line, kept;
  bool header = true;
  while (std::getline(in, line)) {
    if (header) {
      kept += line + "\n", header = false;
      continue;
    }
    if (std::atoll(line.c_str()) < limit) kept += line + "\n";
  }
  in.close();
  write_file_atomic(path.string(), kept.data(), kept.size());
}

// One panel of curves.png: series of (x, y) in a box, with axes, ticks and a legend.
struct Series {
  std::string name;
  std::vector<cv::Point2d> points;
  cv::Scalar colour;
  int thickness = 1;
};

std::string tick_text(double v) {
  char buf[32];
  if (v != 0 && (std::abs(v) < 1e-2 || std::abs(v) >= 1e5))
    std::snprintf(buf, sizeof buf, "%.1e", v);
  else
    std::snprintf(buf, sizeof buf, "%.3g", v);
  return buf;
}

void draw_panel(cv::Mat& img, cv::Rect box, const std::string& title, const std::string& xlabel,
                const std::vector<Series>& series) {
  const cv::Scalar ink(40, 40, 40), grid(225, 225, 225);
  draw_text(img, title, {box.x, box.y - 10}, 20, ink);
  double x0 = 1e300, x1 = -1e300, y0 = 1e300, y1 = -1e300;
  for (const Series& s : series)
    for (const cv::Point2d& p : s.points)
      if (std::isfinite(p.y)) x0 = std::min(x0, p.x), x1 = std::max(x1, p.x), y0 = std::min(y0, p.y), y1 = std::max(y1, p.y);
  cv::rectangle(img, box, ink, 1);
  if (x0 > x1) {
    // A validation panel of a run without --val stays empty for good; others fill as it goes.
    const bool no_val = title.find("no --val") != std::string::npos;
    draw_text(img, no_val ? "none: the run was given no --val data" : "no data yet", {box.x + 12, box.y + 30}, 16, ink);
    return;
  }
  if (x1 == x0) x1 = x0 + 1;
  if (y1 == y0) y1 = y0 + 1, y0 -= 1;
  const double pad = 0.05 * (y1 - y0);
  y0 -= pad, y1 += pad;
  auto px = [&](cv::Point2d p) {
    return cv::Point(static_cast<int>(std::lround(box.x + (p.x - x0) / (x1 - x0) * box.width)),
                     static_cast<int>(std::lround(box.y + box.height - (p.y - y0) / (y1 - y0) * box.height)));
  };
  for (int i = 0; i <= 4; ++i) {  // horizontal grid lines with their values
    const double y = y0 + (y1 - y0) * i / 4.0;
    const int row = px({x0, y}).y;
    cv::line(img, {box.x + 1, row}, {box.x + box.width - 1, row}, grid, 1);
    const std::string t = tick_text(y);
    draw_text(img, t, {box.x - 8 - static_cast<int>(text_extent(t, 14).width), row + 5}, 14, ink);
  }
  // x ticks at whole numbers (steps, epochs): five, or every one of a short range.
  const int xticks = x1 - x0 < 4 ? static_cast<int>(x1 - x0) : 4;
  for (int i = 0; i <= xticks; ++i) {
    const double x = std::round(x0 + (x1 - x0) * i / xticks);
    const std::string t = std::to_string(static_cast<long long>(x));
    const int col = px({x, y0}).x;
    draw_text(img, t, {col - static_cast<int>(text_extent(t, 14).width / 2), box.y + box.height + 18}, 14, ink);
  }
  draw_text(img, xlabel, {box.x + box.width / 2 - 20, box.y + box.height + 38}, 15, ink);
  for (const Series& s : series) {
    std::vector<cv::Point> pts;
    for (const cv::Point2d& p : s.points)
      if (std::isfinite(p.y)) pts.push_back(px(p));
    if (pts.size() == 1) cv::circle(img, pts[0], 3, s.colour, cv::FILLED, cv::LINE_AA);
    if (pts.size() > 1) cv::polylines(img, pts, false, s.colour, s.thickness, cv::LINE_AA);
  }
  // Legend, inside the panel on the right: at the top, unless the curves end in the upper half
  // (accuracies climbing), then at the bottom.
  bool ends_high = false;
  for (const Series& s : series)
    if (!s.points.empty() && std::isfinite(s.points.back().y))
      ends_high = ends_high || (s.points.back().y - y0) / (y1 - y0) > 0.5;
  int ly = ends_high ? box.y + box.height - 12 - 20 * (static_cast<int>(series.size()) - 1) : box.y + 22;
  for (const Series& s : series) {
    const int w = static_cast<int>(text_extent(s.name, 15).width);
    const int lx = box.x + box.width - w - 40;
    cv::line(img, {lx, ly - 5}, {lx + 22, ly - 5}, s.colour, 3, cv::LINE_AA);
    draw_text(img, s.name, {lx + 28, ly}, 15, ink);
    ly += 20;
  }
}

}  // namespace

struct TrainLog::State {
  fs::path dir;
  int64_t total = 0, first = 0;
  std::vector<std::string> extra;
  std::ofstream csv, val_csv;
  bool tty = false;
  Clock::time_point start = Clock::now(), last_print{};
  int64_t steps_done = 0, images_done = 0;
  std::vector<cv::Point2d> loss;                           // (step, loss)
  std::vector<std::string> metric_names;
  std::vector<std::vector<cv::Point2d>> metrics;            // per name: (epoch, value)
  double last_loss = 0, last_lr = 0;
  int64_t last_step = 0, last_epoch = 0;

  std::vector<int64_t> val_steps;  // the step of each validation, by epoch order
  std::vector<cv::Point2d> metric_steps(size_t i) const {
    std::vector<cv::Point2d> out;
    for (size_t k = 0; k < metrics[i].size() && k < val_steps.size(); ++k)
      out.push_back({static_cast<double>(val_steps[k]), metrics[i][k].y});
    return out;
  }

  void draw() {
    const int W = 1200, H = 460;
    cv::Mat img(H, W, CV_8UC3, cv::Scalar(255, 255, 255));
    std::vector<Series> left;
    left.push_back({"loss per step", loss, cv::Scalar(230, 180, 140), 1});
    std::vector<cv::Point2d> mean;
    const size_t window = std::max<size_t>(1, loss.size() / 50);
    double sum = 0;
    for (size_t i = 0; i < loss.size(); ++i) {
      sum += loss[i].y;
      if (i >= window) sum -= loss[i - window].y;
      if (i + 1 >= window) mean.push_back({loss[i].x, sum / static_cast<double>(window)});
    }
    left.push_back({"running mean (" + std::to_string(window) + " steps)", mean, cv::Scalar(180, 80, 20), 2});
    // The validation loss (a metric named "loss") beside the training loss, at its step.
    std::vector<Series> right;
    const cv::Scalar colours[] = {{40, 150, 40}, {160, 60, 160}, {0, 140, 220}, {120, 120, 0}, {40, 40, 200}};
    for (size_t i = 0; i < metric_names.size(); ++i) {
      if (metric_names[i] == "loss") {
        left.push_back({"validation loss", metric_steps(i), cv::Scalar(40, 40, 200), 2});
        continue;
      }
      right.push_back({metric_names[i], metrics[i], colours[right.size() % 5], 2});
    }
    draw_panel(img, {80, 50, 480, 330}, "loss", "step", left);
    draw_panel(img, {700, 50, 460, 330},
               metric_names.empty() ? "validation (no --val)" : "validation", "epoch", right);
    std::vector<uchar> png;
    cv::imencode(".png", img, png);
    write_file_atomic((dir / "curves.png").string(), png.data(), png.size());
  }
};

TrainLog::TrainLog(const std::string& dir, int64_t total_steps, int64_t first_step,
                   std::vector<std::string> extra_columns)
    : s_(new State) {
  s_->dir = dir;
  s_->total = total_steps, s_->first = first_step;
  s_->extra = std::move(extra_columns);
  s_->tty = ::isatty(2);
  std::error_code ec;
  fs::create_directories(s_->dir, ec);
  check(!ec, dir + ": cannot create (" + ec.message() + ")");
  const fs::path csv = s_->dir / "log.csv", val = s_->dir / "val.csv";
  if (first_step > 0) {
    // A resumed run: keep what the killed run logged before its checkpoint, and the loss curve.
    truncate_csv(csv, first_step + 1);
    std::ifstream in(csv);
    std::string line;
    std::getline(in, line);
    while (std::getline(in, line)) {
      std::istringstream f(line);
      std::string step, epoch, loss;
      std::getline(f, step, ','), std::getline(f, epoch, ','), std::getline(f, loss, ',');
      s_->loss.push_back({std::atof(step.c_str()), std::atof(loss.c_str())});
    }
  } else {
    fs::remove(csv, ec), fs::remove(val, ec);
  }
  const bool fresh = !fs::exists(csv);
  s_->csv.open(csv, std::ios::app);
  check(static_cast<bool>(s_->csv), csv.string() + ": cannot write");
  if (fresh) {
    s_->csv << "step,epoch,loss,lr,grad_norm,images_per_s";
    for (const std::string& c : s_->extra) s_->csv << "," << c;
    s_->csv << "\n";
  }
}

TrainLog::~TrainLog() { delete s_; }

void TrainLog::step(int64_t step, int64_t epoch, double loss, double lr, double grad_norm, int64_t images,
                    const std::vector<double>& extra) {
  State& s = *s_;
  const auto now = Clock::now();
  ++s.steps_done, s.images_done += images;
  const double elapsed = std::chrono::duration<double>(now - s.start).count();
  const double rate = elapsed > 0 ? static_cast<double>(s.images_done) / elapsed : 0;
  const double eta = s.steps_done > 0 ? elapsed / static_cast<double>(s.steps_done) *
                                            static_cast<double>(s.total - step)
                                      : 0;
  s.csv << step << "," << epoch << "," << loss << "," << lr << "," << grad_norm << "," << rate;
  for (double v : extra) s.csv << "," << v;
  s.csv << "\n";
  s.csv.flush();
  s.loss.push_back({static_cast<double>(step), loss});
  s.last_loss = loss, s.last_lr = lr, s.last_step = step, s.last_epoch = epoch;
  char line[256];
  std::snprintf(line, sizeof line, "step %lld/%lld  epoch %lld  loss %.4f  lr %.2e  %.1f img/s  ETA %s",
                (long long)step, (long long)s.total, (long long)epoch, loss, lr, rate,
                duration_text(eta).c_str());
  if (s.tty) {
    const int width = 24;
    const int filled = s.total > 0 ? static_cast<int>(width * step / s.total) : 0;
    std::string bar(static_cast<size_t>(filled), '#');
    bar.resize(width, '.');
    std::fprintf(stderr, "\r[%s] %s\033[K", bar.c_str(), line);
    std::fflush(stderr);
  } else if (step == s.total || now - s.last_print > std::chrono::seconds(10) || step == s.first + 1) {
    std::fprintf(stderr, "%s\n", line);
    s.last_print = now;
  }
}

void TrainLog::validation(int64_t epoch, int64_t step, const std::map<std::string, double>& metrics) {
  State& s = *s_;
  const fs::path val = s.dir / "val.csv";
  if (s.metric_names.empty()) {
    for (const auto& [name, v] : metrics) s.metric_names.push_back(name);
    s.metrics.resize(s.metric_names.size());
    if (s.first > 0) {  // resumed: earlier epochs' rows (before this one) are kept and redrawn
      truncate_csv(val, epoch);
      std::ifstream in(val);
      std::string line;
      std::getline(in, line);
      while (std::getline(in, line)) {
        std::istringstream f(line);
        std::string cell;
        std::vector<double> cells;
        while (std::getline(f, cell, ',')) cells.push_back(std::atof(cell.c_str()));
        if (cells.size() >= 2) s.val_steps.push_back(static_cast<int64_t>(cells[1]));
        for (size_t i = 0; i < s.metric_names.size() && i + 2 < cells.size(); ++i)
          s.metrics[i].push_back({cells[0], cells[i + 2]});
      }
    }
    if (!fs::exists(val)) {
      std::ofstream out(val);
      out << "epoch,step";
      for (const std::string& n : s.metric_names) out << "," << n;
      out << "\n";
    }
    s.val_csv.open(val, std::ios::app);
  }
  s.val_csv << epoch << "," << step;
  s.val_steps.push_back(step);
  std::string text;
  for (size_t i = 0; i < s.metric_names.size(); ++i) {
    const auto it = metrics.find(s.metric_names[i]);
    const double v = it == metrics.end() ? NAN : it->second;
    s.val_csv << "," << v;
    s.metrics[i].push_back({static_cast<double>(epoch), v});
    char buf[64];
    std::snprintf(buf, sizeof buf, "  %s %.4f", s.metric_names[i].c_str(), v);
    text += buf;
  }
  s.val_csv << "\n";
  s.val_csv.flush();
  if (s.tty) std::fprintf(stderr, "\n");
  std::fprintf(stderr, "validation after epoch %lld (step %lld):%s\n", (long long)epoch, (long long)step,
               text.c_str());
  s.draw();
}

void TrainLog::finish() {
  if (s_->tty) std::fprintf(stderr, "\n");
  s_->draw();
}

}  // namespace tessera::cli
