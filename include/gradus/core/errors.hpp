#pragma once
// gradus::invalid_argument and the validation helpers every public entry point uses.
// Messages read "gradus::<function>: argument '<name>': expected <what>, got <value>".

#include <charconv>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>

#include <Eigen/Core>

#include "gradus/core/types.hpp"

namespace gradus {

class invalid_argument : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

namespace detail {

// Shortest round-trip text of a number, without pulling in <sstream>.
template <class T>
std::string to_text(T value) {
  if constexpr (std::is_same_v<T, bool>) {
    return value ? "true" : "false";
  } else {
    char buffer[64];
    const auto result = std::to_chars(buffer, buffer + sizeof buffer, value);
    return std::string(buffer, result.ptr);
  }
}

inline std::string to_text(std::string_view text) { return std::string(text); }
inline std::string to_text(const char* text) { return std::string(text); }
inline std::string to_text(const std::string& text) { return text; }

[[noreturn]] inline void throw_invalid_argument(std::string_view function, std::string_view argument,
                                                std::string_view expected, std::string_view given) {
  std::string message = "gradus::";
  message.append(function).append(": argument '").append(argument).append("': expected ");
  message.append(expected).append(", got ").append(given);
  throw invalid_argument(message);
}

template <class T>
void require(bool ok, std::string_view function, std::string_view argument, std::string_view expected,
             const T& given) {
  if (!ok) throw_invalid_argument(function, argument, expected, to_text(given));
}

// Domain checks on hyperparameters. NaN fails every one of them.
template <class T>
void require_positive(std::string_view function, std::string_view argument, T value) {
  require(value > T(0), function, argument, "a value > 0", value);
}

template <class T>
void require_nonnegative(std::string_view function, std::string_view argument, T value) {
  require(value >= T(0), function, argument, "a value >= 0", value);
}

template <class T>
void require_finite(std::string_view function, std::string_view argument, T value) {
  require(value - value == T(0), function, argument, "a finite value", value);
}

template <class T>
void require_finite_positive(std::string_view function, std::string_view argument, T value) {
  require(value > T(0) && value - value == T(0), function, argument, "a finite value > 0", value);
}

template <class T>
void require_finite_nonnegative(std::string_view function, std::string_view argument, T value) {
  require(value >= T(0) && value - value == T(0), function, argument, "a finite value >= 0", value);
}

// value in [low, high) (or [low, high] when high_inclusive).
template <class T>
void require_in_range(std::string_view function, std::string_view argument, T value, T low, T high,
                      bool high_inclusive = false) {
  const bool ok = value >= low && (high_inclusive ? value <= high : value < high);
  require(ok, function, argument,
          "a value in [" + to_text(low) + ", " + to_text(high) + (high_inclusive ? "]" : ")"), value);
}

// An enum among its first `count` enumerators: rejects casts such as Reduction(7), which
// would otherwise fall through a switch or an if-chain into some other branch.
template <class Enum>
void require_enumerator(std::string_view function, std::string_view argument, Enum value, int count) {
  const auto raw = static_cast<long long>(value);
  require(raw >= 0 && raw < count, function, argument, "one of its " + to_text(count) + " enumerators", raw);
}

inline void require_reduction(std::string_view function, Reduction reduction) {
  require_enumerator(function, "reduction", reduction, 3);
}

inline void require_size(std::string_view function, std::string_view argument, Eigen::Index given,
                         Eigen::Index expected, std::string_view what) {
  if (given != expected) {
    throw_invalid_argument(function, argument, to_text(expected) + " " + std::string(what), to_text(given));
  }
}

inline void require_nonempty(std::string_view function, std::string_view argument, Eigen::Index size,
                             std::string_view what = "rows") {
  if (size <= 0) throw_invalid_argument(function, argument, "at least one of its " + std::string(what), "0");
}

// Every label in [0, num_classes), or equal to ignore_index where one is allowed.
template <class Derived>
void require_labels(std::string_view function, std::string_view argument, const Eigen::DenseBase<Derived>& labels,
                    Eigen::Index num_classes, int ignore_index = -1, bool allow_ignore = false) {
  for (Eigen::Index i = 0; i < labels.size(); ++i) {
    const auto label = labels(i);
    if (allow_ignore && label == ignore_index) continue;
    if (label < 0 || label >= num_classes) {
      std::string expected = "labels in [0, " + to_text(num_classes) + ")";
      if (allow_ignore) expected += " or ignore_index " + to_text(ignore_index);
      throw_invalid_argument(function, argument, expected,
                             to_text(label) + " at index " + to_text(static_cast<long long>(i)));
    }
  }
}

}  // namespace detail
}  // namespace gradus
