// Data-parallel training over MPI (issue 14): `mpirun -np 2 tessera train` against one process.
// Built and registered only when the CLI is built with MPI (TESSERA_MPI and libopenmpi-dev);
// TESSERA_MPIEXEC is the launcher CMake found.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>

#include "cli_util.hpp"
#include "tessera/safetensors.hpp"

using namespace tessera;
namespace fs = std::filesystem;

namespace {

std::string mpirun(int ranks) {
  const char* exec = std::getenv("TESSERA_MPIEXEC");
  REQUIRE(exec != nullptr);
  return std::string(exec) + " --allow-run-as-root --oversubscribe --bind-to none -np " + std::to_string(ranks);
}

// The largest |a − b| over every tensor of two model folders, and the number of tensors.
double max_weight_difference(const fs::path& a, const fs::path& b, int* tensors) {
  const SafeTensors x = SafeTensors::open((a / "model.safetensors").string());
  const SafeTensors y = SafeTensors::open((b / "model.safetensors").string());
  REQUIRE(x.names() == y.names());
  double worst = 0;
  for (const std::string& name : x.names()) {
    const Tensor p = x.read(name), q = y.read(name);
    REQUIRE(p.numel() == q.numel());
    for (int64_t i = 0; i < p.numel(); ++i) worst = std::max(worst, static_cast<double>(std::abs(p[i] - q[i])));
  }
  *tensors = static_cast<int>(x.names().size());
  return worst;
}

// log.csv's rows as numbers.
std::vector<std::vector<double>> read_log(const fs::path& dir) {
  std::stringstream in(test::slurp(dir / "log.csv"));
  std::string line;
  std::getline(in, line);  // header
  std::vector<std::vector<double>> rows;
  while (std::getline(in, line)) {
    std::vector<double> row;
    std::stringstream cells(line);
    std::string cell;
    while (std::getline(cells, cell, ',')) row.push_back(std::atof(cell.c_str()));
    rows.push_back(row);
  }
  return rows;
}

// `args` run as one process into dir/one and on two ranks into dir/two: both succeed, the two-rank
// run says how it split the batch (`split_line` on stdout or stderr), every weight agrees to 1e-5
// and the loss of each of the `steps` steps to 1e-4. Returns the number of tensors compared.
int check_two_ranks_match_one(const std::string& args, const fs::path& dir, size_t steps, const std::string& split_line) {
  const test::CliRun one = test::run_cli(args + " --out " + (dir / "one").string());
  INFO(one.out << one.err);
  REQUIRE(one.code == 0);
  const test::CliRun two = test::run_cli(args + " --out " + (dir / "two").string(), mpirun(2));
  INFO(two.out << two.err);
  REQUIRE(two.code == 0);
  CHECK((two.out + two.err).find(split_line) != std::string::npos);
  int tensors = 0;
  CHECK(max_weight_difference(dir / "one", dir / "two", &tensors) <= 1e-5);
  const auto a = read_log(dir / "one"), b = read_log(dir / "two");
  REQUIRE(a.size() == steps);
  REQUIRE(b.size() == steps);
  for (size_t i = 0; i < a.size(); ++i) CHECK(std::abs(a[i][2] - b[i][2]) <= 1e-4 * std::abs(a[i][2]));
  return tensors;
}

}  // namespace

