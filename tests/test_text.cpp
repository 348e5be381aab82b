// Text in a TrueType font (tessera/text.hpp): a known string against a stored rendering, the
// extent the layout relies on, clipping at the image's edges, bad UTF-8 and bad font files.
// The stored reference (tests/fixtures/text/) is DejaVu Sans 2.37 (Debian 12's fonts-dejavu-core)
// as stb_truetype rasterises it; TESSERA_WRITE_TEXT_REFERENCE=1 rewrites it.
#include <catch2/catch.hpp>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>
#include <unistd.h>

#include "tessera/draw.hpp"
#include "tessera/error.hpp"
#include "tessera/text.hpp"

namespace fs = std::filesystem;
using namespace tessera;

namespace {
const char* kSample = "Tessera 0.87 dog";
const double kPx = 24;
cv::Rect ink_box(const cv::Mat& m) {
  std::vector<cv::Point> nz;
  cv::findNonZero(m, nz);
  return nz.empty() ? cv::Rect() : cv::boundingRect(nz);
}
}  // namespace

TEST_CASE("text: DejaVu Sans is the default font", "[text]") {
  REQUIRE(std::getenv("TESSERA_FONT") == nullptr);
  REQUIRE(truetype_font_available());
  CHECK(font_description().find("DejaVu Sans") == 0);
}

TEST_CASE("text: a known string matches its stored rendering", "[text]") {
  TextExtent e;
  const cv::Mat got = render_text_coverage(kSample, kPx, &e);
  const fs::path ref = fs::path(TESSERA_FIXTURES) / "text" / "tessera-0.87-dog-24px.png";
  if (std::getenv("TESSERA_WRITE_TEXT_REFERENCE")) cv::imwrite(ref.string(), got);
  const cv::Mat want = cv::imread(ref.string(), cv::IMREAD_UNCHANGED);
  REQUIRE(!want.empty());
  REQUIRE(got.size() == want.size());
  // The ink's bounding box exactly; coverage within 2 levels of 255 everywhere (rasteriser
  // rounding), and a few pixels by value: inside the T's stem, and the gap between words.
  CHECK(ink_box(got) == ink_box(want));
  cv::Mat diff;
  cv::absdiff(got, want, diff);
  double worst = 0;
  cv::minMaxLoc(diff, nullptr, &worst);
  CHECK(worst <= 2);
  // DejaVu Sans: ascent 0.928 and descent 0.236 of the em, scaled so that they add up to 24 px:
  // 19.1 and 4.9, rounded up.
  CHECK(e.ascent == 20);
  CHECK(e.descent == 5);
  const cv::Rect box = ink_box(got);
  CHECK(box.height >= 17);          // cap height to descender of "g"
  CHECK(box.y + box.height > e.ascent);  // the "g" goes below the baseline
  // The T's stem crosses the row 5 px above the baseline with solid ink.
  double stem = 0;
  cv::minMaxLoc(got(cv::Rect(box.x, e.ascent - 5, 14, 1)), nullptr, &stem);
  CHECK(stem > 200);
  // Nothing between the words: the column after "Tessera" 's last ink and before "0".
  CHECK(cv::countNonZero(got(cv::Rect(box.x + text_extent("Tessera", kPx).width + 1, 0, 2, got.rows))) == 0);
}

TEST_CASE("text: extents grow with the size and the string", "[text]") {
  const TextExtent small = text_extent("dog 0.87", 12), big = text_extent("dog 0.87", 48);
  CHECK(big.width > 3 * small.width);
  CHECK(big.ascent > 3 * small.ascent);
  CHECK(text_extent("iii", 20).width < text_extent("MMM", 20).width);
  CHECK(text_extent("", 20).width == 0);
}

