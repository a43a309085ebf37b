#pragma once
// Losses over the same predictions compose linearly: `0.7 * ce + 0.3 * anyloss` is itself
// a PredictionLoss whose value and gradient are the weighted sums of its parts.

#include <utility>

#include "gradus/core/concepts.hpp"
#include "gradus/core/types.hpp"

namespace gradus {

template <PredictionLoss L>
struct ScaledLoss {
  using Scalar = typename L::Scalar;
  L loss;
  Scalar weight;

  template <class DZ, class DY>
  Scalar value(const Eigen::MatrixBase<DZ>& Z, const Eigen::MatrixBase<DY>& y) const {
    return weight * loss.value(Z, y);
  }
  template <class DZ, class DY>
  Scalar value_and_grad(const Eigen::MatrixBase<DZ>& Z, const Eigen::MatrixBase<DY>& y,
                        Eigen::Ref<RowMatrix<Scalar>> dZ) const {
    const Scalar v = loss.value_and_grad(Z, y, dZ);
    dZ *= weight;
    return weight * v;
  }
};

template <PredictionLoss A, PredictionLoss B>
  requires std::same_as<typename A::Scalar, typename B::Scalar>
struct LossSum {
  using Scalar = typename A::Scalar;
  A first;
  B second;

  LossSum(A a, B b) : first(std::move(a)), second(std::move(b)) {}

  template <class DZ, class DY>
  Scalar value(const Eigen::MatrixBase<DZ>& Z, const Eigen::MatrixBase<DY>& y) const {
    return first.value(Z, y) + second.value(Z, y);
  }
  template <class DZ, class DY>
  Scalar value_and_grad(const Eigen::MatrixBase<DZ>& Z, const Eigen::MatrixBase<DY>& y,
                        Eigen::Ref<RowMatrix<Scalar>> dZ) const {
    const Scalar v = first.value_and_grad(Z, y, dZ);
    scratch_.resize(dZ.rows(), dZ.cols());  // no-op after the first call at a given shape
    const Scalar w = second.value_and_grad(Z, y, scratch_);
    dZ += scratch_;
    return v + w;
  }

 private:
  mutable RowMatrix<Scalar> scratch_;
};

template <PredictionLoss L>
ScaledLoss<L> operator*(typename L::Scalar weight, L loss) {
  return {std::move(loss), weight};
}

template <PredictionLoss A, PredictionLoss B>
  requires std::same_as<typename A::Scalar, typename B::Scalar>
LossSum<A, B> operator+(A first, B second) {
  return {std::move(first), std::move(second)};
}

}  // namespace gradus
