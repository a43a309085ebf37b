// Fuzz harness: RegretLoss (policies or logits, N at and beyond its edges) and regret().
//
// Asserted, for every call that does not throw, with finite inputs:
// - the value is finite where (2 T max |l|)^2 is below max(S)/16, and lies between the smallest
//   and the largest penalty h(R_j) of the k sequences (a convex combination);
// - the gradient is finite where also (1 + N) (2 T max |l|)^3 is below max(S)/16;
// - from logits, each gradient row sums to zero (the softmax's Jacobian rows do) within
//   |dR| sum_a pi_a (8 (d + 2) eps (|l_a| + |<l, pi>|) + d denormals) plus d denormals (the
//   d products of <l, pi> underflow by half a denormal each), |dR| read off the row
//   where one of its gaps |l_a - <l, pi>| stands clear of rounding, else bounded from the
//   regrets (see below).
#include "fuzz.hpp"

#include "gradus/losses/regret.hpp"

using gradus::Index;

namespace {

using LD = long double;

template <class S>
void harness(FuzzedDataProvider& in) {
  using L = std::numeric_limits<S>;
  gradus::RegretLossOptions<S> o;
  o.N = fuzz::pick<S>(in, {S(1), S(0), S(10), S(1e30), L::max(), L::infinity(), L::denorm_min(), S(-0.0),
                           fuzz::down(S(0)), L::quiet_NaN()});
  o.from_logits = in.ConsumeBool();
  std::optional<gradus::RegretLoss<S>> made;
  if (!fuzz::accepts([&] { made.emplace(o); })) return;
  const Index rounds = in.ConsumeIntegralInRange<Index>(-1, 4), k = in.ConsumeIntegralInRange<Index>(0, 4);
  const Index d = in.ConsumeIntegralInRange<Index>(0, 5), rows = fuzz::size_like(in, std::max<Index>(rounds, 0) * k, 13);
  const bool finite_inputs = in.ConsumeIntegralInRange<int>(0, 7) != 0;
  const S bound = fuzz::pick<S>(in, {S(1), S(100), S(1e4), S(1e18), S(1e30), L::max()});
  const gradus::RowMatrix<S> losses = fuzz::matrix<S>(in, rows, d, bound, finite_inputs);
  gradus::RowMatrix<S> policies = fuzz::matrix<S>(in, fuzz::size_like(in, rows, 13), fuzz::size_like(in, d, 6),
                                                  o.from_logits ? bound : S(1), finite_inputs);
  if (!o.from_logits && in.ConsumeIntegralInRange<int>(0, 7) != 0) {  // mostly on the simplex
    for (Index r = 0; r < policies.rows(); ++r) {
      policies.row(r) = policies.row(r).cwiseAbs();
      const S sum = policies.row(r).sum();
      if (sum > 0) policies.row(r) /= sum;
    }
  }
  gradus::RowMatrix<S> grad(fuzz::size_like(in, rows, 13), fuzz::size_like(in, d, 6));
  fuzz::call = [&] {
    return std::string(sizeof(S) == 4 ? "float" : "double") + " RegretLoss{N " + fuzz::text(o.N) + ", from_logits " +
           std::to_string(o.from_logits) + "}, rounds " + std::to_string(rounds) + ", losses " + fuzz::show(losses) +
           ", policies " + fuzz::show(policies);
  };
  S value = 0;
  if (!fuzz::accepts([&] { value = made->value_and_grad(losses, policies, rounds, grad); })) return;
  if (!finite_inputs) return;
  const long double scale = 2 * LD(rounds) * (rows * d ? LD(losses.cwiseAbs().maxCoeff()) : 0);
  if (scale * scale < L::max() / 16) FUZZ_CHECK(std::isfinite(value), "non-finite value " + fuzz::text(value));
  if ((1 + LD(o.N)) * scale * scale * (1 + scale) < L::max() / 16) FUZZ_CHECK(fuzz::finite(grad), "non-finite gradient");
  if (std::isfinite(value) && scale * scale < L::max() / 16) {
    // The penalties of the sequences, from the regrets regret() computes (policies only).
    if (!o.from_logits) {
      gradus::Vector<S> regrets(rows / rounds);
      gradus::regret(losses, policies, rounds, regrets);
      S low = L::infinity(), high = -L::infinity();
      for (Index j = 0; j < regrets.size(); ++j) {
        const S h = o.h.value(regrets(j));
        low = std::min(low, h), high = std::max(high, h);
      }
      const S slack = 16 * L::epsilon() * std::max(std::abs(low), std::abs(high)) + L::min();
      FUZZ_CHECK(value >= low - slack && value <= high + slack, "value " + fuzz::text(value) + " outside [min h(R_j), max h(R_j)] = [" +
                                                                  fuzz::text(low) + ", " + fuzz::text(high) + "]");
    }
  }
  if (o.from_logits && fuzz::finite(policies)) {
    // g_a = dR pi_a (l_a - <l, pi>): the difference rounds by eps (|l_a| + |<l, pi>|) and <l, pi>
    // underflows by d/2 denormals, so the row sums to zero within that, times |dR| pi_a, summed
    // over the row. |dR| is read off the row (|g_a| / (pi_a |l_a - <l, pi>|)) where a gap
    // stands well above its rounding and underflow, else bounded from the regrets (default h; pi = softmax in long double; the regrets widened by
    // dR_err = 4 (d + T + 2) eps 2 T max |l| for their rounding in S): |dR_j| <= max_j h'(R_j)
    // + N (max_j h(R_j) - min_j h(R_j)), and for k = 1 dR = h'(R) (w = 1, h(R) - L = 0).
    gradus::RowMatrix<LD> pi(rows, d);
    for (Index r = 0; r < rows; ++r) {
      const LD top = policies.row(r).maxCoeff();
      LD total = 0;
      for (Index a = 0; a < d; ++a) total += pi(r, a) = std::exp(LD(policies(r, a)) - top);
      pi.row(r) /= total;
    }
    const Index k = rows / rounds;
    LD high = -std::numeric_limits<LD>::infinity(), low = std::numeric_limits<LD>::infinity();
    for (Index j = 0; j < k; ++j) {
      const auto l = losses.middleRows(j * rounds, rounds).template cast<LD>();
      const LD R = (l.array() * pi.middleRows(j * rounds, rounds).array()).sum() - l.colwise().sum().minCoeff();
      high = std::max(high, R), low = std::min(low, R);
    }
    const LD widen = 4 * LD(d + rounds + 2) * LD(L::epsilon()) * scale;
    const auto h = [](LD R) { return R > 0 ? R * R : LD(0); };
    const LD dR_bound = 2 * std::max<LD>(high + widen, 0) +
                        (k == 1 || std::isinf(o.N) ? LD(0) : std::abs(LD(o.N)) * (h(high + widen) - h(low - widen)));
    for (Index r = 0; r < grad.rows(); ++r) {
      if (!fuzz::finite(grad.row(r))) continue;
      const LD denormal = L::denorm_min();
      LD learner = 0, dR = dR_bound, spread = 0, sum = 0, tolerance = 0, largest = 0;
      for (Index a = 0; a < d; ++a) learner += pi(r, a) * losses(r, a);
      for (Index a = 0; a < d; ++a) largest = std::max(largest, std::abs(LD(losses(r, a))));
      for (Index a = 0; a < d; ++a) {
        const LD gap = std::abs(losses(r, a) - learner);
        const bool clear = gap >= 16 * (d + 2) * L::epsilon() * (largest + std::abs(learner)) + 16 * d * denormal &&
                           pi(r, a) >= LD(L::min()) / L::epsilon();
        if (clear && pi(r, a) * gap > spread) spread = pi(r, a) * gap, dR = std::abs(LD(grad(r, a))) / spread;
      }
      for (Index a = 0; a < d; ++a) {
        sum += grad(r, a);
        tolerance += dR * pi(r, a) * (8 * (d + 2) * L::epsilon() * (std::abs(LD(losses(r, a))) + std::abs(learner)) +
                                      d * denormal);
      }
      FUZZ_CHECK(std::abs(sum) <= tolerance + d * L::denorm_min() || fuzz::muted("rowsum"),
                 "gradient row " + std::to_string(r) + " sums to " + fuzz::text(double(sum)));
    }
  }
}

}  // namespace

GRADUS_FUZZ_ENTRY(harness)
