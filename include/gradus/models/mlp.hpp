#pragma once
// Multilayer perceptron: dense layers with one hidden activation, linear output layer.
//
//   A_0 = X,   A_l = act(A_{l-1} W_l + b_l)  (l = 1..L-1),   Z = A_{L-1} W_L + b_L
//
// act is tanh, ReLU (max(t, 0)) or sigmoid (1 / (1 + exp(-t))). Parameters are the layers'
// LinearModel parameters concatenated, [W_1 ; b_1 ; W_2 ; b_2 ; ...]. The vector-Jacobian
// products run the forward pass again and back-propagate, using act'(t) written in terms
// of a = act(t): 1 - a^2 (tanh), [a > 0] (ReLU), a (1 - a) (sigmoid).
//
//   gradus::MLP<float> net({64, 32, 10}, gradus::Activation::ReLU);   // 64 -> 32 -> 10
//
// The object keeps per-call scratch (the activations) to avoid allocation on repeated
// calls: share one MLP between threads only for reading its shape.

#include <cstdint>
#include <initializer_list>
#include <string_view>
#include <vector>

#include "gradus/core/errors.hpp"
#include "gradus/core/types.hpp"
#include "gradus/models/linear.hpp"

namespace gradus {

enum class Activation { Tanh, ReLU, Sigmoid };

template <class S>
class MLP {
 public:
  using Scalar = S;

  // layer_sizes = {num_inputs, hidden..., num_outputs}: at least two entries, all > 0.
  MLP(std::vector<Index> layer_sizes, Activation activation) : activation_(activation) {
    detail::require_enumerator("MLP", "activation", activation, 3);
    detail::require(layer_sizes.size() >= 2, "MLP", "layer_sizes", "at least 2 sizes (inputs, outputs)",
                    static_cast<long long>(layer_sizes.size()));
    for (std::size_t l = 0; l + 1 < layer_sizes.size(); ++l) {
      layers_.emplace_back(layer_sizes[l], layer_sizes[l + 1]);  // validates the sizes
      offsets_.push_back(num_params_);
      num_params_ += layers_.back().num_params();
    }
    detail::require_positive("MLP", "layer_sizes", layer_sizes.back());
    activations_.resize(layers_.size() - 1);
  }
  MLP(std::initializer_list<Index> layer_sizes, Activation activation)
      : MLP(std::vector<Index>(layer_sizes), activation) {}

  Index num_inputs() const { return layers_.front().num_inputs(); }
  Index num_outputs() const { return layers_.back().num_outputs(); }
  Index num_params() const { return num_params_; }
  Index num_layers() const { return static_cast<Index>(layers_.size()); }
  Activation activation() const { return activation_; }

  // Glorot-uniform weights and zero biases, layer by layer from one seeded stream.
  Vector<S> init_params(std::uint64_t seed) const {
    Vector<S> theta(num_params_);
    detail::SplitMix64 rng(seed);
    for (std::size_t l = 0; l < layers_.size(); ++l) {
      detail::glorot_uniform<S>(params_of(theta, l), layers_[l].num_inputs(), layers_[l].num_outputs(), rng);
    }
    return theta;
  }

  template <class DX>
  void predict(const Eigen::Ref<const Vector<S>>& theta, const Eigen::MatrixBase<DX>& X,
               Eigen::Ref<RowMatrix<S>> Z) const {
    check("MLP::predict", theta, X.rows(), X.cols());
    forward(theta, X);
    const auto& output = layers_.back();
    if (activations_.empty()) {
      output.predict(params_of(theta, layers_.size() - 1), X, Z);
    } else {
      output.predict(params_of(theta, layers_.size() - 1), activations_.back(), Z);
    }
  }

  template <class DX, class DZ>
  void vjp_params(const Eigen::Ref<const Vector<S>>& theta, const Eigen::MatrixBase<DX>& X,
                  const Eigen::MatrixBase<DZ>& dZ, Eigen::Ref<Vector<S>> dtheta) const {
    check("MLP::vjp_params", theta, X.rows(), X.cols());
    detail::require_size("MLP::vjp_params", "dtheta", dtheta.size(), num_params_, "entries (num_params)");
    backward("MLP::vjp_params", theta, X, dZ, &dtheta, nullptr);
  }