TEST_CASE("mpirun -np 2 tessera train takes the steps of one process", "[mpi]") {
  const fs::path dir = test::scratch_dir("mpi", "same");
  // SGD with momentum, 20 steps of a global batch of 8 (4 per rank), augmentation on: each rank
  // augments its slice as the one process does, the gradients are averaged in rank order.
  const std::string args = " train --task classify --data digits:train --arch vit-digits --layers 2 --batch 8"
                           " --max-steps 20 --optimizer sgd --momentum 0.9 --lr 0.05 --warmup 3 --seed 3 --threads 1";
  // The same weights to float summation order (the batch's gradient is summed in two halves).
  CHECK(check_two_ranks_match_one(args, dir, 20, "data-parallel: 2 MPI ranks, 4 images of each batch of 8 per rank") > 30);
  const auto a = read_log(dir / "one"), b = read_log(dir / "two");
  for (size_t i = 0; i < a.size(); ++i) {
    INFO("step " << i + 1);
    CHECK(std::abs(a[i][4] - b[i][4]) <= 1e-3 * std::abs(a[i][4]));  // gradient norm (rounding grows with steps)
    CHECK(a[i][6] == b[i][6]);                                      // training accuracy of the batch
  }

  // AdamW follows the same loss curve (its normalised steps amplify rounding in gradients that
  // are zero in exact arithmetic, such as the key bias's, so the curve is compared, not weights).
  const std::string adamw = " train --task classify --data digits:train --arch vit-digits --layers 2 --batch 8"
                            " --max-steps 20 --lr 1e-3 --seed 4 --threads 1";
  REQUIRE(test::run_cli(adamw + " --out " + (dir / "adam-one").string()).code == 0);
  REQUIRE(test::run_cli(adamw + " --out " + (dir / "adam-two").string(), mpirun(2)).code == 0);
  const auto c = read_log(dir / "adam-one"), d = read_log(dir / "adam-two");
  REQUIRE(c.size() == d.size());
  for (size_t i = 0; i < c.size(); ++i) CHECK(std::abs(c[i][2] - d[i][2]) <= 1e-4 * std::abs(c[i][2]));

  // A global batch that does not split over the ranks, and a task without data-parallel support,
  // are one-line errors that end the whole job.
  const test::CliRun odd = test::run_cli(" train --task classify --data digits:train --arch vit-digits --layers 2"
                                         " --batch 7 --max-steps 2 --out " + (dir / "odd").string(), mpirun(2));
  CHECK(odd.code != 0);
  CHECK(odd.err.find("split evenly over the 2 MPI ranks") != std::string::npos);
  fs::remove_all(dir.parent_path());
}

TEST_CASE("a rank killed mid-run fails the job; --resume finishes it as if uninterrupted", "[mpi]") {
  const fs::path dir = test::scratch_dir("mpi", "kill");
  const char* cli = std::getenv("TESSERA_CLI");
  REQUIRE(cli != nullptr);
  const std::string args = std::string(" train --task classify --data digits:train --arch vit-digits --batch 32") +
                           " --layers 4 --max-steps 100 --checkpoint-every 10 --lr 1e-3 --seed 5 --threads 1";
  const std::string killed = (dir / "killed").string();
  // Start the job, wait for its first checkpoint, kill -9 one rank (the newest tessera process).
  const fs::path script = dir / "kill.sh";
  std::ofstream(script) << mpirun(2) << " " << cli << args << " --out " << killed << " >" << (dir / "log").string()
                        << " 2>&1 &\njob=$!\n"
                        << "for i in $(seq 600); do [ -f " << killed << "/checkpoint.safetensors ] && break; sleep 0.05; done\n"
                        << "pkill -9 -n -f 'tessera train --task classify --data digits:train --arch vit-digits --batch 32 --layers 4'\n"
                        << "wait $job\necho $? >" << (dir / "code").string() << "\n";
  REQUIRE(std::system(("bash " + script.string()).c_str()) == 0);
  const std::string log = test::slurp(dir / "log");
  INFO(log);
  CHECK(std::atoi(test::slurp(dir / "code").c_str()) != 0);  // the job failed
  CHECK(log.find("signal 9") != std::string::npos);          // and mpirun says why
  REQUIRE(fs::exists(fs::path(killed) / "checkpoint.safetensors"));
  CHECK(!fs::exists(fs::path(killed) / "model.safetensors"));
  // --resume on two ranks ends where an uninterrupted two-rank run ends, bit for bit.
  const test::CliRun resumed = test::run_cli(args + " --out " + killed + " --resume", mpirun(2));
  INFO(resumed.out << resumed.err);
  REQUIRE(resumed.code == 0);
  CHECK(resumed.err.find("resuming") != std::string::npos);
  REQUIRE(test::run_cli(args + " --out " + (dir / "whole").string(), mpirun(2)).code == 0);
  int tensors = 0;
  CHECK(max_weight_difference(killed, dir / "whole", &tensors) == 0.0);
  fs::remove_all(dir.parent_path());
}

