#pragma once
// SSO: stochastic surrogate optimization with target-based surrogates (Lavington, Vaswani,
// Babanezhad, Schmidt, Le Roux, ICML 2023).
//
// Minimize h(theta) = l(f(theta)) for a model z = f(theta; X) and a loss l over its
// predictions whose gradient grad_z l is the expensive part. Each outer step, on the full
// data or on one minibatch of n rows:
//
//   z_t = f(theta_t),   G_t = grad_z l(z_t)                       one expensive oracle call
//   q_t(w) = <G_t, f(w) - z_t> + 1 / (2 eta n) ||f(w) - z_t||^2 + (l2 / 2) ||w||^2
//   theta_{t+1} = m inner steps on q_t from theta_t               cheap: f and J^T only
//
// grad q_t(w) = J_w^T (G_t + (f(w) - z_t) / (eta n)) + l2 w. Completing the square, q_t
// projects the target-space gradient step z_t - eta n G_t onto the reachable targets
// {f(w)}. gradus losses are means over rows, so n G_t is the per-sample loss gradient and
// eta is a per-sample step in target space: q_t majorizes h when eta <= 1/L, L the
// smoothness of the per-sample loss in z (1/4 for the logistic loss). At w = theta_t,
// grad q_t = grad h: one inner step of plain gradient descent (m = 1, no line search) is
// one (S)GD step on h.
//
// Inner steps: the `inner` transform proposes u (default: sgd with rate 1, u = -grad q);
// with line_search the step w + s u is accepted when q(w + s u) <= q(w) + c s <grad q, u>
// (Armijo), shrinking s by `shrink` otherwise; each inner step starts from the previous s
// times `grow` (the authors' LSOpt). If u is not a descent direction the line search uses
// -grad q. With line search every accepted inner step decreases q_t, so on the full batch
// h(theta_{t+1}) <= q_t(theta_{t+1}) <= q_t(theta_t) = h(theta_t) when eta <= 1/L.
//
// Costs are counted in the state: oracle_calls (G_t: one per outer step), model_predictions
// (f) and model_vjps (J^T).
//
//   gradus::SSO<double> sso{.eta = 8.0, .inner_steps = 100};
//   auto state = sso.init(theta);
//   for (int t = 0; t < 50; ++t) sso.step(objective, theta, state);      // or (..., batch)
//   state.counts.oracle_calls;                                           // 50

#include <cmath>
#include <concepts>
#include <limits>
#include <span>
#include <utility>

#include "gradus/core/concepts.hpp"
#include "gradus/core/errors.hpp"
#include "gradus/core/types.hpp"
#include "gradus/optim/transforms.hpp"

namespace gradus {

// What SSO needs from an objective: its model, loss and data (ModelObjective provides them).
template <class F>
concept SurrogateObjective = MinibatchObjective<F> && requires(const F& f, std::span<const Index> batch,
                                                               const Vector<typename F::Scalar>& theta,
                                                               Eigen::Ref<Vector<typename F::Scalar>> g) {
  requires Model<std::remove_cvref_t<decltype(f.model())>>;
  { f.loss() };
  { f.X() } -> std::convertible_to<const RowMatrix<typename F::Scalar>&>;
  { f.y() } -> std::convertible_to<const Labels&>;
  f.gather(batch);
  { f.batch_X() } -> std::convertible_to<const RowMatrix<typename F::Scalar>&>;
  { f.batch_y() } -> std::convertible_to<const Labels&>;
  { f.regularizer(theta) } -> std::convertible_to<typename F::Scalar>;
  f.add_regularizer_grad(theta, g);
};

template <class S>
struct ArmijoOptions {
  S c = S(0.1);              // sufficient-decrease constant (the authors' inner value)
  S shrink = S(0.9);         // backtracking factor (authors' code)
  S grow = S(2);             // each inner step starts from the last accepted step times this
  S initial_step = S(10);    // the first step of every outer step (authors' reset value)
  int max_backtracks = 100;  // then the inner loop ends without moving
};

struct SSOCounts {
  Index outer_steps = 0;
  Index oracle_calls = 0;       // expensive: grad_z l
  Index model_predictions = 0;  // cheap: f(w)
  Index model_vjps = 0;         // cheap: J_w^T v
  Index inner_steps = 0;        // accepted inner steps

