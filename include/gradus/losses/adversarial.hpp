#pragma once
// Smooth adversarial comp-sum losses (Mao, Mohri, Zhong, "Cross-Entropy Loss Functions:
// Theoretical Analysis and Applications", ICML 2023), for adversarial robustness.
//
// RECONSTRUCTION. The paper releases no code and its exact formula could not be checked;
// the form below follows the authors' companion construction (Awasthi, Mao, Mohri, Zhong,
// "Theoretically Grounded Loss Functions and Algorithms for Adversarial Robustness",
// AISTATS 2023), as reconstructed in ../shared/papers/losses.md, sections 1.6-1.7.
// For a model h(x) in R^C and the margin vector Delta_h(x, y) = (h_y(x) - h_y'(x))_{y'}:
//
//   l_adv(h, x, y) = l_tau(h(x) / rho, y)
//                    + nu * sup_{||x' - x||_p <= gamma} ||Delta_h(x', y) - Delta_h(x, y)||_2
//
// l_tau is the comp-sum loss (losses/comp_sum.hpp; tau = 1 is cross-entropy), rho the margin
// scale, nu the weight of the smooth term, gamma the radius of the l_inf or l_2 ball: TRADES
// with the KL term replaced by the change of the margin vector.
//
// With d = h(x') - h(x) and u = d - d_y (so the margin change is -u), the smooth term is
// ||u||_2 and its gradient with respect to h(x') is (u - e_y sum_k u_k) / ||u||, the negative
// of that with respect to h(x); at u = 0 it takes the subgradient 0.
//
// Inner sup: `steps` steps of projected gradient ascent per sample (sign steps for l_inf,
// unit-norm steps for l_2). The term's gradient vanishes at x' = x, so the ascent starts from
// a random point of the ball (random_start, as Madry et al.) or from x plus a tiny random
// perturbation of size 1e-3 gamma (as TRADES). Both are drawn from `seed`: a call is a
// deterministic function of its inputs; vary the seed between training steps (set_seed).
// Outer gradient (Danskin): the point x' the ascent found is held fixed, and the gradient
// flows to the parameters through both h(x') and h(x).
//
// The ascent's value is a lower bound of the sup, so value() is a lower bound of l_adv. With
// the defaults (Madry et al.'s constant step 2.5 gamma / K, one start) the l_2 ascent travels
// 2.5 gamma in all and, even for a linear model, ends a few percent below the sup
// gamma sigma_max(A) (A the margin Jacobian); the l_inf ascent of a convex term can stop at a
// local vertex of the cube. schedule = Cosine (steps from the ball's diameter 2 gamma down
// to 0) reaches the l_2 sup of a linear model; restarts = R keeps each sample's best of R
// starts (the first as above, the others uniform in the ball), against local maxima.
//
// For evaluation, pgd_attack runs projected gradient ascent (public, for other objectives
// such as TRADES' KL term too) on the margin loss max_{y' != y} h_y'(x') - h_y(x') (the
// "PGD margin" attack of Rice et al. 2020, which the paper evaluates with), optionally inside
// a box such as pixels in [0, 1]; robust_accuracy is the accuracy on its output.
//
// Non-finite inputs or parameters propagate as NaN; a radius or step so large that x' or the
// model's outputs overflow gives infinite or NaN values, as any arithmetic would.
//
//   gradus::SmoothAdversarialLoss<float> loss({.nu = 1, .gamma = 0.1f, .steps = 10});
//   float value = loss.value_and_grad(model, theta, X, y, dtheta);   // any gradus::Model
//   float robust = gradus::robust_accuracy(model, theta, X, y, {.gamma = 0.1f, .steps = 20});

#include <algorithm>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <limits>
#include <numbers>
#include <utility>

#include "gradus/core/concepts.hpp"
#include "gradus/core/errors.hpp"
#include "gradus/core/random.hpp"
#include "gradus/core/types.hpp"
#include "gradus/losses/comp_sum.hpp"

