#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <sstream>
#include <streambuf>
#include <string>

#include <gradus/optim/transforms.hpp>

using namespace gradus;

static_assert(Transform<SGD<float>> && Transform<Adam<double>> && Transform<Scale<float>>);
static_assert(Transform<Chain<ClipByGlobalNorm<double>, Adam<double>>>);

namespace {

template <class S>
Vector<S> gradient_at(Index step, Index size) {  // a deterministic, varied gradient sequence
  Vector<S> g(size);
  for (Index i = 0; i < size; ++i) g(i) = S(std::sin(0.7 * double(i) + 1.3 * double(step)) * (1.0 + double(i % 5)));
  return g;
}

// Runs a transform for `steps` steps on the gradient sequence; returns the final params.
template <class T>
Vector<typename T::Scalar> run(const T& transform, Index size, Index steps) {
  using S = typename T::Scalar;
  Vector<S> params = Vector<S>::LinSpaced(size, S(-1), S(1));
  auto state = transform.init(params);
  for (Index k = 0; k < steps; ++k) {
    Vector<S> u = gradient_at<S>(k, size);
    transform.update(u, state, params);
    params += u;
  }
  return params;
}

}  // namespace

TEMPLATE_TEST_CASE("sgd with momentum 0 is plain gradient descent; momentum follows its recursion", "[transforms]",
                   float, double) {
  using S = TestType;
  for (Index size : {1, 3, 8, 17}) {
    Vector<S> plain = Vector<S>::LinSpaced(size, S(-1), S(1));
    Vector<S> heavy = plain, nesterov = plain, velocity = Vector<S>::Zero(size), velocity_n = velocity;
    for (Index k = 0; k < 10; ++k) {
      const Vector<S> g = gradient_at<S>(k, size);
      plain -= S(0.1) * g;
      velocity = S(0.9) * velocity + g;
      heavy -= S(0.1) * velocity;
      velocity_n = S(0.9) * velocity_n + g;
      nesterov -= S(0.1) * (g + S(0.9) * velocity_n);
    }
    // (approximate only because the compiler may fuse the oracle's multiply-subtract)
    const Vector<S> descent = run(sgd<S>({.learning_rate = 0.1}), size, 10);
    CHECK(descent.isApprox(plain, S(1e-6)));
    CHECK(run(momentum<S>({.learning_rate = 0.1, .momentum = 0}), size, 10) == descent);
    CHECK(run(chain(scale_by_learning_rate<S>(0.1)), size, 10) == descent);
    CHECK(run(momentum<S>({.learning_rate = 0.1}), size, 10).isApprox(heavy));
    CHECK(run(momentum<S>({.learning_rate = 0.1, .nesterov = true}), size, 10).isApprox(nesterov));
  }
  CHECK(sgd<S>().init(Vector<S>::Zero(4)).velocity.size() == 0);  // no memory without momentum
}

TEMPLATE_TEST_CASE("adam equals the chain of its parts and a scalar loop oracle", "[transforms]", float, double) {
  using S = TestType;
  for (Index size : {1, 2, 7, 9, 511, 512, 513, 1500}) {  // across the 512-entry blocks
    CAPTURE(size);
    const Vector<S> fused = run(adam<S>({.learning_rate = 0.01}), size, 25);
    CHECK(fused == run(chain(scale_by_adam<S>(), scale_by_learning_rate<S>(0.01)), size, 25));
    CHECK(run(adamw<S>({.learning_rate = 0.01, .weight_decay = 0.1}), size, 25) ==
          run(chain(scale_by_adam<S>(), add_decayed_weights<S>(0.1), scale_by_learning_rate<S>(0.01)), size, 25));

    // optax's formulas, one coordinate at a time, in double.
    Vector<double> params = Vector<double>::LinSpaced(size, -1, 1), m = Vector<double>::Zero(size), v = m;
    for (Index k = 0; k < 25; ++k) {
      const Vector<double> g = gradient_at<double>(k, size);
      for (Index i = 0; i < size; ++i) {
        m(i) = 0.9 * m(i) + 0.1 * g(i);
        v(i) = 0.999 * v(i) + 0.001 * g(i) * g(i);
        const double m_hat = m(i) / (1 - std::pow(0.9, double(k + 1)));
        const double v_hat = v(i) / (1 - std::pow(0.999, double(k + 1)));
        params(i) -= 0.01 * m_hat / (std::sqrt(v_hat) + 1e-8);
      }
    }
    CHECK(fused.template cast<double>().isApprox(params, std::is_same_v<S, float> ? 1e-5 : 1e-12));
  }
}

TEMPLATE_TEST_CASE("scale, add_decayed_weights and clip_by_global_norm", "[transforms]", float, double) {
  using S = TestType;
  const Vector<S> params = Vector<S>::Constant(4, S(2));
  Vector<S> u = Vector<S>::Constant(4, S(3));  // norm 6
  EmptyState none;
  clip_by_global_norm<S>(S(1.5)).update(u, none, params);
  CHECK(u.norm() == Approx(1.5));
  CHECK(u.isConstant(S(0.75)));
  clip_by_global_norm<S>(S(10)).update(u, none, params);  // below the threshold: unchanged
  CHECK(u.isConstant(S(0.75)));
  scale<S>(S(-2)).update(u, none, params);
  CHECK(u.isConstant(S(-1.5)));
  add_decayed_weights<S>(S(0.5)).update(u, none, params);
  CHECK(u.isConstant(S(-0.5)));
}

