#pragma once
// Finite-difference gradient checking for any function of a flat parameter vector.
//
//   auto f = [&](const Eigen::VectorXd& x) { return my_loss_value(x); };   // in double
//   auto report = gradus::testing::check_gradient(f, x, analytic_gradient);
//   if (!report.ok) std::fprintf(stderr, "%s\n", report.summary().c_str());
//
// Each coordinate i gets the central difference (f(x + h e_i) - f(x - h e_i)) / (2 h) with
// h = step * max(1, |x_i|), evaluated in double. The error of coordinate i is
// |analytic_i - numeric_i| / max(|analytic_i|, |numeric_i|, scale_floor): relative where the
// gradient is large, absolute below the floor, so a zero gradient does not divide by zero.
// To check a float implementation, pass its gradient as `analytic` and a double evaluation
// of the same function as `f`: the difference then measures the float kernel alone.
// Matrices are checked through a row-major flat view: Eigen::Map<Eigen::VectorXd>(M.data(), M.size()).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include <Eigen/Core>

#include "gradus/core/errors.hpp"
#include "gradus/core/random.hpp"

namespace gradus::testing {

struct GradientCheckOptions {
  double step = 1e-6;          // relative finite-difference step
  double tolerance = 1e-6;     // largest accepted per-coordinate error
  double scale_floor = 1e-3;   // errors are absolute below this gradient magnitude
  Eigen::Index max_coordinates = 0;  // check a random subset of this many (0: all)
  std::uint64_t seed = 1;      // for the subset
  int worst_reported = 5;      // coordinates listed in the report
};

struct CoordinateError {
  Eigen::Index index;
  double analytic;
  double numeric;
  double error;
};

struct GradientCheckReport {
  bool ok = true;
  double max_error = 0;
  Eigen::Index checked = 0;
  std::vector<CoordinateError> worst;  // largest errors first

  std::string summary() const {
    std::string text = ok ? "gradient check passed" : "gradient check FAILED";
    text += ": " + gradus::detail::to_text(static_cast<long long>(checked)) +
            " coordinates, max error " + gradus::detail::to_text(max_error);
    for (const auto& c : worst) {
      text += "\n  [" + gradus::detail::to_text(static_cast<long long>(c.index)) +
              "] analytic " + gradus::detail::to_text(c.analytic) + ", numeric " +
              gradus::detail::to_text(c.numeric) + ", error " + gradus::detail::to_text(c.error);
    }
    return text;
  }
};

namespace detail {

// The options' domain: a finite step > 0, a finite tolerance and scale floor >= 0 (an infinite
// tolerance would pass any gradient), max_coordinates and worst_reported >= 0.
inline void validate(const char* function, const GradientCheckOptions& options) {
  gradus::detail::require_finite_positive(function, "options.step", options.step);
  gradus::detail::require_finite_nonnegative(function, "options.tolerance", options.tolerance);
  gradus::detail::require_finite_nonnegative(function, "options.scale_floor", options.scale_floor);
  gradus::detail::require_nonnegative(function, "options.max_coordinates", options.max_coordinates);
  gradus::detail::require_nonnegative(function, "options.worst_reported", options.worst_reported);
}

// Which coordinates to visit: all, or a reproducible random subset.
inline std::vector<Eigen::Index> coordinates_to_check(Eigen::Index n, const GradientCheckOptions& options) {
  std::vector<Eigen::Index> order(static_cast<std::size_t>(n));
  for (Eigen::Index i = 0; i < n; ++i) order[static_cast<std::size_t>(i)] = i;
  if (options.max_coordinates == 0 || options.max_coordinates >= n) return order;
  gradus::detail::SplitMix64 rng(options.seed);
  for (Eigen::Index i = n - 1; i > 0; --i) {  // Fisher-Yates
    std::swap(order[static_cast<std::size_t>(i)], order[static_cast<std::size_t>(rng.below(static_cast<std::uint64_t>(i + 1)))]);
  }
  order.resize(static_cast<std::size_t>(options.max_coordinates));
  return order;
}

}  // namespace detail

// f: callable (const Eigen::VectorXd&) -> double. analytic: the gradient to check at x.
template <class F, class DX, class DG>
GradientCheckReport check_gradient(F&& f, const Eigen::MatrixBase<DX>& x, const Eigen::MatrixBase<DG>& analytic,
                                   const GradientCheckOptions& options = {}) {
  gradus::detail::require_size("testing::check_gradient", "analytic", analytic.size(), x.size(), "entries (size of x)");
  detail::validate("testing::check_gradient", options);
  Eigen::VectorXd point = x.template cast<double>();
  const Eigen::VectorXd grad = analytic.template cast<double>();
  GradientCheckReport report;
  std::vector<CoordinateError> errors;
  for (Eigen::Index i : detail::coordinates_to_check(point.size(), options)) {
    const double saved = point(i);
    const double h = options.step * std::max(1.0, std::abs(saved));
    point(i) = saved + h;
    const double up = static_cast<double>(f(std::as_const(point)));
    point(i) = saved - h;
    const double down = static_cast<double>(f(std::as_const(point)));
    point(i) = saved;
    const double numeric = (up - down) / (2 * h);
    const double scale = std::max({std::abs(grad(i)), std::abs(numeric), options.scale_floor});
    double error = std::abs(grad(i) - numeric) / scale;
    if (std::isnan(error)) error = INFINITY;  // a NaN anywhere is a failure, not a pass
    errors.push_back({i, grad(i), numeric, error});
    ++report.checked;
  }
  std::sort(errors.begin(), errors.end(), [](const auto& a, const auto& b) { return a.error > b.error; });
  if (!errors.empty()) report.max_error = errors.front().error;
  report.ok = report.max_error <= options.tolerance;
  errors.resize(std::min(errors.size(), static_cast<std::size_t>(options.worst_reported)));
  report.worst = std::move(errors);
  return report;
}

// fg: callable (const Eigen::VectorXd& x, Eigen::VectorXd& grad) -> double that writes the
// analytic gradient; checked against central differences of its own value.
template <class FG, class DX>
GradientCheckReport check_value_and_grad(FG&& fg, const Eigen::MatrixBase<DX>& x,
                                         const GradientCheckOptions& options = {}) {
  detail::validate("testing::check_value_and_grad", options);
  const Eigen::VectorXd point = x.template cast<double>();
  Eigen::VectorXd grad(point.size());
  fg(point, grad);
  Eigen::VectorXd scratch(point.size());
  return check_gradient([&](const Eigen::VectorXd& p) { return static_cast<double>(fg(p, scratch)); }, point, grad,
                        options);
}

}  // namespace gradus::testing