namespace gradus {

enum class PerturbationNorm { Linf, L2 };

// The step sizes s_t, t = 0..K-1, of the K ascent steps.
enum class StepSchedule {
  Constant,  // s_t = s (Madry et al. 2018; by default s = 2.5 gamma / K)
  Cosine,    // s_t = s (1 + cos(pi t / K)) / 2, by default from s = 2 gamma: the first step
             // reaches any point of the ball from any other, the last ones refine
};

template <class S>
struct SmoothAdversarialOptions {
  S tau = 1;                 // comp-sum parameter (the paper's experiments use 1: logistic)
  S rho = 1;                 // margin scale: the comp-sum term sees h / rho
  S nu = 1;                  // weight of the smooth term (not given by the paper's notes)
  S gamma = S(8) / S(255);   // radius of the perturbation ball (the usual CIFAR l_inf value)
  PerturbationNorm norm = PerturbationNorm::Linf;
  int steps = 10;            // projected gradient ascent steps K
  S step_size = 0;           // 0: the schedule's default (2.5 gamma / steps for Constant)
  StepSchedule schedule = StepSchedule::Constant;
  int restarts = 1;          // R ascents per sample, keeping the largest term
  bool random_start = true;  // start anywhere in the ball, else next to x
  std::uint64_t seed = 0;
  Reduction reduction = Reduction::Mean;  // None: value() gives the sum, as CompSumLoss
};

template <class S>
struct PGDOptions {
  S gamma = S(8) / S(255);
  PerturbationNorm norm = PerturbationNorm::Linf;
  int steps = 20;
  S step_size = 0;           // 0: the schedule's default (2.5 gamma / steps for Constant)
  StepSchedule schedule = StepSchedule::Constant;
  int restarts = 1;          // R ascents per sample, keeping the largest objective
  bool random_start = true;  // else start at x
  std::uint64_t seed = 0;
  S lower = -std::numeric_limits<S>::infinity();  // box the inputs live in, e.g. [0, 1]
  S upper = std::numeric_limits<S>::infinity();
};

namespace detail {

template <class S>
void validate_ascent(const char* function, const PGDOptions<S>& options) {
  require_nonnegative(function, "options.gamma", options.gamma);
  require_finite(function, "options.gamma", options.gamma);
  require_enumerator(function, "options.norm", options.norm, 2);
  require_nonnegative(function, "options.steps", options.steps);
  require(options.steps > 0 || options.gamma == S(0), function, "options.steps", "a value > 0 when gamma > 0",
          options.steps);
  require_nonnegative(function, "options.step_size", options.step_size);
  require_finite(function, "options.step_size", options.step_size);
  require_enumerator(function, "options.schedule", options.schedule, 2);
  require(options.restarts >= 1, function, "options.restarts", "a value >= 1", options.restarts);
  require(options.lower <= options.upper, function, "options.lower", "a value <= options.upper", options.lower);
}

template <Model M, class DT, class DX>
void validate_inputs(const char* function, const M& model, const Eigen::MatrixBase<DT>& theta,
                     const Eigen::MatrixBase<DX>& X) {
  require_size(function, "theta", theta.size(), model.num_params(), "entries (num_params)");
  require_nonempty(function, "X", X.rows());
  require_size(function, "X", X.cols(), model.num_inputs(), "columns (num_inputs)");
}

template <Model M, class DT, class DX, class DY>
void validate_batch(const char* function, const M& model, const Eigen::MatrixBase<DT>& theta,
                    const Eigen::MatrixBase<DX>& X, const Eigen::MatrixBase<DY>& y) {
  validate_inputs(function, model, theta, X);
  require_size(function, "labels", y.size(), X.rows(), "entries (rows of X)");
  require_labels(function, "labels", y, model.num_outputs());
}

// The buffers of one ascent, kept by callers that ascend repeatedly at one shape.
template <class S>
struct AscentScratch {
  RowMatrix<S> X_try, Z, dZ, dX;
  Vector<S> f, best;
  Eigen::Matrix<S, 1, Eigen::Dynamic> v;  // one row's l_2 step
};

// Each row of X_adv uniform in the ball of the given radius around the same row of X.
template <class S, class DX>
void uniform_in_ball(const Eigen::MatrixBase<DX>& X, PerturbationNorm norm, S radius, SplitMix64& rng,
                     RowMatrix<S>& X_adv) {
  X_adv = X;
  if (norm == PerturbationNorm::Linf) {
    for (Index k = 0; k < X_adv.size(); ++k) X_adv.data()[k] += radius * static_cast<S>(2 * rng.uniform() - 1);
    return;
  }
  // A Gaussian direction (Box-Muller) at distance radius * U^(1/D): uniform in volume.
  const Index D = X.cols();
  Vector<double> direction(D);
  for (Index i = 0; i < X.rows(); ++i) {
    for (Index k = 0; k < D; k += 2) {
      const double r = std::sqrt(-2 * std::log(1 - rng.uniform())), angle = 2 * std::numbers::pi * rng.uniform();
      direction(k) = r * std::cos(angle);
      if (k + 1 < D) direction(k + 1) = r * std::sin(angle);
    }
    const double length = direction.norm();
    if (length > 0) direction *= std::pow(rng.uniform(), 1 / double(D)) / length;
    X_adv.row(i) += radius * direction.cast<S>().transpose();
  }
}

// X_adv onto the ball around X, then into the box; the box keeps x' in the ball when x is in it.
// l_2 lengths are taken in radii, (x' - x) / gamma: near the largest scalar, gamma's multiples overflow.
template <class S, class DX>
void project(const Eigen::MatrixBase<DX>& X, const PGDOptions<S>& options, RowMatrix<S>& X_adv) {
  const S gamma = options.gamma;
  if (options.norm == PerturbationNorm::Linf) {
    X_adv.array() = X_adv.array().max(X.array() - gamma).min(X.array() + gamma);
  } else {
    for (Index i = 0; i < X.rows(); ++i) {
      const auto offset = (X_adv.row(i) - X.row(i)) / gamma;
      if (const S length = offset.norm(); length > 1) X_adv.row(i) = X.row(i) + gamma * (offset / length).eval();
    }
  }
  X_adv = X_adv.cwiseMax(options.lower).cwiseMin(options.upper);
}

// One projected ascent from a point uniform in the ball of radius start_radius around x.
// Steps may be infinite (a huge radius over few steps): they never multiply a zero.
template <Model M, class DT, class DX, class Objective>
void ascend(const M& model, const Eigen::MatrixBase<DT>& theta, const Eigen::MatrixBase<DX>& X,
            const PGDOptions<typename M::Scalar>& options, typename M::Scalar start_radius, SplitMix64& rng,
            Objective& objective, RowMatrix<typename M::Scalar>& X_adv, AscentScratch<typename M::Scalar>& scratch) {
  using S = typename M::Scalar;
  const S gamma = options.gamma;
  const int K = options.steps;
  if (start_radius > S(0)) {
    uniform_in_ball(X, options.norm, start_radius, rng, X_adv);
  } else {
    X_adv = X;
  }
  project(X, options, X_adv);
  if (gamma == S(0)) return;
  const bool cosine = options.schedule == StepSchedule::Cosine;
  const S base = options.step_size > 0 ? options.step_size : cosine ? gamma + gamma : S(2.5) * gamma / S(K);
  for (int t = 0; t < K; ++t) {
    const S step = cosine ? base * static_cast<S>((1 + std::cos(std::numbers::pi * t / K)) / 2) : base;
    model.predict(theta.derived(), X_adv, scratch.Z);
    objective(std::as_const(scratch.Z), scratch.dZ, scratch.f);
    model.vjp_inputs(theta.derived(), X_adv, scratch.dZ, scratch.dX);
    if (options.norm == PerturbationNorm::Linf) {  // x' += step sign(g), as a loop the compiler vectorizes
      S* x = X_adv.data();
      const S* g = scratch.dX.data();
      for (Index k = 0; k < X_adv.size(); ++k) x[k] += g[k] > 0 ? step : g[k] < 0 ? -step : S(0);
    } else {
      // In radii: v = (x' - x) / gamma + r g / ||g||, r = step / gamma, so that nothing overflows.
      // For r > 2 the sum surely leaves the ball and only its direction counts: v / r is used.
      const S radii = step / gamma;
      auto& v = scratch.v;
      for (Index i = 0; i < X.rows(); ++i) {
        const S length = scratch.dX.row(i).stableNorm();
        if (!(length > 0)) continue;
        const auto unit = scratch.dX.row(i) / length;
        const auto offset = (X_adv.row(i) - X.row(i)) / gamma;
        v = radii <= 2 ? (offset + radii * unit).eval() : (offset / radii + unit).eval();
        const S norm = v.norm();
        X_adv.row(i) = X.row(i) + gamma * (norm > 1 ? (v / norm).eval() : v);
      }
    }
    project(X, options, X_adv);
  }
}

// Projected gradient ascent on sum_i f_i(h(x'_i)) over ||x'_i - x_i|| <= gamma and the box
// [lower, upper]. objective(Z', dZ', f) writes df_i / dh(x'_i) into the rows of dZ' and f_i
// into f. The first start is x plus a uniform point of the ball of radius start_radius, drawn
// from options.seed; each further start (restarts > 1) is uniform in the whole ball, from its
// own stream of the seed, and each sample keeps the x' of its largest f_i.
template <Model M, class DT, class DX, class Objective>
void projected_gradient_ascent(const M& model, const Eigen::MatrixBase<DT>& theta, const Eigen::MatrixBase<DX>& X,
                               const PGDOptions<typename M::Scalar>& options, typename M::Scalar start_radius,
                               Objective&& objective, RowMatrix<typename M::Scalar>& X_adv,
                               AscentScratch<typename M::Scalar>& scratch) {
  const Index n = X.rows();
  scratch.Z.resize(n, model.num_outputs());
  scratch.dZ.resize(n, model.num_outputs());
  scratch.dX.resize(n, X.cols());
  scratch.f.resize(n);
  scratch.best.resize(n);
  X_adv.resize(n, X.cols());
  for (int r = 0; r < options.restarts; ++r) {
    SplitMix64 rng = r == 0 ? SplitMix64(options.seed) : SplitMix64::stream(options.seed, std::uint64_t(r));
    RowMatrix<typename M::Scalar>& X_try = r == 0 ? X_adv : scratch.X_try;
    ascend(model, theta, X, options, r == 0 ? start_radius : options.gamma, rng, objective, X_try, scratch);
    if (options.restarts == 1) return;
    model.predict(theta.derived(), X_try, scratch.Z);
    if (r == 0) {
      objective(std::as_const(scratch.Z), scratch.dZ, scratch.best);
      continue;
    }
    objective(std::as_const(scratch.Z), scratch.dZ, scratch.f);
    for (Index i = 0; i < n; ++i) {
      if (scratch.f(i) > scratch.best(i) || std::isnan(scratch.best(i))) {
        scratch.best(i) = scratch.f(i);
        X_adv.row(i) = X_try.row(i);
      }
    }
  }
}

// The public ascents: validate the options, the box and the output, then start from x or
// anywhere in the ball. X_adv may alias X.
template <Model M, class DT, class DX, class Objective>
void checked_ascent(const char* function, const M& model, const Eigen::MatrixBase<DT>& theta,
                    const Eigen::MatrixBase<DX>& X, const PGDOptions<typename M::Scalar>& options,
                    Objective&& objective, Eigen::Ref<RowMatrix<typename M::Scalar>> X_adv) {
  using S = typename M::Scalar;
  validate_ascent(function, options);
  for (Index i = 0; i < X.rows(); ++i) {  // else the box and the ball may not meet (NaN passes: it propagates)
    for (Index j = 0; j < X.cols(); ++j) {
      const S x = X(i, j);
      require(!(x < options.lower || x > options.upper), function, "X", "entries in [options.lower, options.upper]",
              to_text(x) + " at row " + to_text(static_cast<long long>(i)));
    }
  }
  require_size(function, "X_adv", X_adv.rows(), X.rows(), "rows (rows of X)");
  require_size(function, "X_adv", X_adv.cols(), X.cols(), "columns (columns of X)");
  RowMatrix<S> ascended;
  AscentScratch<S> scratch;
  detail::projected_gradient_ascent(model, theta, X, options, options.random_start ? options.gamma : S(0),
                                    std::forward<Objective>(objective), ascended, scratch);
  X_adv = ascended;
}

// The margin loss max_{y' != y} h_y'(x') - h_y(x') and its gradient, for pgd_attack.
template <class DY>
auto margin_objective(const Eigen::MatrixBase<DY>& y) {
  return [&y](const auto& Z, auto& dZ, auto& f) {
    dZ.setZero();
    for (Index i = 0; i < Z.rows(); ++i) {
      const int label = static_cast<int>(y(i));
      Index rival = label == 0 ? 1 : 0;
      for (Index j = 0; j < Z.cols(); ++j) {
        if (j != label && Z(i, j) > Z(i, rival)) rival = j;
      }
      dZ(i, rival) = 1;
      dZ(i, label) = -1;
      f(i) = Z(i, rival) - Z(i, label);
    }
  };
}

// pgd_attack, its errors naming the public function that called it.
template <Model M, class DT, class DX, class DY>
void checked_attack(const char* function, const M& model, const Eigen::MatrixBase<DT>& theta,
                    const Eigen::MatrixBase<DX>& X, const Eigen::MatrixBase<DY>& y,
                    const PGDOptions<typename M::Scalar>& options, Eigen::Ref<RowMatrix<typename M::Scalar>> X_adv) {
  validate_batch(function, model, theta, X, y);
  require(model.num_outputs() >= 2, function, "model", "at least 2 outputs (classes)",
          static_cast<long long>(model.num_outputs()));
  checked_ascent(function, model, theta, X, options, margin_objective(y), X_adv);
}

// The smooth term of one sample from its C outputs at x' and at x: with d = adv - clean and
// u = d - d_y, returns ||u|| and writes its gradient with respect to adv into grad:
// (u - e_y sum_k u_k) / ||u||, and 0 at u = 0. u is first scaled by a power of two, exactly,
// so that its squares neither overflow nor underflow (down to denormal u). Plain loops: C is
// small (the classes).
template <class S>
S margin_change(const S* adv, const S* clean, Index C, int y, S* grad) {
  const S shift = adv[y] - clean[y];
  S largest = 0;
  for (Index k = 0; k < C; ++k) {
    grad[k] = adv[k] - clean[k] - shift;
    largest = std::max(largest, std::abs(grad[k]));
  }
  int exponent = 0;
  if (largest > 0 && largest < std::numeric_limits<S>::infinity()) std::frexp(largest, &exponent);
  S squares = 0, total = 0;
  for (Index k = 0; k < C; ++k) {
    const S u = std::ldexp(grad[k], -exponent);  // not a product by 2^-exponent: for denormals it overflows
    grad[k] = u;
    squares += u * u;
    total += u;
  }
  const S length = std::sqrt(squares);
  const S inverse = length > 0 ? S(1) / length : S(0);
  for (Index k = 0; k < C; ++k) grad[k] *= inverse;
  grad[y] -= total * inverse;
  return std::ldexp(length, exponent);
}

}  // namespace detail

// l_tau(h(x)/rho, y) + nu * sup_{x'} ||Delta_h(x', y) - Delta_h(x, y)||_2 over a gradus::Model,
// the sup taken by projected gradient ascent (a lower bound of it).
// Holds scratch buffers, so that repeated calls at a fixed shape do not allocate: use one
// object per thread.
template <class S>
class SmoothAdversarialLoss {
 public:
  using Scalar = S;
  using Options = SmoothAdversarialOptions<S>;

