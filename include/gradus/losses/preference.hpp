#pragma once
// Preference losses over pairs of sequence log-probabilities: DPO and its family (the
// loss_types of Hugging Face TRL), with the robust DPO (rDPO) of Chowdhury, Kini and
// Natarajan, "Provably Robust DPO: Aligning Language Models with Noisy Feedback", ICML 2024.
//
// Pair i has policy log-probs pc, pr of its chosen and rejected responses and reference
// log-probs rc, rr. With the log-ratios a = pc - rc, b = pr - rr, the margin h = a - b,
// t = beta h, sp(x) = log(1 + e^x) (softplus, so -log sigma(x) = sp(-x)) and
// sigma(x) = 1 / (1 + e^-x), the per-pair losses are
//
//   Sigmoid       DPO, TRL "sigmoid"             sp(-t)
//   Robust        rDPO, TRL "robust"             [(1-eps) sp(-t) - eps sp(t)] / (1-2eps)
//                                                 = sp(-t) - eps t / (1-2eps),   eps in [0, 1/2)
//   Conservative  cDPO (label smoothing eps)     (1-eps) sp(-t) + eps sp(t) = sp(-t) + eps t,  eps in [0, 1]
//   IPO           TRL "ipo"                      (h - 1/(2 beta))^2
//   Hinge         SLiC, TRL "hinge"              max(0, 1 - t)
//   ExoPair       TRL "exo_pair"                 q (log q - log(1-eps)) + (1-q)(log(1-q) - log eps),
//                                                 q = sigma(t), eps in (0, 1)
//   NcaPair       TRL "nca_pair"                 sp(-beta a) + sp(beta a)/2 + sp(beta b)/2
//   BcoPair       TRL "bco_pair"                 sp(-beta a) + sp(beta b)
//   SppoHard      TRL "sppo_hard"                (a - 1/(2 beta))^2 + (b + 1/(2 beta))^2
//   ApoZero       TRL "apo_zero"                 (1 - sigma(beta a)) + sigma(beta b)
//   ApoDown       TRL "apo_down"                 sigma(beta a) + (1 - sigma(t))
//   DiscoPOP      TRL "discopop"                 (1-m) sp(-t) + m e^-t,  m = sigma(t / tau)
//   Aot           TRL "aot"                      cDPO of delta_k = sort(pc - pr)_k - sort(rc - rr)_k
//   AotUnpaired   TRL "aot_unpaired"             cDPO of delta_k = sort(a)_k - sort(b)_k
//
// rDPO is unbiased under label flips at rate eps: (1-eps) l_rDPO(h) + eps l_rDPO(-h) = l_DPO(h).
// It is unbounded below per pair (it decreases like -eps t/(1-2eps) as t -> +inf), so on a
// separable data set its empirical minimum may not exist; keep eps at most the true flip rate.
// cDPO is biased: its minimiser keeps t at log((1-eps)/eps).
//
// Conventions follow TRL (HEAD f2cd577): the batch loss is the mean over pairs. TRL feeds IPO
// length-averaged log-probs; pass those if you want its IPO (SequenceLogProb can average).
// TRL's older bco_pair shifted rewards by a running mean; this is the current stateless one.
// TRL silently replaces eps = 0 by 1e-3 in exo_pair; here eps = 0 is an error. The Aot kinds
// couple the batch through a sort: their per-pair values are per sorted rank k, and the
// gradient flows through the sorting permutation (held constant, as in torch.sort).
//
// The reference-free mode (the two-input overloads) uses rc = rr = 0, a uniform reference.
// Gradients are of the reduced loss with respect to pc and pr, and optionally rc and rr.
// The metrics TRL logs (mean rewards beta a and beta b, margin, accuracy) come from the same pass.
//
// Options: beta in (0, S_max / K], where K bounds the slope |dl/dt| of the kind (1, except
// Robust (1-eps)/(1-2eps), ExoPair 1 + |log((1-eps)/eps)|/4, DiscoPOP 2 + 1/tau), so that every
// gradient beta l'(t) is finite; DiscoPOP's tau in (0, 1] (above 1 the loss grows exponentially
// as t -> -inf, and so does its slope); epsilon as above; kind and reduction among their
// enumerators.
// Non-finite inputs: NaN propagates to the value and the gradients. An infinite margin gives the
// DPO family its limits (like PyTorch's logsigmoid), and Hinge NaN.
// Finite inputs, DPO family (Sigmoid, Robust, Conservative, Aot, AotUnpaired): where a difference
// (pc - rc, pr - rr, the Aot keys, the margin h) or t = beta h overflows S, the batch is computed
// again in long double, where none of them can (|t| <= 4 max(S)^2 for float and double on x86,
// where long double has a wider range than double); cDPO and Aot as (1-eps) sp(-t) + eps sp(t),
// so t -> -inf gives +inf (0 at eps = 1), not inf - inf. Each value and gradient is then the
// exact one rounded to S (inf only where that exceeds S). This rare path is taken only when the
// fast pass ends with a non-finite sum of losses or of margins, so it costs the hot loop nothing.
// The other kinds: log-ratios pc - rc, pr - rr and a margin h beyond S's range count as infinite,
// and a finite margin h whose t = beta h overflows S gets each kind's limit at t = +-inf.

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

