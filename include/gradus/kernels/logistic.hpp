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

// exp of x <= 0 (or NaN, which stays NaN): Eigen's pexp, except for AVX-512 floats and doubles,
// where exp is most of the work of the kernels that call this. For floats a two-part ln 2 keeps
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
// The same for doubles, in place of Eigen's pexp (19.4 cycles a packet, with a division): ln 2 in
// two parts (the high one of 42 bits, so k ln2_hi is exact for |k| <= 2^11), and a degree-11
// polynomial 1 + r + r^2 P(r), minimax for relative error (3.7e-18; 7.3e-18 with coefficients
// rounded to double): 18 instructions, ~9 cycles a packet, within 0.97 ulp of exp on 1e8
// random doubles in [-745, 0] (within one denormal below -708.4, 0 below -745.14).
EIGEN_ALWAYS_INLINE __m512d pexp_nonpositive(const __m512d& x) {
  // Below -746, exp(x) < 2^-1076 rounds to 0; max keeps NaN (its second operand).
  const __m512d v = _mm512_max_pd(_mm512_set1_pd(-746.0), x);
  const __m512d k = _mm512_roundscale_pd(_mm512_mul_pd(v, _mm512_set1_pd(1.4426950408889634)),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512d r = _mm512_fnmadd_pd(k, _mm512_set1_pd(0x1.62e42fefa38p-1), v);  // exact
  r = _mm512_fnmadd_pd(k, _mm512_set1_pd(0x1.ef358p-45), r);                // |r| <= ln 2 / 2
  // c[i] is P's coefficient of r^i. Horner, except that the terms from r^2 on are two chains in
  // r^2, even and odd, for a shorter latency (one chain takes ~9.7 cycles a packet).
  const double c[] = {0x1.000000000000ap-1,  0x1.55555555554fbp-3,  0x1.5555555550827p-5,
                      0x1.1111111127cc3p-7,  0x1.6c16c1843ad0fp-10, 0x1.a01a012a27f18p-13,
                      0x1.a01999dd3d258p-16, 0x1.71df2573d83aap-19, 0x1.28ad9fc932ac4p-22,
                      0x1.ad7fac3a3dbb3p-26};
  const __m512d r2 = _mm512_mul_pd(r, r);
  __m512d even = _mm512_set1_pd(c[8]), odd = _mm512_set1_pd(c[9]);
  for (int i = 6; i >= 2; i -= 2) {
    even = _mm512_fmadd_pd(even, r2, _mm512_set1_pd(c[i]));
    odd = _mm512_fmadd_pd(odd, r2, _mm512_set1_pd(c[i + 1]));
  }
  __m512d p = _mm512_fmadd_pd(odd, r, even);
  for (const double a : {c[1], c[0], 1.0, 1.0}) p = _mm512_fmadd_pd(p, r, _mm512_set1_pd(a));
  return _mm512_scalef_pd(p, k);
}
#endif

// The logistic function at x from one exp: with e = exp(-|x|) in [0, 1] and r = 1/(1 + e),
// sigma(x) = (x >= 0 ? r : e r) and 1 - sigma(x) = (x >= 0 ? e r : r), both without
// cancellation and finite for every x; sigma (1 - sigma) = e r^2. At +-inf they are exact
// (in double without AVX-512, Eigen's exp leaves a denormal, ~1e-308, for the 0). NaN stays NaN.
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
