#pragma once
// The vocabulary every gradus header speaks: batch-first row-major matrices, vectors,
// integer labels and the reduction of per-sample losses.

#include <Eigen/Core>

namespace gradus {

using Index = Eigen::Index;

// One sample per row (N x C). The same memory as a column-major C x N matrix, so
// column-per-sample users (mlpack, ensmallen) pass X.transpose() at no cost.
template <class S>
using RowMatrix = Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

template <class S>
using Vector = Eigen::Matrix<S, Eigen::Dynamic, 1>;

// Class index per row.
using Labels = Eigen::VectorXi;

// How per-sample losses become the scalar a loss returns.
enum class Reduction { Mean, Sum, None };

}  // namespace gradus
