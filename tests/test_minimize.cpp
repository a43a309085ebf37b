#include <catch2/catch.hpp>

#include <cmath>
#include <cstdio>
#include <limits>
#include <numeric>
#include <set>
#include <sstream>
#include <vector>

#include <gradus/losses/comp_sum.hpp>
#include <gradus/models/linear.hpp>
#include <gradus/models/mlp.hpp>
#include <gradus/optim/minimize.hpp>
#include <gradus/optim/objective.hpp>
#include <gradus/testing/gradient_check.hpp>

#include "optim_problems.hpp"

using namespace gradus;
using problems::LogisticLoss;

static_assert(MinibatchObjective<ModelObjective<LinearModel<float>, LogisticLoss<float>>>);
static_assert(MinibatchObjective<ModelObjective<MLP<double>, CrossEntropyLoss<double>>>);

namespace {

template <class S>
auto logistic_objective(Index rows, Index cols, S l2, std::uint64_t seed = 3) {
  auto [X, y] = problems::classification_data<S>(rows, cols, seed);
  return make_objective(LinearModel<S>(cols, 1), LogisticLoss<S>{}, std::move(X), std::move(y), {.l2 = l2});
}

}  // namespace

TEMPLATE_TEST_CASE("ModelObjective: gradient check, mean semantics, minibatches", "[objective][gradient]", float,
                   double) {
  using S = TestType;
  const double tolerance = std::is_same_v<S, float> ? 2e-3 : 1e-6;
  auto [X, y] = problems::classification_data<double>(17, 3, 5);
  Labels y3 = y;
  y3(0) = 2;  // three classes for the MLP + cross-entropy objective
  auto objective_s = make_objective(MLP<S>({3, 8, 3}, Activation::Tanh), CrossEntropyLoss<S>{}, X.cast<S>(), y3,
                                    {.l2 = S(0.01)});
  auto objective_d = make_objective(MLP<double>({3, 8, 3}, Activation::Tanh), CrossEntropyLoss<double>{}, X, y3,
                                    {.l2 = 0.01});
  const Vector<double> theta = objective_d.model().init_params(4);
  Vector<S> g(objective_s.dim());
  objective_s.value_and_grad(theta.cast<S>(), g);
  auto value = [&](const Vector<double>& t) { return objective_d.value(t); };
  const auto report = testing::check_gradient(value, theta, g, {.tolerance = tolerance});
  INFO(report.summary());
  CHECK(report.ok);

  // Mean semantics: all rows as a batch equal the full objective; the batch value is the
  // mean of the single-row values.
  std::vector<Index> all(17);
  std::iota(all.begin(), all.end(), Index(0));
  Vector<S> g_batch(objective_s.dim()), g_row(objective_s.dim()), g_sum = Vector<S>::Zero(objective_s.dim());
  const S full = objective_s.value_and_grad(theta.cast<S>(), g);
  CHECK(objective_s.value_and_grad(theta.cast<S>(), all, g_batch) == Approx(full).epsilon(1e-5));
  CHECK(g_batch.isApprox(g, S(1e-5)));
  const std::vector<Index> batch{4, 9, 9, 16};
  const S batch_value = objective_s.value_and_grad(theta.cast<S>(), batch, g_batch);
  S row_sum = 0;
  for (Index i : batch) {
    const Index one[] = {i};
    row_sum += objective_s.value_and_grad(theta.cast<S>(), one, g_row);
    g_sum += g_row;
  }
  CHECK(batch_value == Approx(row_sum / 4).epsilon(1e-5));
  CHECK(g_batch.isApprox(g_sum / S(4), S(1e-4)));
}

TEMPLATE_TEST_CASE("minimize converges on a quadratic with every transform", "[minimize]", float, double) {
  using S = TestType;
  const problems::Quadratic<S> quadratic(9, 10.0);
  const double tol = std::is_same_v<S, float> ? 1e-4 : 1e-8;
  auto check = [&](const auto& transform, Index max_steps) {
    Vector<S> x = Vector<S>::Zero(9);
    const auto result = minimize(quadratic, x, transform, Stop{.max_steps = max_steps, .grad_tol = tol});
    CHECK(result.reason == StopReason::GradTol);
    CHECK(result.converged());
    CHECK(result.grad_norm <= tol);
    CHECK(x.isApprox(quadratic.c, S(1e-3)));
    CHECK(result.evaluations == result.steps + 1);
  };
  check(sgd<S>({.learning_rate = 0.15}), 2000);
  check(momentum<S>({.learning_rate = 0.05}), 2000);
  check(momentum<S>({.learning_rate = 0.05, .nesterov = true}), 2000);
  check(chain(clip_by_global_norm<S>(S(1)), adam<S>({.learning_rate = CosineDecay<S>{.initial = S(0.1),
                                                                                     .decay_steps = 3000}})),
        6000);
}

