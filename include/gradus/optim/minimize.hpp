#pragma once
// minimize: the thin loop that drives a gradient transformation on an objective.
//
//   each step k:  f_k, g_k = objective.value_and_grad(x_k)       (or on the next minibatch)
//                 callbacks see (k, f_k, x_k, g_k); stop checks
//                 u_k = transform.update(g_k);  x_{k+1} = x_k + u_k
//
//   auto result = gradus::minimize(objective, x, gradus::adam<double>({.learning_rate = 1e-2}),
//                                  gradus::Stop{.max_steps = 500, .grad_tol = 1e-6},
//                                  gradus::ProgressBar{}, log, best);
//
// The loop owns nothing but x, the gradient buffer, the previous iterate and the transform
// state, so transforms nest (chain, SSO's inner solver) and a run resumes from a saved
// state: pass the state (minimize(objective, x, transform, state, stop, ...)) and, for
// minibatches, the step to continue from (Minibatch::start_step).
//
// Stop criteria (each off when 0): max_steps updates; ||g|| <= grad_tol; |f_k - f_{k-1}|
// <= loss_tol. In minibatch mode they apply to minibatch values. A non-finite loss or
// gradient always stops the run (StopReason::NonFinite) before the transform sees it, and x
// is put back to the previous iterate, the last at which both were finite (the starting x if
// that was step 0). The transform state is not rolled back: it has taken the update that led
// to the non-finite point. x comes back in a buffer of minimize's own (the previous iterate is
// kept by swapping buffers, not by a copy), so re-take x.data() after the call.
//
// The result describes the returned x: result.steps updates led to it, and result.value and
// result.grad_norm are the values the run evaluated there (the full objective in a
// full-batch run, that step's minibatch otherwise). A callback that replaces x in on_end
// keeps them true: BestParameters{.restore = true} sets those of the step it restores.
//
// Callbacks are any objects with some of these members, detected at compile time:
//   bool-or-void on_step(const StepInfo<S>&)     true requests a stop
//   StopReason stop_reason() const, std::string stop_message() const   (why, if it stopped)
//   void on_end(MinimizeResult<S>&, Vector<S>& x)
// Pass them as lvalues to read what they recorded afterwards.

#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <numeric>
#include <optional>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#if __has_include(<unistd.h>)
#include <unistd.h>
#define GRADUS_HAVE_ISATTY 1
#endif

#include "gradus/core/concepts.hpp"
#include "gradus/core/errors.hpp"
#include "gradus/core/random.hpp"
#include "gradus/core/types.hpp"
#include "gradus/optim/transforms.hpp"

namespace gradus {

struct Stop {
  Index max_steps = 1000;
  double grad_tol = 0;
  double loss_tol = 0;
};

// Minibatches of batch_size rows drawn without replacement, reshuffled every epoch (the
// last batch of an epoch may be smaller). Batch k depends only on (seed, k).
struct Minibatch {
  Index batch_size = 32;
  std::uint64_t seed = 0;
  Index start_step = 0;  // the global step to continue from when resuming
};

enum class StopReason { MaxSteps, GradTol, LossTol, NonFinite, Callback };

inline const char* to_string(StopReason reason) {
  switch (reason) {
    case StopReason::MaxSteps: return "max_steps reached";
    case StopReason::GradTol: return "gradient norm below grad_tol";
    case StopReason::LossTol: return "loss change below loss_tol";
    case StopReason::NonFinite: return "non-finite loss or gradient";
    case StopReason::Callback: return "stopped by a callback";
  }
  return "?";
}

template <class S>
struct MinimizeResult {
  Index steps = 0;        // updates that led to the returned x
  Index evaluations = 0;  // value_and_grad calls
  S value = 0;            // objective at the returned x (its minibatch's, in minibatch runs)
  S grad_norm = 0;        // norm of the gradient there
  StopReason reason = StopReason::MaxSteps;
  std::string message;
  double seconds = 0;

