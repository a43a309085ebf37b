// EF21 benchmarks.
//   topk/*:  TopK compression of d = 1e6 doubles with k = d/100 (nth_element selection), against a
//            full sort of the magnitudes and against memcpy of the d values. items/s = entries.
//   round/*: one EF21 round with Top-(d/100) (n = 16 clients, d = 1e5; compression + aggregation)
//            against a plain distributed gradient round (every client's dense gradient averaged, then
//            x -= gamma g) with the same gradient work: each client's logistic objective over m rows,
//            m = 4 (cheap gradients: the overhead shows) and m = 16. EF21 with Identity shows the
//            cost of the EF21 bookkeeping without compression.
#include <algorithm>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include <gradus/optim/ef21.hpp>

#include "bench_common.hpp"

namespace {

using gradus::Index;
using gradus::ef21::NonconvexLogistic;

Eigen::VectorXd random_vector(Index d, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal;
  Eigen::VectorXd v(d);
  for (auto& value : v) value = normal(rng);
  return v;
}

Index topk_dim() { return gradus::bench::smoke() ? 10000 : 1000000; }
std::string topk_shape() { return "d=" + std::to_string(topk_dim()) + ",k=d/100"; }

void topk_gradus(benchmark::State& state) {
  const Index d = topk_dim();
  const Eigen::VectorXd v = random_vector(d, 1);
  gradus::ef21::SparseMessage<double> message;
  gradus::ef21::Rng rng;
  const gradus::ef21::TopK topk{d / 100};
  for (auto _ : state) {
    topk.compress(v, message, rng);
    benchmark::DoNotOptimize(message.values.data());
  }
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations()) * d);
}

// Baseline: sort all indices by (|v| descending, index ascending), keep the first k.
void topk_full_sort(benchmark::State& state) {
  const Index d = topk_dim(), k = d / 100;
  const Eigen::VectorXd v = random_vector(d, 1);
  std::vector<std::int32_t> order(static_cast<std::size_t>(d));
  std::vector<double> values(static_cast<std::size_t>(k));
  for (auto _ : state) {
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(), [&](auto a, auto b) {
      const double x = std::abs(v(a)), y = std::abs(v(b));
      return x != y ? x > y : a < b;
    });
    for (Index j = 0; j < k; ++j) values[static_cast<std::size_t>(j)] = v(order[static_cast<std::size_t>(j)]);
    benchmark::DoNotOptimize(values.data());
  }
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations()) * d);
}

void topk_memcpy(benchmark::State& state) {
  gradus::bench::memcpy_bound(state, static_cast<std::size_t>(topk_dim()) * sizeof(double));
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations()) * topk_dim());
}

constexpr Index kClients = 16;
Index round_dim() { return gradus::bench::smoke() ? 1000 : 100000; }
std::string round_shape(Index rows) {
  return "d=" + std::to_string(round_dim()) + ",n=16,m=" + std::to_string(rows);
}

std::vector<NonconvexLogistic<double>> make_clients(Index rows) {
  std::vector<NonconvexLogistic<double>> clients;
  for (Index i = 0; i < kClients; ++i) {
    const Eigen::VectorXd flat = random_vector(rows * round_dim(), 10 + static_cast<std::uint64_t>(i));
    gradus::Labels y(rows);
    for (Index j = 0; j < rows; ++j) y(j) = (i + j) % 2 ? 1 : -1;
    clients.emplace_back(Eigen::Map<const gradus::RowMatrix<double>>(flat.data(), rows, round_dim()), y);
  }
  return clients;
}

constexpr double kGamma = 1e-3;

template <class C>
void round_ef21(benchmark::State& state, Index rows, C compressor) {
  gradus::ef21::EF21 method(make_clients(rows), compressor, Eigen::VectorXd::Zero(round_dim()),
                            {.gamma = kGamma, .monitor = false});
  for (auto _ : state) {
    method.step();
    benchmark::DoNotOptimize(method.x().data());
  }
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations()) * kClients * round_dim());
}

void round_plain(benchmark::State& state, Index rows) {
  auto clients = make_clients(rows);
  const Index d = round_dim();
  Eigen::VectorXd x = Eigen::VectorXd::Zero(d), gradient(d), mean(d);
  for (auto _ : state) {
    mean.setZero();
    for (auto& client : clients) {
      client.value_and_grad(x, gradient);
      mean += gradient;
    }
    x -= kGamma / kClients * mean;
    benchmark::DoNotOptimize(x.data());
  }
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations()) * kClients * d);
}

const bool registered = [] {
  benchmark::RegisterBenchmark(("topk/gradus/" + topk_shape()).c_str(), topk_gradus);
  benchmark::RegisterBenchmark(("topk/full_sort/" + topk_shape()).c_str(), topk_full_sort);
  benchmark::RegisterBenchmark(("topk/memcpy/" + topk_shape()).c_str(), topk_memcpy);
  for (Index rows : {4, 16}) {
    benchmark::RegisterBenchmark(("round/ef21_topk/" + round_shape(rows)).c_str(), [rows](benchmark::State& state) {
      round_ef21(state, rows, gradus::ef21::TopK{round_dim() / 100});
    });
    benchmark::RegisterBenchmark(("round/ef21_identity/" + round_shape(rows)).c_str(),
                                 [rows](benchmark::State& state) { round_ef21(state, rows, gradus::ef21::Identity{}); });
    benchmark::RegisterBenchmark(("round/plain/" + round_shape(rows)).c_str(),
                                 [rows](benchmark::State& state) { round_plain(state, rows); });
  }
  return true;
}();

}  // namespace

GRADUS_BENCH_MAIN({"gradus", "full_sort"}, {"gradus", "memcpy"}, {"ef21_topk", "plain"}, {"ef21_identity", "plain"})