TEST_CASE("minimize solves Rosenbrock", "[minimize]") {
  const problems::Rosenbrock<double> rosenbrock;
  for (bool use_adam : {true, false}) {
    Vector<double> x(2);
    x << -1.2, 1.0;
    const auto result =
        use_adam ? minimize(rosenbrock, x, adam<double>({.learning_rate = 0.02}), Stop{.max_steps = 20000, .grad_tol = 1e-6})
                 : minimize(rosenbrock, x, momentum<double>({.learning_rate = 1e-3, .momentum = 0.9}),
                            Stop{.max_steps = 50000, .grad_tol = 1e-6});
    CAPTURE(use_adam, result.steps, result.value);
    CHECK(x(0) == Approx(1.0).epsilon(1e-4));
    CHECK(x(1) == Approx(1.0).epsilon(1e-4));
  }
}

TEMPLATE_TEST_CASE("minimize fits L2-regularized logistic regression", "[minimize]", float, double) {
  using S = TestType;
  auto objective = logistic_objective<S>(200, 5, S(0.01));
  Vector<S> x = objective.model().init_params(1);
  const double tol = std::is_same_v<S, float> ? 1e-5 : 1e-9;
  const auto result = minimize(objective, x, momentum<S>({.learning_rate = 0.5}),
                               Stop{.max_steps = 5000, .grad_tol = tol});
  CHECK(result.reason == StopReason::GradTol);
  // Stationarity checked independently; a strongly convex problem has one minimizer.
  Vector<S> g(objective.dim());
  objective.value_and_grad(x, g);
  CHECK(g.norm() <= S(2 * tol));
  Vector<S> x_adam = objective.model().init_params(2);
  minimize(objective, x_adam, adam<S>({.learning_rate = 0.05}), Stop{.max_steps = 20000, .grad_tol = tol});
  CHECK(x_adam.isApprox(x, S(1e-3)));

  // Minibatch SGD gets close on average (noisy).
  Vector<S> x_sgd = objective.model().init_params(1);
  minimize(objective, x_sgd, sgd<S>({.learning_rate = StepDecay<S>{.initial = S(0.5), .factor = S(0.5), .every = 500}}),
           Stop{.max_steps = 3000}, Minibatch{.batch_size = 20, .seed = 7});
  CHECK(objective.value(x_sgd) <= objective.value(x) + S(1e-3));
}

TEST_CASE("minimize stops for the reason it reports", "[minimize]") {
  const problems::Quadratic<double> quadratic(4, 3.0);
  Vector<double> x = Vector<double>::Zero(4);
  auto result = minimize(quadratic, x, sgd<double>({.learning_rate = 0.01}), Stop{.max_steps = 7});
  CHECK(result.reason == StopReason::MaxSteps);
  CHECK(result.steps == 7);
  CHECK(result.evaluations == 8);
  CHECK(result.message == "max_steps reached");
  CHECK(result.grad_norm > 0);

  x.setZero();
  result = minimize(quadratic, x, sgd<double>({.learning_rate = 0.1}), Stop{.max_steps = 100000, .loss_tol = 1e-10});
  CHECK(result.reason == StopReason::LossTol);
  CHECK(result.steps < 100000);

  x.setZero();
  result = minimize(quadratic, x, sgd<double>({.learning_rate = 0.1}), Stop{.max_steps = 0});
  CHECK(result.steps == 0);
  CHECK(x.isZero());
}

