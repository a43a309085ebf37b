// EF21 with the L_QM step size against EF21-W with the L_AM step size on heart_scale, all 27
// clients simulated in this process. examples/mpi/ef21_heart_mpi.cpp runs the same over MPI.
#include "ef21_heart.hpp"

int main() {
  return examples::ef21_heart::main_loop(
      gradus::ef21::InProcess{}, [](gradus::Index n) { return std::pair<gradus::Index, gradus::Index>{0, n}; }, true);
}
