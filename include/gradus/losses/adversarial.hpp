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
// For evaluation, pgd_attack runs projected gradient ascent (public, for other objectives
// such as TRADES' KL term too) on the margin loss max_{y' != y} h_y'(x') - h_y(x') (the
// "PGD margin" attack of Rice et al. 2020, which the paper evaluates with), optionally inside
// a box such as pixels in [0, 1]; robust_accuracy is the accuracy on its output.
//
//   gradus::SmoothAdversarialLoss<float> loss({.nu = 1, .gamma = 0.1f, .steps = 10});
//   float value = loss.value_and_grad(model, theta, X, y, dtheta);   // any gradus::Model
//   float robust = gradus::robust_accuracy(model, theta, X, y, {.gamma = 0.1f, .steps = 20});

#include <algorithm>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <limits>
#include <utility>

#include "gradus/core/concepts.hpp"
#include "gradus/core/errors.hpp"
#include "gradus/core/random.hpp"
#include "gradus/core/types.hpp"
#include "gradus/losses/comp_sum.hpp"

namespace gradus {

enum class PerturbationNorm { Linf, L2 };

template <class S>
struct SmoothAdversarialOptions {
  S tau = 1;                 // comp-sum parameter (the paper's experiments use 1: logistic)
  S rho = 1;                 // margin scale: the comp-sum term sees h / rho
  S nu = 1;                  // weight of the smooth term (not given by the paper's notes)
  S gamma = S(8) / S(255);   // radius of the perturbation ball (the usual CIFAR l_inf value)
  PerturbationNorm norm = PerturbationNorm::Linf;
  int steps = 10;            // projected gradient ascent steps K
  S step_size = 0;           // 0: 2.5 gamma / steps (Madry et al. 2018)
  bool random_start = true;  // start anywhere in the ball, else next to x
  std::uint64_t seed = 0;
  Reduction reduction = Reduction::Mean;  // None: value() gives the sum, as CompSumLoss
};

template <class S>
struct PGDOptions {
  S gamma = S(8) / S(255);
  PerturbationNorm norm = PerturbationNorm::Linf;
  int steps = 20;
  S step_size = 0;           // 0: 2.5 gamma / steps
  bool random_start = true;  // else start at x
  std::uint64_t seed = 0;
  S lower = -std::numeric_limits<S>::infinity();  // box the inputs live in, e.g. [0, 1]
  S upper = std::numeric_limits<S>::infinity();
};

namespace detail {

template <class S>
void validate_ball(const char* function, S gamma, int steps, S step_size) {
  require_nonnegative(function, "options.gamma", gamma);
  require_finite(function, "options.gamma", gamma);
  require_nonnegative(function, "options.steps", steps);
  require(steps > 0 || gamma == S(0), function, "options.steps", "a value > 0 when gamma > 0", steps);
  require_nonnegative(function, "options.step_size", step_size);
  require_finite(function, "options.step_size", step_size);
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

// Projected gradient ascent on sum_i f_i(h(x'_i)) over ||x'_i - x_i|| <= gamma and the box
// [lower, upper]; output_grad(Z', dZ') writes df_i / dh(x'_i) row by row. Starts from x plus
// uniform noise of half-width start_radius (then projected), drawn from options.seed.
template <Model M, class DT, class DX, class OutputGrad>
void projected_gradient_ascent(const M& model, const Eigen::MatrixBase<DT>& theta, const Eigen::MatrixBase<DX>& X,
                               const PGDOptions<typename M::Scalar>& options,
                               typename M::Scalar start_radius, OutputGrad&& output_grad,
                               RowMatrix<typename M::Scalar>& X_adv, RowMatrix<typename M::Scalar>& Z_adv,
                               RowMatrix<typename M::Scalar>& dZ, RowMatrix<typename M::Scalar>& dX) {
  using S = typename M::Scalar;
  const S gamma = options.gamma;
  const S step = options.step_size > 0 ? options.step_size : S(2.5) * gamma / S(std::max(options.steps, 1));
  X_adv.resize(X.rows(), X.cols());
  Z_adv.resize(X.rows(), model.num_outputs());
  dZ.resize(X.rows(), model.num_outputs());
  dX.resize(X.rows(), X.cols());
  const bool linf = options.norm == PerturbationNorm::Linf;
  auto project = [&] {
    if (linf) {
      X_adv.array() = X_adv.array().max(X.array() - gamma).min(X.array() + gamma);
    } else {
      for (Index i = 0; i < X.rows(); ++i) {
        if (const S length = (X_adv.row(i) - X.row(i)).norm(); length > gamma) {
          X_adv.row(i) = X.row(i) + (gamma / length) * (X_adv.row(i) - X.row(i));
        }
      }
    }
    X_adv = X_adv.cwiseMax(options.lower).cwiseMin(options.upper);
  };
  X_adv = X;
  if (start_radius > S(0)) {
    detail::SplitMix64 rng(options.seed);
    for (Index k = 0; k < X_adv.size(); ++k) X_adv.data()[k] += start_radius * static_cast<S>(2 * rng.uniform() - 1);
  }
  project();
  if (gamma == S(0)) return;
  for (int t = 0; t < options.steps; ++t) {
    model.predict(theta.derived(), X_adv, Z_adv);
    output_grad(std::as_const(Z_adv), dZ);
    model.vjp_inputs(theta.derived(), X_adv, dZ, dX);
    if (linf) {  // x' += step sign(g), as a loop the compiler vectorizes (Eigen's sign() is scalar)
      S* x = X_adv.data();
      const S* g = dX.data();
      for (Index k = 0; k < X_adv.size(); ++k) x[k] += step * (S(g[k] > 0) - S(g[k] < 0));
    } else {
      for (Index i = 0; i < X.rows(); ++i) {
        if (const S length = dX.row(i).norm(); length > 0) X_adv.row(i) += (step / length) * dX.row(i);
      }
    }
    project();
  }
}

// The public ascent: validates the options and the output, and starts from x or anywhere in the ball.
template <Model M, class DT, class DX, class OutputGrad>
void checked_ascent(const char* function, const M& model, const Eigen::MatrixBase<DT>& theta,
                    const Eigen::MatrixBase<DX>& X, const PGDOptions<typename M::Scalar>& options,
                    OutputGrad&& output_grad, Eigen::Ref<RowMatrix<typename M::Scalar>> X_adv) {
  using S = typename M::Scalar;
  validate_ball(function, options.gamma, options.steps, options.step_size);
  require(options.lower <= options.upper, function, "options.lower", "a value <= options.upper", options.lower);
  require_size(function, "X_adv", X_adv.rows(), X.rows(), "rows (rows of X)");
  require_size(function, "X_adv", X_adv.cols(), X.cols(), "columns (columns of X)");
  RowMatrix<S> ascended, Z, dZ, dX;
  detail::projected_gradient_ascent(model, theta, X, options, options.random_start ? options.gamma : S(0),
                                    std::forward<OutputGrad>(output_grad), ascended, Z, dZ, dX);
  X_adv = ascended;
}

// The smooth term of one sample from its C outputs at x' and at x: with d = adv - clean and
// u = d - d_y, returns ||u|| and writes its gradient with respect to adv into grad:
// (u - e_y sum_k u_k) / ||u||, and 0 at u = 0. Plain loops: C is small (the classes).
template <class S>
S margin_change(const S* adv, const S* clean, Index C, int y, S* grad) {
  const S shift = adv[y] - clean[y];
  S squares = 0, total = 0;
  for (Index k = 0; k < C; ++k) {
    const S u = adv[k] - clean[k] - shift;
    grad[k] = u;
    squares += u * u;
    total += u;
  }
  const S length = std::sqrt(squares);
  const S inverse = length > 0 ? S(1) / length : S(0);
  for (Index k = 0; k < C; ++k) grad[k] *= inverse;
  grad[y] -= total * inverse;
  return length;
}

}  // namespace detail

// l_tau(h(x)/rho, y) + nu * sup_{x'} ||Delta_h(x', y) - Delta_h(x, y)||_2 over a gradus::Model.
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
    const PGDOptions<S> ascent{.gamma = options_.gamma, .norm = options_.norm, .steps = options_.steps,
                               .step_size = options_.step_size, .random_start = options_.random_start,
                               .seed = options_.seed};
    const S start_radius = options_.gamma * (options_.random_start ? S(1) : S(1e-3));
    auto smooth_term_grad = [&](const RowMatrix<S>& Z_adv, RowMatrix<S>& dZ) {
      for (Index i = 0; i < Z_adv.rows(); ++i) margin_change_row(i, y(i), Z_adv, dZ);
    };
    detail::projected_gradient_ascent(model, theta, X, ascent, start_radius, smooth_term_grad, X_adv_, Z_adv_, dA_,
                                      dX_);
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

