// Fuzz harness: PreferenceLoss (every PreferenceKind and out-of-range ones, every Reduction,
// with and without reference log-probs, metrics) and SequenceLogProb (masks, averaging, vjp).
//
// Asserted, for every call that does not throw:
// - a PreferenceKind or Reduction outside its enumerators was rejected;
// - with finite inputs: the value is finite wherever the exact one (a long double reference of
//   the per-pair formulas at the top of losses/preference.hpp) is below max(S)/16; it is >= 0
//   for every kind but Robust; the gradients are finite (IPO and SppoHard: wherever
//   2 (|a| + |b| + 1/beta) is below max(S)/16); the reward accuracy is in [0, 1]. The DPO family
//   (Sigmoid, Robust, Conservative, Aot, AotUnpaired) is held to this for every finite input; the
//   other kinds only where the log-ratios a = pc - rc, b = pr - rr and the margin a - b are finite
//   in S (beyond S's range they count as infinite, as losses/preference.hpp states);
// - the gradients are exact negatives where the loss depends on a difference: dpc = -dpr for
//   the kinds of the margin h = a - b and for Aot (of pc - pr), drc = -dpc and drr = -dpr for
//   every kind but Aot (of a = pc - rc and b = pr - rr), drr = -drc for Aot;
// - the reference-free overloads equal the ones with zero references; a NaN input gives a NaN value;
// - SequenceLogProb: log p <= 0, masked positions have a zero gradient row, the other rows sum
//   to zero (within 8 (V + 2) eps of their l1 norm plus V denormals), vjp(u) = u * gradient (within 4 eps (|u g| + |u|)).
#include "fuzz.hpp"

#include <algorithm>

#include "gradus/losses/preference.hpp"
#include "gradus/losses/sequence_logprob.hpp"

using gradus::Index;
using gradus::PreferenceKind;

