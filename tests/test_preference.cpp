#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <utility>
#include <string>
#include <vector>

#include <gradus/core/concepts.hpp>
#include <gradus/losses/preference.hpp>
#include <gradus/losses/sequence_logprob.hpp>
#include <gradus/testing/gradient_check.hpp>

using namespace gradus;
using K = PreferenceKind;

namespace {

const std::vector<K> all_kinds = {K::Sigmoid, K::Robust,   K::Conservative, K::IPO,    K::Hinge,
                                  K::ExoPair, K::NcaPair,  K::BcoPair,      K::SppoHard, K::ApoZero,
                                  K::ApoDown, K::DiscoPOP, K::Aot,          K::AotUnpaired};

std::string name(K kind) {
  const char* names[] = {"Sigmoid", "Robust",  "Conservative", "IPO",      "Hinge", "ExoPair", "NcaPair",
                         "BcoPair", "SppoHard", "ApoZero",     "ApoDown", "DiscoPOP", "Aot",   "AotUnpaired"};
  return names[static_cast<int>(kind)];
}

template <class S>
PreferenceOptions<S> options_for(K kind, Reduction reduction = Reduction::Sum) {
  // An epsilon inside every kind's domain; beta large enough that t spans the interesting range.
  return {.kind = kind, .beta = S(0.7), .epsilon = S(0.2), .discopop_tau = S(0.5), .reduction = reduction};
}

// The four log-prob vectors of a batch, packed as x = [pc; pr; rc; rr] for the checker.
struct Batch {
  Eigen::VectorXd pc, pr, rc, rr;
  Eigen::VectorXd packed() const {
    Eigen::VectorXd x(4 * pc.size());
    x << pc, pr, rc, rr;
    return x;
  }
};

Eigen::VectorXd shuffled_grid(Eigen::Index n, std::mt19937& rng) {
  std::vector<double> values(static_cast<std::size_t>(n));
  for (Eigen::Index i = 0; i < n; ++i) values[static_cast<std::size_t>(i)] = 0.05 * static_cast<double>(i - n / 2);
  std::shuffle(values.begin(), values.end(), rng);
  return Eigen::Map<Eigen::VectorXd>(values.data(), n);
}

// Random log-probs; for the sorting kinds the sort keys are 0.05 apart, and for Hinge t stays
// away from its kink, so that central differences never cross a non-smooth point.
Batch random_batch(K kind, Eigen::Index n, unsigned seed, double beta = 0.7) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> normal(0.0, 1.5);
  auto draw = [&] {
    Eigen::VectorXd v(n);
    for (auto& x : v) x = normal(rng) - 3.0;
    return v;
  };
  Batch batch{draw(), draw(), draw(), draw()};
  if (kind == K::Aot) {  // keys pc - pr and rc - rr
    batch.pr = batch.pc - shuffled_grid(n, rng);
    batch.rc = batch.rr + shuffled_grid(n, rng);
  } else if (kind == K::AotUnpaired) {  // keys pc - rc and pr - rr
    batch.rc = batch.pc - shuffled_grid(n, rng);
    batch.rr = batch.pr - shuffled_grid(n, rng);
  } else if (kind == K::Hinge) {
    for (Eigen::Index i = 0; i < n; ++i) {
      while (std::abs(beta * (batch.pc(i) - batch.rc(i) - batch.pr(i) + batch.rr(i)) - 1) < 0.05) batch.pc(i) += 0.1;
    }
  }
  return batch;
}

// The TRL expressions written literally (naive logs, std::sort), for moderate inputs.
double trl_oracle(const PreferenceOptions<double>& o, const Batch& batch) {
  const double beta = o.beta, eps = o.epsilon;
  const Eigen::Index n = batch.pc.size();
  auto logsigmoid = [](double x) { return std::log(1 / (1 + std::exp(-x))); };
  auto sigmoid = [](double x) { return 1 / (1 + std::exp(-x)); };
  auto smoothed = [&](double delta) {
    return -logsigmoid(beta * delta) * (1 - eps) - logsigmoid(-beta * delta) * eps;
  };
  std::vector<double> first(n), second(n);
  for (Eigen::Index i = 0; i < n; ++i) {
    const bool paired = o.kind == K::Aot;
    first[i] = paired ? batch.pc(i) - batch.pr(i) : batch.pc(i) - batch.rc(i);
    second[i] = paired ? batch.rc(i) - batch.rr(i) : batch.pr(i) - batch.rr(i);
  }
  std::sort(first.begin(), first.end());
  std::sort(second.begin(), second.end());
  double total = 0;
  for (Eigen::Index i = 0; i < n; ++i) {
    const double a = batch.pc(i) - batch.rc(i), b = batch.pr(i) - batch.rr(i), h = a - b;
    double loss = 0;
    switch (o.kind) {
      case K::Sigmoid: loss = -logsigmoid(beta * h); break;
      case K::Robust:
        loss = (-(1 - eps) * logsigmoid(beta * h) + eps * logsigmoid(-beta * h)) / (1 - 2 * eps);
        break;
      case K::Conservative: loss = smoothed(h); break;
      case K::IPO: loss = std::pow(h - 1 / (2 * beta), 2); break;
      case K::Hinge: loss = std::max(0.0, 1 - beta * h); break;
      case K::ExoPair:
        loss = sigmoid(beta * h) * (logsigmoid(beta * h) - std::log(1 - eps)) +
               sigmoid(-beta * h) * (logsigmoid(-beta * h) - std::log(eps));
        break;
      case K::NcaPair:
        loss = -logsigmoid(beta * a) - 0.5 * logsigmoid(-beta * a) - 0.5 * logsigmoid(-beta * b);
        break;
      case K::BcoPair: loss = -logsigmoid(beta * a) - logsigmoid(-beta * b); break;
      case K::SppoHard: loss = std::pow(a - 0.5 / beta, 2) + std::pow(b + 0.5 / beta, 2); break;
      case K::ApoZero: loss = (1 - sigmoid(beta * a)) + sigmoid(beta * b); break;
      case K::ApoDown: loss = sigmoid(beta * a) + (1 - sigmoid(beta * h)); break;
      case K::DiscoPOP: {
        const double s = beta * h, m = sigmoid(s / o.discopop_tau);
        loss = -logsigmoid(s) * (1 - m) + std::exp(-s) * m;
        break;
      }
      case K::Aot:
      case K::AotUnpaired: loss = smoothed(first[i] - second[i]); break;
    }
    total += loss;
  }
  return o.reduction == Reduction::Mean ? total / static_cast<double>(n) : total;
}

// Value and all four gradients of the loss at x = [pc; pr; rc; rr], computed in S.
template <class S>
long double packed_value_and_grad(const PreferenceLoss<S>& loss, const Eigen::VectorXd& x, Eigen::VectorXd& grad) {
  const Eigen::Index n = x.size() / 4;
  const Vector<S> v = x.cast<S>();
  Vector<S> g(4 * n);
  const S value = loss.value_and_grad(v.segment(0, n), v.segment(n, n), v.segment(2 * n, n), v.segment(3 * n, n),
                                      g.segment(0, n), g.segment(n, n), g.segment(2 * n, n), g.segment(3 * n, n));
  grad = g.template cast<double>();
  return value;
}

// The differences are taken of the long double implementation, minus its value at x: with
// hundreds of pairs the loss is large, and rounding it to double would swamp the differences.
auto centered_long_double(K kind, const Eigen::VectorXd& x) {
  const PreferenceLoss<long double> reference(options_for<long double>(kind));
  Eigen::VectorXd scratch;
  const long double center = packed_value_and_grad(reference, x, scratch);
  return [=](const Eigen::VectorXd& p) mutable {
    return static_cast<double>(packed_value_and_grad(reference, p, scratch) - center);
  };
}

}  // namespace

static_assert(Loss<PreferenceLoss<float>, Vector<float>, Vector<float>, Vector<float>, Vector<float>>);
static_assert(Loss<PreferenceLoss<double>, Vector<double>, Vector<double>>);

