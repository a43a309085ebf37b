#pragma once
// Packet kernels of the logistic function (internal), shared by the losses built on exp,
// sigmoid and softplus: exp of non-positive arguments, the sigmoid and its complement from
// one exp, and a running sum of softplus values that takes one product per packet instead
// of a log.

#include <Eigen/Core>

namespace gradus::detail {

// Packets are vector types whose alignment attributes GCC drops as template arguments, as
// Eigen's own headers do (they silence the same warning).
#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wignored-attributes"
#endif

// exp of x <= 0 (or NaN, which stays NaN): Eigen's pexp, except for AVX-512 floats, where
// exp is most of the work of the kernels that call this. There a two-part ln 2 keeps
// r = x - k ln 2 exact to ~1 ulp, a degree-6 polynomial fitted for relative error (3e-9) gives
// exp(r) in six FMAs, and vscalefps multiplies by 2^k (rounding underflow to denormals or 0,
// so no upper clamp is needed): 12 instructions instead of Eigen's 19, within 0.89 ulp of
// exp over every float in [-104, 0] (within one denormal below the normal range).
template <class Packet>
EIGEN_ALWAYS_INLINE Packet pexp_nonpositive(const Packet& x) {
  return Eigen::internal::pexp(x);
}
#ifdef EIGEN_VECTORIZE_AVX512
EIGEN_ALWAYS_INLINE __m512 pexp_nonpositive(const __m512& x) {
  // Below -104, exp(x) < 2^-150 rounds to 0; max keeps NaN (its second operand).
  const __m512 v = _mm512_max_ps(_mm512_set1_ps(-104.0f), x);
  const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(v, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), v);  // r = v - k ln 2, |r| <= ln 2 / 2
  r = _mm512_fnmadd_ps(k, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(1.3814612757e-3f), r, _mm512_set1_ps(8.3687100559e-3f));
  for (const float c : {4.1668388993e-2f, 1.6666521132e-1f, 4.9999994040e-1f, 1.0f, 1.0f}) {
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  }
  return _mm512_scalef_ps(p, k);
}
#endif

// The logistic function at x from one exp: with e = exp(-|x|) in [0, 1] and r = 1/(1 + e),
// sigma(x) = (x >= 0 ? r : e r) and 1 - sigma(x) = (x >= 0 ? e r : r), both without
// cancellation and finite for every x; sigma (1 - sigma) = e r^2. At +-inf they are exact
// (in double, Eigen's exp leaves a denormal, ~1e-308, for the 0). NaN stays NaN.
template <class Packet>
struct Logistic {
  Packet e, r, sigma, complement;
};

// The same from e = exp(-|x|) already at hand (kernels that run their exps as a stage of their own).
template <class Packet>
EIGEN_ALWAYS_INLINE Logistic<Packet> logistic_from_exp(const Packet& x, const Packet& e) {
  using namespace Eigen::internal;
  const Packet one = pset1<Packet>(1);
  Logistic<Packet> l;
  l.e = e;
  l.r = pdiv(one, padd(one, e));
  const Packet er = pmul(e, l.r);
  const Packet nonnegative = pcmp_le(pzero(x), x);
  l.sigma = pselect(nonnegative, l.r, er);
  l.complement = pselect(nonnegative, er, l.r);
  return l;
}

template <class Packet>
EIGEN_ALWAYS_INLINE Logistic<Packet> plogistic(const Packet& x) {
  return logistic_from_exp(x, pexp_nonpositive(Eigen::internal::pnegate(Eigen::internal::pabs(x))));
}

// Whether Eigen's pmadd is fused (one rounding), which SoftplusSum's exact corrections need.
#ifdef EIGEN_VECTORIZE_FMA
inline constexpr bool kFusedMultiplyAdd = true;
#else
inline constexpr bool kFusedMultiplyAdd = false;
#endif

// Sum of softplus values sp(x) = log(1 + e^x) = max(x, 0) + log(1 + e), e = exp(-|x|), over
// packets, in about half the instructions of a log per term: the factors 1 + e in [1, 2]
// are multiplied per lane and the product's log is taken once per flush. The rounding of
// each 1 + e and of each product is carried exactly (Sterbenz, FMA) into a correction, so
// every term keeps its full relative accuracy, also for tiny e (large margins) where 1 + e
// rounds to 1. Flush at least every kMaxTerms adds (the product stays below 2^kMaxTerms).
// Exact only with kFusedMultiplyAdd and float or double packets; elsewhere use a log per term.
// A NaN x makes the sum NaN; x = +inf makes it +inf, x = -inf adds 0.
template <class S>
class SoftplusSum {
 public:
  using Packet = typename Eigen::internal::packet_traits<S>::type;
  static constexpr int kMaxTerms = 64;

  // Adds sp(x); returns sigma(x), sp's derivative.
  EIGEN_ALWAYS_INLINE Packet add(const Packet& x) {
    using namespace Eigen::internal;
    const Packet one = pset1<Packet>(1);
    const Logistic<Packet> l = plogistic(x);
    const Packet u = padd(one, l.e), r = l.r;  // r = 1/u
    // log(1 + e) = log(u) + log1p((e - (u - 1)) / u), and e - (u - 1) is exact.
    correction_ = pmadd(psub(l.e, psub(u, one)), r, correction_);
    // log(P u) = log(fl(P u)) + log1p(err / fl(P u)) with err = P u - fl(P u) exact by FMA;
    // 1 / fl(P u) is carried as the product of the r.
    const Packet product = pmul(product_, u);
    inverse_ = pmul(inverse_, r);
    correction_ = pmadd(pmadd(product_, u, pnegate(product)), inverse_, correction_);
    product_ = product;
    linear_ = padd(linear_, pmax(x, pzero(x)));
    return l.sigma;
  }

  // The sum since the last flush, in double (or a wider S); starts a new one.
  auto flush() {
    using namespace Eigen::internal;
    constexpr int kSize = unpacket_traits<Packet>::size;
    S terms[kSize], logs[kSize];
    pstoreu(terms, padd(linear_, correction_));
    pstoreu(logs, plog(product_));
    using Sum = decltype(S() + double());
    Sum sum = 0;
    for (int k = 0; k < kSize; ++k) sum += Sum(terms[k]) + Sum(logs[k]);
    *this = SoftplusSum();
    return sum;
  }

 private:
  Packet linear_ = Eigen::internal::pset1<Packet>(S(0));
  Packet correction_ = Eigen::internal::pset1<Packet>(S(0));
  Packet product_ = Eigen::internal::pset1<Packet>(S(1));
  Packet inverse_ = Eigen::internal::pset1<Packet>(S(1));
};

#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif

}  // namespace gradus::detail