  // Checked before comp_sum_ is built, so that errors name this loss.
  static const Options& validated(const Options& options) {
    const char* function = "SmoothAdversarialLoss";
    detail::require_nonnegative(function, "options.tau", options.tau);
    detail::require_finite(function, "options.tau", options.tau);
    detail::require_positive(function, "options.rho", options.rho);
    detail::require_finite(function, "options.rho", options.rho);
    detail::require_nonnegative(function, "options.nu", options.nu);
    detail::require_finite(function, "options.nu", options.nu);
    detail::validate_ball(function, options.gamma, options.steps, options.step_size);
    return options;
  }

  Options options_;
  CompSumLoss<S> comp_sum_;
  mutable RowMatrix<S> X_adv_, Z_, Z_adv_, scaled_, dZ_, dA_, dX_;
  mutable Vector<S> per_sample_, dtheta_adv_;
};

// Projected gradient ascent on sum_i f_i(h(x'_i)) over ||x'_i - x_i||_p <= gamma and the box
// [lower, upper], from x or from a uniform random point of the ball (random_start).
// output_grad(const RowMatrix<S>& Z', RowMatrix<S>& dZ') writes df_i / dh(x'_i), row by row.
// Writes X_adv (same shape as X).
template <Model M, class DT, class DX, class OutputGrad>
void projected_gradient_ascent(const M& model, const Eigen::MatrixBase<DT>& theta, const Eigen::MatrixBase<DX>& X,
                               const PGDOptions<typename M::Scalar>& options, OutputGrad&& output_grad,
                               Eigen::Ref<RowMatrix<typename M::Scalar>> X_adv) {
  detail::validate_inputs("projected_gradient_ascent", model, theta, X);
  detail::checked_ascent("projected_gradient_ascent", model, theta, X, options,
                         std::forward<OutputGrad>(output_grad), X_adv);
}

// Adversarial inputs for evaluation: projected gradient ascent on the margin loss
// max_{y' != y} h_y'(x') - h_y(x').
template <Model M, class DT, class DX, class DY>
void pgd_attack(const M& model, const Eigen::MatrixBase<DT>& theta, const Eigen::MatrixBase<DX>& X,
                const Eigen::MatrixBase<DY>& y, const PGDOptions<typename M::Scalar>& options,
                Eigen::Ref<RowMatrix<typename M::Scalar>> X_adv) {
  using S = typename M::Scalar;
  const char* function = "pgd_attack";
  detail::validate_batch(function, model, theta, X, y);
  detail::require(model.num_outputs() >= 2, function, "model", "at least 2 outputs (classes)",
                  static_cast<long long>(model.num_outputs()));
  auto margin_grad = [&](const RowMatrix<S>& Z, RowMatrix<S>& dZ) {
    dZ.setZero();
    for (Index i = 0; i < Z.rows(); ++i) {
      const int label = static_cast<int>(y(i));
      Index rival = label == 0 ? 1 : 0;
      for (Index j = 0; j < Z.cols(); ++j) {
        if (j != label && Z(i, j) > Z(i, rival)) rival = j;
      }
      dZ(i, rival) = 1;
      dZ(i, label) = -1;
    }
  };
  detail::checked_ascent(function, model, theta, X, options, margin_grad, X_adv);
}

// Fraction of rows of X still classified correctly (argmax of h at the label) after pgd_attack.
template <Model M, class DT, class DX, class DY>
double robust_accuracy(const M& model, const Eigen::MatrixBase<DT>& theta, const Eigen::MatrixBase<DX>& X,
                       const Eigen::MatrixBase<DY>& y, const PGDOptions<typename M::Scalar>& options) {
  using S = typename M::Scalar;
  RowMatrix<S> X_adv(X.rows(), X.cols()), Z(X.rows(), model.num_outputs());
  pgd_attack(model, theta, X, y, options, X_adv);
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
