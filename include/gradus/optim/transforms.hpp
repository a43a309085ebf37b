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
// used last. save_state / load_state write and read any state, chained ones included, as a
// checked binary checkpoint, so a restored run continues bit-identically.

#include <algorithm>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <cstring>
#include <functional>
#include <ios>
#include <istream>
#include <limits>
#include <numbers>
#include <optional>
#include <ostream>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "gradus/core/errors.hpp"
#include "gradus/core/types.hpp"

namespace gradus {

namespace detail {

// A step counter about to be incremented: negative or saturated counters are corrupt state.
inline void require_step(std::string_view function, std::int64_t step) {
  require(step >= 0 && step < std::numeric_limits<std::int64_t>::max(), function, "state.step",
          "a value in [0, 2^63 - 1)", step);
}

}  // namespace detail

// ---------------------------------------------------------------------------------------
// Learning-rate schedules: plain callables of the step.

// initial * factor^floor(step / every)
template <class S>
struct StepDecay {
  S initial = S(0.1);
  S factor = S(0.1);  // in (0, 1]: a decay
  std::int64_t every = 1000;

  void validate() const {
    detail::require_finite_positive("StepDecay", "initial", initial);
    detail::require(factor > S(0) && factor <= S(1), "StepDecay", "factor", "a value in (0, 1]", factor);
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
    detail::require_finite_positive("CosineDecay", "initial", initial);
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
// A constant must be finite and > 0; a schedule may reach 0 (the end of a cosine decay), so
// each rate it returns must be finite and >= 0, which every transform checks as it uses it.
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

  void validate(const char* function, const char* argument = "learning_rate") const {
    if (is_constant()) detail::require_finite_positive(function, argument, constant_);
  }

  // The rate at `step`, checked.
  S at(const char* function, std::int64_t step) const {
    if (!schedule_) return constant_;
    const S rate = schedule_(step);
    if (!(rate >= S(0) && rate - rate == S(0))) {
      detail::throw_invalid_argument(function, "learning_rate",
                                     "a finite rate >= 0 from the schedule at step " + detail::to_text(step),
                                     detail::to_text(rate));
    }
    return rate;
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
    after.validate("LinearWarmup", "after");
  }
  S operator()(std::int64_t step) const {
    // The fraction first: rate * (step + 1) could overflow where the warmed-up rate does not.
    if (step < warmup_steps) return after(0) * (static_cast<S>(step + 1) / static_cast<S>(warmup_steps));
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

// A named member of a state. Every state has a `name` and lists its members once, in
// fields(self), for save_state / load_state; members are std::int64_t counters (>= 0),
// float or double numbers, or Vectors of them.
template <class T>
struct Field {
  const char* name;
  T& value;
};
template <class T>
Field(const char*, T&) -> Field<T>;

struct EmptyState {
  static constexpr const char* name = "stateless";
  template <class Self>
  static auto fields(Self&) { return std::tuple<>(); }
};

namespace detail {

template <class T>
struct is_tuple : std::false_type {};
template <class... Ts>
struct is_tuple<std::tuple<Ts...>> : std::true_type {};

template <class T>
struct is_vector : std::false_type {};
template <class S>
struct is_vector<Vector<S>> : std::true_type {};

template <class>
inline constexpr bool dependent_false = false;

template <class T>
const char* field_type_name() {
  if constexpr (std::is_same_v<T, std::int64_t>) return "int64";
  else if constexpr (std::is_same_v<T, float>) return "float";
  else if constexpr (std::is_same_v<T, double>) return "double";
  else if constexpr (std::is_same_v<T, Vector<float>>) return "float[]";
  else if constexpr (std::is_same_v<T, Vector<double>>) return "double[]";
  else static_assert(dependent_false<T>, "state fields are std::int64_t, float, double or a Vector of those");
}

// f(path, value) on every field, chained states in order; the path names the field in
// messages: "state.mu", or "state[1].mu" inside a chain.
template <class State, class F>
void for_each_field(State& state, const std::string& path, F& f) {
  using Plain = std::remove_const_t<State>;
  if constexpr (is_tuple<Plain>::value) {
    std::size_t i = 0;
    std::apply([&](auto&... parts) { (for_each_field(parts, path + "[" + to_text(i++) + "]", f), ...); }, state);
  } else {
    std::apply([&](auto... field) { (f(path + "." + field.name, field.value), ...); }, Plain::fields(state));
  }
}

// The type of a state as text, e.g. "adam(step: int64, learning_rate: float, mu: float[], nu: float[])",
// "chain(stateless(), sgd(...))": a checkpoint names the state it holds.
template <class State>
std::string signature(const State& state) {
  std::string text;
  const char* separator = "";
  auto add = [&](const std::string& part) {
    text.append(separator).append(part);
    separator = ", ";
  };
  if constexpr (is_tuple<State>::value) {
    std::apply([&](const auto&... parts) { (add(signature(parts)), ...); }, state);
    return "chain(" + text + ")";
  } else {
    std::apply(
        [&](auto... field) {
          (add(std::string(field.name) + ": " + field_type_name<std::remove_cvref_t<decltype(field.value)>>()), ...);
        },
        State::fields(state));
    return std::string(State::name) + "(" + text + ")";
  }
}

// Counters >= 0 and finite numbers: a checkpoint of a finite run holds nothing else.
template <class State>
void check_state_values(const char* function, const State& state) {
  auto check = [&](const std::string& path, const auto& value) {
    using T = std::remove_cvref_t<decltype(value)>;
    if constexpr (is_vector<T>::value) {
      if (value.allFinite()) return;
      Index i = 0;
      while (std::isfinite(value(i))) ++i;
      throw_invalid_argument(function, path, "finite values", to_text(value(i)) + " at index " + to_text(i));
    } else if constexpr (std::is_integral_v<T>) {
      require_nonnegative(function, path, value);
    } else {
      require_finite(function, path, value);
    }
  };
  for_each_field(state, "state", check);
}

// FNV-1a over 64-bit words: changing any one word (one byte of it) changes the sum.
class Checksum {
 public:
  template <class T>
    requires std::is_arithmetic_v<T>
  void add(T value) {
    std::uint64_t word = 0;
    std::memcpy(&word, &value, sizeof value);
    sum_ = (sum_ ^ word) * 0x100000001b3ull;
  }
  template <class S>
  void add(const Vector<S>& values) {
    for (Index i = 0; i < values.size(); ++i) add(values(i));
  }
  void add(const std::string& text) {
    for (const char c : text) add(c);
  }
  std::uint64_t value() const { return sum_; }

 private:
  std::uint64_t sum_ = 0xcbf29ce484222325ull;
};

// The checkpoint format (version 2), numbers in the writer's byte order:
//   "gradusST"   uint32 0x01020304 (byte order)   uint32 version
//   uint32 signature length, signature text (the state's type, see signature())
//   int64 entries of each Vector field, in field order
//   every field's value in order (a Vector: its entries)
//   uint64 checksum of everything from the signature length on
inline constexpr char state_magic[8] = {'g', 'r', 'a', 'd', 'u', 's', 'S', 'T'};
inline constexpr std::uint32_t state_byte_order = 0x01020304;
inline constexpr std::uint32_t state_version = 2;
inline constexpr std::uint32_t max_signature = 4096;
inline constexpr std::int64_t max_entries = std::int64_t(1) << 48;

class StateWriter {
 public:
  explicit StateWriter(std::ostream& out) : out_(out) {}

  template <class T>
  void raw(const T& value) {
    out_.write(reinterpret_cast<const char*>(&value), sizeof value);
  }
  template <class T>
  void put(const T& value) {
    if constexpr (is_vector<T>::value) {
      out_.write(reinterpret_cast<const char*>(value.data()),
                 static_cast<std::streamsize>(sizeof(typename T::Scalar) * static_cast<std::size_t>(value.size())));
    } else if constexpr (std::is_same_v<T, std::string>) {
      out_.write(value.data(), static_cast<std::streamsize>(value.size()));
    } else {
      raw(value);
    }
    sum_.add(value);
  }
  void finish() { raw(sum_.value()); }

 private:
  std::ostream& out_;
  Checksum sum_;
};

// Reads a checkpoint; every failure is a gradus::invalid_argument naming load_state.
class StateReader {
 public:
  explicit StateReader(std::istream& in) : in_(in) {
    require(in_.good(), "load_state", "stream", "a readable stream", "a failed stream");
  }

  void bytes(void* data, std::size_t size) {
    bool ok = false;
    try {
      ok = static_cast<std::size_t>(in_.read(static_cast<char*>(data), static_cast<std::streamsize>(size)).gcount()) ==
           size;
    } catch (const std::ios_base::failure&) {  // a stream that throws at its end
    }
    if (!ok) fail("a complete checkpoint", "one truncated after " + to_text(offset_ + in_.gcount()) + " bytes");
    offset_ += size;
  }
  template <class T>
  T raw() {
    T value;
    bytes(&value, sizeof value);
    return value;
  }
  template <class T>
  T get() {
    const T value = raw<T>();
    sum_.add(value);
    return value;
  }
  // Grows with the data actually read, so a corrupted length allocates no more than the
  // stream holds.
  template <class S>
  void get(Vector<S>& values, std::int64_t size) {
    Index done = 0;
    values.resize(std::min<Index>(size, Index(1) << 16));
    for (;;) {
      bytes(values.data() + done, sizeof(S) * static_cast<std::size_t>(values.size() - done));
      done = values.size();
      if (done == size) break;
      values.conservativeResize(std::min<Index>(size, 2 * done));
    }
    sum_.add(values);
  }

  void header() {
    char magic[8];
    bytes(magic, sizeof magic);
    if (std::memcmp(magic, state_magic, sizeof magic) != 0) fail("a gradus state checkpoint", "other data");
    const auto order = raw<std::uint32_t>();
    if (order != state_byte_order) {
      fail("a checkpoint in this machine's byte order",
           order == 0x04030201 ? "one of the opposite byte order" : "a corrupted byte-order mark");
    }
    const auto version = raw<std::uint32_t>();
    require(version == state_version, "load_state", "stream", "a checkpoint of format version 2", version);
  }

  void signature(const std::string& expected) {
    const auto length = get<std::uint32_t>();
    require(length <= max_signature, "load_state", "stream", "a state signature of at most 4096 bytes", length);
    std::string stored(length, '\0');
    bytes(stored.data(), length);
    sum_.add(stored);
    if (stored != expected) fail("a checkpoint of " + expected, stored);
  }

  // At least `size` more bytes, when the stream can tell how many it holds.
  void require_available(std::uint64_t size) {
    std::streambuf* buffer = in_.rdbuf();
    const auto here = buffer->pubseekoff(0, std::ios_base::cur, std::ios_base::in);
    if (here == std::streampos(-1)) return;
    const auto end = buffer->pubseekoff(0, std::ios_base::end, std::ios_base::in);
    buffer->pubseekpos(here, std::ios_base::in);
    if (end == std::streampos(-1)) return;
    const auto available = static_cast<std::uint64_t>(end - here);
    if (available < size) {
      fail(to_text(size) + " more bytes (the sizes in its header)", to_text(available) + " (a truncated checkpoint)");
    }
  }

  void finish() {
    const std::uint64_t expected = sum_.value();
    if (raw<std::uint64_t>() != expected) fail("a checkpoint whose checksum matches", "a corrupted one");
  }

 private:
  [[noreturn]] static void fail(const std::string& expected, const std::string& given) {
    throw_invalid_argument("load_state", "stream", expected, given);
  }

  std::istream& in_;
  std::uint64_t offset_ = 0;
  Checksum sum_;
};

template <class S>
void check_update(const char* function, const Eigen::Ref<Vector<S>>& updates, const Vector<S>& params) {
  require_size(function, "updates", updates.size(), params.size(), "entries (size of params)");
}

template <class S>
void check_moment(const char* function, const char* name, const Vector<S>& moment, Index size) {
  require_size(function, name, moment.size(), size, "entries (state from init(params) of this size)");
}

}  // namespace detail

// Writes any transformation state (chains included) as a checkpoint: its type, sizes, raw
// values and a checksum. A state with a negative counter or a non-finite value is refused
// before anything is written.
template <class State>
void save_state(std::ostream& out, const State& state) {
  detail::check_state_values("save_state", state);
  detail::require(out.good(), "save_state", "stream", "a writable stream", "a failed stream");
  detail::StateWriter writer(out);
  out.write(detail::state_magic, sizeof detail::state_magic);
  writer.raw(detail::state_byte_order);
  writer.raw(detail::state_version);
  const std::string signature = detail::signature(state);
  writer.put(static_cast<std::uint32_t>(signature.size()));
  writer.put(signature);
  auto size = [&](const std::string&, const auto& value) {
    if constexpr (detail::is_vector<std::remove_cvref_t<decltype(value)>>::value) {
      writer.put(static_cast<std::int64_t>(value.size()));
    }
  };
  detail::for_each_field(state, "state", size);
  auto put = [&](const std::string&, const auto& value) { writer.put(value); };
  detail::for_each_field(state, "state", put);
  writer.finish();
  detail::require(out.good(), "save_state", "stream", "a writable stream", "a failed stream");
}

// Reads a checkpoint written by save_state for a state of the same type and scalar. The
// header is checked first: format, byte order, the state's type, each Vector's length (equal
// to the target's where the target's is not empty, and within what the stream holds); then
// the values are read into a fresh state and checked (checksum, finite values, counters
// >= 0). Only then is the target replaced: on any failure it is left untouched.
template <class State>
void load_state(std::istream& in, State& state) {
  detail::StateReader reader(in);
  reader.header();
  reader.signature(detail::signature(state));

  std::vector<std::int64_t> sizes;
  std::uint64_t payload = sizeof(std::uint64_t);  // the checksum
  auto size = [&](const std::string& path, const auto& value) {
    using T = std::remove_cvref_t<decltype(value)>;
    if constexpr (detail::is_vector<T>::value) {
      const auto entries = reader.get<std::int64_t>();
      detail::require(entries >= 0 && entries <= detail::max_entries, "load_state", path,
                      "an entry count in [0, 2^48]", entries);
      if (value.size() != 0) {
        detail::require_size("load_state", path, entries, value.size(), "entries (the size of the target state)");
      }
      sizes.push_back(entries);
      payload += sizeof(typename T::Scalar) * static_cast<std::uint64_t>(entries);
    } else {
      payload += sizeof(T);
    }
  };
  detail::for_each_field(std::as_const(state), "state", size);
  reader.require_available(payload);

  State loaded{};
  std::size_t next = 0;
  auto get = [&](const std::string&, auto& value) {
    using T = std::remove_cvref_t<decltype(value)>;
    if constexpr (detail::is_vector<T>::value) {
      reader.get(value, sizes[next++]);
    } else {
      value = reader.get<T>();
    }
  };
  detail::for_each_field(loaded, "state", get);
  reader.finish();
  detail::check_state_values("load_state", loaded);
  state = std::move(loaded);
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
  detail::require_finite_nonnegative("add_decayed_weights", "weight_decay", weight_decay);
  return {{}, weight_decay};
}

namespace detail {

// ||v||: one pass while the sum of squares neither overflows nor underflows, Eigen's scaled
// stableNorm otherwise (entries near 1e19 or 1e-19 in float); NaN if an entry is NaN.
template <class Derived>
typename Derived::Scalar global_norm(const Eigen::MatrixBase<Derived>& v) {
  using S = typename Derived::Scalar;
  const S squares = v.squaredNorm();
  if (squares >= std::numeric_limits<S>::min() && squares <= std::numeric_limits<S>::max()) return std::sqrt(squares);
  return std::isnan(squares) ? squares : v.stableNorm();
}

}  // namespace detail

template <class S>
struct ClipByGlobalNorm : Stateless<S> {
  S max_norm;
  void update(Eigen::Ref<Vector<S>> updates, EmptyState&, const Vector<S>& params) const {
    detail::check_update("clip_by_global_norm", updates, params);
    S norm = detail::global_norm(updates);
    if (!(norm > max_norm)) return;  // NaN norms pass through unchanged
    if (std::isinf(norm)) {  // beyond the largest S (or an infinite entry, which becomes NaN)
      updates /= updates.cwiseAbs().maxCoeff();
      norm = updates.norm();
    }
    updates = updates / norm * max_norm;  // divided first: max_norm / norm may underflow
  }
};

template <class S>
ClipByGlobalNorm<S> clip_by_global_norm(S max_norm) {
  detail::require_finite_positive("clip_by_global_norm", "max_norm", max_norm);
  return {{}, max_norm};
}

// ---------------------------------------------------------------------------------------
// Learning rate and (momentum) SGD.

template <class S>
struct ScheduleState {
  static constexpr const char* name = "schedule";
  std::int64_t step = 0;
  S learning_rate = 0;  // the rate used by the last update

  template <class Self>
  static auto fields(Self& self) {
    return std::tuple{Field{"step", self.step}, Field{"learning_rate", self.learning_rate}};
  }
};

template <class S>
struct ScaleByLearningRate {
  using Scalar = S;
  using State = ScheduleState<S>;
  LearningRate<S> learning_rate;

  State init(const Vector<S>&) const { return {0, learning_rate.at("scale_by_learning_rate", 0)}; }
  void update(Eigen::Ref<Vector<S>> updates, State& state, const Vector<S>& params) const {
    detail::check_update("scale_by_learning_rate", updates, params);
    detail::require_step("scale_by_learning_rate", state.step);
    state.learning_rate = learning_rate.at("scale_by_learning_rate", state.step);
    ++state.step;
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
  static constexpr const char* name = "sgd";
  std::int64_t step = 0;
  S learning_rate = 0;
  Vector<S> velocity;  // empty when momentum is 0

  template <class Self>
  static auto fields(Self& self) {
    return std::tuple{Field{"step", self.step}, Field{"learning_rate", self.learning_rate},
                      Field{"velocity", self.velocity}};
  }
};

template <class S>
class SGD {
 public:
  using Scalar = S;
  using State = SGDState<S>;

  // entry_point: the function the user called ("sgd" or "momentum"), for messages.
  explicit SGD(SGDOptions<S> options, const char* entry_point = "sgd")
      : options_(std::move(options)), name_(entry_point) {
    options_.learning_rate.validate(name_);
    detail::require_in_range(name_, "momentum", options_.momentum, S(0), S(1));
  }
  const SGDOptions<S>& options() const { return options_; }

  State init(const Vector<S>& params) const {
    State state{0, options_.learning_rate.at(name_, 0), {}};
    if (options_.momentum != S(0)) state.velocity = Vector<S>::Zero(params.size());
    return state;
  }

  void update(Eigen::Ref<Vector<S>> updates, State& state, const Vector<S>& params) const {
    detail::check_update(name_, updates, params);
    const S mu = options_.momentum;
    if (mu != S(0)) detail::check_moment(name_, "state.velocity", state.velocity, params.size());
    detail::require_step(name_, state.step);
    const S lr = state.learning_rate = options_.learning_rate.at(name_, state.step);
    ++state.step;
    if (mu == S(0)) {
      updates *= -lr;
      return;
    }
    state.velocity = mu * state.velocity + updates;
    if (options_.nesterov) {
      updates = -lr * (updates + mu * state.velocity);
    } else {
      updates = -lr * state.velocity;
    }
  }

 private:
  SGDOptions<S> options_;
  const char* name_;
};

template <class S>
SGD<S> sgd(SGDOptions<S> options = {}) {
  return SGD<S>(std::move(options));
}

// Heavy ball (default) or Nesterov momentum: sgd with momentum 0.9 by default.
template <class S>
SGD<S> momentum(MomentumOptions<S> options = {}) {
  return SGD<S>({std::move(options.learning_rate), options.momentum, options.nesterov}, "momentum");
}

// ---------------------------------------------------------------------------------------
// Adam family.

template <class S>
struct AdamOptions {
  LearningRate<S> learning_rate = S(1e-3);
  S b1 = S(0.9);
  S b2 = S(0.999);
  S eps = S(1e-8);  // > 0: the paper's guard against 0 / 0 where the gradient has been 0
  S weight_decay = 0;  // decoupled (AdamW); adam() requires 0
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
  static constexpr const char* name = "adam";
  std::int64_t step = 0;
  S learning_rate = 0;  // 1 for scale_by_adam
  Vector<S> mu;         // first moment
  Vector<S> nu;         // second moment

  template <class Self>
  static auto fields(Self& self) {
    return std::tuple{Field{"step", self.step}, Field{"learning_rate", self.learning_rate}, Field{"mu", self.mu},
                      Field{"nu", self.nu}};
  }
};

// adam, adamw and scale_by_adam: one single-pass kernel. scale_by_adam has no learning
// rate (and no sign flip), so chain(scale_by_adam(), scale_by_learning_rate(lr)) == adam(lr).
template <class S>
class Adam {
 public:
  using Scalar = S;
  using State = AdamState<S>;

  // apply_learning_rate false: scale_by_adam (no rate, no sign flip, no weight decay).
  // entry_point: the function the user called, for messages.
  Adam(AdamOptions<S> options, bool apply_learning_rate, const char* entry_point = nullptr)
      : options_(std::move(options)),
        apply_learning_rate_(apply_learning_rate),
        name_(entry_point ? entry_point : apply_learning_rate ? "adam" : "scale_by_adam") {
    if (apply_learning_rate_) options_.learning_rate.validate(name_);
    detail::require_in_range(name_, "b1", options_.b1, S(0), S(1));
    detail::require_in_range(name_, "b2", options_.b2, S(0), S(1));
    // eps guards the division where the gradient has been 0; above 1 it would set the step's
    // scale itself (lr / eps, an sgd), and its quotients underflow where the step does not.
    detail::require(options_.eps > S(0) && options_.eps <= S(1), name_, "eps", "a value in (0, 1]", options_.eps);
    detail::require_finite_nonnegative(name_, "weight_decay", options_.weight_decay);
  }
  const AdamOptions<S>& options() const { return options_; }

  State init(const Vector<S>& params) const {
    return {0, apply_learning_rate_ ? options_.learning_rate.at(name_, 0) : S(1), Vector<S>::Zero(params.size()),
            Vector<S>::Zero(params.size())};
  }

  void update(Eigen::Ref<Vector<S>> updates, State& state, const Vector<S>& params) const {
    detail::check_update(name_, updates, params);
    detail::check_moment(name_, "state.mu", state.mu, params.size());
    detail::check_moment(name_, "state.nu", state.nu, params.size());
    detail::require_step(name_, state.step);
    const auto& o = options_;
    const S factor = apply_learning_rate_ ? -(state.learning_rate = o.learning_rate.at(name_, state.step)) : S(1);
    ++state.step;
    // m_hat / (sqrt(v_hat) + eps) as c1 (m / (sqrt(c2) sqrt(v) + eps)): the same number, but
    // m_hat = c1 m may overflow where the ratio does not (a gradient near the largest S). A
    // gradient whose square overflows (|g| > sqrt(max / (1 - b2))) makes v infinite: its step
    // is then 0, as in optax and PyTorch, not inf / inf.
    const S c1 = S(1) / (S(1) - std::pow(o.b1, static_cast<S>(state.step)));
    const S root_c2 = std::sqrt(S(1) / (S(1) - std::pow(o.b2, static_cast<S>(state.step))));
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
        g = factor * (c1 * (m / (root_c2 * v.sqrt() + o.eps)));
      } else {
        g = factor * (c1 * (m / (root_c2 * v.sqrt() + o.eps)) + o.weight_decay * params.segment(start, n).array());
      }
    }
  }

 private:
  AdamOptions<S> options_;
  bool apply_learning_rate_;
  const char* name_;
};

template <class S>
Adam<S> adam(AdamOptions<S> options = {}) {
  detail::require(options.weight_decay == S(0), "adam", "weight_decay", "0 (adamw decays weights)",
                  options.weight_decay);
  return Adam<S>(std::move(options), true);
}

template <class S>
Adam<S> adamw(AdamWOptions<S> options = {}) {
  return Adam<S>({std::move(options.learning_rate), options.b1, options.b2, options.eps, options.weight_decay}, true,
                 "adamw");
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
