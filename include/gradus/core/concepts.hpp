#pragma once
// The protocols gradus types follow, stated as C++20 concepts so that misuse fails
// with a readable error at the call site rather than deep inside a template.

#include <concepts>
#include <span>

#include "gradus/core/types.hpp"

namespace gradus {

// A loss: exposes its scalar type and `S value(inputs...) const`.
//   static_assert(gradus::Loss<CrossEntropyLoss<float>, RowMatrix<float>, Labels>);
template <class L, class... Inputs>
concept Loss = requires(const L& loss, const Inputs&... inputs) {
  typename L::Scalar;
  { loss.value(inputs...) } -> std::convertible_to<typename L::Scalar>;
};

// A loss over model predictions Z (N x C) and labels y (N): the shape a model composes
// with. value_and_grad overwrites dZ with the gradient of the reduced loss.
template <class L>
concept PredictionLoss =
    requires(const L& loss, const RowMatrix<typename L::Scalar>& Z, const Labels& y,
             Eigen::Ref<RowMatrix<typename L::Scalar>> dZ) {
      { loss.value(Z, y) } -> std::convertible_to<typename L::Scalar>;
      { loss.value_and_grad(Z, y, dZ) } -> std::convertible_to<typename L::Scalar>;
    };

// A differentiable model Z = f(theta; X) with its parameters in one flat vector.
// Vector-Jacobian products overwrite their output: dtheta = J_theta^T dZ, dX = J_X^T dZ.
template <class M>
concept Model = requires(const M& model, const Vector<typename M::Scalar>& theta,
                         const RowMatrix<typename M::Scalar>& X, Eigen::Ref<RowMatrix<typename M::Scalar>> Z,
                         const RowMatrix<typename M::Scalar>& dZ, Eigen::Ref<Vector<typename M::Scalar>> dtheta,
                         Eigen::Ref<RowMatrix<typename M::Scalar>> dX) {
  { model.num_params() } -> std::convertible_to<Index>;
  { model.num_inputs() } -> std::convertible_to<Index>;
  { model.num_outputs() } -> std::convertible_to<Index>;
  model.predict(theta, X, Z);
  model.vjp_params(theta, X, dZ, dtheta);
  model.vjp_inputs(theta, X, dZ, dX);
};

// A smooth objective over a flat parameter vector, with mean (not sum) semantics.
template <class F>
concept Objective = requires(F& f, const Vector<typename F::Scalar>& x, Eigen::Ref<Vector<typename F::Scalar>> g) {
  { f.dim() } -> std::convertible_to<Index>;
  { f.value_and_grad(x, g) } -> std::convertible_to<typename F::Scalar>;
};

// An objective that is a mean over samples and can be evaluated on a minibatch of them.
template <class F>
concept MinibatchObjective =
    Objective<F> && requires(F& f, const Vector<typename F::Scalar>& x, std::span<const Index> batch,
                             Eigen::Ref<Vector<typename F::Scalar>> g) {
      { f.num_samples() } -> std::convertible_to<Index>;
      { f.value_and_grad(x, batch, g) } -> std::convertible_to<typename F::Scalar>;
    };

}  // namespace gradus
