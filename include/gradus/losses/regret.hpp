#pragma once
// Regret-loss (Park, Liu, Ozdaglar, Zhang, "Do LLM Agents Have Regret?", ICLR 2025,
// arXiv:2403.16843): an unsupervised loss that trains a sequence model to be a no-regret
// online learner, without labels of optimal actions.
//
// Online learning with d actions over T rounds: at round t the learner plays pi_t in the
// simplex, chosen from l_1..l_{t-1}, then sees the loss vector l_t. The regret of a sequence is
//   R = sum_t <l_t, pi_t> - min_a sum_t l_{t,a}.
// Over k sequences sampled from a distribution, with h continuous and non-decreasing and
// f(., N) positive and increasing (f(R1, N) / f(R2, N) -> infinity as N grows when R1 > R2),
//   L = sum_j h(R_j) f(R_j, N) / sum_j f(R_j, N).
// Defaults: h(R) = max(R, 0)^2 and f = exp(N R), so the weights w = softmax(N R) are a soft-max
// over the k sequences: N = 0 gives the mean of h(R_j), N = +infinity gives h(max_j R_j), the
// limit for every admissible f (ties share the weight). N is any value in [0, +infinity]; where
// log f = N R overflows S the loss is that same limit, which S cannot tell from it. The gradient
// is at most |h'| + N times the spread of h(R) over the sequences, and overflows only beyond S.
//
// f is given in the log domain (log f and its R-derivative) so the weights w_j = f_j / sum f are a
// max-shifted softmax of log f. Gradients:
//   dL/dR_j = w_j [h'(R_j) + (log f)'(R_j) (h(R_j) - L)]     (with f = exp(N R): (log f)' = N)
//   dR_j/dpi_t = l_t    (the comparator does not depend on the policies)
//   through pi = softmax(z):  d<l, pi>/dz = pi .* (l - <l, pi>).
//
// Layout: k sequences of T rounds stacked in rows. Losses and policies (or logits) are (k T) x d
// row-major, sequence j in rows [j T, (j + 1) T); row t holds l_t and the pi_t played at round t.
// Non-finite inputs propagate: a NaN regret anywhere makes the loss and its gradient NaN.

#include <cmath>
#include <functional>
#include <limits>
#include <string_view>
#include <type_traits>
#include <utility>

#include <Eigen/Core>

#include "gradus/core/errors.hpp"
#include "gradus/core/types.hpp"
#include "gradus/kernels/logistic.hpp"

