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
// (1 / denominator for a mean). Ignored rows give value 0 and a zero gradient row.
//
// One pass structure per row, one exp per element: max, then e = exp(h - max) written
// straight into the gradient row while summing, then the gradient row is rescaled in place
// (the row is still in cache). Rows of few classes (C < kSmallClasses) are all loop overhead
// row by row, so they go through a second path that transposes a block of rows into a small
// buffer and vectorizes across samples instead. With GRADUS_OPENMP, blocks of rows are split
// statically over threads and the per-thread sums are added in thread order (deterministic
// for a given thread count). dlogits may alias logits.

#include <algorithm>
#include <cmath>

#include <Eigen/Core>

#include "gradus/core/types.hpp"

#ifdef GRADUS_OPENMP
#include <omp.h>
#endif

namespace gradus::detail {

// Classes below this go through the across-samples path.
inline constexpr Index kSmallClasses = 16;

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

// Per-sample value and gradient coefficients (see the header comment) on lanes of samples;
// A is an Eigen array, one lane per sample. active is 1 for counted rows, 0 otherwise.
template <class A>
struct CompSumTerms {
  A value, a, b, c;
};

// With m the row max and s = sum_j exp(h_j - m): lp = (h_y - m) - log s, and
// dot = sum_j v_j (h_j - m), both shifted by m so that large logits lose no digits.
template <class S, class A>
CompSumTerms<A> comp_sum_terms(const CompSumJob<S>& job, const A& lp, const A& log_s, const A& dot, const A& v_y,
                               const A& active) {
  const S t = job.tau - 1;
  const S keep = (1 - job.smoothing) * job.scale;
  const S spread = job.smoothing / S(job.cols) * job.scale;
  CompSumTerms<A> terms;
  if (t == 0) {
    terms.value = keep * v_y * (-lp);
    terms.b = keep * v_y;
  } else {
    const A tlp = t * lp;
    terms.value = (-keep / t) * v_y * tlp.expm1();
    terms.b = keep * v_y * tlp.exp();
  }
  terms.c = active * spread;
  if (job.smoothing > 0) terms.value += terms.c * (job.class_weight_sum * log_s - dot);
  terms.a = terms.b + terms.c * job.class_weight_sum;
  // Ignored rows contribute nothing, even when their logits are not finite.
  terms.value = (active > 0).select(terms.value, A::Zero());
  return terms;
}

// sum_j exp(x_j - m), writing the terms to e when it is not null.
template <class S>
S sum_exp(const S* x, S* e, Index n, S m) {
  using Chunk = Eigen::Array<S, 2 * Eigen::internal::packet_traits<S>::size, 1>;
  Chunk acc = Chunk::Zero();
  Index j = 0;
  for (; j + Chunk::SizeAtCompileTime <= n; j += Chunk::SizeAtCompileTime) {
    const Chunk ej = (Eigen::Map<const Chunk>(x + j) - m).exp();
    if (e != nullptr) Eigen::Map<Chunk>(e + j) = ej;
    acc += ej;
  }
  S total = acc.sum();
  for (; j < n; ++j) {
    const S ej = std::exp(x[j] - m);
    if (e != nullptr) e[j] = ej;
    total += ej;
  }
  return total;
}

// One row of many classes; returns its (scaled) value.
template <class S>
S comp_sum_row(const CompSumJob<S>& job, Index i) {
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
  const S m = row.maxCoeff();
  S dot = 0;
  if (job.smoothing > 0) dot = job.class_weight ? ((row - m) * Row(job.class_weight, n)).sum() : (row - m).sum();
  const S s = sum_exp(x, g, n, m);
  const S log_s = std::log(s);
  const S v_y = job.class_weight ? job.class_weight[y] : S(1);
  const auto terms = comp_sum_terms(job, One(h_y - m - log_s), One(log_s), One(dot), One(v_y), One(1));
  if (g != nullptr) {
    Eigen::Map<Eigen::Array<S, Eigen::Dynamic, 1>> grad(g, n);
    grad *= terms.a(0) / s;
    if (terms.c(0) != 0) {
      if (job.class_weight) grad -= terms.c(0) * Row(job.class_weight, n);
      else grad -= terms.c(0);
    }
    g[y] -= terms.b(0);
  }
  if (job.per_sample != nullptr) job.per_sample[i] = terms.value(0);
  return terms.value(0);
}

// Rows of few classes are processed kLanes at a time (one SIMD register of samples).
template <class S>
inline constexpr int kLanes = 2 * Eigen::internal::packet_traits<S>::size;

// Transposes the logits of `count` <= kLanes rows into t[c * kLanes + l] = x[l * ld + c],
// padding missing rows with 0, and back: g[l * ld + c] = t[c * kLanes + l] for l < count.
template <class S>
void gather_columns(const S* x, Index ld, Index n, Index count, S* t) {
  for (Index l = 0; l < count; ++l)
    for (Index c = 0; c < n; ++c) t[c * kLanes<S> + l] = x[l * ld + c];
  for (Index l = count; l < kLanes<S>; ++l)
    for (Index c = 0; c < n; ++c) t[c * kLanes<S> + l] = 0;
}

template <class S>
void scatter_columns(const S* t, Index n, Index count, S* g, Index ld) {
  for (Index l = 0; l < count; ++l)
    for (Index c = 0; c < n; ++c) g[l * ld + c] = t[c * kLanes<S> + l];
}

// Up to kLanes rows of few classes, vectorized across the rows; returns their (scaled) value sum.
template <class S>
S comp_sum_block(const CompSumJob<S>& job, Index first, Index count) {
  constexpr int L = kLanes<S>;
  using Lanes = Eigen::Array<S, L, 1>;
  using LaneMap = Eigen::Map<Lanes, Eigen::Aligned>;
  const Index n = job.cols;
  auto v = [&](Index c) { return job.class_weight ? job.class_weight[c] : S(1); };
  alignas(64) S t[kSmallClasses * L];  // t[c * L + l]: class c of row first + l
  gather_columns(job.logits + first * job.ld_logits, job.ld_logits, n, count, t);
  Lanes v_y, active, column, h_y;  // padding lanes are inactive
  for (int l = 0; l < L; ++l) {
    const int y = l < count ? job.labels[first + l] : job.ignore_index;
    active(l) = y != job.ignore_index;
    column(l) = active(l) > 0 ? S(y) : S(0);
    v_y(l) = active(l) > 0 ? v(y) : S(0);
    h_y(l) = t[Index(column(l)) * L + l];
  }
  Lanes m = LaneMap(t);
  for (Index c = 1; c < n; ++c) m = m.max(LaneMap(t + c * L));
  Lanes dot = Lanes::Zero();
  if (job.smoothing > 0) {
    for (Index c = 0; c < n; ++c) dot += v(c) * (LaneMap(t + c * L) - m);
  }
  Lanes s = Lanes::Zero();
  for (Index c = 0; c < n; ++c) {
    LaneMap e(t + c * L);
    e = (e - m).exp();
    s += e;
  }
  const Lanes log_s = s.log();
  const auto terms = comp_sum_terms(job, Lanes(h_y - m - log_s), log_s, dot, v_y, active);
  if (job.grad != nullptr) {
    const Lanes a_over_s = terms.a / s;
    for (Index c = 0; c < n; ++c) {
      LaneMap g(t + c * L);
      g = g * a_over_s - v(c) * terms.c - (column == S(c)).select(terms.b, Lanes::Zero());
      g = (active > 0).select(g, Lanes::Zero());  // ignored rows: zero, even for non-finite logits
    }
    scatter_columns(t, n, count, job.grad + first * job.ld_grad, job.ld_grad);
  }
  if (job.per_sample != nullptr) {
    Eigen::Map<Eigen::Array<S, Eigen::Dynamic, 1>>(job.per_sample + first, count) = terms.value.head(count);
  }
  return terms.value.sum();
}

// Runs the job over all rows; returns the sum of the (scaled) per-row values.
template <class S>
double comp_sum_rows(const CompSumJob<S>& job) {
  const bool small = job.cols < kSmallClasses;
  const Index lanes = kLanes<S>;
  const Index units = small ? (job.rows + lanes - 1) / lanes : job.rows;
  auto run = [&](Index begin, Index end) {
    double total = 0;
    for (Index u = begin; u < end; ++u) {
      total += small ? comp_sum_block(job, u * lanes, std::min(lanes, job.rows - u * lanes)) : comp_sum_row(job, u);
    }
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

}  // namespace gradus::detail