TEST_CASE("learning-rate schedules", "[transforms][schedules]") {
  const StepDecay<double> step{.initial = 1.0, .factor = 0.5, .every = 10};
  CHECK(step(0) == 1.0);
  CHECK(step(9) == 1.0);
  CHECK(step(10) == 0.5);
  CHECK(step(25) == 0.25);

  const CosineDecay<double> cosine{.initial = 2.0, .decay_steps = 100, .alpha = 0.1};
  CHECK(cosine(0) == Approx(2.0));
  CHECK(cosine(50) == Approx(2.0 * (0.1 + 0.9 * 0.5)));
  CHECK(cosine(100) == Approx(0.2));
  CHECK(cosine(1000) == Approx(0.2));

  const LinearWarmup<double> warmup{.warmup_steps = 4, .after = cosine};
  CHECK(warmup(0) == Approx(0.5));
  CHECK(warmup(3) == Approx(2.0));
  CHECK(warmup(4) == Approx(2.0));
  CHECK(warmup(54) == Approx(cosine(50)));

  // The state records the rate each update used; a lambda works as a schedule.
  auto opt = sgd<double>({.learning_rate = [](std::int64_t t) { return 1.0 / double(t + 1); }});
  Vector<double> params = Vector<double>::Zero(2), u(2);
  auto state = opt.init(params);
  for (int k = 0; k < 3; ++k) {
    u.setOnes();
    opt.update(u, state, params);
  }
  CHECK(state.step == 3);
  CHECK(state.learning_rate == Approx(1.0 / 3));
  CHECK(u.isConstant(-1.0 / 3));

  auto decayed = adam<double>({.learning_rate = step});
  auto adam_state = decayed.init(params);
  for (int k = 0; k < 11; ++k) {
    u.setOnes();
    decayed.update(u, adam_state, params);
  }
  CHECK(adam_state.learning_rate == 0.5);
}

TEMPLATE_TEST_CASE("saved and restored state continues bit-identically", "[transforms][checkpoint]", float, double) {
  using S = TestType;
  const auto opt = chain(clip_by_global_norm<S>(S(3)), adamw<S>({.learning_rate = CosineDecay<S>{.initial = S(0.05),
                                                                                                 .decay_steps = 30}}),
                         scale<S>(S(0.5)));
  const Index size = 37;
  auto steps = [&](Vector<S>& params, auto& state, Index from, Index to) {
    for (Index k = from; k < to; ++k) {
      Vector<S> u = gradient_at<S>(k, size);
      opt.update(u, state, params);
      params += u;
    }
  };
  Vector<S> straight = Vector<S>::LinSpaced(size, S(-1), S(1));
  auto straight_state = opt.init(straight);
  steps(straight, straight_state, 0, 40);

  Vector<S> resumed = Vector<S>::LinSpaced(size, S(-1), S(1));
  auto first_state = opt.init(resumed);
  steps(resumed, first_state, 0, 17);
  std::stringstream checkpoint;
  save_state(checkpoint, first_state);
  decltype(first_state) restored;  // empty: load sizes it (a target of another size is refused)
  load_state(checkpoint, restored);
  CHECK(std::get<1>(restored).step == 17);
  CHECK(std::get<1>(restored).mu == std::get<1>(first_state).mu);
  steps(resumed, restored, 17, 40);
  CHECK(resumed == straight);

  // Momentum state too.
  const auto heavy = momentum<S>({.learning_rate = S(0.1)});
  auto heavy_state = heavy.init(straight);
  Vector<S> u = gradient_at<S>(0, size);
  heavy.update(u, heavy_state, straight);
  std::stringstream stream;
  save_state(stream, heavy_state);
  auto heavy_restored = heavy.init(straight);
  load_state(stream, heavy_restored);
  CHECK(heavy_restored.velocity == heavy_state.velocity);
  CHECK(heavy_restored.step == 1);
}

