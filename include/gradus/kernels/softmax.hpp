#pragma once
// Fused softmax-row kernel of the comp-sum loss family (internal; see losses/comp_sum.hpp).
//
// For a row h with label y, class weights v (all ones when none), W = sum_j v_j, label
// smoothing eps and p = softmax(h), lp = log p_y = h_y - lse(h), r = p_y^(tau-1) = exp((tau-1) lp):
//
//   value = (1-eps) v_y l_tau(lp) + (eps/C) sum_j v_j (lse - h_j)
//   grad  = a p - b e_y - c v,   a = (1-eps) v_y r + (eps/C) W,   b = (1-eps) v_y r,   c = eps/C
//
// with l_tau(lp) = -expm1((tau-1) lp)/(tau-1) (l_1 = -lp); everything times a common scale
// (1 / denominator for a mean). Ignored rows give value 0 and a zero gradient row. The label's
// entry is taken as (a - b) p_y - b (1 - p_y) - c v_y, with 1 - p_y from the sum of the other
// classes' exps: a p_y - b cancels as p_y nears 1, and the row would no longer sum to 0.
//
// One pass structure per row, one exp per element: max, then e = exp(h - max) written
// straight into the gradient row while summing (and while the rows about 8 KiB ahead are
// requested from memory, so that its latency hides behind the exps), then the gradient row is
// rescaled in place (the row is still in cache); a gradient too large to stay in cache is
// built in a scratch row instead and streamed out (kStreamBytes). Rows of few classes
// (C < kSmallClasses) are all loop overhead row by row, so they take a second path: a block
// of kLanes rows is transposed (in registers, with Eigen's packet transpose) so that each
// class is a vector of samples, the same steps run across samples, and the gradient is
// transposed back. With AVX-512 floats, contiguous rows skip the transposes (comp_sum_flat).
// With GRADUS_OPENMP, rows are split statically over threads and the per-thread sums are added
// in thread order (deterministic for a given thread count; the gradient does not depend on
// it). dlogits may alias logits. The value is summed in double.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include <Eigen/Core>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include "gradus/core/types.hpp"
#include "gradus/kernels/logistic.hpp"

#ifdef GRADUS_OPENMP
#include <omp.h>
#endif

