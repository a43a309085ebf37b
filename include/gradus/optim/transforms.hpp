#pragma once
// Gradient transformations in the style of optax: each is an init/update pair over a flat
// parameter vector with explicit, public state.
//
//   auto opt = gradus::adam<float>({.learning_rate = 1e-3});
//   auto state = opt.init(params);
//   updates = grad;                           // on entry: the gradient
//   opt.update(updates, state, params);       // on exit: the step to ADD
//   params += updates;
//
// The transformations (g: incoming updates, t: state.step before the update, lr_t: the
// learning rate schedule at t, all operations elementwise):
//   scale(a)                     u = a g
//   scale_by_learning_rate(lr)   u = -lr_t g
//   add_decayed_weights(w)       u = g + w params
//   clip_by_global_norm(c)       u = g min(1, c / ||g||)
//   sgd / momentum               v = mu v + g;  u = -lr_t v  (Nesterov: u = -lr_t (g + mu v));
//                                mu = 0 is plain gradient descent u = -lr_t g
//   scale_by_adam(b1, b2, eps)   m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;
//                                u = m_hat / (sqrt(v_hat) + eps),  m_hat = m / (1-b1^(t+1)), v_hat likewise
//   adam                         u = -lr_t m_hat / (sqrt(v_hat) + eps)
//   adamw                        u = -lr_t (m_hat / (sqrt(v_hat) + eps) + w params)   (decoupled decay)
//   chain(t1, t2, ...)           applies t1, then t2, ... to the same updates
//
// A learning rate is a number or any callable of the step (std::int64_t -> S): the schedules
// below (StepDecay, CosineDecay, LinearWarmup) or a lambda. Each state records the rate it
// used last. save_state / load_state write and read any state, chained ones included, as
// raw binary, so a restored run continues bit-identically.

#include <cmath>
#include <concepts>
#include <cstdint>
#include <functional>
#include <istream>
#include <numbers>
#include <ostream>
#include <tuple>
#include <type_traits>
#include <utility>

#include "gradus/core/errors.hpp"
#include "gradus/core/types.hpp"

namespace gradus {

// ---------------------------------------------------------------------------------------
// Learning-rate schedules: plain callables of the step.

// initial * factor^floor(step / every)
template <class S>
struct StepDecay {
  S initial = S(0.1);
  S factor = S(0.1);
  std::int64_t every = 1000;

  void validate() const {
    detail::require_positive("StepDecay", "initial", initial);
    detail::require_positive("StepDecay", "factor", factor);
    detail::require_positive("StepDecay", "every", every);
  }
  S operator()(std::int64_t step) const {
    return initial * static_cast<S>(std::pow(factor, static_cast<S>(step / every)));
  }
};

// initial * (alpha + (1 - alpha) (1 + cos(pi min(step, decay_steps) / decay_steps)) / 2)
template <class S>
struct CosineDecay {
  S initial = S(0.1);
  std::int64_t decay_steps = 1000;
  S alpha = 0;  // final rate as a fraction of initial

  void validate() const {
    detail::require_positive("CosineDecay", "initial", initial);
    detail::require_positive("CosineDecay", "decay_steps", decay_steps);
    detail::require_in_range("CosineDecay", "alpha", alpha, S(0), S(1), true);
  }
  S operator()(std::int64_t step) const {
    const double progress = static_cast<double>(std::min(step, decay_steps)) / static_cast<double>(decay_steps);
    const double cosine = 0.5 * (1 + std::cos(std::numbers::pi * progress));
    return initial * static_cast<S>(alpha + (1 - alpha) * cosine);
  }
};

// A constant rate or a schedule; a number converts implicitly, so `.learning_rate = 1e-3` works.
template <class S>
class LearningRate {
 public:
  template <class T>
    requires std::is_arithmetic_v<T>
  LearningRate(T constant) : constant_(static_cast<S>(constant)) {}  // NOLINT: implicit on purpose