TEST_CASE("transforms reject bad hyperparameters, sizes and streams", "[transforms][errors]") {
  CHECK_THROWS_WITH(sgd<double>({.learning_rate = 0}),
                    "gradus::sgd: argument 'learning_rate': expected a finite value > 0, got 0");
  CHECK_THROWS_AS(sgd<double>({.learning_rate = -1}), gradus::invalid_argument);
  CHECK_THROWS_AS(sgd<double>({.learning_rate = std::nan("")}), gradus::invalid_argument);
  CHECK_THROWS_AS(momentum<double>({.momentum = 1.0}), gradus::invalid_argument);
  CHECK_THROWS_AS(momentum<double>({.momentum = -0.1}), gradus::invalid_argument);
  CHECK_THROWS_AS(adam<double>({.b1 = 1.0}), gradus::invalid_argument);
  CHECK_THROWS_AS(adam<double>({.b2 = -0.5}), gradus::invalid_argument);
  CHECK_THROWS_AS(adam<double>({.eps = -1e-8}), gradus::invalid_argument);
  CHECK_THROWS_AS(adamw<double>({.weight_decay = -1}), gradus::invalid_argument);
  CHECK_THROWS_AS(clip_by_global_norm<double>(0.0), gradus::invalid_argument);
  CHECK_THROWS_AS(scale<double>(INFINITY), gradus::invalid_argument);
  CHECK_THROWS_AS(add_decayed_weights<double>(-1.0), gradus::invalid_argument);
  CHECK_THROWS_AS(sgd<double>({.learning_rate = StepDecay<double>{.every = 0}}), gradus::invalid_argument);
  CHECK_THROWS_AS(sgd<double>({.learning_rate = CosineDecay<double>{.alpha = 2}}), gradus::invalid_argument);
  CHECK_THROWS_AS(sgd<double>({.learning_rate = LinearWarmup<double>{.warmup_steps = -1}}), gradus::invalid_argument);

  const auto opt = adam<double>();
  Vector<double> params = Vector<double>::Zero(4), u = Vector<double>::Zero(3);
  auto state = opt.init(params);
  CHECK_THROWS_WITH(opt.update(u, state, params),
                    "gradus::adam: argument 'updates': expected 4 entries (size of params), got 3");
  auto small_state = opt.init(Vector<double>::Zero(2));
  Vector<double> u4 = Vector<double>::Zero(4);
  CHECK_THROWS_AS(opt.update(u4, small_state, params), gradus::invalid_argument);

  std::stringstream garbage("not a state");
  CHECK_THROWS_AS(load_state(garbage, state), gradus::invalid_argument);
  std::stringstream truncated;
  save_state(truncated, state);
  std::string bytes = truncated.str();
  std::stringstream cut(bytes.substr(0, bytes.size() - 5));
  CHECK_THROWS_AS(load_state(cut, state), gradus::invalid_argument);
}

TEST_CASE("non-finite gradients propagate as NaN", "[transforms]") {
  const auto opt = adam<double>();
  Vector<double> params = Vector<double>::Zero(3), u(3);
  u << 1, std::nan(""), 2;
  auto state = opt.init(params);
  opt.update(u, state, params);
  CHECK(std::isnan(u(1)));
  CHECK(std::isfinite(u(0)));
}

// ---------------------------------------------------------------------------------------
// Checkpoints.

namespace {

template <class State>
std::string saved(const State& state) {
  std::stringstream out;
  save_state(out, state);
  return out.str();
}

// Loads `bytes` into `target`: either it loads exactly `expected`, or it throws
// gradus::invalid_argument and leaves the target as it was. Returns whether it loaded.
template <class State>
bool loads_exactly_or_refuses(const std::string& bytes, State& target, const std::string& expected) {
  const std::string before = saved(target);
  std::stringstream in(bytes);
  try {
    load_state(in, target);
  } catch (const gradus::invalid_argument&) {
    CHECK(saved(target) == before);
    return false;
  }
  CHECK(saved(target) == expected);
  return true;
}

// A readable stream that cannot seek (a pipe, a socket): load_state cannot ask its size.
class UnseekableBuffer : public std::streambuf {
 public:
  explicit UnseekableBuffer(std::string bytes) : bytes_(std::move(bytes)) {
    setg(bytes_.data(), bytes_.data(), bytes_.data() + bytes_.size());
  }

 private:
  std::string bytes_;
};

template <class S>
Vector<S> stepped(Index size) {
  return Vector<S>::LinSpaced(size, S(-1), S(1));
}

}  // namespace

TEMPLATE_TEST_CASE("every state round-trips bit-exactly", "[transforms][checkpoint]", float, double) {
  using S = TestType;
  auto round_trip = [](const auto& transform) {
    const Vector<S> params = stepped<S>(5);
    auto state = transform.init(params);
    for (Index k = 0; k < 3; ++k) {
      Vector<S> u = gradient_at<S>(k, 5);
      transform.update(u, state, params);
    }
    const std::string bytes = saved(state);
    decltype(state) empty;
    auto sized = transform.init(params);
    for (auto* target : {&empty, &sized}) {
      std::stringstream in(bytes);
      load_state(in, *target);
      CHECK(saved(*target) == bytes);
    }
  };
  round_trip(scale<S>(S(2)));
  round_trip(scale_by_learning_rate<S>(StepDecay<S>{.initial = S(0.5), .factor = S(0.5), .every = 2}));
  round_trip(sgd<S>());
  round_trip(momentum<S>({.nesterov = true}));
  round_trip(adam<S>());
  round_trip(adamw<S>());
  round_trip(scale_by_adam<S>());
  round_trip(chain(clip_by_global_norm<S>(S(1)), momentum<S>(), chain(scale_by_adam<S>(), scale<S>(S(-1)))));

  // Two checkpoints back to back in one stream.
  const auto opt = adam<S>();
  auto first = opt.init(stepped<S>(2));
  auto second = opt.init(stepped<S>(4));
  second.step = 9;
  std::stringstream stream;
  save_state(stream, first);
  save_state(stream, second);
  AdamState<S> a, b;
  load_state(stream, a);
  load_state(stream, b);
  CHECK(saved(a) == saved(first));
  CHECK(saved(b) == saved(second));
}

