#pragma once
// An EF21 client whose gradient throws from a given call on, for the MPI tests of a failing rank.

#include <stdexcept>

#include <Eigen/Core>

#include <gradus/optim/ef21/logistic.hpp>

struct FailingClient {
  using Scalar = double;
  gradus::ef21::NonconvexLogistic<double> inner;
  int fail_after;
  int calls = 0;
  gradus::Index dim() const { return inner.dim(); }
  double value_and_grad(const Eigen::VectorXd& x, Eigen::Ref<Eigen::VectorXd> g) {
    if (++calls > fail_after) throw std::runtime_error("disk read failed on client");
    return inner.value_and_grad(x, g);
  }
};
