// SSO (Lavington et al., ICML 2023) against tuned gradient descent and Adam: logistic
// regression on the breast-cancer data (569 x 30, standardized, plus bias).
//
// Cost model: the "expensive oracle" is the loss gradient in target space, grad_z l(z), one
// call per GD/Adam step and one per SSO outer step; SSO's inner steps use only the model
// (predictions and vjps), counted separately. We report the oracle calls each method needs
// to bring the full-data training loss below 0.07, 0.06 and 0.05, every method tuned over a
// small grid (best setting per threshold), full batch and minibatches of 125.
//
// Logistic regression is written as two-class softmax regression (CrossEntropyLoss over two
// logits), the same model: the loss depends only on the difference of the two logits.
// Expected (issue 3, from the authors' claim and our prototype): SSO with m = 100 needs at
// most half the oracle calls of the best tuned gradient descent at loss 0.05.

#include <cstdio>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include <Eigen/Eigenvalues>

#include <gradus/losses/comp_sum.hpp>
#include <gradus/models/linear.hpp>
#include <gradus/optim/minimize.hpp>
#include <gradus/optim/objective.hpp>
#include <gradus/optim/sso.hpp>

#include "example_data.hpp"

using gradus::Index;
using Vec = gradus::Vector<double>;
using Objective = gradus::ModelObjective<gradus::LinearModel<double>, gradus::CrossEntropyLoss<double>>;

namespace {

const std::vector<double> thresholds = {0.07, 0.06, 0.05};
constexpr Index unreached = std::numeric_limits<Index>::max();

// One tuned run: the full-data loss after each oracle call (loss[k] after k calls).
struct Run {
  std::string setting;
  std::vector<double> loss;
  double seconds = 0;
  Index model_calls = 0;

  Index calls_to(double threshold) const {
    for (std::size_t k = 0; k < loss.size(); ++k)
      if (loss[k] < threshold) return static_cast<Index>(k);
    return unreached;
  }
};

// Full-data loss at every step of minimize (monitoring, not counted as oracle calls).
struct FullLossTrace {
  const Objective* objective;
  std::vector<double>* loss;
  void on_step(const gradus::StepInfo<double>& info) { loss->push_back(objective->value(info.x)); }
};

template <class T>
Run run_transform(const Objective& objective, const T& transform, Index steps, Index batch, std::string setting) {
  Run run{std::move(setting), {}, 0, 0};
  Vec theta = objective.model().init_params(0);
  examples::Stopwatch clock;
  const gradus::Stop stop{.max_steps = steps};
  if (batch > 0) {
    gradus::minimize(objective, theta, transform, stop, gradus::Minibatch{.batch_size = batch, .seed = 1},
                     FullLossTrace{&objective, &run.loss});
  } else {
    gradus::minimize(objective, theta, transform, stop, FullLossTrace{&objective, &run.loss});
  }
  run.seconds = clock.seconds();
  return run;
}

Run run_sso(const Objective& objective, double eta, Index inner_steps, Index steps, Index batch, std::string setting) {
  Run run{std::move(setting), {}, 0, 0};
  const gradus::SSO<double> sso{.eta = eta, .inner_steps = inner_steps};
  Vec theta = objective.model().init_params(0);
  auto state = sso.init(theta);
  std::vector<Index> order(static_cast<std::size_t>(objective.num_samples()));
  std::iota(order.begin(), order.end(), Index(0));
  gradus::detail::SplitMix64 rng(1);
  examples::Stopwatch clock;
  for (Index t = 0; t <= steps; ++t) {
    run.loss.push_back(objective.value(theta));
    if (t == steps) break;
    if (batch <= 0) {
      sso.step(objective, theta, state);
      continue;
    }
    const Index per_epoch = (objective.num_samples() + batch - 1) / batch;
    if (t % per_epoch == 0)  // reshuffle every epoch
      for (std::size_t i = order.size() - 1; i > 0; --i) std::swap(order[i], order[rng.below(i + 1)]);
    const Index first = (t % per_epoch) * batch;
    const Index size = std::min(batch, objective.num_samples() - first);
    sso.step(objective, theta, state, std::span<const Index>(order.data() + first, static_cast<std::size_t>(size)));
  }
  run.seconds = clock.seconds();
  run.model_calls = state.counts.model_calls();
  return run;
}

// The grid's best run per threshold, printed as one table row.
void report(const std::string& method, const std::vector<Run>& grid, std::vector<Index>& best_calls) {
  std::printf("  %-22s", method.c_str());
  best_calls.clear();
  const Run* best_at_last = &grid.front();
  for (double threshold : thresholds) {
    const Run* best = &grid.front();
    for (const Run& run : grid)
      if (run.calls_to(threshold) < best->calls_to(threshold)) best = &run;
    best_calls.push_back(best->calls_to(threshold));
    if (best_calls.back() == unreached) {
      std::printf(" %16s", "not reached");
    } else {
      std::printf(" %5lld %-10s", static_cast<long long>(best_calls.back()), ("(" + best->setting + ")").c_str());
    }
    best_at_last = best;
  }
  std::printf(" %8.1f ms", 1e3 * best_at_last->seconds);
  if (best_at_last->model_calls > 0) std::printf("  %lld model calls", static_cast<long long>(best_at_last->model_calls));
  std::printf("\n");
}

std::string label(double value, const char* suffix) {
  char text[32];
  std::snprintf(text, sizeof text, "%g%s", value, suffix);
  return text;
}

void compare(const Objective& objective, double L, Index batch, Index steps, Index sso_steps, bool smoke,
             std::vector<Index>& gd_calls, std::vector<Index>& sso100_calls) {
  const std::vector<double> gd_grid = smoke ? std::vector<double>{8} : std::vector<double>{1, 2, 4, 8, 16, 32, 64, 128};
  const std::vector<double> adam_grid = smoke ? std::vector<double>{0.1} : std::vector<double>{0.003, 0.01, 0.03, 0.1, 0.3, 1};
  const std::vector<double> eta_grid = smoke ? std::vector<double>{8} : std::vector<double>{1, 2, 4, 8, 16, 32};
  const double inverse_Lz = 2.0;  // per-sample two-class cross-entropy is 1/2-smooth in the logits

  std::printf("  %-22s %16s %16s %16s %11s\n", "method (tuned)", "< 0.07", "< 0.06", "< 0.05", "time");
  std::vector<Run> grid;
  std::vector<Index> ignored;
  for (double k : gd_grid)
    grid.push_back(run_transform(objective, gradus::sgd<double>({.learning_rate = k / L}), steps, batch, label(k, "x")));
  report(batch > 0 ? "SGD (step k/L)" : "GD (step k/L)", grid, gd_calls);
  grid.clear();
  for (double lr : adam_grid)
    grid.push_back(run_transform(objective, gradus::adam<double>({.learning_rate = lr}), steps, batch, label(lr, "")));
  report("Adam (lr)", grid, ignored);
  for (Index m : {Index(10), Index(100)}) {
    grid.clear();
    for (double k : eta_grid) grid.push_back(run_sso(objective, k * inverse_Lz, m, sso_steps, batch, label(k, "x")));
    report("SSO m=" + std::to_string(m) + " (eta k/Lz)", grid, m == 100 ? sso100_calls : ignored);
  }
}

}  // namespace