#include <Eigen/Core>

#include "gradus/core/errors.hpp"
#include "gradus/core/types.hpp"
#include "gradus/kernels/logistic.hpp"

namespace gradus {

enum class PreferenceKind {
  Sigmoid,
  Robust,
  Conservative,
  IPO,
  Hinge,
  ExoPair,
  NcaPair,
  BcoPair,
  SppoHard,
  ApoZero,
  ApoDown,
  DiscoPOP,
  Aot,
  AotUnpaired
};

template <class S>
struct PreferenceOptions {
  PreferenceKind kind = PreferenceKind::Sigmoid;
  S beta = S(0.1);            // TRL's default; the inverse temperature of the implicit reward
  S epsilon = S(0);           // flip rate (Robust), label smoothing (Conservative, Aot*, ExoPair)
  S discopop_tau = S(0.05);   // DiscoPOP's mixing temperature (TRL's default)
  Reduction reduction = Reduction::Mean;  // None: value() sums, values() gives per pair
};

// Batch means of what TRL logs as rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies.
template <class S>
struct PreferenceMetrics {
  S chosen_reward = 0;    // beta (pc - rc)
  S rejected_reward = 0;  // beta (pr - rr)
  S reward_margin = 0;    // chosen - rejected
  S reward_accuracy = 0;  // fraction of pairs with chosen > rejected
};

template <class S>
class PreferenceLoss {
 public:
  using Scalar = S;
  using Options = PreferenceOptions<S>;

  explicit PreferenceLoss(const Options& options = {}) : options_(options) { validate(options_); }

  const Options& options() const { return options_; }

  // Reduced loss (mean over pairs unless options say Sum).
  template <class PC, class PR, class RC, class RR>
  S value(const Eigen::MatrixBase<PC>& policy_chosen, const Eigen::MatrixBase<PR>& policy_rejected,
          const Eigen::MatrixBase<RC>& reference_chosen, const Eigen::MatrixBase<RR>& reference_rejected) const {
    return run("PreferenceLoss::value", policy_chosen.derived(), policy_rejected.derived(),
               reference_chosen.derived(), reference_rejected.derived(), {});
  }

  // Reference-free: rc = rr = 0.
  template <class PC, class PR>
  S value(const Eigen::MatrixBase<PC>& policy_chosen, const Eigen::MatrixBase<PR>& policy_rejected) const {
    const Index n = policy_chosen.size();
    return value(policy_chosen, policy_rejected, Vector<S>::Zero(n), Vector<S>::Zero(n));
  }

  // Per-pair losses (per sorted rank for the Aot kinds), whatever the reduction.
  template <class PC, class PR, class RC, class RR>
  void values(const Eigen::MatrixBase<PC>& policy_chosen, const Eigen::MatrixBase<PR>& policy_rejected,
              const Eigen::MatrixBase<RC>& reference_chosen, const Eigen::MatrixBase<RR>& reference_rejected,
              Eigen::Ref<Vector<S>> per_pair) const {
    detail::require_size("PreferenceLoss::values", "per_pair", per_pair.size(), policy_chosen.size(),
                         "entries (size of policy_chosen)");
    run("PreferenceLoss::values", policy_chosen.derived(), policy_rejected.derived(), reference_chosen.derived(),
        reference_rejected.derived(), {.per_pair = per_pair.data()});
  }

  template <class PC, class PR>
  void values(const Eigen::MatrixBase<PC>& policy_chosen, const Eigen::MatrixBase<PR>& policy_rejected,
              Eigen::Ref<Vector<S>> per_pair) const {
    const Index n = policy_chosen.size();
    values(policy_chosen, policy_rejected, Vector<S>::Zero(n), Vector<S>::Zero(n), per_pair);
  }

  // Value, and the gradient of the reduced loss into dpolicy_chosen and dpolicy_rejected
  // (sized by the caller); metrics, when given, from the same pass.
  template <class PC, class PR, class RC, class RR>
  S value_and_grad(const Eigen::MatrixBase<PC>& policy_chosen, const Eigen::MatrixBase<PR>& policy_rejected,
                   const Eigen::MatrixBase<RC>& reference_chosen, const Eigen::MatrixBase<RR>& reference_rejected,
                   Eigen::Ref<Vector<S>> dpolicy_chosen, Eigen::Ref<Vector<S>> dpolicy_rejected,
                   PreferenceMetrics<S>* metrics = nullptr) const {
    const Index n = policy_chosen.size();
    constexpr const char* function = "PreferenceLoss::value_and_grad";
    detail::require_size(function, "dpolicy_chosen", dpolicy_chosen.size(), n, "entries (size of policy_chosen)");
    detail::require_size(function, "dpolicy_rejected", dpolicy_rejected.size(), n, "entries (size of policy_chosen)");
    return run(function, policy_chosen.derived(), policy_rejected.derived(), reference_chosen.derived(),
               reference_rejected.derived(),
               {.dpolicy_chosen = dpolicy_chosen.data(), .dpolicy_rejected = dpolicy_rejected.data(), .metrics = metrics});
  }