namespace gradus::detail {

// Classes below this go through the across-samples path.
inline constexpr Index kSmallClasses = 16;

// Gradients above this size are written with streaming stores, as memcpy does for large copies:
// they would leave the cache before they are read anyway, and a plain store first reads each
// line from memory (half as much traffic again).
inline constexpr std::size_t kStreamBytes = std::size_t(16) << 20;

// Copies n entries with streaming stores where x86 has them (the destination's lines are not
// read first); the caller ends with stream_fence(). Elsewhere a plain copy.
template <class S>
void stream_copy(const S* from, S* to, Index n) {
#if defined(__SSE2__)
#if defined(__AVX512F__)
  using Vector = __m512i;
  const auto store = [](S* at, const S* v) {
    _mm512_stream_si512(reinterpret_cast<Vector*>(at), _mm512_loadu_si512(v));
  };
#elif defined(__AVX__)
  using Vector = __m256i;
  const auto store = [](S* at, const S* v) {
    _mm256_stream_si256(reinterpret_cast<Vector*>(at), _mm256_loadu_si256(reinterpret_cast<const Vector*>(v)));
  };
#else
  using Vector = __m128i;
  const auto store = [](S* at, const S* v) {
    _mm_stream_si128(reinterpret_cast<Vector*>(at), _mm_loadu_si128(reinterpret_cast<const Vector*>(v)));
  };
#endif
  constexpr Index kWidth = Index(sizeof(Vector) / sizeof(S));
  Index j = 0;
  for (; j < n && reinterpret_cast<std::uintptr_t>(to + j) % sizeof(Vector) != 0; ++j) to[j] = from[j];
  for (; j + kWidth <= n; j += kWidth) store(to + j, from + j);
  std::copy(from + j, from + n, to + j);
#else
  std::copy(from, from + n, to);
#endif
}

inline void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

// One call of the kernel: the rows, the loss parameters and where results go.
template <class S>
struct CompSumJob {
  const S* logits;
  Index ld_logits;            // row stride of logits
  Index rows, cols;
  const int* labels;
  int ignore_index;
  const S* class_weight;      // cols entries, or nullptr for all ones
  S class_weight_sum;         // W
  S tau, smoothing;
  S scale;                    // multiplies every value and gradient (1 / denominator for a mean)
  S* grad = nullptr;          // optional gradient rows (may equal logits)
  Index ld_grad = 0;
  S* per_sample = nullptr;    // optional per-row values
};

// Whether the job's gradient is large enough to be streamed out (kStreamBytes).
template <class S>
bool streams_gradient(const CompSumJob<S>& job) {
  return job.grad != nullptr && std::size_t(job.rows * job.cols) * sizeof(S) > kStreamBytes;
}

// Packets are vector types whose alignment attributes GCC drops as template arguments, as
// Eigen's own headers do (they silence the same warning).
#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wignored-attributes"
#endif

// e = exp(x - m) over the whole packets of the lanes array m (x and e may be the same).
template <class A>
void exp_shifted(const typename A::Scalar* x, const A& m, typename A::Scalar* e) {
  using Packet = typename Eigen::internal::packet_traits<typename A::Scalar>::type;
  constexpr int P = Eigen::internal::unpacket_traits<Packet>::size;
  for (int k = 0; k < A::SizeAtCompileTime; k += P) {
    const Packet shifted = Eigen::internal::psub(Eigen::internal::ploadu<Packet>(x + k), Eigen::internal::ploadu<Packet>(m.data() + k));
    Eigen::internal::pstoreu(e + k, pexp_nonpositive(shifted));
  }
}

// Per-sample value and gradient coefficients (see the header comment) on lanes of samples;
// A is an Eigen array, one lane per sample. active is 1 for counted rows, 0 otherwise;
// callers zero the ignored rows themselves.
template <class A>
struct CompSumTerms {
  A value, a, b, c;
};

// The label smoothing's share c of each class weight v_j (eps/C times the job's scale). eps
// meets the scale first: eps/C alone may round a denormal eps to 0, while eps * scale <= scale
// is finite and, for a mean over tiny weights, far from the denormals.
template <class S>
S smoothing_spread(const CompSumJob<S>& job) {
  return job.smoothing * job.scale / S(job.cols);
}

// exp of non-positive lanes by pexp_nonpositive (denormals and 0 right where Eigen's exp is not).
template <class A>
A exp_nonpositive(const A& x) {
  constexpr int P = Eigen::internal::unpacket_traits<typename Eigen::internal::packet_traits<typename A::Scalar>::type>::size;
  if constexpr (A::SizeAtCompileTime % P == 0) {
    A e;
    exp_shifted(x.data(), A(A::Zero()), e.data());
    return e;
  } else {
    return x.exp();  // too few lanes for a packet: std::exp
  }
}

// log p_y from h_y - m, log s, e_y = exp(h_y - m) and the others' sum s - e_y: (h_y - m) - log s,
// except with tau != 1 where p_y > 1/2: there -log1p(others / e_y) keeps the digits the first
// loses to the roundings of h_y - m and of s, which p_y^(tau-1) would magnify tau - 1 times
// (cross-entropy's gradient does not use lp, and its value keeps its absolute accuracy).
template <class S, class A>
A log_p_y(const CompSumJob<S>& job, const A& shifted, const A& log_s, const A& e_y, const A& others) {
  if (job.tau == 1) return shifted - log_s;
  return (e_y > others).select(-(others / e_y).log1p(), shifted - log_s);
}

// With m the row max and s = sum_j exp(h_j - m): lp = log_p_y, and
// dot = c sum_j v_j (h_j - m) (c = smoothing_spread), both shifted by m so that large logits
// lose no digits. Products are ordered so that none overflows before the result does: a large
// class weight meets the factors <= 1 first (1/t last), and a = b without label smoothing;
// c > 1 (a mean over tiny weights) comes last instead. A row of weight 0 has value and b
// exactly 0, even where its loss overflows (tau < 1: 0 * inf would be NaN).
template <class S, class A>
EIGEN_ALWAYS_INLINE CompSumTerms<A> comp_sum_terms(const CompSumJob<S>& job, const A& lp, const A& log_s, const A& dot,
                                                    const A& v_y, const A& active) {
  const S t = job.tau - 1;
  const A weight = (1 - job.smoothing) * job.scale * v_y;
  CompSumTerms<A> terms;
  if (t == 0) {
    terms.value = weight * (-lp);
    terms.b = weight;
  } else {
    const A tlp = t * lp;  // <= 0 for tau > 1: p_y^(tau-1) underflows to denormals and 0, as it should
    terms.value = weight * (tlp.expm1() * (-1 / t));
    if (t > 0) {
      terms.b = weight * exp_nonpositive(tlp);
    } else {  // tau < 1: the loss and p_y^(tau-1) may overflow
      const auto counted = weight != S(0);
      terms.value = counted.select(terms.value, A(A::Zero()));
      terms.b = counted.select(weight * tlp.exp(), A(A::Zero()));
    }
  }
  const S spread = smoothing_spread(job);
  terms.c = active * spread;
  terms.a = terms.b;
  if (job.smoothing > 0) {
    const S w = job.class_weight_sum;
    terms.value += (spread > 1 ? A(w * log_s * terms.c) : A(terms.c * w * log_s)) - dot;
    terms.a += terms.c * w;
  }
  return terms;
}

// sum_j exp(x_j - m), writing the terms to e when it is not null: chunks of four packets,
// then whole packets, then the last partial packet padded with -inf (exp = 0) so that every
// exp is a vector one. While the exps keep the core
// busy, the rows starting at next_x and next_e (when not null, n entries each) are requested
// from memory, so that they arrive before they are read.
template <class S>
S sum_exp(const S* x, S* e, Index n, S m, const S* next_x = nullptr, S* next_e = nullptr) {
  using namespace Eigen::internal;
  using Packet = typename packet_traits<S>::type;
  constexpr Index P = unpacket_traits<Packet>::size, kChunk = 4 * P, kLine = 64 / Index(sizeof(S));
  const Packet shift = pset1<Packet>(m);
  Packet acc[4] = {pzero(shift), pzero(shift), pzero(shift), pzero(shift)};
  auto exp_at = [&](const S* from, Index j, Packet& sum) {
    const Packet ej = pexp_nonpositive(psub(ploadu<Packet>(from), shift));
    if (e != nullptr) pstoreu(e + j, ej);
    sum = padd(sum, ej);
  };
  Index j = 0;
  for (; j + kChunk <= n; j += kChunk) {
    for (Index k = 0; next_x != nullptr && k < kChunk; k += kLine) __builtin_prefetch(next_x + j + k);
    for (Index k = 0; next_e != nullptr && k < kChunk; k += kLine) __builtin_prefetch(next_e + j + k, 1);
    for (int k = 0; k < 4; ++k) exp_at(x + j + k * P, j + k * P, acc[k]);
  }
  for (; j + P <= n; j += P) exp_at(x + j, j, acc[0]);
  if (const Index rest = n - j; rest > 0) {
    alignas(64) S tail[P];
    for (Index k = 0; k < P; ++k) tail[k] = k < rest ? x[j + k] : -std::numeric_limits<S>::infinity();
    const Packet ej = pexp_nonpositive(psub(pload<Packet>(tail), shift));
    acc[1] = padd(acc[1], ej);
    if (e != nullptr) {
      pstore(tail, ej);
      std::copy(tail, tail + rest, e + j);
    }
  }
  return predux(padd(padd(acc[0], acc[1]), padd(acc[2], acc[3])));
}

// max_j x_j over n >= 1 entries, in four accumulators (Eigen's maxCoeff keeps one chain of
// latency and peels to alignment: 2.5x slower on 1000 floats). A NaN may or may not win:
// the caller's exps propagate it either way.
template <class S>
S max_of(const S* x, Index n) {
  using namespace Eigen::internal;
  using Packet = typename packet_traits<S>::type;
  constexpr Index P = unpacket_traits<Packet>::size;
  if (n < 4 * P) return Eigen::Map<const Eigen::Array<S, Eigen::Dynamic, 1>>(x, n).maxCoeff();
  Packet acc[4] = {ploadu<Packet>(x), ploadu<Packet>(x + P), ploadu<Packet>(x + 2 * P), ploadu<Packet>(x + 3 * P)};
  Index j = 4 * P;
  for (; j + 4 * P <= n; j += 4 * P) {
    for (int k = 0; k < 4; ++k) acc[k] = pmax(acc[k], ploadu<Packet>(x + j + k * P));
  }
  for (; j + P <= n; j += P) acc[0] = pmax(acc[0], ploadu<Packet>(x + j));
  if (j < n) acc[1] = pmax(acc[1], ploadu<Packet>(x + n - P));  // the last packet again, overlapping
  return predux_max(pmax(pmax(acc[0], acc[1]), pmax(acc[2], acc[3])));
}

// e_j *= f over n entries; returns the sum of the e_j before (the rescaling pass of a row
// takes its sum at no cost: the loop is bound by its stores).
template <class S>
S scale_and_sum(S* e, Index n, S f) {
  using namespace Eigen::internal;
  using Packet = typename packet_traits<S>::type;
  constexpr Index P = unpacket_traits<Packet>::size;
  const Packet factor = pset1<Packet>(f);
  Packet acc[4] = {pzero(factor), pzero(factor), pzero(factor), pzero(factor)};
  auto step = [&](Index j, Packet& sum) {
    const Packet v = ploadu<Packet>(e + j);
    sum = padd(sum, v);
    pstoreu(e + j, pmul(v, factor));
  };
  Index j = 0;
  for (; j + 4 * P <= n; j += 4 * P) {
    for (int k = 0; k < 4; ++k) step(j + k * P, acc[k]);
  }
  for (; j + P <= n; j += P) step(j, acc[0]);
  S sum = predux(padd(padd(acc[0], acc[1]), padd(acc[2], acc[3])));
  for (; j < n; ++j) {
    sum += e[j];
    e[j] *= f;
  }
  return sum;
}

// One row of many classes; returns its (scaled) value. With `scratch` (cols entries) the
// gradient row is built there, in cache, and streamed out to the gradient.
template <class S>
S comp_sum_row(const CompSumJob<S>& job, Index i, S* scratch) {
  using Row = Eigen::Map<const Eigen::Array<S, Eigen::Dynamic, 1>>;
  using One = Eigen::Array<S, 1, 1>;
  const Index n = job.cols;
  const S* x = job.logits + i * job.ld_logits;
  S* g = job.grad == nullptr ? nullptr : job.grad + i * job.ld_grad;
  const int y = job.labels[i];
  if (y == job.ignore_index) {
    if (g != nullptr) std::fill(g, g + n, S(0));
    if (job.per_sample != nullptr) job.per_sample[i] = 0;
    return 0;
  }
  // Everything read from x before g (which may be x) is written.
  const Row row(x, n);
  const S h_y = x[y];
  const S m = max_of(x, n);
  S dot = 0;
  if (job.smoothing > 0) {
    const S c = smoothing_spread(job);  // c > 1 (a mean over tiny weights) multiplies last
    if (!job.class_weight) dot = ((row - m) * c).sum();  // c <= 1 first: C spreads may overflow
    else if (c > 1) dot = ((row - m) * Row(job.class_weight, n) * c).sum();
    else dot = ((row - m) * c * Row(job.class_weight, n)).sum();
  }
  // Memory is requested about 8 KiB ahead (at least the next row): closer does not hide
  // its latency behind the exps (1.3x slower at 4096 x 1000 floats on the AMD EPYC VM this
  // was tuned on), farther gains nothing.
  const Index ahead = std::max<Index>(1, 8192 / (job.ld_logits * Index(sizeof(S))));
  const bool prefetch = i + ahead < job.rows;
  const S* next_x = prefetch ? x + ahead * job.ld_logits : nullptr;
  S* next_g = prefetch && g != nullptr && scratch == nullptr ? g + ahead * job.ld_grad : nullptr;
  S* e = scratch != nullptr && g != nullptr ? scratch : g;
  // Without a gradient row the exps are not kept: e_y and the others' sum then come from s,
  // except with tau != 1 where p_y > 1/2: s - e_y loses its digits as p_y nears 1, so the
  // others' sum is taken again around the label (s stays the one value_and_grad() sees).
  const S s = sum_exp(x, e, n, m, next_x, next_g);
  const S e_y = e != nullptr ? e[y] : std::exp(h_y - m);
  S others = s - e_y;
  if (e == nullptr && job.tau != 1 && e_y > others) {
    others = sum_exp(x, e, Index(y), m) + sum_exp(x + y + 1, e, n - y - 1, m);
  }
  const S log_s = std::log(s);
  const S v_y = job.class_weight ? job.class_weight[y] : S(1);
  if (e != nullptr && job.tau != 1 && e_y > others) {  // the sum without the label, for log_p_y
    e[y] = 0;
    others = Eigen::Map<Eigen::Array<S, Eigen::Dynamic, 1>>(e, n).sum();
    e[y] = e_y;
  }
  const auto terms = comp_sum_terms(job, log_p_y(job, One(h_y - m), One(log_s), One(e_y), One(others)), One(log_s),
                                    One(dot), One(v_y), One(1));
  if (g != nullptr) {
    // The label's entry a p_y - b = (a - b) p_y - b (1 - p_y) from the sum of the other exps:
    // as p_y nears 1, 1 - p_y taken from s loses every digit (and the row no longer sums to 0).
    e[y] = 0;
    others = scale_and_sum(e, n, terms.a(0) / s);
    e[y] = (terms.a(0) - terms.b(0)) * (e_y / s) - terms.b(0) * (others / s);
    Eigen::Map<Eigen::Array<S, Eigen::Dynamic, 1>> grad(e, n);
    if (terms.c(0) != 0) {
      if (job.class_weight) grad -= terms.c(0) * Row(job.class_weight, n);
      else grad -= terms.c(0);
    }
    if (e != g) stream_copy(e, g, n);
  }
  if (job.per_sample != nullptr) job.per_sample[i] = terms.value(0);
  return terms.value(0);
}

// Rows of few classes are processed kLanes at a time (two SIMD registers of samples).
template <class S>
inline constexpr int kLanes = 2 * Eigen::internal::packet_traits<S>::size;

// The transposes between rows and lanes, t[c * kLanes + l] = x[l * ld + c], for a block of
// `count` <= kLanes rows (missing rows padded with 0) and back for the gradient. Full blocks
// with room after them use Eigen's in-register packet transpose, reading whole packets past
// the end of short rows, but never past the rows the caller owns: with OpenMP the rows after
// them are another thread's, whose gradient may be written there (in place) meanwhile. Stores
// past a row's end are allowed only into the rows of the block written after it, so in-place
// use (g == x) and strided blocks stay exact. Other blocks, and ends of rows, go element by
// element.
template <class S>
struct BlockTranspose {
  using Packet = typename Eigen::internal::packet_traits<S>::type;
  static constexpr int P = Eigen::internal::unpacket_traits<Packet>::size;
  static constexpr int L = kLanes<S>;