TEST_CASE("every preference kind matches the literal TRL formula", "[preference]") {
  for (K kind : all_kinds) {
    for (Reduction reduction : {Reduction::Mean, Reduction::Sum}) {
      for (Eigen::Index n : {1, 7, 300}) {
        INFO(name(kind) << " n=" << n);
        const auto options = options_for<double>(kind, reduction);
        const Batch batch = random_batch(kind, n, 11 + static_cast<unsigned>(n));
        const PreferenceLoss<double> loss(options);
        CHECK(loss.value(batch.pc, batch.pr, batch.rc, batch.rr) ==
              Approx(trl_oracle(options, batch)).epsilon(1e-12).margin(1e-12));
      }
    }
  }
}

TEMPLATE_TEST_CASE("preference gradients match finite differences", "[preference][gradient]", float, double) {
  using S = TestType;
  const bool is_float = std::is_same_v<S, float>;
  testing::GradientCheckOptions check;
  check.tolerance = is_float ? 2e-3 : 1e-6;
  for (K kind : all_kinds) {
    for (Eigen::Index n : {1, 2, 3, 7, 8, 9, 17, 64, 65}) {
      INFO(name(kind) << " n=" << n);
      const Eigen::VectorXd x = random_batch(kind, n, 5 + static_cast<unsigned>(n)).packed();
      const PreferenceLoss<S> loss(options_for<S>(kind));
      Eigen::VectorXd analytic;
      packed_value_and_grad(loss, x, analytic);
      const auto report = testing::check_gradient(centered_long_double(kind, x), x, analytic, check);
      INFO(report.summary());
      CHECK(report.ok);
    }
  }
}

TEST_CASE("rDPO and cDPO identities", "[preference][robust]") {
  const double beta = 0.3;
  const Eigen::VectorXd h = Eigen::VectorXd::LinSpaced(41, -30, 30);
  const Eigen::VectorXd zero = Eigen::VectorXd::Zero(h.size());
  auto per_pair = [&](K kind, double eps, const Eigen::VectorXd& margin) {
    Eigen::VectorXd out(margin.size());
    PreferenceLoss<double>({.kind = kind, .beta = beta, .epsilon = eps}).values(margin, zero, out);
    return out;
  };
  auto softplus = [](double x) { return std::max(x, 0.0) + std::log1p(std::exp(-std::abs(x))); };
  const Eigen::VectorXd dpo = per_pair(K::Sigmoid, 0, h);
  CHECK(per_pair(K::Robust, 0, h).isApprox(dpo, 1e-15));
  CHECK(per_pair(K::Conservative, 0, h).isApprox(dpo, 1e-15));
  for (double eps : {0.05, 0.1, 0.25, 0.4, 0.49}) {
    INFO("eps=" << eps);
    const Eigen::VectorXd robust = per_pair(K::Robust, eps, h), flipped = per_pair(K::Robust, eps, -h);
    const Eigen::VectorXd conservative = per_pair(K::Conservative, eps, h);
    for (Eigen::Index i = 0; i < h.size(); ++i) {
      const double t = beta * h(i);
      // Unbiased: the expectation over flips of rDPO is the clean DPO loss.
      CHECK((1 - eps) * robust(i) + eps * flipped(i) == Approx(dpo(i)).epsilon(1e-12).margin(1e-12));
      CHECK(robust(i) == Approx(softplus(-t) - eps * t / (1 - 2 * eps)).epsilon(1e-14).margin(1e-14));
      CHECK(conservative(i) == Approx(softplus(-t) + eps * t).epsilon(1e-14).margin(1e-14));
      CHECK(conservative(i) == Approx((1 - eps) * softplus(-t) + eps * softplus(t)).epsilon(1e-12).margin(1e-12));
    }
  }
  // The rDPO gradient weight stays between beta eps/(1-2eps) and beta (1-eps)/(1-2eps).
  const double eps = 0.2;
  Eigen::VectorXd extremes(2), dpc(2), dpr(2);
  extremes << 1e6, -1e6;
  PreferenceLoss<double>({.kind = K::Robust, .beta = beta, .epsilon = eps, .reduction = Reduction::Sum})
      .value_and_grad(extremes, Eigen::VectorXd::Zero(2), dpc, dpr);
  CHECK(dpc(0) == Approx(-beta * eps / (1 - 2 * eps)));
  CHECK(dpc(1) == Approx(-beta * (1 - eps) / (1 - 2 * eps)));
}

TEMPLATE_TEST_CASE("preference losses stay finite and right at extreme margins", "[preference][numerics]", float,
                   double) {
  using S = TestType;
  Vector<S> pc(4), pr = Vector<S>::Zero(4), dpc(4), dpr(4), per_pair(4);
  pc << S(1e4), S(-1e4), S(1e4), S(-1e4);
  pr << S(0), S(0), S(-1e4), S(1e4);  // margins 1e4, -1e4, 2e4, -2e4
  const S beta = S(1);
  for (K kind : all_kinds) {
    INFO(name(kind));
    auto options = options_for<S>(kind);
    options.beta = beta;
    const PreferenceLoss<S> loss(options);
    loss.value_and_grad(pc, pr, dpc, dpr);
    loss.values(pc, pr, per_pair);
    CHECK(per_pair.allFinite());
    CHECK(dpc.allFinite());
    CHECK(dpr.allFinite());
  }
  // Exact limits of DPO and rDPO: l -> 0 or |t| and the gradient -> 0 or -beta.
  const PreferenceLoss<S> dpo({.beta = beta, .reduction = Reduction::Sum});
  dpo.values(pc, pr, per_pair);
  dpo.value_and_grad(pc, pr, dpc, dpr);
  CHECK(per_pair(0) == Approx(0).margin(1e-30));
  CHECK(per_pair(1) == Approx(1e4));
  CHECK(per_pair(3) == Approx(2e4));
  CHECK(dpc(0) == Approx(0).margin(1e-30));
  CHECK(dpc(1) == Approx(-1));
  const S eps = S(0.25);
  PreferenceLoss<S>({.kind = K::Robust, .beta = beta, .epsilon = eps}).values(pc, pr, per_pair);
  CHECK(per_pair(0) == Approx(-1e4 * eps / (1 - 2 * eps)));  // unbounded below, linearly
  CHECK(per_pair(1) == Approx(1e4 * (1 - eps) / (1 - 2 * eps)));
  // Small margins keep relative accuracy: sp(-40) = e^-40.
  Vector<S> forty(1), none = Vector<S>::Zero(1), tiny(1);
  forty << S(40);
  dpo.values(forty, none, tiny);
  CHECK(tiny(0) == Approx(std::exp(-40.0)).epsilon(1e-5));
}