  bool converged() const { return reason == StopReason::GradTol || reason == StopReason::LossTol; }
};

template <class S>
struct StepInfo {
  Index step;       // updates applied so far in this call
  Index max_steps;
  S value;
  const Vector<S>& x;
  const Vector<S>& grad;
  double seconds;   // since the call began
  bool finite;      // loss and gradient both finite; if not, this is the last step

  S grad_norm() const { return detail::global_norm(grad); }
};

template <class C, class S>
concept MinimizeCallback = requires(C& c, const StepInfo<S>& info) { c.on_step(info); } ||
                           requires(C& c, MinimizeResult<S>& result, Vector<S>& x) { c.on_end(result, x); };

namespace detail {

// The rows of minibatch k: epoch k / batches_per_epoch of a seeded shuffle.
class BatchSampler {
 public:
  BatchSampler(Index num_samples, const Minibatch& options, Index max_steps) : options_(options) {
    require_positive("minimize", "minibatch.batch_size", options.batch_size);
    require_in_range("minimize", "minibatch.start_step", options.start_step, Index(0),
                     std::numeric_limits<Index>::max() - max_steps, true);
    require_nonempty("minimize", "objective", num_samples, "samples");
    order_.resize(static_cast<std::size_t>(num_samples));
    batches_per_epoch_ = (num_samples - 1) / options.batch_size + 1;
  }

  std::span<const Index> batch(Index step) {
    const Index epoch = step / batches_per_epoch_;
    if (epoch != epoch_) shuffle(epoch);
    const Index first = (step % batches_per_epoch_) * options_.batch_size;
    const Index size = std::min(options_.batch_size, static_cast<Index>(order_.size()) - first);
    return {order_.data() + first, static_cast<std::size_t>(size)};
  }

 private:
  void shuffle(Index epoch) {
    epoch_ = epoch;
    std::iota(order_.begin(), order_.end(), Index(0));
    auto rng = SplitMix64::stream(options_.seed, static_cast<std::uint64_t>(epoch));
    for (std::size_t i = order_.size() - 1; i > 0; --i) std::swap(order_[i], order_[rng.below(i + 1)]);
  }