  explicit SmoothAdversarialLoss(const Options& options = {})
      : options_(validated(options)), comp_sum_({.tau = options.tau, .reduction = options.reduction}) {}

  const Options& options() const { return options_; }

  // The random start of the next calls; a training loop changes it every step.
  void set_seed(std::uint64_t seed) { options_.seed = seed; }

  template <Model M, class DT, class DX, class DY>
    requires std::same_as<typename M::Scalar, S>
  S value(const M& model, const Eigen::MatrixBase<DT>& theta, const Eigen::MatrixBase<DX>& X,
          const Eigen::MatrixBase<DY>& y) const {
    per_sample_.resize(X.rows());
    values(model, theta, X, y, per_sample_);
    return options_.reduction == Reduction::Mean ? per_sample_.mean() : per_sample_.sum();
  }

  // Writes the gradient of the reduced loss with respect to theta (x' held fixed).
  template <Model M, class DT, class DX, class DY>
    requires std::same_as<typename M::Scalar, S>
  S value_and_grad(const M& model, const Eigen::MatrixBase<DT>& theta, const Eigen::MatrixBase<DX>& X,
                   const Eigen::MatrixBase<DY>& y, Eigen::Ref<Vector<S>> dtheta) const {
    attack(model, theta, X, y, "SmoothAdversarialLoss::value_and_grad");
    return value_and_grad_at(model, theta, X, X_adv_, y, dtheta);
  }

