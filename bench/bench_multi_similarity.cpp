// Multi-similarity loss, forward + backward, against the matrix products it cannot avoid,
// measured in the same run:
//   ms_batch:     N x D embeddings; baseline "matmuls" = S = X X^T plus the gradient product
//                 (N x N) (N x D). Target: fused within 2.5x of it (ratio >= 0.40).
//   ms_reference: N queries against M reference rows, tiled (O(N x tile) memory); baseline
//                 "matmuls" = S = Q R^T, G R and G^T Q on a dense N x M matrix.
// Items are pairs (N x N or N x M).

#include <random>

#include <gradus/losses/multi_similarity.hpp>

#include "bench_common.hpp"

namespace {

using gradus::Index;
using gradus::Labels;
using Matrix = gradus::RowMatrix<float>;

Matrix random_matrix(Index rows, Index cols, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  Matrix X(rows, cols);
  for (Index i = 0; i < X.size(); ++i) X.data()[i] = normal(rng);
  return X;
}

// P x K style labels: `per_class` consecutive rows share a class.
Labels blocked_labels(Index n, Index per_class) {
  Labels y(n);
  for (Index i = 0; i < n; ++i) y(i) = static_cast<int>(i / per_class);
  return y;
}

Index batch_rows() { return gradus::bench::smoke() ? 32 : 512; }
Index batch_dims() { return gradus::bench::smoke() ? 16 : 128; }
Index reference_rows() { return gradus::bench::smoke() ? 1024 : 65536; }
Index query_rows() { return gradus::bench::smoke() ? 16 : 128; }

void set_items(benchmark::State& state, Index pairs) {
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations()) * static_cast<std::int64_t>(pairs));
}

void batch_fused(benchmark::State& state) {
  const Index n = batch_rows(), d = batch_dims();
  const Matrix X = random_matrix(n, d, 1);
  const Labels y = blocked_labels(n, 8);
  const gradus::MultiSimilarityLoss<float> loss;
  Matrix dX(n, d);
  for (auto _ : state) benchmark::DoNotOptimize(loss.value_and_grad(X, y, dX));
  set_items(state, n * n);
}

void batch_value(benchmark::State& state) {
  const Index n = batch_rows(), d = batch_dims();
  const Matrix X = random_matrix(n, d, 1);
  const Labels y = blocked_labels(n, 8);
  const gradus::MultiSimilarityLoss<float> loss;
  for (auto _ : state) benchmark::DoNotOptimize(loss.value(X, y));
  set_items(state, n * n);
}

void batch_matmuls(benchmark::State& state) {
  const Index n = batch_rows(), d = batch_dims();
  const Matrix X = random_matrix(n, d, 1);
  const Matrix G = random_matrix(n, n, 2);
  Matrix S(n, n), dX(n, d);
  for (auto _ : state) {
    S.noalias() = X * X.transpose();
    dX.noalias() = G * X;
    benchmark::DoNotOptimize(S.data());
    benchmark::DoNotOptimize(dX.data());
  }
  set_items(state, n * n);
}

void reference_fused(benchmark::State& state, bool to_references) {
  const Index n = query_rows(), m = reference_rows(), d = batch_dims();
  const Matrix Q = random_matrix(n, d, 3), R = random_matrix(m, d, 4);
  const Labels yq = blocked_labels(n, 8), yr = blocked_labels(m, m / 100);
  const gradus::MultiSimilarityLoss<float> loss;
  Matrix dQ(n, d), dR(m, d);
  for (auto _ : state) {
    if (to_references)
      benchmark::DoNotOptimize(loss.value_and_grad(Q, yq, R, yr, dQ, dR));
    else
      benchmark::DoNotOptimize(loss.value_and_grad(Q, yq, R, yr, dQ));
  }
  set_items(state, n * m);
}

void reference_value(benchmark::State& state) {
  const Index n = query_rows(), m = reference_rows(), d = batch_dims();
  const Matrix Q = random_matrix(n, d, 3), R = random_matrix(m, d, 4);
  const Labels yq = blocked_labels(n, 8), yr = blocked_labels(m, m / 100);
  const gradus::MultiSimilarityLoss<float> loss;
  for (auto _ : state) benchmark::DoNotOptimize(loss.value(Q, yq, R, yr));
  set_items(state, n * m);
}

void reference_matmuls(benchmark::State& state) {
  const Index n = query_rows(), m = reference_rows(), d = batch_dims();
  const Matrix Q = random_matrix(n, d, 3), R = random_matrix(m, d, 4);
  Matrix S(n, m), dQ(n, d), dR(m, d);
  for (auto _ : state) {
    S.noalias() = Q * R.transpose();
    dQ.noalias() = S * R;  // S stands in for G: same shape, same cost
    dR.noalias() = S.transpose() * Q;
    benchmark::DoNotOptimize(dQ.data());
    benchmark::DoNotOptimize(dR.data());
  }
  set_items(state, n * m);
}

std::string shape(Index n, Index m, Index d) {
  return std::to_string(n) + "x" + std::to_string(m) + "x" + std::to_string(d);
}

const bool registered = [] {
  const std::string batch = shape(batch_rows(), batch_rows(), batch_dims());
  benchmark::RegisterBenchmark(("ms_batch/fused/" + batch).c_str(), batch_fused)->Unit(benchmark::kMillisecond);
  benchmark::RegisterBenchmark(("ms_batch/value/" + batch).c_str(), batch_value)->Unit(benchmark::kMillisecond);
  benchmark::RegisterBenchmark(("ms_batch/matmuls/" + batch).c_str(), batch_matmuls)->Unit(benchmark::kMillisecond);
  const std::string reference = shape(query_rows(), reference_rows(), batch_dims());
  benchmark::RegisterBenchmark(("ms_reference/fused/" + reference).c_str(), reference_fused, true)
      ->Unit(benchmark::kMillisecond);
  benchmark::RegisterBenchmark(("ms_reference/fused_dq/" + reference).c_str(), reference_fused, false)
      ->Unit(benchmark::kMillisecond);
  benchmark::RegisterBenchmark(("ms_reference/value/" + reference).c_str(), reference_value)
      ->Unit(benchmark::kMillisecond);
  benchmark::RegisterBenchmark(("ms_reference/matmuls/" + reference).c_str(), reference_matmuls)
      ->Unit(benchmark::kMillisecond);
  return true;
}();

}  // namespace

GRADUS_BENCH_MAIN({"fused", "matmuls"}, {"fused_dq", "matmuls"}, {"value", "matmuls"})