TEMPLATE_TEST_CASE("every corrupted byte and every truncation of a checkpoint is refused, the target untouched",
                   "[transforms][checkpoint]", float, double) {
  using S = TestType;
  auto campaign = [](const auto& transform, Index size) {
    const Vector<S> params = stepped<S>(size);
    auto state = transform.init(params);
    for (Index k = 0; k < 2; ++k) {
      Vector<S> u = gradient_at<S>(k, size);
      transform.update(u, state, params);
    }
    const std::string bytes = saved(state);
    auto sized = transform.init(params);  // a target of known sizes, with other values
    Vector<S> u = gradient_at<S>(7, size);
    transform.update(u, sized, params);
    decltype(state) empty;  // a target of unknown sizes
    std::size_t loaded = 0;
    for (std::size_t offset = 0; offset < bytes.size(); ++offset) {
      for (const unsigned char flip : {0x01, 0x80, 0xff}) {
        std::string corrupted = bytes;
        corrupted[offset] = static_cast<char>(static_cast<unsigned char>(corrupted[offset]) ^ flip);
        auto target_sized = sized;
        auto target_empty = empty;
        loaded += loads_exactly_or_refuses(corrupted, target_sized, bytes);
        loaded += loads_exactly_or_refuses(corrupted, target_empty, bytes);
      }
    }
    CHECK(loaded == 0);  // every single-byte change is detected
    for (std::size_t length = 0; length < bytes.size(); ++length) {
      auto target = sized;
      CHECK_FALSE(loads_exactly_or_refuses(bytes.substr(0, length), target, bytes));
    }
    auto target = empty;
    CHECK(loads_exactly_or_refuses(bytes, target, bytes));
  };
  campaign(adam<S>(), 3);
  campaign(chain(clip_by_global_norm<S>(S(1)), momentum<S>(), adamw<S>(), scale<S>(S(0.5))), 2);
}

TEST_CASE("load_state checks the header against the target before touching it", "[transforms][checkpoint][errors]") {
  const auto opt = adam<double>();
  const Vector<double> params = stepped<double>(3);
  auto state = opt.init(params);
  Vector<double> u = gradient_at<double>(0, 3);
  opt.update(u, state, params);
  const std::string bytes = saved(state);
  std::uint32_t signature_length = 0;
  std::memcpy(&signature_length, bytes.data() + 16, 4);
  const std::size_t mu_length_offset = 20 + signature_length;  // then nu's length, then the values
  auto with_int64 = [&](std::size_t offset, std::int64_t value) {
    std::string patched = bytes;
    std::memcpy(patched.data() + offset, &value, 8);
    return patched;
  };
  auto message = [](const std::string& file, auto& target) {
    std::stringstream in(file);
    try {
      load_state(in, target);
    } catch (const gradus::invalid_argument& error) {
      return std::string(error.what());
    }
    return std::string("loaded");
  };
  const std::string before = saved(state);

  // A length of 2^33 entries, -3, or more than the stream holds: refused before any allocation,
  // into a sized or an empty target, which then destroys cleanly.
  AdamState<double> empty;
  for (const std::int64_t length : {std::int64_t(1) << 33, std::int64_t(-3), std::int64_t(4)}) {
    CAPTURE(length);
    CHECK(message(with_int64(mu_length_offset, length), state).find("gradus::load_state: argument 'state.mu'") == 0);
    CHECK(saved(state) == before);
    CHECK(message(with_int64(mu_length_offset, length), empty) != "loaded");
  }
  CHECK(message(with_int64(mu_length_offset, std::int64_t(1) << 33), empty) ==
        "gradus::load_state: argument 'stream': expected 68719476784 more bytes (the sizes in its header), got 72 "
        "(a truncated checkpoint)");
  CHECK(message(with_int64(mu_length_offset, -3), empty) ==
        "gradus::load_state: argument 'state.mu': expected an entry count in [0, 2^48], got -3");
  CHECK(empty.mu.size() == 0);
  CHECK(message(with_int64(mu_length_offset, 4), state) ==
        "gradus::load_state: argument 'state.mu': expected 3 entries (the size of the target state), got 4");

  // A stream that cannot tell its size: the vector grows with the data actually read.
  for (const std::int64_t length : {std::int64_t(1) << 33, std::int64_t(1) << 40}) {
    UnseekableBuffer buffer(with_int64(mu_length_offset, length));
    std::istream in(&buffer);
    CHECK_THROWS_WITH(load_state(in, empty), Catch::Contains("expected a complete checkpoint, got one truncated"));
    CHECK(empty.mu.size() == 0);
  }
  UnseekableBuffer intact(bytes);
  std::istream intact_stream(&intact);
  load_state(intact_stream, empty);
  CHECK(saved(empty) == bytes);

  // The wrong type, scalar, byte order or version; garbage; a truncated file.
  const std::string sgd_bytes = saved(momentum<double>().init(params));
  CHECK(message(sgd_bytes, state) ==
        "gradus::load_state: argument 'stream': expected a checkpoint of adam(step: int64, learning_rate: double, "
        "mu: double[], nu: double[]), got sgd(step: int64, learning_rate: double, velocity: double[])");
  AdamState<float> single = adam<float>().init(params.cast<float>());
  CHECK(message(bytes, single).find("expected a checkpoint of adam(step: int64, learning_rate: float, mu: float[], "
                                    "nu: float[]), got adam(step: int64, learning_rate: double") != std::string::npos);
  auto chained = chain(clip_by_global_norm(1.0), adam<double>()).init(params);
  CHECK(message(bytes, chained).find("expected a checkpoint of chain(stateless(), adam(") != std::string::npos);
  std::string swapped = bytes;
  std::reverse(swapped.begin() + 8, swapped.begin() + 12);
  CHECK(message(swapped, state) ==
        "gradus::load_state: argument 'stream': expected a checkpoint in this machine's byte order, got one of the "
        "opposite byte order");
  std::string version = bytes;
  version[12] = 3;
  CHECK(message(version, state) ==
        "gradus::load_state: argument 'stream': expected a checkpoint of format version 2, got 3");
  CHECK(message("gradus", state) ==
        "gradus::load_state: argument 'stream': expected a complete checkpoint, got one truncated after 6 bytes");
  CHECK(message("not a state at all", state) ==
        "gradus::load_state: argument 'stream': expected a gradus state checkpoint, got other data");
  CHECK(message(bytes.substr(0, bytes.size() - 1), state) ==
        "gradus::load_state: argument 'stream': expected 72 more bytes (the sizes in its header), got 71 (a truncated "
        "checkpoint)");
  std::string flipped = bytes;
  flipped[bytes.size() - 20] ^= 1;
  CHECK(message(flipped, state) ==
        "gradus::load_state: argument 'stream': expected a checkpoint whose checksum matches, got a corrupted one");
  CHECK(saved(state) == before);

  // A stream that throws at its end still gives invalid_argument.
  std::stringstream throwing(bytes.substr(0, 30));
  throwing.exceptions(std::ios_base::failbit | std::ios_base::eofbit);
  CHECK_THROWS_AS(load_state(throwing, state), gradus::invalid_argument);
  std::stringstream failed;
  failed.setstate(std::ios_base::failbit);
  CHECK_THROWS_WITH(load_state(failed, state),
                    "gradus::load_state: argument 'stream': expected a readable stream, got a failed stream");
  CHECK(saved(state) == before);
}

