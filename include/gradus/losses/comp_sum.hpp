#pragma once
// Comp-sum losses (Mao, Mohri, Zhong, "Cross-Entropy Loss Functions: Theoretical Analysis and
// Applications", ICML 2023): for logits h (one row per sample, C classes), label y and
// p = softmax(h),
//
//   l_tau(h, y) = (1 - p_y^(tau-1)) / (tau-1)   (tau != 1),     l_1(h, y) = -log p_y,
//
// that is Phi_tau(u) = ((1+u)^(1-tau) - 1)/(1-tau) of u = sum_{j != y} exp(h_j - h_y) = 1/p_y - 1.
// tau = 0: sum-exponential loss; tau = 1: cross-entropy; 1 < tau < 2: generalized cross-entropy
// with q = tau - 1 (Zhang & Sabuncu 2018); tau = 2: mean absolute error 1 - p_y.
// The gradient is cross-entropy's, rescaled per row: dl/dh = p_y^(tau-1) (p - e_y).
// Computed in the log domain, lp = h_y - logsumexp(h), l = -expm1((tau-1) lp)/(tau-1), so logits
// of any magnitude give finite values and gradients for tau >= 1. For tau < 1 the value is
// unbounded and overflows to inf once p_y underflows. A row whose logit spread max - min
// overflows S (beyond the largest finite) is outside what the kernel computes: it gives
// NaN/inf.
//
// PyTorch's cross_entropy options, with its semantics:
// - weight (per class, empty = none): sample i counts v_{y_i} times; the mean divides by the
//   sum of v_{y_i} over the counted samples. Accepted: each entry 0 or a normal finite number
//   (std::numeric_limits<S>::min() <= v_j <= max; denormals are rejected, their 1/denominator
//   would overflow), with a sum that is finite in S (sum_j v_j <= max), with or without label
//   smoothing. (A mean whose 1/denominator is no normal S scales the weights instead.)
//   A row whose class weight is 0 contributes exactly 0 to the value and the gradient without
//   label smoothing, even where its unweighted loss overflows (tau < 1); with smoothing it
//   keeps its smoothing term (eps/C) sum_j v_j (-log p_j), as in PyTorch.
// - ignore_index: rows with this label contribute nothing (value 0, zero gradient row) and
//   are not counted. A mean over no counted sample is NaN (as in PyTorch), its gradient zero.
// - label_smoothing eps (tau = 1 only; rejected otherwise): the target is (1-eps) e_y + eps/C,
//   l = (1-eps) v_y (-log p_y) + (eps/C) sum_j v_j (-log p_j).
// Reductions: Mean and Sum reduce the per-sample losses; with None, value() and
// value_and_grad() return the SUM and its gradient (values() gives the per-sample losses).
// values() always gives the weighted per-sample losses (PyTorch's reduction='none').
//
//   gradus::CrossEntropyLoss<float> ce;                      // or CompSumLoss<float>({.tau = 1.7})
//   float loss = ce.value_and_grad(logits, labels, dlogits);  // dlogits sized N x C by the caller
//
// The kernel (kernels/softmax.hpp) makes one pass per row with one exp per element and writes
// the gradient in place; dlogits may be logits itself. No heap allocation when logits is a
// row-major matrix (or a row-major block of one).

#include <cmath>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include <Eigen/Core>

#include "gradus/core/errors.hpp"
#include "gradus/core/types.hpp"
#include "gradus/kernels/softmax.hpp"

namespace gradus {

template <class S>
struct CompSumOptions {
  S tau = 1;                             // finite, >= 0
  Reduction reduction = Reduction::Mean;  // one of its three enumerators
  Vector<S> weight{};                    // per class, 0 or normal finite, sum finite; empty = none
  int ignore_index = -100;
  S label_smoothing = 0;                 // in [0, 1]; only for tau = 1
};

template <class S>
class CompSumLoss {
 public:
  using Scalar = S;
  using Options = CompSumOptions<S>;

  explicit CompSumLoss(Options options = {}) : CompSumLoss(std::move(options), "CompSumLoss") {}

  const Options& options() const { return options_; }

  // The reduced loss (the sum for Reduction::None).
  template <class D>
  S value(const Eigen::MatrixBase<D>& logits, const Eigen::Ref<const Labels>& labels) const {
    return evaluate("CompSumLoss::value", logits, labels, nullptr, 0, nullptr);
  }