// The batched DPO value takes the softplus sums as one product per lane (not a log per pair):
// it must keep each term's relative accuracy, also where every loss is tiny and 1 + e^-t rounds to 1.
TEMPLATE_TEST_CASE("batched DPO values keep full relative accuracy at every margin", "[preference][numerics]", float,
                   double) {
  using S = TestType;
  const S beta = S(0.5);
  const double tolerance = std::is_same_v<S, float> ? 2e-6 : 1e-13;
  for (const auto& [low, high] : {std::pair{-60.0, 60.0}, std::pair{15.0, 60.0}, std::pair{-1.0, 1.0}}) {
    for (const Eigen::Index n : {1000, 5000}) {
      INFO("margins in [" << low << ", " << high << "], n=" << n);
      const Eigen::VectorXd t = Eigen::VectorXd::LinSpaced(n, low, high);
      const Vector<S> pc = (t / double(beta)).cast<S>(), pr = Vector<S>::Zero(n);
      long double exact = 0;
      for (Eigen::Index i = 0; i < n; ++i) {
        const long double ti = static_cast<long double>(beta) * static_cast<long double>(pc(i));
        exact += std::max(-ti, 0.0L) + std::log1p(std::exp(-std::abs(ti)));
      }
      const PreferenceLoss<S> dpo({.beta = beta, .reduction = Reduction::Sum});
      CHECK(static_cast<double>(dpo.value(pc, pr)) == Approx(static_cast<double>(exact)).epsilon(tolerance));
      Vector<S> per_pair(n);
      dpo.values(pc, pr, per_pair);  // the per-pair path, log1p by a series
      CHECK(static_cast<double>(per_pair.sum()) == Approx(static_cast<double>(exact)).epsilon(tolerance));
    }
  }
  // Infinite and NaN margins inside whole packets: +inf margin adds 0, -inf gives +inf, NaN gives NaN.
  Vector<S> pc = Vector<S>::Zero(40), pr = Vector<S>::Zero(40), dpc(40), dpr(40);
  const PreferenceLoss<S> dpo({.beta = beta, .reduction = Reduction::Sum});
  const S reference = dpo.value(pc, pr);
  pc(3) = std::numeric_limits<S>::infinity();
  CHECK(dpo.value_and_grad(pc, pr, dpc, dpr) == Approx(reference - std::log(S(2))));
  CHECK(std::abs(dpc(3)) <= std::numeric_limits<S>::min());  // 0, or a denormal from Eigen's exp
  pc(5) = -std::numeric_limits<S>::infinity();
  CHECK(dpo.value_and_grad(pc, pr, dpc, dpr) == std::numeric_limits<S>::infinity());
  CHECK(dpc(5) == -beta);
  pc(20) = std::numeric_limits<S>::quiet_NaN();
  CHECK(std::isnan(dpo.value_and_grad(pc, pr, dpc, dpr)));
  CHECK(std::isnan(dpc(20)));
  CHECK(dpc(21) == Approx(-beta / 2));
}

TEST_CASE("reductions, reference-free mode, reference gradients and metrics", "[preference]") {
  const Batch batch = random_batch(K::Sigmoid, 50, 3);
  const Eigen::Index n = 50;
  const PreferenceLoss<double> mean({.kind = K::Robust, .epsilon = 0.1});
  const PreferenceLoss<double> sum({.kind = K::Robust, .epsilon = 0.1, .reduction = Reduction::Sum});
  const PreferenceLoss<double> none({.kind = K::Robust, .epsilon = 0.1, .reduction = Reduction::None});
  Eigen::VectorXd per_pair(n);
  mean.values(batch.pc, batch.pr, batch.rc, batch.rr, per_pair);
  CHECK(mean.value(batch.pc, batch.pr, batch.rc, batch.rr) == Approx(per_pair.mean()));
  CHECK(sum.value(batch.pc, batch.pr, batch.rc, batch.rr) == Approx(per_pair.sum()));
  CHECK(none.value(batch.pc, batch.pr, batch.rc, batch.rr) == Approx(per_pair.sum()));

  Eigen::VectorXd dpc(n), dpr(n), drc(n), drr(n), dpc_sum(n), dpr_sum(n);
  PreferenceMetrics<double> metrics;
  mean.value_and_grad(batch.pc, batch.pr, batch.rc, batch.rr, dpc, dpr, drc, drr, &metrics);
  sum.value_and_grad(batch.pc, batch.pr, batch.rc, batch.rr, dpc_sum, dpr_sum);
  CHECK(dpc.isApprox(dpc_sum / n));
  CHECK(dpr.isApprox(dpr_sum / n));
  CHECK(drc.isApprox(-dpc));
  CHECK(drr.isApprox(-dpr));

  const double beta = mean.options().beta;
  const Eigen::VectorXd chosen = beta * (batch.pc - batch.rc), rejected = beta * (batch.pr - batch.rr);
  CHECK(metrics.chosen_reward == Approx(chosen.mean()));
  CHECK(metrics.rejected_reward == Approx(rejected.mean()));
  CHECK(metrics.reward_margin == Approx((chosen - rejected).mean()));
  CHECK(metrics.reward_accuracy == Approx((chosen.array() > rejected.array()).cast<double>().mean()));
  const auto alone = mean.metrics(batch.pc, batch.pr, batch.rc, batch.rr);
  CHECK(alone.reward_accuracy == metrics.reward_accuracy);
  CHECK(alone.chosen_reward == Approx(metrics.chosen_reward));

  // Reference-free: a uniform reference, rc = rr = 0; expressions are accepted as inputs.
  const Eigen::VectorXd zero = Eigen::VectorXd::Zero(n);
  Eigen::VectorXd free_dpc(n), free_dpr(n);
  CHECK(mean.value(2 * batch.pc, batch.pr) == Approx(mean.value(2 * batch.pc, batch.pr, zero, zero)));
  mean.value_and_grad(batch.pc, batch.pr, free_dpc, free_dpr);
  mean.value_and_grad(batch.pc, batch.pr, zero, zero, dpc, dpr);
  CHECK(free_dpc == dpc);
  CHECK(free_dpr == dpr);
}

namespace {

// Pair by pair in long double, the DPO family sp(-t) + c t with its gradient in pc.
template <class S>
void check_blocks_against_loop(K kind, Eigen::Index n) {
  const Batch batch = random_batch(kind, n, 41);
  const PreferenceOptions<S> options = options_for<S>(kind);
  const Vector<S> pc = batch.pc.cast<S>(), pr = batch.pr.cast<S>(), rc = batch.rc.cast<S>(), rr = batch.rr.cast<S>();
  Vector<S> per_pair(n), dpc(n), dpr(n);
  const PreferenceLoss<S> loss(options);
  loss.values(pc, pr, rc, rr, per_pair);
  const S total = loss.value_and_grad(pc, pr, rc, rr, dpc, dpr);
  const long double beta = options.beta, eps = options.epsilon;
  const long double c = kind == K::Sigmoid ? 0 : kind == K::Robust ? -eps / (1 - 2 * eps) : eps;
  long double sum = 0, worst_value = 0, worst_grad = 0;
  for (Eigen::Index i = 0; i < n; ++i) {
    const long double t = beta * (static_cast<long double>(pc(i)) - rc(i) - pr(i) + rr(i));
    const long double value = std::max(-t, 0.0L) + std::log1p(std::exp(-std::abs(t))) + c * t;
    const long double grad = beta * (c - 1 / (1 + std::exp(t)));
    sum += value;
    worst_value = std::max(worst_value, std::abs(per_pair(i) - value) / (1 + std::abs(value)));
    worst_grad = std::max(worst_grad, std::abs(dpc(i) - grad) + std::abs(dpr(i) + grad));
  }
  const double tolerance = std::is_same_v<S, float> ? 1e-5 : 1e-13;
  CHECK(worst_value < tolerance);
  CHECK(worst_grad < tolerance);
  CHECK(static_cast<double>(total) == Approx(static_cast<double>(sum)).epsilon(tolerance));
}

// Any kind: per-pair values and gradients of a batch equal those of each pair on its own.
template <class S>
void check_blocks_against_single_pairs(K kind, Eigen::Index n) {
  const Batch batch = random_batch(kind, n, 43);
  const Vector<S> pc = batch.pc.cast<S>(), pr = batch.pr.cast<S>(), rc = batch.rc.cast<S>(), rr = batch.rr.cast<S>();
  const PreferenceLoss<S> loss(options_for<S>(kind));
  Vector<S> per_pair(n), dpc(n), dpr(n), one(1), dpc_one(1), dpr_one(1);
  loss.values(pc, pr, rc, rr, per_pair);
  loss.value_and_grad(pc, pr, rc, rr, dpc, dpr);
  bool same = true;
  for (Eigen::Index i = 0; i < n; ++i) {
    loss.values(pc.segment(i, 1), pr.segment(i, 1), rc.segment(i, 1), rr.segment(i, 1), one);
    loss.value_and_grad(pc.segment(i, 1), pr.segment(i, 1), rc.segment(i, 1), rr.segment(i, 1), dpc_one, dpr_one);
    same = same && one(0) == per_pair(i) && dpc_one(0) == dpc(i) && dpr_one(0) == dpr(i);
  }
  CHECK(same);
}

}  // namespace