  // Per-sample losses (whatever the reduction).
  template <Model M, class DT, class DX, class DY>
    requires std::same_as<typename M::Scalar, S>
  void values(const M& model, const Eigen::MatrixBase<DT>& theta, const Eigen::MatrixBase<DX>& X,
              const Eigen::MatrixBase<DY>& y, Eigen::Ref<Vector<S>> per_sample) const {
    attack(model, theta, X, y, "SmoothAdversarialLoss::values");
    values_at(model, theta, X, X_adv_, y, per_sample);
  }

  // The maximizer x' of the smooth term the inner ascent finds, one row per sample.
  template <Model M, class DT, class DX, class DY>
    requires std::same_as<typename M::Scalar, S>
  void perturb(const M& model, const Eigen::MatrixBase<DT>& theta, const Eigen::MatrixBase<DX>& X,
               const Eigen::MatrixBase<DY>& y, Eigen::Ref<RowMatrix<S>> X_adv) const {
    detail::require_size("SmoothAdversarialLoss::perturb", "X_adv", X_adv.rows(), X.rows(), "rows (rows of X)");
    detail::require_size("SmoothAdversarialLoss::perturb", "X_adv", X_adv.cols(), X.cols(), "columns (columns of X)");
    attack(model, theta, X, y, "SmoothAdversarialLoss::perturb");
    X_adv = X_adv_;
  }