TEST_CASE("callbacks fire as documented", "[minimize][callbacks]") {
  const problems::Quadratic<double> quadratic(3, 2.0);
  Vector<double> x = Vector<double>::Zero(3);
  LossLog log{.every = 5};
  BestParameters<double> best;
  int calls = 0;
  struct Counter {
    int* calls;
    void on_step(const StepInfo<double>&) { ++*calls; }
  };
  std::FILE* sink = std::tmpfile();
  REQUIRE(sink != nullptr);
  const auto result = minimize(quadratic, x, sgd<double>({.learning_rate = 0.1}), Stop{.max_steps = 20}, log, best,
                               Counter{&calls}, ProgressBar({.line_seconds = 0, .out = sink}));
  CHECK(calls == 21);
  REQUIRE(log.history.size() == 5);
  CHECK(log.history[0].first == 0);
  CHECK(log.history[4].first == 20);
  CHECK(log.history[4].second == Approx(result.value));
  CHECK(best.step == 20);  // gradient descent on a quadratic decreases monotonically
  CHECK(best.params == x);
  CHECK(best.value == result.value);

  // The progress bar wrote plain lines (not a terminal) and a summary.
  std::rewind(sink);
  std::string text(4096, '\0');
  text.resize(std::fread(text.data(), 1, text.size(), sink));
  std::fclose(sink);
  CHECK(text.find("step 0/20") != std::string::npos);
  CHECK(text.find("step 20/20") != std::string::npos);
  CHECK(text.find("steps/s") != std::string::npos);
  CHECK(text.find("ETA") != std::string::npos);
  CHECK(text.find("done: 20 steps") != std::string::npos);

  // BestParameters restores the best iterate when asked: a step size that diverges.
  x.setZero();
  BestParameters<double> keep{.restore = true};
  minimize(quadratic, x, sgd<double>({.learning_rate = 2.5}), Stop{.max_steps = 30}, keep);
  CHECK(keep.step == 0);
  CHECK(x.isZero());
}

TEST_CASE("early stopping watches a validation objective with patience", "[minimize][callbacks]") {
  // Training pulls x towards c; the validation optimum is elsewhere, so validation loss
  // improves first, then worsens.
  const problems::Quadratic<double> training(2, 1.0);
  problems::Quadratic<double> validation(2, 1.0);
  validation.c = 0.5 * training.c;
  Vector<double> x = Vector<double>::Zero(2);
  x(0) = -2;
  EarlyStopping stopper(validation, {.patience = 3, .every = 2});
  const auto result = minimize(training, x, sgd<double>({.learning_rate = 0.1}), Stop{.max_steps = 1000}, stopper);
  CHECK(result.reason == StopReason::Callback);
  CHECK(result.message.find("early stopping") != std::string::npos);
  CHECK(result.steps == stopper.best_step() + 6);
  CHECK(stopper.history().size() == static_cast<std::size_t>(result.steps / 2 + 1));
  CHECK(stopper.best_value() == Approx(std::min_element(stopper.history().begin(), stopper.history().end(),
                                                        [](auto& a, auto& b) { return a.second < b.second; })
                                           ->second));
  CHECK_THROWS_AS(EarlyStopping(validation, {.patience = 0}), gradus::invalid_argument);
}

TEST_CASE("a non-finite loss stops the run; NonFiniteGuard keeps the last finite parameters", "[minimize][callbacks]") {
  // Finite while x < 3, NaN beyond: gradient descent walks towards c = 5.
  struct Cliff {
    using Scalar = double;
    Index dim() const { return 1; }
    double value_and_grad(const Eigen::Ref<const Vector<double>>& x, Eigen::Ref<Vector<double>> g) const {
      g(0) = x(0) - 5;
      return x(0) < 3 ? 0.5 * g(0) * g(0) : std::nan("");
    }
  };
  Cliff cliff;
  Vector<double> x = Vector<double>::Zero(1);
  auto result = minimize(cliff, x, sgd<double>({.learning_rate = 0.5}), Stop{.max_steps = 100});
  CHECK(result.reason == StopReason::NonFinite);
  CHECK(result.message.find("non-finite loss") != std::string::npos);
  CHECK(x(0) < 3);  // the guard only reports: minimize itself keeps the last finite parameters

  x.setZero();
  NonFiniteGuard<double> guard(false);
  result = minimize(cliff, x, sgd<double>({.learning_rate = 0.5}), Stop{.max_steps = 100}, guard);
  CHECK(result.reason == StopReason::NonFinite);
  CHECK(x(0) < 3);
  CHECK(x(0) == guard.last_finite(0));
  CHECK(result.message.find("restored to step " + std::to_string(guard.last_finite_step)) != std::string::npos);

  // A NaN gradient with a finite loss.
  struct NanGradient {
    using Scalar = double;
    Index dim() const { return 1; }
    double value_and_grad(const Eigen::Ref<const Vector<double>>& x, Eigen::Ref<Vector<double>> g) const {
      g(0) = x(0) > 1 ? std::nan("") : -1.0;
      return -x(0);
    }
  };
  NanGradient nan_gradient;
  x.setZero();
  result = minimize(nan_gradient, x, sgd<double>({.learning_rate = 0.3}), Stop{.max_steps = 100}, guard);
  CHECK(result.reason == StopReason::NonFinite);
  CHECK(result.message.find("non-finite gradient") != std::string::npos);
  CHECK(x(0) == Approx(0.9));  // 0.3 per step; the gradient at 1.2 is NaN
}

