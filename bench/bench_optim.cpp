// Optimizer overheads (double, one thread).
//
// adam/<variant>/d=...: steps of Adam on a diagonal quadratic f = sum a_i (x_i - c_i)^2 / 2.
//   minimize    gradus::minimize + gradus::adam (state reused, as when resuming)
//   raw_loop    a hand-written loop: the same gradient call, then one fused scalar loop
//               updating m, v and x in place (what one writes without a library)
//   raw_eigen   the same with three Eigen array statements per step
// sso/<variant>/569x30x2: the example's shape (breast cancer, two-class logistic regression):
//   inner_step      one SSO inner step (a vjp and the line search's predictions), measured
//                   as (outer step with m = 101 - outer step with m = 1) / 100
//   objective_grad  one full gradient of the objective (predict, loss gradient, vjp): a GD step
//   oracle          the loss gradient in target space alone (grad_z l)

#include <chrono>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>

#include <gradus/losses/comp_sum.hpp>
#include <gradus/models/linear.hpp>
#include <gradus/optim/minimize.hpp>
#include <gradus/optim/objective.hpp>
#include <gradus/optim/sso.hpp>

#include "bench_common.hpp"

namespace {

using gradus::Index;
using Vec = gradus::Vector<double>;

struct Quadratic {
  using Scalar = double;
  Vec a, c;
  explicit Quadratic(Index d) : a(Vec::LinSpaced(d, 1.0, 10.0)), c(Vec::LinSpaced(d, -1.0, 1.0)) {}
  Index dim() const { return a.size(); }
  double value_and_grad(const Eigen::Ref<const Vec>& x, Eigen::Ref<Vec> g) const {
    g = a.cwiseProduct(x - c);
    return 0.5 * (x - c).dot(g);
  }
};

constexpr Index steps_per_iteration = 20;
constexpr double lr = 1e-3, b1 = 0.9, b2 = 0.999, eps = 1e-8;

Index dimension() { return gradus::bench::smoke() ? 1000 : 1000000; }

void set_items(benchmark::State& state, Index d) {
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations()) * steps_per_iteration * d);
}

void adam_minimize(benchmark::State& state) {
  const Index d = dimension();
  const Quadratic f(d);
  const auto adam = gradus::adam<double>({.learning_rate = lr});
  Vec x = Vec::Zero(d);
  auto adam_state = adam.init(x);
  for (auto _ : state) {
    gradus::minimize(f, x, adam, adam_state, gradus::Stop{.max_steps = steps_per_iteration});
    benchmark::DoNotOptimize(x.data());
  }
  set_items(state, d);
}

// The raw loops evaluate the gradient steps + 1 times, like minimize (which evaluates the
// final x); update(g, m, v, x, c1, c2) applies one bias-corrected Adam step in place.
template <class Update>
void adam_raw(benchmark::State& state, Update update) {
  const Index d = dimension();
  const Quadratic f(d);
  Vec x = Vec::Zero(d), g(d), m = Vec::Zero(d), v = Vec::Zero(d);
  std::int64_t t = 0;
  for (auto _ : state) {
    for (Index k = 0;; ++k) {
      benchmark::DoNotOptimize(f.value_and_grad(x, g));
      if (k == steps_per_iteration) break;
      ++t;
      update(g, m, v, x, 1 / (1 - std::pow(b1, double(t))), 1 / (1 - std::pow(b2, double(t))));
    }
    benchmark::DoNotOptimize(x.data());
  }
  set_items(state, d);
}

void adam_raw_loop(benchmark::State& state) {
  adam_raw(state, [](const Vec& g, Vec& m, Vec& v, Vec& x, double c1, double c2) {
    for (Index i = 0; i < g.size(); ++i) {
      m[i] = b1 * m[i] + (1 - b1) * g[i];
      v[i] = b2 * v[i] + (1 - b2) * g[i] * g[i];
      x[i] -= lr * (c1 * m[i]) / (std::sqrt(c2 * v[i]) + eps);
    }
  });
}

void adam_raw_eigen(benchmark::State& state) {
  adam_raw(state, [](const Vec& g, Vec& m, Vec& v, Vec& x, double c1, double c2) {
    m = b1 * m + (1 - b1) * g;
    v = b2 * v + (1 - b2) * g.cwiseAbs2();
    x.array() -= lr * (c1 * m.array()) / ((c2 * v.array()).sqrt() + eps);
  });
}