  // Also the gradients with respect to the reference log-probs, for a trainable reference.
  template <class PC, class PR, class RC, class RR>
  S value_and_grad(const Eigen::MatrixBase<PC>& policy_chosen, const Eigen::MatrixBase<PR>& policy_rejected,
                   const Eigen::MatrixBase<RC>& reference_chosen, const Eigen::MatrixBase<RR>& reference_rejected,
                   Eigen::Ref<Vector<S>> dpolicy_chosen, Eigen::Ref<Vector<S>> dpolicy_rejected,
                   Eigen::Ref<Vector<S>> dreference_chosen, Eigen::Ref<Vector<S>> dreference_rejected,
                   PreferenceMetrics<S>* metrics = nullptr) const {
    const Index n = policy_chosen.size();
    constexpr const char* function = "PreferenceLoss::value_and_grad";
    detail::require_size(function, "dpolicy_chosen", dpolicy_chosen.size(), n, "entries (size of policy_chosen)");
    detail::require_size(function, "dpolicy_rejected", dpolicy_rejected.size(), n, "entries (size of policy_chosen)");
    detail::require_size(function, "dreference_chosen", dreference_chosen.size(), n,
                         "entries (size of policy_chosen)");
    detail::require_size(function, "dreference_rejected", dreference_rejected.size(), n,
                         "entries (size of policy_chosen)");
    return run(function, policy_chosen.derived(), policy_rejected.derived(), reference_chosen.derived(),
               reference_rejected.derived(),
               {.dpolicy_chosen = dpolicy_chosen.data(),
                .dpolicy_rejected = dpolicy_rejected.data(),
                .dreference_chosen = dreference_chosen.data(),
                .dreference_rejected = dreference_rejected.data(),
                .metrics = metrics});
  }

  // Reference-free value and gradient.
  template <class PC, class PR>
  S value_and_grad(const Eigen::MatrixBase<PC>& policy_chosen, const Eigen::MatrixBase<PR>& policy_rejected,
                   Eigen::Ref<Vector<S>> dpolicy_chosen, Eigen::Ref<Vector<S>> dpolicy_rejected,
                   PreferenceMetrics<S>* metrics = nullptr) const {
    const Index n = policy_chosen.size();
    return value_and_grad(policy_chosen, policy_rejected, Vector<S>::Zero(n), Vector<S>::Zero(n), dpolicy_chosen,
                          dpolicy_rejected, metrics);
  }

  // The TRL metrics alone.
  template <class PC, class PR, class RC, class RR>
  PreferenceMetrics<S> metrics(const Eigen::MatrixBase<PC>& policy_chosen, const Eigen::MatrixBase<PR>& policy_rejected,
                               const Eigen::MatrixBase<RC>& reference_chosen,
                               const Eigen::MatrixBase<RR>& reference_rejected) const {
    PreferenceMetrics<S> result;
    run("PreferenceLoss::metrics", policy_chosen.derived(), policy_rejected.derived(), reference_chosen.derived(),
        reference_rejected.derived(), {.metrics = &result});
    return result;
  }

 private:
  // Pairs go through the kernel a chunk of two SIMD packets at a time, in one pass: the
  // intermediates stay in registers, each input is read and each output written once, and
  // there are no N-sized temporaries (except the sort of the Aot kinds).
  using Packet = typename Eigen::internal::packet_traits<S>::type;
  static constexpr Index kPacket = Eigen::internal::packet_traits<S>::size;
  static constexpr Index kLanes = 2 * kPacket;
  using Chunk = Eigen::Array<S, kLanes, 1>;
  // Sums are kept per lane in S over a block of pairs, then added up in double (or wider S).
  static constexpr Index kBlock = 1024;

  // Where run() writes; null pointers are skipped.
  struct Outputs {
    S* per_pair = nullptr;
    S* dpolicy_chosen = nullptr;
    S* dpolicy_rejected = nullptr;
    S* dreference_chosen = nullptr;
    S* dreference_rejected = nullptr;
    PreferenceMetrics<S>* metrics = nullptr;
  };

  // The batch-coupled Aot kinds: a_k, b_k are sorted keys, and their gradients go back
  // through the permutations to the inputs named by the signs.
  struct Sorted {
    Vector<S> a, b;
    std::vector<Index> a_index, b_index;
  };

  static bool sorts(PreferenceKind kind) { return kind == PreferenceKind::Aot || kind == PreferenceKind::AotUnpaired; }

