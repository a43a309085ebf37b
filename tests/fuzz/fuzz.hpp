#pragma once
// Shared pieces of the gradus fuzz harnesses: decoding of the fuzzer's bytes into shapes,
// values and options (LLVM's FuzzedDataProvider), and the failure rules every harness applies.
//
// A harness calls the public API inside fuzz::accepts(); a gradus::invalid_argument (whose
// message must start with "gradus::") means the input was rejected, any other exception is a
// failure. A property violation prints what was violated and aborts, so libFuzzer keeps the
// input as a crash reproducer.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <optional>
#include <initializer_list>
#include <limits>
#include <string>
#include <type_traits>
#include <typeinfo>
#include <vector>

#include <fuzzer/FuzzedDataProvider.h>

#include <Eigen/Core>

#include "gradus/core/errors.hpp"
#include "gradus/core/types.hpp"

namespace fuzz {

// What the harness is calling, decoded, printed with a failure (built only then).
inline std::function<std::string()> call;

[[noreturn]] inline void fail(const std::string& what) {
  std::fprintf(stderr, "\n==gradus-fuzz== property violated: %s\n", what.c_str());
  if (call) std::fprintf(stderr, "==gradus-fuzz== call: %s\n", call().c_str());
  std::fflush(stderr);
  std::abort();
}

#define FUZZ_CHECK(condition, message)                                                                  \
  do {                                                                                                  \
    if (!(condition)) ::fuzz::fail(std::string(__FILE__ ":") + std::to_string(__LINE__) + ": " + #condition + \
                                   " -- " + std::string(message));                                     \
  } while (0)

// True when `tag` is listed in the environment variable GRADUS_FUZZ_MUTE (comma-separated):
// a known finding the harness then steps over, so that a campaign can look past it.
inline bool muted(const char* tag) {
  static const std::string list = [] {
    const char* value = std::getenv("GRADUS_FUZZ_MUTE");
    return "," + std::string(value ? value : "") + ",";
  }();
  return list.find("," + std::string(tag) + ",") != std::string::npos;
}

// Runs a call of the public API: true if it returned, false if it threw gradus::invalid_argument.
template <class F>
bool accepts(F&& call) {
  try {
    call();
    return true;
  } catch (const gradus::invalid_argument& e) {
    const std::string message = e.what();
    if (message.rfind("gradus::", 0) != 0) fail("invalid_argument without the gradus:: prefix: " + message);
    return false;
  } catch (const std::exception& e) {
    fail(std::string("an exception other than gradus::invalid_argument: ") + typeid(e).name() + ": " + e.what());
  } catch (...) {
    fail("an exception of a non-standard type");
  }
}

template <class S>
std::string text(S value) {
  return gradus::detail::to_text(value);
}

template <class D>
std::string show(const Eigen::DenseBase<D>& x) {
  std::string out = "[";
  for (gradus::Index i = 0; i < x.rows(); ++i) {
    for (gradus::Index j = 0; j < x.cols(); ++j) out += (j ? ", " : i ? "; " : "") + text(x.derived()(i, j));
  }
  return out + "] (" + std::to_string(x.rows()) + " x " + std::to_string(x.cols()) + ")";
}

template <class S>
bool finite(const Eigen::DenseBase<S>& x) {
  return x.derived().array().isFinite().all();
}

// One value among `choices`.
template <class T>
T pick(FuzzedDataProvider& in, std::initializer_list<T> choices) {
  return *(choices.begin() + in.ConsumeIntegralInRange<std::size_t>(0, choices.size() - 1));
}

// Values the library must handle: small integers and fractions, -0, denormals, the extremes
// of S, and (unless finite_only) NaN and +-inf. |value| <= bound for the finite ones.
template <class S>
S value(FuzzedDataProvider& in, S bound, bool finite_only) {
  using L = std::numeric_limits<S>;
  S x = 0;
  switch (in.ConsumeIntegralInRange<int>(0, finite_only ? 4 : 5)) {
    case 0:
      x = S(in.ConsumeIntegralInRange<int>(-8, 8));
      break;
    case 1:
    case 2:
      x = bound * S(2 * in.ConsumeProbability<double>() - 1);
      break;
    case 3:
      x = pick<S>(in, {S(0), S(-0.0), L::denorm_min(), -L::denorm_min(), L::min(), L::epsilon(), S(0.5), S(1e-30),
                       S(1e4), S(-1e4), S(1e30), S(-1e30), L::max(), L::lowest()});
      break;
    case 4: {  // raw bits: any value of S
      using Bits = std::conditional_t<sizeof(S) == 4, std::uint32_t, std::uint64_t>;
      const Bits bits = in.ConsumeIntegral<Bits>();
      std::memcpy(&x, &bits, sizeof x);
      if (!std::isfinite(x)) x = 0;
      break;
    }
    default:
      x = pick<S>(in, {L::quiet_NaN(), L::infinity(), -L::infinity()});
      return x;
  }
  if (!(std::abs(x) <= bound)) x = std::copysign(bound, x);
  return x;
}

// An n-vector / rows x cols matrix of such values.
template <class S>
gradus::Vector<S> vector(FuzzedDataProvider& in, gradus::Index n, S bound, bool finite_only) {
  gradus::Vector<S> v(n);
  for (gradus::Index i = 0; i < n; ++i) v(i) = value<S>(in, bound, finite_only);
  return v;
}

template <class S>
gradus::RowMatrix<S> matrix(FuzzedDataProvider& in, gradus::Index rows, gradus::Index cols, S bound,
                            bool finite_only) {
  gradus::RowMatrix<S> m(rows, cols);
  for (gradus::Index i = 0; i < m.size(); ++i) m.data()[i] = value<S>(in, bound, finite_only);
  return m;
}

// A size that is usually `expected` and sometimes anything in [0, limit] (shape mismatches).
inline gradus::Index size_like(FuzzedDataProvider& in, gradus::Index expected, gradus::Index limit) {
  return in.ConsumeIntegralInRange<int>(0, 15) == 0 ? in.ConsumeIntegralInRange<gradus::Index>(0, limit) : expected;
}

// Labels in [0, classes), with an occasional out-of-range or special one.
inline gradus::Labels labels(FuzzedDataProvider& in, gradus::Index n, gradus::Index classes) {
  gradus::Labels y(n);
  for (gradus::Index i = 0; i < n; ++i) {
    y(i) = in.ConsumeIntegralInRange<int>(0, 31) == 0
               ? pick<int>(in, {-1, -100, int(classes), int(classes) + 1, std::numeric_limits<int>::max(),
                                std::numeric_limits<int>::min(), 1 << 24, (1 << 24) + 1})
               : in.ConsumeIntegralInRange<int>(0, int(std::max<gradus::Index>(classes, 1)) - 1);
  }
  return y;
}

// The next representable value above / below.
template <class S>
S up(S x) {
  return std::nextafter(x, std::numeric_limits<S>::infinity());
}
template <class S>
S down(S x) {
  return std::nextafter(x, -std::numeric_limits<S>::infinity());
}

// |x| of a scaled magnitude without overflow, in long double.
template <class D>
long double norm(const Eigen::DenseBase<D>& x) {
  long double largest = 0, sum = 0;
  for (gradus::Index i = 0; i < x.size(); ++i) largest = std::max(largest, std::abs((long double)x.derived()(i)));
  if (largest == 0 || !std::isfinite(largest)) return largest;
  for (gradus::Index i = 0; i < x.size(); ++i) {
    const long double t = (long double)x.derived()(i) / largest;
    sum += t * t;
  }
  return largest * std::sqrt(sum);
}

}  // namespace fuzz

// Every harness defines one template over the scalar and picks float or double from the first byte.
#define GRADUS_FUZZ_ENTRY(harness)                                             \
  extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) { \
    FuzzedDataProvider in(data, size);                                         \
    fuzz::call = nullptr;                                                      \
    if (in.ConsumeBool())                                                      \
      harness<float>(in);                                                      \
    else                                                                       \
      harness<double>(in);                                                     \
    return 0;                                                                  \
  }
