#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include <Eigen/Cholesky>

#include <gradus/losses/comp_sum.hpp>
#include <gradus/models/linear.hpp>
#include <gradus/models/mlp.hpp>
#include <gradus/optim/objective.hpp>
#include <gradus/optim/sso.hpp>

#include "optim_problems.hpp"

using namespace gradus;
using problems::LogisticLoss;

static_assert(SurrogateObjective<ModelObjective<LinearModel<float>, LogisticLoss<float>>>);

namespace {

template <class S>
auto logistic_objective(Index rows, Index cols, S l2) {
  auto [X, y] = problems::classification_data<S>(rows, cols, 11);
  return make_objective(LinearModel<S>(cols, 1), LogisticLoss<S>{}, std::move(X), std::move(y), {.l2 = l2});
}

// J^T products a finite outer step costs: one per inner step tried, that is one per accepted
// step, plus the one whose line search failed when the inner loop stopped early.
template <class S>
Index expected_vjps(const SSOStep<S>& step, Index inner_steps) {
  return std::min(step.inner_steps + 1, inner_steps);
}

}  // namespace

TEMPLATE_TEST_CASE("SSO with m = 1 and a matched step is one (S)GD step", "[sso]", float, double) {
  using S = TestType;
  auto objective = logistic_objective<S>(40, 3, S(0.01));
  const SSO<S> sso{.eta = S(3), .inner_steps = 1, .inner = sgd<S>({.learning_rate = 0.7}), .line_search = false};
  const std::vector<Index> batch{3, 17, 17, 22, 39};
  for (bool minibatch : {false, true}) {
    Vector<S> theta = objective.model().init_params(2), expected = theta;
    Vector<S> g(objective.dim());
    auto state = sso.init(theta);
    for (int t = 0; t < 5; ++t) {
      const S loss = minibatch ? objective.value_and_grad(expected, batch, g) : objective.value_and_grad(expected, g);
      expected -= S(0.7) * g;
      const auto step = minibatch ? sso.step(objective, theta, state, batch) : sso.step(objective, theta, state);
      CHECK(step.loss == Approx(loss).epsilon(1e-6));
      CHECK(step.finite);
      CHECK(theta.isApprox(expected, S(1e-6)));
    }
    CHECK(state.counts.oracle_calls == 5);
    CHECK(state.counts.model_vjps == 5);
    CHECK(state.counts.model_predictions == 10);  // z_t, and the surrogate at the new point
  }
}

TEMPLATE_TEST_CASE("SSO with line search decreases the full-batch loss monotonically", "[sso]", float, double) {
  using S = TestType;
  // Logistic loss: per-sample smoothness 1/4, so eta <= 4 makes the surrogate an upper bound.
  auto linear = logistic_objective<S>(120, 6, S(0.001));
  auto [X, y] = problems::classification_data<S>(120, 4, 5);
  auto network = make_objective(MLP<S>({4, 6, 1}, Activation::Tanh), LogisticLoss<S>{}, X, y);
  auto check = [](const auto& objective, const auto& sso, int outer_steps) {
    Vector<S> theta = objective.model().init_params(1);
    auto state = sso.init(theta);
    S previous = objective.value(theta);
    const S initial = previous;
    Index vjps = 0;
    for (int t = 0; t < outer_steps; ++t) {
      const auto step = sso.step(objective, theta, state);
      vjps += expected_vjps(step, sso.inner_steps);
      const S now = objective.value(theta);
      CHECK(step.loss == Approx(previous).epsilon(1e-5));
      CHECK(step.surrogate_end <= step.loss);
      CHECK(now <= step.surrogate_end * (1 + 1e-5) + 1e-6);  // h <= q_t: majorization
      CHECK(now <= previous * (1 + 1e-6));
      previous = now;
    }
    CHECK(previous < S(0.8) * initial);
    CHECK(state.counts.oracle_calls == outer_steps);
    CHECK(state.counts.inner_steps > outer_steps);
    // Whether a line search runs out of decrease near the optimum depends on rounding (it
    // does on some instruction sets), so the cost is checked against each step's own count.
    CHECK(state.counts.model_vjps == vjps);
    CHECK(state.counts.model_vjps <= state.counts.inner_steps + outer_steps);
  };
  check(linear, SSO<S>{.eta = S(4), .inner_steps = 20}, 15);
  check(network, SSO<S>{.eta = S(2), .inner_steps = 10}, 10);  // non-convex model, still monotone
  // Any transform can run the inner loop.
  check(linear, SSO<S, Adam<S>>{.eta = S(4), .inner_steps = 20, .inner = adam<S>({.learning_rate = 0.05})}, 10);
  check(linear, SSO<S>{.eta = S(4), .inner_steps = 20, .reset_inner_state = false}, 10);
}