TEST_CASE("checkpoints hold finite values and counters >= 0", "[transforms][checkpoint][errors]") {
  const auto opt = adam<double>();
  auto state = opt.init(stepped<double>(3));
  state.mu(1) = std::nan("");
  std::stringstream out;
  CHECK_THROWS_WITH(save_state(out, state),
                    "gradus::save_state: argument 'state.mu': expected finite values, got nan at index 1");
  CHECK(out.str().empty());  // nothing written
  state.mu(1) = 0;
  state.step = -1;
  CHECK_THROWS_WITH(save_state(out, state), "gradus::save_state: argument 'state.step': expected a value >= 0, got -1");
  CHECK(out.str().empty());

  // A well-formed checkpoint (valid checksum) holding a NaN or a negative counter: refused.
  auto forge = [](std::int64_t step, double learning_rate, double mu0) {
    AdamState<double> forged{step, learning_rate, Vector<double>::Zero(2), Vector<double>::Zero(2)};
    forged.mu(0) = mu0;
    std::stringstream file;
    gradus::detail::StateWriter writer(file);
    file.write(gradus::detail::state_magic, 8);
    writer.raw(gradus::detail::state_byte_order);
    writer.raw(gradus::detail::state_version);
    const std::string signature = gradus::detail::signature(forged);
    writer.put(static_cast<std::uint32_t>(signature.size()));
    writer.put(signature);
    writer.put(std::int64_t(2));
    writer.put(std::int64_t(2));
    writer.put(forged.step);
    writer.put(forged.learning_rate);
    writer.put(forged.mu);
    writer.put(forged.nu);
    writer.finish();
    return file.str();
  };
  AdamState<double> target;
  std::stringstream good(forge(3, 0.1, 0.5));
  load_state(good, target);
  CHECK(target.step == 3);
  CHECK(target.mu(0) == 0.5);
  const std::string before = saved(target);
  std::stringstream nan_mu(forge(3, 0.1, std::nan("")));
  CHECK_THROWS_WITH(load_state(nan_mu, target),
                    "gradus::load_state: argument 'state.mu': expected finite values, got nan at index 0");
  std::stringstream infinite_rate(forge(3, INFINITY, 0.5));
  CHECK_THROWS_WITH(load_state(infinite_rate, target),
                    "gradus::load_state: argument 'state.learning_rate': expected a finite value, got inf");
  std::stringstream negative_step(forge(-2, 0.1, 0.5));
  CHECK_THROWS_WITH(load_state(negative_step, target),
                    "gradus::load_state: argument 'state.step': expected a value >= 0, got -2");
  CHECK(saved(target) == before);
}

// ---------------------------------------------------------------------------------------
// Hyperparameter domains.

namespace {

// One update of `transform` on a fixed gradient: the result must be finite.
template <class T>
bool finite_update(const T& transform, typename T::Scalar gradient = 0.5) {
  using S = typename T::Scalar;
  const Vector<S> params = Vector<S>::Constant(3, S(0.25));
  auto state = transform.init(params);
  bool finite = true;
  for (int k = 0; k < 3; ++k) {
    Vector<S> u = Vector<S>::Constant(3, gradient);
    transform.update(u, state, params);
    finite = finite && u.allFinite();
  }
  return finite;
}

}  // namespace

