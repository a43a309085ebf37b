#pragma once
// EF21 error feedback, in process: compressors, the EF21 family, theory step sizes and the
// experiments' logistic objective. The MPI transport is separate (gradus/optim/ef21/mpi.hpp),
// so that this header never needs <mpi.h>.

#include "gradus/optim/ef21/compressors.hpp"
#include "gradus/optim/ef21/ef21.hpp"
#include "gradus/optim/ef21/logistic.hpp"
#include "gradus/optim/ef21/step_sizes.hpp"