TEMPLATE_TEST_CASE("SSO counts the J^T of an inner step whose line search fails", "[sso]", float, double) {
  using S = TestType;
  auto objective = logistic_objective<S>(40, 3, S(0.01));
  // Two trial steps of about 1e30 along -grad: both overshoot, so each inner loop stops at once.
  const SSO<S> sso{.eta = S(3), .inner_steps = 5, .armijo = {.initial_step = S(1e30), .max_backtracks = 1}};
  Vector<S> theta = objective.model().init_params(2);
  const Vector<S> start = theta;
  auto state = sso.init(theta);
  for (int t = 0; t < 3; ++t) {
    const auto step = sso.step(objective, theta, state);
    CHECK(step.finite);
    CHECK(step.inner_steps == 0);
    CHECK(step.surrogate_end == step.loss);
    CHECK(expected_vjps(step, sso.inner_steps) == 1);
  }
  CHECK(theta == start);
  CHECK(state.counts.inner_steps == 0);
  CHECK(state.counts.model_vjps == 3);              // one per failed search, not one per accepted step
  CHECK(state.counts.model_predictions == 3 + 3 * 2);  // z_t, and each of the two trials
}

TEST_CASE("SSO with an exact inner solve on a linear model is the preconditioned step", "[sso]") {
  // theta_{t+1} = argmin q_t = theta_t - eta n (A^T A)^{-1} A^T G_t with A = [X 1].
  auto [X, y] = problems::classification_data<double>(50, 3, 2);
  auto objective = make_objective(LinearModel<double>(3, 1), LogisticLoss<double>{}, X, y);
  const SSO<double> sso{.eta = 2.0, .inner_steps = 3000};
  Vector<double> theta = objective.model().init_params(5);
  RowMatrix<double> A(50, 4);
  A << X, RowMatrix<double>::Ones(50, 1);
  RowMatrix<double> Z(50, 1), G(50, 1);
  objective.model().predict(theta, X, Z);
  objective.loss().value_and_grad(Z, y, G);
  const Vector<double> expected =
      theta - 2.0 * 50 * (A.transpose() * A).ldlt().solve(A.transpose() * Eigen::Map<Vector<double>>(G.data(), 50));
  auto state = sso.init(theta);
  sso.step(objective, theta, state);
  CHECK(theta.isApprox(expected, 1e-6));
}

TEST_CASE("SSO works with cross-entropy over several outputs", "[sso]") {
  auto [X, y] = problems::classification_data<double>(60, 5, 8);
  y.head(20).setConstant(2);
  auto objective = make_objective(LinearModel<double>(5, 3), CrossEntropyLoss<double>{}, X, y);
  const SSO<double> sso{.eta = 1.0, .inner_steps = 10};
  Vector<double> theta = objective.model().init_params(3);
  auto state = sso.init(theta);
  const double initial = objective.value(theta);
  for (int t = 0; t < 10; ++t) sso.step(objective, theta, state);
  CHECK(objective.value(theta) < 0.7 * initial);
}