  static void validate(const Options& o) {
    constexpr const char* function = "PreferenceLoss";
    detail::require_enumerator(function, "options.kind", o.kind, 14);
    detail::require_reduction(function, o.reduction);
    detail::require_positive(function, "options.beta", o.beta);
    detail::require_finite(function, "options.beta", o.beta);
    switch (o.kind) {
      case PreferenceKind::Robust:
        detail::require_in_range(function, "options.epsilon (Robust needs eps < 1/2)", o.epsilon, S(0), S(0.5));
        break;
      case PreferenceKind::Conservative:
      case PreferenceKind::Aot:
      case PreferenceKind::AotUnpaired:
        detail::require_in_range(function, "options.epsilon", o.epsilon, S(0), S(1), true);
        break;
      case PreferenceKind::ExoPair:
        detail::require(o.epsilon > S(0) && o.epsilon < S(1), function, "options.epsilon",
                        "a value in (0, 1) for ExoPair (TRL uses 1e-3)", o.epsilon);
        break;
      case PreferenceKind::DiscoPOP:
        // Above 1, m e^-t grows like e^{-t (1 - 1/tau)}: the loss and its slope explode
        // together, and beta times the slope overflows where the loss is still finite.
        detail::require(o.discopop_tau > S(0) && o.discopop_tau <= S(1) && std::isfinite(1 / o.discopop_tau),
                        function, "options.discopop_tau", "a value in (0, 1] with a finite inverse",
                        o.discopop_tau);
        break;
      default:
        break;
    }
    // The gradient is beta l'(t): beta times the steepest slope must be finite.
    const S largest = std::numeric_limits<S>::max() / max_slope(o);
    detail::require(o.beta <= largest, function, "options.beta",
                    "a value <= " + detail::to_text(largest) + " (the largest S over the kind's steepest slope " +
                        detail::to_text(max_slope(o)) + ", so that gradients stay finite)",
                    o.beta);
  }

  // A bound on |dl/dt| over every t (in beta a or beta b for the unpaired kinds; IPO and
  // SppoHard, whose gradients do not scale with beta, count as 1).
  static S max_slope(const Options& o) {
    const S eps = o.epsilon;
    switch (o.kind) {
      case PreferenceKind::Robust:  // |c - sigma| <= 1 - c
        return (1 - eps) / (1 - 2 * eps);
      case PreferenceKind::ExoPair:  // sigma (1 - sigma) |t - L| <= 1/4 + |L|/4, L = log((1-eps)/eps)
        return 1 + std::abs(std::log1p(-eps) - std::log(eps)) / 4;
      case PreferenceKind::DiscoPOP:  // (1-m) sigma + m e^-t <= 2, |m' (e^-t - sp(-t))| <= 1/tau
        return 2 + 1 / o.discopop_tau;
      default:
        return 1;
    }
  }

  template <class X>
  static void require_input(const char* function, const char* argument, const X& x, Index n) {
    static_assert(X::IsVectorAtCompileTime, "gradus::PreferenceLoss: inputs must be vectors (N log-probs)");
    static_assert(std::is_same_v<typename X::Scalar, S>, "gradus::PreferenceLoss: input scalar type must be S");
    detail::require_size(function, argument, x.size(), n, "entries (size of policy_chosen)");
  }

  // sp(x) = log(1 + e^x) = max(x, 0) + log1p(e) with e = e^-|x| in (0, 1], and sigma(x), per
  // pair. As e <= 1, log1p(e) = 2 atanh(s) = 2 s sum_k s^2k / (2k + 1) with s = e/(2 + e) <= 1/3:
  // a short series without the range reduction of a general log, and accurate for tiny e.
  // sigma is the one of detail::plogistic, as on the hot path, so both paths agree bitwise.
  EIGEN_ALWAYS_INLINE static void softplus(const Chunk& x, Chunk& value, Chunk& sigmoid) {
    using namespace Eigen::internal;
    const Packet zero = pset1<Packet>(S(0)), two = pset1<Packet>(S(2));
    for (Index k = 0; k < kLanes; k += kPacket) {
      const Packet xk = ploadu<Packet>(x.data() + k);
      const auto l = detail::plogistic(xk);
      const Packet s = pdiv(l.e, padd(two, l.e)), z = pmul(s, s);
      Packet series = pset1<Packet>(S(1) / S(2 * kAtanhTerms - 1));
      for (int j = kAtanhTerms - 2; j >= 0; --j) series = pmadd(series, z, pset1<Packet>(S(1) / S(2 * j + 1)));
      pstoreu(sigmoid.data() + k, l.sigma);
      pstoreu(value.data() + k, padd(pmax(xk, zero), pmul(padd(s, s), series)));
    }
  }

  // Terms of the atanh series: up to the first k where (1/9)^k / (2k + 1), which bounds
  // z^k / (2k + 1), is below an eighth of S's rounding (float 8, double 17).
  static constexpr int kAtanhTerms = [] {
    int terms = 1;
    for (long double z = 1; z / (2 * terms - 1) > std::numeric_limits<S>::epsilon() / 8; z /= 9) ++terms;
    return terms;
  }();

  static bool in_dpo_family(PreferenceKind kind) {
    return kind == PreferenceKind::Sigmoid || kind == PreferenceKind::Robust || kind == PreferenceKind::Conservative ||
           sorts(kind);
  }

  // c of the DPO family's sp(-t) + c t.
  S dpo_linear_term() const {
    const S eps = options_.epsilon;
    return options_.kind == PreferenceKind::Sigmoid  ? S(0)
           : options_.kind == PreferenceKind::Robust ? -eps / (1 - 2 * eps)
                                                     : eps;
  }

