#pragma once
// AnyLoss (Han, Moniz, Chawla, KDD 2024): any confusion-matrix metric as a differentiable loss.
//
// Binary (logits z: an N-vector or N x 1): p_i = sigmoid(z_i), or p_i = z_i with
// .input = AnyLossInput::Probabilities. The approximation function with amplifying scale L
//   a_i = A(p_i) = 1 / (1 + exp(-L (p_i - 1/2)))
// pushes p_i towards 0 or 1 while keeping a gradient, and gives the soft confusion matrix of
// the batch (N = the batch's own size, never the training set's):
//   TP = sum y_i a_i    FN = sum y_i (1 - a_i)    FP = sum (1 - y_i) a_i    TN = sum (1 - y_i)(1 - a_i)
// loss = 1 - M(TP, FN, FP, TN), for the built-in metrics
//   Accuracy          (TP + TN) / (TP + FN + FP + TN)
//   F_beta            (1 + b^2) TP / ((1 + b^2) TP + b^2 FN + FP + s)          (F1: b = 1)
//   GMean             sqrt(TP / (TP + FN + s) * TN / (TN + FP + s))
//   BalancedAccuracy  (TP / (TP + FN + s) + TN / (TN + FP + s)) / 2
// or any user metric M(TP, FN, FP, TN) written once as a template. The partials of M come
// from forward-mode dual numbers (core/dual.hpp), and the gradient couples the batch:
//   dloss/dz_i = -(y_i (M_TP - M_FN) + (1 - y_i)(M_FP - M_TN)) * L a_i (1 - a_i) * p_i (1 - p_i).
//
// Multi-class (N x C logits, C >= 2; beyond the paper): p = softmax of each row, one soft
// confusion matrix per class c (one-vs-rest, y_i = [label_i == c], a_ic = A(p_ic)), and
// loss = 1 - (1/C) sum_c M_c (macro average). For C = 2 the symmetric metrics (accuracy,
// G-mean, balanced accuracy) equal the binary loss on z_1 - z_0; F1 averages both classes' F1.
//
// L: the authors' code uses 73 (the default); 10-40 is the stable range on real data, large
// L collapses training when few p_i lie near 1/2. The stabilizer s (default 0) is the
// authors' s = 1e-5 added to the denominators that vanish on a one-class batch: with s = 0,
// a batch where the metric is undefined (G-mean or balanced accuracy without positives or
// without negatives) throws gradus::invalid_argument, as does any metric whose value or
// partials are not finite on finite counts (a user metric writes its own s where it wants
// one). Probabilities must lie in [0, 1]; non-finite inputs propagate as NaN.
// An AnyLoss object keeps scratch between calls: use one object per thread.

#include <algorithm>
#include <cmath>
#include <concepts>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>

#include <Eigen/Core>

#include "gradus/core/dual.hpp"
#include "gradus/core/errors.hpp"
#include "gradus/core/types.hpp"
#include "gradus/kernels/logistic.hpp"

namespace gradus {

enum class Metric { Accuracy, F1, FBeta, GMean, BalancedAccuracy };

// What the loss receives: logits (sigmoid, or softmax over a row of C >= 2) or probabilities.
enum class AnyLossInput { Logits, Probabilities };

// The built-in metrics as one function of the four counts, for plain numbers (hard counts
// from a test set) and dual numbers alike: ConfusionMetric{Metric::F1}(tp, fn, fp, tn).
struct ConfusionMetric {
  Metric metric = Metric::F1;
  double beta = 1;        // Metric::FBeta only
  double stabilizer = 0;  // added to the denominators of F_beta, TP rate and TN rate

