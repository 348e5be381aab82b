// Data set loaders (tessera/datasets.hpp): COCO boxes become the processors' normalised centre
// boxes (crowd dropped, clipped, empty dropped), and every bad data set is one error naming the file.
#include <catch2/catch.hpp>

#include <filesystem>
#include <fstream>
#include <opencv2/imgcodecs.hpp>
#include <unistd.h>

#include "tessera/datasets.hpp"
#include "tessera/error.hpp"
#include "tessera/scenes.hpp"

namespace fs = std::filesystem;
using namespace tessera;

namespace {
fs::path scratch(const std::string& name) {
  const fs::path p = fs::temp_directory_path() / ("tessera_datasets_" + std::to_string(::getpid())) / name;
  fs::remove_all(p);
  fs::create_directories(p);
  return p;
}
}  // namespace

TEST_CASE("datasets: COCO boxes become the DETR processors' centre boxes", "[datasets]") {
  const fs::path dir = scratch("coco");
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
  const fs::path dir = scratch("seg");
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

TEST_CASE("datasets: ImageFolder classes are sorted sub-folders; digits use the tutorial split", "[datasets]") {
  const fs::path dir = scratch("folder");
  for (const char* c : {"zebra", "ant"}) {
    fs::create_directories(dir / c);
    cv::imwrite((dir / c / "1.png").string(), cv::Mat(4, 4, CV_8UC3, cv::Scalar(0, 0, 0)));
  }
  const ClassificationData d = load_classification_data(dir.string(), "");
  REQUIRE(d.classes == std::vector<std::string>{"ant", "zebra"});
  REQUIRE(d.images.size() == 2);
  CHECK(d.images[0].label == 0);
  CHECK(d.images[1].path.find("zebra") != std::string::npos);
  CHECK_THROWS_WITH(load_classification_data(scratch("empty").string(), ""), Catch::Contains("no class sub-folders"));
  const ClassificationData digits = load_classification_data("digits:train", default_digits_png());
  CHECK(digits.images.size() == 2500);
  CHECK(digits.classes.size() == 10);
  fs::remove_all(dir.parent_path());
}
