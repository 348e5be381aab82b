#pragma once
// Data-parallel training's collective, as an interface: the library's training steps take a
// Communicator (TrainStepOptions::comm) and average their gradients over its ranks before the
// optimiser; the `tessera` CLI supplies one over MPI (apps/mpi.cpp, built with TESSERA_MPI) when
// it is launched by mpirun or srun. The library itself does not link MPI.
#include <span>

namespace tessera {

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  // Every rank passes a buffer of the same length; on return each holds the element-wise sum
  // over the ranks, added in rank order (((r0 + r1) + r2) ...), so the result is the same bits on
  // every rank and in every run, whatever the timing.
  virtual void allreduce_sum(std::span<float> values) = 0;
  virtual void allreduce_sum(std::span<double> values) = 0;
};

// The average over ranks of a per-rank mean (each rank's gradient of its own slice of the global
// batch, equal slices): sum in rank order, then × 1/size. Does nothing without a communicator or
// with one rank.
void allreduce_mean(Communicator* comm, std::span<float> values);

}  // namespace tessera
