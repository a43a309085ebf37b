#pragma once
// Small problems shared by the optimizer tests: two prediction losses (binary logistic and
// squared error, means over rows), a diagonal quadratic, Rosenbrock, and synthetic data.

#include <cmath>
#include <cstdint>

#include <gradus/core/errors.hpp>
#include <gradus/core/types.hpp>
#include <gradus/models/linear.hpp>

namespace problems {

using gradus::Index;
using gradus::Labels;
using gradus::RowMatrix;
using gradus::Vector;

// mean_i softplus(z_i) - y_i z_i over one logit per row, labels in {0, 1}.
template <class S>
struct LogisticLoss {
  using Scalar = S;

  template <class DZ, class DY>
  S value(const Eigen::MatrixBase<DZ>& Z, const Eigen::MatrixBase<DY>& y) const {
    check(Z.rows(), Z.cols(), y.size());
    const auto z = Z.col(0).array();
    const auto softplus = z.max(S(0)) + (-z.abs()).exp().log1p();
    return (softplus - y.template cast<S>().array() * z).mean();
  }
  template <class DZ, class DY>
  S value_and_grad(const Eigen::MatrixBase<DZ>& Z, const Eigen::MatrixBase<DY>& y,
                   Eigen::Ref<RowMatrix<S>> dZ) const {
    gradus::detail::require_size("LogisticLoss", "dZ", dZ.rows(), Z.rows(), "rows");
    dZ.col(0) = (Z.col(0).array().logistic() - y.template cast<S>().array()) / S(Z.rows());
    return value(Z, y);
  }
  static void check(Index rows, Index cols, Index labels) {
    gradus::detail::require_size("LogisticLoss", "Z", cols, 1, "column");
    gradus::detail::require_size("LogisticLoss", "y", labels, rows, "entries");
  }
};

// mean_i (z_i - y_i)^2 / 2 with integer targets.
template <class S>
struct SquaredLoss {
  using Scalar = S;

  template <class DZ, class DY>
  S value(const Eigen::MatrixBase<DZ>& Z, const Eigen::MatrixBase<DY>& y) const {
    return S(0.5) * (Z.col(0) - y.template cast<S>()).squaredNorm() / S(Z.rows());
  }
  template <class DZ, class DY>
  S value_and_grad(const Eigen::MatrixBase<DZ>& Z, const Eigen::MatrixBase<DY>& y,
                   Eigen::Ref<RowMatrix<S>> dZ) const {
    dZ.col(0) = (Z.col(0) - y.template cast<S>()) / S(Z.rows());
    return value(Z, y);
  }
};

// f(x) = sum_i a_i (x_i - c_i)^2 / 2 with a_i in [1, condition].
template <class S>
struct Quadratic {
  using Scalar = S;
  Vector<S> a, c;

  Quadratic(Index d, double condition) : a(d), c(d) {
    for (Index i = 0; i < d; ++i) {
      a(i) = S(d == 1 ? 1.0 : 1.0 + (condition - 1.0) * double(i) / double(d - 1));
      c(i) = S(std::sin(double(i) + 1.0));
    }
  }
  Index dim() const { return a.size(); }
  S value_and_grad(const Eigen::Ref<const Vector<S>>& x, Eigen::Ref<Vector<S>> g) const {
    g = a.cwiseProduct(x - c);
    return S(0.5) * (x - c).dot(g);
  }
};

// Rosenbrock in 2-D: (1 - x)^2 + 100 (y - x^2)^2, minimum 0 at (1, 1).
template <class S>
struct Rosenbrock {
  using Scalar = S;
  Index dim() const { return 2; }
  S value_and_grad(const Eigen::Ref<const Vector<S>>& x, Eigen::Ref<Vector<S>> g) const {
    const S r = x(1) - x(0) * x(0);
    g(0) = -2 * (1 - x(0)) - 400 * x(0) * r;
    g(1) = 200 * r;
    return (1 - x(0)) * (1 - x(0)) + 100 * r * r;
  }
};

// Linearly separable-ish binary data: y = [X w + noise > 0], w fixed by the seed.
template <class S>
std::pair<RowMatrix<S>, Labels> classification_data(Index rows, Index cols, std::uint64_t seed) {
  gradus::detail::SplitMix64 rng(seed);
  auto normal = [&] {  // Box-Muller
    const double u = rng.uniform() + 1e-12, v = rng.uniform();
    return std::sqrt(-2 * std::log(u)) * std::cos(2 * M_PI * v);
  };
  Vector<double> w(cols);
  for (Index j = 0; j < cols; ++j) w(j) = normal();
  RowMatrix<S> X(rows, cols);
  Labels y(rows);
  for (Index i = 0; i < rows; ++i) {
    double score = 0.3;
    for (Index j = 0; j < cols; ++j) {
      X(i, j) = S(normal());
      score += double(X(i, j)) * w(j);
    }
    y(i) = score + normal() > 0 ? 1 : 0;
  }
  return {X, y};
}

}  // namespace problems
