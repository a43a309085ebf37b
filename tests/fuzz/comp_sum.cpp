// Fuzz harness: CompSumLoss and its aliases (CrossEntropyLoss, SumExponentialLoss,
// GeneralizedCrossEntropyLoss, MeanAbsoluteErrorLoss), with class weights, label smoothing,
// ignore_index and every Reduction (and out-of-range ones).
//
// Logits are drawn with |h| <= max(S)/4, so that every row's spread max - min is finite in S
// (beyond it the loss documents NaN/inf).
//
// Asserted, for every call that does not throw:
// - a Reduction outside {Mean, Sum, None} was rejected;
// - with finite logits: the value, per-sample values and gradient are finite wherever the exact
//   value (a long double reference in the log domain) is below max(S)/16 (tau < 1 overflows
//   legitimately once p_y underflows); a Mean over no weight is NaN;
// - the value is within 1e-3 (float) / 1e-8 (double) of the reference when max |h| <= 30;
// - per-sample values are >= 0, 0 on ignored rows, and sum to the value (Reduction::Sum);
// - without label smoothing, each gradient row sums to zero within 8 (C + 2) eps of its l1 norm
//   plus C denormals (a rescaled p - e_y); ignored rows are exactly
//   zero, and the in-place gradient (dlogits = logits) equals the out-of-place one.
#include "fuzz.hpp"

#include "gradus/losses/comp_sum.hpp"

using gradus::Index;
using gradus::Reduction;

