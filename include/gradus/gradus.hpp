#pragma once
// Umbrella header: every public gradus header. Include the granular ones to compile less.

#include "gradus/version.hpp"
#include "gradus/core/types.hpp"
#include "gradus/core/errors.hpp"
#include "gradus/core/concepts.hpp"
#include "gradus/core/compose.hpp"
#include "gradus/testing/gradient_check.hpp"
