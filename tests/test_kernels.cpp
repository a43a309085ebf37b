#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <type_traits>
#include <vector>

#include <gradus/kernels/logistic.hpp>

using namespace gradus;

namespace {

template <class S>
using PacketOf = typename Eigen::internal::packet_traits<S>::type;

// pexp_nonpositive at each x, a packet at a time (the last one padded).
template <class S>
std::vector<S> packet_exp(std::vector<S> x) {
  using namespace Eigen::internal;
  constexpr std::size_t kSize = packet_traits<S>::size;
  const std::size_t n = x.size();
  x.resize((n + kSize - 1) / kSize * kSize, S(-1));
  std::vector<S> y(x.size());
  for (std::size_t i = 0; i < x.size(); i += kSize) {
    pstoreu(y.data() + i, gradus::detail::pexp_nonpositive(ploadu<PacketOf<S>>(x.data() + i)));
  }
  y.resize(n);
  return y;
}

// Largest error against long double exp: in ulps of the exact value where it is a normal S, in
// units of the smallest denormal below. A NaN result counts as an infinite error.
struct ExpError {
  long double normal = 0, denormal = 0;
};

template <class S>
ExpError exp_error(const std::vector<S>& x) {
  const std::vector<S> y = packet_exp(x);
  ExpError worst;
  for (std::size_t i = 0; i < x.size(); ++i) {
    const long double exact = std::exp(static_cast<long double>(x[i]));
    long double error = std::fabs(static_cast<long double>(y[i]) - exact);
    if (exact >= std::numeric_limits<S>::min()) {
      error /= std::ldexp(1.0L, std::ilogb(exact) - (std::numeric_limits<S>::digits - 1));
      worst.normal = std::isnan(error) ? INFINITY : std::max(worst.normal, error);
    } else {
      error /= std::numeric_limits<S>::denorm_min();
      worst.denormal = std::isnan(error) ? INFINITY : std::max(worst.denormal, error);
    }
  }
  return worst;
}

// n points in [lo, 0]: half uniform, half of log-uniform magnitude in [1e-20, -lo].
template <class S>
std::vector<S> random_nonpositive(std::size_t n, S lo) {
  std::mt19937_64 gen(7);
  std::uniform_real_distribution<S> uniform(lo, S(0)), log_magnitude(std::log(S(1e-20)), std::log(-lo));
  std::vector<S> x(n);
  for (std::size_t i = 0; i < n; ++i) x[i] = i % 2 ? uniform(gen) : -std::exp(log_magnitude(gen));
  return x;
}

// Points where the kernels are most likely to go wrong, down to lo: on both sides of each
// (j + 1/2) ln 2 (where the reduction switches k), at each j ln 2, around powers of two down to
// the smallest denormal, and densely across the denormal range (below log of the smallest normal).
template <class S>
std::vector<S> hard_nonpositive(S lo) {
  const long double ln2 = std::log(2.0L);
  std::vector<S> x;
  for (int j = 0; -(j + 0.5L) * ln2 >= lo; ++j) {
    const S mid = static_cast<S>(-(j + 0.5L) * ln2);
    S up = mid, down = mid;
    for (int d = 0; d < 16; ++d, up = std::nextafter(up, S(0)), down = std::nextafter(down, lo)) {
      x.push_back(up);
      x.push_back(down);
    }
    x.push_back(static_cast<S>(-j * ln2));
  }
  for (int e = std::numeric_limits<S>::min_exponent - std::numeric_limits<S>::digits; std::ldexp(S(1), e) <= -lo;
       ++e) {
    const S p = -std::ldexp(S(1), e);
    for (const S q : {p, std::nextafter(p, S(0)), std::nextafter(p, lo)}) x.push_back(q);
  }
  const S normal_edge = std::log(std::numeric_limits<S>::min());
  for (int i = 0; i <= 20000; ++i) x.push_back(normal_edge + (lo - normal_edge) * S(i) / S(20000));
  return x;
}

}  // namespace

TEMPLATE_TEST_CASE("pexp_nonpositive: exp(-0) = 1, NaN stays NaN, lanes independent", "[kernels]", float, double) {
  using S = TestType;
  const S nan = std::numeric_limits<S>::quiet_NaN();
  std::vector<S> x = {S(-0.0), S(0), nan, S(-1), S(-1e-30), S(-10), nan, S(-0.5)};
  const std::vector<S> y = packet_exp(x);
  CHECK(y[0] == 1);
  CHECK(y[1] == 1);
  CHECK(std::isnan(y[2]));
  CHECK(std::isnan(y[6]));
  for (const int i : {3, 4, 5, 7}) CHECK(y[i] == Approx(std::exp(x[i])).epsilon(4 * std::numeric_limits<S>::epsilon()));
  CHECK(packet_exp(std::vector<S>{-std::numeric_limits<S>::infinity()})[0] == 0);
}

// Eigen's own exp clamps its argument at -88.7 (float) / -709.8 (double): every float below
// came out as 2.9e-39, which made gradients 1e5 times too large in builds without AVX-512.
TEMPLATE_TEST_CASE("pexp_nonpositive: within the stated ulps of exp, denormals within one, underflow to 0",
                   "[kernels]", float, double) {
  using S = TestType;
  // The bounds of logistic.hpp on AVX-512: 0.89 ulp for floats (measured on every float), 1 ulp
  // for doubles (0.97 measured on 1e8 random ones); elsewhere Eigen's packet ops, without
  // vscalef and, before AVX2, without FMA. lo is about where exp(x) starts rounding to 0.
  const bool single = std::is_same_v<S, float>;
#ifdef EIGEN_VECTORIZE_AVX512
  const long double bound = single ? 0.89L : 1.0L;
#else
  const long double bound = 2.0L;
#endif
  const S lo = single ? S(-103.98) : S(-745.14);

  const ExpError random = exp_error(random_nonpositive<S>(1 << 21, lo));
  const ExpError hard = exp_error(hard_nonpositive<S>(lo));
  INFO("random: " << double(random.normal) << " ulp, " << double(random.denormal) << " denormals; hard: "
                  << double(hard.normal) << " ulp, " << double(hard.denormal) << " denormals");
  CHECK(random.normal <= bound);
  CHECK(hard.normal <= bound);
  CHECK(random.denormal <= 1);
  CHECK(hard.denormal <= 1);

  // Underflow below lo, down to -inf, gives 0 (+0, not a denormal), in every lane.
  const std::vector<S> tiny = packet_exp(std::vector<S>{lo - S(0.01), lo - S(1), S(-1000), S(-1e30),
                                                        -std::numeric_limits<S>::max(),
                                                        -std::numeric_limits<S>::infinity(), S(-3e3), S(-2e4)});
  for (const S t : tiny) {
    CHECK(t == 0);
    CHECK_FALSE(std::signbit(t));
  }
}