namespace {

struct Reference {
  long double value = 0;       // the reduced loss
  long double log_scale = 0;   // log of the largest row factor scale w p_y^(tau-1), for the gradient
  bool nan = false;            // a Mean over zero weight
  std::vector<long double> per_sample;
};

template <class S>
Reference reference(const gradus::RowMatrix<S>& h, const gradus::Labels& y, const gradus::CompSumOptions<S>& o) {
  const Index n = h.rows(), c = h.cols();
  Reference r;
  r.per_sample.assign(std::size_t(n), 0);
  r.log_scale = -INFINITY;
  long double total = 0, denominator = 0, weight_max = 0;
  auto weight = [&](Index j) { return o.weight.size() ? (long double)o.weight(j) : 1.0L; };
  for (Index j = 0; j < c; ++j) weight_max = std::max(weight_max, weight(j));
  const long double tau = o.tau, eps = o.label_smoothing;
  for (Index i = 0; i < n; ++i) {
    if (y(i) == o.ignore_index) continue;
    long double top = -INFINITY, sum = 0;
    for (Index j = 0; j < c; ++j) top = std::max(top, (long double)h(i, j));
    for (Index j = 0; j < c; ++j) sum += std::exp((long double)h(i, j) - top);
    auto lp = [&](Index j) { return (long double)h(i, j) - top - std::log(sum); };
    const long double lpy = lp(y(i));
    long double l = tau == 1 ? -lpy : -std::expm1((tau - 1) * lpy) / (tau - 1);
    l *= weight(y(i));
    if (eps > 0) {
      long double smooth = 0;
      for (Index j = 0; j < c; ++j) smooth += weight(j) * -lp(j);
      l = (1 - eps) * l + eps / c * smooth;
    }
    r.per_sample[std::size_t(i)] = l;
    total += l;
    denominator += weight(y(i));
    r.log_scale = std::max(r.log_scale, std::log(weight_max) + (tau - 1) * lpy);
  }
  const bool mean = o.reduction == Reduction::Mean;
  if (mean && denominator == 0) r.nan = true;
  r.value = mean ? total / denominator : total;
  if (mean) r.log_scale -= std::log(denominator);
  return r;
}

template <class S>
gradus::CompSumLoss<S> make(FuzzedDataProvider& in, gradus::CompSumOptions<S> o) {
  switch (in.ConsumeIntegralInRange<int>(0, 4)) {
    case 1:
      return gradus::CrossEntropyLoss<S>({o.reduction, o.weight, o.ignore_index, o.label_smoothing});
    case 2:
      return gradus::SumExponentialLoss<S>({o.reduction, o.weight, o.ignore_index});
    case 3:
      return gradus::GeneralizedCrossEntropyLoss<S>({o.tau - 1, o.reduction, o.weight, o.ignore_index});
    case 4:
      return gradus::MeanAbsoluteErrorLoss<S>({o.reduction, o.weight, o.ignore_index});
    default:
      return gradus::CompSumLoss<S>(o);
  }
}

template <class S>
void harness(FuzzedDataProvider& in) {
  using L = std::numeric_limits<S>;
  const Index n = in.ConsumeIntegralInRange<Index>(0, 9), c = in.ConsumeIntegralInRange<Index>(0, 19);
  gradus::CompSumOptions<S> o;
  o.tau = fuzz::pick<S>(in, {S(1), S(0), S(2), S(3), S(1.7), S(0.5), S(10), S(-0.0), L::denorm_min(),
                             fuzz::down(S(0)), fuzz::up(S(1)), fuzz::down(S(2)), S(1e30), L::max(), L::infinity(),
                             L::quiet_NaN()});
  o.reduction = Reduction(in.ConsumeIntegralInRange<int>(0, 15) == 0 ? in.ConsumeIntegralInRange<int>(3, 7)
                                                                     : in.ConsumeIntegralInRange<int>(0, 2));
  if (in.ConsumeBool()) {
    const S bound = fuzz::pick<S>(in, {S(1), S(10), S(1e30), L::max()});
    o.weight = fuzz::vector<S>(in, fuzz::size_like(in, c, 20), bound, in.ConsumeIntegralInRange<int>(0, 7) != 0);
    if (in.ConsumeBool()) o.weight = o.weight.cwiseAbs();
  }
  o.ignore_index = fuzz::pick<int>(in, {-100, -1, 0, 1, int(c) - 1});
  if (in.ConsumeIntegralInRange<int>(0, 2) == 0) {
    o.label_smoothing = fuzz::pick<S>(in, {S(0.1), S(1), S(0.5), L::denorm_min(), fuzz::down(S(1)), fuzz::up(S(1)),
                                           S(-0.0), fuzz::down(S(0)), L::quiet_NaN()});
  }
  std::optional<gradus::CompSumLoss<S>> made;
  if (!fuzz::accepts([&] { made.emplace(make<S>(in, o)); })) return;
  const gradus::CompSumLoss<S>& loss = *made;
  o = loss.options();
  const bool valid_reduction = int(o.reduction) >= 0 && int(o.reduction) <= 2;

  const bool finite_inputs = in.ConsumeIntegralInRange<int>(0, 7) != 0;
  // |h| <= max/4: a row whose logit spread overflows S is outside what the kernels compute.
  const S bound = fuzz::pick<S>(in, {S(4), S(30), S(100), S(1e4), S(1e30), L::max() / 4});
  const gradus::RowMatrix<S> h = fuzz::matrix<S>(in, n, c, bound, finite_inputs);
  const gradus::Labels y = fuzz::labels(in, fuzz::size_like(in, n, 12), c);
  const Index grad_rows = fuzz::size_like(in, n, 10), grad_cols = fuzz::size_like(in, c, 20);

  fuzz::call = [&] {
    return std::string(sizeof(S) == 4 ? "float" : "double") + " CompSumLoss{tau " + fuzz::text(o.tau) +
           ", reduction " + std::to_string(int(o.reduction)) + ", weight " + fuzz::show(o.weight) + ", ignore_index " +
           std::to_string(o.ignore_index) + ", label_smoothing " + fuzz::text(o.label_smoothing) + "}, logits " +
           fuzz::show(h) + ", labels " + fuzz::show(y) + ", dlogits " + std::to_string(grad_rows) + " x " +
           std::to_string(grad_cols);
  };
  S value = 0;
  gradus::RowMatrix<S> grad = gradus::RowMatrix<S>::Constant(grad_rows, grad_cols, S(7));
  if (!fuzz::accepts([&] { value = loss.value_and_grad(h, y, grad); })) return;
  FUZZ_CHECK(valid_reduction || fuzz::muted("enum"), "accepted Reduction(" + std::to_string(int(o.reduction)) + ")");
  S plain = 0;
  FUZZ_CHECK(fuzz::accepts([&] { plain = loss.value(h, y); }), "value() rejects what value_and_grad() accepts");
  gradus::Vector<S> per_sample(n);
  FUZZ_CHECK(fuzz::accepts([&] { loss.values(h, y, per_sample); }), "values() rejects what value_and_grad() accepts");
  gradus::RowMatrix<S> in_place = h;
  FUZZ_CHECK(fuzz::accepts([&] { loss.value_and_grad(in_place, y, in_place); }), "in-place value_and_grad rejected");

  for (Index i = 0; i < n; ++i) {
    if (y(i) != o.ignore_index) continue;
    FUZZ_CHECK((grad.row(i).array() == 0).all(), "ignored row " + std::to_string(i) + " has a nonzero gradient");
    FUZZ_CHECK(per_sample(i) == 0, "ignored row " + std::to_string(i) + " has a nonzero value");
  }
  if (!finite_inputs || !valid_reduction) return;
  // Weights near the ends of their domain (products that overflow, sums whose inverse does).
  const bool extreme_weights = o.weight.size() && (o.weight.maxCoeff() > S(1e30) || (o.weight.array() > 0 && o.weight.array() < S(1e-30)).any());
  const bool weights_muted = extreme_weights && fuzz::muted("weights");

  const auto ref = reference(h, y, o);
  const S eps = L::epsilon();
  const long double limit = L::max() / 16;
  const std::string at = " (value " + fuzz::text(value) + ", reference " + fuzz::text(double(ref.value)) + ")";
  if (ref.nan) {
    FUZZ_CHECK(std::isnan(value), "a Mean over zero weight is not NaN" + at);
  } else if (std::abs(ref.value) < limit && !weights_muted) {
    FUZZ_CHECK(std::isfinite(value), "non-finite value where the exact one is finite" + at);
    FUZZ_CHECK(std::isfinite(plain), "value() non-finite where the exact one is finite");
    const S largest = n * c ? h.cwiseAbs().maxCoeff() : S(0);
    if (largest <= 30 && o.tau <= 10) {
      // Relative, plus the absolute error of log p_y (eps (1 + max |h|) per row) times its factor.
      const long double tolerance = (sizeof(S) == 4 ? 1e-3L : 1e-8L) * std::abs(ref.value) +
                                    16 * (c + 2) * eps * (1 + largest) * n * std::exp(ref.log_scale) + L::min();
      FUZZ_CHECK(std::abs(value - ref.value) <= tolerance, "value off the reference" + at);
    }
  }
  if (ref.log_scale < std::log(limit) && !weights_muted) {
    FUZZ_CHECK(fuzz::finite(grad), "non-finite gradient where the exact one is finite" + at);
  }
  for (Index i = 0; i < n; ++i) {
    if (std::abs(ref.per_sample[std::size_t(i)]) < limit && !weights_muted) {
      FUZZ_CHECK(std::isfinite(per_sample(i)), "non-finite per-sample value at row " + std::to_string(i));
    }
    FUZZ_CHECK(!(per_sample(i) < 0), "negative per-sample value " + fuzz::text(per_sample(i)));
    // With smoothing the row sums to zero too, but through the cancellation of terms of the
    // weights' size (1 - eps + eps = 1), so only a tolerance of that size would hold.
    if (y(i) == o.ignore_index || o.label_smoothing != 0 || !fuzz::finite(grad.row(i))) continue;
    const long double sum = grad.row(i).template cast<long double>().sum();
    const long double l1 = grad.row(i).template cast<long double>().cwiseAbs().sum();
    FUZZ_CHECK(std::abs(sum) <= 8 * (c + 2) * eps * l1 + c * L::denorm_min() || fuzz::muted("rowsum"),
               "gradient row " + std::to_string(i) + " sums to " + fuzz::text(double(sum)) + " (l1 norm " +
                   fuzz::text(double(l1)) + ")");
  }
  if (o.reduction == Reduction::Sum && std::isfinite(value)) {
    const long double sum = per_sample.template cast<long double>().sum();
    FUZZ_CHECK(std::abs(sum - value) <= 4 * (n + 2) * eps * (std::abs(sum) + L::min()),
               "values() do not sum to value() (Reduction::Sum)" + at);
  }
  if (std::isfinite(value)) {
    FUZZ_CHECK(std::abs(plain - value) <= 4 * (n + 2) * eps * std::abs(value), "value() != value_and_grad()" + at);
  }
  for (Index k = 0; k < grad.size(); ++k) {
    const S a = grad.data()[k], b = in_place.data()[k];
    FUZZ_CHECK(!std::isfinite(a) || std::abs(a - b) <= 4 * eps * std::abs(a),
               "in-place gradient differs from out-of-place");
  }
}

}  // namespace

GRADUS_FUZZ_ENTRY(harness)