using Objective = gradus::ModelObjective<gradus::LinearModel<double>, gradus::CrossEntropyLoss<double>>;

// Two Gaussian classes of 569 samples x 30 features: the example's shape.
Objective example_shaped_objective() {
  std::mt19937 rng(7);
  std::normal_distribution<double> normal(0.0, 1.0);
  gradus::RowMatrix<double> X(569, 30);
  gradus::Labels y(569);
  for (Index i = 0; i < 569; ++i) {
    y(i) = static_cast<int>(i % 2);
    for (Index j = 0; j < 30; ++j) X(i, j) = normal(rng) + (y(i) ? 0.5 : -0.5);
  }
  return {gradus::LinearModel<double>(30, 2), gradus::CrossEntropyLoss<double>{}, X, y};
}

double sso_outer_step_seconds(const Objective& objective, Index inner_steps) {
  const gradus::SSO<double> sso{.eta = 16.0, .inner_steps = inner_steps};
  const Vec start = objective.model().init_params(1);
  double seconds = 0;
  Vec theta = start;
  auto sso_state = sso.init(theta);
  for (int r = 0; r < 5; ++r) {  // a few repetitions from the same start
    theta = start;
    const auto begin = std::chrono::steady_clock::now();
    sso.step(objective, theta, sso_state);
    seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - begin).count();
  }
  benchmark::DoNotOptimize(theta.data());
  return seconds / 5;
}

void sso_inner_step(benchmark::State& state) {
  const Objective objective = example_shaped_objective();
  for (auto _ : state) {
    const double many = sso_outer_step_seconds(objective, 101);
    const double one = sso_outer_step_seconds(objective, 1);
    state.SetIterationTime((many - one) / 100);
  }
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations()));
}

// Manual timing like inner_step, so that the three share the "/manual_time" suffix and
// their ratios are reported.
template <class F>
void time_manually(benchmark::State& state, F&& call) {
  for (auto _ : state) {
    const auto begin = std::chrono::steady_clock::now();
    benchmark::DoNotOptimize(call());
    state.SetIterationTime(std::chrono::duration<double>(std::chrono::steady_clock::now() - begin).count());
  }
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations()));
}

void sso_objective_grad(benchmark::State& state) {
  const Objective objective = example_shaped_objective();
  const Vec theta = objective.model().init_params(1);
  Vec g(objective.dim());
  time_manually(state, [&] { return objective.value_and_grad(theta, g); });
}

void sso_oracle(benchmark::State& state) {
  const Objective objective = example_shaped_objective();
  gradus::RowMatrix<double> Z(569, 2), G(569, 2);
  objective.model().predict(objective.model().init_params(1), objective.X(), Z);
  time_manually(state, [&] { return objective.loss().value_and_grad(Z, objective.y(), G); });
}

const std::string adam_shape = "d=" + std::to_string(dimension());
const std::string sso_shape = "569x30x2";

// clang-format off
const auto* registered = [] {
  benchmark::RegisterBenchmark(("adam/minimize/" + adam_shape).c_str(), adam_minimize)->Unit(benchmark::kMillisecond);
  benchmark::RegisterBenchmark(("adam/raw_loop/" + adam_shape).c_str(), adam_raw_loop)->Unit(benchmark::kMillisecond);
  benchmark::RegisterBenchmark(("adam/raw_eigen/" + adam_shape).c_str(), adam_raw_eigen)->Unit(benchmark::kMillisecond);
  // Each iteration runs 5 x 102 inner steps but reports one: a fixed count keeps it from
  // running for minutes to fill the minimum time with per-step figures.
  benchmark::RegisterBenchmark(("sso/inner_step/" + sso_shape).c_str(), sso_inner_step)->UseManualTime()->Iterations(gradus::bench::smoke() ? 1 : 20)->Unit(benchmark::kMicrosecond);
  benchmark::RegisterBenchmark(("sso/objective_grad/" + sso_shape).c_str(), sso_objective_grad)->UseManualTime()->Unit(benchmark::kMicrosecond);
  benchmark::RegisterBenchmark(("sso/oracle/" + sso_shape).c_str(), sso_oracle)->UseManualTime()->Unit(benchmark::kMicrosecond);
  return &adam_shape;
}();
// clang-format on

}  // namespace

GRADUS_BENCH_MAIN({"minimize", "raw_loop"}, {"minimize", "raw_eigen"}, {"inner_step", "objective_grad"},
                  {"inner_step", "oracle"})