  // The loss with the sup replaced by the given perturbed inputs X_adv (same shape as X).
  template <Model M, class DT, class DX, class DA, class DY>
    requires std::same_as<typename M::Scalar, S>
  void values_at(const M& model, const Eigen::MatrixBase<DT>& theta, const Eigen::MatrixBase<DX>& X,
                 const Eigen::MatrixBase<DA>& X_adv, const Eigen::MatrixBase<DY>& y,
                 Eigen::Ref<Vector<S>> per_sample) const {
    const char* function = "SmoothAdversarialLoss::values";
    predict_both(function, model, theta, X, X_adv, y);
    detail::require_size(function, "per_sample", per_sample.size(), X.rows(), "entries (rows of X)");
    comp_sum_.values(scaled_, y, per_sample);
    for (Index i = 0; i < X.rows(); ++i) {
      per_sample(i) += options_.nu * margin_change_row(i, y(i), Z_adv_, dA_);
    }
  }

  // Its gradient with respect to theta.
  template <Model M, class DT, class DX, class DA, class DY>
    requires std::same_as<typename M::Scalar, S>
  S value_and_grad_at(const M& model, const Eigen::MatrixBase<DT>& theta, const Eigen::MatrixBase<DX>& X,
                      const Eigen::MatrixBase<DA>& X_adv, const Eigen::MatrixBase<DY>& y,
                      Eigen::Ref<Vector<S>> dtheta) const {
    const char* function = "SmoothAdversarialLoss::value_and_grad";
    predict_both(function, model, theta, X, X_adv, y);
    detail::require_size(function, "dtheta", dtheta.size(), model.num_params(), "entries (num_params)");
    dZ_.resize(X.rows(), model.num_outputs());
    S total = comp_sum_.value_and_grad(scaled_, y, dZ_);
    dZ_ /= options_.rho;
    const S weight = options_.nu / (options_.reduction == Reduction::Mean ? S(X.rows()) : S(1));
    for (Index i = 0; i < X.rows(); ++i) {
      total += weight * margin_change_row(i, y(i), Z_adv_, dA_);
    }
    dA_ *= weight;
    dZ_ -= dA_;
    model.vjp_params(theta.derived(), X.derived(), dZ_, dtheta);
    dtheta_adv_.resize(dtheta.size());
    model.vjp_params(theta.derived(), X_adv.derived(), dA_, dtheta_adv_);
    dtheta += dtheta_adv_;
    return total;
  }

