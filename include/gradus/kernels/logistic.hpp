#pragma once
// Packet kernels of the logistic function (internal), shared by the losses built on exp,
// sigmoid and softplus: exp of non-positive arguments, the sigmoid and its complement from
// one exp, and a running sum of softplus values that takes one product per packet instead
// of a log.

#include <algorithm>
#include <cstddef>
#include <iterator>
#include <type_traits>

#include <Eigen/Core>

namespace gradus::detail {

// Packets are vector types whose alignment attributes GCC drops as template arguments, as
// Eigen's own headers do (they silence the same warning).
#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wignored-attributes"
#endif

// exp of x <= 0 (or NaN, which stays NaN), exact to about an ulp down to the smallest denormal
// and 0 below: Eigen's pexp clamps its argument at -88.7 (float) and -709.8 (double), where its
// result stops following exp (2.9e-39 for every float below), so the kernels, whose exps of
// shifted logits reach far below, take this one. x - k ln 2 with ln 2 in two parts (the high
// one short enough that k ln2_hi is exact), a polynomial fitted for relative error on
// |r| <= ln 2 / 2, by Horner over the coefficients below, then the product by 2^k, which rounds
// once into the denormals. For floats the polynomial is degree 6 (3e-9), for doubles degree 11
// (minimax, 3.7e-18; 7.3e-18 with coefficients rounded to double).
template <class S>
struct ExpNonpositive;

template <>
struct ExpNonpositive<float> {
  static constexpr float kLowest = -104.0f;  // below, exp(x) < 2^-150 rounds to 0
  static constexpr float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  static constexpr float kPoly[] = {1.3814612757e-3f, 8.3687100559e-3f, 4.1668388993e-2f, 1.6666521132e-1f,
                                    4.9999994040e-1f, 1.0f, 1.0f};
};

template <>
struct ExpNonpositive<double> {
  static constexpr double kLowest = -746.0;  // below, exp(x) < 2^-1076 rounds to 0
  // ln 2's high part has 42 bits, so k ln2_hi is exact for |k| <= 2^11.
  static constexpr double kLog2e = 1.4426950408889634, kLn2Hi = 0x1.62e42fefa38p-1, kLn2Lo = 0x1.ef358p-45;
  static constexpr double kPoly[] = {0x1.ad7fac3a3dbb3p-26, 0x1.28ad9fc932ac4p-22, 0x1.71df2573d83aap-19,
                                     0x1.a01999dd3d258p-16, 0x1.a01a012a27f18p-13, 0x1.6c16c1843ad0fp-10,
                                     0x1.1111111127cc3p-7,  0x1.5555555550827p-5,  0x1.55555555554fbp-3,
                                     0x1.000000000000ap-1,  1.0,                   1.0};
};

template <class Packet>
EIGEN_ALWAYS_INLINE Packet pexp_nonpositive(const Packet& x) {
  using namespace Eigen::internal;
  using Scalar = typename unpacket_traits<Packet>::type;
  // Other scalars (long double references in tests, say) have no packets: Eigen's exp serves.
  if constexpr (!std::is_same_v<Scalar, float> && !std::is_same_v<Scalar, double>) {
    return pexp(x);
  } else {
    using K = ExpNonpositive<Scalar>;
    const Packet v = pmax(x, pset1<Packet>(K::kLowest));  // Eigen's pmax keeps a NaN first argument
    const Packet k = pfloor(pmadd(v, pset1<Packet>(K::kLog2e), pset1<Packet>(0.5)));
    const Packet r = psub(psub(v, pmul(k, pset1<Packet>(K::kLn2Hi))), pmul(k, pset1<Packet>(K::kLn2Lo)));
    Packet p = pset1<Packet>(K::kPoly[0]);
    for (std::size_t i = 1; i < std::size(K::kPoly); ++i) p = pmadd(p, r, pset1<Packet>(K::kPoly[i]));
    return pldexp(p, k);
  }
}
#ifdef EIGEN_VECTORIZE_AVX512
// The same on AVX-512, 12 instructions for floats instead of Eigen's 19 (within 0.89 ulp of
// exp over every float in [-104, 0], within one denormal below the normal range) and ~9 cycles
// a packet for doubles instead of Eigen's 19.4 (within 0.97 ulp on 1e8 random doubles in
// [-745, 0]): the rounding of k and vscalefps / vscalefpd for the product by 2^k (which rounds
// into the denormals and to 0, so no upper clamp is needed); for doubles the terms from r^2 on
// run as two chains in r^2, even and odd, for a shorter latency (one chain takes ~9.7 cycles).
EIGEN_ALWAYS_INLINE __m512 pexp_nonpositive(const __m512& x) {
  using K = ExpNonpositive<float>;
  const __m512 v = _mm512_max_ps(_mm512_set1_ps(K::kLowest), x);  // max keeps NaN (its second operand)
  const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(v, _mm512_set1_ps(K::kLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(K::kLn2Hi), v);
  r = _mm512_fnmadd_ps(k, _mm512_set1_ps(K::kLn2Lo), r);
  __m512 p = _mm512_set1_ps(K::kPoly[0]);
  for (std::size_t i = 1; i < std::size(K::kPoly); ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(K::kPoly[i]));
  return _mm512_scalef_ps(p, k);
}
EIGEN_ALWAYS_INLINE __m512d pexp_nonpositive(const __m512d& x) {
  using K = ExpNonpositive<double>;
  const __m512d v = _mm512_max_pd(_mm512_set1_pd(K::kLowest), x);
  const __m512d k = _mm512_roundscale_pd(_mm512_mul_pd(v, _mm512_set1_pd(K::kLog2e)),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512d r = _mm512_fnmadd_pd(k, _mm512_set1_pd(K::kLn2Hi), v);  // exact
  r = _mm512_fnmadd_pd(k, _mm512_set1_pd(K::kLn2Lo), r);
  const auto c = [](int i) { return _mm512_set1_pd(K::kPoly[i]); };  // kPoly[i]: r^(11 - i)
  const __m512d r2 = _mm512_mul_pd(r, r);
  __m512d odd = c(0), even = c(1);  // r^11, r^10, then down in r^2 to r^3, r^2
  for (int i = 2; i <= 6; i += 2) {
    odd = _mm512_fmadd_pd(odd, r2, c(i));
    even = _mm512_fmadd_pd(even, r2, c(i + 1));
  }
  __m512d p = _mm512_fmadd_pd(odd, r, even);
  for (int i = 8; i < 12; ++i) p = _mm512_fmadd_pd(p, r, c(i));
  return _mm512_scalef_pd(p, k);
}
#endif

// exp of n values x <= 0 in place, packet by packet with pexp_nonpositive (the last packet
// padded with zeros), for softmaxes whose shifted logits fall below Eigen's exp clamp.
template <class S>
void exp_nonpositive_in_place(S* x, Eigen::Index n) {
  using namespace Eigen::internal;
  using Packet = typename packet_traits<S>::type;
  constexpr Eigen::Index size = unpacket_traits<Packet>::size;
  Eigen::Index i = 0;
  for (; i + size <= n; i += size) pstoreu(x + i, pexp_nonpositive(ploadu<Packet>(x + i)));
  if (i < n) {
    S tail[size] = {};
    std::copy(x + i, x + n, tail);
    pstoreu(tail, pexp_nonpositive(ploadu<Packet>(tail)));
    std::copy(tail, tail + (n - i), x + i);
  }
}

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