TEST_CASE("blocks and SIMD chunks: sizes around their boundaries against pair-by-pair loops", "[preference]") {
  for (Eigen::Index n : {15, 16, 17, 31, 33, 1023, 1024, 1025, 2049}) {
    for (K kind : {K::Sigmoid, K::Robust, K::Conservative}) {
      INFO(name(kind) << " n=" << n);
      check_blocks_against_loop<float>(kind, n);
      check_blocks_against_loop<double>(kind, n);
    }
    for (K kind : {K::Sigmoid, K::IPO, K::Hinge, K::NcaPair, K::DiscoPOP}) {
      INFO(name(kind) << " n=" << n);
      check_blocks_against_single_pairs<float>(kind, n);
      check_blocks_against_single_pairs<double>(kind, n);
    }
  }
}

TEST_CASE("the sorting kinds send gradients through the permutation", "[preference][aot]") {
  // With a one-pair batch Aot is cDPO; with the batch reordered, the loss is unchanged.
  const Batch batch = random_batch(K::Aot, 9, 21);
  const PreferenceLoss<double> aot({.kind = K::Aot, .beta = 0.5, .epsilon = 0.1});
  const PreferenceLoss<double> cdpo({.kind = K::Conservative, .beta = 0.5, .epsilon = 0.1});
  CHECK(aot.value(batch.pc.head(1), batch.pr.head(1), batch.rc.head(1), batch.rr.head(1)) ==
        Approx(cdpo.value(batch.pc.head(1), batch.pr.head(1), batch.rc.head(1), batch.rr.head(1))));
  const Eigen::VectorXd reversed_rc = batch.rc.reverse(), reversed_rr = batch.rr.reverse();
  CHECK(aot.value(batch.pc, batch.pr, reversed_rc, reversed_rr) == Approx(aot.value(batch.pc, batch.pr, batch.rc, batch.rr)));
}

TEST_CASE("preference losses reject bad input", "[preference][errors]") {
  const Eigen::VectorXd v = Eigen::VectorXd::Ones(4), short_v = Eigen::VectorXd::Ones(3), empty(0);
  Eigen::VectorXd g(4), wrong(3);
  const PreferenceLoss<double> dpo;
  CHECK_THROWS_WITH(dpo.value(v, v, v, short_v),
                    "gradus::PreferenceLoss::value: argument 'reference_rejected': expected 4 entries (size of "
                    "policy_chosen), got 3");
  CHECK_THROWS_AS(dpo.value(v, short_v), gradus::invalid_argument);
  CHECK_THROWS_WITH(dpo.value(empty, empty), Catch::Contains("'policy_chosen'") && Catch::Contains("pairs"));
  CHECK_THROWS_WITH(dpo.value_and_grad(v, v, v, v, g, wrong), Catch::Contains("'dpolicy_rejected'"));
  CHECK_THROWS_WITH(dpo.value_and_grad(v, v, v, v, g, g, g, wrong), Catch::Contains("'dreference_rejected'"));
  CHECK_THROWS_WITH(dpo.values(v, v, wrong), Catch::Contains("'per_pair'"));

  CHECK_THROWS_WITH(PreferenceLoss<double>({.beta = 0}), Catch::Contains("'options.beta'"));
  CHECK_THROWS_AS(PreferenceLoss<double>({.beta = -1}), gradus::invalid_argument);
  CHECK_THROWS_AS(PreferenceLoss<float>({.beta = std::numeric_limits<float>::infinity()}), gradus::invalid_argument);
  CHECK_THROWS_AS(PreferenceLoss<double>({.beta = std::nan("")}), gradus::invalid_argument);
  CHECK_THROWS_WITH(PreferenceLoss<double>({.kind = K::Robust, .epsilon = 0.5}),
                    Catch::Contains("options.epsilon") && Catch::Contains("0.5"));
  CHECK_THROWS_AS(PreferenceLoss<double>({.kind = K::Robust, .epsilon = -0.1}), gradus::invalid_argument);
  CHECK_NOTHROW(PreferenceLoss<double>({.kind = K::Robust, .epsilon = 0.49}));
  CHECK_THROWS_AS(PreferenceLoss<double>({.kind = K::Conservative, .epsilon = 1.5}), gradus::invalid_argument);
  CHECK_THROWS_AS(PreferenceLoss<double>({.kind = K::Aot, .epsilon = -1}), gradus::invalid_argument);
  CHECK_THROWS_WITH(PreferenceLoss<double>({.kind = K::ExoPair}), Catch::Contains("ExoPair"));
  CHECK_THROWS_AS(PreferenceLoss<double>({.kind = K::DiscoPOP, .discopop_tau = 0}), gradus::invalid_argument);
}

TEST_CASE("non-finite log-probs propagate NaN", "[preference][errors]") {
  Eigen::VectorXd pc = Eigen::VectorXd::Zero(3), pr = Eigen::VectorXd::Zero(3), dpc(3), dpr(3);
  pc(1) = std::nan("");
  for (K kind : all_kinds) {
    INFO(name(kind));
    const PreferenceLoss<double> loss(options_for<double>(kind));
    CHECK(std::isnan(loss.value_and_grad(pc, pr, dpc, dpr)));
    CHECK((dpc.array().isNaN() || dpr.array().isNaN()).any());
  }
}

namespace {

// The documented bound on |dl/dt| of each kind: beta may go up to the largest S over it.
template <class S>
S slope_bound(const PreferenceOptions<S>& o) {
  const S eps = o.epsilon;
  switch (o.kind) {
    case K::Robust: return (1 - eps) / (1 - 2 * eps);
    case K::ExoPair: return 1 + std::abs(std::log1p(-eps) - std::log(eps)) / 4;
    case K::DiscoPOP: return 2 + 1 / o.discopop_tau;
    default: return 1;
  }
}

// Options at the edges of each kind's epsilon (and DiscoPOP's tau) domain.
template <class S>
std::vector<PreferenceOptions<S>> edge_options(K kind) {
  const S tiny = std::numeric_limits<S>::denorm_min(), below_half = std::nextafter(S(0.5), S(0));
  const S below_one = std::nextafter(S(1), S(0)), tau_min = std::numeric_limits<S>::min();
  std::vector<std::pair<S, S>> edges = {{S(0.2), S(0.05)}};  // (epsilon, tau)
  if (kind == K::Robust) edges = {{S(0), S(0.05)}, {below_half, S(0.05)}};
  if (kind == K::Conservative || kind == K::Aot || kind == K::AotUnpaired) edges = {{S(0), S(0.05)}, {S(1), S(0.05)}};
  if (kind == K::ExoPair) edges = {{tiny, S(0.05)}, {below_one, S(0.05)}};
  if (kind == K::DiscoPOP) edges = {{S(0), tau_min}, {S(0), S(0.05)}, {S(0), S(1)}};
  std::vector<PreferenceOptions<S>> out;
  for (auto [eps, tau] : edges) out.push_back({.kind = kind, .epsilon = eps, .discopop_tau = tau, .reduction = Reduction::Sum});
  return out;
}

}  // namespace

TEST_CASE("out-of-range kinds and reductions are rejected", "[preference][errors]") {
  // PreferenceKind(99) used to fall through every branch and leave the outputs unwritten.
  CHECK_THROWS_WITH(PreferenceLoss<double>({.kind = static_cast<K>(99)}),
                    "gradus::PreferenceLoss: argument 'options.kind': expected one of its 14 enumerators, got 99");
  CHECK_THROWS_AS(PreferenceLoss<float>({.kind = static_cast<K>(14)}), gradus::invalid_argument);
  CHECK_THROWS_AS(PreferenceLoss<float>({.kind = static_cast<K>(-1)}), gradus::invalid_argument);
  CHECK_NOTHROW(PreferenceLoss<float>({.kind = K::AotUnpaired, .epsilon = 0.1f}));
  CHECK_THROWS_WITH(PreferenceLoss<double>({.reduction = static_cast<Reduction>(3)}), Catch::Contains("'reduction'"));
  CHECK_THROWS_AS(PreferenceLoss<double>({.reduction = static_cast<Reduction>(-1)}), gradus::invalid_argument);
  CHECK_NOTHROW(PreferenceLoss<double>({.reduction = Reduction::None}));
}

