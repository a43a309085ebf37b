#pragma once
// EF21 theory step sizes (Richtarik, Sokolov, Fatkhullin, NeurIPS 2021; Error Feedback Reloaded,
// Richtarik, Gasanov, Burlachenko, ICLR 2024).
//
// For a contractive compressor with parameter alpha in (0, 1]:
//     theta = 1 - sqrt(1 - alpha),  beta = (1 - alpha) / (1 - sqrt(1 - alpha)),
//     xi    = sqrt(beta / theta)  (= sqrt(1 - alpha) / (1 - sqrt(1 - alpha)); 0 at alpha = 1)
//     gamma = 1 / (L + Ltilde xi)
// with L the smoothness of f = (1/n) sum f_i and Ltilde a mean of the clients' L_i:
//     L_QM = sqrt((1/n) sum L_i^2)  (original EF21 analysis), StepRule::QuadraticMean
//     L_AM = (1/n) sum L_i          (EF21-W, and EF21 under the improved analysis), StepRule::ArithmeticMean
// L_AM <= L_QM, so the AM step is never smaller; they differ when the L_i are heterogeneous.

#include <cmath>
#include <span>
#include <string_view>

#include "gradus/core/errors.hpp"

namespace gradus::ef21 {

enum class StepRule { QuadraticMean, ArithmeticMean };

namespace detail {

inline void require_alpha(std::string_view function, double alpha) {
  gradus::detail::require(alpha > 0 && alpha <= 1, function, "alpha", "a value in (0, 1]", alpha);
}

inline void require_smoothness(std::string_view function, std::span<const double> L) {
  gradus::detail::require_nonempty(function, "L_i", static_cast<Eigen::Index>(L.size()), "entries");
  for (double value : L) {
    gradus::detail::require_positive(function, "L_i", value);
    gradus::detail::require_finite(function, "L_i", value);
  }
}

}  // namespace detail

inline double theta(double alpha) {
  detail::require_alpha("ef21::theta", alpha);
  return 1 - std::sqrt(1 - alpha);
}

inline double beta(double alpha) {
  detail::require_alpha("ef21::beta", alpha);
  return alpha == 1 ? 0.0 : (1 - alpha) / (1 - std::sqrt(1 - alpha));
}

// sqrt(beta / theta), in the form that stays accurate for small alpha.
inline double xi(double alpha) {
  detail::require_alpha("ef21::xi", alpha);
  const double root = std::sqrt(1 - alpha);
  return root / (1 - root);
}

// L_AM = (1/n) sum L_i.
inline double arithmetic_mean(std::span<const double> L) {
  detail::require_smoothness("ef21::arithmetic_mean", L);
  double sum = 0;
  for (double value : L) sum += value;
  return sum / static_cast<double>(L.size());
}

// L_QM = sqrt((1/n) sum L_i^2).
inline double quadratic_mean(std::span<const double> L) {
  detail::require_smoothness("ef21::quadratic_mean", L);
  double sum = 0;
  for (double value : L) sum += value * value;
  return std::sqrt(sum / static_cast<double>(L.size()));
}

// gamma = 1 / (L + Ltilde xi(alpha)), Ltilde = L_QM or L_AM of the clients' constants L_i.
inline double step_size(double L, std::span<const double> L_i, double alpha, StepRule rule) {
  gradus::detail::require_positive("ef21::step_size", "L", L);
  gradus::detail::require_finite("ef21::step_size", "L", L);
  const double mean = rule == StepRule::QuadraticMean ? quadratic_mean(L_i) : arithmetic_mean(L_i);
  return 1 / (L + mean * xi(alpha));
}

}  // namespace gradus::ef21
