#pragma once
// Linear model Z = X W + b: N x D inputs to N x C outputs (logits, scores, embeddings).
//
// Parameters live in one flat vector theta = [vec(W) ; b] with W (D x C) stored row-major,
// so theta(d * C + c) = W(d, c) and theta(D * C + c) = b(c). Vector-Jacobian products:
//   dtheta = J_theta^T dZ = [vec(X^T dZ) ; colsum(dZ)],    dX = J_X^T dZ = dZ W^T.
//
//   gradus::LinearModel<double> model(30, 1);          // 30 features, one logit
//   Vector<double> theta = model.init_params(42);       // Glorot-uniform W, zero b
//   RowMatrix<double> Z(X.rows(), 1);
//   model.predict(theta, X, Z);

#include <cmath>
#include <cstdint>

#include "gradus/core/errors.hpp"
#include "gradus/core/random.hpp"
#include "gradus/core/types.hpp"

namespace gradus {

namespace detail {

// Glorot-uniform weights U(-r, r), r = sqrt(6 / (fan_in + fan_out)); zero bias.
template <class S>
void glorot_uniform(Eigen::Ref<Vector<S>> weights_then_bias, Index fan_in, Index fan_out, SplitMix64& rng) {
  const double r = std::sqrt(6.0 / static_cast<double>(fan_in + fan_out));
  const Index num_weights = fan_in * fan_out;
  for (Index i = 0; i < num_weights; ++i) weights_then_bias(i) = static_cast<S>(r * (2 * rng.uniform() - 1));
  weights_then_bias.tail(fan_out).setZero();
}

}  // namespace detail

template <class S>
class LinearModel {
 public:
  using Scalar = S;

  LinearModel(Index num_inputs, Index num_outputs) : inputs_(num_inputs), outputs_(num_outputs) {
    detail::require_positive("LinearModel", "num_inputs", num_inputs);
    detail::require_positive("LinearModel", "num_outputs", num_outputs);
  }

  Index num_inputs() const { return inputs_; }
  Index num_outputs() const { return outputs_; }
  Index num_params() const { return inputs_ * outputs_ + outputs_; }

  Vector<S> init_params(std::uint64_t seed) const {
    Vector<S> theta(num_params());
    detail::SplitMix64 rng(seed);
    detail::glorot_uniform<S>(theta, inputs_, outputs_, rng);
    return theta;
  }

  // Views of W (D x C, row-major) and b (C) inside theta.
  Eigen::Map<const RowMatrix<S>> weights(const Eigen::Ref<const Vector<S>>& theta) const {
    return {theta.data(), inputs_, outputs_};
  }
  Eigen::Map<const Eigen::Matrix<S, 1, Eigen::Dynamic>> bias(const Eigen::Ref<const Vector<S>>& theta) const {
    return {theta.data() + inputs_ * outputs_, outputs_};
  }

  // Z = X W + b (overwrites Z, N x C).
  template <class DX>
  void predict(const Eigen::Ref<const Vector<S>>& theta, const Eigen::MatrixBase<DX>& X,
               Eigen::Ref<RowMatrix<S>> Z) const {
    check("LinearModel::predict", theta, X.rows(), X.cols());
    detail::require_size("LinearModel::predict", "Z", Z.rows(), X.rows(), "rows (rows of X)");
    detail::require_size("LinearModel::predict", "Z", Z.cols(), outputs_, "columns (num_outputs)");
    Z.noalias() = X * weights(theta);
    Z.rowwise() += bias(theta);
  }

  // dtheta = [vec(X^T dZ) ; colsum(dZ)] (overwrites dtheta).
  template <class DX, class DZ>
  void vjp_params(const Eigen::Ref<const Vector<S>>& theta, const Eigen::MatrixBase<DX>& X,
                  const Eigen::MatrixBase<DZ>& dZ, Eigen::Ref<Vector<S>> dtheta) const {
    check("LinearModel::vjp_params", theta, X.rows(), X.cols());
    check_dZ("LinearModel::vjp_params", dZ.rows(), dZ.cols(), X.rows());
    detail::require_size("LinearModel::vjp_params", "dtheta", dtheta.size(), num_params(), "entries (num_params)");
    Eigen::Map<RowMatrix<S>>(dtheta.data(), inputs_, outputs_).noalias() = X.transpose() * dZ;
    dtheta.tail(outputs_) = dZ.colwise().sum().transpose();
  }

  // dX = dZ W^T (overwrites dX, N x D).
  template <class DX, class DZ>
  void vjp_inputs(const Eigen::Ref<const Vector<S>>& theta, const Eigen::MatrixBase<DX>& X,
                  const Eigen::MatrixBase<DZ>& dZ, Eigen::Ref<RowMatrix<S>> dX) const {
    check("LinearModel::vjp_inputs", theta, X.rows(), X.cols());
    check_dZ("LinearModel::vjp_inputs", dZ.rows(), dZ.cols(), X.rows());
    detail::require_size("LinearModel::vjp_inputs", "dX", dX.rows(), X.rows(), "rows (rows of X)");
    detail::require_size("LinearModel::vjp_inputs", "dX", dX.cols(), inputs_, "columns (num_inputs)");
    dX.noalias() = dZ * weights(theta).transpose();
  }

 private:
  void check(const char* function, const Eigen::Ref<const Vector<S>>& theta, Index rows, Index cols) const {
    detail::require_size(function, "theta", theta.size(), num_params(), "entries (num_params)");
    detail::require_size(function, "X", cols, inputs_, "columns (num_inputs)");
    detail::require_nonempty(function, "X", rows);
  }
  void check_dZ(const char* function, Index rows, Index cols, Index x_rows) const {
    detail::require_size(function, "dZ", rows, x_rows, "rows (rows of X)");
    detail::require_size(function, "dZ", cols, outputs_, "columns (num_outputs)");
  }

  Index inputs_;
  Index outputs_;
};

}  // namespace gradus