  template <class T>
  T operator()(const T& tp, const T& fn, const T& fp, const T& tn) const {
    using std::sqrt;
    const T s(stabilizer);
    switch (metric) {
      case Metric::Accuracy:
        return (tp + tn) / (tp + fn + fp + tn);
      case Metric::F1:
        return 2 * tp / (2 * tp + fn + fp + s);
      case Metric::FBeta: {
        const T b2(beta * beta);
        return (1 + b2) * tp / ((1 + b2) * tp + b2 * fn + fp + s);
      }
      case Metric::GMean:
        return sqrt(tp / (tp + fn + s) * (tn / (tn + fp + s)));
      case Metric::BalancedAccuracy:
        return (tp / (tp + fn + s) + tn / (tn + fp + s)) / 2;
    }
    return T(0);  // unreachable for a valid enumerator
  }
};

template <class S>
struct AnyLossOptions {
  Metric metric = Metric::F1;  // ignored when the loss is given a user metric
  S amplify = 73;              // L; authors' code. 10-40 is the stable range on real data
  S beta = 1;                  // for Metric::FBeta
  AnyLossInput input = AnyLossInput::Logits;
  S stabilizer = 0;            // 0: throw where the metric is undefined; authors' value 1e-5
};

namespace detail {

// Soft confusion matrix of one (one-vs-rest) problem. Summed in double: a float sum of a
// million terms keeps only ~7 digits, and the metric differences matter at that scale.
struct SoftCounts {
  double tp = 0, fn = 0, fp = 0, tn = 0;
  Index positives = 0, negatives = 0;
};

// M and the loss's derivative with respect to a_i, which depends only on y_i:
// dloss/da_i = positive for y_i = 1, negative for y_i = 0 (loss = 1 - M).
struct MetricSlopes {
  double metric, positive, negative;
};

template <class F>
MetricSlopes metric_slopes(const F& metric, const SoftCounts& k, std::string_view function, std::string_view which) {
  using D = Dual<double, 4>;
  const D m = metric(D::variable(k.tp, 0), D::variable(k.fn, 1), D::variable(k.fp, 2), D::variable(k.tn, 3));
  // A class with no sample in the batch has no a_i to differentiate: its slope is unused.
  const double positive = k.positives > 0 ? m.grad[1] - m.grad[0] : 0;
  const double negative = k.negatives > 0 ? m.grad[3] - m.grad[2] : 0;
  const bool counts_finite = std::isfinite(k.tp + k.fn + k.fp + k.tn);
  if (counts_finite && !std::isfinite(m.value + positive + negative)) {
    throw_invalid_argument(function, "labels",
                           "a batch on which the metric is defined (or options.stabilizer > 0 for a built-in metric)",
                           std::string(which) + "TP=" + to_text(k.tp) + ", FN=" + to_text(k.fn) + ", FP=" +
                               to_text(k.fp) + ", TN=" + to_text(k.tn) + " (" + to_text(k.positives) +
                               " positives, " + to_text(k.negatives) + " negatives)");
  }
  return {m.value, positive, negative};
}

// One vectorized pass (the unsigned compare also catches negative labels); the caller then
// names the first bad label.
inline bool labels_in_range(const Eigen::Ref<const Labels>& labels, Index classes) {
  unsigned largest = 0;
  for (Index i = 0; i < labels.size(); ++i) largest = std::max(largest, unsigned(labels(i)));
  return largest < unsigned(classes);
}

// Packets are vector types whose alignment attributes GCC drops as template arguments, as
// Eigen's own headers do (they silence the same warning).
#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wignored-attributes"
#endif

// SIMD packets of S (Packet16f / Packet8d with AVX-512) and their width.
template <class S>
using Packet = typename Eigen::internal::packet_traits<S>::type;
template <class S>
inline constexpr int kPacketSize = Eigen::internal::unpacket_traits<Packet<S>>::size;

// The binary pass runs over blocks of this many entries, in stages through L1 buffers; the
// per-lane sums in S, of kAnyLossBlock / packet size terms at most, move to double once per block.
inline constexpr int kAnyLossBlock = 256;

// Soft counts per SIMD lane: TP, FN, FP, TN and the count of positives.
template <class S>
class LaneCounts {
 public:
  using P = Packet<S>;

  // y: 1 for a positive, else 0; not_y: 1 for a negative, else 0 (both 0 in padding).
  EIGEN_ALWAYS_INLINE void add(const P& y, const P& not_y, const P& a, const P& not_a) {
    using namespace Eigen::internal;
    block_[0] = pmadd(y, a, block_[0]);
    block_[1] = pmadd(y, not_a, block_[1]);  // 1 - a summed as such: it may be ~1e-16
    block_[2] = pmadd(not_y, a, block_[2]);
    block_[3] = pmadd(not_y, not_a, block_[3]);
    block_[4] = padd(block_[4], y);
  }

