// AnyLoss-F1 forward + backward on N = 1e6 binary logits (one thread, float and double): the
// fused kernel against memcpy of the same traffic (logits and int labels read, gradient
// written: a memcpy of half those bytes reads and writes as much) and the naive Eigen
// expression (sigmoid, A and the gradient through full-length temporaries). At 1e6 the
// memcpy runs from the last-level cache; N = 1e7 (float) is out of cache, where memcpy is
// bound by memory. One line for the multi-class macro-F1 against memcpy.

#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include <gradus/losses/anyloss.hpp>

#include "bench_common.hpp"

namespace {

using gradus::Index;

template <class S>
struct Problem {
  gradus::RowMatrix<S> logits;
  gradus::Labels labels;
  gradus::RowMatrix<S> grad;
};

// Logits N(0, 1), 10% positives, as in the authors' imbalanced synthetic set.
template <class S>
Problem<S> make_problem(Index n, Index c) {
  std::mt19937 rng(42);
  std::normal_distribution<S> normal(0, 1);
  std::uniform_real_distribution<double> u(0, 1);
  Problem<S> p{gradus::RowMatrix<S>(n, c), gradus::Labels(n), gradus::RowMatrix<S>(n, c)};
  for (Index k = 0; k < p.logits.size(); ++k) p.logits.data()[k] = normal(rng);
  for (Index i = 0; i < n; ++i) p.labels(i) = c == 1 ? int(u(rng) < 0.1) : int(u(rng) * double(c));
  return p;
}

template <class S>
void report(benchmark::State& state, Index n, Index c) {
  const auto bytes = std::int64_t(2 * sizeof(S)) * n * c + std::int64_t(sizeof(int)) * n;  // as copy<S>
  state.SetBytesProcessed(std::int64_t(state.iterations()) * bytes);
  state.SetItemsProcessed(std::int64_t(state.iterations()) * n * c);
}

template <class S>
void fused(benchmark::State& state, Index n, Index c) {
  auto p = make_problem<S>(n, c);
  const gradus::AnyLoss<S> loss({.metric = gradus::Metric::F1});
  for (auto _ : state) {
    benchmark::DoNotOptimize(loss.value_and_grad(p.logits, p.labels, p.grad));
    benchmark::ClobberMemory();
  }
  report<S>(state, n, c);
}

// What one writes without a kernel: F1's closed-form slope 2 (y D - TP) / D^2, D = 2 TP + FN + FP.
template <class S>
void naive(benchmark::State& state, Index n, Index c) {
  using Array = Eigen::Array<S, Eigen::Dynamic, 1>;
  auto p = make_problem<S>(n, c);
  const S L = 73;
  for (auto _ : state) {
    const Array prob = (1 + (-p.logits.array()).exp()).inverse();
    const Array a = (1 + (-L * (prob - S(0.5))).exp()).inverse();
    const Array y = p.labels.array().template cast<S>();
    const S tp = (y * a).sum(), fn = (y * (1 - a)).sum(), fp = ((1 - y) * a).sum();
    const S d = 2 * tp + fn + fp;
    p.grad.array() = -2 * (y * d - tp) / (d * d) * L * a * (1 - a) * prob * (1 - prob);
    benchmark::DoNotOptimize(1 - 2 * tp / d);
    benchmark::ClobberMemory();
  }
  report<S>(state, n, c);
}

template <class S>
void copy(benchmark::State& state, Index n, Index c) {
  gradus::bench::memcpy_bound(state, (2 * sizeof(S) * std::size_t(n * c) + sizeof(int) * std::size_t(n)) / 2);
  state.SetItemsProcessed(std::int64_t(state.iterations()) * n * c);
}

template <class S>
void add(const std::string& group, Index n, Index c, bool with_naive) {
  const std::string shape = std::to_string(n) + "x" + std::to_string(c);
  benchmark::RegisterBenchmark((group + "/fused/" + shape).c_str(), fused<S>, n, c);
  benchmark::RegisterBenchmark((group + "/memcpy/" + shape).c_str(), copy<S>, n, c);
  if (with_naive) benchmark::RegisterBenchmark((group + "/naive/" + shape).c_str(), naive<S>, n, c);
}

const bool registered = [] {
  const bool smoke = gradus::bench::smoke();
  const Index n = smoke ? 4096 : 1000000;
  add<float>("anyloss_f1_float", n, 1, true);
  add<double>("anyloss_f1_double", n, 1, true);
  add<float>("anyloss_macro_f1_float", n / 10, 10, false);
  if (!smoke) add<float>("anyloss_f1_float", 10 * n, 1, true);  // out of cache: 120 MB of traffic
  return true;
}();

}  // namespace

GRADUS_BENCH_MAIN({"fused", "memcpy"}, {"fused", "naive"})
