#pragma once
// The client objective of the EF21 experiments: logistic regression with a non-convex regularizer,
//     f_i(x) = (1/m) sum_j log(1 + exp(-b_j a_j^T x)) + lambda sum_k x_k^2 / (1 + x_k^2),
//     grad f_i(x) = -(1/m) sum_j b_j sigma(-b_j a_j^T x) a_j + lambda 2 x_k / (1 + x_k^2)^2,
// labels b_j in {-1, +1} (0 is read as -1), lambda = 0.1 by default. Its gradient is L_i-Lipschitz with
//     L_i = lambda_max(A^T A) / (4 m) + 2 lambda
// (sigma' <= 1/4 and (u^2/(1+u^2))'' <= 2), which smoothness() returns; the same formula on all rows
// gives the constant L of the whole problem. A minibatch gradient averages over the batch's rows.
// Satisfies gradus::Objective and gradus::MinibatchObjective.

#include <algorithm>
#include <cmath>
#include <span>

#include <Eigen/Core>
#include <Eigen/Eigenvalues>

#include "gradus/core/errors.hpp"
#include "gradus/core/types.hpp"

namespace gradus::ef21 {

template <class S>
struct NonconvexLogisticOptions {
  S lambda = S(0.1);  // weight of the non-convex regularizer
};

// lambda_max(A^T A) / (4 m) + 2 lambda, from the smaller of the two Gram matrices, in double.
template <class D>
double logistic_smoothness(const Eigen::MatrixBase<D>& A, double lambda) {
  gradus::detail::require_nonempty("ef21::logistic_smoothness", "A", A.rows());
  const Eigen::MatrixXd a = A.template cast<double>();
  const Eigen::MatrixXd gram = a.rows() < a.cols() ? Eigen::MatrixXd(a * a.transpose()) : Eigen::MatrixXd(a.transpose() * a);
  const double top = Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd>(gram, Eigen::EigenvaluesOnly).eigenvalues().maxCoeff();
  return std::max(top, 0.0) / (4.0 * static_cast<double>(a.rows())) + 2 * lambda;
}

template <class S>
class NonconvexLogistic {
 public:
  using Scalar = S;
  using Options = NonconvexLogisticOptions<S>;

  template <class DA>
  NonconvexLogistic(const Eigen::MatrixBase<DA>& A, const Labels& labels, Options options = {})
      : A_(A), b_(labels.size()), options_(options) {
    constexpr auto function = "NonconvexLogistic::NonconvexLogistic";
    gradus::detail::require_nonempty(function, "A", A_.rows());
    gradus::detail::require_nonempty(function, "A", A_.cols(), "columns");
    gradus::detail::require_size(function, "labels", labels.size(), A_.rows(), "entries (rows of A)");
    gradus::detail::require_nonnegative(function, "options.lambda", options.lambda);
    gradus::detail::require_finite(function, "options.lambda", options.lambda);
    for (Index j = 0; j < labels.size(); ++j) {
      gradus::detail::require(labels(j) >= -1 && labels(j) <= 1, function, "labels", "labels in {-1, 0, +1}",
                              labels(j));
      b_(j) = labels(j) > 0 ? S(1) : S(-1);
    }
  }

  Index dim() const { return A_.cols(); }
  Index num_samples() const { return A_.rows(); }
  const Options& options() const { return options_; }

  // L_i = lambda_max(A^T A) / (4 m) + 2 lambda.
  double smoothness() const { return logistic_smoothness(A_, static_cast<double>(options_.lambda)); }

  template <class D>
  S value(const Eigen::MatrixBase<D>& x) const {
    check_x("NonconvexLogistic::value", x.size());
    const Vector<S> margins = b_.cwiseProduct(A_ * x);
    S loss = 0;
    for (Index j = 0; j < margins.size(); ++j) loss += softplus(-margins(j));
    return loss / static_cast<S>(margins.size()) + regularizer(x, nullptr);
  }

  // Full gradient over all rows.
  template <class D>
  S value_and_grad(const Eigen::MatrixBase<D>& x, Eigen::Ref<Vector<S>> g) {
    check_x_and_g("NonconvexLogistic::value_and_grad", x.size(), g.size());
    coefficients_.noalias() = A_ * x;
    S loss = 0;
    const S inverse_m = S(1) / static_cast<S>(A_.rows());
    for (Index j = 0; j < A_.rows(); ++j) loss += sample_term(j, coefficients_(j), inverse_m, coefficients_(j));
    g.noalias() = A_.transpose() * coefficients_;
    return loss * inverse_m + regularizer(x, &g);
  }

  // Minibatch gradient: the mean over the rows in batch.
  template <class D>
  S value_and_grad(const Eigen::MatrixBase<D>& x, std::span<const Index> batch, Eigen::Ref<Vector<S>> g) {
    constexpr auto function = "NonconvexLogistic::value_and_grad";
    check_x_and_g(function, x.size(), g.size());
    gradus::detail::require_nonempty(function, "batch", static_cast<Index>(batch.size()), "entries");
    g.setZero();
    S loss = 0;
    const S inverse_m = S(1) / static_cast<S>(batch.size());
    for (Index j : batch) {
      gradus::detail::require_in_range(function, "batch", j, Index(0), A_.rows());
      S coefficient;
      loss += sample_term(j, A_.row(j).dot(x), inverse_m, coefficient);
      g += coefficient * A_.row(j).transpose();
    }
    return loss * inverse_m + regularizer(x, &g);
  }

 private:
  // softplus(t) = log(1 + exp(t)) without overflow.
  static S softplus(S t) { return std::max(t, S(0)) + std::log1p(std::exp(-std::abs(t))); }

  // Loss of row j at score z = a_j^T x; coefficient = d(loss / m)/dz = -b_j sigma(-b_j z) / m.
  S sample_term(Index j, S z, S inverse_m, S& coefficient) const {
    const S margin = b_(j) * z;
    coefficient = -b_(j) * inverse_m / (S(1) + std::exp(margin));
    return softplus(-margin);
  }

  // lambda sum x^2 / (1 + x^2); adds its gradient to *g when given.
  template <class D>
  S regularizer(const Eigen::MatrixBase<D>& x, Eigen::Ref<Vector<S>>* g) const {
    const auto square = x.array().square().eval();
    if (g) g->array() += S(2) * options_.lambda * x.array() / (S(1) + square).square();
    return options_.lambda * (square / (S(1) + square)).sum();
  }

  void check_x(const char* function, Index x_size) const {
    gradus::detail::require_size(function, "x", x_size, dim(), "entries (columns of A)");
  }
  void check_x_and_g(const char* function, Index x_size, Index g_size) const {
    check_x(function, x_size);
    gradus::detail::require_size(function, "g", g_size, dim(), "entries (columns of A)");
  }

  RowMatrix<S> A_;
  Vector<S> b_;
  Options options_;
  Vector<S> coefficients_;  // per-row scores, then loss derivatives; reused across calls
};

}  // namespace gradus::ef21