  // The DPO family, the hot path, are all sp(-t) + c t: the DPO loss plus a linear term
  // (rDPO pushes on, cDPO holds back).
  EIGEN_ALWAYS_INLINE void dpo_family(const Chunk& a, const Chunk& b, Chunk& loss, Chunk& da, Chunk& db) const {
    const S beta = options_.beta, c = dpo_linear_term();
    const Chunk t = beta * (a - b);
    Chunk sp, sigma;
    softplus(-t, sp, sigma);
    loss = c == 0 ? sp : sp + c * t;  // DPO: no 0 * inf at infinite margins
    da = beta * (c - sigma);
    db = -da;
  }

  // The DPO family's hot path: value, gradients and metrics of the whole packets of pairs,
  // one packet at a time; the softplus terms go through SoftplusSum (a product per packet
  // instead of a log). Adds to the sums; returns the number of pairs done.
  template <class A>
  Index dpo_packets(const S* pc, const S* pr, const S* rc, const S* rr, Index n, S scale, const Outputs& out,
                    A& total, A& chosen, A& rejected, A& correct, A& margins) const {
    using namespace Eigen::internal;
    const Packet beta = pset1<Packet>(options_.beta), c = pset1<Packet>(dpo_linear_term());
    const Packet slope = pset1<Packet>(scale * options_.beta), one = pset1<Packet>(S(1)), zero = pzero(one);
    constexpr Index kStride = detail::SoftplusSum<S>::kMaxTerms * kPacket;
    const Index whole = n / kPacket * kPacket;
    for (Index block = 0; block < whole; block += kStride) {
      const Index end = std::min(whole, block + kStride);
      detail::SoftplusSum<S> softplus;
      Packet t_lanes = zero, chosen_lanes = zero, rejected_lanes = zero, correct_lanes = zero;
      for (Index i = block; i < end; i += kPacket) {
        const Packet a = psub(ploadu<Packet>(pc + i), ploadu<Packet>(rc + i));
        const Packet b = psub(ploadu<Packet>(pr + i), ploadu<Packet>(rr + i));
        const Packet t = pmul(beta, psub(a, b));
        const Packet sigma = softplus.add(pnegate(t));  // loss sp(-t) + c t
        t_lanes = padd(t_lanes, t);
        if (out.metrics) {
          chosen_lanes = padd(chosen_lanes, a);
          rejected_lanes = padd(rejected_lanes, b);
          correct_lanes = padd(correct_lanes, pand(pcmp_lt(b, a), one));
        }
        if (out.dpolicy_chosen) {
          const Packet da = pmul(slope, psub(c, sigma)), db = pnegate(da);
          pstoreu(out.dpolicy_chosen + i, da);
          pstoreu(out.dpolicy_rejected + i, db);
          if (out.dreference_chosen) pstoreu(out.dreference_chosen + i, db);
          if (out.dreference_rejected) pstoreu(out.dreference_rejected + i, da);
        }
      }
      total += softplus.flush();
      const S t_sum = predux(t_lanes);
      margins += t_sum;  // non-finite where a difference or beta h overflowed (or an input is not finite)
      if (dpo_linear_term() != 0) total += A(dpo_linear_term()) * A(t_sum);  // DPO: no 0 * inf
      chosen += predux(chosen_lanes);
      rejected += predux(rejected_lanes);
      correct += predux(correct_lanes);
    }
    return whole;
  }