  static Index padded(Index n) { return (n + P - 1) / P * P; }

  // Rows [0, end) of n entries with row stride ld: can the block at `first` be read by whole packets?
  static bool can_load(Index first, Index end, Index n, Index ld) {
    return first + L <= end && (first + L - 1) * ld + padded(n) <= (end - 1) * ld + n;
  }

  static void load(const S* x, Index ld, Index n, Index count, bool packets, S* t) {
    if (packets && count == L) {
      for (int h = 0; h < L; h += P) {
        for (Index c0 = 0; c0 < n; c0 += P) {
          Eigen::internal::PacketBlock<Packet, P> block;
          for (int l = 0; l < P; ++l) block.packet[l] = Eigen::internal::ploadu<Packet>(x + (h + l) * ld + c0);
          Eigen::internal::ptranspose(block);
          for (Index c = c0; c < std::min<Index>(c0 + P, n); ++c) Eigen::internal::pstore(t + c * L + h, block.packet[c - c0]);
        }
      }
      return;
    }
    for (Index l = 0; l < L; ++l)
      for (Index c = 0; c < n; ++c) t[c * L + l] = l < count ? x[l * ld + c] : S(0);
  }

  static void store(const S* t, Index n, Index count, S* g, Index ld) {
    // A full contiguous block of rows shorter than a packet is packed in the buffer (each row
    // overwrites the previous one's padding) and written as L n / P whole packets, instead of
    // L unaligned row stores that mostly straddle cache lines.
    const bool packed = count == L && ld == n && n <= P;
    alignas(64) S rows[L * kSmallClasses];  // rows[l * width + c]
    const Index width = packed ? n : padded(n);
    for (int h = 0; h < L; h += P) {
      for (Index c0 = 0; c0 < n; c0 += P) {
        Eigen::internal::PacketBlock<Packet, P> block;
        for (int c = 0; c < P; ++c) block.packet[c] = Eigen::internal::pload<Packet>(t + std::min<Index>(c0 + c, n - 1) * L + h);
        Eigen::internal::ptranspose(block);
        for (int l = 0; l < P; ++l) Eigen::internal::pstoreu(rows + (h + l) * width + c0, block.packet[l]);
      }
    }
    if (packed) {
      for (Index k = 0; k < L * n; k += P) Eigen::internal::pstoreu(g + k, Eigen::internal::pload<Packet>(rows + k));
      return;
    }
    const Index end = (count - 1) * ld + n;  // one past the block's last element
    for (Index l = 0; l < count; ++l) {
      for (Index c0 = 0; c0 < n; c0 += P) {
        if (l * ld + c0 + P <= end && (ld == n || c0 + P <= n)) {
          Eigen::internal::pstoreu(g + l * ld + c0, Eigen::internal::pload<Packet>(rows + l * width + c0));
        } else {
          for (Index c = c0; c < std::min<Index>(c0 + P, n); ++c) g[l * ld + c] = rows[l * width + c];
        }
      }
    }
  }
};

// x[l] where key(l) == value, else +0 (x aligned, L entries). Eigen 3.4's Array comparisons
// are scalar, so this goes through its packet compare; the bitwise and also clears NaN and inf.
// With take, those x[l] are set to +0 (taken out of x).
template <class S, int L>
Eigen::Array<S, L, 1> where_equal(const Eigen::Array<S, L, 1>& key, S value, const S* x, S* take = nullptr) {
  using namespace Eigen::internal;
  using Packet = typename packet_traits<S>::type;
  constexpr int P = unpacket_traits<Packet>::size;
  const Packet v = pset1<Packet>(value);
  Eigen::Array<S, L, 1> out;
  for (int k = 0; k < L; k += P) {
    const Packet equal = pcmp_eq(pload<Packet>(key.data() + k), v), xk = pload<Packet>(x + k);
    pstore(out.data() + k, pand(equal, xk));
    if (take != nullptr) pstore(take + k, pandnot(xk, equal));
  }
  return out;
}

// Up to kLanes rows of few classes, vectorized across the rows, of the caller's rows [.., end);
// returns their (scaled) value sum.
template <class S>
S comp_sum_block(const CompSumJob<S>& job, Index first, Index count, Index end) {
  constexpr int L = kLanes<S>;
  using Lanes = Eigen::Array<S, L, 1>;
  using LaneMap = Eigen::Map<Lanes, Eigen::Aligned>;
  const Index n = job.cols;
  auto v = [&](Index c) { return job.class_weight ? job.class_weight[c] : S(1); };
  alignas(64) S t[kSmallClasses * L];  // t[c * L + l]: class c of row first + l
  // The block is compute-bound, yet on large inputs the hardware prefetchers (of the AMD EPYC
  // VM this was tuned on) leave it waiting for memory (1.4x slower): the block four ahead is
  // requested, its logits for reading and its gradient for writing. (Written inline: GCC 12
  // deletes the same loops moved into a helper function.)
  constexpr Index kAhead = 4 * L, kLine = 64 / Index(sizeof(S));
  if (first + kAhead + L < job.rows) {  // < : the prefetched range stays inside the matrix
    const S* x = job.logits + (first + kAhead) * job.ld_logits;
    for (Index k = 0; k < L * job.ld_logits; k += kLine) __builtin_prefetch(x + k);
    if (job.grad != nullptr) {
      S* g = job.grad + (first + kAhead) * job.ld_grad;
      for (Index k = 0; k < L * job.ld_grad; k += kLine) __builtin_prefetch(g + k, 1);
    }
  }
  using Transpose = BlockTranspose<S>;
  Transpose::load(job.logits + first * job.ld_logits, job.ld_logits, n, count,
                  Transpose::can_load(first, end, n, job.ld_logits), t);
  // Labels as lanes of S (small integers: exact); padding lanes are ignored.
  Lanes y = Lanes::Constant(S(job.ignore_index));
  if (count == L) {
    y = Eigen::Map<const Eigen::Array<int, L, 1>>(job.labels + first).template cast<S>();
  } else {
    for (Index l = 0; l < count; ++l) y(l) = S(job.labels[first + l]);
  }
  const Lanes ones = Lanes::Ones();
  const Lanes active = 1 - where_equal(y, S(job.ignore_index), ones.data());
  const Lanes column = y * active;  // 0 for ignored rows
  const bool all_active = active.minCoeff() > 0;
  Lanes v_y = active;
  if (job.class_weight) {
    for (int l = 0; l < L; ++l) v_y(l) = active(l) > 0 ? job.class_weight[Index(column(l))] : S(0);
  }
  Lanes m = LaneMap(t), h_y = where_equal(column, S(0), t);
  for (Index c = 1; c < n; ++c) {
    m = m.max(LaneMap(t + c * L));
    h_y += where_equal(column, S(c), t + c * L);
  }
  Lanes dot = Lanes::Zero();
  if (job.smoothing > 0) {
    const S spread = smoothing_spread(job);  // spread > 1 (a mean over tiny weights) multiplies last
    if (spread > 1) {
      for (Index c = 0; c < n; ++c) dot += (LaneMap(t + c * L) - m) * v(c) * spread;
    } else {
      for (Index c = 0; c < n; ++c) dot += spread * v(c) * (LaneMap(t + c * L) - m);
    }
  }
  // The label's exp is taken out of t as it is computed: `others`, the sum of the rest, gives
  // 1 - p_y to full precision for the label's gradient entry (see comp_sum_row).
  Lanes others = Lanes::Zero(), e_y = Lanes::Zero();
  for (Index c = 0; c < n; ++c) {
    exp_shifted(t + c * L, m, t + c * L);
    e_y += where_equal(column, S(c), t + c * L, t + c * L);
    others += LaneMap(t + c * L);
  }
  const Lanes s = others + e_y, log_s = s.log();
  auto terms = comp_sum_terms(job, log_p_y(job, Lanes(h_y - m), log_s, e_y, others), log_s, dot, v_y, active);
  if (job.grad != nullptr) {
    const Lanes a_over_s = terms.a / s, label = (terms.a - terms.b) * (e_y / s) - terms.b * (others / s);
    for (Index c = 0; c < n; ++c) {
      LaneMap g(t + c * L);
      g = g * a_over_s - v(c) * terms.c + where_equal(column, S(c), label.data());
    }
  }
  if (!all_active) {  // ignored rows: nothing, even from non-finite logits
    for (int l = 0; l < L; ++l) {
      if (active(l) > 0) continue;
      terms.value(l) = 0;
      for (Index c = 0; c < n; ++c) t[c * L + l] = 0;
    }
  }
  if (job.grad != nullptr) Transpose::store(t, n, count, job.grad + first * job.ld_grad, job.ld_grad);
  if (job.per_sample != nullptr) {
    Eigen::Map<Eigen::Array<S, Eigen::Dynamic, 1>>(job.per_sample + first, count) = terms.value.head(count);
  }
  return terms.value.sum();
}

#ifdef EIGEN_VECTORIZE_AVX512
// The few-class path for AVX-512 floats without the transposes, for contiguous rows and no
// label smoothing. 16 rows of C classes are exactly C registers, so the rows stay in their
// flat layout: one shift per 16 rows (their largest logit) stands in for the row maxima, each
// row's exps are read back by a masked load and summed by a tree of in-register shuffles, and
// each per-row factor reaches the flat lanes by one permute. A block where some row lies far
// below the shift (its sum under kFlatFloor, about e^-39) or that holds a non-finite logit goes
// to comp_sum_block instead; elsewhere the terms a row loses to float's underflow are below
// e^-48 of its sum.
inline constexpr float kFlatFloor = 1e-17f;

// The row of lane l of flat register k, for rows of C classes: the permute that spreads
// per-row factors over the flat lanes.
template <int C>
struct FlatRows {
  struct Table {
    int row[C][16];
  };
  static constexpr Table table = [] {
    Table t{};
    for (int k = 0; k < C; ++k) {
      for (int l = 0; l < 16; ++l) t.row[k][l] = (16 * k + l) / C;
    }
    return t;
  }();
};

// out lane j = the sum of the lanes of a[j], for 16 registers: a transpose-and-add tree.
inline __m512 sum_lanes16(const __m512* a) {
  __m512 b[8], c[4], d[2];
  for (int i = 0; i < 8; ++i) {
    b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  }
  for (int i = 0; i < 4; ++i) {
    const __m512d lo = _mm512_castps_pd(b[2 * i]), hi = _mm512_castps_pd(b[2 * i + 1]);
    c[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(lo, hi)), _mm512_castpd_ps(_mm512_unpackhi_pd(lo, hi)));
  }
  auto halves = [](__m512 u, __m512 v) {  // 128-bit quarters 0, 2 plus quarters 1, 3 of u and v
    return _mm512_add_ps(_mm512_shuffle_f32x4(u, v, 0x88), _mm512_shuffle_f32x4(u, v, 0xDD));
  };
  for (int i = 0; i < 2; ++i) d[i] = halves(c[2 * i], c[2 * i + 1]);
  return halves(d[0], d[1]);
}