namespace gradus {

// h and h': the penalty of one sequence's regret. Continuous and non-decreasing.
template <class S>
struct RegretPenalty {
  std::function<S(S)> value = [](S r) { return r > 0 ? r * r : S(0); };
  std::function<S(S)> derivative = [](S r) { return r > 0 ? 2 * r : S(0); };
};

// f(R, N) in the log domain: log f(R, N) and its derivative in R. Default f = exp(N R).
template <class S>
struct RegretWeighting {
  std::function<S(S, S)> log_value = [](S r, S N) { return N * r; };
  std::function<S(S, S)> log_derivative = [](S, S N) { return N; };
};

template <class S>
struct RegretLossOptions {
  S N = 1;                    // sharpness of the soft-max over sequences: 0 the mean, +infinity the max;
                              // 0 or in [min, +infinity]
  RegretPenalty<S> h = {};    // default max(R, 0)^2
  RegretWeighting<S> f = {};  // default exp(N R)
  bool from_logits = false;   // the second input holds logits z, pi = softmax(z) row by row
};

namespace detail {

// Stacked sequences of `rounds` rows: at least one, whole, with at least one action. Returns k.
inline Index require_sequences(std::string_view function, std::string_view argument, Index rows, Index cols,
                               Index rounds) {
  require_positive(function, "rounds", rounds);
  require(rows > 0, function, argument, "at least one sequence (k >= 1)", "0 rows (k = 0)");
  require_nonempty(function, argument, cols, "columns (actions)");
  require(rows % rounds == 0, function, argument,
          "a number of rows divisible by rounds = " + to_text(rounds) + " (k sequences of T rounds)", rows);
  return rows / rounds;
}

inline void require_shape(std::string_view function, std::string_view argument, Index rows, Index cols,
                          Index expected_rows, Index expected_cols) {
  require_size(function, argument, rows, expected_rows, "rows");
  require_size(function, argument, cols, expected_cols, "columns");
}

// Rows on the probability simplex up to rounding: within 1e-4, loose enough for float policies
// cast to double. NaN passes and propagates.
template <class S>
void require_simplex_rows(std::string_view function, std::string_view argument,
                          const Eigen::Ref<const RowMatrix<S>>& policies) {
  const S tolerance = S(1e-4);
  for (Index r = 0; r < policies.rows(); ++r) {
    const S sum = policies.row(r).sum(), lowest = policies.row(r).minCoeff();
    if (std::abs(sum - 1) > tolerance || lowest < -tolerance) {
      throw_invalid_argument(function, argument,
                             "rows on the probability simplex (entries >= 0 summing to 1; "
                             "pass logits with from_logits = true)",
                             "row " + to_text(r) + " with sum " + to_text(sum) + " and smallest entry " +
                                 to_text(lowest));
    }
  }
}

// In place: z <- softmax(z) row by row, max-shifted. When the rows are contiguous the exp runs
// over the whole block at once: rows of a few actions are too short to vectorize alone. The exp
// is pexp_nonpositive's: Eigen's stops at ~1e-308 (double) where the probability is 0.
template <class S>
void softmax_rows_in_place(Eigen::Ref<RowMatrix<S>> z) {
  const Index d = z.cols();
  for (Index r = 0; r < z.rows(); ++r) {
    S* row = z.row(r).data();
    const S max = Eigen::Map<const Vector<S>>(row, d).maxCoeff();
    for (Index a = 0; a < d; ++a) row[a] -= max;
  }
  if (z.outerStride() == d) {
    exp_nonpositive_in_place(z.data(), z.size());
  } else {
    for (Index r = 0; r < z.rows(); ++r) exp_nonpositive_in_place(z.row(r).data(), d);
  }
  for (Index r = 0; r < z.rows(); ++r) {
    S* row = z.row(r).data();
    const S inverse = 1 / Eigen::Map<const Vector<S>>(row, d).sum();
    for (Index a = 0; a < d; ++a) row[a] *= inverse;
  }
}

// In place: each row becomes the sum of the rows before it in its sequence (after it, when
// reversed). Cumulative losses of l_1..l_{t-1}, or of gradients flowing back from later rounds.
template <class S>
void exclusive_sums(Eigen::Ref<RowMatrix<S>> rows, Index rounds, bool reversed = false) {
  for (Index start = 0; start < rows.rows(); start += rounds) {
    auto at = [&](Index t) { return rows.row(start + (reversed ? rounds - 1 - t : t)); };
    for (Index t = 1; t < rounds; ++t) at(t) += at(t - 1);
    for (Index t = rounds - 1; t > 0; --t) at(t) = at(t - 1);
    at(0).setZero();
  }
}

// <x, y> of two rows of d entries.
template <class S>
S row_dot(const S* x, const S* y, Index d) {
  return Eigen::Map<const Vector<S>>(x, d).dot(Eigen::Map<const Vector<S>>(y, d));
}

// R = sum_t <l_t, pi_t> - min_a sum_t l_{t,a} of one sequence (T x d); totals: d entries of scratch.
template <class S>
S sequence_regret(const Eigen::Ref<const RowMatrix<S>>& losses, const Eigen::Ref<const RowMatrix<S>>& policies,
                  Vector<S>& totals) {
  const Index d = losses.cols();
  S learner = 0;
  totals.setZero();
  for (Index t = 0; t < losses.rows(); ++t) {
    const S* l = losses.row(t).data();
    learner += row_dot(l, policies.row(t).data(), d);
    for (Index a = 0; a < d; ++a) totals[a] += l[a];
  }
  return learner - totals.minCoeff();
}

// The regrets R_j of k stacked sequences.
template <class S>
void sequence_regrets(const Eigen::Ref<const RowMatrix<S>>& losses, const Eigen::Ref<const RowMatrix<S>>& policies,
                      Index rounds, Eigen::Ref<Vector<S>> regrets) {
  Vector<S> totals(losses.cols());
  for (Index j = 0; j < regrets.size(); ++j) {
    regrets(j) = sequence_regret<S>(losses.middleRows(j * rounds, rounds), policies.middleRows(j * rounds, rounds),
                                    totals);
  }
}

// The same for the policies softmax(logits), a sequence at a time while it is in cache. The
// policies go to `policies`: all of them ((k T) x d), or only the last sequence's (T x d scratch).
template <class S>
void sequence_regrets_of_logits(const Eigen::Ref<const RowMatrix<S>>& losses,
                                const Eigen::Ref<const RowMatrix<S>>& logits, Index rounds,
                                Eigen::Ref<RowMatrix<S>> policies, Eigen::Ref<Vector<S>> regrets) {
  Vector<S> totals(losses.cols());
  const bool keep = policies.rows() == logits.rows();
  for (Index j = 0; j < regrets.size(); ++j) {
    auto pi = policies.middleRows(keep ? j * rounds : 0, rounds);
    pi = logits.middleRows(j * rounds, rounds);
    softmax_rows_in_place<S>(pi);
    regrets(j) = sequence_regret<S>(losses.middleRows(j * rounds, rounds), pi, totals);
  }
}

}  // namespace detail

// Regrets of k stacked sequences of `rounds` rounds each, written into `regrets` (k).
template <class DL, class DP>
void regret(const Eigen::MatrixBase<DL>& losses, const Eigen::MatrixBase<DP>& policies, Index rounds,
            Eigen::Ref<Vector<typename DL::Scalar>> regrets) {
  using S = typename DL::Scalar;
  static_assert(std::is_same_v<S, typename DP::Scalar>, "gradus::regret: losses and policies differ in scalar type");
  const Eigen::Ref<const RowMatrix<S>> l(losses), pi(policies);
  const Index k = detail::require_sequences("regret", "losses", l.rows(), l.cols(), rounds);
  detail::require_shape("regret", "policies", pi.rows(), pi.cols(), l.rows(), l.cols());
  detail::require_size("regret", "regrets", regrets.size(), k, "entries (one per sequence)");
  detail::require_simplex_rows<S>("regret", "policies", pi);
  detail::sequence_regrets<S>(l, pi, rounds, regrets);
}

// Regret of one sequence: losses and policies T x d.
template <class DL, class DP>
typename DL::Scalar regret(const Eigen::MatrixBase<DL>& losses, const Eigen::MatrixBase<DP>& policies) {
  Vector<typename DL::Scalar> value(1);
  regret(losses, policies, losses.rows(), value);
  return value(0);
}

// The regret-loss over k stacked sequences (see the top of this file):
//   gradus::RegretLoss<double> loss({.N = 1});
//   double L = loss.value_and_grad(losses, policies, T, dpolicies);
template <class S>
class RegretLoss {
 public:
  using Scalar = S;
  using Options = RegretLossOptions<S>;