  // The reduced loss; writes its gradient with respect to logits into dlogits (N x C).
  template <class D>
  S value_and_grad(const Eigen::MatrixBase<D>& logits, const Eigen::Ref<const Labels>& labels,
                   Eigen::Ref<RowMatrix<S>> dlogits) const {
    constexpr const char* function = "CompSumLoss::value_and_grad";
    detail::require_size(function, "dlogits", dlogits.rows(), logits.rows(), "rows (rows of logits)");
    detail::require_size(function, "dlogits", dlogits.cols(), logits.cols(), "columns (columns of logits)");
    return evaluate(function, logits, labels, dlogits.data(), dlogits.outerStride(), nullptr);
  }

  // The weighted per-sample losses (0 for ignored rows), whatever the reduction.
  template <class D>
  void values(const Eigen::MatrixBase<D>& logits, const Eigen::Ref<const Labels>& labels,
              Eigen::Ref<Vector<S>> per_sample) const {
    constexpr const char* function = "CompSumLoss::values";
    detail::require_size(function, "per_sample", per_sample.size(), logits.rows(), "entries (rows of logits)");
    evaluate(function, logits, labels, nullptr, 0, per_sample.data());
  }

 protected:
  // The named members validate under their own names.
  CompSumLoss(Options options, const char* function) : options_(std::move(options)) {
    detail::require_finite(function, "options.tau", options_.tau);
    detail::require_nonnegative(function, "options.tau", options_.tau);
    detail::require_reduction(function, options_.reduction);
    detail::require_in_range(function, "options.label_smoothing", options_.label_smoothing, S(0), S(1), true);
    detail::require(options_.label_smoothing == 0 || options_.tau == 1, function, "options.label_smoothing",
                    "0 unless tau = 1 (label smoothing is defined for cross-entropy)", options_.label_smoothing);
    // Each weight 0 or normal: a denormal one would make 1/denominator overflow. Their sum
    // (taken in long double) finite in S: label smoothing weighs every class, and the mean's
    // scaled path divides it.
    long double sum = 0;
    for (Index j = 0; j < options_.weight.size(); ++j) {
      const S v = options_.weight(j);
      if (!(v == 0 || (v >= std::numeric_limits<S>::min() && v <= std::numeric_limits<S>::max()))) {
        detail::throw_invalid_argument(function, "options.weight",
                                       "entries 0 or normal and finite (>= " +
                                           detail::to_text(std::numeric_limits<S>::min()) + ", no denormals)",
                                       detail::to_text(v) + " at index " + detail::to_text(static_cast<long long>(j)));
      }
      sum += v;
    }
    if (!(sum <= std::numeric_limits<S>::max())) {
      detail::throw_invalid_argument(function, "options.weight",
                                     "entries whose sum is finite in the scalar type (at most " +
                                         detail::to_text(std::numeric_limits<S>::max()) + ")",
                                     detail::to_text(sum));
    }
    weight_sum_ = S(sum);
  }

 private:
  template <class D>
  S evaluate(const char* function, const Eigen::MatrixBase<D>& logits, const Eigen::Ref<const Labels>& labels,
             S* grad, Index ld_grad, S* per_sample) const {
    static_assert(std::is_same_v<typename D::Scalar, S>, "CompSumLoss<S>: logits must have scalar type S");
    const Eigen::Ref<const RowMatrix<S>> h(logits.derived());  // no copy for row-major storage
    const Index n = h.rows(), classes = h.cols();
    detail::require_nonempty(function, "logits", n, "rows");
    detail::require_nonempty(function, "logits", classes, "columns (classes)");
    detail::require_size(function, "labels", labels.size(), n, "entries (rows of logits)");
    const bool weighted = options_.weight.size() > 0;
    if (weighted) detail::require_size(function, "options.weight", options_.weight.size(), classes, "entries (columns of logits)");
    // One branch-free pass over the labels (it vectorizes; with few classes a branchy one costs
    // a tenth of the kernel): the rows counted, and whether a label is out of range, in which
    // case require_labels names it.
    Index counted = 0;
    unsigned bad = 0;
    for (const int* y = labels.data(); y != labels.data() + n; ++y) {
      const unsigned counts = *y != options_.ignore_index;
      counted += counts;
      bad |= counts & ((*y < 0) | (*y >= classes));
    }
    if (bad) detail::require_labels(function, "labels", labels, classes, options_.ignore_index, true);

    const bool mean = options_.reduction == Reduction::Mean && per_sample == nullptr;
    long double denominator = counted;  // long double: a sum of large double weights stays finite
    if (mean && weighted) {
      denominator = 0;
      for (Index i = 0; i < n; ++i) {
        const int y = labels(i);
        if (y != options_.ignore_index) denominator += options_.weight(y);
      }
    }
    if (mean && denominator == 0) {  // nothing counted: NaN like PyTorch, zero gradient
      if (grad != nullptr) Eigen::Map<RowMatrix<S>, 0, Eigen::OuterStride<>>(grad, n, classes, {ld_grad}).setZero();
      return std::numeric_limits<S>::quiet_NaN();
    }
    const long double scale = mean ? 1 / denominator : 1;
    const S* weight = weighted ? options_.weight.data() : nullptr;
    S weight_sum = weighted ? weight_sum_ : S(classes), job_scale = S(scale);
    // A mean whose 1/denominator is no normal S (huge or denormal weights) scales the weights
    // instead, each v_j / denominator rounded once: v_y / denominator <= 1 for a counted label.
    std::vector<S> scaled;
    if (weighted && !std::isnormal(job_scale)) {
      scaled.resize(std::size_t(classes));
      for (Index j = 0; j < classes; ++j) scaled[std::size_t(j)] = S(options_.weight(j) * scale);
      weight = scaled.data();
      weight_sum = S(weight_sum_ * scale);
      job_scale = 1;
    }
    const detail::CompSumJob<S> job{
        .logits = h.data(),
        .ld_logits = h.outerStride(),
        .rows = n,
        .cols = classes,
        .labels = labels.data(),
        .ignore_index = options_.ignore_index,
        .class_weight = weight,
        .class_weight_sum = weight_sum,
        .tau = options_.tau,
        .smoothing = options_.label_smoothing,
        .scale = job_scale,
        .grad = grad,
        .ld_grad = ld_grad,
        .per_sample = per_sample,
    };
    return S(detail::comp_sum_rows(job));
  }

