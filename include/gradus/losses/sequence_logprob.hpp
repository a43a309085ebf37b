#pragma once
// Sequence log-probabilities from token logits, the inputs of the preference losses.
//
// For one sequence with token logits Z (T x V, one position per row), target tokens y (T)
// and a mask m (T, nonzero = counted, e.g. the completion tokens),
//
//   log p(y) = sum_{t: m_t != 0} log softmax(Z_t)_{y_t} = sum_t m_t (Z_{t,y_t} - logsumexp(Z_t)),
//   d log p(y) / dZ_t = m_t (e_{y_t} - softmax(Z_t)).
//
// With .average = true the sum becomes the mean over counted tokens (TRL feeds IPO these
// length-normalised log-probs), and a sequence with no counted token is an error.
// Errors: logits with no row or no column, targets or mask not one per row, a counted target
// outside [0, V) (uncounted positions may hold anything, e.g. an ignore index of -100).
// Non-finite logits propagate: -inf at a counted target gives log p = -inf with a finite
// gradient, -inf elsewhere has zero probability; +inf or NaN in a counted row gives NaN.
// This is minus the summed cross-entropy with masked targets ignored, so it runs on the
// comp-sum fused kernel (kernels/softmax.hpp): one pass over Z, one exp per logit, the
// gradient written in place with its upstream factor folded in, and no T x V temporary.
//
//   gradus::SequenceLogProb<float> logprob;
//   float pc = logprob.value(Z_chosen, y_chosen, mask_chosen);           // forward, per sequence
//   ... preference loss gives dpc = dL/dpc ...
//   logprob.vjp(Z_chosen, y_chosen, mask_chosen, dpc(i), dZ_chosen);     // dZ = dpc(i) d log p / dZ
//
// An object keeps a T-sized label buffer between calls (no allocation after the first call
// at a given length), so use one object per thread.

#include <type_traits>

#include <Eigen/Core>

#include "gradus/core/errors.hpp"
#include "gradus/core/types.hpp"
#include "gradus/kernels/softmax.hpp"

namespace gradus {

struct SequenceLogProbOptions {
  bool average = false;  // mean instead of sum over the counted tokens
};

template <class S>
class SequenceLogProb {
 public:
  using Scalar = S;
  using Options = SequenceLogProbOptions;

  explicit SequenceLogProb(Options options = {}) : options_(options) {}

  const Options& options() const { return options_; }

  // log p(y) over the positions where mask is nonzero.
  template <class D, class DM>
  S value(const Eigen::MatrixBase<D>& logits, const Eigen::Ref<const Labels>& targets,
          const Eigen::DenseBase<DM>& mask) const {
    return run("SequenceLogProb::value", logits, targets, &mask.derived(), S(1), nullptr, 0);
  }

  // Every position counted.
  template <class D>
  S value(const Eigen::MatrixBase<D>& logits, const Eigen::Ref<const Labels>& targets) const {
    return run("SequenceLogProb::value", logits, targets, unmasked(), S(1), nullptr, 0);
  }

  // log p(y), and its gradient with respect to the logits written into dlogits (T x V).
  template <class D, class DM>
  S value_and_grad(const Eigen::MatrixBase<D>& logits, const Eigen::Ref<const Labels>& targets,
                   const Eigen::DenseBase<DM>& mask, Eigen::Ref<RowMatrix<S>> dlogits) const {
    constexpr const char* function = "SequenceLogProb::value_and_grad";
    require_gradient_shape(function, logits, dlogits);
    return run(function, logits, targets, &mask.derived(), S(1), dlogits.data(), dlogits.outerStride());
  }

  template <class D>
  S value_and_grad(const Eigen::MatrixBase<D>& logits, const Eigen::Ref<const Labels>& targets,
                   Eigen::Ref<RowMatrix<S>> dlogits) const {
    constexpr const char* function = "SequenceLogProb::value_and_grad";
    require_gradient_shape(function, logits, dlogits);
    return run(function, logits, targets, unmasked(), S(1), dlogits.data(), dlogits.outerStride());
  }

  // Backward pass alone: dlogits = upstream * d log p(y) / dlogits, in one pass.
  template <class D, class DM>
  void vjp(const Eigen::MatrixBase<D>& logits, const Eigen::Ref<const Labels>& targets,
           const Eigen::DenseBase<DM>& mask, S upstream, Eigen::Ref<RowMatrix<S>> dlogits) const {
    constexpr const char* function = "SequenceLogProb::vjp";
    require_gradient_shape(function, logits, dlogits);
    run(function, logits, targets, &mask.derived(), upstream, dlogits.data(), dlogits.outerStride());
  }

 private:
  static constexpr int kIgnored = -1;

  // Stands for "no mask" in run().
  static const Labels* unmasked() { return nullptr; }

  template <class D>
  static void require_gradient_shape(const char* function, const Eigen::MatrixBase<D>& logits,
                                     const Eigen::Ref<RowMatrix<S>>& dlogits) {
    detail::require_size(function, "dlogits", dlogits.rows(), logits.rows(), "rows (rows of logits)");
    detail::require_size(function, "dlogits", dlogits.cols(), logits.cols(), "columns (columns of logits)");
  }

  // The comp-sum kernel with scale -upstream (/count when averaging) on the cross-entropy
  // returns upstream log p and writes upstream d log p / dZ.
  template <class D, class DM>
  S run(const char* function, const Eigen::MatrixBase<D>& logits, const Eigen::Ref<const Labels>& targets,
        const DM* mask, S upstream, S* grad, Index ld_grad) const {
    static_assert(std::is_same_v<typename D::Scalar, S>, "SequenceLogProb<S>: logits must have scalar type S");
    const Eigen::Ref<const RowMatrix<S>> z(logits.derived());  // no copy for row-major storage
    const Index positions = z.rows(), vocabulary = z.cols();
    detail::require_nonempty(function, "logits", positions, "rows (positions)");
    detail::require_nonempty(function, "logits", vocabulary, "columns (vocabulary)");
    detail::require_size(function, "targets", targets.size(), positions, "entries (rows of logits)");
    if (mask) detail::require_size(function, "mask", mask->size(), positions, "entries (rows of logits)");
    labels_.resize(positions);
    Index counted = 0;
    for (Index t = 0; t < positions; ++t) {
      const bool used = mask == nullptr || (*mask)(t) != 0;
      if (used && (targets(t) < 0 || targets(t) >= vocabulary)) {
        detail::throw_invalid_argument(function, "targets",
                                       "token ids in [0, " + detail::to_text(vocabulary) + ") where counted",
                                       detail::to_text(targets(t)) + " at position " + detail::to_text(t));
      }
      labels_(t) = used ? targets(t) : kIgnored;
      counted += used;
    }
    if (options_.average) {
      detail::require(counted > 0, function, "mask", "at least one counted position (the mean over no token)",
                      "no nonzero entry");
    }
    const S per_token = options_.average ? S(1) / static_cast<S>(counted) : S(1);
    const detail::CompSumJob<S> job{
        .logits = z.data(),
        .ld_logits = z.outerStride(),
        .rows = positions,
        .cols = vocabulary,
        .labels = labels_.data(),
        .ignore_index = kIgnored,
        .class_weight = nullptr,
        .class_weight_sum = S(vocabulary),
        .tau = S(1),
        .smoothing = S(0),
        .scale = -upstream * per_token,
        .grad = grad,
        .ld_grad = ld_grad,
    };
    return static_cast<S>(detail::comp_sum_rows(job));
  }

  Options options_;
  mutable Labels labels_;
};

}  // namespace gradus