  // Per-pair losses of a chunk and their partial derivatives in a and b.
  void pair_losses(const Chunk& a, const Chunk& b, Chunk& loss, Chunk& da, Chunk& db) const {
    const S beta = options_.beta, eps = options_.epsilon;
    const Chunk t = beta * (a - b);
    Chunk sp, sigma, sp2, sigma2, sp3, sigma3;  // softplus and sigmoid of the kind's arguments
    switch (options_.kind) {
      case PreferenceKind::Sigmoid:
      case PreferenceKind::Robust:
      case PreferenceKind::Conservative:
      case PreferenceKind::Aot:
      case PreferenceKind::AotUnpaired:
        dpo_family(a, b, loss, da, db);
        break;
      case PreferenceKind::IPO: {
        const Chunk r = a - b - 1 / (2 * beta);
        loss = r.square();
        da = 2 * r;
        db = -da;
        break;
      }
      case PreferenceKind::Hinge: {
        // Infinite log-ratios give NaN rather than a limit, which would hide them; a finite
        // margin whose t = beta h overflows gets its limit (0 above, +inf below).
        const Chunk nan = S(0) * a + S(0) * b;
        loss = (1 - t).max(S(0)) + nan;
        da = (t < S(1)).select(-beta, Chunk::Zero()) + nan;
        db = -da;
        break;
      }
      case PreferenceKind::ExoPair: {
        // KL(Bernoulli(q) || Bernoulli(1 - eps)) with log q = -sp(-t), log(1 - q) = -sp(t).
        softplus(-t, sp, sigma);   // sp(-t) = -log q, sigma(-t) = 1 - q
        softplus(t, sp2, sigma2);  // sp(t) = -log(1 - q), sigma(t) = q
        // At t = +-inf (beta h overflowed) each term's weight is 0, and so is its limit: no 0 * inf.
        const S inf = std::numeric_limits<S>::infinity();
        const Chunk q = sigma2 * (-sp - std::log1p(-eps)), p = sigma * (-sp2 - std::log(eps));
        loss = (sp == inf).select(Chunk::Zero(), q) + (sp2 == inf).select(Chunk::Zero(), p);
        const Chunk slope = sigma2 * sigma * (t - (std::log1p(-eps) - std::log(eps)));
        da = beta * (t.abs() == inf).select(Chunk::Zero(), slope);
        db = -da;
        break;
      }
      case PreferenceKind::NcaPair: {
        softplus(-beta * a, sp, sigma);
        softplus(beta * a, sp2, sigma2);
        softplus(beta * b, sp3, sigma3);
        loss = sp + S(0.5) * sp2 + S(0.5) * sp3;
        da = beta * (S(0.5) * sigma2 - sigma);
        db = S(0.5) * beta * sigma3;
        break;
      }
      case PreferenceKind::BcoPair: {
        softplus(-beta * a, sp, sigma);
        softplus(beta * b, sp2, sigma2);
        loss = sp + sp2;
        da = -beta * sigma;
        db = beta * sigma2;
        break;
      }
      case PreferenceKind::SppoHard: {
        const S target = 1 / (2 * beta);
        loss = (a - target).square() + (b + target).square();
        da = 2 * (a - target);
        db = 2 * (b + target);
        break;
      }
      case PreferenceKind::ApoZero: {
        const Chunk sa = (beta * a).logistic(), sb = (beta * b).logistic();
        loss = (1 - sa) + sb;
        da = -beta * sa * (1 - sa);
        db = beta * sb * (1 - sb);
        break;
      }
      case PreferenceKind::ApoDown: {
        const Chunk sa = (beta * a).logistic(), st = t.logistic();
        const Chunk g = beta * st * (1 - st);  // d sigma(t) / dh
        loss = sa + (1 - st);
        da = beta * sa * (1 - sa) - g;
        db = g;
        break;
      }
      case PreferenceKind::DiscoPOP: {
        // m e^-t = exp(-t - sp(-t/tau)) stays finite where e^-t alone overflows; t clamped
        // to finite values there keeps its limit (0, or 1 at tau = 1) where beta h overflowed.
        const S tau = options_.discopop_tau, largest = std::numeric_limits<S>::max();
        const S inf = std::numeric_limits<S>::infinity();
        const Chunk clamped = t.max(-largest).min(largest), u = clamped / tau;
        softplus(-t, sp, sigma);     // the DPO loss and its weight
        softplus(-u, sp2, sigma2);   // sigma2 = 1 - m
        const Chunk m = u.logistic(), me = (-clamped - sp2).exp();
        const Chunk msp = (sp == inf).select(Chunk::Zero(), m * sp);  // m sp -> 0 as t -> -inf
        loss = sigma2 * sp + me;
        da = beta * (-sigma2 * sigma - me + (sigma2 * me - sigma2 * msp) / tau);
        db = -da;
        break;
      }
    }
  }

  // Sort keys and remember the permutation; NaN sorts last so that std::sort stays defined.
  static void sort_keys(Vector<S>& keys, std::vector<Index>& index) {
    index.resize(static_cast<std::size_t>(keys.size()));
    std::iota(index.begin(), index.end(), Index(0));
    std::sort(index.begin(), index.end(), [&](Index i, Index j) {
      const S x = keys(i), y = keys(j);
      return std::isnan(y) ? !std::isnan(x) : x < y;
    });
    Vector<S> sorted(keys.size());
    for (Index k = 0; k < keys.size(); ++k) sorted(k) = keys(index[static_cast<std::size_t>(k)]);
    keys.swap(sorted);
  }

  // A contiguous view of an input vector: a copy only for expressions and strided vectors.
  template <class X>
  static Eigen::Ref<const Vector<S>> contiguous(const X& x) {
    if constexpr (X::ColsAtCompileTime != 1) {
      return x.transpose();
    } else {
      return x;
    }
  }