  Minibatch options_;
  std::vector<Index> order_;
  Index batches_per_epoch_ = 1;
  Index epoch_ = -1;
};

template <class C, class S>
bool notify_step(C& callback, const StepInfo<S>& info) {
  if constexpr (requires { callback.on_step(info); }) {
    if constexpr (std::is_same_v<decltype(callback.on_step(info)), bool>) {
      return callback.on_step(info);
    } else {
      callback.on_step(info);
    }
  }
  return false;
}

template <class C>
void describe_stop(const C& callback, StopReason& reason, std::string& message) {
  reason = StopReason::Callback;
  if constexpr (requires { callback.stop_reason(); }) reason = callback.stop_reason();
  if constexpr (requires { callback.stop_message(); }) message = callback.stop_message();
}

template <class F, Transform T, class... Callbacks>
MinimizeResult<typename F::Scalar> minimize_loop(F& objective, Vector<typename F::Scalar>& x, const T& transform,
                                                 typename T::State& state, const Stop& stop,
                                                 const Minibatch* minibatch, Callbacks&... callbacks) {
  using S = typename F::Scalar;
  require_size("minimize", "x", x.size(), objective.dim(), "entries (objective dim)");
  require_nonnegative("minimize", "stop.max_steps", stop.max_steps);
  require_finite_nonnegative("minimize", "stop.grad_tol", stop.grad_tol);
  require_finite_nonnegative("minimize", "stop.loss_tol", stop.loss_tol);

  std::optional<BatchSampler> sampler;
  if constexpr (MinibatchObjective<F>) {
    if (minibatch) sampler.emplace(objective.num_samples(), *minibatch, stop.max_steps);
  }
  const auto start = std::chrono::steady_clock::now();
  auto elapsed = [&] { return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(); };

  MinimizeResult<S> result;
  Vector<S> g(x.size()), previous_x;
  S previous = std::numeric_limits<S>::quiet_NaN(), previous_norm = previous;
  for (Index step = 0;; ++step) {
    S value;
    if constexpr (MinibatchObjective<F>) {
      value = sampler ? objective.value_and_grad(x, sampler->batch(minibatch->start_step + step), g)
                      : objective.value_and_grad(x, g);
    } else {
      value = objective.value_and_grad(x, g);
    }
    ++result.evaluations;
    const S norm = global_norm(g);
    const bool finite = std::isfinite(value) && (std::isfinite(norm) || g.allFinite());
    result.steps = step;
    result.value = value;
    result.grad_norm = norm;

    const StepInfo<S> info{step, stop.max_steps, value, x, g, elapsed(), finite};
    bool callback_stop = false;
    StopReason callback_reason = StopReason::Callback;
    std::string callback_message;
    [[maybe_unused]] auto visit = [&](auto& callback) {
      if (notify_step(callback, info) && !callback_stop) {
        callback_stop = true;
        describe_stop(callback, callback_reason, callback_message);
      }
    };
    (visit(callbacks), ...);

    if (!finite) {
      result.reason = StopReason::NonFinite;
      const bool loss = !std::isfinite(value);
      result.message = "gradus::minimize: non-finite " + std::string(loss ? "loss" : "gradient") + " (" +
                       (loss ? to_text(value) : "norm " + to_text(norm)) + ") at step " + to_text(step) + "; ";
      if (step == 0) {
        result.message += "no finite step to restore, parameters are the starting ones";
      } else {
        result.message += "parameters restored to step " + to_text(step - 1) + ", the last finite one";
        x.swap(previous_x);
        result.steps = step - 1;
        result.value = previous;
        result.grad_norm = previous_norm;
      }
    } else if (stop.grad_tol > 0 && norm <= stop.grad_tol) {
      result.reason = StopReason::GradTol;
    } else if (stop.loss_tol > 0 && std::abs(previous - value) <= stop.loss_tol) {
      result.reason = StopReason::LossTol;
    } else if (callback_stop) {
      result.reason = callback_reason;
      result.message = std::move(callback_message);
    } else if (step >= stop.max_steps) {
      result.reason = StopReason::MaxSteps;
    } else {
      previous = value;
      previous_norm = norm;
      transform.update(g, state, x);
      previous_x = x + g;  // x_{k+1}; after the swap, previous_x holds x_k
      x.swap(previous_x);
      continue;
    }
    break;
  }
  if (result.message.empty()) result.message = to_string(result.reason);
  result.seconds = elapsed();
  [[maybe_unused]] auto finish = [&](auto& callback) {
    if constexpr (requires { callback.on_end(result, x); }) callback.on_end(result, x);
  };
  (finish(callbacks), ...);
  return result;
}

}  // namespace detail

// Full-batch runs, from a fresh transform state or from a given (e.g. restored) one.
template <Objective F, Transform T, class... Callbacks>
  requires(MinimizeCallback<std::remove_cvref_t<Callbacks>, typename F::Scalar> && ...)
MinimizeResult<typename F::Scalar> minimize(F& objective, Vector<typename F::Scalar>& x, const T& transform,
                                            typename T::State& state, const Stop& stop, Callbacks&&... callbacks) {
  return detail::minimize_loop(objective, x, transform, state, stop, nullptr, callbacks...);
}

template <Objective F, Transform T, class... Callbacks>
  requires(MinimizeCallback<std::remove_cvref_t<Callbacks>, typename F::Scalar> && ...)
MinimizeResult<typename F::Scalar> minimize(F& objective, Vector<typename F::Scalar>& x, const T& transform,
                                            const Stop& stop, Callbacks&&... callbacks) {
  auto state = transform.init(x);
  return detail::minimize_loop(objective, x, transform, state, stop, nullptr, callbacks...);
}

// Minibatch runs.
template <MinibatchObjective F, Transform T, class... Callbacks>
  requires(MinimizeCallback<std::remove_cvref_t<Callbacks>, typename F::Scalar> && ...)
MinimizeResult<typename F::Scalar> minimize(F& objective, Vector<typename F::Scalar>& x, const T& transform,
                                            typename T::State& state, const Stop& stop, const Minibatch& minibatch,
                                            Callbacks&&... callbacks) {
  return detail::minimize_loop(objective, x, transform, state, stop, &minibatch, callbacks...);
}

template <MinibatchObjective F, Transform T, class... Callbacks>
  requires(MinimizeCallback<std::remove_cvref_t<Callbacks>, typename F::Scalar> && ...)
MinimizeResult<typename F::Scalar> minimize(F& objective, Vector<typename F::Scalar>& x, const T& transform,
                                            const Stop& stop, const Minibatch& minibatch, Callbacks&&... callbacks) {
  auto state = transform.init(x);
  return detail::minimize_loop(objective, x, transform, state, stop, &minibatch, callbacks...);
}

// ---------------------------------------------------------------------------------------
// Callbacks.

struct ProgressBarOptions {
  double redraw_seconds = 0.1;  // on a terminal
  double line_seconds = 2.0;    // otherwise
  int width = 30;
  std::FILE* out = stderr;
};

// Progress on stderr: a redrawn bar on a terminal, plain lines every `line_seconds` otherwise.
class ProgressBar {
 public:
  explicit ProgressBar(ProgressBarOptions options = {}) : options_(options) {
    detail::require_in_range("ProgressBar", "options.width", options_.width, 1, 512, true);
    detail::require(options_.out != nullptr, "ProgressBar", "options.out", "an open FILE*", "nullptr");
  }

