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
// L collapses training when few p_i lie near 1/2. Any L in (0, max(S)/2] is accepted. beta:
// any finite beta > 0 (b -> 0 tends to precision, b -> inf to recall). The stabilizer s
// (default 0, any finite s >= 0) is the authors' s = 1e-5 added to the denominators that
// vanish on a one-class batch: with s = 0, a batch where the metric is undefined (G-mean or
// balanced accuracy without positives or without negatives, F1 with neither positives nor
// predicted positives) throws gradus::invalid_argument, as does any metric whose value or
// partials are not finite on finite counts (a user metric writes its own s where it wants
// one), except where the partials are infinite only at a class whose a_i are all exactly 0
// or all 1 (G-mean at TP = 0): their chain factors are all 0, and so is their gradient.
// Probabilities must lie in [0, 1]; non-finite inputs propagate as NaN. The inputs are
// checked as the pass reads them, so when a call throws, dZ holds unspecified values.
// An AnyLoss object keeps scratch between calls: use one object per thread.

#include <algorithm>
#include <cmath>
#include <concepts>
#include <limits>
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
    detail::require_enumerator("ConfusionMetric", "metric", metric, 5);
    const T s(stabilizer);
    switch (metric) {
      case Metric::Accuracy:
        return (tp + tn) / (tp + fn + fp + tn);
      case Metric::F1:
        return 2 * tp / (2 * tp + fn + fp + s);
      case Metric::FBeta: {
        // Divided through by 1 + b^2, with weights b^2 / (1 + b^2) and 1 / (1 + b^2) formed from
        // t = min(b^2, 1/b^2) <= 1, so that every beta works: b -> 0 is precision, b -> inf recall.
        const double t = beta >= 1 ? 1 / (beta * beta) : beta * beta;
        const double on_fn = (beta >= 1 ? 1 : t) / (1 + t), on_fp = (beta >= 1 ? t : 1) / (1 + t);
        return tp / (tp + on_fn * fn + on_fp * (fp + s));
      }
      case Metric::GMean:
        return sqrt(tp / (tp + fn + s) * (tn / (tn + fp + s)));
      case Metric::BalancedAccuracy:
        return (tp / (tp + fn + s) + tn / (tn + fp + s)) / 2;
    }
    return T(0);  // unreachable: the enumerator was checked
  }
};

template <class S>
struct AnyLossOptions {
  Metric metric = Metric::F1;  // ignored when the loss is given a user metric
  S amplify = 73;              // L in (0, max(S)/2]; authors' code. 10-40 is the stable range on real data
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
  const bool counts_finite = std::isfinite(k.tp + k.fn + k.fp + k.tn);
  // A class with no sample in the batch has no a_i to differentiate: its slope is unused. One
  // whose a_i are all exactly 0 (sum_a = 0) or all 1 has chain factors L a_i (1 - a_i) that are
  // all 0: its slope multiplies only zeros, so where the metric's partials are infinite there
  // (G-mean's sqrt at TP = 0) it is 0, as a dual number's zero tangent stays zero.
  const auto slope = [&](Index samples, double raw, double sum_a, double sum_not_a) {
    if (samples == 0) return 0.0;
    return counts_finite && !std::isfinite(raw) && (sum_a == 0 || sum_not_a == 0) ? 0.0 : raw;
  };
  const double positive = slope(k.positives, m.grad[1] - m.grad[0], k.tp, k.fn);
  const double negative = slope(k.negatives, m.grad[3] - m.grad[2], k.fp, k.tn);
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

// The kernels run over blocks of about this many entries, in stages through L1 buffers; the
// per-lane sums in S, of about kAnyLossBlock / packet size terms, move to double once per block.
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
#ifdef EIGEN_VECTORIZE_AVX512
      if constexpr (std::same_as<P, __m512>) {  // GCC leaves the loop below scalar
        const __m512d low = _mm512_cvtps_pd(_mm512_castps512_ps256(block_[k]));
        const __m512d high = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(block_[k]), 1)));
        _mm512_storeu_pd(totals_[k], _mm512_add_pd(_mm512_loadu_pd(totals_[k]), low));
        _mm512_storeu_pd(totals_[k] + 8, _mm512_add_pd(_mm512_loadu_pd(totals_[k] + 8), high));
        block_[k] = _mm512_setzero_ps();
        continue;
      }
#endif
      alignas(64) S lanes[kPacketSize<S>];
      Eigen::internal::pstore(lanes, block_[k]);
      for (int j = 0; j < kPacketSize<S>; ++j) totals_[k][j] += double(lanes[j]);
      block_[k] = Eigen::internal::pset1<P>(S(0));
    }
  }