  void flush() {
    for (int k = 0; k < kSums; ++k) {
      alignas(64) S lanes[kPacketSize<S>];
      Eigen::internal::pstore(lanes, block_[k]);
      for (int j = 0; j < kPacketSize<S>; ++j) totals_[k][j] += double(lanes[j]);
      block_[k] = Eigen::internal::pset1<P>(S(0));
    }
  }

  SoftCounts total(Index n) const {
    double sum[kSums] = {};
    for (int k = 0; k < kSums; ++k) {
      for (int j = 0; j < kPacketSize<S>; ++j) sum[k] += totals_[k][j];
    }
    const auto positives = static_cast<Index>(sum[4]);
    return {sum[0], sum[1], sum[2], sum[3], positives, n - positives};
  }

 private:
  static constexpr int kSums = 5;
  P block_[kSums] = {Eigen::internal::pset1<P>(S(0)), Eigen::internal::pset1<P>(S(0)), Eigen::internal::pset1<P>(S(0)),
                     Eigen::internal::pset1<P>(S(0)), Eigen::internal::pset1<P>(S(0))};
  double totals_[kSums][kPacketSize<S>] = {};
};

// Binary pass 1 over n entries: p = sigmoid(z) (or z), a = A(p) = sigmoid(L (p - 1/2)) into
// the soft counts, and with `weight` the chain factor da/dz = L a (1 - a) p (1 - p) =
// L (e_a r_a^2)(e_p r_p^2) (da/dp = L e_a r_a^2 without the sigmoid) stored with the sign of
// the label, -0 included: negative for a negative, so pass 2 needs no labels.
// Both sigmoids are plogistic's, one exp and one division each: e = exp(-|x|), r = 1/(1 + e),
// sigma(x) = r or e r and 1 - sigma(x) = e r or r by the sign of x; no cancellation, a exact
// at z = +-inf, NaN stays NaN. They run split in stages (exp, then division), each over the
// whole block before the next: a packet's chain of two exps and two divisions is far longer
// than the out-of-order window overlaps, and plogistic packet by packet runs 1.3x slower.
template <bool Logits, class S>
SoftCounts binary_pass(const S* z, const int* labels, Index n, S L, S* weight) {
  using namespace Eigen::internal;
  using P = Packet<S>;
  constexpr Index kSize = kPacketSize<S>;
  const P one = pset1<P>(S(1)), sign = pset1<P>(S(-0.0)), L_p = pset1<P>(L), half_L = pset1<P>(L / 2);
  const P two_L = padd(L_p, L_p), minus_L = pnegate(L_p), minus_half_L = pnegate(half_L);
  LaneCounts<S> counts;
  // One block, zero-padded to whole packets (padding counts in neither class): x (z, then
  // L (p - 1/2)), e = exp(-|x|), dp/dz (then the signed chain factor), y and 1 - y.
  alignas(64) S x[kAnyLossBlock], e[kAnyLossBlock], dp[kAnyLossBlock], y[kAnyLossBlock], not_y[kAnyLossBlock];
  for (Index start = 0; start < n; start += kAnyLossBlock) {
    const Index size = std::min<Index>(kAnyLossBlock, n - start);
    const Index padded = (size + kSize - 1) / kSize * kSize;
    for (Index i = 0; i < size; ++i) {  // plain loops: the compiler vectorizes them
      x[i] = z[start + i];
      y[i] = S(labels[start + i]);
      not_y[i] = 1 - y[i];
    }
    for (Index i = size; i < padded; ++i) x[i] = y[i] = not_y[i] = 0;
    for (Index i = 0; i < padded; i += kSize) {
      P xi = pload<P>(x + i);
      if constexpr (!Logits) pstore(x + i, xi = pmadd(L_p, xi, minus_half_L));
      pstore(e + i, pexp_nonpositive(pnegate(pabs(xi))));
    }
    if constexpr (Logits) {  // p = sigmoid(z): L (p - 1/2) = sign(z) L/2 (r - e r) needs no select
      for (Index i = 0; i < padded; i += kSize) {
        const P zi = pload<P>(x + i), ei = pload<P>(e + i), r = pdiv(one, padd(one, ei)), er = pmul(ei, r);
        pstore(dp + i, pmul(er, r));
        pstore(x + i, por(pand(zi, sign), pmul(half_L, psub(r, er))));
      }
      for (Index i = 0; i < padded; i += kSize) pstore(e + i, pexp_nonpositive(pnegate(pabs(pload<P>(x + i)))));
    }
    for (Index i = 0; i < padded; i += kSize) {
      const P xi = pload<P>(x + i), ei = pload<P>(e + i), r = pdiv(one, padd(one, ei)), er = pmul(ei, r);
      const P nonnegative = pcmp_le(pzero(xi), xi), yi = pload<P>(y + i);
      counts.add(yi, pload<P>(not_y + i), pselect(nonnegative, r, er), pselect(nonnegative, er, r));
      P w = pmul(pmadd(two_L, yi, minus_L), pmul(er, r));  // +-L a (1 - a)
      if constexpr (Logits) w = pmul(w, pload<P>(dp + i));
      if (weight && i + kSize <= size) {
        pstoreu(weight + start + i, w);
      } else {
        pstore(dp + i, w);  // the last, partial packet (or no gradient)
      }
    }
    const Index whole = size / kSize * kSize;
    if (weight && whole < size) std::copy(dp + whole, dp + size, weight + start + whole);
    counts.flush();
  }
  return counts.total(n);
}

// Binary pass 2: w = slope(y) |w|, the label read from the sign of w (pass 1).
template <class S>
void binary_slopes(S* w, Index n, S positive, S negative) {
  using namespace Eigen::internal;
  using P = Packet<S>;
  constexpr Index kSize = kPacketSize<S>;
  const P sign_bit = pset1<P>(S(-0.0)), one = pset1<P>(S(1)), zero = pzero(one);
  const P if_positive = pset1<P>(positive), if_negative = pset1<P>(-negative);
  const Index whole = n / kSize * kSize;
  for (Index i = 0; i < whole; i += kSize) {
    const P wi = ploadu<P>(w + i);
    const P is_negative = pcmp_lt(por(pand(wi, sign_bit), one), zero);  // +-1 from the sign bit: -0 < 0
    pstoreu(w + i, pmul(wi, pselect(is_negative, if_negative, if_positive)));
  }
  for (Index i = whole; i < n; ++i) w[i] *= std::signbit(w[i]) ? -negative : positive;
}

// Multi-class: a = A(p), 1 - a and da/dp = L a (1 - a) over `size` entries rounded up to
// whole packets (the caller pads); `slope` may be `p`.
template <class S>
void amplify(const S* p, Index size, S L_scalar, S* a, S* not_a, S* slope) {
  using namespace Eigen::internal;
  using P = Packet<S>;
  const P L = pset1<P>(L_scalar), minus_half_L = pset1<P>(L_scalar * S(-0.5));
  for (Index i = 0; i < size; i += kPacketSize<S>) {
    const auto ai = plogistic(pmadd(L, ploadu<P>(p + i), minus_half_L));
    pstoreu(a + i, ai.sigma);
    pstoreu(not_a + i, ai.complement);
    pstoreu(slope + i, pmul(L, pmul(pmul(ai.e, ai.r), ai.r)));
  }
}

#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif

// The batch side of AnyLoss, independent of the metric (so it is compiled once per scalar):
// pass 1 builds the soft confusion matrices and stores da/dz in dZ; pass 2, given the
// metric's slopes, turns that into dloss/dz. Holds scratch reused across calls.
template <class S>
class SoftConfusion {
 public:
  // Binary: Z is N x 1, logits or probabilities.
  SoftCounts binary_counts(const Eigen::Ref<const RowMatrix<S>>& Z, const Eigen::Ref<const Labels>& labels, S L,
                           bool logits, Eigen::Ref<RowMatrix<S>>* dZ) {
    const Index n = Z.rows();
    // The kernel runs over contiguous columns; an N x 1 block of a wider matrix goes through a copy.
    const bool strided_z = n > 1 && Z.outerStride() != 1;
    strided_grad_ = dZ && n > 1 && dZ->outerStride() != 1;
    if (strided_z) column_ = Z.col(0);
    if (strided_grad_) grad_column_.resize(n);
    const S* z = strided_z ? column_.data() : Z.data();
    S* weight = !dZ ? nullptr : strided_grad_ ? grad_column_.data() : dZ->data();
    const int* y = labels.data();
    return logits ? binary_pass<true>(z, y, n, L, weight) : binary_pass<false>(z, y, n, L, weight);
  }