  explicit RegretLoss(Options options = {}) : options_(std::move(options)) {
    // 0 (the mean) or a normal number up to +infinity: a denormal N weighs sequences by products
    // that keep no digits.
    detail::require(options_.N == S(0) || options_.N >= std::numeric_limits<S>::min(), "RegretLoss", "options.N",
                    "0 or a value >= " + detail::to_text(std::numeric_limits<S>::min()), options_.N);
    detail::require(options_.h.value && options_.h.derivative, "RegretLoss", "options.h",
                    "both value and derivative set", "an empty function");
    detail::require(options_.f.log_value && options_.f.log_derivative, "RegretLoss", "options.f",
                    "both log_value and log_derivative set", "an empty function");
  }

  const Options& options() const { return options_; }

  // losses and policies (or logits): (k T) x d; rounds: T.
  S value(const Eigen::Ref<const RowMatrix<S>>& losses, const Eigen::Ref<const RowMatrix<S>>& policies,
          Index rounds) const {
    const Index k = check("RegretLoss::value", losses, policies, rounds);
    Vector<S> regrets(k);
    if (options_.from_logits) {
      RowMatrix<S> scratch(rounds, losses.cols());
      detail::sequence_regrets_of_logits<S>(losses, policies, rounds, scratch, regrets);
    } else {
      detail::sequence_regrets<S>(losses, policies, rounds, regrets);
    }
    return weigh(regrets, nullptr);
  }