  template <class S>
  void on_step(const StepInfo<S>& info) {
    std::FILE* out = options_.out;
    if (info.step == 0) {
      terminal_ = is_terminal(out);
      last_ = -1e300;
    }
    const bool last_step = info.step >= info.max_steps;
    if (!last_step && info.seconds - last_ < (terminal_ ? options_.redraw_seconds : options_.line_seconds)) return;
    last_ = info.seconds;
    const double rate = info.seconds > 0 ? static_cast<double>(info.step) / info.seconds : 0.0;
    const double eta = rate > 0 ? static_cast<double>(info.max_steps - info.step) / rate : 0.0;
    if (terminal_) {
      const double fraction = info.max_steps > 0 ? static_cast<double>(info.step) / static_cast<double>(info.max_steps) : 1.0;
      const int filled = static_cast<int>(fraction * options_.width);
      std::fprintf(out, "\r[%.*s%*s] ", filled, bar(), options_.width - filled, "");
    }
    std::fprintf(out, "step %lld/%lld  loss %.6g  %.0f steps/s  ETA %.1fs%s", static_cast<long long>(info.step),
                 static_cast<long long>(info.max_steps), static_cast<double>(info.value), rate, eta,
                 terminal_ ? "   " : "\n");
    std::fflush(out);
  }

  template <class S>
  void on_end(MinimizeResult<S>& result, Vector<S>&) {
    std::fprintf(options_.out, "%sdone: %lld steps, loss %.6g, %.2fs (%s)\n", terminal_ ? "\n" : "",
                 static_cast<long long>(result.steps), static_cast<double>(result.value), result.seconds,
                 result.message.c_str());
    std::fflush(options_.out);
  }

 private:
  static bool is_terminal([[maybe_unused]] std::FILE* stream) {
#ifdef GRADUS_HAVE_ISATTY
    return isatty(fileno(stream)) != 0;
#else
    return false;
#endif
  }
  const char* bar() const {
    static const std::string full(512, '#');
    return full.c_str();
  }
  ProgressBarOptions options_;
  bool terminal_ = false;
  double last_ = -1e300;
};

// Records (step, loss) every `every` steps (and the final one); prints them when print is set.
struct LossLog {
  Index every = 10;
  bool print = false;
  std::FILE* out = stdout;
  std::vector<std::pair<Index, double>> history = {};

