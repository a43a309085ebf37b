// The heart_scale EF21 / EF21-W experiment over MPI: each rank hosts a block of the 27 clients and
// the compressed messages travel by MPI_Allgatherv. Prints (on rank 0) the same numbers as the
// in-process examples/ef21_heart.cpp.
//   OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 mpirun -np 4 --oversubscribe ./ef21_heart_mpi
#include <cstdio>
#include <exception>

#include <gradus/optim/ef21/mpi.hpp>

#include "../ef21_heart.hpp"

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank = 0, size = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  int status = 0;
  try {
    if (rank == 0) std::printf("MPI: %d ranks\n", size);
    status = examples::ef21_heart::main_loop(
        gradus::ef21::MpiTransport{MPI_COMM_WORLD},
        [](gradus::Index n) { return gradus::ef21::block_of_clients(n, MPI_COMM_WORLD); }, rank == 0);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "rank %d: %s\n", rank, e.what());
    status = 1;
  }
  MPI_Finalize();
  return status;
}
