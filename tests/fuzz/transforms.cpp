// Fuzz harness: the gradient transformations sgd, momentum (heavy ball, Nesterov), adam, adamw,
// chain(scale_by_adam, scale_by_learning_rate), clip_by_global_norm, chain(clip, sgd), and the
// learning-rate schedules, over a few steps of finite or special gradients.
//
// Asserted, for every call that does not throw:
// - an accepted constant learning rate is finite; every accepted schedule gives finite rates >= 0 at any
//   step (0, 1, its boundaries, INT64_MAX), CosineDecay within [alpha initial, initial];
// - with finite gradients: sgd without momentum gives u = -lr g bit for bit; (heavy-ball) momentum
//   updates are finite where |g|_max 2 / (1 - mu) (times the steps), and lr times it, are below max(S)/16;
// - adam's first step is u = -lr g / (|g| + eps) (m_hat = g, v_hat = g^2) within 1e-4 (float) /
//   1e-10 (double) relative; chain(scale_by_adam, scale_by_learning_rate) equals adam;
// - clip_by_global_norm: u = g when ||g|| <= c, else ||u|| = c within 1e-5 relative, u parallel to g.
#include "fuzz.hpp"

#include "gradus/optim/transforms.hpp"

using gradus::Index;
using gradus::Vector;