// log x of positive normal floats, to 0.83 ulp over [1e-30, 1e4] (Cephes logf's polynomial on
// [sqrt(1/2), sqrt(2)), with the exponent and mantissa from vgetexpps and vgetmantps): a third
// of the cost of Eigen's plog, which also handles zero, negatives and infinities.
inline __m512 log_positive_normal(const __m512 x) {
  __m512 m = _mm512_getmant_ps(x, _MM_MANT_NORM_1_2, _MM_MANT_SIGN_zero);
  __m512 k = _mm512_getexp_ps(x);
  const __mmask16 high = _mm512_cmp_ps_mask(m, _mm512_set1_ps(1.41421356237f), _CMP_GT_OQ);
  m = _mm512_mask_mul_ps(m, high, m, _mm512_set1_ps(0.5f));
  k = _mm512_mask_add_ps(k, high, k, _mm512_set1_ps(1.0f));
  const __m512 f = _mm512_sub_ps(m, _mm512_set1_ps(1.0f)), f2 = _mm512_mul_ps(f, f);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(7.0376836292e-2f), f, _mm512_set1_ps(-1.1514610310e-1f));
  for (const float c : {1.1676998740e-1f, -1.2420140846e-1f, 1.4249322787e-1f, -1.6668057665e-1f, 2.0000714765e-1f,
                        -2.4999993993e-1f, 3.3333331174e-1f}) {
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c));
  }
  __m512 y = _mm512_mul_ps(_mm512_mul_ps(p, f2), f);
  y = _mm512_fmadd_ps(k, _mm512_set1_ps(-2.12194440e-4f), y);  // k ln 2 in two parts
  y = _mm512_fmadd_ps(f2, _mm512_set1_ps(-0.5f), y);
  return _mm512_fmadd_ps(k, _mm512_set1_ps(0.693359375f), _mm512_add_ps(f, y));
}