 private:
  // Validates the batch and fills X_adv_ with the inner ascent's maximizer.
  template <Model M, class DT, class DX, class DY>
  void attack(const M& model, const Eigen::MatrixBase<DT>& theta, const Eigen::MatrixBase<DX>& X,
              const Eigen::MatrixBase<DY>& y, const char* function) const {
    detail::validate_batch(function, model, theta, X, y);
    if (options_.nu == S(0)) {  // the term vanishes: skip the ascent
      X_adv_ = X;
      return;
    }
    Z_.resize(X.rows(), model.num_outputs());
    model.predict(theta.derived(), X.derived(), Z_);
    const S start_radius = options_.gamma * (options_.random_start ? S(1) : S(1e-3));
    auto smooth_term = [&](const RowMatrix<S>& Z_adv, RowMatrix<S>& dZ, Vector<S>& f) {
      for (Index i = 0; i < Z_adv.rows(); ++i) f(i) = margin_change_row(i, y(i), Z_adv, dZ);
    };
    detail::projected_gradient_ascent(model, theta, X, ascent_options(options_), start_radius, smooth_term, X_adv_,
                                      scratch_);
  }

  // The smooth term of row i of Z_adv against Z_, its gradient into row i of grad.
  S margin_change_row(Index i, int label, const RowMatrix<S>& Z_adv, RowMatrix<S>& grad) const {
    return detail::margin_change(Z_adv.row(i).data(), Z_.row(i).data(), Z_.cols(), label, grad.row(i).data());
  }