int main() {
  const bool smoke = examples::smoke();
  auto data = examples::load_breast_cancer();
  examples::Matrix unused = data.X.topRows(1);
  examples::standardize(data.X, unused);
  const Objective objective(gradus::LinearModel<double>(data.X.cols(), 2), gradus::CrossEntropyLoss<double>{}, data.X,
                            data.y);

  // Smoothness of the mean loss in the parameters: L = (1/2) lambda_max(A^T A / n), A = [X 1].
  examples::Matrix A(data.X.rows(), data.X.cols() + 1);
  A << data.X, examples::Matrix::Ones(data.X.rows(), 1);
  const Eigen::MatrixXd gram = A.transpose() * A / double(A.rows());
  const Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> eigen(gram);
  const double L = 0.5 * eigen.eigenvalues().maxCoeff();
  std::printf("SSO vs tuned GD and Adam: logistic regression on breast cancer (%lld x %lld, standardized, + bias)\n",
              static_cast<long long>(data.X.rows()), static_cast<long long>(data.X.cols()));
  std::printf("L = %.3f, cond(A^T A) = %.3g. Oracle calls (loss gradients in target space) to reach each\n"
              "full-data training loss; the best grid setting in parentheses; time of the run best at 0.05.\n\n",
              L, eigen.eigenvalues().maxCoeff() / eigen.eigenvalues().minCoeff());

  examples::Stopwatch total;
  std::vector<Index> gd, sso100;
  std::printf("Full batch (%s):\n", smoke ? "smoke: 5 steps" : "GD/Adam 400 steps, SSO 100 outer steps");
  compare(objective, L, 0, smoke ? 5 : 400, smoke ? 3 : 100, smoke, gd, sso100);
  const bool claim = sso100.back() != unreached && gd.back() != unreached && 2 * sso100.back() <= gd.back();
  if (!smoke) {
    std::printf("  claim (SSO m=100 needs <= 1/2 the oracle calls of tuned GD at 0.05): %s (%lld vs %lld)\n",
                claim ? "holds" : "does NOT hold", static_cast<long long>(sso100.back()), static_cast<long long>(gd.back()));
  }

  std::printf("\nMinibatches of 125 (one oracle call = one batch gradient; %s):\n",
              smoke ? "smoke: 5 steps" : "SGD/Adam 1000 steps, SSO 300 outer steps");
  compare(objective, L, 125, smoke ? 5 : 1000, smoke ? 3 : 300, smoke, gd, sso100);
  if (!smoke) {
    std::printf("  SSO m=100 vs tuned SGD, batch gradients:");
    for (std::size_t i = 0; i < thresholds.size(); ++i) {
      std::printf(" %s at %.2f (%lld vs %lld)", sso100[i] < gd[i] ? "fewer" : "NOT fewer", thresholds[i],
                  static_cast<long long>(sso100[i]), static_cast<long long>(gd[i]));
    }
    std::printf("\n");
  }
  std::printf("\nTotal time %.1f s. SSO's inner steps are cheap only relative to an expensive loss gradient:\n"
              "for logistic regression the gradient is as cheap as a model call, so the win is in oracle calls,\n"
              "not wall time; part of the win on a linear model is implicit (A^T A)^-1 preconditioning.\n",
              total.seconds());
  return 0;
}