  template <class F>
    requires(!std::is_arithmetic_v<F> && std::is_invocable_r_v<S, const F&, std::int64_t>)
  LearningRate(F schedule) {  // NOLINT: implicit on purpose
    if constexpr (requires { schedule.validate(); }) schedule.validate();
    schedule_ = std::move(schedule);
  }

  S operator()(std::int64_t step) const { return schedule_ ? schedule_(step) : constant_; }
  bool is_constant() const { return !schedule_; }

  void validate(const char* function) const {
    if (is_constant()) detail::require_positive(function, "learning_rate", constant_);
  }

 private:
  S constant_ = 0;
  std::function<S(std::int64_t)> schedule_;
};

// Ramps linearly to after(0) over warmup_steps (after(0) (step + 1) / warmup_steps), then
// follows after(step - warmup_steps).
template <class S>
struct LinearWarmup {
  std::int64_t warmup_steps = 100;
  LearningRate<S> after = S(1e-3);

  void validate() const {
    detail::require_nonnegative("LinearWarmup", "warmup_steps", warmup_steps);
  }
  S operator()(std::int64_t step) const {
    if (step < warmup_steps) return after(0) * static_cast<S>(step + 1) / static_cast<S>(warmup_steps);
    return after(step - warmup_steps);
  }
};

// ---------------------------------------------------------------------------------------
// The protocol, and state serialization.

template <class T>
concept Transform = requires(const T& t, const Vector<typename T::Scalar>& params, typename T::State& state,
                             Eigen::Ref<Vector<typename T::Scalar>> updates) {
  { t.init(params) } -> std::same_as<typename T::State>;
  t.update(updates, state, params);
};

// Every state lists its members once, in fields(self), for save_state / load_state.
struct EmptyState {
  template <class Self>
  static auto fields(Self&) { return std::tie(); }
};

namespace detail {

template <class T>
struct is_tuple : std::false_type {};
template <class... Ts>
struct is_tuple<std::tuple<Ts...>> : std::true_type {};

inline void check_stream(bool ok, const char* function) {
  require(ok, function, "stream", "a readable/writable stream holding a saved state", "a failed stream");
}

template <class T>
void write_field(std::ostream& out, const T& value) {
  if constexpr (std::is_arithmetic_v<T>) {
    out.write(reinterpret_cast<const char*>(&value), sizeof value);
  } else {  // an Eigen vector: its size, then its raw entries
    const std::int64_t size = value.size();
    write_field(out, size);
    out.write(reinterpret_cast<const char*>(value.data()),
              static_cast<std::streamsize>(sizeof(typename T::Scalar) * static_cast<std::size_t>(size)));
  }
}

template <class T>
void read_field(std::istream& in, T& value) {
  if constexpr (std::is_arithmetic_v<T>) {
    in.read(reinterpret_cast<char*>(&value), sizeof value);
  } else {
    std::int64_t size = -1;
    read_field(in, size);
    check_stream(in.good() && size >= 0 && size < (std::int64_t(1) << 48), "load_state");
    value.resize(static_cast<Index>(size));
    in.read(reinterpret_cast<char*>(value.data()),
            static_cast<std::streamsize>(sizeof(typename T::Scalar) * static_cast<std::size_t>(size)));
  }
}

template <class State>
void save_fields(std::ostream& out, const State& state) {
  if constexpr (is_tuple<State>::value) {
    std::apply([&](const auto&... parts) { (save_fields(out, parts), ...); }, state);
  } else {
    std::apply([&](const auto&... fields) { (write_field(out, fields), ...); }, State::fields(state));
  }
}

template <class State>
void load_fields(std::istream& in, State& state) {
  if constexpr (is_tuple<State>::value) {
    std::apply([&](auto&... parts) { (load_fields(in, parts), ...); }, state);
  } else {
    std::apply([&](auto&... fields) { (read_field(in, fields), ...); }, State::fields(state));
  }
}

inline constexpr std::uint64_t state_magic = 0x31'6574'6174'5347ull;  // "GStates1"

template <class S>
void check_update(const char* function, const Eigen::Ref<Vector<S>>& updates, const Vector<S>& params) {
  require_size(function, "updates", updates.size(), params.size(), "entries (size of params)");
}

template <class S>
void check_moment(const char* function, const char* name, const Vector<S>& moment, Index size) {
  require_size(function, name, moment.size(), size, "entries (state from init(params) of this size)");
}

}  // namespace detail

// Writes any transformation state (chains included) as raw binary.
template <class State>
void save_state(std::ostream& out, const State& state) {
  detail::write_field(out, detail::state_magic);
  detail::save_fields(out, state);
  detail::check_stream(out.good(), "save_state");
}

// Reads a state written by save_state for the same transformation.
template <class State>
void load_state(std::istream& in, State& state) {
  std::uint64_t magic = 0;
  detail::read_field(in, magic);
  detail::check_stream(in.good() && magic == detail::state_magic, "load_state");
  detail::load_fields(in, state);
  detail::check_stream(!in.fail(), "load_state");
}

// ---------------------------------------------------------------------------------------
// Stateless transformations.

// Shared by the transformations without state.
template <class S>
struct Stateless {
  using Scalar = S;
  using State = EmptyState;
  State init(const Vector<S>&) const { return {}; }
};

template <class S>
struct Scale : Stateless<S> {
  S factor;
  void update(Eigen::Ref<Vector<S>> updates, EmptyState&, const Vector<S>& params) const {
    detail::check_update("scale", updates, params);
    updates *= factor;
  }
};

template <class S>
Scale<S> scale(S factor) {
  detail::require_finite("scale", "factor", factor);
  return {{}, factor};
}

template <class S>
struct AddDecayedWeights : Stateless<S> {
  S weight_decay;
  void update(Eigen::Ref<Vector<S>> updates, EmptyState&, const Vector<S>& params) const {
    detail::check_update("add_decayed_weights", updates, params);
    updates += weight_decay * params;
  }
};

template <class S>
AddDecayedWeights<S> add_decayed_weights(S weight_decay) {
  detail::require_nonnegative("add_decayed_weights", "weight_decay", weight_decay);
  return {{}, weight_decay};
}

template <class S>
struct ClipByGlobalNorm : Stateless<S> {
  S max_norm;
  void update(Eigen::Ref<Vector<S>> updates, EmptyState&, const Vector<S>& params) const {
    detail::check_update("clip_by_global_norm", updates, params);
    const S norm = updates.norm();
    if (norm > max_norm) updates *= max_norm / norm;  // NaN norms pass through unchanged
  }
};

template <class S>
ClipByGlobalNorm<S> clip_by_global_norm(S max_norm) {
  detail::require_positive("clip_by_global_norm", "max_norm", max_norm);
  return {{}, max_norm};
}

// ---------------------------------------------------------------------------------------
// Learning rate and (momentum) SGD.

template <class S>
struct ScheduleState {
  std::int64_t step = 0;
  S learning_rate = 0;  // the rate used by the last update

