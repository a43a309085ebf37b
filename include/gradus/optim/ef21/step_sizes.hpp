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
//
// 1 - sqrt(1 - alpha) cancels for small alpha (it is 0 in double below alpha = 1e-16), so with
// r = sqrt(1 - alpha) everything is computed from the equal forms
//     theta = alpha / (1 + r),  beta = (1 - alpha)(1 + r) / alpha,  xi = r (1 + r) / alpha,
//     gamma = alpha / (alpha L + Ltilde r (1 + r)),
// accurate to a few ulps for every accepted alpha. theta, beta and xi accept alpha in
// [2 m, 1], m the smallest normal number of their type: below, theta (about alpha / 2) would be
// subnormal and lose digits, and beta, xi (about 2 / alpha) would overflow.

#include <cmath>
#include <concepts>
#include <limits>
#include <span>
#include <string_view>

#include "gradus/core/errors.hpp"

namespace gradus::ef21 {

enum class StepRule { QuadraticMean, ArithmeticMean };

namespace detail {

template <std::floating_point T>
void require_alpha(std::string_view function, T alpha) {
  constexpr T low = 2 * std::numeric_limits<T>::min();
  if (!(alpha >= low && alpha <= 1)) {
    gradus::detail::throw_invalid_argument(function, "alpha", "a value in [" + gradus::detail::to_text(low) + ", 1]",
                                           gradus::detail::to_text(alpha));
  }
}

inline void require_smoothness(std::string_view function, std::span<const double> L) {
  gradus::detail::require_nonempty(function, "L_i", static_cast<Eigen::Index>(L.size()), "entries");
  for (double value : L) {
    gradus::detail::require_positive(function, "L_i", value);
    gradus::detail::require_finite(function, "L_i", value);
  }
}

// r (1 + r) = alpha xi with r = sqrt(1 - alpha): the factor beta, xi and gamma share.
template <std::floating_point T>
T root_factor(T alpha) {
  const T root = std::sqrt(1 - alpha);
  return root * (1 + root);
}

}  // namespace detail

template <std::floating_point T>
T theta(T alpha) {
  detail::require_alpha("ef21::theta", alpha);
  return alpha / (1 + std::sqrt(1 - alpha));
}

template <std::floating_point T>
T beta(T alpha) {
  detail::require_alpha("ef21::beta", alpha);
  return (1 - alpha) * (1 + std::sqrt(1 - alpha)) / alpha;
}

// sqrt(beta / theta).
template <std::floating_point T>
T xi(T alpha) {
  detail::require_alpha("ef21::xi", alpha);
  return detail::root_factor(alpha) / alpha;
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

// gamma = 1 / (L + Ltilde xi(alpha)), Ltilde = L_QM or L_AM of the clients' constants L_i. Throws
// when gamma is not a normal positive double (L or Ltilde near the overflow threshold, or a gamma
// that would underflow), since no run could use it.
inline double step_size(double L, std::span<const double> L_i, double alpha, StepRule rule) {
  constexpr auto function = "ef21::step_size";
  gradus::detail::require_positive(function, "L", L);
  gradus::detail::require_finite(function, "L", L);
  gradus::detail::require_enumerator(function, "rule", rule, 2);
  detail::require_alpha(function, alpha);
  const double mean = rule == StepRule::QuadraticMean ? quadratic_mean(L_i) : arithmetic_mean(L_i);
  const double gamma = alpha / (alpha * L + mean * detail::root_factor(alpha));
  if (!(gamma >= std::numeric_limits<double>::min() && gamma <= std::numeric_limits<double>::max())) {
    using gradus::detail::to_text;
    gradus::detail::throw_invalid_argument(function, "L, L_i",
                                           "constants for which gamma = 1 / (L + Ltilde xi) is a normal positive "
                                           "double (L = " + to_text(L) + ", Ltilde = " + to_text(mean) + ")",
                                           "gamma = " + to_text(gamma));
  }
  return gamma;
}

}  // namespace gradus::ef21