TEST_CASE("a resumed minibatch run is bit-identical to an uninterrupted one", "[minimize][checkpoint]") {
  auto objective = logistic_objective<double>(103, 4, 0.001);
  const auto opt = chain(clip_by_global_norm(5.0), adam<double>({.learning_rate = 0.05}));
  const Vector<double> start = objective.model().init_params(3);

  Vector<double> straight = start;
  minimize(objective, straight, opt, Stop{.max_steps = 60}, Minibatch{.batch_size = 10, .seed = 4});

  Vector<double> resumed = start;
  auto state = opt.init(resumed);
  minimize(objective, resumed, opt, state, Stop{.max_steps = 25}, Minibatch{.batch_size = 10, .seed = 4});
  std::stringstream checkpoint;
  save_state(checkpoint, state);
  auto restored = opt.init(resumed);
  load_state(checkpoint, restored);
  minimize(objective, resumed, opt, restored, Stop{.max_steps = 35},
           Minibatch{.batch_size = 10, .seed = 4, .start_step = 25});
  CHECK(resumed == straight);
}

TEST_CASE("minibatches cover every row once per epoch", "[minimize]") {
  std::vector<std::multiset<Index>> epochs(3);
  struct Recorder {
    using Scalar = double;
    std::vector<std::multiset<Index>>* epochs;
    Index seen = 0;
    Index dim() const { return 1; }
    Index num_samples() const { return 10; }
    double value_and_grad(const Eigen::Ref<const Vector<double>>&, Eigen::Ref<Vector<double>> g) {
      g.setZero();
      return 0;
    }
    double value_and_grad(const Eigen::Ref<const Vector<double>>&, std::span<const Index> batch,
                          Eigen::Ref<Vector<double>> g) {
      for (Index i : batch) (*epochs)[static_cast<std::size_t>(seen++ / 10)].insert(i);
      g.setZero();
      return 0;
    }
  };
  Recorder recorder{&epochs};
  Vector<double> x = Vector<double>::Zero(1);
  minimize(recorder, x, sgd<double>(), Stop{.max_steps = 11}, Minibatch{.batch_size = 3, .seed = 1});
  for (const auto& epoch : epochs) {
    CHECK(epoch.size() == 10);
    CHECK(std::set<Index>(epoch.begin(), epoch.end()).size() == 10);
  }
}

