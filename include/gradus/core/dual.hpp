#pragma once
// Forward-mode dual numbers: a value and its partial derivatives with respect to K inputs.
//
//   x = v + sum_k g_k e_k,  with e_j e_k = 0,  so  f(x) = f(v) + f'(v) sum_k g_k e_k.
//
// Write a function once as a template of its arguments, call it with Dual<T, K>::variable(v, k)
// for each input k, and read f and its gradient from the result:
//
//   auto jaccard = [](auto tp, auto fn, auto fp, auto) { return tp / (tp + fn + fp); };
//   using D = gradus::Dual<double, 4>;
//   D j = jaccard(D::variable(8, 0), D::variable(2, 1), D::variable(3, 2), D::variable(7, 3));
//   // j.value == 8/13, j.grad[0] == dJ/dTP, ...
//
// Arithmetic mixes with plain scalars (2 * x, x / 3.0); comparisons look at the values only,
// so branches (max, a recall floor) differentiate along the branch taken. The math functions
// below are found by argument-dependent lookup: call them unqualified (sqrt(x), not std::sqrt).

#include <array>
#include <cmath>
#include <cstddef>

namespace gradus {

template <class T, std::size_t K>
struct Dual {
  T value{};
  std::array<T, K> grad{};  // d value / d input_k

  constexpr Dual() = default;
  constexpr Dual(T constant) : value(constant) {}  // NOLINT: a constant has zero gradient

  // Input k of K, with value v: its gradient is the unit vector e_k.
  static constexpr Dual variable(T v, std::size_t k) {
    Dual x(v);
    x.grad[k] = T(1);
    return x;
  }

  // The result of a function f at this point, given f(value) and f'(value) (chain rule).
  // A zero tangent stays zero even where f' is infinite (sqrt at 0), so an input that does
  // not move the argument gets no NaN.
  constexpr Dual chain(T f, T derivative) const {
    Dual r(f);
    for (std::size_t k = 0; k < K; ++k) r.grad[k] = grad[k] == T(0) ? T(0) : derivative * grad[k];
    return r;
  }

  constexpr Dual operator-() const { return chain(-value, T(-1)); }
  constexpr Dual operator+() const { return *this; }

  constexpr Dual& operator+=(const Dual& b) {
    value += b.value;
    for (std::size_t k = 0; k < K; ++k) grad[k] += b.grad[k];
    return *this;
  }
  constexpr Dual& operator-=(const Dual& b) {
    value -= b.value;
    for (std::size_t k = 0; k < K; ++k) grad[k] -= b.grad[k];
    return *this;
  }
  constexpr Dual& operator*=(const Dual& b) {
    for (std::size_t k = 0; k < K; ++k) grad[k] = grad[k] * b.value + value * b.grad[k];
    value *= b.value;
    return *this;
  }
  constexpr Dual& operator/=(const Dual& b) {
    const T q = value / b.value;
    for (std::size_t k = 0; k < K; ++k) grad[k] = (grad[k] - q * b.grad[k]) / b.value;
    value = q;
    return *this;
  }

  // Hidden friends: not templates, so plain numbers (int, double) convert to T.
  friend constexpr Dual operator+(Dual a, const Dual& b) { return a += b; }
  friend constexpr Dual operator-(Dual a, const Dual& b) { return a -= b; }
  friend constexpr Dual operator*(Dual a, const Dual& b) { return a *= b; }
  friend constexpr Dual operator/(Dual a, const Dual& b) { return a /= b; }
  friend constexpr Dual operator+(Dual a, T b) { return a += Dual(b); }
  friend constexpr Dual operator+(T a, Dual b) { return b += Dual(a); }
  friend constexpr Dual operator-(Dual a, T b) { return a -= Dual(b); }
  friend constexpr Dual operator-(T a, const Dual& b) { return Dual(a) -= b; }
  friend constexpr Dual operator*(Dual a, T b) { return a.chain(a.value * b, b); }
  friend constexpr Dual operator*(T a, Dual b) { return b.chain(a * b.value, a); }
  friend constexpr Dual operator/(Dual a, T b) { return a.chain(a.value / b, T(1) / b); }
  friend constexpr Dual operator/(T a, const Dual& b) { return Dual(a) /= b; }

  friend constexpr bool operator==(const Dual& a, const Dual& b) { return a.value == b.value; }
  friend constexpr bool operator<(const Dual& a, const Dual& b) { return a.value < b.value; }
  friend constexpr bool operator>(const Dual& a, const Dual& b) { return a.value > b.value; }
  friend constexpr bool operator<=(const Dual& a, const Dual& b) { return a.value <= b.value; }
  friend constexpr bool operator>=(const Dual& a, const Dual& b) { return a.value >= b.value; }

  friend Dual sqrt(const Dual& x) {
    const T r = std::sqrt(x.value);
    return x.chain(r, T(0.5) / r);
  }
  friend Dual exp(const Dual& x) {
    const T e = std::exp(x.value);
    return x.chain(e, e);
  }
  friend Dual log(const Dual& x) { return x.chain(std::log(x.value), T(1) / x.value); }
  friend Dual pow(const Dual& x, T p) { return x.chain(std::pow(x.value, p), p * std::pow(x.value, p - T(1))); }
  friend Dual abs(const Dual& x) { return x.value < T(0) ? -x : x; }
  friend Dual min(const Dual& a, const Dual& b) { return b < a ? b : a; }
  friend Dual max(const Dual& a, const Dual& b) { return a < b ? b : a; }
};

}  // namespace gradus