// Rows [begin, end) in chunks of kFlatChunk rows (end - begin is a multiple of 32), in stages
// over each chunk: the shift of every block of 16 rows; their exps (into L1 scratch); the row
// sums; the values and gradient factors of the whole chunk at once; the gradient rows. Staged
// so, each stage's iterations are independent: one block's chain of max, exps, sums, log and
// gradient is longer than the out-of-order window overlaps. Returns the value sum.
inline constexpr Index kFlatChunk = 128;

template <int C>
double comp_sum_flat(const CompSumJob<float>& job, Index begin, Index end) {
  using Lanes = Eigen::Array<float, kFlatChunk, 1>;
  constexpr auto& rows_of = FlatRows<C>::table.row;
  constexpr __mmask16 kRow = (1u << C) - 1;
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i row_starts = _mm512_mullo_epi32(lanes, _mm512_set1_epi32(C));
  constexpr Index kAhead = 128;  // rows prefetched ahead by the exps' stage (64 and 256 were no faster)
  alignas(64) float e[kFlatChunk * C];  // the chunk's exps, in the rows' layout
  alignas(64) int label_at[kFlatChunk];  // each row's label as a lane of its block's registers, -1 if ignored
  alignas(64) std::uint16_t other_classes[kFlatChunk];  // each row's classes but its label, as a lane mask
  // Lanes past the last block of a short chunk keep harmless values (their results are dropped).
  Lanes shift = Lanes::Zero(), sum = Lanes::Ones(), others = Lanes::Zero(), e_y = Lanes::Zero(), h_y = Lanes::Zero(),
        active = Lanes::Zero(), v_y = Lanes::Zero();
  // Streaming stores here need 64-byte alignment: rows of 16 C floats keep the gradient's.
  const bool stream = streams_gradient(job) && reinterpret_cast<std::uintptr_t>(job.grad) % 64 == 0;
  double total = 0;
  for (Index first = begin; first < end; first += kFlatChunk) {
    const int blocks = int(std::min(kFlatChunk, end - first) / 16);
    unsigned fallback = 0;  // bit q: block q goes to comp_sum_block
    for (int q = 0; q < blocks; ++q) {
      const Index row = first + 16 * q;
      const float* x = job.logits + row * C;
      __m512 m = _mm512_loadu_ps(x);
      for (int k = 1; k < C; ++k) m = _mm512_max_ps(m, _mm512_loadu_ps(x + 16 * k));
      _mm512_store_ps(shift.data() + 16 * q, _mm512_set1_ps(_mm512_reduce_max_ps(m)));
    }
    for (int q = 0; q < blocks; ++q) {
      const Index row = first + 16 * q;
      const float* x = job.logits + row * C;
      if (row + kAhead + 16 <= job.rows) {
        for (int k = 0; k < C; ++k) {
          __builtin_prefetch(x + kAhead * C + 16 * k, 0, 0);  // non-temporal: 9% faster than into every level
          // (A streamed gradient is not read at all.)
          if (job.grad != nullptr && !stream) __builtin_prefetch(job.grad + (row + kAhead) * C + 16 * k, 1);
        }
      }
      const __m512 s = _mm512_load_ps(shift.data() + 16 * q);
      const float largest = shift(16 * q);
      __m512 v[C], ex[C];
      for (int k = 0; k < C; ++k) {
        v[k] = _mm512_loadu_ps(x + 16 * k);
        ex[k] = pexp_nonpositive(_mm512_sub_ps(v[k], s));
        _mm512_store_ps(e + 16 * (q * C + k), ex[k]);
      }
      // The label's logit and exp (class 0 for ignored rows): lane j takes flat lane j C + y_j from
      // the pair of registers that holds it (a gather, or scalar loads, cost twice as much).
      const __m512i y = _mm512_loadu_si512(job.labels + row);
      const __mmask16 counted = _mm512_cmpneq_epi32_mask(y, _mm512_set1_epi32(job.ignore_index));
      const __m512i column = _mm512_maskz_mov_epi32(counted, y);
      const __m512i at = _mm512_add_epi32(row_starts, column), pair = _mm512_srli_epi32(at, 5);
      __m512 label_logit = _mm512_setzero_ps(), label_exp = _mm512_setzero_ps();
      for (int k = 0; k < C; k += 2) {
        const int next = k + 1 < C ? k + 1 : k;
        const __mmask16 here = _mm512_cmpeq_epi32_mask(pair, _mm512_set1_epi32(k / 2));
        label_logit = _mm512_mask_mov_ps(label_logit, here, _mm512_permutex2var_ps(v[k], at, v[next]));
        label_exp = _mm512_mask_mov_ps(label_exp, here, _mm512_permutex2var_ps(ex[k], at, ex[next]));
      }
      _mm512_store_ps(h_y.data() + 16 * q, label_logit);
      _mm512_store_ps(e_y.data() + 16 * q, label_exp);
      const __m512i label_bit = _mm512_sllv_epi32(_mm512_set1_epi32(1), column);
      _mm256_store_si256(reinterpret_cast<__m256i*>(other_classes + 16 * q),
                         _mm512_cvtepi32_epi16(_mm512_andnot_si512(label_bit, _mm512_set1_epi32(kRow))));
      _mm512_store_si512(label_at + 16 * q, _mm512_mask_mov_epi32(_mm512_set1_epi32(-1), counted, at));
      const __m512 on = _mm512_maskz_mov_ps(counted, _mm512_set1_ps(1));
      _mm512_store_ps(active.data() + 16 * q, on);
      _mm512_store_ps(v_y.data() + 16 * q,
                      job.class_weight ? _mm512_mask_i32gather_ps(_mm512_setzero_ps(), counted, column, job.class_weight, 4) : on);
      if (!std::isfinite(largest)) fallback |= 1u << q;
    }
    // The row sums, each row read back by a masked load (the exps' stores are done by now)
    // without its label: the others' sum gives 1 - p_y to full precision (see comp_sum_row).
    for (int q = 0; q < blocks; ++q) {
      __m512 rows[16];
      for (int j = 0; j < 16; ++j) rows[j] = _mm512_maskz_loadu_ps(other_classes[16 * q + j], e + 16 * q * C + j * C);
      const __m512 rest = sum_lanes16(rows), sums = _mm512_add_ps(rest, _mm512_load_ps(e_y.data() + 16 * q));
      _mm512_store_ps(sum.data() + 16 * q, sums);
      _mm512_store_ps(others.data() + 16 * q, rest);
      if (_mm512_cmp_ps_mask(sums, _mm512_set1_ps(kFlatFloor), _CMP_GE_OQ) != 0xFFFF) fallback |= 1u << q;
    }
    Lanes log_s;  // a block that falls back may hold a sum of 0 or NaN: its values are dropped below
    for (int k = 0; k < kFlatChunk; k += 16) {
      _mm512_store_ps(log_s.data() + k, log_positive_normal(_mm512_load_ps(sum.data() + k)));
    }
    auto terms = comp_sum_terms(job, log_p_y(job, Lanes(h_y - shift), log_s, e_y, others), log_s, Lanes(Lanes::Zero()),
                                v_y, active);
    for (int q = blocks; q < kFlatChunk / 16; ++q) terms.value.template segment<16>(16 * q).setZero();
    for (int q = 0; q < blocks; ++q) {
      if (fallback >> q & 1) {
        terms.value.template segment<16>(16 * q).setZero();
        total += comp_sum_block(job, first + 16 * q, 16, end);
      } else if (job.per_sample != nullptr) {
        Eigen::Map<Eigen::Array<float, 16, 1>>(job.per_sample + first + 16 * q) = terms.value.template segment<16>(16 * q);
      }
    }
    total += terms.value.sum();  // 128 terms in float, then double across chunks
    if (job.grad == nullptr) continue;
    const Lanes scale = terms.a / sum, label = -terms.b * (others / sum);  // a = b: a p_y - b = -b (1 - p_y)
    for (int q = 0; q < blocks; ++q) {
      if (fallback >> q & 1) continue;
      const __m512 a = _mm512_load_ps(scale.data() + 16 * q), l = _mm512_load_ps(label.data() + 16 * q);
      const __m512i at = _mm512_load_si512(label_at + 16 * q);
      float* g = job.grad + (first + 16 * q) * C;
      for (int k = 0; k < C; ++k) {
        // a p at every lane but the ones where the row's label lands.
        const __m512i lane_row = _mm512_loadu_si512(rows_of[k]);
        const __mmask16 at_label = _mm512_cmpeq_epi32_mask(_mm512_permutexvar_epi32(lane_row, at),
                                                           _mm512_add_epi32(_mm512_set1_epi32(16 * k), lanes));
        const __m512 ap = _mm512_mul_ps(_mm512_load_ps(e + 16 * (q * C + k)), _mm512_permutexvar_ps(lane_row, a));
        const __m512 gradient = _mm512_mask_mov_ps(ap, at_label, _mm512_permutexvar_ps(lane_row, l));
        if (stream) {
          _mm512_stream_ps(g + 16 * k, gradient);
        } else {
          _mm512_storeu_ps(g + 16 * k, gradient);
        }
      }
    }
  }
  if (stream) stream_fence();  // the streamed gradient is visible to every thread on return
  return total;
}