  template <class Self>
  static auto fields(Self& self) { return std::tie(self.step, self.learning_rate); }
};

template <class S>
struct ScaleByLearningRate {
  using Scalar = S;
  using State = ScheduleState<S>;
  LearningRate<S> learning_rate;

  State init(const Vector<S>&) const { return {0, learning_rate(0)}; }
  void update(Eigen::Ref<Vector<S>> updates, State& state, const Vector<S>& params) const {
    detail::check_update("scale_by_learning_rate", updates, params);
    state.learning_rate = learning_rate(state.step++);
    updates *= -state.learning_rate;
  }
};

template <class S>
ScaleByLearningRate<S> scale_by_learning_rate(LearningRate<S> learning_rate) {
  learning_rate.validate("scale_by_learning_rate");
  return {std::move(learning_rate)};
}

template <class S>
struct SGDOptions {
  LearningRate<S> learning_rate = S(0.01);
  S momentum = 0;  // 0: plain gradient descent
  bool nesterov = false;
};

template <class S>
struct MomentumOptions {
  LearningRate<S> learning_rate = S(0.01);
  S momentum = S(0.9);
  bool nesterov = false;
};

template <class S>
struct SGDState {
  std::int64_t step = 0;
  S learning_rate = 0;
  Vector<S> velocity;  // empty when momentum is 0