  // Validates and fills Z_ = h(X), Z_adv_ = h(X_adv), scaled_ = Z_ / rho, and sizes dA_.
  template <Model M, class DT, class DX, class DA, class DY>
  void predict_both(const char* function, const M& model, const Eigen::MatrixBase<DT>& theta,
                    const Eigen::MatrixBase<DX>& X, const Eigen::MatrixBase<DA>& X_adv,
                    const Eigen::MatrixBase<DY>& y) const {
    detail::validate_batch(function, model, theta, X, y);
    detail::require_size(function, "X_adv", X_adv.rows(), X.rows(), "rows (rows of X)");
    detail::require_size(function, "X_adv", X_adv.cols(), X.cols(), "columns (columns of X)");
    Z_.resize(X.rows(), model.num_outputs());
    Z_adv_.resize(X.rows(), model.num_outputs());
    dA_.resize(X.rows(), model.num_outputs());
    model.predict(theta.derived(), X.derived(), Z_);
    model.predict(theta.derived(), X_adv.derived(), Z_adv_);
    scaled_ = Z_ / options_.rho;
  }

  // The inner ascent's options (no box).
  static PGDOptions<S> ascent_options(const Options& options) {
    return {.gamma = options.gamma, .norm = options.norm, .steps = options.steps, .step_size = options.step_size,
            .schedule = options.schedule, .restarts = options.restarts, .random_start = options.random_start,
            .seed = options.seed};
  }