TEST_CASE("minimize and ModelObjective reject bad input", "[minimize][errors]") {
  auto objective = logistic_objective<double>(20, 3, 0.0);
  Vector<double> x = Vector<double>::Zero(3);  // dim is 4
  CHECK_THROWS_WITH(minimize(objective, x, sgd<double>(), Stop{}),
                    "gradus::minimize: argument 'x': expected 4 entries (objective dim), got 3");
  x = Vector<double>::Zero(4);
  CHECK_THROWS_AS(minimize(objective, x, sgd<double>(), Stop{.max_steps = -1}), gradus::invalid_argument);
  CHECK_THROWS_AS(minimize(objective, x, sgd<double>(), Stop{.grad_tol = -1}), gradus::invalid_argument);
  CHECK_THROWS_AS(minimize(objective, x, sgd<double>(), Stop{.loss_tol = std::nan("")}), gradus::invalid_argument);
  CHECK_THROWS_AS(minimize(objective, x, sgd<double>(), Stop{}, Minibatch{.batch_size = 0}), gradus::invalid_argument);

  Vector<double> g(4);
  const std::vector<Index> out_of_range{0, 20};
  CHECK_THROWS_WITH(objective.value_and_grad(x, out_of_range, g),
                    "gradus::ModelObjective::value_and_grad: argument 'batch': expected a value in [0, 20), got 20");
  CHECK_THROWS_AS(objective.value_and_grad(x, std::span<const Index>{}, g), gradus::invalid_argument);
  Vector<double> short_g(3);
  CHECK_THROWS_AS(objective.value_and_grad(x, short_g), gradus::invalid_argument);
  CHECK_THROWS_AS(objective.value(Vector<double>::Zero(5)), gradus::invalid_argument);

  auto [X, y] = problems::classification_data<double>(10, 3, 1);
  CHECK_THROWS_AS(make_objective(LinearModel<double>(4, 1), LogisticLoss<double>{}, X, y), gradus::invalid_argument);
  CHECK_THROWS_AS(make_objective(LinearModel<double>(3, 1), LogisticLoss<double>{}, X, Labels(9)),
                  gradus::invalid_argument);
  CHECK_THROWS_AS(make_objective(LinearModel<double>(3, 1), LogisticLoss<double>{}, RowMatrix<double>(0, 3), Labels(0)),
                  gradus::invalid_argument);
  CHECK_THROWS_AS(make_objective(LinearModel<double>(3, 1), LogisticLoss<double>{}, X, y, {.l2 = -1}),
                  gradus::invalid_argument);
  CHECK_NOTHROW(make_objective(LinearModel<double>(3, 1), LogisticLoss<double>{}, X, y,
                               {.l2 = std::numeric_limits<double>::max()}));
  CHECK_THROWS_WITH(make_objective(LinearModel<double>(3, 1), LogisticLoss<double>{}, X, y,
                                   {.l2 = std::numeric_limits<double>::infinity()}),
                    "gradus::ModelObjective: argument 'options.l2': expected a finite value >= 0, got inf");
  // Labels out of the loss's range are the loss's to reject.
  Labels bad = y;
  bad(0) = 7;
  auto ce = make_objective(LinearModel<double>(3, 2), CrossEntropyLoss<double>{}, X, bad);
  Vector<double> g6(6);
  CHECK_THROWS_AS(ce.value_and_grad(Vector<double>::Zero(6), g6), gradus::invalid_argument);
}

namespace {

// The quadratic until evaluation `fail_at` (0-based), then a NaN loss or a NaN gradient entry.
template <class S>
struct FailsAt {
  using Scalar = S;
  problems::Quadratic<S> quadratic{3, 4.0};
  Index fail_at;
  bool nan_loss;
  mutable Index evaluations = 0;

  Index dim() const { return 3; }
  S value_and_grad(const Eigen::Ref<const Vector<S>>& x, Eigen::Ref<Vector<S>> g) const {
    S value = quadratic.value_and_grad(x, g);
    if (evaluations++ == fail_at) {
      if (nan_loss) value = std::numeric_limits<S>::quiet_NaN();
      else g(1) = std::numeric_limits<S>::quiet_NaN();
    }
    return value;
  }
};

// Requests a stop at every step, the failing one included.
struct AlwaysStop {
  bool on_step(const StepInfo<double>&) { return true; }
};

}  // namespace