TEST_CASE("SSO rejects bad input and reports non-finite values", "[sso][errors]") {
  auto objective = logistic_objective<double>(30, 3, 0.0);
  Vector<double> theta = objective.model().init_params(1);
  CHECK_THROWS_WITH(SSO<double>{.eta = 0}.init(theta), "gradus::SSO: argument 'eta': expected a finite value > 0, got 0");
  CHECK_THROWS_AS(SSO<double>{.eta = -1}.init(theta), gradus::invalid_argument);
  CHECK_THROWS_AS(SSO<double>{.eta = std::nan("")}.init(theta), gradus::invalid_argument);
  CHECK_THROWS_WITH(SSO<double>{.inner_steps = 0}.init(theta),
                    "gradus::SSO: argument 'inner_steps': expected a value > 0, got 0");
  CHECK_THROWS_AS(SSO<double>{.armijo = {.c = 1.5}}.init(theta), gradus::invalid_argument);
  CHECK_THROWS_AS(SSO<double>{.armijo = {.shrink = 1.0}}.init(theta), gradus::invalid_argument);

  // The edges of each domain: the last accepted value works, the next is refused.
  const double big = std::numeric_limits<double>::max(), inf = std::numeric_limits<double>::infinity();
  const double tiny = std::numeric_limits<double>::denorm_min(), below_one = std::nextafter(1.0, 0.0);
  for (const SSO<double>& accepted : {SSO<double>{.eta = big}, SSO<double>{.eta = tiny},
                                      SSO<double>{.armijo = {.c = tiny}}, SSO<double>{.armijo = {.c = below_one}},
                                      SSO<double>{.armijo = {.shrink = tiny}}, SSO<double>{.armijo = {.shrink = below_one}},
                                      SSO<double>{.armijo = {.grow = 1}}, SSO<double>{.armijo = {.grow = big}},
                                      SSO<double>{.armijo = {.initial_step = big}}}) {
    CHECK_NOTHROW(accepted.init(theta));
  }
  for (const SSO<double>& refused : {SSO<double>{.eta = inf}, SSO<double>{.armijo = {.c = 0}},
                                     SSO<double>{.armijo = {.shrink = 0}}, SSO<double>{.armijo = {.grow = below_one}},
                                     SSO<double>{.armijo = {.grow = inf}}, SSO<double>{.armijo = {.initial_step = inf}},
                                     SSO<double>{.armijo = {.max_backtracks = 0}}}) {
    CHECK_THROWS_AS(refused.init(theta), gradus::invalid_argument);
  }

  const SSO<double> sso{};
  auto state = sso.init(theta);
  Vector<double> short_theta = Vector<double>::Zero(2);
  CHECK_THROWS_AS(sso.step(objective, short_theta, state), gradus::invalid_argument);
  const std::vector<Index> bad_batch{0, 30};
  CHECK_THROWS_AS(sso.step(objective, theta, state, bad_batch), gradus::invalid_argument);
  CHECK_THROWS_AS(sso.step(objective, theta, state, std::span<const Index>{}), gradus::invalid_argument);

  // Model outputs the loss cannot take: two columns into a one-logit loss.
  auto [X, y] = problems::classification_data<double>(30, 3, 1);
  auto mismatched = make_objective(LinearModel<double>(3, 2), LogisticLoss<double>{}, X, y);
  Vector<double> theta2 = mismatched.model().init_params(1);
  auto state2 = sso.init(theta2);
  CHECK_THROWS_AS(sso.step(mismatched, theta2, state2), gradus::invalid_argument);

  // A non-finite loss: reported, theta untouched.
  Vector<double> nan_theta = theta;
  nan_theta(0) = std::nan("");
  const Vector<double> before = nan_theta;
  const auto step = sso.step(objective, nan_theta, state);
  CHECK_FALSE(step.finite);
  CHECK(std::isnan(step.loss));
  CHECK(nan_theta.tail(3) == before.tail(3));

  // A non-finite surrogate during inner steps (a huge plain step overflows): theta keeps
  // its last finite value.
  const SSO<double> wild{.eta = 1.0, .inner_steps = 3, .inner = sgd<double>({.learning_rate = 1e308}), .line_search = false};
  Vector<double> start = objective.model().init_params(2);
  auto wild_state = wild.init(start);
  const Vector<double> start_copy = start;
  const auto blown = wild.step(objective, start, wild_state);
  CHECK_FALSE(blown.finite);
  CHECK(start.allFinite());
  CHECK(start == start_copy);
}
