// Regret-loss forward + backward from policy logits (float, one thread), the training path of
// the regret-loss example: gradus::RegretLoss against the naive Eigen expression (softmax,
// regrets and gradient through whole-matrix temporaries) and memcpy of the same bytes (read
// losses and logits, write the gradient). Shapes: k sequences x T rounds x d actions.

#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include <gradus/losses/regret.hpp>

#include "bench_common.hpp"

namespace {

using gradus::Index;
using Matrix = gradus::RowMatrix<float>;
using Vector = gradus::Vector<float>;

struct Problem {
  Matrix losses, logits, grad;
};

Problem make_problem(Index k, Index T, Index d) {
  std::mt19937 rng(42);
  std::uniform_real_distribution<float> uniform(0.0f, 1.0f);
  std::normal_distribution<float> normal(0.0f, 2.0f);
  Problem p{Matrix(k * T, d), Matrix(k * T, d), Matrix(k * T, d)};
  for (Index i = 0; i < p.losses.size(); ++i) {
    p.losses.data()[i] = uniform(rng);
    p.logits.data()[i] = normal(rng);
  }
  return p;
}

void report(benchmark::State& state, Index k, Index T, Index d) {
  state.SetBytesProcessed(std::int64_t(state.iterations()) * std::int64_t(3 * sizeof(float)) * k * T * d);
  state.SetItemsProcessed(std::int64_t(state.iterations()) * k * T * d);
}

void gradus_loss(benchmark::State& state, Index k, Index T, Index d) {
  auto p = make_problem(k, T, d);
  const gradus::RegretLoss<float> loss({.N = 1, .from_logits = true});
  for (auto _ : state) {
    benchmark::DoNotOptimize(loss.value_and_grad(p.losses, p.logits, T, p.grad));
    benchmark::ClobberMemory();
  }
  report(state, k, T, d);
}

// What one writes without the loss: the same math through whole-matrix temporaries.
void naive(benchmark::State& state, Index k, Index T, Index d) {
  auto p = make_problem(k, T, d);
  const float N = 1;
  for (auto _ : state) {
    const Vector max = p.logits.rowwise().maxCoeff();
    const Matrix exp = (p.logits.colwise() - max).array().exp();
    const Matrix pi = exp.array().colwise() / exp.rowwise().sum().array();
    const Vector learner = p.losses.cwiseProduct(pi).rowwise().sum();
    Vector R(k);
    for (Index j = 0; j < k; ++j) {
      R(j) = learner.segment(j * T, T).sum() - p.losses.middleRows(j * T, T).colwise().sum().minCoeff();
    }
    const Vector h = R.cwiseMax(0).cwiseAbs2();
    Vector w = (N * (R.array() - R.maxCoeff())).exp();
    w /= w.sum();
    const float value = w.dot(h);
    const Vector dR = w.array() * (2 * R.cwiseMax(0).array() + N * (h.array() - value));
    const Vector per_row = dR.replicate(1, T).transpose().reshaped();  // dR of each row's sequence
    p.grad = (pi.array() * (p.losses.colwise() - learner).array()).colwise() * per_row.array();
    benchmark::DoNotOptimize(value);
    benchmark::ClobberMemory();
  }
  report(state, k, T, d);
}

void copy(benchmark::State& state, Index k, Index T, Index d) {
  gradus::bench::memcpy_bound(state, 3 * sizeof(float) * std::size_t(k * T * d) / 2);
  state.SetItemsProcessed(std::int64_t(state.iterations()) * k * T * d);
}

const bool registered = [] {
  struct Shape {
    Index k, T, d;
  };
  const std::vector<Shape> shapes = gradus::bench::smoke() ? std::vector<Shape>{{4, 5, 5}, {8, 10, 33}}
                                                           : std::vector<Shape>{{64, 25, 5}, {256, 100, 64}};
  for (const auto& [k, T, d] : shapes) {
    const std::string shape = std::to_string(k) + "x" + std::to_string(T) + "x" + std::to_string(d);
    benchmark::RegisterBenchmark(("regret/gradus/" + shape).c_str(), gradus_loss, k, T, d);
    benchmark::RegisterBenchmark(("regret/memcpy/" + shape).c_str(), copy, k, T, d);
    benchmark::RegisterBenchmark(("regret/naive/" + shape).c_str(), naive, k, T, d);
  }
  return true;
}();

}  // namespace

GRADUS_BENCH_MAIN({"gradus", "memcpy"}, {"gradus", "naive"})
