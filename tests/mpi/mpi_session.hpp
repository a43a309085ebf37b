#pragma once
// MPI for the whole of one test binary (initialized before Catch2's main runs), and this rank.

#include <mpi.h>

#include <gradus/optim/ef21/mpi.hpp>

namespace mpi_test {

struct Session {
  Session() { MPI_Init(nullptr, nullptr); }
  ~Session() { MPI_Finalize(); }
};
inline Session session;

inline int rank() { return gradus::ef21::detail::rank_of(MPI_COMM_WORLD); }

}  // namespace mpi_test