TEMPLATE_TEST_CASE("beta up to the largest S over the kind's slope bound: finite gradients", "[preference][numerics]",
                   float, double) {
  using S = TestType;
  const S max = std::numeric_limits<S>::max();
  for (K kind : all_kinds) {
    for (PreferenceOptions<S> options : edge_options<S>(kind)) {
      INFO(name(kind) << " eps=" << options.epsilon << " tau=" << options.discopop_tau);
      const S largest = max / slope_bound(options);
      options.beta = std::nextafter(largest, std::numeric_limits<S>::infinity());  // inf past max
      CHECK_THROWS_WITH(PreferenceLoss<S>(options), Catch::Contains("'options.beta'"));
      options.beta = largest;
      const PreferenceLoss<S> loss(options);
      // At h = 0 (t = 0): value and gradient of the DPO family are log 2 and beta (c - 1/2).
      Vector<S> zero = Vector<S>::Zero(3), dpc(3), dpr(3);
      const S value = loss.value_and_grad(zero, zero, dpc, dpr);
      CHECK(std::isfinite(value));
      CHECK(dpc.allFinite());
      CHECK(dpr.allFinite());
      if (kind == K::Sigmoid || kind == K::Robust || kind == K::Conservative) {
        const S eps = options.epsilon;
        const S c = kind == K::Sigmoid ? S(0) : kind == K::Robust ? -eps / (1 - 2 * eps) : eps;
        CHECK(value == Approx(3 * std::log(2.0)));
        CHECK(dpc(0) == Approx(largest * (c - S(0.5))));
        CHECK(dpr(0) == -dpc(0));
      }
    }
  }
  // DiscoPOP's tau: (0, 1] with a finite inverse.
  CHECK_NOTHROW(PreferenceLoss<S>({.kind = K::DiscoPOP, .discopop_tau = S(1)}));
  CHECK_THROWS_WITH(PreferenceLoss<S>({.kind = K::DiscoPOP, .discopop_tau = std::nextafter(S(1), S(2))}),
                    Catch::Contains("'options.discopop_tau'"));
  CHECK_THROWS_AS(PreferenceLoss<S>({.kind = K::DiscoPOP, .discopop_tau = std::numeric_limits<S>::denorm_min()}),
                  gradus::invalid_argument);
  CHECK_THROWS_AS(PreferenceLoss<S>({.kind = K::DiscoPOP, .discopop_tau = std::numeric_limits<S>::infinity()}),
                  gradus::invalid_argument);
}

// Every kind, edge options, betas up to the largest accepted, finite log-probs whose log-ratios
// and margins are finite in S (t = beta h may overflow): where the value is finite, so is every
// gradient, with and without references.
TEMPLATE_TEST_CASE("a finite preference value has finite gradients", "[preference][numerics]", float, double) {
  using S = TestType;
  const S max = std::numeric_limits<S>::max();
  const std::vector<S> xs = {0, 1, -1, S(1e3), S(-1e3), S(1e10), S(-1e10), S(1e30), S(-1e30), max / 4, -max / 4};
  long failures = 0, finite_values = 0;
  for (K kind : all_kinds) {
    for (PreferenceOptions<S> options : edge_options<S>(kind)) {
      for (S beta : {std::numeric_limits<S>::denorm_min(), S(1e-30), S(0.1), S(1), S(1e10), S(1e30), max}) {
        options.beta = std::min(beta, max / slope_bound(options));
        const PreferenceLoss<S> loss(options);
        for (S pc : xs) for (S pr : xs) for (S rc : {S(0), S(1e30), -max / 2}) {
          const S a = pc - rc, h = a - pr;
          if (!std::isfinite(a) || !std::isfinite(h)) continue;
          Vector<S> vpc(1), vpr(1), vrc(1), vrr = Vector<S>::Zero(1), g(4), per_pair(1);
          vpc << pc, vpr << pr, vrc << rc;
          const S value = loss.value_and_grad(vpc, vpr, vrc, vrr, g.segment(0, 1), g.segment(1, 1), g.segment(2, 1),
                                              g.segment(3, 1));
          loss.values(vpc, vpr, vrc, vrr, per_pair);
          bool ok = std::isfinite(per_pair(0)) == std::isfinite(value) && (!std::isfinite(value) || g.allFinite());
          if (rc == 0) {  // the reference-free form
            Vector<S> dpc(1), dpr(1);
            const S free = loss.value_and_grad(vpc, vpr, dpc, dpr);
            ok = ok && (!std::isfinite(free) || (std::isfinite(dpc(0)) && std::isfinite(dpr(0))));
          }
          finite_values += std::isfinite(value);
          if (!ok && failures++ < 5) {
            UNSCOPED_INFO(name(kind) << " eps=" << options.epsilon << " tau=" << options.discopop_tau << " beta="
                                     << options.beta << " pc=" << pc << " pr=" << pr << " rc=" << rc << ": value "
                                     << value << ", gradient " << g.transpose());
          }
        }
      }
    }
  }
  CHECK(failures == 0);
  CHECK(finite_values > 10000);
}

TEMPLATE_TEST_CASE("Hinge: NaN from infinite inputs, limits where beta h overflows", "[preference][numerics]", float,
                   double) {
  using S = TestType;
  const S inf = std::numeric_limits<S>::infinity(), beta = S(1e30);
  const PreferenceLoss<S> hinge({.kind = K::Hinge, .beta = beta, .reduction = Reduction::Sum});
  Vector<S> pc(3), pr = Vector<S>::Zero(3), dpc(3), dpr(3), per_pair(3);
  pc << S(1e10), S(-1e-20), S(1e-40);  // t = +inf in float (+1e40 in double), -1e10, 1e-10
  S value = hinge.value_and_grad(pc, pr, dpc, dpr);
  hinge.values(pc, pr, per_pair);
  CHECK(per_pair(0) == 0);
  CHECK(per_pair(1) == Approx(1 + 1e10));
  CHECK(per_pair(2) == Approx(1 - 1e-10));
  CHECK(value == Approx(2 + 1e10));
  CHECK(dpc(0) == 0);
  CHECK(dpr(0) == 0);
  CHECK(dpc(1) == -beta);
  CHECK(dpc(2) == -beta);
  CHECK(dpr(2) == beta);
  // Infinite log-probs (inputs or references) propagate as NaN, not as the limit 0.
  for (S bad : {inf, -inf}) {
    for (int where = 0; where < 3; ++where) {
      Vector<S> c = Vector<S>::Zero(1), r = Vector<S>::Zero(1), ref = Vector<S>::Zero(1), g1(1), g2(1), g3(1), g4(1);
      (where == 0 ? c : where == 1 ? r : ref)(0) = bad;
      INFO("infinite input " << where << " = " << bad);
      CHECK(std::isnan(hinge.value_and_grad(c, r, ref, Vector<S>::Zero(1), g1, g2, g3, g4)));
      CHECK(std::isnan(g1(0)));
      CHECK(std::isnan(g4(0)));
      hinge.values(c, r, ref, Vector<S>::Zero(1), per_pair.head(1));
      CHECK(std::isnan(per_pair(0)));
    }
  }
}

