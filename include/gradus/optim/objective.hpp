#pragma once
// A model composed with a loss over its predictions: the objective the optimizers minimize.
//
//   F(theta) = loss(f(theta; X), y) + (l2 / 2) ||theta||^2
//   grad F   = J_theta^T dloss/dZ + l2 theta                (one predict, one vjp)
//
// Mean semantics: with a loss reduced by its mean over rows (the default of gradus losses),
// F is the mean over samples, and the minibatch form value_and_grad(theta, batch, g) is the
// same mean over the rows in `batch`, an unbiased estimate of F and grad F. (ensmallen's
// minibatch functions return sums; gradus objectives never do.)
//
//   auto objective = gradus::make_objective(model, gradus::CrossEntropyLoss<float>{}, X, y, {.l2 = 1e-4});
//   float value = objective.value_and_grad(theta, grad);
//
// The objective owns copies of the model, loss and data (std::move them in to avoid the copy)
// and scratch for predictions, so one object serves one thread at a time.
// (The class is ModelObjective because gradus::Objective names the concept it satisfies.)

#include <span>
#include <utility>

#include "gradus/core/concepts.hpp"
#include "gradus/core/errors.hpp"
#include "gradus/core/types.hpp"

namespace gradus {

template <class S>
struct ObjectiveOptions {
  S l2 = 0;  // coefficient of (l2 / 2) ||theta||^2 (every parameter, bias included)
};

template <Model M, PredictionLoss L>
  requires std::same_as<typename M::Scalar, typename L::Scalar>
class ModelObjective {
 public:
  using Scalar = typename M::Scalar;
  using S = Scalar;

  ModelObjective(M model, L loss, RowMatrix<S> X, Labels y, ObjectiveOptions<S> options = {})
      : model_(std::move(model)), loss_(std::move(loss)), X_(std::move(X)), y_(std::move(y)), options_(options) {
    detail::require_nonempty("ModelObjective", "X", X_.rows());
    detail::require_size("ModelObjective", "X", X_.cols(), model_.num_inputs(), "columns (model num_inputs)");
    detail::require_size("ModelObjective", "y", y_.size(), X_.rows(), "entries (rows of X)");
    detail::require_finite_nonnegative("ModelObjective", "options.l2", options_.l2);
  }

  Index dim() const { return model_.num_params(); }
  Index num_samples() const { return X_.rows(); }

  const M& model() const { return model_; }
  const L& loss() const { return loss_; }
  const RowMatrix<S>& X() const { return X_; }
  const Labels& y() const { return y_; }
  const ObjectiveOptions<S>& options() const { return options_; }

  // Full data.
  S value(const Eigen::Ref<const Vector<S>>& theta) const {
    check_theta("ModelObjective::value", theta);
    predict(theta, X_);
    return loss_.value(Z_, y_) + regularizer(theta);
  }

  S value_and_grad(const Eigen::Ref<const Vector<S>>& theta, Eigen::Ref<Vector<S>> g) const {
    check("ModelObjective::value_and_grad", theta, g);
    return evaluate(theta, X_, y_, g);
  }

  // The rows listed in batch (repeats allowed), mean over them.
  S value_and_grad(const Eigen::Ref<const Vector<S>>& theta, std::span<const Index> batch,
                   Eigen::Ref<Vector<S>> g) const {
    check("ModelObjective::value_and_grad", theta, g);
    gather(batch);
    return evaluate(theta, X_batch_, y_batch_, g);
  }

  // Copies the rows listed in batch into batch_X() / batch_y() (validated).
  void gather(std::span<const Index> batch) const {
    detail::require_nonempty("ModelObjective::value_and_grad", "batch", static_cast<Index>(batch.size()), "indices");
    for (const Index row : batch) {
      detail::require_in_range("ModelObjective::value_and_grad", "batch", row, Index(0), X_.rows());
    }
    X_batch_.resize(static_cast<Index>(batch.size()), X_.cols());
    y_batch_.resize(static_cast<Index>(batch.size()));
    for (std::size_t i = 0; i < batch.size(); ++i) {
      X_batch_.row(static_cast<Index>(i)) = X_.row(batch[i]);
      y_batch_(static_cast<Index>(i)) = y_(batch[i]);
    }
  }
  const RowMatrix<S>& batch_X() const { return X_batch_; }
  const Labels& batch_y() const { return y_batch_; }

  S regularizer(const Eigen::Ref<const Vector<S>>& theta) const {
    return options_.l2 == S(0) ? S(0) : S(0.5) * options_.l2 * theta.squaredNorm();
  }
  void add_regularizer_grad(const Eigen::Ref<const Vector<S>>& theta, Eigen::Ref<Vector<S>> g) const {
    if (options_.l2 != S(0)) g += options_.l2 * theta;
  }

 private:
  void check_theta(const char* function, const Eigen::Ref<const Vector<S>>& theta) const {
    detail::require_size(function, "theta", theta.size(), dim(), "entries (dim)");
  }
  void check(const char* function, const Eigen::Ref<const Vector<S>>& theta, const Eigen::Ref<Vector<S>>& g) const {
    check_theta(function, theta);
    detail::require_size(function, "g", g.size(), dim(), "entries (dim)");
  }

  void predict(const Eigen::Ref<const Vector<S>>& theta, const RowMatrix<S>& X) const {
    Z_.resize(X.rows(), model_.num_outputs());
    model_.predict(theta, X, Z_);
  }

  S evaluate(const Eigen::Ref<const Vector<S>>& theta, const RowMatrix<S>& X, const Labels& y,
             Eigen::Ref<Vector<S>> g) const {
    predict(theta, X);
    dZ_.resize(Z_.rows(), Z_.cols());
    const S value = loss_.value_and_grad(Z_, y, dZ_);
    model_.vjp_params(theta, X, dZ_, g);
    add_regularizer_grad(theta, g);
    return value + regularizer(theta);
  }

  M model_;
  L loss_;
  RowMatrix<S> X_;
  Labels y_;
  ObjectiveOptions<S> options_;
  mutable RowMatrix<S> Z_, dZ_, X_batch_;
  mutable Labels y_batch_;
};

template <Model M, PredictionLoss L>
  requires std::same_as<typename M::Scalar, typename L::Scalar>
ModelObjective<M, L> make_objective(M model, L loss, RowMatrix<typename M::Scalar> X, Labels y,
                                    ObjectiveOptions<typename M::Scalar> options = {}) {
  return {std::move(model), std::move(loss), std::move(X), std::move(y), options};
}

}  // namespace gradus
