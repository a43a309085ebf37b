#pragma once
// Umbrella header: every public gradus header except the MPI transport
// (gradus/optim/ef21/mpi.hpp), which needs <mpi.h> and is included on its own.
// Include the granular headers to compile less.

#include "gradus/version.hpp"

#include "gradus/core/compose.hpp"
#include "gradus/core/concepts.hpp"
#include "gradus/core/dual.hpp"
#include "gradus/core/errors.hpp"
#include "gradus/core/random.hpp"
#include "gradus/core/types.hpp"

#include "gradus/losses/adversarial.hpp"
#include "gradus/losses/anyloss.hpp"
#include "gradus/losses/comp_sum.hpp"
#include "gradus/losses/multi_similarity.hpp"
#include "gradus/losses/preference.hpp"
#include "gradus/losses/regret.hpp"
#include "gradus/losses/sequence_logprob.hpp"

#include "gradus/models/linear.hpp"
#include "gradus/models/linear_self_attention.hpp"
#include "gradus/models/mlp.hpp"
#include "gradus/models/online_learners.hpp"

#include "gradus/optim/ef21.hpp"
#include "gradus/optim/minimize.hpp"
#include "gradus/optim/objective.hpp"
#include "gradus/optim/sso.hpp"
#include "gradus/optim/transforms.hpp"

#include "gradus/testing/gradient_check.hpp"