  template <class S>
  void on_step(const StepInfo<S>& info) {
    detail::require_positive("LossLog", "every", every);
    detail::require(!print || out != nullptr, "LossLog", "out", "an open FILE* when print is set", "nullptr");
    if (info.step % every != 0 && info.step < info.max_steps) return;
    history.emplace_back(info.step, static_cast<double>(info.value));
    if (print) std::fprintf(out, "step %8lld  loss %.8g\n", static_cast<long long>(info.step), static_cast<double>(info.value));
  }
};

// Keeps a copy of the parameters with the lowest loss seen at a finite step (loss and
// gradient finite); restore puts them in x at the end, with their step, value and gradient
// norm in the result.
template <class S>
struct BestParameters {
  bool restore = false;
  S value = std::numeric_limits<S>::infinity();
  Index step = -1;
  Vector<S> params = {};
  S grad_norm = std::numeric_limits<S>::quiet_NaN();

  void on_step(const StepInfo<S>& info) {
    if (info.finite && info.value < value) {
      value = info.value;
      step = info.step;
      params = info.x;
      grad_norm = info.grad_norm();
    }
  }
  void on_end(MinimizeResult<S>& result, Vector<S>& x) {
    if (!restore || step < 0) return;
    x = params;
    result.steps = step;
    result.value = value;
    result.grad_norm = grad_norm;
  }
};

// Reports a non-finite stop and keeps the parameters minimize restored. (minimize itself
// always stops at a non-finite loss or gradient with the last finite parameters; the guard
// adds the report and the record.)
template <class S>
class NonFiniteGuard {
 public:
  explicit NonFiniteGuard(bool print = true) : print_(print) {}  // print: the message also goes to stderr

  // After a non-finite stop: the step x was restored to and its parameters (-1 and empty
  // when step 0 already failed and x is the starting point).
  Index last_finite_step = -1;
  Vector<S> last_finite;

  void on_end(MinimizeResult<S>& result, Vector<S>& x) {
    if (result.reason != StopReason::NonFinite) return;
    const bool restored = result.evaluations > 1;
    last_finite_step = restored ? result.steps : -1;
    last_finite = restored ? x : Vector<S>();
    if (print_) std::fprintf(stderr, "%s\n", result.message.c_str());
  }

 private:
  bool print_;
};

template <class S>
struct EarlyStoppingOptions {
  Index patience = 5;  // checks without improvement before stopping
  Index every = 1;     // evaluate the validation objective every this many steps
  S min_delta = 0;     // an improvement must beat the best by more than this
};

// Stops when the validation objective has not improved for `patience` checks. Holds a
// reference to the validation objective; keep it alive for the run.
template <Objective V>
class EarlyStopping {
 public:
  using S = typename V::Scalar;

  EarlyStopping(V& validation, EarlyStoppingOptions<S> options = {}) : validation_(&validation), options_(options) {
    detail::require_positive("EarlyStopping", "options.patience", options_.patience);
    detail::require_positive("EarlyStopping", "options.every", options_.every);
    detail::require_finite_nonnegative("EarlyStopping", "options.min_delta", options_.min_delta);
  }

  bool on_step(const StepInfo<S>& info) {
    if (info.step % options_.every != 0) return false;
    const S value = evaluate(info.x);
    history_.emplace_back(info.step, value);
    if (value < best_ - options_.min_delta) {
      best_ = value;
      best_step_ = info.step;
      checks_without_improvement_ = 0;
      return false;
    }
    return ++checks_without_improvement_ >= options_.patience;
  }
  std::string stop_message() const {
    return "early stopping: validation loss " + detail::to_text(static_cast<double>(best_)) + " (step " +
           detail::to_text(best_step_) + ") not improved for " + detail::to_text(options_.patience) + " checks";
  }

  S best_value() const { return best_; }
  Index best_step() const { return best_step_; }
  const std::vector<std::pair<Index, S>>& history() const { return history_; }

 private:
  S evaluate(const Vector<S>& x) {
    if constexpr (requires { validation_->value(x); }) {
      return validation_->value(x);
    } else {
      scratch_.resize(x.size());
      return validation_->value_and_grad(x, scratch_);
    }
  }

  V* validation_;
  EarlyStoppingOptions<S> options_;
  S best_ = std::numeric_limits<S>::infinity();
  Index best_step_ = -1;
  Index checks_without_improvement_ = 0;
  std::vector<std::pair<Index, S>> history_;
  Vector<S> scratch_;
};

}  // namespace gradus