  template <class Self>
  static auto fields(Self& self) { return std::tie(self.step, self.learning_rate, self.velocity); }
};

template <class S>
class SGD {
 public:
  using Scalar = S;
  using State = SGDState<S>;

  explicit SGD(SGDOptions<S> options) : options_(std::move(options)) {
    options_.learning_rate.validate("sgd");
    detail::require_in_range("sgd", "momentum", options_.momentum, S(0), S(1));
  }
  const SGDOptions<S>& options() const { return options_; }

  State init(const Vector<S>& params) const {
    State state{0, options_.learning_rate(0), {}};
    if (options_.momentum != S(0)) state.velocity = Vector<S>::Zero(params.size());
    return state;
  }

  void update(Eigen::Ref<Vector<S>> updates, State& state, const Vector<S>& params) const {
    detail::check_update("sgd", updates, params);
    const S lr = state.learning_rate = options_.learning_rate(state.step++);
    const S mu = options_.momentum;
    if (mu == S(0)) {
      updates *= -lr;
      return;
    }
    detail::check_moment("sgd", "state.velocity", state.velocity, params.size());
    state.velocity = mu * state.velocity + updates;
    if (options_.nesterov) {
      updates = -lr * (updates + mu * state.velocity);
    } else {
      updates = -lr * state.velocity;
    }
  }

 private:
  SGDOptions<S> options_;
};

template <class S>
SGD<S> sgd(SGDOptions<S> options = {}) {
  return SGD<S>(std::move(options));
}

// Heavy ball (default) or Nesterov momentum: sgd with momentum 0.9 by default.
template <class S>
SGD<S> momentum(MomentumOptions<S> options = {}) {
  return SGD<S>({std::move(options.learning_rate), options.momentum, options.nesterov});
}

// ---------------------------------------------------------------------------------------
// Adam family.

template <class S>
struct AdamOptions {
  LearningRate<S> learning_rate = S(1e-3);
  S b1 = S(0.9);
  S b2 = S(0.999);
  S eps = S(1e-8);
  S weight_decay = 0;  // decoupled (AdamW); adam() keeps it 0
};

template <class S>
struct AdamWOptions {
  LearningRate<S> learning_rate = S(1e-3);
  S b1 = S(0.9);
  S b2 = S(0.999);
  S eps = S(1e-8);
  S weight_decay = S(1e-4);  // optax's default
};

template <class S>
struct ScaleByAdamOptions {
  S b1 = S(0.9);
  S b2 = S(0.999);
  S eps = S(1e-8);
};

template <class S>
struct AdamState {
  std::int64_t step = 0;
  S learning_rate = 0;  // 1 for scale_by_adam
  Vector<S> mu;         // first moment
  Vector<S> nu;         // second moment

  template <class Self>
  static auto fields(Self& self) { return std::tie(self.step, self.learning_rate, self.mu, self.nu); }
};

// adam, adamw and scale_by_adam: one single-pass kernel. scale_by_adam has no learning
// rate (and no sign flip), so chain(scale_by_adam(), scale_by_learning_rate(lr)) == adam(lr).
template <class S>
class Adam {
 public:
  using Scalar = S;
  using State = AdamState<S>;

  // apply_learning_rate false: scale_by_adam (no rate, no sign flip, no weight decay).
  Adam(AdamOptions<S> options, bool apply_learning_rate)
      : options_(std::move(options)), apply_learning_rate_(apply_learning_rate) {
    const char* name = apply_learning_rate_ ? "adam" : "scale_by_adam";
    if (apply_learning_rate_) options_.learning_rate.validate(name);
    detail::require_in_range(name, "b1", options_.b1, S(0), S(1));
    detail::require_in_range(name, "b2", options_.b2, S(0), S(1));
    detail::require_nonnegative(name, "eps", options_.eps);
    detail::require_nonnegative(name, "weight_decay", options_.weight_decay);
  }
  const AdamOptions<S>& options() const { return options_; }