  Options options_;
  S weight_sum_ = 0;
};

// Cross-entropy (tau = 1) and the other named members take their options without tau;
// their options() is the full CompSumOptions they were turned into.
template <class S>
struct CrossEntropyOptions {
  Reduction reduction = Reduction::Mean;
  Vector<S> weight{};
  int ignore_index = -100;
  S label_smoothing = 0;
};

template <class S>
struct FixedTauOptions {
  Reduction reduction = Reduction::Mean;
  Vector<S> weight{};
  int ignore_index = -100;
};

template <class S>
struct GeneralizedCrossEntropyOptions {
  S q = S(0.7);  // in (0, 1]: tau = 1 + q
  Reduction reduction = Reduction::Mean;
  Vector<S> weight{};
  int ignore_index = -100;
};

// -log p_y (tau = 1).
template <class S>
class CrossEntropyLoss : public CompSumLoss<S> {
 public:
  using Options = CrossEntropyOptions<S>;

  explicit CrossEntropyLoss(Options o = {})
      : CompSumLoss<S>({.tau = 1, .reduction = o.reduction, .weight = std::move(o.weight),
                        .ignore_index = o.ignore_index, .label_smoothing = o.label_smoothing},
                       "CrossEntropyLoss") {}
};

// 1/p_y - 1 = sum_{j != y} exp(h_j - h_y) (tau = 0).
template <class S>
class SumExponentialLoss : public CompSumLoss<S> {
 public:
  using Options = FixedTauOptions<S>;

  explicit SumExponentialLoss(Options o = {})
      : CompSumLoss<S>({.tau = 0, .reduction = o.reduction, .weight = std::move(o.weight), .ignore_index = o.ignore_index},
                       "SumExponentialLoss") {}
};

// (1 - p_y^q)/q (tau = 1 + q).
template <class S>
class GeneralizedCrossEntropyLoss : public CompSumLoss<S> {
 public:
  using Options = GeneralizedCrossEntropyOptions<S>;

  explicit GeneralizedCrossEntropyLoss(Options o = {})
      : CompSumLoss<S>({.tau = 1 + checked_q(o.q), .reduction = o.reduction, .weight = std::move(o.weight),
                        .ignore_index = o.ignore_index},
                       "GeneralizedCrossEntropyLoss") {}

 private:
  static S checked_q(S q) {
    detail::require(q > 0 && q <= 1, "GeneralizedCrossEntropyLoss", "options.q", "a value in (0, 1]", q);
    return q;
  }
};

// 1 - p_y (tau = 2).
template <class S>
class MeanAbsoluteErrorLoss : public CompSumLoss<S> {
 public:
  using Options = FixedTauOptions<S>;

  explicit MeanAbsoluteErrorLoss(Options o = {})
      : CompSumLoss<S>({.tau = 2, .reduction = o.reduction, .weight = std::move(o.weight), .ignore_index = o.ignore_index},
                       "MeanAbsoluteErrorLoss") {}
};

}  // namespace gradus