  // dz_i = slope(y_i) * da_i/dz_i, the latter stored by binary_counts.
  void binary_grad(S positive, S negative, Eigen::Ref<RowMatrix<S>>& dZ) {
    S* weight = strided_grad_ ? grad_column_.data() : dZ.data();
    binary_slopes(weight, dZ.rows(), positive, negative);
    if (strided_grad_) dZ.col(0) = grad_column_;
  }

  // Multi-class: per class c the counts TP, FN, FP, TN of the one-vs-rest problem. Blocks of
  // rows run flat through A (C is often below a packet's width: row by row, Eigen would run
  // scalar code); then each row's label entry moves to TP and FN (zeroed before the
  // column sums, so nothing cancels) and the column sums go to FP and TN.
  // dZ receives da_ic/dp_ic = L a (1 - a).
  void multiclass_counts(const Eigen::Ref<const RowMatrix<S>>& Z, const Eigen::Ref<const Labels>& labels, S L,
                         bool logits, Eigen::Ref<RowMatrix<S>>* dZ) {
    const Index n = Z.rows(), classes = Z.cols();
    if (logits) softmax_rows(Z);
    const auto& P = logits ? Eigen::Ref<const RowMatrix<S>>(probabilities_) : Z;
    counts_.setZero(classes, 4);
    positives_.setZero(classes);
    const Index rows = std::max<Index>(1, kAnyLossBlock / classes);
    const Index padded = (rows * classes + kPacketSize<S> - 1) / kPacketSize<S> * kPacketSize<S>;
    if (block_.rows() != padded) block_.setZero(padded, 3);  // once per C; the padding stays finite
    using Flat = Eigen::Map<Eigen::Array<S, Eigen::Dynamic, 1>>;
    using Rows = Eigen::Map<Eigen::Array<S, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>>;
    for (Index start = 0; start < n; start += rows) {
      const Index r = std::min(rows, n - start), size = r * classes;
      Flat p(block_.col(0).data(), size), a(block_.col(1).data(), size), not_a(block_.col(2).data(), size);
      Rows(p.data(), r, classes) = P.middleRows(start, r).array();
      amplify(p.data(), size, L, a.data(), not_a.data(), p.data());
      if (dZ) dZ->middleRows(start, r) = Rows(p.data(), r, classes).matrix();
      Rows A(a.data(), r, classes), not_A(not_a.data(), r, classes);
      for (Index i = 0; i < r; ++i) {
        const int y = labels(start + i);
        counts_(y, 0) += static_cast<double>(A(i, y));
        counts_(y, 1) += static_cast<double>(not_A(i, y));
        A(i, y) = not_A(i, y) = 0;
        ++positives_(y);
      }
      counts_.col(2) += A.colwise().sum().transpose().template cast<double>();
      counts_.col(3) += not_A.colwise().sum().transpose().template cast<double>();
    }
  }