#ifdef EIGEN_VECTORIZE_AVX512
  // The same for AVX-512 floats from lane masks: no mask-to-vector conversions.
  EIGEN_ALWAYS_INLINE void add(__mmask16 positive, __mmask16 negative, const __m512& a, const __m512& not_a)
    requires std::same_as<P, __m512>
  {
    block_[0] = _mm512_mask_add_ps(block_[0], positive, block_[0], a);
    block_[1] = _mm512_mask_add_ps(block_[1], positive, block_[1], not_a);
    block_[2] = _mm512_mask_add_ps(block_[2], negative, block_[2], a);
    block_[3] = _mm512_mask_add_ps(block_[3], negative, block_[3], not_a);
    block_[4] = _mm512_mask_add_ps(block_[4], positive, block_[4], _mm512_set1_ps(1));
  }
#endif

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

// What binary pass 1 saw of its inputs as it read them: the caller then validates them
// without reading them again.
struct BinaryInputs {
  unsigned largest_label = 0;  // as unsigned, so that a negative label is large
  bool outside_unit = false;   // a probability below 0 or above 1 (NaN is neither)
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
SoftCounts binary_pass_packets(const S* z, const int* labels, Index n, S L, S* weight, BinaryInputs& inputs) {
  using namespace Eigen::internal;
  using P = Packet<S>;
  constexpr Index kSize = kPacketSize<S>;
  const P sign = pset1<P>(S(-0.0)), L_p = pset1<P>(L), half_L = pset1<P>(L / 2);
  const P two_L = padd(L_p, L_p), minus_L = pnegate(L_p), minus_half_L = pnegate(half_L);
  LaneCounts<S> counts;
  // One block, zero-padded to whole packets (padding counts in neither class): x (z, then
  // L (p - 1/2)), e = exp(-|x|), dp/dz (then the signed chain factor), y and 1 - y.
  alignas(64) S x[kAnyLossBlock], e[kAnyLossBlock], dp[kAnyLossBlock], y[kAnyLossBlock], not_y[kAnyLossBlock];
  for (Index start = 0; start < n; start += kAnyLossBlock) {
    const Index size = std::min<Index>(kAnyLossBlock, n - start);
    const Index padded = (size + kSize - 1) / kSize * kSize;
    unsigned largest = 0, outside = 0;
    for (Index i = 0; i < size; ++i) {  // plain loops: the compiler vectorizes them
      x[i] = z[start + i];
      largest = std::max(largest, unsigned(labels[start + i]));
      y[i] = S(labels[start + i]);
      not_y[i] = 1 - y[i];
      if constexpr (!Logits) outside |= unsigned(x[i] < 0) | unsigned(x[i] > 1);
    }
    inputs.largest_label = std::max(inputs.largest_label, largest);
    inputs.outside_unit = inputs.outside_unit || outside != 0;
    for (Index i = size; i < padded; ++i) x[i] = y[i] = not_y[i] = 0;
    for (Index i = 0; i < padded; i += kSize) {
      P xi = pload<P>(x + i);
      if constexpr (!Logits) pstore(x + i, xi = pmadd(L_p, xi, minus_half_L));
      pstore(e + i, pexp_nonpositive(pnegate(pabs(xi))));
    }
    if constexpr (Logits) {  // p = sigmoid(z): L (p - 1/2) = sign(z) L/2 (r - e r) needs no select
      for (Index i = 0; i < padded; i += kSize) {
        const P zi = pload<P>(x + i);
        const auto l = logistic_from_exp(zi, pload<P>(e + i));
        const P er = pmul(l.e, l.r);
        pstore(dp + i, pmul(er, l.r));
        pstore(x + i, por(pand(zi, sign), pmul(half_L, psub(l.r, er))));
      }
      for (Index i = 0; i < padded; i += kSize) pstore(e + i, pexp_nonpositive(pnegate(pabs(pload<P>(x + i)))));
    }
    for (Index i = 0; i < padded; i += kSize) {
      const auto a = logistic_from_exp(pload<P>(x + i), pload<P>(e + i));
      const P yi = pload<P>(y + i);
      counts.add(yi, pload<P>(not_y + i), a.sigma, a.complement);
      P w = pmul(pmadd(two_L, yi, minus_L), pmul(pmul(a.e, a.r), a.r));  // +-L a (1 - a)
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

#ifdef EIGEN_VECTORIZE_AVX512
// 2^t for t <= 0 (or NaN), for the second sigmoid of the AVX-512 float pass only: k = round(t),
// 2^(t - k) (t - k exact) by a degree-5 minimax polynomial on [-1/2, 1/2], vscalefps for 2^k
// (it rounds underflow to denormals or 0). Relative error below 3 x 2^-24 = 1.8e-7 (measured,
// float evaluation), against pexp_nonpositive's ~1 ulp, in 8 instructions instead of 12. Only
// for arguments that carry a larger error already: see binary_pass_avx512.
EIGEN_ALWAYS_INLINE __m512 pexp2_nonpositive(const __m512& t) {
  const __m512 k = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, k);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(1.3264728769e-3f), f, _mm512_set1_ps(9.6715131831e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5507337445e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022242077e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314697760e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, k);
}

// The lanes of a packet that hold one of the `left` entries still to do.
EIGEN_ALWAYS_INLINE __mmask16 packet_mask(Index left) {
  return left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
}

// Blocks ahead that binary_pass_avx512 requests from memory: out of cache, the hardware
// prefetcher alone left it waiting (N = 1e7: 3x slower).
inline constexpr Index kAnyLossPrefetchBlocks = 4;

// binary_pass_packets for AVX-512 floats, same contract and the same sigmoids, with
// - lane masks instead of 0/1 vectors: int32 labels tested as loaded, the counts added under
//   masks, the padding of the last packet masked out of loads, counts and the store;
// - four stages per block: e_p = exp(-|z|) (pexp_nonpositive); r_p = 1/(1 + e_p), the chain
//   factor e_p r_p^2 = p (1 - p) and t = -|x| log2(e) = -(L/2) log2(e) (1 - e_p) r_p, with no
//   select (the sign of x is that of z, or of p - 1/2: stage 4 reads it again); e_a = 2^t;
//   r_a = 1/(1 + e_a), the counts and the weight. Split so, each stage's chain fits the
//   out-of-order window (exp and division in one loop: 1.25x slower).
// Accuracy: x = L (p - 1/2) comes from a rounded p (|error| ~2^-25 near p = 1/2) and a few
// roundings, as in binary_pass_packets, so it is uncertain by about (L/2 + 2 |x|) 2^-24, and
// so is e_a = exp(-|x|) relatively: pexp2_nonpositive's 3 x 2^-24 adds little to that. The
// relative error of a and of 1 - a stays below (8 + L + 4 |x|) 2^-24 and that of da/dz below
// (16 + L + 4 |x|) 2^-24 wherever they are normal floats (tests/test_anyloss.cpp checks both
// kernels against long double; each uses under half of it).
template <bool Logits>
SoftCounts binary_pass_avx512(const float* z, const int* labels, Index n, float L, float* weight,
                              BinaryInputs& inputs) {
  const __m512 one = _mm512_set1_ps(1), sign = _mm512_set1_ps(-0.0f), L_p = _mm512_set1_ps(L);
  const float L_log2e = L * 1.44269504088896341f;
  const __m512 L_log2e_p = _mm512_set1_ps(L_log2e), minus_half_L_log2e = _mm512_set1_ps(-L_log2e / 2);
  const __m512 middle = _mm512_set1_ps(Logits ? 0.0f : 0.5f);  // x < 0 where the input is below this
  LaneCounts<float> counts;
  __m512i largest = _mm512_setzero_si512();
  __mmask16 outside = 0;
  alignas(64) float e[kAnyLossBlock], t[kAnyLossBlock], chain[kAnyLossBlock];
  for (Index start = 0; start < n; start += kAnyLossBlock) {
    const Index size = std::min<Index>(kAnyLossBlock, n - start);
    const Index ahead = start + kAnyLossPrefetchBlocks * kAnyLossBlock;
    for (Index i = ahead; i < std::min(n, ahead + kAnyLossBlock); i += 16) {
      __builtin_prefetch(z + i);
      __builtin_prefetch(labels + i);
      if (weight) __builtin_prefetch(weight + i, 1);
    }
    const float* v = z + start;
    const int* y = labels + start;
    for (Index i = 0; i < size; i += 16) {
      const __m512 vi = _mm512_maskz_loadu_ps(packet_mask(size - i), v + i);
      if constexpr (Logits) {
        _mm512_store_ps(e + i, pexp_nonpositive(_mm512_or_ps(vi, sign)));
      } else {  // t directly, by one rounding of L log2(e) (p - 1/2)
        outside |= _mm512_cmp_ps_mask(vi, _mm512_setzero_ps(), _CMP_LT_OQ) | _mm512_cmp_ps_mask(vi, one, _CMP_GT_OQ);
        _mm512_store_ps(t + i, _mm512_or_ps(_mm512_fmadd_ps(L_log2e_p, vi, minus_half_L_log2e), sign));
      }
    }
    if constexpr (Logits) {
      for (Index i = 0; i < size; i += 16) {
        const __m512 ei = _mm512_load_ps(e + i);
        const __m512 r = _mm512_div_ps(one, _mm512_add_ps(one, ei)), er = _mm512_mul_ps(ei, r);
        _mm512_store_ps(t + i, _mm512_mul_ps(_mm512_sub_ps(r, er), minus_half_L_log2e));
        if (weight) _mm512_store_ps(chain + i, _mm512_mul_ps(er, r));
      }
    }
    for (Index i = 0; i < size; i += 16) _mm512_store_ps(e + i, pexp2_nonpositive(_mm512_load_ps(t + i)));
    for (Index i = 0; i < size; i += 16) {
      const __mmask16 valid = packet_mask(size - i);
      const __m512i yi = _mm512_maskz_loadu_epi32(valid, y + i);
      largest = _mm512_max_epu32(largest, yi);
      const __mmask16 positive = _mm512_test_epi32_mask(yi, yi), negative = _kandn_mask16(positive, valid);
      const __mmask16 below = _mm512_cmp_ps_mask(_mm512_maskz_loadu_ps(valid, v + i), middle, _CMP_LT_OQ);
      const __m512 ei = _mm512_load_ps(e + i);
      const __m512 r = _mm512_div_ps(one, _mm512_add_ps(one, ei)), er = _mm512_mul_ps(ei, r);
      counts.add(positive, negative, _mm512_mask_blend_ps(below, r, er), _mm512_mask_blend_ps(below, er, r));
      if (weight) {
        __m512 w = _mm512_mul_ps(_mm512_mul_ps(er, r), L_p);  // L a (1 - a)
        if constexpr (Logits) w = _mm512_mul_ps(w, _mm512_load_ps(chain + i));
        const __m512i bits = _mm512_castps_si512(w);
        w = _mm512_castsi512_ps(_mm512_mask_xor_epi32(bits, negative, bits, _mm512_castps_si512(sign)));
        _mm512_mask_storeu_ps(weight + start + i, valid, w);
      }
    }
    counts.flush();
  }
  inputs.largest_label = std::max(inputs.largest_label, unsigned(_mm512_reduce_max_epu32(largest)));
  inputs.outside_unit = inputs.outside_unit || outside != 0;
  return counts.total(n);
}
#endif

// Binary pass 1: the AVX-512 float kernel where there is one, else Eigen's packets.
template <bool Logits, class S>
SoftCounts binary_pass(const S* z, const int* labels, Index n, S L, S* weight, BinaryInputs& inputs) {
#ifdef EIGEN_VECTORIZE_AVX512
  if constexpr (std::is_same_v<S, float>) {
    return binary_pass_avx512<Logits>(z, labels, n, L, weight, inputs);
  } else
#endif
  {
    return binary_pass_packets<Logits>(z, labels, n, L, weight, inputs);
  }
}

// Whether a slope (a double) keeps its relative precision as an S: 0 or a normal S. Float
// slopes beyond (a precision's, near no predicted positive; 1/TN for a tiny TN) would turn
// chain factors of 0 into NaN and tiny ones into infinities.
template <class S>
bool fits(double slope) {
  const double size = std::abs(slope);
  return size == 0 || (size >= double(std::numeric_limits<S>::min()) && size <= double(std::numeric_limits<S>::max()));
}

// Binary pass 2: w = slope(y) |w|, the label read from the sign of w (pass 1). Slopes that do
// not fit S take the scalar loop, in double, for every entry.
template <class S>
void binary_slopes(S* w, Index n, double positive, double negative) {
  using namespace Eigen::internal;
  using P = Packet<S>;
  constexpr Index kSize = kPacketSize<S>;
  const P sign_bit = pset1<P>(S(-0.0)), one = pset1<P>(S(1)), zero = pzero(one);
  const P if_positive = pset1<P>(S(positive)), if_negative = pset1<P>(S(-negative));
  const Index whole = fits<S>(positive) && fits<S>(negative) ? n / kSize * kSize : 0;
  for (Index i = 0; i < whole; i += kSize) {
    const P wi = ploadu<P>(w + i);
    const P is_negative = pcmp_lt(por(pand(wi, sign_bit), one), zero);  // +-1 from the sign bit: -0 < 0
    pstoreu(w + i, pmul(wi, pselect(is_negative, if_negative, if_positive)));
  }
  for (Index i = whole; i < n; ++i) w[i] = S(double(w[i]) * (std::signbit(w[i]) ? -negative : positive));
}

// Class indices in SIMD lanes, compared exactly: as int32 beside float lanes (a float holds
// every integer only up to 2^24), as doubles beside double lanes.
template <class S>
struct ClassLanes {
  using Label = S;
  using Packet = detail::Packet<S>;
};

template <>
struct ClassLanes<float> {
  using Label = int;
  using Packet = Eigen::internal::unpacket_traits<detail::Packet<float>>::integer_packet;
};

// The labels of rows q w .. q w + w - 1 (w the packet width), -1 in the padding of a partial panel.
template <class S>
typename ClassLanes<S>::Packet panel_labels(const Eigen::Ref<const Labels>& labels, Index q) {
  constexpr Index kSize = kPacketSize<S>;
  alignas(64) typename ClassLanes<S>::Label y[kSize];
  const Index rows = std::min(kSize, labels.size() - q * kSize);
  for (Index j = 0; j < rows; ++j) y[j] = labels(q * kSize + j);
  for (Index j = rows; j < kSize; ++j) y[j] = -1;
  return Eigen::internal::pload<typename ClassLanes<S>::Packet>(y);
}

// All bits set in the lanes whose label is c.
template <class S>
Packet<S> lanes_of_class(const typename ClassLanes<S>::Packet& y, Index c) {
  using namespace Eigen::internal;
  using LabelPacket = typename ClassLanes<S>::Packet;
  const LabelPacket same = pcmp_eq(y, pset1<LabelPacket>(typename ClassLanes<S>::Label(c)));
  if constexpr (std::is_same_v<LabelPacket, Packet<S>>) {
    return same;
  } else {
    return preinterpret<Packet<S>>(same);
  }
}

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
    inputs_ = {};
    return logits ? binary_pass<true>(z, y, n, L, weight, inputs_) : binary_pass<false>(z, y, n, L, weight, inputs_);
  }

  // The labels and probabilities binary_counts read.
  const BinaryInputs& binary_inputs() const { return inputs_; }

  // dz_i = slope(y_i) * da_i/dz_i, the latter stored by binary_counts.
  void binary_grad(double positive, double negative, Eigen::Ref<RowMatrix<S>>& dZ) {
    S* weight = strided_grad_ ? grad_column_.data() : dZ.data();
    binary_slopes(weight, dZ.rows(), positive, negative);
    if (strided_grad_) dZ.col(0) = grad_column_;
  }

  // Multi-class: per class c the counts TP, FN, FP, TN of the one-vs-rest problem, with
  // y_i = [label_i == c]. Rows run in panels of a packet's width, transposed: packet c of a
  // panel holds class c of its rows, so the softmax's row max and sum and pass 2's dot product
  // are lane-wise and every packet is full whatever C. Blocks of panels run in stages as the
  // binary pass does. With a gradient, p (logits) and da/dp = L a (1 - a) stay in this layout
  // for pass 2.
  void multiclass_counts(const Eigen::Ref<const RowMatrix<S>>& Z, const Eigen::Ref<const Labels>& labels, S L,
                         bool logits, bool grad) {
    using namespace Eigen::internal;
    constexpr Index kSize = kPacketSize<S>;
    const Index n = Z.rows(), classes = Z.cols(), panels = (n + kSize - 1) / kSize, panel = classes * kSize;
    // Panels per block: at least a block's worth of packets in each stage, as in the binary pass.
    const Index block = std::max<Index>(1, kAnyLossBlock / panel);
    rows_ = n;
    counts_.setZero(classes, kSums);
    lanes_.setZero(kSums * panel);
    staged_.resize(kSize, classes + kSize);  // a padded panel: whole packets from any row and class
    x_.resize(block * panel);  // no-ops after the first call at a given shape
    e_.resize(block * panel);
    if (grad) {
      if (logits) probabilities_.resize(panels * panel);
      da_.resize(panels * panel);
    }
    const P L_p = pset1<P>(L), minus_half_L = pset1<P>(-L / 2), one = pset1<P>(S(1));
    Index unflushed = 0;  // panels summed in lanes_ since the last flush
    for (Index first = 0; first < panels; first += block) {
      const Index count = std::min(block, panels - first), packets = count * classes;
      S* x = x_.data();
      S* e = e_.data();
      for (Index k = 0; k < count; ++k) gather_panel(Z, first + k, x + k * panel);
      if (logits) {  // max-shifted softmax of each row: one exp and one division per entry
        for (Index k = 0; k < count; ++k) {
          S* xk = x + k * panel;
          P max = pload<P>(xk);
          for (Index c = 1; c < classes; ++c) max = pmax(max, pload<P>(xk + c * kSize));
          for (Index c = 0; c < classes; ++c) pstore(xk + c * kSize, psub(pload<P>(xk + c * kSize), max));
        }
        for (Index i = 0; i < packets * kSize; i += kSize) pstore(x + i, pexp_nonpositive(pload<P>(x + i)));
        for (Index k = 0; k < count; ++k) {
          S* xk = x + k * panel;
          P sum = pload<P>(xk);
          for (Index c = 1; c < classes; ++c) sum = padd(sum, pload<P>(xk + c * kSize));
          for (Index c = 0; c < classes; ++c) pstore(xk + c * kSize, pdiv(pload<P>(xk + c * kSize), sum));
        }
        if (grad) std::copy(x, x + packets * kSize, probabilities_.data() + first * panel);
      }
      for (Index i = 0; i < packets * kSize; i += kSize) {  // a = A(p): the exps, then the divisions
        const P t = pmadd(L_p, pload<P>(x + i), minus_half_L);
        pstore(x + i, t);
        pstore(e + i, pexp_nonpositive(pnegate(pabs(t))));
      }
      for (Index k = 0; k < count; ++k) {
        const LabelPacket y = panel_labels<S>(labels, first + k);
        const P valid = pandnot(one, lanes_of_class<S>(y, -1));  // the padding's label
        for (Index c = 0; c < classes; ++c) {
          const Index i = k * panel + c * kSize;
          const auto a = logistic_from_exp(pload<P>(x + i), pload<P>(e + i));
          if (grad) pstore(da_.data() + first * panel + i, pmul(L_p, pmul(pmul(a.e, a.r), a.r)));
          const P positive = pand(lanes_of_class<S>(y, c), one), negative = psub(valid, positive);
          S* lanes = lanes_.data() + kSums * c * kSize;
          pstore(lanes, pmadd(positive, a.sigma, pload<P>(lanes)));
          pstore(lanes + kSize, pmadd(positive, a.complement, pload<P>(lanes + kSize)));
          pstore(lanes + 2 * kSize, pmadd(negative, a.sigma, pload<P>(lanes + 2 * kSize)));
          pstore(lanes + 3 * kSize, pmadd(negative, a.complement, pload<P>(lanes + 3 * kSize)));
          pstore(lanes + 4 * kSize, padd(positive, pload<P>(lanes + 4 * kSize)));
        }
      }
      unflushed += count;
      if (unflushed >= kAnyLossBlock / kSize || first + count == panels) {  // lanes sum in S a few terms each
        for (Index c = 0; c < classes; ++c) {
          for (Index k = 0; k < kSums; ++k) {
            S* lanes = lanes_.data() + (kSums * c + k) * kSize;
            for (Index j = 0; j < kSize; ++j) counts_(c, k) += double(lanes[j]);
            std::fill(lanes, lanes + kSize, S(0));
          }
        }
        unflushed = 0;
      }
    }
  }

  SoftCounts class_counts(Index c) const {
    const auto positives = static_cast<Index>(counts_(c, 4));
    return {counts_(c, 0), counts_(c, 1), counts_(c, 2), counts_(c, 3), positives, rows_ - positives};
  }

  // slopes: C x 2, dloss/da for the class's positives and negatives. dloss/dp = slope * da/dp;
  // with logits, back through the softmax: dz = p (g' - <p, g'>), the dot product lane-wise,
  // where g' = g - g_r and r is the row's most probable class (the first of ties): the same dz
  // (softmax rows sum to 1), but rounded relative to |g'|, not |g|. With the g_c nearly equal,
  // dz is much smaller than g, and <p, g> (1 - sum p) alone would be rounding of order eps |g|;
  // with p_r >= 1/C, |<p, g'>| <= (C + 1) sum |dz|, so each row of dz sums to zero within
  // about (3C^2 + 2C + 1)/2 eps of its l1 norm (C eps with an FMA dot product, else 2C eps, for
  // the dot, C eps for 1 - sum p, 2 eps for the rest), plus C denormals of underflow.
  // Slopes that do not fit S take the scalar loop, in double.
  void multiclass_grad(const Eigen::Ref<const Labels>& labels, const Eigen::Array<double, Eigen::Dynamic, 2>& slopes,
                       bool logits, Eigen::Ref<RowMatrix<S>>& dZ) {
    using namespace Eigen::internal;
    if (!slopes.unaryExpr([](double slope) { return fits<S>(slope); }).all()) {
      return multiclass_grad_in_double(labels, slopes, logits, dZ);
    }
    constexpr Index kSize = kPacketSize<S>;
    const Index classes = dZ.cols(), panels = (dZ.rows() + kSize - 1) / kSize, panel = classes * kSize;
    slopes_ = slopes.template cast<S>();
    S* g = x_.data();  // one panel
    for (Index q = 0; q < panels; ++q) {
      const LabelPacket y = panel_labels<S>(labels, q);
      const S* da = da_.data() + q * panel;
      for (Index c = 0; c < classes; ++c) {
        const P slope = pselect(lanes_of_class<S>(y, c), pset1<P>(slopes_(c, 0)), pset1<P>(slopes_(c, 1)));
        pstore(g + c * kSize, pmul(pload<P>(da + c * kSize), slope));
      }
      if (logits) {  // g - g_ref first, g_ref that of the row's most probable class
        const S* p = probabilities_.data() + q * panel;
        P top = pload<P>(p), ref = pload<P>(g);
        for (Index c = 1; c < classes; ++c) {
          const P pc = pload<P>(p + c * kSize), above = pcmp_lt(top, pc);
          top = pselect(above, pc, top);
          ref = pselect(above, pload<P>(g + c * kSize), ref);
        }
        P dot = pzero(ref);
        for (Index c = 0; c < classes; ++c) {
          const P shifted = psub(pload<P>(g + c * kSize), ref);
          pstore(g + c * kSize, shifted);
          dot = pmadd(pload<P>(p + c * kSize), shifted, dot);
        }
        for (Index c = 0; c < classes; ++c) {
          pstore(g + c * kSize, pmul(pload<P>(p + c * kSize), psub(pload<P>(g + c * kSize), dot)));
        }
      }
      scatter_panel(g, q, dZ);
    }
  }

 private:
  using P = Packet<S>;
  using LabelPacket = typename ClassLanes<S>::Packet;


  // multiclass_grad one row at a time in double, from the same da/dp and p.
  void multiclass_grad_in_double(const Eigen::Ref<const Labels>& labels,
                                 const Eigen::Array<double, Eigen::Dynamic, 2>& slopes, bool logits,
                                 Eigen::Ref<RowMatrix<S>>& dZ) {
    constexpr Index kSize = kPacketSize<S>;
    const Index classes = dZ.cols();
    Eigen::ArrayXd g(classes);
    for (Index i = 0; i < dZ.rows(); ++i) {
      const Index at = i / kSize * classes * kSize + i % kSize;  // row i, class 0, in the panel layout
      Index top = 0;
      for (Index c = 0; c < classes; ++c) {
        g(c) = double(da_(at + c * kSize)) * slopes(c, labels(i) == c ? 0 : 1);
        if (logits && probabilities_(at + top * kSize) < probabilities_(at + c * kSize)) top = c;
      }
      double dot = 0;
      if (logits) {  // g - g_ref first, as in multiclass_grad
        const double ref = g(top);
        g -= ref;
        for (Index c = 0; c < classes; ++c) dot += double(probabilities_(at + c * kSize)) * g(c);
      }
      for (Index c = 0; c < classes; ++c) {
        dZ(i, c) = S(logits ? double(probabilities_(at + c * kSize)) * (g(c) - dot) : g(c));
      }
    }
  }

  // Panel q of Z (rows q w .. q w + w - 1, w the packet width) transposed into `to`: class c
  // at to + c w, w x w tiles at a time through registers (ptranspose). A partial last tile
  // loads whole packets too, past the rows' ends (the extra lanes are dropped); a panel where
  // that would leave Z, or a partial one, goes through a zero-padded copy.
  void gather_panel(const Eigen::Ref<const RowMatrix<S>>& Z, Index q, S* to) {
    using namespace Eigen::internal;
    constexpr Index kSize = kPacketSize<S>;
    const Index rows = std::min(kSize, Z.rows() - q * kSize), classes = Z.cols();
    const Index last = (q * kSize + kSize - 1) * Z.outerStride() + (classes + kSize - 1) / kSize * kSize;
    const S* from = Z.data() + q * kSize * Z.outerStride();
    Index stride = Z.outerStride();
    if (rows < kSize || last > (Z.rows() - 1) * Z.outerStride() + classes) {
      staged_.setZero();
      staged_.topLeftCorner(rows, classes) = Z.middleRows(q * kSize, rows);
      from = staged_.data();
      stride = staged_.cols();
    }
    for (Index c = 0; c < classes; c += kSize) {
      PacketBlock<P, kSize> tile;
      for (Index j = 0; j < kSize; ++j) tile.packet[j] = ploadu<P>(from + j * stride + c);
      ptranspose(tile);
      for (Index j = 0; j < std::min(kSize, classes - c); ++j) pstore(to + (c + j) * kSize, tile.packet[j]);
    }
  }

  // The inverse of gather_panel, into dZ; the last C mod w classes are scattered, a stride
  // that defeats the hardware prefetcher: the rows of panel q + 2 are requested meanwhile.
  void scatter_panel(const S* from, Index q, Eigen::Ref<RowMatrix<S>>& dZ) {
    using namespace Eigen::internal;
    constexpr Index kSize = kPacketSize<S>;
    const Index rows = std::min(kSize, dZ.rows() - q * kSize), classes = dZ.cols();
    S* to = rows < kSize ? staged_.data() : dZ.data() + q * kSize * dZ.outerStride();
    const Index stride = rows < kSize ? staged_.cols() : dZ.outerStride();
    prefetch_panel(dZ.data(), dZ.rows(), classes, dZ.outerStride(), q + 2);
    const Index tiled = classes / kSize * kSize;
    for (Index c = 0; c < tiled; c += kSize) {
      PacketBlock<P, kSize> tile;
      for (Index j = 0; j < kSize; ++j) tile.packet[j] = pload<P>(from + (c + j) * kSize);
      ptranspose(tile);
      for (Index j = 0; j < kSize; ++j) pstoreu(to + j * stride + c, tile.packet[j]);
    }
    for (Index c = tiled; c < classes; ++c) pscatter<S, P>(to + c, pload<P>(from + c * kSize), stride);
    if (rows < kSize) dZ.middleRows(q * kSize, rows) = staged_.topLeftCorner(rows, classes);
  }

  // Requests the cache lines of panel q of a rows x cols matrix (none past its end).
  static void prefetch_panel(const S* data, Index rows, Index cols, Index stride, Index q) {
    constexpr Index kSize = kPacketSize<S>, kLine = 64 / sizeof(S);
    for (Index i = q * kSize; i < std::min(rows, (q + 1) * kSize); ++i) {
      for (Index c = 0; c < cols; c += kLine) Eigen::internal::prefetch(data + i * stride + c);
    }
  }


  Vector<S> column_, grad_column_;
  bool strided_grad_ = false;
  BinaryInputs inputs_;
  // Multi-class scratch, panels of C packets: p and da/dp of all rows, one block's stages, lane sums.
  Eigen::Array<S, Eigen::Dynamic, 1> probabilities_, da_, x_, e_, lanes_;
  Eigen::Array<S, Eigen::Dynamic, 2> slopes_;
  RowMatrix<S> staged_;  // one panel, row-major
  static constexpr int kSums = 5;  // per class: TP, FN, FP, TN and the count of positives
  Eigen::Array<double, Eigen::Dynamic, kSums> counts_;
  Index rows_ = 0;
};

#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif

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
    detail::require_enumerator("AnyLoss", "options.metric", options.metric, 5);
    detail::require_enumerator("AnyLoss", "options.input", options.input, 2);
    // Up to half the largest S: the kernels form 2 L and L log2(e).
    const S largest_amplify = std::numeric_limits<S>::max() / 2;
    detail::require(options.amplify > 0 && options.amplify <= largest_amplify, "AnyLoss", "options.amplify",
                    "a value in (0, " + detail::to_text(largest_amplify) + "]", options.amplify);
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
    if (Z.cols() == 1) return binary(function, name, Z, labels, dZ);
    if (!detail::labels_in_range(labels, Z.cols())) detail::require_labels(function, "labels", labels, Z.cols());
    if (!logits()) require_probabilities(function, name, Z);
    return multiclass(function, Z, labels, dZ);
  }

  S binary(std::string_view function, std::string_view name, const Eigen::Ref<const RowMatrix<S>>& Z,
           const Eigen::Ref<const Labels>& labels, Eigen::Ref<RowMatrix<S>>* dZ) const {
    const auto counts = batch_.binary_counts(Z, labels, options_.amplify, logits(), dZ);
    // Pass 1 checked the inputs as it read them (a throw leaves dZ unspecified).
    const auto& inputs = batch_.binary_inputs();
    if (inputs.largest_label > 1) detail::require_labels(function, "labels", labels, 2);
    if (inputs.outside_unit) require_probabilities(function, name, Z);
    const auto slopes = detail::metric_slopes(metric_, counts, function, "");
    if (dZ) batch_.binary_grad(slopes.positive, slopes.negative, *dZ);
    return static_cast<S>(1 - slopes.metric);
  }

  S multiclass(std::string_view function, const Eigen::Ref<const RowMatrix<S>>& Z,
               const Eigen::Ref<const Labels>& labels, Eigen::Ref<RowMatrix<S>>* dZ) const {
    const Index classes = Z.cols();
    batch_.multiclass_counts(Z, labels, options_.amplify, logits(), dZ != nullptr);
    double metric_sum = 0;
    slopes_.resize(classes, 2);
    for (Index c = 0; c < classes; ++c) {  // macro average: each class weighs 1/C
      const std::string which = "class " + detail::to_text(c) + ": ";
      const auto s = detail::metric_slopes(metric_, batch_.class_counts(c), function, which);
      metric_sum += s.metric;
      slopes_(c, 0) = s.positive / double(classes);
      slopes_(c, 1) = s.negative / double(classes);
    }
    if (dZ) batch_.multiclass_grad(labels, slopes_, logits(), *dZ);
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
  mutable Eigen::Array<double, Eigen::Dynamic, 2> slopes_;
};

template <class S, class MetricFn>
AnyLoss<S, MetricFn> any_loss(MetricFn metric, const AnyLossOptions<S>& options = {}) {
  return AnyLoss<S, MetricFn>(std::move(metric), options);
}

}  // namespace gradus