TEMPLATE_TEST_CASE("minimize never returns non-finite parameters, whatever the callbacks", "[minimize][callbacks]",
                   float, double) {
  using S = TestType;
  const auto opt = adam<S>({.learning_rate = S(0.1)});
  // x_4: four updates of the same run, without failure.
  const FailsAt<S> healthy{.fail_at = -1, .nan_loss = true};
  Vector<S> x4 = Vector<S>::Zero(3);
  const auto reference = minimize(healthy, x4, opt, Stop{.max_steps = 4});
  REQUIRE(reference.steps == 4);

  for (const bool nan_loss : {true, false}) {
    CAPTURE(nan_loss);
    const FailsAt<S> objective{.fail_at = 5, .nan_loss = nan_loss};
    Vector<S> x = Vector<S>::Zero(3);
    auto state = opt.init(x);
    const auto result = minimize(objective, x, opt, state, Stop{.max_steps = 100});
    CHECK(result.reason == StopReason::NonFinite);
    CHECK(x == x4);  // the loss and gradient at step 5 were non-finite: x_4, bit for bit
    CHECK(result.steps == 4);
    CHECK(result.evaluations == 6);
    CHECK(result.value == reference.value);
    CHECK(result.grad_norm == reference.grad_norm);
    CHECK(result.message == std::string("gradus::minimize: non-finite ") + (nan_loss ? "loss (nan)" : "gradient (norm nan)") +
                                " at step 5; parameters restored to step 4, the last finite one");
    CHECK(state.step == 5);  // the update towards x_5 was taken; the NaN never reached the state
    CHECK(state.mu.allFinite());
    CHECK(state.nu.allFinite());
  }

  // Step 0 already fails: x is the starting point.
  const FailsAt<S> at_once{.fail_at = 0, .nan_loss = false};
  Vector<S> x = Vector<S>::Constant(3, S(0.5));
  auto result = minimize(at_once, x, opt, Stop{});
  CHECK(result.reason == StopReason::NonFinite);
  CHECK(x.isConstant(S(0.5)));
  CHECK(result.steps == 0);
  CHECK(result.message.find("at step 0; no finite step to restore, parameters are the starting ones") !=
        std::string::npos);

  // Callbacks: logging, a best-parameters record, a guard.
  x.setZero();
  LossLog log{.every = 1};
  BestParameters<S> best;
  NonFiniteGuard<S> guard(false);
  FailsAt<S> fails{.fail_at = 5, .nan_loss = false};
  result = minimize(fails, x, opt, Stop{}, log, best, guard);
  CHECK(x == x4);
  CHECK(log.history.size() == 6);  // the failing step is reported to the callbacks
  CHECK(best.step <= 4);           // but never recorded as the best: its gradient was NaN
  CHECK(guard.last_finite_step == 4);
  CHECK(guard.last_finite == x4);
}

TEST_CASE("minimize: a callback stopping at the failing step does not hide it", "[minimize][callbacks]") {
  Vector<double> x = Vector<double>::Zero(3);
  const FailsAt<double> at_once{.fail_at = 0, .nan_loss = true};
  const auto result = minimize(at_once, x, sgd<double>(), Stop{}, AlwaysStop{});
  CHECK(result.reason == StopReason::NonFinite);
  CHECK(x.isZero());
  x.setZero();
  const FailsAt<double> at_three{.fail_at = 3, .nan_loss = true};
  const auto later = minimize(at_three, x, sgd<double>(),
                              Stop{.max_steps = 10}, BestParameters<double>{.restore = true});
  CHECK(later.reason == StopReason::NonFinite);
  CHECK(x.allFinite());
}

TEST_CASE("minimize: finite gradients whose norm overflows are not non-finite", "[minimize]") {
  struct Huge {
    using Scalar = float;
    Index dim() const { return 2; }
    float value_and_grad(const Eigen::Ref<const Vector<float>>&, Eigen::Ref<Vector<float>> g) const {
      g.setConstant(3e38f);
      return 1;
    }
  };
  Vector<float> x = Vector<float>::Zero(2);
  const Huge huge;
  const auto result = minimize(huge, x, sgd<float>({.learning_rate = 1e-38f}), Stop{.max_steps = 3});
  CHECK(result.reason == StopReason::MaxSteps);
  CHECK(std::isinf(result.grad_norm));  // the norm itself is beyond float
  CHECK(x.allFinite());
}