  SoftCounts class_counts(Index c) const {
    const Index n = positives_.sum();
    return {counts_(c, 0), counts_(c, 1), counts_(c, 2), counts_(c, 3), positives_(c), n - positives_(c)};
  }

  // slopes: C x 2, dloss/da for the class's positives and negatives; with logits, back
  // through the softmax: dz = p * (g - <p, g>). Plain loops over a row: the compiler
  // vectorizes them where Eigen's dynamic-size rows shorter than a packet would not.
  void multiclass_grad(const Eigen::Ref<const RowMatrix<S>>& Z, const Eigen::Ref<const Labels>& labels,
                       const Eigen::Array<S, Eigen::Dynamic, 2>& slopes, bool logits, Eigen::Ref<RowMatrix<S>>& dZ) {
    const auto& P = logits ? Eigen::Ref<const RowMatrix<S>>(probabilities_) : Z;
    const Index classes = Z.cols();
    const S* negative = slopes.col(1).data();
    for (Index i = 0; i < Z.rows(); ++i) {
      S* g = &dZ(i, 0);  // holds da_ic/dp_ic; becomes dloss/dp_ic = slope_c(y_i) da_ic/dp_ic
      const int y = labels(i);
      const S label_weight = g[y] * slopes(y, 0);
      for (Index c = 0; c < classes; ++c) g[c] *= negative[c];
      g[y] = label_weight;
      if (!logits) continue;
      const S* p = P.row(i).data();
      S dot = 0;
      for (Index c = 0; c < classes; ++c) dot += p[c] * g[c];
      for (Index c = 0; c < classes; ++c) g[c] = p[c] * (g[c] - dot);
    }
  }