TEMPLATE_TEST_CASE("ExoPair and DiscoPOP keep their limits where beta h overflows", "[preference][numerics]", float,
                   double) {
  using S = TestType;
  const S beta = S(1e10), big = std::is_same_v<S, float> ? S(1e30) : S(1e300);
  Vector<S> pc(2), pr = Vector<S>::Zero(2), dpc(2), dpr(2), per_pair(2);
  pc << big, -big;  // t = +inf and -inf
  const S eps = S(0.1);
  const PreferenceLoss<S> exo({.kind = K::ExoPair, .beta = beta, .epsilon = eps, .reduction = Reduction::Sum});
  exo.values(pc, pr, per_pair);
  exo.value_and_grad(pc, pr, dpc, dpr);
  CHECK(per_pair(0) == Approx(-std::log1p(-eps)));  // q = 1
  CHECK(per_pair(1) == Approx(-std::log(eps)));     // q = 0
  CHECK(dpc.isZero());
  CHECK(dpr.isZero());
  for (S tau : {S(0.05), S(1)}) {
    INFO("tau=" << tau);
    const PreferenceLoss<S> disco({.kind = K::DiscoPOP, .beta = beta, .discopop_tau = tau, .reduction = Reduction::Sum});
    disco.values(pc, pr, per_pair);
    disco.value_and_grad(pc, pr, dpc, dpr);
    const S tiny = std::numeric_limits<S>::min();  // 0, or a denormal from Eigen's exp
    CHECK(std::abs(per_pair(0)) <= tiny);
    CHECK(per_pair(1) == std::numeric_limits<S>::infinity());  // beyond S
    CHECK(std::abs(dpc(0)) <= beta * tiny);
    CHECK(dpc(1) == Approx(-beta));  // the DPO slope: m -> 0
    CHECK(dpr(1) == Approx(beta));
  }
}

namespace {

// The DPO family in long double from the S inputs: per-pair (per-rank) values and the gradient of
// the reduced loss in pc, pr, rc, rr, with the ranks of the Aot kinds in a stable sort.
struct WideDpo {
  std::vector<long double> per_pair, dpc, dpr, drc, drr;
  long double value = 0;
};

template <class S>
WideDpo wide_dpo(const PreferenceOptions<S>& o, const Vector<S>& pc, const Vector<S>& pr, const Vector<S>& rc,
                 const Vector<S>& rr) {
  using W = long double;
  const auto n = static_cast<std::size_t>(pc.size());
  const bool paired = o.kind == K::Aot, sorted = paired || o.kind == K::AotUnpaired;
  std::vector<W> a(n), b(n);
  for (std::size_t i = 0; i < n; ++i) {
    const auto k = static_cast<Index>(i);
    a[i] = paired ? W(pc(k)) - W(pr(k)) : W(pc(k)) - W(rc(k));
    b[i] = paired ? W(rc(k)) - W(rr(k)) : W(pr(k)) - W(rr(k));
  }
  std::vector<std::size_t> ai(n), bi(n);
  for (std::size_t i = 0; i < n; ++i) ai[i] = bi[i] = i;
  if (sorted) {
    std::stable_sort(ai.begin(), ai.end(), [&](std::size_t i, std::size_t j) { return a[i] < a[j]; });
    std::stable_sort(bi.begin(), bi.end(), [&](std::size_t i, std::size_t j) { return b[i] < b[j]; });
  }
  const W beta = o.beta, eps = o.epsilon;
  const W c = o.kind == K::Sigmoid ? 0 : o.kind == K::Robust ? -eps / (1 - 2 * eps) : eps;
  const W scale = o.reduction == Reduction::Mean ? W(1) / W(n) : W(1);
  const auto sp = [](W x) { return x > 0 ? x + std::log1p(std::exp(-x)) : std::log1p(std::exp(x)); };
  WideDpo r;
  r.per_pair.resize(n), r.dpc.resize(n), r.dpr.resize(n), r.drc.resize(n), r.drr.resize(n);
  for (std::size_t k = 0; k < n; ++k) {
    const std::size_t i = ai[k], j = bi[k];
    const W t = beta * (a[i] - b[j]);
    const W loss = o.kind == K::Sigmoid ? sp(-t) : o.kind == K::Robust ? sp(-t) + c * t
                                                                       : (1 - eps) * sp(-t) + eps * sp(t);
    r.per_pair[k] = loss;
    r.value += loss;
    const W da = scale * beta * (c - 1 / (1 + std::exp(t)));
    r.dpc[i] += da;
    (paired ? r.dpr[i] : r.drc[i]) -= da;
    (paired ? r.drc[j] : r.dpr[j]) -= da;
    r.drr[j] += da;
  }
  r.value *= scale;
  return r;
}

// x is the long double e rounded to S: equal where e is beyond S, else within a few roundings.
template <class S>
bool rounds_to(S x, long double e) {
  const long double rounded = static_cast<S>(e);
  if (std::isinf(rounded)) return x == rounded;
  return std::abs(x - e) <= 16 * std::numeric_limits<S>::epsilon() * std::abs(e) + std::numeric_limits<S>::min();
}

}  // namespace

// Finite log-probs whose differences pc - rc, pr - rr (or the Aot keys), margin h or t = beta h
// overflow S: the DPO family gives the exact value and gradients rounded to S, not inf - inf.
TEMPLATE_TEST_CASE("DPO family: exact where a difference or beta h overflows S", "[preference][numerics]", float,
                   double) {
  using S = TestType;
  using L = std::numeric_limits<S>;
  const S max = L::max();
  struct Case {
    PreferenceOptions<S> options;
    std::vector<S> pc, pr, rc, rr;
  };
  const std::vector<Case> cases = {
      // rDPO: pc - rc overflows, the exact value is -eps t / (1 - 2 eps), about -3.5e36 in float.
      {{.kind = K::Robust, .beta = S(10), .epsilon = S(1e-3), .reduction = Reduction::Sum},
       {max / 65}, {S(-2)}, {-max}, {S(1e30)}},
      // AotUnpaired at beta = max(S), eps = 1: sp(t) at t -> -inf, 0 (was inf - inf).
      {{.kind = K::AotUnpaired, .beta = max, .epsilon = S(1), .reduction = Reduction::Sum},
       {L::min()}, {-L::denorm_min()}, {S(3314322.5)}, {S(-8)}},
      // AotUnpaired, eps just below 1: (1 - eps) |t| is finite where t is not.
      {{.kind = K::AotUnpaired, .beta = S(10), .epsilon = std::nextafter(S(1), S(0)), .reduction = Reduction::None},
       {-L::denorm_min(), S(-8)}, {S(-2), S(0)}, {S(-8), S(-3)}, {S(5), -max}},
      // Aot: the sorted margin overflows S.
      {{.kind = K::Aot, .beta = S(0.1), .epsilon = S(0.25), .reduction = Reduction::Sum},
       {max * S(0.545)}, {max * S(0.541)}, {-max}, {S(6)}},
      // Aot: t = beta h overflows, eps t does not.
      {{.kind = K::Aot, .beta = max / 4, .epsilon = S(1e-3), .reduction = Reduction::Sum},
       {L::denorm_min(), S(-100)}, {S(-100), S(-100)}, {S(-100), S(-100)}, {S(-6), S(-100)}},
      // cDPO at t -> -inf: 0 at eps = 1, finite just below, +inf (beyond S) at eps = 1/2.
      {{.kind = K::Conservative, .beta = max, .epsilon = S(1), .reduction = Reduction::Mean},
       {S(-1)}, {S(3)}, {S(0)}, {S(0)}},
      {{.kind = K::Conservative, .beta = max, .epsilon = std::nextafter(S(1), S(0)), .reduction = Reduction::Mean},
       {S(-1)}, {S(3)}, {S(0)}, {S(0)}},
      {{.kind = K::Conservative, .beta = max, .epsilon = S(0.5), .reduction = Reduction::Mean},
       {S(-1)}, {S(3)}, {S(0)}, {S(0)}},
      // DPO: pc - rc overflows S but the margin h = max / 100 does not, and t = 2.
      {{.kind = K::Sigmoid, .beta = S(200) / max, .reduction = Reduction::Mean},
       {max}, {max}, {-max / 100}, {S(0)}},
  };
  int index = 0;
  for (const Case& c : cases) {
    ++index;
    for (Index copies : {1, 17}) {  // a lone pair (chunks) and whole SIMD packets (the hot path)
      INFO("case " << index << ", " << name(c.options.kind) << ", " << copies << " copies");
      const Index m = static_cast<Index>(c.pc.size()), n = m * copies;
      Vector<S> pc(n), pr(n), rc(n), rr(n);
      for (Index i = 0; i < n; ++i) {
        const auto j = static_cast<std::size_t>(i % m);
        pc(i) = c.pc[j], pr(i) = c.pr[j], rc(i) = c.rc[j], rr(i) = c.rr[j];
      }
      const PreferenceLoss<S> loss(c.options);
      const WideDpo exact = wide_dpo(c.options, pc, pr, rc, rr);
      Vector<S> dpc(n), dpr(n), drc(n), drr(n), per_pair(n);
      const S value = loss.value_and_grad(pc, pr, rc, rr, dpc, dpr, drc, drr);
      loss.values(pc, pr, rc, rr, per_pair);
      CAPTURE(value, double(exact.value));
      CHECK(rounds_to(value, exact.value));
      CHECK(rounds_to(loss.value(pc, pr, rc, rr), exact.value));
      bool ok = true;
      for (Index i = 0; i < n; ++i) {
        const auto k = static_cast<std::size_t>(i);
        ok = ok && rounds_to(per_pair(i), exact.per_pair[k]) && rounds_to(dpc(i), exact.dpc[k]) &&
             rounds_to(dpr(i), exact.dpr[k]) && rounds_to(drc(i), exact.drc[k]) && rounds_to(drr(i), exact.drr[k]);
      }
      CHECK(ok);
      CHECK(dpc.allFinite());
      CHECK(drr.allFinite());
    }
  }
  // The reproducer of the rDPO finding in float: about -3.46e36, was -inf.
  if constexpr (std::is_same_v<S, float>) {
    Vector<S> pc(1), pr(1), rc(1), rr(1);
    pc << S(5.243935e36), pr << S(-2), rc << -max, rr << S(1e30);
    const PreferenceLoss<S> robust({.kind = K::Robust, .beta = S(10), .epsilon = S(1e-3), .reduction = Reduction::Sum});
    CHECK(robust.value(pc, pr, rc, rr) == Approx(-3.462187e36).epsilon(1e-5));
  }
}

