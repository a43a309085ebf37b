// Fuzz harness: SmoothAdversarialLoss, pgd_attack and robust_accuracy over a LinearModel, every
// option at and beyond the edges of its domain (tau, rho, nu, gamma, norm, steps, step_size,
// schedule, restarts, random_start, seed, reduction; the box lower / upper).
//
// Asserted, for every call that does not throw:
// - a PerturbationNorm, StepSchedule or Reduction outside its enumerators was rejected;
// - with finite inputs (and x +- 4 gamma, the outputs and the input gradients finite), the
//   perturbed inputs lie in the ball: |x' - x|_inf <= gamma, or |x' - x|_2 <= gamma, within
//   (D + 4) (eps (gamma + |x|) + one denormal) (the projection rounds x + gamma and, for l_2,
//   the offset's length; gamma times a unit vector rounds in the denormals by half of one per
//   entry); pgd_attack's also lie in the box [lower, upper];
// - a call is a deterministic function of its inputs (two perturb() calls agree bit for bit),
//   and pgd_attack writing over X itself gives what it writes elsewhere;
// - with finite inputs of moderate size (|X|, |theta|, gamma, nu <= 1e4, rho >= 1e-4, and for
//   tau < 1 a p_y^(tau - 1) below e^60, as the value grows like it): value and gradient are
//   finite, the value is at least the comp-sum term l_tau(h(x)/rho) (the smooth term is a
//   norm, >= 0) and equals value() and the reduced per-sample values() within 64 (N + C) eps
//   of their magnitudes;
// - robust_accuracy is in [0, 1].
#include "fuzz.hpp"

#include "gradus/losses/adversarial.hpp"
#include "gradus/models/linear.hpp"

using gradus::Index;