 private:
  // Max-shifted row softmax, one exp per element; the exps run flat over the whole matrix.
  void softmax_rows(const Eigen::Ref<const RowMatrix<S>>& Z) {
    probabilities_.resize(Z.rows(), Z.cols());  // no-op after the first call at a given shape
    const Index classes = Z.cols();
    for (Index i = 0; i < Z.rows(); ++i) {  // plain loops over a row: see multiclass_grad
      const S* z = Z.row(i).data();
      S* p = probabilities_.row(i).data();
      S max = z[0];
      for (Index c = 1; c < classes; ++c) max = std::max(max, z[c]);
      for (Index c = 0; c < classes; ++c) p[c] = z[c] - max;
    }
    probabilities_.array() = probabilities_.array().exp();
    for (Index i = 0; i < Z.rows(); ++i) {
      S* p = probabilities_.row(i).data();
      S sum = 0;
      for (Index c = 0; c < classes; ++c) sum += p[c];
      for (Index c = 0; c < classes; ++c) p[c] /= sum;
    }
  }

  Vector<S> column_, grad_column_;
  bool strided_grad_ = false;
  RowMatrix<S> probabilities_;
  Eigen::Array<double, Eigen::Dynamic, 4> counts_;
  Eigen::Array<Index, Eigen::Dynamic, 1> positives_;
  Eigen::Array<S, Eigen::Dynamic, 3> block_;  // one block of rows, flat: p (then da/dp), a, 1 - a
};

}  // namespace detail

// AnyLoss<S>({.metric = Metric::GMean, .amplify = 30}) for a built-in metric;
// any_loss<S>(metric, options) (or AnyLoss<S, F>(metric, options)) for a user metric F,
// a callable template of (TP, FN, FP, TN), e.g. Matthews correlation:
//   auto mcc = [](auto tp, auto fn, auto fp, auto tn) {
//     return (tp * tn - fp * fn) / sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn));
//   };
// A batch loss: value and gradient couple all rows, there is no per-sample `values`.
template <class S, class MetricFn = ConfusionMetric>
class AnyLoss {
 public:
  using Scalar = S;
  using Options = AnyLossOptions<S>;

  explicit AnyLoss(const Options& options = {})
    requires std::same_as<MetricFn, ConfusionMetric>
      : AnyLoss(options, ConfusionMetric{options.metric, double(options.beta), double(options.stabilizer)}) {}

  explicit AnyLoss(MetricFn metric, const Options& options = {})
    requires(!std::same_as<MetricFn, ConfusionMetric>)
      : AnyLoss(options, std::move(metric)) {}

  const Options& options() const { return options_; }
  const MetricFn& metric() const { return metric_; }

  // Z: N logits (a vector or N x 1) for binary labels {0, 1}, or N x C (C >= 2) for labels in [0, C).
  template <class DZ, class DY>
  S value(const Eigen::MatrixBase<DZ>& Z, const Eigen::MatrixBase<DY>& labels) const {
    static_assert(std::is_same_v<typename DZ::Scalar, S>, "AnyLoss<S>: inputs must have scalar type S");
    return evaluate("AnyLoss::value", Z, labels, nullptr);
  }

  // Writes dZ (sized like Z by the caller) = d loss / d Z and returns the loss.
  template <class DZ, class DY>
  S value_and_grad(const Eigen::MatrixBase<DZ>& Z, const Eigen::MatrixBase<DY>& labels,
                   Eigen::Ref<RowMatrix<S>> dZ) const {
    static_assert(std::is_same_v<typename DZ::Scalar, S>, "AnyLoss<S>: inputs must have scalar type S");
    constexpr std::string_view function = "AnyLoss::value_and_grad";
    detail::require_size(function, "dZ", dZ.rows(), Z.rows(), "rows (rows of Z)");
    detail::require_size(function, "dZ", dZ.cols(), Z.cols(), "columns (columns of Z)");
    return evaluate(function, Z, labels, &dZ);
  }