TEMPLATE_TEST_CASE("result.value and result.grad_norm describe the returned x", "[minimize]", float, double) {
  using S = TestType;
  auto objective = logistic_objective<S>(60, 3, S(0.01));
  Vector<S> g(objective.dim());
  for (const double grad_tol : {0.0, 1e-3}) {
    Vector<S> x = objective.model().init_params(5);
    const auto result = minimize(objective, x, adam<S>({.learning_rate = S(0.05)}),
                                 Stop{.max_steps = 50, .grad_tol = grad_tol});
    CHECK(result.value == objective.value_and_grad(x, g));
    CHECK(result.grad_norm == Approx(g.norm()).epsilon(1e-6));
  }
  // BestParameters{.restore = true} replaces x: the result follows it. (A diverging step size.)
  const problems::Quadratic<S> quadratic(3, 2.0);
  Vector<S> x = Vector<S>::Zero(3);
  BestParameters<S> best{.restore = true};
  const auto result = minimize(quadratic, x, sgd<S>({.learning_rate = S(2.5)}), Stop{.max_steps = 12}, best);
  CHECK(result.steps == 0);
  CHECK(x.isZero());
  Vector<S> gq(3);
  CHECK(result.value == quadratic.value_and_grad(x, gq));
  CHECK(result.grad_norm == Approx(gq.norm()));
  // In a minibatch run they are the last minibatch's, at the returned x.
  Vector<S> xb = objective.model().init_params(5);
  LossLog log{.every = 1};
  const auto batched = minimize(objective, xb, sgd<S>({.learning_rate = S(0.1)}), Stop{.max_steps = 7},
                                Minibatch{.batch_size = 8, .seed = 2}, log);
  CHECK(batched.value == S(log.history.back().second));
}

TEST_CASE("minimize and its callbacks: every option's boundary", "[minimize][errors]") {
  const problems::Quadratic<double> quadratic(2, 2.0);
  Vector<double> x = Vector<double>::Zero(2);
  const double big = std::numeric_limits<double>::max(), inf = std::numeric_limits<double>::infinity();
  const double below_zero = std::nextafter(0.0, -1.0);
  CHECK(minimize(quadratic, x, sgd<double>(), Stop{.max_steps = 5, .grad_tol = big}).reason == StopReason::GradTol);
  CHECK(minimize(quadratic, x, sgd<double>(), Stop{.max_steps = 5, .loss_tol = big}).steps == 1);
  for (const double tol : {inf, below_zero, std::nan("")}) {
    CHECK_THROWS_AS(minimize(quadratic, x, sgd<double>(), Stop{.grad_tol = tol}), gradus::invalid_argument);
    CHECK_THROWS_AS(minimize(quadratic, x, sgd<double>(), Stop{.loss_tol = tol}), gradus::invalid_argument);
  }
  CHECK_THROWS_WITH(minimize(quadratic, x, sgd<double>(), Stop{.grad_tol = inf}),
                    "gradus::minimize: argument 'stop.grad_tol': expected a finite value >= 0, got inf");

  // Minibatches: batch_size >= 1 (any size; beyond the rows it is the full batch); start_step
  // + max_steps within the step counter.
  auto objective = logistic_objective<double>(20, 3, 0.0);
  Vector<double> theta = Vector<double>::Zero(4);
  const Index top = std::numeric_limits<Index>::max();
  CHECK(minimize(objective, theta, sgd<double>(), Stop{.max_steps = 2}, Minibatch{.batch_size = top}).steps == 2);
  CHECK(minimize(objective, theta, sgd<double>(), Stop{.max_steps = 2},
                 Minibatch{.batch_size = 3, .start_step = top - 2})
            .steps == 2);
  CHECK_THROWS_WITH(minimize(objective, theta, sgd<double>(), Stop{.max_steps = 2},
                             Minibatch{.batch_size = 3, .start_step = top - 1}),
                    Catch::StartsWith("gradus::minimize: argument 'minibatch.start_step': expected a value in [0, "));
  CHECK_THROWS_AS(minimize(objective, theta, sgd<double>(), Stop{}, Minibatch{.start_step = -1}),
                  gradus::invalid_argument);

  // Callbacks.
  CHECK_THROWS_WITH(minimize(quadratic, x, sgd<double>(), Stop{}, LossLog{.every = 0}),
                    "gradus::LossLog: argument 'every': expected a value > 0, got 0");
  CHECK_THROWS_AS(minimize(quadratic, x, sgd<double>(), Stop{}, LossLog{.print = true, .out = nullptr}),
                  gradus::invalid_argument);
  CHECK_THROWS_AS(ProgressBar({.out = nullptr}), gradus::invalid_argument);
  problems::Quadratic<double> validation(2, 1.0);
  CHECK_NOTHROW(EarlyStopping(validation, {.min_delta = big}));
  CHECK_THROWS_AS(EarlyStopping(validation, {.min_delta = inf}), gradus::invalid_argument);
  CHECK_THROWS_AS(EarlyStopping(validation, {.min_delta = below_zero}), gradus::invalid_argument);
}