  // Writes dL/dpolicies (or dL/dlogits) into grad, (k T) x d, and returns L. grad may alias the
  // policies (or logits).
  S value_and_grad(const Eigen::Ref<const RowMatrix<S>>& losses, const Eigen::Ref<const RowMatrix<S>>& policies,
                   Index rounds, Eigen::Ref<RowMatrix<S>> grad) const {
    const Index k = check("RegretLoss::value_and_grad", losses, policies, rounds);
    detail::require_shape("RegretLoss::value_and_grad", "grad", grad.rows(), grad.cols(), losses.rows(),
                          losses.cols());
    Vector<S> regrets(k), dregrets(k);
    if (options_.from_logits) {  // grad holds pi until the last pass
      detail::sequence_regrets_of_logits<S>(losses, policies, rounds, grad, regrets);
    } else {
      detail::sequence_regrets<S>(losses, policies, rounds, regrets);
    }
    const S loss = weigh(regrets, &dregrets);
    const Index d = losses.cols();
    for (Index r = 0; r < losses.rows(); ++r) {
      const S dR = dregrets(r / rounds);
      const S* l = losses.row(r).data();
      S* g = grad.row(r).data();
      if (options_.from_logits) {  // g holds pi
        const S learner_loss = detail::row_dot(l, g, d);
        for (Index a = 0; a < d; ++a) g[a] = dR * g[a] * (l[a] - learner_loss);
      } else {
        for (Index a = 0; a < d; ++a) g[a] = dR * l[a];
      }
    }
    return loss;
  }

 private:
  Index check(std::string_view function, const Eigen::Ref<const RowMatrix<S>>& losses,
              const Eigen::Ref<const RowMatrix<S>>& policies, Index rounds) const {
    const std::string_view name = options_.from_logits ? "logits" : "policies";
    const Index k = detail::require_sequences(function, "losses", losses.rows(), losses.cols(), rounds);
    detail::require_shape(function, name, policies.rows(), policies.cols(), losses.rows(), losses.cols());
    if (!options_.from_logits) detail::require_simplex_rows<S>(function, name, policies);
    return k;
  }

  // L from the regrets; dL/dR_j into *dregrets when given.
  S weigh(const Vector<S>& regrets, Vector<S>* dregrets) const {
    const S N = options_.N;
    const auto& h = options_.h;
    const auto& f = options_.f;
    auto not_a_number = [&] {
      if (dregrets) dregrets->setConstant(std::numeric_limits<S>::quiet_NaN());
      return std::numeric_limits<S>::quiet_NaN();
    };
    if (regrets.hasNaN()) return not_a_number();
    // The N = infinity limit, the worst sequence with ties sharing its weight.
    auto worst_sequence = [&] {
      const S worst = regrets.maxCoeff();
      if (dregrets) {
        const S share = h.derivative(worst) / S((regrets.array() == worst).count());
        *dregrets = (regrets.array() == worst).select(share, Vector<S>::Zero(regrets.size()));
      }
      return h.value(worst);
    };
    if (std::isinf(N)) return worst_sequence();
    const Index k = regrets.size();
    Vector<S> weights(k), penalties(k);
    for (Index j = 0; j < k; ++j) weights(j) = f.log_value(regrets(j), N);
    if (weights.hasNaN()) return not_a_number();
    // log f beyond S (N R overflowed): the same limit, exact in S wherever N |R| overflows.
    const S top = weights.maxCoeff();
    if (std::isinf(top)) return worst_sequence();
    for (Index j = 0; j < k; ++j) penalties(j) = h.value(regrets(j));
    // std::exp: exactly 0 far below, where a vectorized exp may leave a denormal (which, times
    // a large N, would give a losing sequence a gradient).
    weights = (weights.array() - top).unaryExpr([](S x) { return std::exp(x); });
    weights /= weights.sum();
    const S loss = weights.dot(penalties);
    if (dregrets) {
      for (Index j = 0; j < k; ++j) {  // a zero weight has no gradient, even where (log f)' is infinite
        const S w = weights(j), R = regrets(j);
        // w (h - L) before (log f)' = N: the product overflows only where the gradient does.
        (*dregrets)(j) = w == 0 ? S(0) : w * h.derivative(R) + w * (penalties(j) - loss) * f.log_derivative(R, N);
      }
    }
    return loss;
  }

  Options options_;
};

}  // namespace gradus