  Index model_calls() const { return model_predictions + model_vjps; }
};

template <class S, class InnerState>
struct SSOState {
  InnerState inner;
  S step_size = 0;  // the line search's current step
  SSOCounts counts;
  // Workspace, reused across steps.
  RowMatrix<S> Z_t, G, Z, D, trial_D;
  Vector<S> grad, update, trial;
};

// The result of one outer step.
template <class S>
struct SSOStep {
  S loss = 0;             // l(z_t) + regularizer at theta_t (from the oracle call)
  S surrogate_end = 0;    // q_t(theta_{t+1}) (q_t(theta_t) = loss)
  Index inner_steps = 0;  // accepted inner steps
  bool finite = true;     // false: non-finite loss, gradient or surrogate; theta kept at its last finite value
};

template <class S, Transform Inner = SGD<S>>
  requires std::same_as<typename Inner::Scalar, S>
struct SSO {
  using Scalar = S;
  using State = SSOState<S, typename Inner::State>;

  S eta = 1;               // outer (target-space, per-sample) step size
  Index inner_steps = 10;  // m
  Inner inner = sgd<S>({.learning_rate = S(1)});
  bool line_search = true;
  bool reset_inner_state = true;  // fresh inner state (and line-search step) every outer step
  ArmijoOptions<S> armijo = {};

  State init(const Vector<S>& theta) const {
    validate();
    return State{inner.init(theta), armijo.initial_step, {}, {}, {}, {}, {}, {}, {}, {}, {}};
  }

  // One outer step on all rows.
  template <SurrogateObjective F>
  SSOStep<S> step(const F& objective, Vector<S>& theta, State& state) const {
    return run(objective, objective.X(), objective.y(), theta, state);
  }

  // One outer step on the rows listed in batch.
  template <SurrogateObjective F>
  SSOStep<S> step(const F& objective, Vector<S>& theta, State& state, std::span<const Index> batch) const {
    objective.gather(batch);
    return run(objective, objective.batch_X(), objective.batch_y(), theta, state);
  }

 private:
  void validate() const {
    detail::require_finite_positive("SSO", "eta", eta);
    detail::require_positive("SSO", "inner_steps", inner_steps);
    // Armijo's constants: 0 < c < 1 (c = 0 accepts any increase), 0 < shrink < 1 (0 would end
    // the search at a zero step), and finite steps.
    const auto require_open_unit = [](std::string_view argument, S value) {
      detail::require(value > S(0) && value < S(1), "SSO", argument, "a value in (0, 1)", value);
    };
    require_open_unit("armijo.c", armijo.c);
    require_open_unit("armijo.shrink", armijo.shrink);
    detail::require(armijo.grow >= S(1) && armijo.grow - armijo.grow == S(0), "SSO", "armijo.grow",
                    "a finite value >= 1", armijo.grow);
    detail::require_finite_positive("SSO", "armijo.initial_step", armijo.initial_step);
    detail::require_positive("SSO", "armijo.max_backtracks", armijo.max_backtracks);
  }

  // q_t(w) - l(z_t) from D = f(w) - z_t.
  template <class F>
  static S surrogate(const F& objective, const RowMatrix<S>& G, const RowMatrix<S>& D, S curvature,
                     const Vector<S>& w) {
    return (G.array() * D.array()).sum() + S(0.5) * curvature * D.squaredNorm() + objective.regularizer(w);
  }