TEST_CASE("mpirun -np 2 tessera train --task segment takes the steps of one process", "[mpi]") {
  // Segmenter on 32x32 crops of digit scenes (no ignored pixels, so every rank's slice has as many
  // valid pixels and the mean of the ranks' means is the batch's mean), SGD with momentum.
  const fs::path dir = test::scratch_dir("mpi", "segment");
  REQUIRE(test::run_cli(" data scenes --split train --count 16 --seed 1 --out " + (dir / "data").string()).code == 0);
  const std::string args = " train --task segment --data " + (dir / "data").string() +
                           " --arch segmenter-digits --crops --image-size 32 --layers 2 --batch 4 --max-steps 12"
                           " --optimizer sgd --momentum 0.9 --lr 0.05 --seed 2 --threads 1";
  CHECK(check_two_ranks_match_one(args, dir, 12, "data-parallel: 2 MPI ranks, 2 images of each batch of 4 per rank") > 20);
  fs::remove_all(dir.parent_path());
}

TEST_CASE("mpirun -np 2 tessera train --task detect takes the steps of one process", "[mpi]") {
  // A DETR head with auxiliary loss on images of two boxes each: as DETR's distributed
  // SetCriterion, each rank divides the box terms by the global box count / ranks, and since every
  // slice has as many boxes, the ranks' class terms (weighted means) average to the batch's too.
  const fs::path dir = test::scratch_dir("mpi", "detect");
  nlohmann::json coco = {{"images", nlohmann::json::array()}, {"annotations", nlohmann::json::array()},
                         {"categories", {{{"id", 1}, {"name", "a"}}, {{"id", 2}, {"name", "b"}}}}};
  int ann = 1;
  for (int i = 0; i < 8; ++i) {
    cv::Mat img(32, 32, CV_8UC3, cv::Scalar(30, 30, 30));
    const std::string name = "im" + std::to_string(i) + ".png";
    coco["images"].push_back({{"id", i + 1}, {"file_name", name}, {"width", 32}, {"height", 32}});
    for (int k = 0; k < 2; ++k) {
      const int w = 5 + (i * 3 + k) % 6, h = 6 + (i + 2 * k) % 5, x = 2 + k * 16 + i % 6, y = 3 + (i * 5 + k * 7) % 14;
      cv::rectangle(img, cv::Rect(x, y, w, h), cv::Scalar(220, 200 - 100 * k, 230), cv::FILLED);
      coco["annotations"].push_back({{"id", ann++}, {"image_id", i + 1}, {"category_id", 1 + (i + k) % 2},
                                     {"bbox", {x, y, w, h}}, {"area", w * h}, {"iscrowd", 0}});
    }
    REQUIRE(cv::imwrite((dir / name).string(), img));
  }
  std::ofstream(dir / "annotations.json") << coco.dump();
  const std::string args = " train --task detect --data " + (dir / "annotations.json").string() +
                           " --arch detr-digits --image-size 32 --hidden-size 32 --heads 2 --layers 1 --queries 4"
                           " --decoder-layers 2 --batch 4 --max-steps 10 --optimizer sgd --momentum 0.9 --lr 0.02"
                           " --seed 6 --threads 1";
  CHECK(check_two_ranks_match_one(args, dir, 10, "data-parallel: 2 MPI ranks, 2 images of each batch of 4 per rank") > 40);
  fs::remove_all(dir.parent_path());
}
