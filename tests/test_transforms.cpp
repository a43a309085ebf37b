#include <catch2/catch.hpp>

#include <cmath>
#include <sstream>

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
  auto restored = opt.init(Vector<S>::Zero(3));  // wrong size on purpose: load resizes
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
                    "gradus::sgd: argument 'learning_rate': expected a value > 0, got 0");
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