namespace {

template <class S>
gradus::LearningRate<S> learning_rate(FuzzedDataProvider& in) {
  using L = std::numeric_limits<S>;
  const S initial = fuzz::pick<S>(in, {S(0.01), S(1), L::denorm_min(), S(1e30), L::max(), S(0), L::infinity(), L::quiet_NaN()});
  const std::int64_t steps = fuzz::pick<std::int64_t>(in, {1000, 1, 0, -1, std::numeric_limits<std::int64_t>::max()});
  switch (in.ConsumeIntegralInRange<int>(0, 3)) {
    case 1:
      return gradus::StepDecay<S>{initial, fuzz::pick<S>(in, {S(0.1), S(1), S(2), L::denorm_min(), S(0), L::max()}), steps};
    case 2:
      return gradus::CosineDecay<S>{initial, steps, fuzz::pick<S>(in, {S(0), S(0.5), S(1), fuzz::up(S(1)), S(-0.0), L::quiet_NaN()})};
    case 3:
      return gradus::LinearWarmup<S>{steps, initial};
    default:
      return initial;
  }
}

template <class S>
void check_schedule(const gradus::LearningRate<S>& lr) {
  for (std::int64_t step : {std::int64_t(0), std::int64_t(1), std::int64_t(999), std::int64_t(1000), std::int64_t(1) << 40,
                            std::numeric_limits<std::int64_t>::max()}) {
    const S rate = lr(step);
    FUZZ_CHECK(std::isfinite(rate) && rate >= 0, "schedule learning rate " + fuzz::text(rate) + " at step " + std::to_string(step));
  }
}

template <class S>
void harness(FuzzedDataProvider& in) {
  using L = std::numeric_limits<S>;
  const int which = in.ConsumeIntegralInRange<int>(0, 6);
  std::optional<gradus::LearningRate<S>> lr;
  if (!fuzz::accepts([&] { lr.emplace(learning_rate<S>(in)); })) return;
  if (lr->is_constant()) {
    FUZZ_CHECK(std::isfinite((*lr)(0)) || !fuzz::accepts([&] { lr->validate("sgd"); }) || fuzz::muted("lr-inf"),
               "accepted the learning rate " + fuzz::text((*lr)(0)));
  } else if (fuzz::accepts([&] { lr->validate("sgd"); })) {  // schedules are checked where a transform takes them
    check_schedule(*lr);
  }
  const S mu = fuzz::pick<S>(in, {S(0), S(0.9), fuzz::down(S(1)), S(1), L::denorm_min(), S(-0.0), fuzz::down(S(0)), L::quiet_NaN()});
  const bool nesterov = in.ConsumeBool();
  const S b1 = fuzz::pick<S>(in, {S(0.9), S(0), fuzz::down(S(1)), S(1), L::quiet_NaN()});
  const S b2 = fuzz::pick<S>(in, {S(0.999), S(0), fuzz::down(S(1)), S(1), L::quiet_NaN()});
  const S eps = fuzz::pick<S>(in, {S(1e-8), S(0), L::denorm_min(), S(1), L::max(), L::infinity(), fuzz::down(S(0)), L::quiet_NaN()});
  const S decay = fuzz::pick<S>(in, {S(0), S(1e-4), S(1), L::max(), L::infinity(), S(-1)});
  const S max_norm = fuzz::pick<S>(in, {S(1), L::denorm_min(), S(1e30), L::max(), L::infinity(), S(0), L::quiet_NaN()});
  const Index d = in.ConsumeIntegralInRange<Index>(0, 8), steps = in.ConsumeIntegralInRange<Index>(1, 4);
  const bool finite_inputs = in.ConsumeIntegralInRange<int>(0, 7) != 0;
  const S bound = fuzz::pick<S>(in, {S(1), S(1e4), S(1e18), S(1e30), L::max()});
  const Vector<S> params = fuzz::vector<S>(in, d, S(10), true);
  std::vector<Vector<S>> grads;
  for (Index t = 0; t < steps; ++t) grads.push_back(fuzz::vector<S>(in, fuzz::size_like(in, d, 9), bound, finite_inputs));
  fuzz::call = [&] {
    std::string g;
    for (const auto& x : grads) g += fuzz::show(x.transpose()) + " ";
    return std::string(sizeof(S) == 4 ? "float" : "double") + " transform " + std::to_string(which) + ", lr(0) " +
           fuzz::text((*lr)(0)) + ", momentum " + fuzz::text(mu) + ", nesterov " + std::to_string(nesterov) + ", b1 " +
           fuzz::text(b1) + ", b2 " + fuzz::text(b2) + ", eps " + fuzz::text(eps) + ", weight_decay " + fuzz::text(decay) +
           ", max_norm " + fuzz::text(max_norm) + ", params " + fuzz::show(params.transpose()) + ", gradients " + g;
  };
  auto run = [&](const auto& transform, auto&& check) {
    auto state = transform.init(params);
    for (const auto& g : grads) {
      Vector<S> u = g;
      if (!fuzz::accepts([&] { transform.update(u, state, params); })) return;
      if (finite_inputs) check(g, u, state);
    }
  };
  const S scale_bound = L::max() / 16;
  auto none = [](const auto&, const auto&, const auto&) {};
  switch (which) {
    case 0: case 1: {  // sgd / momentum
      std::optional<gradus::SGD<S>> t;
      if (!fuzz::accepts([&] { t.emplace(which ? gradus::momentum<S>({*lr, mu, nesterov}) : gradus::sgd<S>({*lr, mu, nesterov})); })) return;
      const S m = t->options().momentum;
      Index step = 0;
      long double largest = 0;  // over every gradient so far: the momentum buffer holds them all
      run(*t, [&](const Vector<S>& g, const Vector<S>& u, const auto& state) {
        ++step;
        if (d) largest = std::max(largest, (long double)g.cwiseAbs().maxCoeff());
        if (m == 0) {
          for (Index j = 0; j < d; ++j) FUZZ_CHECK(u(j) == -state.learning_rate * g(j) || std::isnan(u(j)), "sgd: u != -lr g");
        }
        // The buffer sums gradients before the rate scales them: both must stay in range.
        const long double buffer = largest * 2 * step / (1 - (long double)m);
        const long double envelope = (long double)state.learning_rate * buffer;
        if (envelope < scale_bound && buffer < scale_bound && std::isfinite(state.learning_rate))
          FUZZ_CHECK(fuzz::finite(u), "non-finite sgd update");
      });
      break;
    }
    case 2: case 3: case 4: {  // adam, adamw, chain(scale_by_adam, scale_by_learning_rate)
      std::optional<gradus::Adam<S>> adam;
      const bool w = which == 3;
      if (!fuzz::accepts([&] {
            adam.emplace(w ? gradus::adamw<S>({*lr, b1, b2, eps, decay}) : gradus::adam<S>({*lr, b1, b2, eps}));
          }))
        return;
      if (which == 4) {
        std::optional<decltype(gradus::chain(gradus::scale_by_adam<S>(), gradus::scale_by_learning_rate<S>(*lr)))> chained;
        if (!fuzz::accepts([&] { chained.emplace(gradus::chain(gradus::scale_by_adam<S>({b1, b2, eps}), gradus::scale_by_learning_rate<S>(*lr))); })) return;
        auto a = adam->init(params);
        auto c = chained->init(params);
        for (const auto& g : grads) {
          Vector<S> u = g, v = g;
          if (!fuzz::accepts([&] { adam->update(u, a, params); })) return;
          chained->update(v, c, params);
          for (Index j = 0; j < d; ++j)
            FUZZ_CHECK((std::isnan(u(j)) && std::isnan(v(j))) || u(j) == v(j) || std::abs(u(j) - v(j)) <= 4 * L::epsilon() * std::abs(u(j)),
                       "chain(scale_by_adam, scale_by_learning_rate) != adam: " + fuzz::text(v(j)) + " vs " + fuzz::text(u(j)));
        }
        return;
      }
      bool first = true;
      run(*adam, [&](const Vector<S>& g, const Vector<S>& u, const auto& state) {
        if (!first || w) return;
        first = false;
        for (Index j = 0; j < d; ++j) {
          const long double gj = g(j), expected = -(long double)state.learning_rate * gj / (std::abs(gj) + eps);
          // Moments of gradients below min / (1 - b1) are denormal, and lose the digits this compares;
          // where g^2 overflows the second moment is infinite and the step 0 (documented), and where
          // it underflows the step is eps-bound.
          if (!(std::abs(expected) < scale_bound) || (gj == 0 && eps == 0) ||
              std::abs(gj) * (1 - (long double)b1) < L::min() || gj * gj > L::max() ||
              gj * gj * (1 - (long double)b2) < L::min())
            continue;
          const long double tolerance = (sizeof(S) == 4 ? 1e-4L : 1e-10L) * std::abs(expected) + L::min();
          FUZZ_CHECK(std::abs(u(j) - expected) <= tolerance || fuzz::muted("adam-range"),
                     "adam first step u_" + std::to_string(j) + " = " + fuzz::text(u(j)) + ", expected " + fuzz::text(double(expected)));
        }
      });
      break;
    }
    case 5: case 6: {  // clip_by_global_norm, chain(clip, sgd)
      std::optional<gradus::ClipByGlobalNorm<S>> clip;
      if (!fuzz::accepts([&] { clip.emplace(gradus::clip_by_global_norm<S>(max_norm)); })) return;
      if (which == 6) {
        std::optional<gradus::SGD<S>> t;
        if (!fuzz::accepts([&] { t.emplace(gradus::sgd<S>({*lr, mu, nesterov})); })) return;
        run(gradus::chain(*clip, *t), none);
        return;
      }
      run(*clip, [&](const Vector<S>& g, const Vector<S>& u, const auto&) {
        const long double norm = fuzz::norm(g), c = max_norm;
        if (norm <= c) {
          FUZZ_CHECK(u == g, "clip changed a gradient within the norm");
          return;
        }
        const long double clipped = fuzz::norm(u);
        // Entries rounded into the denormals are exact only to half the smallest denormal each.
        FUZZ_CHECK(std::abs(clipped - c) <= 1e-5L * c + d * (long double)L::denorm_min() || fuzz::muted("clip-range"),
                   "clipped norm " + fuzz::text(double(clipped)) + " != max_norm " + fuzz::text(max_norm) + " (||g|| " + fuzz::text(double(norm)) + ")");
        for (Index j = 0; j < d; ++j) FUZZ_CHECK(!(u(j) * g(j) < 0), "clip flipped a sign");
      });
      break;
    }
  }
}

}  // namespace

GRADUS_FUZZ_ENTRY(harness)