 private:
  AnyLoss(const Options& options, MetricFn metric) : metric_(std::move(metric)), options_(options) {
    detail::require_positive("AnyLoss", "options.amplify", options.amplify);
    detail::require_finite("AnyLoss", "options.amplify", options.amplify);
    detail::require_positive("AnyLoss", "options.beta", options.beta);
    detail::require_finite("AnyLoss", "options.beta", options.beta);
    detail::require_nonnegative("AnyLoss", "options.stabilizer", options.stabilizer);
    detail::require_finite("AnyLoss", "options.stabilizer", options.stabilizer);
  }

  bool logits() const { return options_.input == AnyLossInput::Logits; }

  template <class DZ, class DY>
  S evaluate(std::string_view function, const Eigen::MatrixBase<DZ>& Z_in, const Eigen::MatrixBase<DY>& labels_in,
             Eigen::Ref<RowMatrix<S>>* dZ) const {
    static_assert(std::is_same_v<typename DY::Scalar, int>, "AnyLoss: labels must be integers (gradus::Labels)");
    const Eigen::Ref<const RowMatrix<S>> Z(Z_in);  // binds vectors and matrices without a copy
    const Eigen::Ref<const Labels> labels(labels_in);
    const std::string_view name = logits() ? "Z (logits)" : "Z (probabilities)";
    detail::require_nonempty(function, name, Z.rows());
    detail::require_nonempty(function, name, Z.cols(), "columns");
    detail::require_size(function, "labels", labels.size(), Z.rows(), "entries (rows of Z)");
    const Index classes = Z.cols() == 1 ? 2 : Z.cols();
    if (!detail::labels_in_range(labels, classes)) detail::require_labels(function, "labels", labels, classes);
    if (!logits()) require_probabilities(function, name, Z);
    return Z.cols() == 1 ? binary(function, Z, labels, dZ) : multiclass(function, Z, labels, dZ);
  }

  S binary(std::string_view function, const Eigen::Ref<const RowMatrix<S>>& Z, const Eigen::Ref<const Labels>& labels,
           Eigen::Ref<RowMatrix<S>>* dZ) const {
    const auto counts = batch_.binary_counts(Z, labels, options_.amplify, logits(), dZ);
    const auto slopes = detail::metric_slopes(metric_, counts, function, "");
    if (dZ) batch_.binary_grad(static_cast<S>(slopes.positive), static_cast<S>(slopes.negative), *dZ);
    return static_cast<S>(1 - slopes.metric);
  }

  S multiclass(std::string_view function, const Eigen::Ref<const RowMatrix<S>>& Z,
               const Eigen::Ref<const Labels>& labels, Eigen::Ref<RowMatrix<S>>* dZ) const {
    const Index classes = Z.cols();
    batch_.multiclass_counts(Z, labels, options_.amplify, logits(), dZ);
    double metric_sum = 0;
    slopes_.resize(classes, 2);
    for (Index c = 0; c < classes; ++c) {  // macro average: each class weighs 1/C
      const std::string which = "class " + detail::to_text(c) + ": ";
      const auto s = detail::metric_slopes(metric_, batch_.class_counts(c), function, which);
      metric_sum += s.metric;
      slopes_(c, 0) = static_cast<S>(s.positive / double(classes));
      slopes_(c, 1) = static_cast<S>(s.negative / double(classes));
    }
    if (dZ) batch_.multiclass_grad(Z, labels, slopes_, logits(), *dZ);
    return static_cast<S>(1 - metric_sum / double(classes));
  }

  static void require_probabilities(std::string_view function, std::string_view name,
                                    const Eigen::Ref<const RowMatrix<S>>& Z) {
    for (Index i = 0; i < Z.rows(); ++i) {
      for (Index c = 0; c < Z.cols(); ++c) {
        const S p = Z(i, c);
        if (p < 0 || p > 1) {
          detail::throw_invalid_argument(function, name, "probabilities in [0, 1]",
                                         detail::to_text(p) + " at row " + detail::to_text(i));
        }
      }
    }
  }

  MetricFn metric_;
  Options options_;
  mutable detail::SoftConfusion<S> batch_;  // scratch: one AnyLoss object serves one thread at a time
  mutable Eigen::Array<S, Eigen::Dynamic, 2> slopes_;
};

template <class S, class MetricFn>
AnyLoss<S, MetricFn> any_loss(MetricFn metric, const AnyLossOptions<S>& options = {}) {
  return AnyLoss<S, MetricFn>(std::move(metric), options);
}

}  // namespace gradus