  // Checked before comp_sum_ is built, so that errors name this loss.
  static const Options& validated(const Options& options) {
    const char* function = "SmoothAdversarialLoss";
    detail::require_nonnegative(function, "options.tau", options.tau);
    detail::require_finite(function, "options.tau", options.tau);
    detail::require_positive(function, "options.rho", options.rho);
    detail::require_finite(function, "options.rho", options.rho);
    detail::require_nonnegative(function, "options.nu", options.nu);
    detail::require_finite(function, "options.nu", options.nu);
    detail::require_reduction(function, options.reduction);
    detail::validate_ascent(function, ascent_options(options));
    return options;
  }

  Options options_;
  CompSumLoss<S> comp_sum_;
  mutable RowMatrix<S> X_adv_, Z_, Z_adv_, scaled_, dZ_, dA_;
  mutable Vector<S> per_sample_, dtheta_adv_;
  mutable detail::AscentScratch<S> scratch_;
};

// Projected gradient ascent on sum_i f_i(h(x'_i)) over ||x'_i - x_i||_p <= gamma and the box
// [lower, upper] (X must lie in it), from x or from a uniform random point of the ball
// (random_start). output_grad(const RowMatrix<S>& Z', RowMatrix<S>& dZ') writes
// df_i / dh(x'_i), row by row; an output_grad(Z', dZ', Vector<S>& f) that also writes the f_i
// allows restarts > 1, each sample keeping its best x'. Writes X_adv (same shape as X); the
// f_i at X_adv are lower bounds of their sups.
template <Model M, class DT, class DX, class OutputGrad>
void projected_gradient_ascent(const M& model, const Eigen::MatrixBase<DT>& theta, const Eigen::MatrixBase<DX>& X,
                               const PGDOptions<typename M::Scalar>& options, OutputGrad&& output_grad,
                               Eigen::Ref<RowMatrix<typename M::Scalar>> X_adv) {
  using S = typename M::Scalar;
  const char* function = "projected_gradient_ascent";
  detail::validate_inputs(function, model, theta, X);
  if constexpr (std::invocable<OutputGrad&, const RowMatrix<S>&, RowMatrix<S>&, Vector<S>&>) {
    detail::checked_ascent(function, model, theta, X, options, output_grad, X_adv);
  } else {
    detail::require(options.restarts == 1, function, "options.restarts",
                    "1 when output_grad writes no objective values (pass output_grad(Z, dZ, f))", options.restarts);
    auto gradient_only = [&](const RowMatrix<S>& Z, RowMatrix<S>& dZ, Vector<S>&) { output_grad(Z, dZ); };
    detail::checked_ascent(function, model, theta, X, options, gradient_only, X_adv);
  }
}

// Adversarial inputs for evaluation: projected gradient ascent on the margin loss
// max_{y' != y} h_y'(x') - h_y(x'), whose value at X_adv is a lower bound of its sup.
template <Model M, class DT, class DX, class DY>
void pgd_attack(const M& model, const Eigen::MatrixBase<DT>& theta, const Eigen::MatrixBase<DX>& X,
                const Eigen::MatrixBase<DY>& y, const PGDOptions<typename M::Scalar>& options,
                Eigen::Ref<RowMatrix<typename M::Scalar>> X_adv) {
  detail::checked_attack("pgd_attack", model, theta, X, y, options, X_adv);
}

// Fraction of rows of X still classified correctly (argmax of h at the label) after pgd_attack:
// an upper bound of the robust accuracy.
template <Model M, class DT, class DX, class DY>
double robust_accuracy(const M& model, const Eigen::MatrixBase<DT>& theta, const Eigen::MatrixBase<DX>& X,
                       const Eigen::MatrixBase<DY>& y, const PGDOptions<typename M::Scalar>& options) {
  using S = typename M::Scalar;
  RowMatrix<S> X_adv(X.rows(), X.cols()), Z(X.rows(), model.num_outputs());
  detail::checked_attack("robust_accuracy", model, theta, X, y, options, X_adv);
  model.predict(theta.derived(), X_adv, Z);
  Index correct = 0;
  for (Index i = 0; i < Z.rows(); ++i) {
    Index best;
    Z.row(i).maxCoeff(&best);
    correct += best == y(i);
  }
  return static_cast<double>(correct) / static_cast<double>(Z.rows());
}

}  // namespace gradus