// Infinite inputs keep their limits and NaN its propagation: the long double pass is for finite ones.
TEMPLATE_TEST_CASE("DPO family: non-finite inputs are not recomputed", "[preference][numerics]", float, double) {
  using S = TestType;
  const S inf = std::numeric_limits<S>::infinity();
  for (K kind : {K::Sigmoid, K::Robust, K::Conservative}) {
    INFO(name(kind));
    const PreferenceLoss<S> loss({.kind = kind, .beta = S(1), .epsilon = S(0.1), .reduction = Reduction::Sum});
    Vector<S> pc = Vector<S>::Zero(3), pr = Vector<S>::Zero(3), dpc(3), dpr(3);
    pc(1) = -inf;
    if (kind != K::Conservative) CHECK(loss.value_and_grad(pc, pr, dpc, dpr) == inf);  // cDPO: inf - inf, as before
    pc(2) = std::numeric_limits<S>::quiet_NaN();
    CHECK(std::isnan(loss.value_and_grad(pc, pr, dpc, dpr)));
    CHECK(std::isnan(dpc(2)));
  }
}

// ---- Sequence log-probabilities from token logits ----

namespace {

// log p(y) with an explicit log-softmax, row by row.
template <class S>
double explicit_logprob(const RowMatrix<S>& z, const Labels& y, const Labels& mask) {
  const RowMatrix<double> zd = z.template cast<double>();
  double total = 0;
  for (Eigen::Index t = 0; t < zd.rows(); ++t) {
    if (mask(t) == 0) continue;
    const double m = zd.row(t).maxCoeff();
    total += zd(t, y(t)) - m - std::log((zd.row(t).array() - m).exp().sum());
  }
  return total;
}

struct Tokens {
  RowMatrix<double> logits;
  Labels targets, mask;
};

Tokens random_tokens(Eigen::Index positions, Eigen::Index vocabulary, unsigned seed, double spread = 3) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> normal(0, spread);
  std::uniform_int_distribution<int> token(0, static_cast<int>(vocabulary) - 1);
  Tokens tokens{RowMatrix<double>(positions, vocabulary), Labels(positions), Labels(positions)};
  for (Eigen::Index i = 0; i < tokens.logits.size(); ++i) tokens.logits.data()[i] = normal(rng);
  for (Eigen::Index t = 0; t < positions; ++t) {
    tokens.targets(t) = token(rng);
    tokens.mask(t) = t >= positions / 3 ? 1 : 0;  // a prompt, then the completion
  }
  return tokens;
}

}  // namespace

TEMPLATE_TEST_CASE("sequence log-probs match an explicit log-softmax", "[preference][tokens]", float, double) {
  using S = TestType;
  const double tolerance = std::is_same_v<S, float> ? 1e-4 : 1e-12;
  for (auto [positions, vocabulary] : {std::pair<Eigen::Index, Eigen::Index>{1, 1}, {3, 2}, {7, 9}, {17, 8},
                                       {5, 64}, {9, 300}}) {
    INFO("T=" << positions << " V=" << vocabulary);
    const Tokens tokens = random_tokens(positions, vocabulary, 3 + static_cast<unsigned>(positions));
    const RowMatrix<S> z = tokens.logits.cast<S>();
    const SequenceLogProb<S> logprob;
    const double expected = explicit_logprob(z, tokens.targets, tokens.mask);
    CHECK(logprob.value(z, tokens.targets, tokens.mask) == Approx(expected).epsilon(tolerance).margin(tolerance));
    const Labels all = Labels::Ones(positions);
    CHECK(logprob.value(z, tokens.targets) ==
          Approx(explicit_logprob(z, tokens.targets, all)).epsilon(tolerance).margin(tolerance));
    const Eigen::Index counted = tokens.mask.sum();
    const SequenceLogProb<S> mean({.average = true});
    if (counted > 0) {
      CHECK(mean.value(z, tokens.targets, tokens.mask) ==
            Approx(expected / static_cast<double>(counted)).epsilon(tolerance).margin(tolerance));
    } else {
      CHECK_THROWS_AS(mean.value(z, tokens.targets, tokens.mask), gradus::invalid_argument);
    }

    // Gradient: float against differences of the double implementation.
    RowMatrix<S> dz(positions, vocabulary), scaled(positions, vocabulary);
    const S value = logprob.value_and_grad(z, tokens.targets, tokens.mask, dz);
    CHECK(value == Approx(expected).epsilon(tolerance).margin(tolerance));
    // Differences of the long double implementation, centered (see centered_long_double). The
    // kernel sums in double, which leaves noise of about 1e-16 |log p| / step in the differences.
    const SequenceLogProb<long double> reference;
    const RowMatrix<long double> z0 = tokens.logits.cast<long double>();
    const long double center = reference.value(z0, tokens.targets, tokens.mask);
    auto f = [&](const Eigen::VectorXd& p) {
      const RowMatrix<long double> zp = Eigen::Map<const RowMatrix<double>>(p.data(), positions, vocabulary).cast<long double>();
      return static_cast<double>(reference.value(zp, tokens.targets, tokens.mask) - center);
    };
    testing::GradientCheckOptions check;
    check.tolerance = std::is_same_v<S, float> ? 1e-3 : 1e-5;
    const Eigen::VectorXd x = Eigen::Map<const Eigen::VectorXd>(tokens.logits.data(), tokens.logits.size());
    const Eigen::VectorXd analytic = Eigen::Map<const Vector<S>>(dz.data(), dz.size()).template cast<double>();
    const auto report = testing::check_gradient(f, x, analytic, check);
    INFO(report.summary());
    CHECK(report.ok);
    for (Eigen::Index t = 0; t < positions; ++t) {
      if (tokens.mask(t) == 0) CHECK(dz.row(t).isZero());
    }
    // vjp folds the upstream factor into the same pass.
    logprob.vjp(z, tokens.targets, tokens.mask, S(-2.5), scaled);
    CHECK(scaled.isApprox(S(-2.5) * dz));
  }
}