  State init(const Vector<S>& params) const {
    return {0, apply_learning_rate_ ? options_.learning_rate(0) : S(1), Vector<S>::Zero(params.size()),
            Vector<S>::Zero(params.size())};
  }

  void update(Eigen::Ref<Vector<S>> updates, State& state, const Vector<S>& params) const {
    detail::check_update("adam", updates, params);
    detail::check_moment("adam", "state.mu", state.mu, params.size());
    detail::check_moment("adam", "state.nu", state.nu, params.size());
    const auto& o = options_;
    const S factor = apply_learning_rate_ ? -(state.learning_rate = o.learning_rate(state.step)) : S(1);
    ++state.step;
    const S c1 = S(1) / (S(1) - std::pow(o.b1, static_cast<S>(state.step)));
    const S c2 = S(1) / (S(1) - std::pow(o.b2, static_cast<S>(state.step)));
    // Blocks small enough for L1: the three statements then cost one pass over memory.
    constexpr Index block = 512;
    for (Index start = 0; start < params.size(); start += block) {
      const Index n = std::min(block, params.size() - start);
      auto g = updates.segment(start, n).array();
      auto m = state.mu.segment(start, n).array();
      auto v = state.nu.segment(start, n).array();
      m = o.b1 * m + (S(1) - o.b1) * g;
      v = o.b2 * v + (S(1) - o.b2) * g.square();
      if (o.weight_decay == S(0)) {
        g = factor * ((c1 * m) / ((c2 * v).sqrt() + o.eps));
      } else {
        g = factor * ((c1 * m) / ((c2 * v).sqrt() + o.eps) + o.weight_decay * params.segment(start, n).array());
      }
    }
  }

 private:
  AdamOptions<S> options_;
  bool apply_learning_rate_;
};

template <class S>
Adam<S> adam(AdamOptions<S> options = {}) {
  options.weight_decay = 0;
  return Adam<S>(std::move(options), true);
}

template <class S>
Adam<S> adamw(AdamWOptions<S> options = {}) {
  return Adam<S>({std::move(options.learning_rate), options.b1, options.b2, options.eps, options.weight_decay}, true);
}

template <class S>
Adam<S> scale_by_adam(ScaleByAdamOptions<S> options = {}) {
  return Adam<S>({S(1), options.b1, options.b2, options.eps, S(0)}, false);
}

// ---------------------------------------------------------------------------------------
// Composition.

template <Transform... Ts>
  requires(sizeof...(Ts) > 0)
class Chain {
 public:
  using Scalar = typename std::tuple_element_t<0, std::tuple<Ts...>>::Scalar;
  static_assert((std::same_as<Scalar, typename Ts::Scalar> && ...), "chain: every transform needs the same Scalar");
  using State = std::tuple<typename Ts::State...>;

  explicit Chain(Ts... transforms) : transforms_(std::move(transforms)...) {}

  State init(const Vector<Scalar>& params) const {
    return std::apply([&](const auto&... t) { return State{t.init(params)...}; }, transforms_);
  }

  void update(Eigen::Ref<Vector<Scalar>> updates, State& state, const Vector<Scalar>& params) const {
    update_each(updates, state, params, std::index_sequence_for<Ts...>{});
  }

  const std::tuple<Ts...>& transforms() const { return transforms_; }

 private:
  template <std::size_t... I>
  void update_each(Eigen::Ref<Vector<Scalar>>& updates, State& state, const Vector<Scalar>& params,
                   std::index_sequence<I...>) const {
    (std::get<I>(transforms_).update(updates, std::get<I>(state), params), ...);
  }

  std::tuple<Ts...> transforms_;
};

template <Transform... Ts>
Chain<Ts...> chain(Ts... transforms) {
  return Chain<Ts...>(std::move(transforms)...);
}

}  // namespace gradus