TEMPLATE_TEST_CASE("every hyperparameter boundary: the last accepted value works, the next is refused",
                   "[transforms][errors]", float, double) {
  using S = TestType;
  using limits = std::numeric_limits<S>;
  const S big = limits::max(), tiny = limits::denorm_min(), below_one = std::nextafter(S(1), S(0));
  const S above_one = std::nextafter(S(1), S(2)), below_zero = std::nextafter(S(0), S(-1)), inf = limits::infinity();
  const S nan = limits::quiet_NaN();

  // Learning rates: finite and > 0.
  CHECK(finite_update(sgd<S>({.learning_rate = big})));
  CHECK(finite_update(sgd<S>({.learning_rate = tiny})));
  // (Adam's step is the rate times a ratio near 1 that rounding may lift above 1.)
  CHECK(finite_update(adam<S>({.learning_rate = big / 4})));
  CHECK(finite_update(scale_by_learning_rate<S>(big)));
  for (const S rate : {S(0), inf, -inf, nan, -tiny}) {
    CHECK_THROWS_AS(sgd<S>({.learning_rate = rate}), gradus::invalid_argument);
    CHECK_THROWS_AS(momentum<S>({.learning_rate = rate}), gradus::invalid_argument);
    CHECK_THROWS_AS(adam<S>({.learning_rate = rate}), gradus::invalid_argument);
    CHECK_THROWS_AS(adamw<S>({.learning_rate = rate}), gradus::invalid_argument);
    CHECK_THROWS_AS(scale_by_learning_rate<S>(rate), gradus::invalid_argument);
  }
  CHECK_THROWS_WITH(sgd<S>({.learning_rate = inf}),
                    "gradus::sgd: argument 'learning_rate': expected a finite value > 0, got inf");

  // Momentum and Adam's betas: [0, 1).
  CHECK(finite_update(momentum<S>({.momentum = below_one})));
  CHECK(finite_update(momentum<S>({.momentum = below_one, .nesterov = true})));
  CHECK(finite_update(momentum<S>({.momentum = 0})));
  CHECK(finite_update(adam<S>({.b1 = below_one, .b2 = below_one})));
  CHECK(finite_update(adam<S>({.b1 = 0, .b2 = 0})));
  CHECK(finite_update(scale_by_adam<S>({.b1 = below_one, .b2 = below_one})));
  for (const S beta : {S(1), below_zero, nan, inf}) {
    CHECK_THROWS_AS(momentum<S>({.momentum = beta}), gradus::invalid_argument);
    CHECK_THROWS_AS(sgd<S>({.momentum = beta}), gradus::invalid_argument);
    CHECK_THROWS_AS(adam<S>({.b1 = beta}), gradus::invalid_argument);
    CHECK_THROWS_AS(adam<S>({.b2 = beta}), gradus::invalid_argument);
    CHECK_THROWS_AS(adamw<S>({.b1 = beta}), gradus::invalid_argument);
    CHECK_THROWS_AS(scale_by_adam<S>({.b2 = beta}), gradus::invalid_argument);
  }
  CHECK_THROWS_WITH(momentum<S>({.momentum = 1}),
                    "gradus::momentum: argument 'momentum': expected a value in [0, 1), got 1");

  // eps in (0, 1] (the paper's eps keeps 0 / 0 out of a zero gradient's update).
  CHECK(finite_update(adam<S>({.eps = tiny}), S(0)));
  CHECK(finite_update(adam<S>({.eps = tiny}), S(1e-30)));
  CHECK(finite_update(adam<S>({.eps = S(1)})));
  for (const S eps : {S(0), -tiny, std::nextafter(S(1), S(2)), big, inf, nan}) {
    CHECK_THROWS_AS(adam<S>({.eps = eps}), gradus::invalid_argument);
    CHECK_THROWS_AS(adamw<S>({.eps = eps}), gradus::invalid_argument);
    CHECK_THROWS_AS(scale_by_adam<S>({.eps = eps}), gradus::invalid_argument);
  }
  CHECK_THROWS_WITH(adam<S>({.eps = 0}), "gradus::adam: argument 'eps': expected a value in (0, 1], got 0");
  {
    const auto opt = adam<S>({.eps = tiny});
    const Vector<S> params = Vector<S>::Zero(2);
    auto state = opt.init(params);
    Vector<S> u = Vector<S>::Zero(2);
    opt.update(u, state, params);
    CHECK(u.isZero());  // a zero gradient moves nothing
  }

  // Weight decay: finite and >= 0; adam itself takes none.
  CHECK(finite_update(adamw<S>({.weight_decay = 0})));
  CHECK(finite_update(adamw<S>({.learning_rate = S(1e-3), .weight_decay = S(1e30)})));
  CHECK(finite_update(add_decayed_weights<S>(S(1e30))));
  CHECK(finite_update(add_decayed_weights<S>(S(0))));
  for (const S decay : {-tiny, inf, nan}) {
    CHECK_THROWS_AS(adamw<S>({.weight_decay = decay}), gradus::invalid_argument);
    CHECK_THROWS_AS(add_decayed_weights<S>(decay), gradus::invalid_argument);
  }
  CHECK_THROWS_WITH(adam<S>({.weight_decay = S(0.5)}),
                    "gradus::adam: argument 'weight_decay': expected 0 (adamw decays weights), got 0.5");

  // scale: any finite factor; clip_by_global_norm: finite max_norm > 0.
  CHECK(finite_update(scale<S>(big), S(0.5)));
  CHECK(finite_update(scale<S>(-big), S(0.5)));
  CHECK_THROWS_AS(scale<S>(-inf), gradus::invalid_argument);
  CHECK_THROWS_AS(scale<S>(nan), gradus::invalid_argument);
  CHECK(finite_update(clip_by_global_norm<S>(big), big));
  CHECK(finite_update(clip_by_global_norm<S>(tiny), big));
  for (const S norm : {S(0), -tiny, inf, nan}) CHECK_THROWS_AS(clip_by_global_norm<S>(norm), gradus::invalid_argument);

  // Schedules.
  CHECK(finite_update(sgd<S>({.learning_rate = StepDecay<S>{.initial = big, .factor = 1, .every = 1}})));
  CHECK(finite_update(sgd<S>({.learning_rate = StepDecay<S>{.initial = tiny, .factor = tiny, .every = 1}})));
  CHECK_THROWS_AS(sgd<S>({.learning_rate = StepDecay<S>{.initial = inf}}), gradus::invalid_argument);
  CHECK_THROWS_AS(sgd<S>({.learning_rate = StepDecay<S>{.initial = 0}}), gradus::invalid_argument);
  CHECK_THROWS_WITH(sgd<S>({.learning_rate = StepDecay<S>{.factor = above_one}}),
                    Catch::StartsWith("gradus::StepDecay: argument 'factor': expected a value in (0, 1], got 1.0"));
  CHECK_THROWS_AS(sgd<S>({.learning_rate = StepDecay<S>{.factor = 0}}), gradus::invalid_argument);
  CHECK_THROWS_AS(sgd<S>({.learning_rate = StepDecay<S>{.every = 0}}), gradus::invalid_argument);
  CHECK(finite_update(sgd<S>({.learning_rate = CosineDecay<S>{.initial = big, .decay_steps = 1, .alpha = 1}})));
  CHECK(finite_update(sgd<S>({.learning_rate = CosineDecay<S>{.decay_steps = 1, .alpha = 0}})));
  CHECK_THROWS_AS(sgd<S>({.learning_rate = CosineDecay<S>{.initial = inf}}), gradus::invalid_argument);
  CHECK_THROWS_AS(sgd<S>({.learning_rate = CosineDecay<S>{.decay_steps = 0}}), gradus::invalid_argument);
  CHECK_THROWS_AS(sgd<S>({.learning_rate = CosineDecay<S>{.alpha = above_one}}), gradus::invalid_argument);
  CHECK_THROWS_AS(sgd<S>({.learning_rate = CosineDecay<S>{.alpha = below_zero}}), gradus::invalid_argument);
  CHECK(finite_update(sgd<S>({.learning_rate = LinearWarmup<S>{.warmup_steps = 0, .after = big}})));
  CHECK(finite_update(sgd<S>({.learning_rate = LinearWarmup<S>{.warmup_steps = 1000000000, .after = S(0.1)}})));
  // Warming up to the largest rate: the fraction of the warmup comes first, so no rate overflows.
  const LinearWarmup<S> to_big{.warmup_steps = 1000, .after = big};
  for (std::int64_t step : {std::int64_t(0), std::int64_t(1), std::int64_t(999), std::int64_t(1000)}) {
    CHECK(std::isfinite(to_big(step)));
    CHECK(to_big(step) <= big);
  }
  CHECK_THROWS_AS(sgd<S>({.learning_rate = LinearWarmup<S>{.warmup_steps = -1}}), gradus::invalid_argument);
  CHECK_THROWS_WITH(sgd<S>({.learning_rate = LinearWarmup<S>{.after = inf}}),
                    "gradus::LinearWarmup: argument 'after': expected a finite value > 0, got inf");

  // A schedule of your own: each rate must be finite and >= 0 (0 is the end of a decay); a bad
  // one is refused before the updates or the state change.
  CHECK(finite_update(adam<S>({.learning_rate = [](std::int64_t) { return S(0); }})));
  for (const S rate : {-tiny, inf, nan}) {
    const auto opt = momentum<S>({.learning_rate = [rate](std::int64_t t) { return t < 2 ? S(0.1) : rate; }});
    const Vector<S> params = Vector<S>::Zero(2);
    auto state = opt.init(params);
    Vector<S> u = Vector<S>::Ones(2);
    opt.update(u, state, params);
    opt.update(u, state, params);
    const auto before = state.velocity;
    u.setOnes();
    CHECK_THROWS_WITH(opt.update(u, state, params),
                      Catch::StartsWith("gradus::momentum: argument 'learning_rate': expected a finite rate >= 0 "
                                        "from the schedule at step 2, got "));
    CHECK(state.step == 2);
    CHECK(state.velocity == before);
    CHECK(u.isOnes());
  }
}