  template <class PC, class PR, class RC, class RR>
  S run(const char* function, const PC& policy_chosen, const PR& policy_rejected, const RC& reference_chosen,
        const RR& reference_rejected, Outputs out) const {
    const Index n = policy_chosen.size();
    detail::require_nonempty(function, "policy_chosen", n, "pairs");
    require_input(function, "policy_chosen", policy_chosen, n);
    require_input(function, "policy_rejected", policy_rejected, n);
    require_input(function, "reference_chosen", reference_chosen, n);
    require_input(function, "reference_rejected", reference_rejected, n);
    const auto pc = contiguous(policy_chosen), pr = contiguous(policy_rejected);
    const auto rc = contiguous(reference_chosen), rr = contiguous(reference_rejected);

    const PreferenceKind kind = options_.kind;
    Sorted sorted;
    if (sorts(kind)) {
      if (kind == PreferenceKind::Aot) {
        sorted.a = pc - pr;
        sorted.b = rc - rr;
      } else {
        sorted.a = pc - rc;
        sorted.b = pr - rr;
      }
      sort_keys(sorted.a, sorted.a_index);
      sort_keys(sorted.b, sorted.b_index);
    }

    const bool reduce_mean = options_.reduction == Reduction::Mean;
    const S scale = reduce_mean ? S(1) / static_cast<S>(n) : S(1);
    // Sums in double (or wider S): N may be large.
    using Accumulator = decltype(S() + double());
    Accumulator total = 0, chosen = 0, rejected = 0, correct = 0;
    Accumulator margins = 0;  // DPO family: the sum of t (packets) or h (chunks), finite unless something overflowed
    const bool dpo = in_dpo_family(kind);
    // The DPO family without per-pair values, the hot path, runs its whole packets apart
    // (where SoftplusSum is exact: float or double, with FMA).
    constexpr bool packets = detail::kFusedMultiplyAdd && (std::is_same_v<S, float> || std::is_same_v<S, double>);
    Index done = 0;
    if (packets && in_dpo_family(kind) && !sorts(kind) && !out.per_pair) {
      done = dpo_packets(pc.data(), pr.data(), rc.data(), rr.data(), n, scale, out, total, chosen, rejected, correct,
                         margins);
    }
    // The rest chunk by chunk, any kind.
    auto pass = [&](auto kernel) {
      for (Index block = done; block < n; block += kBlock) {
        const Index end = std::min(n, block + kBlock);
        Chunk total_lanes = Chunk::Zero(), chosen_lanes = Chunk::Zero(), rejected_lanes = Chunk::Zero();
        Chunk margin_lanes = Chunk::Zero();
        for (Index start = block; start < end; start += kLanes) {
          const Index m = std::min(kLanes, end - start);
          Chunk a = load(pc - rc, start, m), b = load(pr - rr, start, m);
          if (out.metrics) {
            chosen_lanes += a;
            rejected_lanes += b;
            correct += static_cast<Accumulator>((a > b).count());  // the zero padding never counts
          }
          if (sorted.a.size()) {
            a = load(sorted.a, start, m);
            b = load(sorted.b, start, m);
          }
          if (dpo) margin_lanes += a - b;  // the padding adds 0
          Chunk loss, da, db;
          kernel(a, b, loss, da, db);
          if (m < kLanes) loss.tail(kLanes - m).setZero();
          total_lanes += loss;
          if (out.per_pair) store(out.per_pair, start, m, loss);
          if (out.dpolicy_chosen) scatter(start, m, scale * da, scale * db, sorted, out);
        }
        total += total_lanes.sum();
        chosen += chosen_lanes.sum();
        rejected += rejected_lanes.sum();
        if (dpo) margins += margin_lanes.sum();
      }
    };
    if (dpo)
      pass([this](auto&... x) { dpo_family(x...); });
    else
      pass([this](auto&... x) { pair_losses(x...); });
    // Something overflowed S or an input is not finite (rare): finite inputs go again in long double.
    if (dpo && !(std::isfinite(total) && std::isfinite(margins)) && pc.allFinite() && pr.allFinite() &&
        rc.allFinite() && rr.allFinite()) {
      return dpo_wide(pc, pr, rc, rr, out);
    }
    if (out.metrics) {
      const Accumulator beta = options_.beta, count = static_cast<Accumulator>(n);
      out.metrics->chosen_reward = static_cast<S>(beta * chosen / count);
      out.metrics->rejected_reward = static_cast<S>(beta * rejected / count);
      out.metrics->reward_margin = static_cast<S>(beta * (chosen - rejected) / count);
      out.metrics->reward_accuracy = static_cast<S>(correct / count);
    }
    return static_cast<S>(reduce_mean ? total / static_cast<Accumulator>(n) : total);
  }