namespace {

using LD = long double;

// The largest |x' - x| of a row, in the attack's norm, in long double.
template <class S>
LD distance(const gradus::RowMatrix<S>& X, const gradus::RowMatrix<S>& X_adv, Index i, gradus::PerturbationNorm norm) {
  LD largest = 0, squares = 0;
  for (Index j = 0; j < X.cols(); ++j) {
    const LD d = std::abs(LD(X_adv(i, j)) - LD(X(i, j)));
    largest = std::max(largest, d);
    squares += d * d;
  }
  return norm == gradus::PerturbationNorm::Linf ? largest : std::sqrt(squares);
}

// Bit for bit (NaN included).
template <class S>
bool same(const gradus::RowMatrix<S>& a, const gradus::RowMatrix<S>& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() && std::memcmp(a.data(), b.data(), a.size() * sizeof(S)) == 0;
}

template <class S>
void check_ball(const gradus::RowMatrix<S>& X, const gradus::RowMatrix<S>& X_adv, S gamma,
                gradus::PerturbationNorm norm, const char* what) {
  using L = std::numeric_limits<S>;
  FUZZ_CHECK(X_adv.rows() == X.rows() && X_adv.cols() == X.cols(), std::string(what) + ": wrong shape");
  for (Index i = 0; i < X.rows(); ++i) {
    const LD slack = (X.cols() + 4) * (LD(L::epsilon()) * (gamma + fuzz::norm(X.row(i))) + LD(L::denorm_min()));
    const LD d = distance(X, X_adv, i, norm);
    FUZZ_CHECK(d <= gamma + slack, std::string(what) + ": row " + std::to_string(i) + " moved " +
                                       fuzz::text(double(d)) + " > gamma " + fuzz::text(gamma));
  }
}

template <class S>
void harness(FuzzedDataProvider& in) {
  using L = std::numeric_limits<S>;
  using gradus::PerturbationNorm;
  const S nan = L::quiet_NaN(), inf = L::infinity();
  gradus::SmoothAdversarialOptions<S> o;
  o.tau = fuzz::pick<S>(in, {S(1), S(0), S(0.5), S(2), L::denorm_min(), S(1e4), S(-1), inf, nan});
  o.rho = fuzz::pick<S>(in, {S(1), S(0.5), S(1e-4), S(1e-30), L::min(), S(0), S(-1), L::max(), inf, nan});
  o.nu = fuzz::pick<S>(in, {S(1), S(0), S(0.1), S(1e4), S(1e30), L::max(), S(-0.0), S(-1), inf, nan});
  o.gamma = fuzz::pick<S>(in, {S(8) / S(255), S(0.5), S(0), L::denorm_min(), S(1e4), S(1e30), L::max(),
                               S(-0.0), fuzz::down(S(0)), inf, nan});
  o.norm = PerturbationNorm(in.ConsumeIntegralInRange<int>(0, 15) == 0 ? in.ConsumeIntegralInRange<int>(-1, 3)
                                                                      : in.ConsumeIntegralInRange<int>(0, 1));
  o.steps = fuzz::pick<int>(in, {10, 1, 3, 0, -1, 7});
  o.step_size = fuzz::pick<S>(in, {S(0), S(0), S(0.01), S(1), S(1e30), L::max(), S(-1), inf, nan});
  o.schedule = gradus::StepSchedule(in.ConsumeIntegralInRange<int>(0, 15) == 0 ? in.ConsumeIntegralInRange<int>(-1, 3)
                                                                              : in.ConsumeIntegralInRange<int>(0, 1));
  o.restarts = fuzz::pick<int>(in, {1, 1, 2, 3, 0, -1});
  o.random_start = in.ConsumeBool();
  o.seed = in.ConsumeIntegral<std::uint8_t>();
  o.reduction = gradus::Reduction(in.ConsumeIntegralInRange<int>(0, 15) == 0 ? in.ConsumeIntegralInRange<int>(-1, 4)
                                                                            : in.ConsumeIntegralInRange<int>(0, 1));
  const bool valid_enums = (o.norm == PerturbationNorm::Linf || o.norm == PerturbationNorm::L2) &&
                           (o.schedule == gradus::StepSchedule::Constant || o.schedule == gradus::StepSchedule::Cosine) &&
                           int(o.reduction) >= 0 && int(o.reduction) <= 2;  // Mean, Sum, None (value() sums)
  std::optional<gradus::SmoothAdversarialLoss<S>> made;
  if (!fuzz::accepts([&] { made.emplace(o); })) return;
  FUZZ_CHECK(valid_enums || fuzz::muted("enum"), "accepted an out-of-range norm, schedule or reduction");
  const auto& loss = *made;

  // A linear model across SIMD widths (D up to 19); inputs and parameters of fuzzed size.
  const Index n = in.ConsumeIntegralInRange<Index>(0, 6), D = in.ConsumeIntegralInRange<Index>(1, 19);
  const Index C = in.ConsumeIntegralInRange<Index>(1, 5);
  const gradus::LinearModel<S> model(D, C);
  const bool finite_inputs = in.ConsumeIntegralInRange<int>(0, 7) != 0;
  const S bound = fuzz::pick<S>(in, {S(1), S(10), S(1e4), S(1e30), L::max()});
  const gradus::RowMatrix<S> X = fuzz::matrix<S>(in, fuzz::size_like(in, n, 7), fuzz::size_like(in, D, 20), bound,
                                                 finite_inputs);
  const gradus::Vector<S> theta = fuzz::vector<S>(in, fuzz::size_like(in, model.num_params(), 120), bound, finite_inputs);
  const gradus::Labels y = fuzz::labels(in, fuzz::size_like(in, n, 7), C);
  fuzz::call = [&] {
    return std::string(sizeof(S) == 4 ? "float" : "double") + " SmoothAdversarialLoss{tau " + fuzz::text(o.tau) +
           ", rho " + fuzz::text(o.rho) + ", nu " + fuzz::text(o.nu) + ", gamma " + fuzz::text(o.gamma) + ", norm " +
           std::to_string(int(o.norm)) + ", steps " + std::to_string(o.steps) + ", step_size " +
           fuzz::text(o.step_size) + ", schedule " + std::to_string(int(o.schedule)) + ", restarts " +
           std::to_string(o.restarts) + ", random_start " + std::to_string(o.random_start) + ", seed " +
           std::to_string(o.seed) + ", reduction " + std::to_string(int(o.reduction)) + "}, LinearModel(" +
           std::to_string(D) + ", " + std::to_string(C) + "), X " + fuzz::show(X) + ", theta " +
           fuzz::show(theta.transpose()) + ", labels " + fuzz::show(y.transpose());
  };

  gradus::RowMatrix<S> X_adv(X.rows(), X.cols()), again(X.rows(), X.cols());
  if (!fuzz::accepts([&] { loss.perturb(model, theta, X, y, X_adv); })) return;
  const bool finite = finite_inputs && fuzz::finite(X) && fuzz::finite(theta);
  const LD gamma = o.gamma, theta_max = theta.cwiseAbs().maxCoeff();
  // |h(x')| for |x'| <= x_max + gamma.
  const auto output_bound = [&](LD x_max) { return D * theta_max * (x_max + gamma) + theta_max; };
  // Where x +- 4 gamma, the outputs or the input gradients (<= 2 C |theta|) overflow, x' may
  // too (documented: inf or NaN, as any arithmetic).
  const auto representable = [&](const gradus::RowMatrix<S>& inputs) {
    if (!fuzz::finite(inputs) || !fuzz::finite(theta)) return false;
    const LD x = inputs.cwiseAbs().maxCoeff(), top = L::max();
    return x + 4 * gamma <= top && output_bound(x) <= top / 4 && 2 * C * theta_max <= top / 4;
  };
  if (finite && representable(X)) check_ball<S>(X, X_adv, o.gamma, o.norm, "perturb");
  FUZZ_CHECK(fuzz::accepts([&] { loss.perturb(model, theta, X, y, again); }), "perturb() rejects what it accepted");
  FUZZ_CHECK(same(X_adv, again), "two perturb() calls differ");

  S value = 0, plain = 0;
  gradus::Vector<S> dtheta(model.num_params()), per_sample(X.rows());
  FUZZ_CHECK(fuzz::accepts([&] { value = loss.value_and_grad(model, theta, X, y, dtheta); }),
             "value_and_grad() rejects what perturb() accepted");
  FUZZ_CHECK(fuzz::accepts([&] { plain = loss.value(model, theta, X, y); }), "value() rejects what perturb() accepted");
  FUZZ_CHECK(fuzz::accepts([&] { loss.values(model, theta, X, y, per_sample); }),
             "values() rejects what perturb() accepted");
  const LD x_max = X.cwiseAbs().maxCoeff(), t = output_bound(x_max) / o.rho;
  const bool moderate = finite && x_max <= 1e4 && theta_max <= 1e4 && gamma <= 1e4 && o.nu <= 1e4 && o.rho >= 1e-4 &&
                        (o.tau >= 1 || (1 - o.tau) * 2 * t < 60);
  if (moderate) {
    FUZZ_CHECK(std::isfinite(value), "non-finite value " + fuzz::text(value));
    FUZZ_CHECK(fuzz::finite(dtheta), "non-finite gradient");
    gradus::RowMatrix<S> Z(X.rows(), C);
    model.predict(theta, X, Z);
    const S comp_sum = gradus::CompSumLoss<S>({.tau = o.tau, .reduction = o.reduction}).value(Z / o.rho, y);
    const LD magnitude = std::abs(LD(value)) + per_sample.cwiseAbs().template cast<LD>().sum();
    const LD slack = 64 * LD(n + C) * LD(L::epsilon()) * (magnitude + std::abs(LD(comp_sum))) + LD(L::min());
    FUZZ_CHECK(value >= comp_sum - slack, "value " + fuzz::text(value) + " below its comp-sum term " +
                                              fuzz::text(comp_sum));
    const LD reduced = o.reduction == gradus::Reduction::Mean ? LD(per_sample.mean()) : LD(per_sample.sum());
    FUZZ_CHECK(std::abs(LD(plain) - LD(value)) <= slack, "value() " + fuzz::text(plain) + " != value_and_grad() " +
                                                               fuzz::text(value));
    FUZZ_CHECK(std::abs(reduced - LD(value)) <= slack, "reduced values() " + fuzz::text(double(reduced)) +
                                                           " != value_and_grad() " + fuzz::text(value));
  }

  // The evaluation attack, in a box the inputs lie in (mostly: else it is rejected).
  gradus::PGDOptions<S> a{.gamma = o.gamma, .norm = o.norm, .steps = o.steps, .step_size = o.step_size,
                          .schedule = o.schedule, .restarts = o.restarts, .random_start = o.random_start,
                          .seed = o.seed};
  a.lower = fuzz::pick<S>(in, {-inf, -inf, S(-1), S(0), nan});
  a.upper = fuzz::pick<S>(in, {inf, inf, S(1), S(0), nan});
  gradus::RowMatrix<S> boxed = X;
  if (in.ConsumeIntegralInRange<int>(0, 7) != 0 && !(a.lower > a.upper)) boxed = X.cwiseMax(a.lower).cwiseMin(a.upper);
  gradus::RowMatrix<S> attacked(X.rows(), X.cols());
  if (!fuzz::accepts([&] { gradus::pgd_attack(model, theta, boxed, y, a, attacked); })) return;
  if (finite && representable(boxed)) {
    check_ball<S>(boxed, attacked, o.gamma, o.norm, "pgd_attack");
    FUZZ_CHECK(!(attacked.array() < a.lower).any() && !(attacked.array() > a.upper).any(),
               "pgd_attack left the box [" + fuzz::text(a.lower) + ", " + fuzz::text(a.upper) + "]");
  }
  gradus::RowMatrix<S> in_place = boxed;
  FUZZ_CHECK(fuzz::accepts([&] { gradus::pgd_attack(model, theta, in_place, y, a, in_place); }),
             "pgd_attack over X rejects what it accepted");
  FUZZ_CHECK(same(in_place, attacked), "pgd_attack over X differs from pgd_attack elsewhere");
  double accuracy = 0;
  FUZZ_CHECK(fuzz::accepts([&] { accuracy = gradus::robust_accuracy(model, theta, boxed, y, a); }),
             "robust_accuracy rejects what pgd_attack accepted");
  FUZZ_CHECK(accuracy >= 0 && accuracy <= 1, "robust_accuracy " + fuzz::text(accuracy) + " outside [0, 1]");
}

}  // namespace

GRADUS_FUZZ_ENTRY(harness)
