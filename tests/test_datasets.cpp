// Classification data (vision/include/tessera/datasets.hpp): the ImageFolder convention, OpenCV's
// digits with the tutorial split, batches through the model's processor, and one-line errors.
#include <catch2/catch.hpp>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <opencv2/imgcodecs.hpp>
#include <unistd.h>

#include "tessera/datasets.hpp"
#include "tessera/image.hpp"
#include "tessera/preprocess.hpp"

using namespace tessera;
namespace fs = std::filesystem;

namespace {

struct TempDir {
  fs::path path = fs::temp_directory_path() / ("tessera-datasets-" + std::to_string(::getpid()));
  TempDir() { fs::remove_all(path), fs::create_directories(path); }
  ~TempDir() { fs::remove_all(path); }
};

void write_png(const fs::path& p, int w, int h, int value) {
  fs::create_directories(p.parent_path());
  cv::Mat m(h, w, CV_8UC3, cv::Scalar(value, 255 - value, value / 2));
  REQUIRE(cv::imwrite(p.string(), m));
}

std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "(no error)";
}

}  // namespace

TEST_CASE("ImageFolder: classes sorted by name, images found below them, sorted", "[datasets]") {
  TempDir t;
  write_png(t.path / "b_cat" / "z.png", 10, 8, 10);
  write_png(t.path / "b_cat" / "nested" / "a.PNG", 12, 12, 20);  // any depth, any case
  write_png(t.path / "a_dog" / "x.jpg", 9, 9, 30);
  std::ofstream(t.path / "a_dog" / "notes.txt") << "not an image";
  std::ofstream(t.path / "README") << "a file at the top is not a class";
  const ClassificationData d = image_folder(t.path.string());
  REQUIRE(d.classes == std::vector<std::string>{"a_dog", "b_cat"});
  REQUIRE(d.size() == 3);
  CHECK(d.labels == std::vector<int64_t>{0, 1, 1});
  CHECK(fs::path(d.paths[0]).filename() == "x.jpg");
  CHECK(fs::path(d.paths[1]).filename() == "a.PNG");  // "b_cat/nested/a.PNG" < "b_cat/z.png"
  CHECK(fs::path(d.paths[2]).filename() == "z.png");

  // A batch is the processor's output for each file, stacked, with the files' labels.
  const PreprocessConfig pre = parse_preprocess_config(
      R"({"image_processor_type": "ViTImageProcessor", "size": {"height": 16, "width": 16}})", "test");
  std::vector<int64_t> labels;
  const Tensor batch = classification_batch(d, {2, 0}, pre, &labels);
  REQUIRE(batch.shape() == Shape{2, 3, 16, 16});
  CHECK(labels == std::vector<int64_t>{1, 0});
  const Tensor one = preprocess(load_image_rgb(d.paths[2]), pre);
  CHECK(std::equal(one.data(), one.data() + one.numel(), batch.data()));
}

TEST_CASE("ImageFolder errors name the folder", "[datasets]") {
  TempDir t;
  CHECK_THAT(error_of([&] { image_folder((t.path / "missing").string()); }),
             Catch::Contains("missing: not a folder"));
  CHECK_THAT(error_of([&] { image_folder(t.path.string()); }), Catch::Contains("no class folders"));
  fs::create_directories(t.path / "empty_class");
  write_png(t.path / "full" / "a.png", 4, 4, 1);
  CHECK_THAT(error_of([&] { image_folder(t.path.string()); }),
             Catch::Contains("empty_class: no images in this class folder"));
  // Without resizing, images of different sizes cannot share a batch: the file is named.
  fs::remove_all(t.path / "empty_class");
  write_png(t.path / "full" / "b.png", 5, 4, 1);
  const ClassificationData d = image_folder(t.path.string());
  const PreprocessConfig no_resize = parse_preprocess_config(
      R"({"image_processor_type": "ViTImageProcessor", "do_resize": false})", "test");
  CHECK_THAT(error_of([&] { classification_batch(d, {0, 1}, no_resize); }), Catch::Contains("b.png"));
}

TEST_CASE("OpenCV digits with the tutorial split", "[datasets]") {
  const std::string png = "/usr/share/doc/opencv-doc/examples/data/digits.png";
  if (!fs::exists(png)) {
    WARN("no " << png << " (Debian: opencv-doc); skipped");
    return;
  }
  const ClassificationData train = load_classification_data("digits:train", png);
  const ClassificationData test = load_classification_data("digits:test", png);
  const ClassificationData all = load_classification_data("digits", png);
  REQUIRE(train.size() == 2500);
  REQUIRE(test.size() == 2500);
  REQUIRE(all.size() == 5000);
  CHECK(train.classes.size() == 10);
  CHECK(train.labels.front() == 0);
  CHECK(train.labels.back() == 9);
  for (int digit = 0; digit < 10; ++digit)
    CHECK(std::count(train.labels.begin(), train.labels.end(), digit) == 250);
  // Train sample 0 is cell (row 0, column 0); test sample 0 is cell (row 0, column 50).
  const cv::Mat sheet = cv::imread(png, cv::IMREAD_GRAYSCALE);
  CHECK(cv::norm(train.images[0], sheet(cv::Rect(0, 0, 20, 20)), cv::NORM_INF) == 0);
  CHECK(cv::norm(test.images[0], sheet(cv::Rect(50 * 20, 0, 20, 20)), cv::NORM_INF) == 0);
  CHECK(train.rgb(0).channels() == 3);
  CHECK_THAT(error_of([&] { load_classification_data("digits:val", png); }),
             Catch::Contains("'train'"));
}

