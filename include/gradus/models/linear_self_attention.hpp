#pragma once
// A single-layer linear self-attention policy for online learning, the model of the regret-loss
// paper (Park, Liu, Ozdaglar, Zhang, ICLR 2025, Sec. 5). The logits of round t attend, without a
// softmax, over the tokens of the rounds before it:
//   z_t = sum_{i<t} (V x_i) (x_i . w),   x_i = (l_i, 1) in R^{d+1},   pi_t = softmax(z_t),
// with V in R^{d x (d+1)} the value map and w = K^T Q c in R^{d+1}: key and query enter only through
// their product with the constant query token c, so the model learns that vector directly (the
// same function class, without the redundant factorisation). The constant coordinate of the tokens
// lets z be linear in the losses: V = [-eta I | 0], w = e_{d+1} is Hedge with rate eta
// (hedge_params). z_1 = 0: the first round plays uniform.
//
// Parameters, one flat vector: V row-major (d (d+1) entries), then w (d+1).
// Inputs X: k sequences of T loss vectors stacked as (k T) x d rows (the layout of
// losses/regret.hpp); outputs Z: logits of the same shape, row t those of round t.
// Vector-Jacobian products, with G_i = sum_{t>i} dZ_t in the same sequence, s_i = x_i . w,
// y_i = V x_i, c_i = y_i . G_i, and V_l, w_l the loss parts of V and w (without the constant):
//   dV = sum_i s_i G_i x_i^T,   dw = sum_i c_i x_i,   dl_i = s_i V_l^T G_i + c_i w_l.

#include <string_view>

#include <Eigen/Core>

#include "gradus/core/errors.hpp"
#include "gradus/core/types.hpp"
#include "gradus/losses/regret.hpp"

namespace gradus {

struct LinearSelfAttentionOptions {
  Index actions = 0;  // d
  Index rounds = 0;   // T
};

template <class S>
class LinearSelfAttentionPolicy {
 public:
  using Scalar = S;
  using Options = LinearSelfAttentionOptions;

  explicit LinearSelfAttentionPolicy(Options options) : d_(options.actions), T_(options.rounds) {
    detail::require_positive("LinearSelfAttentionPolicy", "options.actions", d_);
    detail::require_positive("LinearSelfAttentionPolicy", "options.rounds", T_);
  }

  Index num_params() const { return (d_ + 1) * (d_ + 1); }
  Index num_inputs() const { return d_; }
  Index num_outputs() const { return d_; }
  Index actions() const { return d_; }
  Index rounds() const { return T_; }

  // The parameters that play Hedge with learning rate eta: z_t = -eta sum_{i<t} l_i.
  Vector<S> hedge_params(S eta) const {
    Vector<S> theta = Vector<S>::Zero(num_params());
    Eigen::Map<RowMatrix<S>>(theta.data(), d_, d_ + 1).leftCols(d_).diagonal().setConstant(-eta);
    theta(num_params() - 1) = 1;
    return theta;
  }

  // Z: the logits, (k T) x d; it must not alias X.
  void predict(const Eigen::Ref<const Vector<S>>& theta, const Eigen::Ref<const RowMatrix<S>>& X,
               Eigen::Ref<RowMatrix<S>> Z) const {
    check("LinearSelfAttentionPolicy::predict", theta, X);
    detail::require_shape("LinearSelfAttentionPolicy::predict", "Z", Z.rows(), Z.cols(), X.rows(), d_);
    Vector<S> s(X.rows());
    attend(theta, X, Z, s);
    Z.array().colwise() *= s.array();  // token i's increment (V x_i) s_i
    detail::exclusive_sums<S>(Z, T_);
  }

  // dtheta = J_theta^T dZ.
  void vjp_params(const Eigen::Ref<const Vector<S>>& theta, const Eigen::Ref<const RowMatrix<S>>& X,
                  const Eigen::Ref<const RowMatrix<S>>& dZ, Eigen::Ref<Vector<S>> dtheta) const {
    detail::require_size("LinearSelfAttentionPolicy::vjp_params", "dtheta", dtheta.size(), num_params(),
                         "entries (num_params)");
    const Backward b = backward("LinearSelfAttentionPolicy::vjp_params", theta, X, dZ);
    Eigen::Map<RowMatrix<S>> dV(dtheta.data(), d_, d_ + 1);
    dV.leftCols(d_).noalias() = b.sG.transpose() * X;
    dV.col(d_) = b.sG.colwise().sum().transpose();
    dtheta.segment(d_ * (d_ + 1), d_).noalias() = X.transpose() * b.c;
    dtheta(num_params() - 1) = b.c.sum();
  }

  // dX = J_X^T dZ.
  void vjp_inputs(const Eigen::Ref<const Vector<S>>& theta, const Eigen::Ref<const RowMatrix<S>>& X,
                  const Eigen::Ref<const RowMatrix<S>>& dZ, Eigen::Ref<RowMatrix<S>> dX) const {
    detail::require_shape("LinearSelfAttentionPolicy::vjp_inputs", "dX", dX.rows(), dX.cols(), X.rows(), d_);
    const Backward b = backward("LinearSelfAttentionPolicy::vjp_inputs", theta, X, dZ);
    dX.noalias() = b.sG * value_map(theta).leftCols(d_);
    dX.noalias() += b.c * query(theta).head(d_).transpose();
  }

 private:
  struct Backward {
    RowMatrix<S> sG;  // rows s_i G_i
    Vector<S> c;      // c_i = (V x_i) . G_i
  };

  Eigen::Map<const RowMatrix<S>> value_map(const Eigen::Ref<const Vector<S>>& theta) const {
    return {theta.data(), d_, d_ + 1};
  }
  auto query(const Eigen::Ref<const Vector<S>>& theta) const { return theta.tail(d_ + 1); }

  // Per token: its value Y_i = V x_i and its attention score s_i = x_i . w.
  void attend(const Eigen::Ref<const Vector<S>>& theta, const Eigen::Ref<const RowMatrix<S>>& X,
              Eigen::Ref<RowMatrix<S>> Y, Eigen::Ref<Vector<S>> s) const {
    const auto V = value_map(theta);
    const auto w = query(theta);
    Y.noalias() = X * V.leftCols(d_).transpose();
    Y.rowwise() += V.col(d_).transpose();
    s.noalias() = X * w.head(d_);
    s.array() += w(d_);
  }

  void check(std::string_view function, const Eigen::Ref<const Vector<S>>& theta,
             const Eigen::Ref<const RowMatrix<S>>& X) const {
    detail::require_size(function, "theta", theta.size(), num_params(), "entries (num_params)");
    detail::require_sequences(function, "X", X.rows(), X.cols(), T_);
    detail::require_size(function, "X", X.cols(), d_, "columns (actions)");
  }

  Backward backward(std::string_view function, const Eigen::Ref<const Vector<S>>& theta,
                    const Eigen::Ref<const RowMatrix<S>>& X, const Eigen::Ref<const RowMatrix<S>>& dZ) const {
    check(function, theta, X);
    detail::require_shape(function, "dZ", dZ.rows(), dZ.cols(), X.rows(), d_);
    RowMatrix<S> Y(X.rows(), d_);
    Vector<S> s(X.rows());
    attend(theta, X, Y, s);
    Backward b{dZ, Vector<S>(X.rows())};
    detail::exclusive_sums<S>(b.sG, T_, /*reversed=*/true);  // G
    b.c = Y.cwiseProduct(b.sG).rowwise().sum();
    b.sG.array().colwise() *= s.array();
    return b;
  }

  Index d_;
  Index T_;
};

}  // namespace gradus
