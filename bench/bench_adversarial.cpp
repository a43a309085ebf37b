// Cost of adversarial training per step (float, one thread): one smooth adversarial comp-sum
// value_and_grad with K projected-gradient steps (K = 1, 10) against one plain comp-sum
// value_and_grad (forward, cross-entropy, parameter vjp) over the same model and batch.
// The ratio lines "plain / smooth_kK = r" read: the smooth loss costs r plain steps. Each
// ascent step is a forward pass and an input vjp, so r grows like K + 2 or so.

#include <cstdint>
#include <string>
#include <vector>

#include <gradus/losses/adversarial.hpp>
#include <gradus/losses/comp_sum.hpp>
#include <gradus/models/linear.hpp>
#include <gradus/models/mlp.hpp>

#include "bench_common.hpp"

namespace {

using gradus::Index;
using Matrix = gradus::RowMatrix<float>;

struct Batch {
  Matrix X;
  gradus::Labels y;
};

Batch make_batch(Index n, Index d, int classes) {
  Batch b{(Matrix::Random(n, d).array() + 1) / 2, gradus::Labels(n)};
  for (Index i = 0; i < n; ++i) b.y(i) = int(i % classes);
  return b;
}

template <class M>
void plain(benchmark::State& state, const M& model, Index n) {
  const auto b = make_batch(n, model.num_inputs(), int(model.num_outputs()));
  const gradus::Vector<float> theta = model.init_params(1);
  gradus::Vector<float> grad(model.num_params());
  Matrix Z(n, model.num_outputs()), dZ(n, model.num_outputs());
  const gradus::CrossEntropyLoss<float> loss;
  for (auto _ : state) {
    model.predict(theta, b.X, Z);
    benchmark::DoNotOptimize(loss.value_and_grad(Z, b.y, dZ));
    model.vjp_params(theta, b.X, dZ, grad);
    benchmark::ClobberMemory();
  }
  state.SetItemsProcessed(std::int64_t(state.iterations()) * n);
}

template <class M>
void smooth(benchmark::State& state, const M& model, Index n, int steps) {
  const auto b = make_batch(n, model.num_inputs(), int(model.num_outputs()));
  const gradus::Vector<float> theta = model.init_params(1);
  gradus::Vector<float> grad(model.num_params());
  const gradus::SmoothAdversarialLoss<float> loss({.nu = 0.1f, .gamma = 0.1f, .steps = steps});
  for (auto _ : state) {
    benchmark::DoNotOptimize(loss.value_and_grad(model, theta, b.X, b.y, grad));
    benchmark::ClobberMemory();
  }
  state.SetItemsProcessed(std::int64_t(state.iterations()) * n);
}

const gradus::LinearModel<float> linear(64, 10);
const gradus::MLP<float> mlp({64, 64, 10}, gradus::Activation::ReLU);

template <class M>
void register_model(const std::string& name, const M& model) {
  const Index n = gradus::bench::smoke() ? 16 : 256;
  const std::string shape = name + "_" + std::to_string(n) + "x64";
  benchmark::RegisterBenchmark(("adversarial/plain/" + shape).c_str(), plain<M>, model, n);
  for (int steps : {1, 10}) {
    benchmark::RegisterBenchmark(("adversarial/smooth_k" + std::to_string(steps) + "/" + shape).c_str(), smooth<M>,
                                 model, n, steps);
  }
}

const bool registered = [] {
  register_model("linear", linear);
  register_model("mlp", mlp);
  return true;
}();

}  // namespace

GRADUS_BENCH_MAIN({"plain", "smooth_k1"}, {"plain", "smooth_k10"})