namespace {  // detection and segmentation data
fs::path scratch_dir(const std::string& name) {
  const fs::path p = fs::temp_directory_path() / ("tessera_datasets_" + std::to_string(::getpid())) / name;
  fs::remove_all(p);
  fs::create_directories(p);
  return p;
}
}  // namespace

TEST_CASE("datasets: COCO boxes become the DETR processors' centre boxes", "[datasets]") {
  const fs::path dir = scratch_dir("coco");
  // Image 200x100. Annotations: a plain box, one sticking out on the right (clipped), a crowd one
  // (dropped), one of zero width (dropped), and one of another image.
  std::ofstream(dir / "a.json") << R"({"images": [{"id": 4, "file_name": "x.png", "width": 200, "height": 100},
      {"id": 5, "file_name": "y.png", "width": 50, "height": 50}],
    "categories": [{"id": 1, "name": "a"}, {"id": 7, "name": "b"}],
    "annotations": [
      {"image_id": 4, "category_id": 7, "bbox": [10, 20, 40, 30]},
      {"image_id": 4, "category_id": 1, "bbox": [180, 0, 20.5, 10]},
      {"image_id": 4, "category_id": 1, "bbox": [0, 0, 100, 100], "iscrowd": 1},
      {"image_id": 4, "category_id": 1, "bbox": [5, 5, 0, 10]},
      {"image_id": 5, "category_id": 1, "bbox": [1, 1, 2, 2]}]})";
  const CocoDataset coco = load_coco_instances((dir / "a.json").string());
  const DetectionTarget t = coco_detection_target(coco, 4);
  REQUIRE(t.labels == std::vector<int64_t>{7, 1});
  // (10 + 50) / 2 / 200, (20 + 50) / 2 / 100, 40 / 200, 30 / 100
  CHECK(t.boxes[0][0] == Approx(0.15f));
  CHECK(t.boxes[0][1] == Approx(0.35f));
  CHECK(t.boxes[0][2] == Approx(0.2f));
  CHECK(t.boxes[0][3] == Approx(0.3f));
  // clipped to x1 = 200: (180 + 200) / 2 / 200, width 20 / 200
  CHECK(t.boxes[1][0] == Approx(0.95f));
  CHECK(t.boxes[1][2] == Approx(0.1f));
  CHECK_THROWS_WITH(coco_detection_target(coco, 9), Catch::Contains("a.json") && Catch::Contains("id 9"));
}

TEST_CASE("datasets: segmentation folders are checked pair by pair", "[datasets]") {
  const fs::path dir = scratch_dir("seg");
  fs::create_directories(dir / "images");
  fs::create_directories(dir / "masks");
  CHECK_THROWS_WITH(load_segmentation_folder(dir.string()), Catch::Contains("images") && Catch::Contains("no images"));
  cv::imwrite((dir / "images" / "a.png").string(), cv::Mat(8, 10, CV_8UC3, cv::Scalar(1, 2, 3)));
  CHECK_THROWS_WITH(load_segmentation_folder(dir.string()), Catch::Contains("a.png") && Catch::Contains("no mask"));
  cv::imwrite((dir / "masks" / "a.png").string(), cv::Mat(8, 9, CV_8UC1, cv::Scalar(1)));
  CHECK_THROWS_WITH(load_segmentation_folder(dir.string()), Catch::Contains("masks/a.png") && Catch::Contains("9x8"));
  cv::Mat m(8, 10, CV_8UC1, cv::Scalar(1));
  m.at<uchar>(2, 3) = 255;  // ignore
  cv::imwrite((dir / "masks" / "a.png").string(), m);
  CHECK(load_segmentation_folder(dir.string(), 2).size() == 1);
  m.at<uchar>(0, 0) = 4;
  cv::imwrite((dir / "masks" / "a.png").string(), m);
  CHECK_THROWS_WITH(load_segmentation_folder(dir.string(), 2), Catch::Contains("masks/a.png") && Catch::Contains("label 4"));
  cv::Mat m16(8, 10, CV_16UC1, cv::Scalar(300));
  cv::imwrite((dir / "masks" / "a.png").string(), m16);
  CHECK(load_segmentation_folder(dir.string(), 301).size() == 1);  // 16-bit label maps
  CHECK_THROWS_WITH(load_segmentation_folder((dir / "nothing").string()), Catch::Contains("nothing"));
}

