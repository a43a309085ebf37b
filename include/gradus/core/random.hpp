#pragma once
// A tiny reproducible random stream for gradus internals (parameter initialization,
// minibatch shuffles, random compressors, random starts, finite-difference subsets):
// the same numbers on every platform and standard library, and a whole state of one
// integer, so checkpoints hold it trivially.

#include <cstdint>

namespace gradus::detail {

// splitmix64 (Steele, Lea, Flood 2014).
class SplitMix64 {
 public:
  explicit SplitMix64(std::uint64_t seed = 0) : state_(seed) {}

  // An independent-looking generator for (seed, stream), e.g. one per client or epoch.
  static SplitMix64 stream(std::uint64_t seed, std::uint64_t stream) {
    SplitMix64 mixer(seed ^ (0xD1B54A32D192ED03ull * (stream + 1)));
    return SplitMix64(mixer.next());
  }

  std::uint64_t next() {
    std::uint64_t z = (state_ += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  // Uniform in [0, 1) from the top 53 bits.
  double uniform() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }
  // Uniform in [0, n).
  std::uint64_t below(std::uint64_t n) { return next() % n; }

  std::uint64_t state() const { return state_; }
  void set_state(std::uint64_t state) { state_ = state; }

 private:
  std::uint64_t state_;
};

}  // namespace gradus::detail