  template <class DX, class DZ>
  void vjp_inputs(const Eigen::Ref<const Vector<S>>& theta, const Eigen::MatrixBase<DX>& X,
                  const Eigen::MatrixBase<DZ>& dZ, Eigen::Ref<RowMatrix<S>> dX) const {
    check("MLP::vjp_inputs", theta, X.rows(), X.cols());
    detail::require_size("MLP::vjp_inputs", "dX", dX.rows(), X.rows(), "rows (rows of X)");
    detail::require_size("MLP::vjp_inputs", "dX", dX.cols(), num_inputs(), "columns (num_inputs)");
    backward("MLP::vjp_inputs", theta, X, dZ, nullptr, &dX);
  }

 private:
  // Layer l's slice of a flat parameter (or gradient) vector.
  template <class V>
  auto params_of(V& theta, std::size_t l) const {
    return theta.segment(offsets_[l], layers_[l].num_params());
  }

  void check(std::string_view function, const Eigen::Ref<const Vector<S>>& theta, Index rows, Index cols) const {
    detail::require_size(function, "theta", theta.size(), num_params_, "entries (num_params)");
    detail::require_size(function, "X", cols, num_inputs(), "columns (num_inputs)");
    detail::require_nonempty(function, "X", rows);
  }

  // Fills activations_[l] = A_{l+1} for every hidden layer.
  template <class DX>
  void forward(const Eigen::Ref<const Vector<S>>& theta, const Eigen::MatrixBase<DX>& X) const {
    for (std::size_t l = 0; l + 1 < layers_.size(); ++l) {
      RowMatrix<S>& A = activations_[l];
      A.resize(X.rows(), layers_[l].num_outputs());
      if (l == 0) {
        layers_[l].predict(params_of(theta, l), X, A);
      } else {
        layers_[l].predict(params_of(theta, l), activations_[l - 1], A);
      }
      switch (activation_) {
        case Activation::Tanh: A = A.array().tanh(); break;
        case Activation::ReLU: A = A.array().max(S(0)); break;
        case Activation::Sigmoid: A = A.array().logistic(); break;
      }
    }
  }

  // delta *= act'(t), written in terms of a = act(t).
  void multiply_by_derivative(RowMatrix<S>& delta, const RowMatrix<S>& a) const {
    switch (activation_) {
      case Activation::Tanh: delta.array() *= S(1) - a.array().square(); break;
      case Activation::ReLU: delta = (a.array() > S(0)).select(delta, S(0)); break;
      case Activation::Sigmoid: delta.array() *= a.array() * (S(1) - a.array()); break;
    }
  }

  // Back-propagates dZ; writes the parameter gradient and/or the input gradient.
  template <class DX, class DZ>
  void backward(std::string_view function, const Eigen::Ref<const Vector<S>>& theta, const Eigen::MatrixBase<DX>& X,
                const Eigen::MatrixBase<DZ>& dZ, Eigen::Ref<Vector<S>>* dtheta, Eigen::Ref<RowMatrix<S>>* dX) const {
    detail::require_size(function, "dZ", dZ.rows(), X.rows(), "rows (rows of X)");
    detail::require_size(function, "dZ", dZ.cols(), num_outputs(), "columns (num_outputs)");
    forward(theta, X);
    delta_ = dZ;
    for (std::size_t l = layers_.size(); l-- > 0;) {
      const auto& layer = layers_[l];
      if (l == 0) {
        if (dtheta) layer.vjp_params(params_of(theta, 0), X, delta_, params_of(*dtheta, 0));
        if (dX) layer.vjp_inputs(params_of(theta, 0), X, delta_, *dX);
        break;
      }
      const RowMatrix<S>& input = activations_[l - 1];
      if (dtheta) layer.vjp_params(params_of(theta, l), input, delta_, params_of(*dtheta, l));
      previous_.resize(input.rows(), input.cols());
      layer.vjp_inputs(params_of(theta, l), input, delta_, previous_);
      multiply_by_derivative(previous_, input);
      delta_.swap(previous_);
    }
  }

  Activation activation_;
  std::vector<LinearModel<S>> layers_;
  std::vector<Index> offsets_;
  Index num_params_ = 0;
  mutable std::vector<RowMatrix<S>> activations_;
  mutable RowMatrix<S> delta_, previous_;
};

}  // namespace gradus