// Whether comp_sum_flat serves the job, and its entry for the job's C (nullptr if none).
inline auto comp_sum_flat_for(const CompSumJob<float>& job) -> double (*)(const CompSumJob<float>&, Index, Index) {
  const Index c = job.cols;
  if (job.smoothing > 0 || job.ld_logits != c || (job.grad != nullptr && job.ld_grad != c)) return nullptr;
  switch (c) {
    case 2: return comp_sum_flat<2>;
    case 3: return comp_sum_flat<3>;
    case 4: return comp_sum_flat<4>;
    case 5: return comp_sum_flat<5>;
    case 6: return comp_sum_flat<6>;
    case 7: return comp_sum_flat<7>;
    case 8: return comp_sum_flat<8>;
    case 9: return comp_sum_flat<9>;
    case 10: return comp_sum_flat<10>;
    case 11: return comp_sum_flat<11>;
    case 12: return comp_sum_flat<12>;
    case 13: return comp_sum_flat<13>;
    case 14: return comp_sum_flat<14>;
    case 15: return comp_sum_flat<15>;
    default: return nullptr;
  }
}
#endif

// Runs the job over all rows; returns the sum of the (scaled) per-row values.
template <class S>
double comp_sum_rows(const CompSumJob<S>& job) {
  const bool small = job.cols < kSmallClasses;
  const Index lanes = kLanes<S>;
  const Index units = small ? (job.rows + lanes - 1) / lanes : job.rows;
  double (*flat)(const CompSumJob<S>&, Index, Index) = nullptr;
#ifdef EIGEN_VECTORIZE_AVX512
  if constexpr (std::is_same_v<S, float>) flat = comp_sum_flat_for(job);
#endif
  const bool stream = !small && streams_gradient(job);
  auto run = [&](Index begin, Index end) {
    std::vector<S> scratch(stream ? job.cols : 0);
    double total = 0;
    if (small && flat) {  // the whole blocks of rows in one call, the last one apart
      const Index whole = std::min(end, job.rows / lanes);
      if (begin < whole) total += flat(job, begin * lanes, whole * lanes);
      begin = std::max(begin, whole);
    }
    const Index last_row = std::min(job.rows, end * lanes);  // past the rows of this call (small)
    for (Index u = begin; u < end; ++u) {
      total += small ? comp_sum_block(job, u * lanes, std::min(lanes, job.rows - u * lanes), last_row)
                     : comp_sum_row(job, u, stream ? scratch.data() : nullptr);
    }
    if (stream) stream_fence();
    return total;
  };
#ifdef GRADUS_OPENMP
  constexpr int kMaxThreads = 256;
  double partial[kMaxThreads] = {};
  const int threads = std::min(omp_get_max_threads(), kMaxThreads);
  const bool worth_it = job.rows * job.cols >= (Index(1) << 16);
#pragma omp parallel num_threads(threads) if (worth_it)
  {
    const Index team = omp_get_num_threads(), me = omp_get_thread_num();
    partial[me] = run(units * me / team, units * (me + 1) / team);
  }
  double total = 0;
  for (int k = 0; k < threads; ++k) total += partial[k];
  return total;
#else
  return run(0, units);
#endif
}

#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif

}  // namespace gradus::detail