TEMPLATE_TEST_CASE("errors name the entry point the user called", "[transforms][errors]", float, double) {
  using S = TestType;
  CHECK_THROWS_WITH(scale_by_adam<S>({.b1 = 1}), "gradus::scale_by_adam: argument 'b1': expected a value in [0, 1), got 1");
  CHECK_THROWS_WITH(adamw<S>({.b2 = -1}), "gradus::adamw: argument 'b2': expected a value in [0, 1), got -1");
  const Vector<S> params = Vector<S>::Zero(4);
  Vector<S> u = Vector<S>::Zero(3);
  auto check = [&](const auto& transform, const std::string& name) {
    auto state = transform.init(params);
    CHECK_THROWS_WITH(transform.update(u, state, params),
                      "gradus::" + name + ": argument 'updates': expected 4 entries (size of params), got 3");
  };
  check(scale_by_adam<S>(), "scale_by_adam");
  check(adamw<S>(), "adamw");
  check(adam<S>(), "adam");
  check(momentum<S>(), "momentum");
  check(sgd<S>(), "sgd");
  check(scale_by_learning_rate<S>(S(1)), "scale_by_learning_rate");

  // A corrupted step counter is refused, never overflowed.
  Vector<S> u4 = Vector<S>::Zero(4);
  auto state = scale_by_adam<S>().init(params);
  for (const std::int64_t step : {std::int64_t(-1), std::numeric_limits<std::int64_t>::max()}) {
    state.step = step;
    CHECK_THROWS_WITH(scale_by_adam<S>().update(u4, state, params),
                      Catch::StartsWith("gradus::scale_by_adam: argument 'state.step': expected a value in [0, 2^63 - 1)"));
    CHECK(state.mu.isZero());
  }
  state.step = std::numeric_limits<std::int64_t>::max() - 1;
  scale_by_adam<S>().update(u4, state, params);
  CHECK(u4.allFinite());
}

