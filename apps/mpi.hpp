#pragma once
// The CLI's MPI world (data-parallel `tessera train`): set up by main() when the process was
// launched by an MPI launcher (mpirun / mpiexec: OMPI_COMM_WORLD_SIZE or PMI_SIZE / PMIX_RANK in
// the environment), on Tessera builds with TESSERA_MPI. A single process never initialises MPI.
#include "tessera/communicator.hpp"

namespace tessera::cli {

// Calls MPI_Init when launched by an MPI launcher (and built with MPI); MPI_Finalize at the end
// of main. On a build without MPI nothing happens here, and `tessera train` refuses a launch of
// several ranks (mpi_launched_size) rather than let each rank write the same files.
class MpiSession {
 public:
  MpiSession(int* argc, char*** argv);
  ~MpiSession();
  MpiSession(const MpiSession&) = delete;
  MpiSession& operator=(const MpiSession&) = delete;
};

// The world communicator when there is more than one rank, else nullptr.
Communicator* mpi_world();

// Whether this binary was built with MPI.
bool mpi_built();
// The number of ranks an MPI launcher announced in the environment (1 when none did).
int mpi_launched_size();
// After an error on this rank: MPI_Abort the whole job (the other ranks would wait in a
// collective forever); nothing when MPI is not running.
void mpi_abort(int code);

}  // namespace tessera::cli
