// Preference losses, forward + backward on one thread.
// - Pairs: DPO and rDPO over N log-prob pairs (read 4 N-vectors, write 2 gradients) against
//   memcpy of the same bytes and a naive Eigen version through N-sized temporaries.
// - Token logits: SequenceLogProb::value_and_grad on a T x V sequence against the comp-sum
//   cross-entropy kernel it runs on (same bytes: read the logits, write their gradient).

#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include <gradus/losses/comp_sum.hpp>
#include <gradus/losses/preference.hpp>
#include <gradus/losses/sequence_logprob.hpp>

#include "bench_common.hpp"

namespace {

using gradus::Index;
using gradus::PreferenceKind;

template <class S>
struct Pairs {
  gradus::Vector<S> pc, pr, rc, rr, dpc, dpr;
};

template <class S>
Pairs<S> make_pairs(Index n) {
  std::mt19937 rng(7);
  std::normal_distribution<S> normal(S(-40), S(10));
  auto draw = [&] {
    gradus::Vector<S> v(n);
    for (auto& x : v) x = normal(rng);
    return v;
  };
  return {draw(), draw(), draw(), draw(), gradus::Vector<S>(n), gradus::Vector<S>(n)};
}

template <class S>
void report_pairs(benchmark::State& state, Index n) {
  state.SetBytesProcessed(std::int64_t(state.iterations()) * std::int64_t(6 * sizeof(S)) * n);
  state.SetItemsProcessed(std::int64_t(state.iterations()) * n);
}

template <class S>
void fused(benchmark::State& state, PreferenceKind kind, Index n) {
  auto p = make_pairs<S>(n);
  const gradus::PreferenceLoss<S> loss({.kind = kind, .epsilon = S(0.1)});
  for (auto _ : state) {
    benchmark::DoNotOptimize(loss.value_and_grad(p.pc, p.pr, p.rc, p.rr, p.dpc, p.dpr));
    benchmark::ClobberMemory();
  }
  report_pairs<S>(state, n);
}

// DPO as one writes it with Eigen expressions: N-sized temporaries, softplus and sigmoid apart.
template <class S>
void naive(benchmark::State& state, Index n) {
  auto p = make_pairs<S>(n);
  const S beta = S(0.1);
  for (auto _ : state) {
    const gradus::Vector<S> t = beta * ((p.pc - p.rc) - (p.pr - p.rr));
    const S value = ((-t.array()).max(S(0)) + (-t.array().abs()).exp().log1p()).mean();
    p.dpc = (-beta / S(n)) * (-t.array()).logistic();
    p.dpr = -p.dpc;
    benchmark::DoNotOptimize(value);
    benchmark::ClobberMemory();
  }
  report_pairs<S>(state, n);
}

template <class S>
void copy_pairs(benchmark::State& state, Index n) {
  // 4 N-vectors read and 2 written move as many bytes as a memcpy of 3 N-vectors.
  gradus::bench::memcpy_bound(state, 3 * sizeof(S) * std::size_t(n));
  state.SetItemsProcessed(std::int64_t(state.iterations()) * n);
}

struct Tokens {
  gradus::RowMatrix<float> logits, grad;
  gradus::Labels targets, mask;
};

Tokens make_tokens(Index positions, Index vocabulary) {
  std::mt19937 rng(3);
  std::normal_distribution<float> normal(0.0f, 2.0f);
  std::uniform_int_distribution<int> token(0, int(vocabulary) - 1);
  Tokens t{gradus::RowMatrix<float>(positions, vocabulary), gradus::RowMatrix<float>(positions, vocabulary),
           gradus::Labels(positions), gradus::Labels::Ones(positions)};
  for (Index k = 0; k < t.logits.size(); ++k) t.logits.data()[k] = normal(rng);
  for (auto& y : t.targets) y = token(rng);
  return t;
}

void report_tokens(benchmark::State& state, Index positions, Index vocabulary) {
  state.SetBytesProcessed(std::int64_t(state.iterations()) * std::int64_t(2 * sizeof(float)) * positions * vocabulary);
  state.SetItemsProcessed(std::int64_t(state.iterations()) * positions * vocabulary);
}

void sequence_logprob(benchmark::State& state, Index positions, Index vocabulary) {
  auto t = make_tokens(positions, vocabulary);
  const gradus::SequenceLogProb<float> logprob;
  for (auto _ : state) {
    benchmark::DoNotOptimize(logprob.value_and_grad(t.logits, t.targets, t.mask, t.grad));
    benchmark::ClobberMemory();
  }
  report_tokens(state, positions, vocabulary);
}

void comp_sum(benchmark::State& state, Index positions, Index vocabulary) {
  auto t = make_tokens(positions, vocabulary);
  const gradus::CrossEntropyLoss<float> ce({.reduction = gradus::Reduction::Sum});
  for (auto _ : state) {
    benchmark::DoNotOptimize(ce.value_and_grad(t.logits, t.targets, t.grad));
    benchmark::ClobberMemory();
  }
  report_tokens(state, positions, vocabulary);
}

const bool registered = [] {
  const Index n = gradus::bench::smoke() ? 1000 : 1000000;
  const std::string pairs = std::to_string(n);
  benchmark::RegisterBenchmark(("dpo_f32/fused/" + pairs).c_str(), fused<float>, PreferenceKind::Sigmoid, n);
  benchmark::RegisterBenchmark(("dpo_f32/naive/" + pairs).c_str(), naive<float>, n);
  benchmark::RegisterBenchmark(("dpo_f32/memcpy/" + pairs).c_str(), copy_pairs<float>, n);
  benchmark::RegisterBenchmark(("rdpo_f32/fused/" + pairs).c_str(), fused<float>, PreferenceKind::Robust, n);
  benchmark::RegisterBenchmark(("rdpo_f32/memcpy/" + pairs).c_str(), copy_pairs<float>, n);
  // IPO goes through the generic per-kind kernel rather than the DPO family's own loop.
  benchmark::RegisterBenchmark(("ipo_f32/fused/" + pairs).c_str(), fused<float>, PreferenceKind::IPO, n);
  benchmark::RegisterBenchmark(("ipo_f32/memcpy/" + pairs).c_str(), copy_pairs<float>, n);
  benchmark::RegisterBenchmark(("dpo_f64/fused/" + pairs).c_str(), fused<double>, PreferenceKind::Sigmoid, n);
  benchmark::RegisterBenchmark(("dpo_f64/naive/" + pairs).c_str(), naive<double>, n);
  benchmark::RegisterBenchmark(("dpo_f64/memcpy/" + pairs).c_str(), copy_pairs<double>, n);

  const Index positions = gradus::bench::smoke() ? 8 : 512, vocabulary = gradus::bench::smoke() ? 1000 : 32000;
  const std::string shape = std::to_string(positions) + "x" + std::to_string(vocabulary);
  benchmark::RegisterBenchmark(("tokens/sequence_logprob/" + shape).c_str(), sequence_logprob, positions, vocabulary);
  benchmark::RegisterBenchmark(("tokens/comp_sum/" + shape).c_str(), comp_sum, positions, vocabulary);
  return true;
}();

}  // namespace

GRADUS_BENCH_MAIN({"fused", "memcpy"}, {"fused", "naive"}, {"sequence_logprob", "comp_sum"})