TEMPLATE_TEST_CASE("clip_by_global_norm neither overflows nor underflows", "[transforms]", float, double) {
  using S = TestType;
  EmptyState none;
  const Vector<S> params = Vector<S>::Zero(2);
  auto clipped = [&](S a, S b, S max_norm) {
    Vector<S> u(2);
    u << a, b;
    clip_by_global_norm<S>(max_norm).update(u, none, params);
    return u;
  };
  const S half_sqrt2 = S(std::sqrt(0.5));
  // [1e20, 1e20] in float: its squared norm overflows; clipped to norm 1, not to [0, 0].
  Vector<S> u = clipped(S(1e20), S(1e20), S(1));
  CHECK(u(0) == Approx(half_sqrt2).epsilon(1e-6));
  CHECK(u(1) == Approx(half_sqrt2).epsilon(1e-6));
  // [1e-30, 1e-30] in float: its squared norm underflows; clipped to 1e-31 all the same.
  u = clipped(S(1e-30), S(1e-30), S(1e-31));
  CHECK(u(0) / S(1e-31) == Approx(half_sqrt2).epsilon(1e-6));
  CHECK(u.stableNorm() / S(1e-31) == Approx(1).epsilon(1e-6));
  // The extremes: max() entries, and a max_norm whose ratio to the norm underflows.
  const S big = std::numeric_limits<S>::max();
  u = clipped(big, big, S(2));
  CHECK(u(0) == Approx(2 * half_sqrt2).epsilon(1e-6));
  u = clipped(S(3e30), S(4e30), S(1e-30));
  CHECK(u(0) / S(1e-30) == Approx(0.6).epsilon(1e-6));
  CHECK(u(1) / S(1e-30) == Approx(0.8).epsilon(1e-6));
  // Below the threshold: unchanged, bit for bit; NaN passes through.
  u = clipped(S(1e-30), S(1e-30), S(1e-29));
  CHECK(u(0) == S(1e-30));
  u = clipped(std::numeric_limits<S>::quiet_NaN(), S(1), S(1));
  CHECK(std::isnan(u(0)));
  CHECK(u(1) == 1);
  u = clipped(std::numeric_limits<S>::infinity(), S(1), S(1));  // an infinite norm: NaN, never a finite lie
  CHECK(std::isnan(u(0)));
}

TEMPLATE_TEST_CASE("adam's first step on a gradient near the largest S is -lr sign(g), not NaN", "[transforms]", float,
                   double) {
  // m_hat = g itself is representable, but c1 m (c1 = 1 / (1 - b1)) may round past it.
  using S = TestType;
  const S big = std::numeric_limits<S>::max();
  const auto adam_ = adam<S>({.learning_rate = S(0.5)});
  const Vector<S> params = Vector<S>::Zero(3);
  auto state = adam_.init(params);
  Vector<S> u(3);
  u << -big, big, S(1);
  adam_.update(u, state, params);
  REQUIRE(u.allFinite());
  // v overflowed for the two largest entries: their step is 0 instead of -lr sign(g), a bounded error.
  CHECK(std::abs(u(0)) <= S(0.5));
  CHECK(std::abs(u(1)) <= S(0.5));
  CHECK(u(2) == Approx(-0.5).epsilon(1e-6));
}