  // The DPO family, pair by pair in long double, for finite inputs whose differences or t = beta h
  // overflow S: value, per-pair values, gradients and metrics, each rounded to S once.
  template <class V>
  S dpo_wide(const V& pc, const V& pr, const V& rc, const V& rr, const Outputs& out) const {
    using W = long double;
    const Index n = pc.size();
    const auto count = static_cast<std::size_t>(n);
    const PreferenceKind kind = options_.kind;
    const bool paired = kind == PreferenceKind::Aot;
    std::vector<W> a(count), b(count);
    std::vector<Index> a_index(count), b_index(count);
    W chosen = 0, rejected = 0, correct = 0;
    for (std::size_t i = 0; i < count; ++i) {
      const auto k = static_cast<Index>(i);
      const W x = W(pc(k)) - W(rc(k)), y = W(pr(k)) - W(rr(k));
      chosen += x;
      rejected += y;
      correct += x > y;
      a[i] = paired ? W(pc(k)) - W(pr(k)) : x;
      b[i] = paired ? W(rc(k)) - W(rr(k)) : y;
    }
    std::iota(a_index.begin(), a_index.end(), Index(0));
    std::iota(b_index.begin(), b_index.end(), Index(0));
    if (sorts(kind)) {
      const auto at = [](const std::vector<W>& keys) {
        return [&keys](Index i, Index j) { return keys[static_cast<std::size_t>(i)] < keys[static_cast<std::size_t>(j)]; };
      };
      std::stable_sort(a_index.begin(), a_index.end(), at(a));
      std::stable_sort(b_index.begin(), b_index.end(), at(b));
    }
    const W beta = options_.beta, eps = options_.epsilon;
    const W c = kind == PreferenceKind::Sigmoid ? W(0) : kind == PreferenceKind::Robust ? -eps / (1 - 2 * eps) : eps;
    const bool mean = options_.reduction == Reduction::Mean;
    const W scale = mean ? W(1) / W(n) : W(1);
    const auto softplus_wide = [](W x) { return x > 0 ? x + std::log1p(std::exp(-x)) : std::log1p(std::exp(x)); };
    W total = 0;
    for (std::size_t k = 0; k < count; ++k) {
      const auto i = static_cast<std::size_t>(a_index[k]), j = static_cast<std::size_t>(b_index[k]);
      const W t = beta * (a[i] - b[j]);
      const W loss = kind == PreferenceKind::Sigmoid ? softplus_wide(-t)
                     : kind == PreferenceKind::Robust ? softplus_wide(-t) + c * t
                                                      : (1 - eps) * softplus_wide(-t) + eps * softplus_wide(t);
      total += loss;
      if (out.per_pair) out.per_pair[k] = static_cast<S>(loss);
      if (!out.dpolicy_chosen) continue;
      const S da = static_cast<S>(scale * beta * (c - 1 / (1 + std::exp(t))));  // sigma(-t) = 1 / (1 + e^t)
      if (!sorts(kind)) {
        out.dpolicy_chosen[k] = da;
        out.dpolicy_rejected[k] = -da;
        if (out.dreference_chosen) out.dreference_chosen[k] = -da;
        if (out.dreference_rejected) out.dreference_rejected[k] = da;
        continue;
      }
      // As scatter(): a_plus, a_minus at the rank's a key, b_plus, b_minus (db = -da) at its b key.
      out.dpolicy_chosen[i] = da;
      if (paired) out.dpolicy_rejected[i] = -da;
      else if (out.dreference_chosen) out.dreference_chosen[i] = -da;
      if (paired) {
        if (out.dreference_chosen) out.dreference_chosen[j] = -da;
      } else {
        out.dpolicy_rejected[j] = -da;
      }
      if (out.dreference_rejected) out.dreference_rejected[j] = da;
    }
    if (out.metrics) {
      out.metrics->chosen_reward = static_cast<S>(beta * chosen / W(n));
      out.metrics->rejected_reward = static_cast<S>(beta * rejected / W(n));
      out.metrics->reward_margin = static_cast<S>(beta * (chosen - rejected) / W(n));
      out.metrics->reward_accuracy = static_cast<S>(correct / W(n));
    }
    return static_cast<S>(mean ? total / W(n) : total);
  }

  // Entries start..start+m of the vector expression x as a chunk, zero past m.
  template <class X>
  static Chunk load(const X& x, Index start, Index m) {
    if (m == kLanes) return x.template segment<kLanes>(start).array();
    Chunk chunk = Chunk::Zero();
    chunk.head(m) = x.segment(start, m).array();
    return chunk;
  }

  static void store(S* out, Index start, Index m, const Chunk& chunk) {
    if (m == kLanes)
      Eigen::Map<Chunk>(out + start) = chunk;
    else
      Eigen::Map<Eigen::Array<S, Eigen::Dynamic, 1>>(out + start, m) = chunk.head(m);
  }

  // Gradients of a chunk: d/dpc = d/da, d/drc = -d/da, d/dpr = d/db, d/drr = -d/db, or
  // through the sort permutations for the Aot kinds.
  void scatter(Index start, Index m, const Chunk& da, const Chunk& db, const Sorted& sorted, const Outputs& out) const {
    if (!sorts(options_.kind)) {
      store(out.dpolicy_chosen, start, m, da);
      store(out.dpolicy_rejected, start, m, db);
      if (out.dreference_chosen) store(out.dreference_chosen, start, m, -da);
      if (out.dreference_rejected) store(out.dreference_rejected, start, m, -db);
      return;
    }
    // Aot: a = pc - pr, b = rc - rr. AotUnpaired: a = pc - rc, b = pr - rr.
    const bool paired = options_.kind == PreferenceKind::Aot;
    S* a_plus = out.dpolicy_chosen;
    S* a_minus = paired ? out.dpolicy_rejected : out.dreference_chosen;
    S* b_plus = paired ? out.dreference_chosen : out.dpolicy_rejected;
    S* b_minus = out.dreference_rejected;
    for (Index k = 0; k < m; ++k) {
      const auto i = sorted.a_index[static_cast<std::size_t>(start + k)];
      const auto j = sorted.b_index[static_cast<std::size_t>(start + k)];
      if (a_plus) a_plus[i] = da(k);
      if (a_minus) a_minus[i] = -da(k);
      if (b_plus) b_plus[j] = db(k);
      if (b_minus) b_minus[j] = -db(k);
    }
  }

  Options options_;
};

}  // namespace gradus