  template <class F>
  SSOStep<S> run(const F& objective, const RowMatrix<S>& X, const Labels& y, Vector<S>& theta, State& state) const {
    validate();
    const auto& model = objective.model();
    detail::require_size("SSO::step", "theta", theta.size(), model.num_params(), "entries (model num_params)");
    const Index n = X.rows(), outputs = model.num_outputs();
    auto& c = state.counts;
    ++c.outer_steps;

    // The expensive part: z_t and G_t = grad_z l(z_t), once.
    state.Z_t.resize(n, outputs);
    state.G.resize(n, outputs);
    model.predict(theta, X, state.Z_t);
    ++c.model_predictions;
    SSOStep<S> result;
    const S data_loss = objective.loss().value_and_grad(state.Z_t, y, state.G);  // l(z_t)
    result.loss = data_loss + objective.regularizer(theta);
    ++c.oracle_calls;
    if (!std::isfinite(result.loss) || !state.G.allFinite()) {
      result.finite = false;
      result.surrogate_end = result.loss;
      return result;
    }

    if (reset_inner_state) {
      state.inner = inner.init(theta);
      state.step_size = armijo.initial_step;
    }
    const S curvature = S(1) / (eta * static_cast<S>(n));
    state.D.setZero(n, outputs);  // f(theta_t) - z_t
    S q = objective.regularizer(theta);  // q_t(w) - l(z_t), tracked at the current w
    for (Index k = 0; k < inner_steps; ++k) {
      // grad q(w) = J^T (G + curvature D) + l2 w
      state.Z = state.G + curvature * state.D;
      state.grad.resize(theta.size());
      model.vjp_params(theta, X, state.Z, state.grad);
      objective.add_regularizer_grad(theta, state.grad);
      ++c.model_vjps;
      state.update = state.grad;
      inner.update(state.update, state.inner, theta);
      const bool moved = line_search ? search(objective, X, q, theta, state) : take(objective, X, q, theta, state);
      if (!moved) {
        result.finite = std::isfinite(q) && state.update.allFinite();
        break;
      }
      ++result.inner_steps;
      ++c.inner_steps;
    }
    result.surrogate_end = data_loss + q;
    return result;
  }

  // Evaluates q at state.trial into state.trial_D; returns q.
  template <class F>
  S evaluate_trial(const F& objective, const RowMatrix<S>& X, State& state) const {
    const auto& model = objective.model();
    state.trial_D.resize(state.Z_t.rows(), state.Z_t.cols());
    model.predict(state.trial, X, state.trial_D);
    ++state.counts.model_predictions;
    state.trial_D -= state.Z_t;
    return surrogate(objective, state.G, state.trial_D, S(1) / (eta * static_cast<S>(X.rows())), state.trial);
  }

  void accept(S trial_q, S& q, Vector<S>& theta, State& state) const {
    q = trial_q;
    theta.swap(state.trial);
    state.D.swap(state.trial_D);
  }

  // Plain step w + u; refuses a non-finite result.
  template <class F>
  bool take(const F& objective, const RowMatrix<S>& X, S& q, Vector<S>& theta, State& state) const {
    state.trial = theta + state.update;
    const S trial_q = evaluate_trial(objective, X, state);
    if (!std::isfinite(trial_q)) {
      q = trial_q;  // reported as non-finite; theta stays at the last finite iterate
      return false;
    }
    accept(trial_q, q, theta, state);
    return true;
  }

  // Armijo backtracking along u (or -grad when u is not a descent direction).
  template <class F>
  bool search(const F& objective, const RowMatrix<S>& X, S& q, Vector<S>& theta, State& state) const {
    S slope = state.grad.dot(state.update);
    if (!(slope < 0)) {
      state.update = -state.grad;
      slope = -state.grad.squaredNorm();
    }
    if (slope == S(0)) return false;  // stationary: nothing to gain
    S s = state.step_size * armijo.grow;
    for (int b = 0; b <= armijo.max_backtracks; ++b, s *= armijo.shrink) {
      state.trial = theta + s * state.update;
      const S trial_q = evaluate_trial(objective, X, state);
      if (trial_q <= q + armijo.c * s * slope) {  // false for NaN: backtrack
        state.step_size = s;
        accept(trial_q, q, theta, state);
        return true;
      }
    }
    state.step_size = s;
    return false;
  }
};

}  // namespace gradus