TEMPLATE_TEST_CASE("sequence log-probs at extreme logits", "[preference][tokens][numerics]", float, double) {
  using S = TestType;
  RowMatrix<S> z(2, 3), dz(2, 3);
  z << S(1e4), S(-1e4), S(0), S(-1e4), S(1e4), S(1e4);
  Labels y(2);
  y << 0, 0;
  const SequenceLogProb<S> logprob;
  const S value = logprob.value_and_grad(z, y, dz);
  CHECK(value == Approx(-2e4 - std::log(2.0)));  // 0 + (-1e4 - (1e4 + log 2))
  CHECK(dz.allFinite());
  CHECK(dz(1, 0) == Approx(1));
  CHECK(dz(1, 1) == Approx(-0.5));
}

TEST_CASE("DPO trains end to end from token logits", "[preference][tokens]") {
  // pc, pr from chosen and rejected logits of 3 pairs; the gradient of the rDPO loss with respect
  // to every logit, by the chain rule through vjp, against finite differences.
  const Eigen::Index pairs = 3, positions = 6, vocabulary = 11;
  std::vector<Tokens> chosen, rejected;
  for (unsigned i = 0; i < pairs; ++i) {
    chosen.push_back(random_tokens(positions, vocabulary, 100 + i, 1));
    rejected.push_back(random_tokens(positions, vocabulary, 200 + i, 1));
  }
  const Eigen::VectorXd ref_c = Eigen::VectorXd::Constant(pairs, -20), ref_r = Eigen::VectorXd::Constant(pairs, -21);
  const PreferenceLoss<double> loss({.kind = K::Robust, .beta = 0.5, .epsilon = 0.2});
  const SequenceLogProb<double> logprob;
  const Eigen::Index block = positions * vocabulary;
  auto logits = [&](const Eigen::VectorXd& x, Eigen::Index k) {
    return Eigen::Map<const RowMatrix<double>>(x.data() + k * block, positions, vocabulary);
  };
  auto fg = [&](const Eigen::VectorXd& x, Eigen::VectorXd& grad) {
    Eigen::VectorXd pc(pairs), pr(pairs), dpc(pairs), dpr(pairs);
    for (Eigen::Index i = 0; i < pairs; ++i) {
      pc(i) = logprob.value(logits(x, 2 * i), chosen[i].targets, chosen[i].mask);
      pr(i) = logprob.value(logits(x, 2 * i + 1), rejected[i].targets, rejected[i].mask);
    }
    const double value = loss.value_and_grad(pc, pr, ref_c, ref_r, dpc, dpr);
    for (Eigen::Index i = 0; i < pairs; ++i) {
      Eigen::Map<RowMatrix<double>> gc(grad.data() + 2 * i * block, positions, vocabulary);
      Eigen::Map<RowMatrix<double>> gr(grad.data() + (2 * i + 1) * block, positions, vocabulary);
      logprob.vjp(logits(x, 2 * i), chosen[i].targets, chosen[i].mask, dpc(i), gc);
      logprob.vjp(logits(x, 2 * i + 1), rejected[i].targets, rejected[i].mask, dpr(i), gr);
    }
    return value;
  };
  Eigen::VectorXd x(2 * pairs * block);
  for (Eigen::Index i = 0; i < pairs; ++i) {
    Eigen::Map<RowMatrix<double>>(x.data() + 2 * i * block, positions, vocabulary) = chosen[i].logits;
    Eigen::Map<RowMatrix<double>>(x.data() + (2 * i + 1) * block, positions, vocabulary) = rejected[i].logits;
  }
  const auto report = testing::check_value_and_grad(fg, x);
  INFO(report.summary());
  CHECK(report.ok);
}

TEST_CASE("sequence log-probs reject bad input", "[preference][tokens][errors]") {
  RowMatrix<double> z = RowMatrix<double>::Zero(3, 4), dz(3, 4), wrong(3, 5);
  Labels y(3), mask(3), short_y(2);
  y << 0, 4, 3;  // 4 is out of range but masked below
  mask << 1, 0, 1;
  const SequenceLogProb<double> logprob;
  CHECK_NOTHROW(logprob.value(z, y, mask));
  CHECK_THROWS_WITH(logprob.value(z, y),
                    "gradus::SequenceLogProb::value: argument 'targets': expected token ids in [0, 4) where counted, "
                    "got 4 at position 1");
  y(1) = -1;
  CHECK_THROWS_AS(logprob.value(z, y), gradus::invalid_argument);
  CHECK_THROWS_WITH(logprob.value(z, short_y), Catch::Contains("'targets'"));
  CHECK_THROWS_WITH(logprob.value(z, y, Labels(2)), Catch::Contains("'mask'"));
  CHECK_THROWS_WITH(logprob.value_and_grad(z, y, mask, wrong), Catch::Contains("'dlogits'"));
  CHECK_THROWS_WITH(logprob.value(RowMatrix<double>(0, 4), Labels(0)), Catch::Contains("'logits'"));
  CHECK_THROWS_WITH(logprob.value(RowMatrix<double>(3, 0), y, mask), Catch::Contains("vocabulary"));
  // A masked-out sequence has log-prob 0 (sum) and a zero gradient.
  dz.setOnes();
  CHECK(logprob.value_and_grad(z, y, Labels::Zero(3), dz) == 0);
  CHECK(dz.isZero());
}

TEMPLATE_TEST_CASE("sequence log-probs: ignore indices, an empty mean and non-finite logits", "[preference][tokens]",
                   float, double) {
  using S = TestType;
  const S inf = std::numeric_limits<S>::infinity();
  RowMatrix<S> z(3, 3), dz(3, 3);
  z << 0, 1, 2, 1, 0, -1, 2, 2, 2;
  Labels y(3), mask(3);
  y << 2, -100, 1;  // TRL's ignore index at a masked position
  mask << 1, 0, 1;
  const SequenceLogProb<S> logprob;
  CHECK_NOTHROW(logprob.value(z, y, mask));
  CHECK_THROWS_WITH(logprob.value(z, y), Catch::Contains("'targets'") && Catch::Contains("-100 at position 1"));
  // The mean over no counted token used to be NaN (with a zeroed gradient): now an error.
  const SequenceLogProb<S> mean({.average = true});
  CHECK_THROWS_WITH(mean.value(z, y, Labels::Zero(3)),
                    "gradus::SequenceLogProb::value: argument 'mask': expected at least one counted position (the "
                    "mean over no token), got no nonzero entry");
  CHECK_THROWS_AS(mean.value_and_grad(z, y, Labels::Zero(3), dz), gradus::invalid_argument);
  CHECK_THROWS_WITH(logprob.value(RowMatrix<S>(0, 0), Labels(0)), Catch::Contains("'logits'"));
  CHECK(mean.value(z, y, mask) == Approx(logprob.value(z, y, mask) / 2));
  // -inf elsewhere is a token of probability 0; at the target, log p = -inf with a finite gradient.
  y << 2, 0, 1;
  z.row(0) << -inf, 0, 0;
  S value = logprob.value_and_grad(z, y, mask, dz);
  CHECK(value == Approx(-std::log(2.0) + logprob.value(z.bottomRows(1), y.tail(1))));
  CHECK(dz.allFinite());
  CHECK(std::abs(dz(0, 0)) <= std::numeric_limits<S>::min());  // 0, or a denormal from Eigen's exp
  z.row(0) << 0, 0, -inf;
  CHECK(logprob.value_and_grad(z, y, mask, dz) == -inf);
  CHECK(dz.allFinite());
  // +inf or NaN in a counted row: NaN; in an uncounted row they do not count.
  for (S bad : {inf, std::numeric_limits<S>::quiet_NaN()}) {
    z.row(0) << 0, bad, 0;
    CHECK(std::isnan(logprob.value_and_grad(z, y, mask, dz)));
    CHECK(dz.row(0).hasNaN());
    z.row(0) << 0, 0, 0;
    z.row(1) << bad, 0, 0;
    CHECK(std::isfinite(logprob.value_and_grad(z, y, mask, dz)));
    CHECK(dz.row(1).isZero());
    z.row(1) << 0, 0, 0;
  }
}