namespace {

using LD = long double;
LD sp(LD x) { return x > 0 ? x + std::log1p(std::exp(-x)) : std::log1p(std::exp(x)); }
LD sig(LD x) { return 1 / (1 + std::exp(-x)); }

template <class S>
LD reference(const gradus::PreferenceOptions<S>& o, const gradus::Vector<S>& pc, const gradus::Vector<S>& pr,
             const gradus::Vector<S>& rc, const gradus::Vector<S>& rr) {
  const Index n = pc.size();
  const LD beta = o.beta, eps = o.epsilon, tau = o.discopop_tau;
  std::vector<LD> a(n), b(n);
  for (Index i = 0; i < n; ++i) a[i] = LD(pc(i)) - rc(i), b[i] = LD(pr(i)) - rr(i);
  if (o.kind == PreferenceKind::Aot || o.kind == PreferenceKind::AotUnpaired) {
    if (o.kind == PreferenceKind::Aot)
      for (Index i = 0; i < n; ++i) a[i] = LD(pc(i)) - pr(i), b[i] = LD(rc(i)) - rr(i);
    std::sort(a.begin(), a.end());
    std::sort(b.begin(), b.end());
  }
  LD total = 0;
  for (Index i = 0; i < n; ++i) {
    const LD h = a[i] - b[i], t = beta * h;
    LD l = 0;
    switch (o.kind) {
      case PreferenceKind::Sigmoid: l = sp(-t); break;
      case PreferenceKind::Robust: l = sp(-t) - eps * t / (1 - 2 * eps); break;
      case PreferenceKind::Conservative: case PreferenceKind::Aot: case PreferenceKind::AotUnpaired:
        l = sp(-t) + eps * t; break;
      case PreferenceKind::IPO: l = (h - 1 / (2 * beta)) * (h - 1 / (2 * beta)); break;
      case PreferenceKind::Hinge: l = std::max<LD>(0, 1 - t); break;
      case PreferenceKind::ExoPair: {
        const LD q = sig(t);
        l = q * (-sp(-t) - std::log1p(-eps)) + (1 - q) * (-sp(t) - std::log(eps));
        break;
      }
      case PreferenceKind::NcaPair: l = sp(-beta * a[i]) + sp(beta * a[i]) / 2 + sp(beta * b[i]) / 2; break;
      case PreferenceKind::BcoPair: l = sp(-beta * a[i]) + sp(beta * b[i]); break;
      case PreferenceKind::SppoHard: {
        const LD target = 1 / (2 * beta);
        l = (a[i] - target) * (a[i] - target) + (b[i] + target) * (b[i] + target);
        break;
      }
      case PreferenceKind::ApoZero: l = (1 - sig(beta * a[i])) + sig(beta * b[i]); break;
      case PreferenceKind::ApoDown: l = sig(beta * a[i]) + (1 - sig(t)); break;
      case PreferenceKind::DiscoPOP: l = (1 - sig(t / tau)) * sp(-t) + std::exp(-t - sp(-t / tau)); break;
    }
    total += l;
  }
  return o.reduction == gradus::Reduction::Mean ? total / n : total;
}

template <class S>
void bitwise_negatives(const gradus::Vector<S>& x, const gradus::Vector<S>& y, const char* what) {
  for (Index i = 0; i < x.size(); ++i) {
    FUZZ_CHECK((std::isnan(x(i)) && std::isnan(y(i))) || x(i) == -y(i),
               std::string(what) + " at " + std::to_string(i) + ": " + fuzz::text(x(i)) + " vs " + fuzz::text(y(i)));
  }
}

template <class S>
void sequence_logprob(FuzzedDataProvider& in) {
  using L = std::numeric_limits<S>;
  const bool average = in.ConsumeBool();
  const Index t = in.ConsumeIntegralInRange<Index>(0, 7), v = in.ConsumeIntegralInRange<Index>(0, 9);
  const bool finite_inputs = in.ConsumeIntegralInRange<int>(0, 7) != 0;
  const S bound = fuzz::pick<S>(in, {S(4), S(30), S(1e4), S(1e30), L::max()});
  const gradus::RowMatrix<S> z = fuzz::matrix<S>(in, t, v, bound, finite_inputs);
  const gradus::Labels y = fuzz::labels(in, fuzz::size_like(in, t, 8), v);
  gradus::Labels mask(fuzz::size_like(in, t, 8));
  for (Index i = 0; i < mask.size(); ++i) mask(i) = in.ConsumeIntegralInRange<int>(-1, 2) > 0;
  const S upstream = fuzz::value<S>(in, S(1e4), true);
  gradus::RowMatrix<S> grad(fuzz::size_like(in, t, 8), fuzz::size_like(in, v, 10)), vjp(grad.rows(), grad.cols());
  fuzz::call = [&] {
    return std::string(sizeof(S) == 4 ? "float" : "double") + " SequenceLogProb{average " + std::to_string(average) +
           "}, logits " + fuzz::show(z) + ", targets " + fuzz::show(y) + ", mask " + fuzz::show(mask) + ", upstream " +
           fuzz::text(upstream);
  };
  const gradus::SequenceLogProb<S> logprob({.average = average});
  S value = 0;
  if (!fuzz::accepts([&] { value = logprob.value_and_grad(z, y, mask, grad); })) return;
  FUZZ_CHECK(fuzz::accepts([&] { logprob.vjp(z, y, mask, upstream, vjp); }), "vjp rejects what value_and_grad accepts");
  if (!finite_inputs) return;
  FUZZ_CHECK(!(value > 0), "log p = " + fuzz::text(value) + " > 0");
  for (Index i = 0; i < t; ++i) {
    if (mask(i) == 0) {
      FUZZ_CHECK((grad.row(i).array() == 0).all(), "masked position " + std::to_string(i) + " has a gradient");
      continue;
    }
    if (!fuzz::finite(grad.row(i))) continue;
    const LD sum = grad.row(i).template cast<LD>().sum(), l1 = grad.row(i).template cast<LD>().cwiseAbs().sum();
    FUZZ_CHECK(std::abs(sum) <= 8 * (v + 2) * L::epsilon() * l1 + v * L::denorm_min() || fuzz::muted("rowsum"),
               "gradient row " + std::to_string(i) + " sums to " + fuzz::text(double(sum)));
    for (Index j = 0; j < v; ++j) {
      const LD expected = LD(upstream) * grad(i, j);
      // Both are u (p_j - [j = y]) rounded in their own order: within a few ulps of |u| (p_j + 1).
      FUZZ_CHECK(std::abs(vjp(i, j) - expected) <= 4 * L::epsilon() * (std::abs(expected) + std::abs(LD(upstream))) +
                                                       L::denorm_min(),
                 "vjp(u) != u * gradient");
    }
  }
}

template <class S>
void harness(FuzzedDataProvider& in) {
  using L = std::numeric_limits<S>;
  if (in.ConsumeIntegralInRange<int>(0, 3) == 0) return sequence_logprob<S>(in);
  gradus::PreferenceOptions<S> o;
  o.kind = PreferenceKind(in.ConsumeIntegralInRange<int>(0, 31) == 0 ? in.ConsumeIntegralInRange<int>(14, 99)
                                                                      : in.ConsumeIntegralInRange<int>(0, 13));
  o.beta = fuzz::pick<S>(in, {S(0.1), S(1), S(10), L::denorm_min(), S(1e-30), S(1e30), L::max() / 4, L::max(), S(0),
                              L::infinity(), L::quiet_NaN()});
  o.epsilon = fuzz::pick<S>(in, {S(0), S(0.1), S(0.25), fuzz::down(S(0.5)), S(0.5), S(1e-3), fuzz::down(S(1)), S(1),
                                 L::denorm_min(), S(-0.0), fuzz::down(S(0)), L::quiet_NaN()});
  o.discopop_tau = fuzz::pick<S>(in, {S(0.05), S(1), fuzz::up(S(1)), L::min(), L::denorm_min(), S(1e-30), S(0),
                                      L::infinity(), L::quiet_NaN()});
  o.reduction = gradus::Reduction(in.ConsumeIntegralInRange<int>(0, 15) == 0 ? in.ConsumeIntegralInRange<int>(3, 7)
                                                                              : in.ConsumeIntegralInRange<int>(0, 2));
  std::optional<gradus::PreferenceLoss<S>> made;
  if (!fuzz::accepts([&] { made.emplace(o); })) return;
  const auto& loss = *made;
  FUZZ_CHECK((int(o.kind) <= 13 && int(o.reduction) <= 2) || fuzz::muted("enum"),
             "accepted PreferenceKind(" + std::to_string(int(o.kind)) + ") / Reduction(" + std::to_string(int(o.reduction)) + ")");

  const Index n = in.ConsumeIntegralInRange<Index>(0, 40);
  const bool finite_inputs = in.ConsumeIntegralInRange<int>(0, 7) != 0;
  const S bound = fuzz::pick<S>(in, {S(1), S(100), S(1e4), S(1e30), L::max()});
  const gradus::Vector<S> pc = fuzz::vector<S>(in, n, bound, finite_inputs);
  const gradus::Vector<S> pr = fuzz::vector<S>(in, fuzz::size_like(in, n, 41), bound, finite_inputs);
  const gradus::Vector<S> rc = fuzz::vector<S>(in, fuzz::size_like(in, n, 41), bound, finite_inputs);
  const gradus::Vector<S> rr = fuzz::vector<S>(in, fuzz::size_like(in, n, 41), bound, finite_inputs);
  gradus::Vector<S> dpc(fuzz::size_like(in, n, 41)), dpr(n), drc(n), drr(n);
  fuzz::call = [&] {
    return std::string(sizeof(S) == 4 ? "float" : "double") + " PreferenceLoss{kind " + std::to_string(int(o.kind)) +
           ", beta " + fuzz::text(o.beta) + ", epsilon " + fuzz::text(o.epsilon) + ", discopop_tau " +
           fuzz::text(o.discopop_tau) + ", reduction " + std::to_string(int(o.reduction)) + "}, pc " +
           fuzz::show(pc.transpose()) + ", pr " + fuzz::show(pr.transpose()) + ", rc " + fuzz::show(rc.transpose()) +
           ", rr " + fuzz::show(rr.transpose());
  };
  S value = 0;
  gradus::PreferenceMetrics<S> metrics;
  if (!fuzz::accepts([&] { value = loss.value_and_grad(pc, pr, rc, rr, dpc, dpr, drc, drr, &metrics); })) return;
  gradus::Vector<S> free_pc(n), free_pr(n), zero_pc(n), zero_pr(n);
  const gradus::Vector<S> zeros = gradus::Vector<S>::Zero(n);
  S free_value = 0, zero_value = 0;
  FUZZ_CHECK(fuzz::accepts([&] { free_value = loss.value_and_grad(pc, pr, free_pc, free_pr); }) &&
                 fuzz::accepts([&] { zero_value = loss.value_and_grad(pc, pr, zeros, zeros, zero_pc, zero_pr); }),
             "a reference-free overload rejected what the full one accepted");
  FUZZ_CHECK((std::isnan(free_value) && std::isnan(zero_value)) || free_value == zero_value,
             "reference-free value " + fuzz::text(free_value) + " != value with zero references " + fuzz::text(zero_value));

  const PreferenceKind k = o.kind;
  const bool margin = k == PreferenceKind::Sigmoid || k == PreferenceKind::Robust || k == PreferenceKind::Conservative ||
                      k == PreferenceKind::IPO || k == PreferenceKind::Hinge || k == PreferenceKind::ExoPair ||
                      k == PreferenceKind::DiscoPOP;
  if (margin || k == PreferenceKind::Aot) bitwise_negatives(dpc, dpr, "dpc != -dpr");
  if (k != PreferenceKind::Aot) {
    bitwise_negatives(dpc, drc, "drc != -dpc");
    bitwise_negatives(dpr, drr, "drr != -dpr");
  } else {
    bitwise_negatives(drc, drr, "drr != -drc");
  }
  if (!finite_inputs) {
    const bool any_nan = pc.hasNaN() || pr.hasNaN() || rc.hasNaN() || rr.hasNaN();
    if (any_nan) FUZZ_CHECK(std::isnan(value), "a NaN input gave the value " + fuzz::text(value));
    return;
  }
  const bool dpo = k == PreferenceKind::Sigmoid || k == PreferenceKind::Robust || k == PreferenceKind::Conservative ||
                   k == PreferenceKind::Aot || k == PreferenceKind::AotUnpaired;
  bool ratios_finite = true;
  for (Index i = 0; i < n; ++i) {
    const S a = pc(i) - rc(i), b = pr(i) - rr(i), h = a - b;
    ratios_finite = ratios_finite && std::isfinite(h);  // NaN or inf if a, b or h overflowed
  }
  if (!dpo && !ratios_finite) return;  // documented: those log-ratios count as infinite
  const LD exact = reference(o, pc, pr, rc, rr);
  const std::string at = " (value " + fuzz::text(value) + ", reference " + fuzz::text(double(exact)) + ")";
  if (std::abs(exact) < L::max() / 16) FUZZ_CHECK(std::isfinite(value), "non-finite value where the exact one is finite" + at);
  // Rounding may leave a sum of cancelling terms of order one a few eps below zero.
  if (k != PreferenceKind::Robust) FUZZ_CHECK(!(value < -64 * L::epsilon() * (1 + std::abs(exact))), "negative value" + at);
  const bool quadratic = k == PreferenceKind::IPO || k == PreferenceKind::SppoHard;
  const LD largest = n ? std::max({pc.cwiseAbs().maxCoeff(), pr.cwiseAbs().maxCoeff(), rc.cwiseAbs().maxCoeff(), rr.cwiseAbs().maxCoeff()}) : S(0);
  if (!quadratic || 2 * (4 * largest + 1 / LD(o.beta)) < L::max() / 16) {
    FUZZ_CHECK(fuzz::finite(dpc) && fuzz::finite(dpr) && fuzz::finite(drc) && fuzz::finite(drr),
               "non-finite gradient from finite inputs" + at);
  }
  FUZZ_CHECK(metrics.reward_accuracy >= 0 && metrics.reward_accuracy <= 1, "reward accuracy outside [0, 1]");
}

}  // namespace

GRADUS_FUZZ_ENTRY(harness)
