#pragma once
// Digit scenes: detection and segmentation data made from real handwriting (OpenCV's digits.png)
// drawn on generated and photographic backgrounds. `tessera data scenes` writes them as
// images/*.png, masks/*.png and a COCO instances annotations.json. The specification (README,
// "Digit scenes") in short:
//   - split train draws only the tutorial training cells (left 50 columns of each row of
//     digits.png), split test only the test cells (right 50 columns);
//   - canvas 96..320 pixels on each side; 1..8 digits whose boxes do not overlap;
//   - each digit: its cell cropped to the ink, scaled to a height of 16..64 pixels, rotated by up
//     to ±15°, dark-on-light or light-on-dark with at least 60 grey levels of contrast to the
//     background under it, in grey or a colour;
//   - backgrounds: flat, linear gradient, Gaussian noise, ruled paper, photo crop (disjoint photo
//     lists for train and test);
//   - category d + 1 for digit d; the box is the tight box of the drawn digit's ink pixels (value
//     above half the cell's maximum), COCO [x, y, w, h] with w, h = last - first + 1; the mask
//     holds the category on exactly those pixels and 0 elsewhere.
// Everything is a function of (seed, split, index): a scene never depends on the others, on the
// thread count or on the machine's SIMD (the digit is resampled in double precision by our code).
#include <opencv2/core.hpp>

#include <cstdint>
#include <string>
#include <vector>

namespace tessera {

enum class SceneSplit { Train, Test };
SceneSplit parse_scene_split(const std::string& name);  // "train" | "test", else Error
const char* scene_split_name(SceneSplit split);

// OpenCV's digits.png, 2000x1000: 50 rows of 100 cells of 20x20, white on black; row r holds
// digit r / 5. Cells of one split, in (row, column) order.
struct DigitCell {
  cv::Mat pixels;  // CV_8UC1, 20x20
  int digit = 0;
  int row = 0, column = 0;  // position in digits.png's 50 x 100 grid
};
// Error (naming the file) when it is missing, unreadable or not 2000x1000.
std::vector<DigitCell> load_digit_cells(const std::string& digits_png, SceneSplit split);

// Where OpenCV's samples are on Debian (opencv-doc).
std::string default_digits_png();
std::string default_photo_dir();

// The photos each split's photo backgrounds are cut from (file names in the photo folder; the two
// lists are disjoint).
const std::vector<std::string>& scene_photo_names(SceneSplit split);

struct SceneSource {
  std::vector<DigitCell> cells;  // of one split
  std::vector<cv::Mat> photos;   // CV_8UC3, of the same split
  SceneSplit split = SceneSplit::Train;
};
// Loads the split's cells and photos. Error when a file is missing or unreadable.
SceneSource load_scene_source(SceneSplit split, const std::string& digits_png, const std::string& photo_dir);

enum class SceneBackground { Flat, Gradient, Noise, RuledPaper, Photo };
const char* scene_background_name(SceneBackground b);

struct SceneDigit {
  int digit = 0;
  int category_id = 0;     // digit + 1
  cv::Rect box;            // tight box of the ink pixels
  int64_t area = 0;        // ink pixels
  int cell_row = 0, cell_column = 0;  // which cell of digits.png was drawn
  double height = 0;       // the scaled cell's ink height before rotation, pixels
  double angle = 0;        // degrees
  cv::Vec3b colour;        // BGR of fully inked pixels
  double background_luma = 0;  // mean luma of the background under the digit (before drawing)
};

struct Scene {
  cv::Mat image;  // CV_8UC3 BGR
  cv::Mat mask;   // CV_8UC1: category on ink pixels, 0 elsewhere
  SceneBackground background = SceneBackground::Flat;
  std::vector<SceneDigit> digits;
};

// Scene number `index` of the split for `seed`.
Scene make_scene(const SceneSource& source, uint64_t seed, int64_t index);

// ITU-R BT.601 luma of a BGR colour, 0..255.
double luma(const cv::Vec3b& bgr);

struct SceneWriteSummary {
  int64_t scenes = 0, digits = 0;
};
// Writes scenes [0, count) to out_dir/images/NNNNNN.png, out_dir/masks/NNNNNN.png and
// out_dir/annotations.json (COCO instances; file_name relative to out_dir). Each file is written
// atomically; scenes are made in parallel.
SceneWriteSummary write_scenes(const SceneSource& source, uint64_t seed, int64_t count,
                               const std::string& out_dir);

}  // namespace tessera
