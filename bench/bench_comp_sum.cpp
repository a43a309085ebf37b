// Comp-sum forward + backward (cross-entropy, float, one thread): the fused kernel against
// memcpy of the same bytes (read logits, write the gradient), the naive Eigen expression
// (softmax through temporaries) and libtorch's cross_entropy + backward when available.

#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include <gradus/losses/comp_sum.hpp>

#include "bench_common.hpp"

#ifdef GRADUS_HAVE_TORCH
#include <torch/torch.h>
#endif

namespace {

using gradus::Index;
using Matrix = gradus::RowMatrix<float>;

struct Problem {
  Matrix logits;
  gradus::Labels labels;
  Matrix grad;
};

Problem make_problem(Index n, Index c) {
  std::mt19937 rng(42);
  std::normal_distribution<float> normal(0.0f, 2.0f);
  std::uniform_int_distribution<int> pick(0, int(c) - 1);
  Problem p{Matrix(n, c), gradus::Labels(n), Matrix(n, c)};
  for (Index k = 0; k < p.logits.size(); ++k) p.logits.data()[k] = normal(rng);
  for (Index i = 0; i < n; ++i) p.labels(i) = pick(rng);
  return p;
}

void report(benchmark::State& state, Index n, Index c) {
  const auto bytes = std::int64_t(2 * sizeof(float)) * n * c;  // logits read + gradient written
  state.SetBytesProcessed(std::int64_t(state.iterations()) * bytes);
  state.SetItemsProcessed(std::int64_t(state.iterations()) * n * c);
}

void fused(benchmark::State& state, Index n, Index c) {
  auto p = make_problem(n, c);
  const gradus::CrossEntropyLoss<float> loss;
  for (auto _ : state) {
    benchmark::DoNotOptimize(loss.value_and_grad(p.logits, p.labels, p.grad));
    benchmark::ClobberMemory();
  }
  report(state, n, c);
}

// What one writes without a kernel: softmax through temporaries, then the gradient.
void naive(benchmark::State& state, Index n, Index c) {
  auto p = make_problem(n, c);
  for (auto _ : state) {
    const Eigen::VectorXf max = p.logits.rowwise().maxCoeff();
    const Matrix exp = (p.logits.colwise() - max).array().exp();
    const Eigen::VectorXf sum = exp.rowwise().sum();
    p.grad = exp.array().colwise() / sum.array();
    float value = 0;
    for (Index i = 0; i < n; ++i) {
      value -= std::log(p.grad(i, p.labels(i)));
      p.grad(i, p.labels(i)) -= 1;
    }
    p.grad /= float(n);
    benchmark::DoNotOptimize(value / float(n));
    benchmark::ClobberMemory();
  }
  report(state, n, c);
}

void copy(benchmark::State& state, Index n, Index c) {
  gradus::bench::memcpy_bound(state, sizeof(float) * std::size_t(n * c));
  state.SetItemsProcessed(std::int64_t(state.iterations()) * n * c);
}

#ifdef GRADUS_HAVE_TORCH
void libtorch(benchmark::State& state, Index n, Index c) {
  at::set_num_threads(1);
  auto p = make_problem(n, c);
  std::vector<std::int64_t> labels(p.labels.data(), p.labels.data() + n);
  const auto logits = torch::from_blob(p.logits.data(), {n, c}, torch::kFloat).requires_grad_(true);
  const auto targets = torch::from_blob(labels.data(), {n}, torch::kLong);
  for (auto _ : state) {
    logits.mutable_grad() = torch::Tensor();
    auto value = torch::nn::functional::cross_entropy(logits, targets);
    value.backward();
    benchmark::DoNotOptimize(logits.grad().data_ptr());
  }
  report(state, n, c);
}
#endif

const bool registered = [] {
  struct Shape {
    Index n, c;
  };
  const std::vector<Shape> shapes = gradus::bench::smoke()
                                        ? std::vector<Shape>{{1024, 10}, {64, 100}, {8, 3200}}
                                        : std::vector<Shape>{{1048576, 10}, {4096, 1000}, {512, 32000}};
  for (const auto& [n, c] : shapes) {
    const std::string shape = std::to_string(n) + "x" + std::to_string(c);
    benchmark::RegisterBenchmark(("comp_sum/fused/" + shape).c_str(), fused, n, c);
    benchmark::RegisterBenchmark(("comp_sum/memcpy/" + shape).c_str(), copy, n, c);
    benchmark::RegisterBenchmark(("comp_sum/naive/" + shape).c_str(), naive, n, c);
#ifdef GRADUS_HAVE_TORCH
    benchmark::RegisterBenchmark(("comp_sum/libtorch/" + shape).c_str(), libtorch, n, c);
#endif
  }
  return true;
}();

}  // namespace

GRADUS_BENCH_MAIN({"fused", "memcpy"}, {"fused", "naive"}, {"fused", "libtorch"})
