// Fuzz harness: AnyLoss, binary (N logits or probabilities) and multi-class (N x C), every
// Metric (and out-of-range ones), amplify, beta and stabilizer at and beyond their edges.
//
// Asserted, for every call that does not throw:
// - a Metric or AnyLossInput outside its enumerators was rejected;
// - with finite inputs: the value is finite and in [0, 1] (1 - M for a metric M in [0, 1]), and
//   the gradient is finite (unless amplify > max(S)/1e3, where L a (1 - a) itself may overflow);
// - multi-class logits: each gradient row sums to zero (the softmax's Jacobian rows do) within
//   2 (C + 1)^2 eps of its l1 norm plus 2 C denormals. The backward pass is dz = p (g' - <p, g'>)
//   with g' = g - g_r, r the row's most probable class (p_r >= 1/C): the row sum is
//   <p, g'> (1 - sum p) plus the dot product's and the last two operations' rounding, where
//   |1 - sum p| <= C eps/2, the dot's error <= (2C - 1) eps/2 sum p |g'| (C eps/2 with FMA),
//   sum p |g'| <= (C + 1) l1; to first order (3C^2 + 2C + 1)/2 eps l1, and each of the C
//   products of the dot and of dz underflows by at most half a denormal;
// - for C = 2 and the symmetric metrics (accuracy, G-mean, balanced accuracy) the value equals
//   the binary loss on z_1 - z_0 (within 1e-3 (float) / 1e-9 (double) times 1 + L/4, for |z| <= 30).
#include "fuzz.hpp"

#include "gradus/losses/anyloss.hpp"

using gradus::Index;
using gradus::Metric;

namespace {

template <class S>
void harness(FuzzedDataProvider& in) {
  using L = std::numeric_limits<S>;
  gradus::AnyLossOptions<S> o;
  o.metric = Metric(in.ConsumeIntegralInRange<int>(0, 15) == 0 ? in.ConsumeIntegralInRange<int>(5, 9)
                                                                : in.ConsumeIntegralInRange<int>(0, 4));
  o.amplify = fuzz::pick<S>(in, {S(73), S(1), S(10), S(40), S(1e4), L::denorm_min(), S(1e30), L::max(), S(0),
                                 S(-0.0), S(-1), L::infinity(), L::quiet_NaN()});
  o.beta = fuzz::pick<S>(in, {S(1), S(0.5), S(2), L::denorm_min(), S(1e-20), S(1e20), L::max(), S(0),
                              L::infinity(), L::quiet_NaN()});
  o.input = gradus::AnyLossInput(in.ConsumeIntegralInRange<int>(0, 31) == 0 ? 2 : in.ConsumeIntegralInRange<int>(0, 1));
  o.stabilizer = fuzz::pick<S>(in, {S(0), S(0), S(1e-5), L::denorm_min(), S(1), L::max(), S(-0.0), fuzz::down(S(0)),
                                    L::infinity(), L::quiet_NaN()});
  std::optional<gradus::AnyLoss<S>> made;
  if (!fuzz::accepts([&] { made.emplace(o); })) return;
  const auto& loss = *made;
  const bool valid_enums = int(o.metric) >= 0 && int(o.metric) <= 4 && int(o.input) >= 0 && int(o.input) <= 1;
  const bool logits = o.input == gradus::AnyLossInput::Logits;

  const Index n = in.ConsumeIntegralInRange<Index>(0, 40);
  const Index c = in.ConsumeIntegralInRange<int>(0, 3) == 0 ? in.ConsumeIntegralInRange<Index>(0, 6) : 1;
  const bool finite_inputs = in.ConsumeIntegralInRange<int>(0, 7) != 0;
  const S bound = logits ? fuzz::pick<S>(in, {S(4), S(30), S(1e4), S(1e30), L::max()}) : S(1);
  gradus::RowMatrix<S> Z = fuzz::matrix<S>(in, n, c, bound, finite_inputs);
  if (!logits && in.ConsumeIntegralInRange<int>(0, 15) != 0) Z = Z.cwiseAbs();  // mostly in [0, 1]
  const gradus::Labels y = fuzz::labels(in, fuzz::size_like(in, n, 41), std::max<Index>(c, 2));
  const Index grad_rows = fuzz::size_like(in, n, 41), grad_cols = fuzz::size_like(in, c, 6);
  fuzz::call = [&] {
    return std::string(sizeof(S) == 4 ? "float" : "double") + " AnyLoss{metric " + std::to_string(int(o.metric)) +
           ", amplify " + fuzz::text(o.amplify) + ", beta " + fuzz::text(o.beta) + ", input " +
           std::to_string(int(o.input)) + ", stabilizer " + fuzz::text(o.stabilizer) + "}, Z " + fuzz::show(Z) +
           ", labels " + fuzz::show(y) + ", dZ " + std::to_string(grad_rows) + " x " + std::to_string(grad_cols);
  };

  S value = 0;
  gradus::RowMatrix<S> grad = gradus::RowMatrix<S>::Constant(grad_rows, grad_cols, S(7));
  if (!fuzz::accepts([&] { value = loss.value_and_grad(Z, y, grad); })) return;
  FUZZ_CHECK(valid_enums || fuzz::muted("enum"), "accepted Metric(" + std::to_string(int(o.metric)) +
                                                     ") / AnyLossInput(" + std::to_string(int(o.input)) + ")");
  S plain = 0;
  FUZZ_CHECK(fuzz::accepts([&] { plain = loss.value(Z, y); }), "value() rejects what value_and_grad() accepts");
  if (!finite_inputs) return;

  const S eps = L::epsilon();
  FUZZ_CHECK(std::isfinite(value), "non-finite value " + fuzz::text(value) + " from finite inputs");
  FUZZ_CHECK(value >= -8 * eps && value <= 1 + 8 * eps, "value " + fuzz::text(value) + " outside [0, 1]");
  FUZZ_CHECK(plain == value, "value() " + fuzz::text(plain) + " != value_and_grad() " + fuzz::text(value));
  if (o.amplify <= L::max() / 1000) FUZZ_CHECK(fuzz::finite(grad), "non-finite gradient from finite inputs");
  if (c >= 2 && logits) {
    for (Index i = 0; i < n; ++i) {
      if (!fuzz::finite(grad.row(i))) continue;
      const long double sum = grad.row(i).template cast<long double>().sum();
      const long double l1 = grad.row(i).template cast<long double>().cwiseAbs().sum();
      FUZZ_CHECK(std::abs(sum) <= 2 * (c + 1) * (c + 1) * eps * l1 + 2 * c * L::denorm_min(),
                 "gradient row " + std::to_string(i) + " sums to " + fuzz::text(double(sum)) + " (l1 norm " +
                     fuzz::text(double(l1)) + ")");
    }
  }
  const bool symmetric = o.metric == Metric::Accuracy || o.metric == Metric::GMean || o.metric == Metric::BalancedAccuracy;
  if (c == 2 && logits && symmetric && o.amplify <= 100 && (n == 0 || Z.cwiseAbs().maxCoeff() <= 30)) {
    const gradus::Vector<S> margin = Z.col(1) - Z.col(0);
    S binary = 0;
    if (fuzz::accepts([&] { binary = loss.value(margin, y); })) {
      const S tolerance = (sizeof(S) == 4 ? S(1e-3) : S(1e-9)) * (1 + o.amplify / 4);
      FUZZ_CHECK(std::abs(binary - value) <= tolerance,
                 "C = 2 value " + fuzz::text(value) + " != binary value on z1 - z0 " + fuzz::text(binary));
    }
  }
}

}  // namespace

GRADUS_FUZZ_ENTRY(harness)