TEST_CASE("text: drawing stays inside the text's extent and the image", "[text]") {
  const TextExtent e = text_extent(kSample, kPx);
  cv::Mat img(60, 260, CV_8UC3, cv::Scalar(10, 20, 30));
  const cv::Point origin(7, 30);
  draw_text(img, kSample, origin, kPx, cv::Scalar(250, 240, 230));
  cv::Mat changed;
  cv::inRange(img, cv::Scalar(10, 20, 30), cv::Scalar(10, 20, 30), changed);
  cv::bitwise_not(changed, changed);
  const cv::Rect box = ink_box(changed);
  CHECK(box.x >= origin.x - 1);
  CHECK(box.x + box.width <= origin.x + e.width + 1);
  CHECK(box.y >= origin.y - e.ascent);
  CHECK(box.y + box.height <= origin.y + e.descent);
  // Some pixels are the text colour itself (solid strokes), others in between (anti-aliased).
  int solid = 0, partial = 0;
  for (int y = 0; y < img.rows; ++y)
    for (int x = 0; x < img.cols; ++x) {
      const cv::Vec3b p = img.at<cv::Vec3b>(y, x);
      solid += p == cv::Vec3b(250, 240, 230);
      partial += p[0] > 10 && p[0] < 250;
    }
  CHECK(solid > 50);
  CHECK(partial > 50);
  // Partly or wholly outside: clipped, no crash.
  draw_text(img, kSample, cv::Point(-40, 5), kPx, cv::Scalar(0, 0, 255));
  draw_text(img, kSample, cv::Point(250, 70), kPx, cv::Scalar(0, 0, 255));
  draw_text(img, kSample, cv::Point(-1000, -1000), kPx, cv::Scalar(0, 0, 255));
}

TEST_CASE("text: invalid UTF-8 draws replacement glyphs; a bad font file is an error naming it", "[text]") {
  const std::string bad = std::string("a\xff\xfe") + "b\xc3";  // stray bytes and a cut sequence
  CHECK(text_extent(bad, 20).width > text_extent("ab", 20).width);
  cv::Mat img(40, 120, CV_8UC3, cv::Scalar(0, 0, 0));
  draw_text(img, bad, cv::Point(2, 30), 20, cv::Scalar(255, 255, 255));
  CHECK(cv::countNonZero(img.reshape(1)) > 0);
  CHECK(text_extent("\xc3\xa9t\xc3\xa9", 20).width == text_extent("\xc3\xa9t\xc3\xa9", 20).width);  // "été"
  const fs::path junk = fs::temp_directory_path() / ("tessera_font_" + std::to_string(::getpid()) + ".ttf");
  std::ofstream(junk) << "this is not a font, just some text long enough";
  CHECK_THROWS_WITH(set_font_path(junk.string()), Catch::Contains(junk.string()) && Catch::Contains("TrueType"));
  CHECK_THROWS_WITH(set_font_path("/nonexistent/font.ttf"), Catch::Contains("/nonexistent/font.ttf"));
  fs::remove(junk);
  CHECK(font_description().find("DejaVu Sans") == 0);  // a failed set_font_path changes nothing
}

TEST_CASE("text: a legend beside a small picture enlarges it and leaves its pixels alone", "[text][draw]") {
  cv::Mat pic(40, 60, CV_8UC3);
  cv::randu(pic, 0, 256);
  const cv::Mat out = tessera::with_legend_beside(pic, {"background 93.6%", "7 1.8%"},
                                                  {cv::Scalar(0, 0, 0, 0), cv::Scalar(0, 0, 255, 0)});
  // 40 rows: enlarged 7x (the shorter side to at least 256), nearest neighbour.
  REQUIRE(out.rows >= 280);
  REQUIRE(out.cols > 420);
  cv::Mat big;
  cv::resize(pic, big, cv::Size(420, 280), 0, 0, cv::INTER_NEAREST);
  CHECK(cv::norm(out(cv::Rect(0, 0, 420, 280)), big, cv::NORM_INF) == 0);
  // The panel has the swatches and white text on its dark ground.
  const cv::Mat panel = out(cv::Rect(420, 0, out.cols - 420, out.rows));
  cv::Mat red, white;
  cv::inRange(panel, cv::Scalar(0, 0, 250), cv::Scalar(5, 5, 255), red);
  cv::inRange(panel, cv::Scalar(200, 200, 200), cv::Scalar(255, 255, 255), white);
  CHECK(cv::countNonZero(red) > 50);
  CHECK(cv::countNonZero(white) > 50);  // two lines of 11 px text: ~90 near-white pixels
  // A large picture is not enlarged, and no lines means no panel.
  const cv::Mat large(300, 400, CV_8UC3, cv::Scalar(1, 2, 3));
  CHECK(tessera::with_legend_beside(large, {}).size() == large.size());
}
