// The CLI's MPI world (apps/mpi.hpp).
#include "mpi.hpp"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "tessera/error.hpp"

#ifdef TESSERA_HAVE_MPI
#include <mpi.h>
#endif

namespace tessera::cli {

namespace {

// The number of ranks a launcher announced in the environment (1 when none did).
int launched_size() {
  // Set by the launcher for each rank it starts (not SLURM_NTASKS, which a whole allocation has,
  // so a plain run inside `salloc` stays one process).
  for (const char* name : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"}) {
    const char* v = std::getenv(name);
    if (v && *v) return std::max(1, std::atoi(v));
  }
  return std::getenv("PMIX_RANK") ? 2 : 1;  // PMIx without a size variable: let MPI say
}

#ifdef TESSERA_HAVE_MPI
bool initialised = false;

template <typename T>
void allreduce_in_rank_order(std::span<T> values, MPI_Datatype type) {
  int rank = 0, size = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  constexpr size_t kChunk = size_t{1} << 24;  // MPI counts are int
  std::vector<T> incoming(std::min(values.size(), kChunk));
  for (size_t off = 0; off < values.size(); off += kChunk) {
    const size_t n = std::min(kChunk, values.size() - off);
    const int count = static_cast<int>(n);
    if (rank == 0) {
      for (int r = 1; r < size; ++r) {  // ((r0 + r1) + r2) ...: one order, every run
        // Ranks out of step (one in another collective) must fail, not write past a buffer.
        MPI_Status status;
        MPI_Probe(r, 7, MPI_COMM_WORLD, &status);
        int got = 0;
        MPI_Get_count(&status, type, &got);
        if (got != count) {
          std::fprintf(stderr, "tessera: error: MPI rank %d sent %d values where rank 0 sums %d: the ranks are out of "
                               "step\n", r, got, count);
          std::fflush(stderr);
          MPI_Abort(MPI_COMM_WORLD, 1);
        }
        MPI_Recv(incoming.data(), count, type, r, 7, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
        for (size_t i = 0; i < n; ++i) values[off + i] += incoming[i];
      }
    } else {
      MPI_Send(values.data() + off, count, type, 0, 7, MPI_COMM_WORLD);
    }
    MPI_Bcast(values.data() + off, count, type, 0, MPI_COMM_WORLD);
  }
}

class MpiWorld final : public Communicator {
 public:
  int rank() const override {
    int r = 0;
    MPI_Comm_rank(MPI_COMM_WORLD, &r);
    return r;
  }
  int size() const override {
    int s = 1;
    MPI_Comm_size(MPI_COMM_WORLD, &s);
    return s;
  }
  void allreduce_sum(std::span<float> values) override { allreduce_in_rank_order(values, MPI_FLOAT); }
  void allreduce_sum(std::span<double> values) override { allreduce_in_rank_order(values, MPI_DOUBLE); }
};
MpiWorld world;
#endif

}  // namespace

bool mpi_built() {
#ifdef TESSERA_HAVE_MPI
  return true;
#else
  return false;
#endif
}

int mpi_launched_size() { return launched_size(); }

void mpi_abort(int code) {
#ifdef TESSERA_HAVE_MPI
  if (initialised) MPI_Abort(MPI_COMM_WORLD, code);
#else
  (void)code;
#endif
}

MpiSession::MpiSession(int* argc, char*** argv) {
  const int launched = launched_size();
#ifdef TESSERA_HAVE_MPI
  if (launched > 1) {
    MPI_Init(argc, argv);
    initialised = true;
    // An error on one rank must end the whole job, not leave the others waiting in a collective.
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_ARE_FATAL);
  }
#else
  (void)argc, (void)argv, (void)launched;
#endif
}

MpiSession::~MpiSession() {
#ifdef TESSERA_HAVE_MPI
  if (initialised) MPI_Finalize();
#endif
}

Communicator* mpi_world() {
#ifdef TESSERA_HAVE_MPI
  if (initialised && world.size() > 1) return &world;
#endif
  return nullptr;
}

}  // namespace tessera::cli
