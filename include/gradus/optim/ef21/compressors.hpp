#pragma once
// Contractive compressors for EF21 and the sparse message they produce.
//
// A compressor C maps v in R^d to a message; it is contractive with parameter alpha in (0, 1] when
//     E ||C(v) - v||^2 <= (1 - alpha) ||v||^2        for every v.
//   TopK{k}                    the k largest |v_j| (ties: lower index first); alpha = k/d, deterministic.
//   RandK{k}                   k coordinates drawn uniformly without replacement, unscaled; alpha = k/d.
//   RandK{k, .scaled = true}   the same times d/k: unbiased, E C(v) = v, with
//                              E ||C(v) - v||^2 = omega ||v||^2, omega = d/k - 1 (not contractive).
//   Identity{}                 C(v) = v as a dense message; alpha = 1.
// Every compressor needs d = v.size() in [1, 2^31 - 1] (indices are int32) and TopK, RandK k in
// [1, d]; anything else throws gradus::invalid_argument. Non-finite entries propagate, like any
// other value: TopK ranks NaN and +-Inf as the largest magnitudes (ties to the lower index), RandK
// and Identity copy whatever they pick.
// Randomness is explicit: compress() draws from the Rng it is handed, so a run is reproducible from
// its seeds and its Rng state can be checkpointed (EF21 keeps one stream per client).
//
// A SparseMessage holds int32 indices and values (or, dense, d values and no indices). Its bits are
// counted separately: value_bits() = 8 sizeof(S) per value, index_bits() = 32 per index, so results
// compare both with the EF21 papers (which count values only) and with what actually travels.

#include <algorithm>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <functional>
#include <limits>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include <Eigen/Core>

#include "gradus/core/errors.hpp"
#include "gradus/core/random.hpp"
#include "gradus/core/types.hpp"

namespace gradus::ef21 {

// Random streams (splitmix64): one integer of state, so rounds checkpoint trivially.
using Rng = gradus::detail::SplitMix64;

namespace detail {

// k distinct indices of [0, n), uniform over subsets, in increasing order (Knuth's selection
// sampling, Algorithm S: one pass, no extra memory). Writes through out(index).
template <class Out>
void sample_without_replacement(Index n, Index k, Rng& rng, Out&& out) {
  for (Index i = 0; i < n && k > 0; ++i) {
    if (static_cast<double>(n - i) * rng.uniform() < static_cast<double>(k)) {
      out(i);
      --k;
    }
  }
}

inline void require_k(std::string_view function, Index k, Index d) {
  gradus::detail::require(k >= 1 && k <= d, function, "k", "a value in [1, d = " + gradus::detail::to_text(d) + "]",
                          k);
}

// The dimension has to fit the int32 indices of a message.
inline void require_message_dim(std::string_view function, Index d) {
  gradus::detail::require(d >= 1 && d <= std::numeric_limits<std::int32_t>::max(), function, "v",
                          "a vector of size in [1, 2^31 - 1]", d);
}

}  // namespace detail

// A read-only view of a message, as received from any client (in process or over MPI).
template <class S>
struct MessageView {
  Index dim = 0;
  std::span<const std::int32_t> indices;  // empty for a dense message
  std::span<const S> values;              // d values when dense, else one per index

  bool dense() const { return indices.empty() && !values.empty(); }
  Index nnz() const { return static_cast<Index>(values.size()); }
  std::uint64_t value_bits() const { return values.size() * sizeof(S) * 8; }
  std::uint64_t index_bits() const { return indices.size() * 32; }

  // Well formed for dimension d: no values (a silent client), d values and no indices (dense), or
  // one value per index, every index in [0, d). Anything else would read or write out of bounds.
  bool valid(Index d) const {
    if (dim != d) return false;
    if (indices.empty()) return values.empty() || nnz() == d;
    return values.size() == indices.size() &&
           std::all_of(indices.begin(), indices.end(), [d](std::int32_t j) { return j >= 0 && j < d; });
  }

  // Throws unless valid(d); `argument` names the message in the error.
  void require_valid(std::string_view function, std::string_view argument, Index d) const {
    if (valid(d)) return;
    using gradus::detail::to_text;
    std::string given = "dimension " + to_text(dim) + ", " + to_text(indices.size()) + " indices";
    if (!indices.empty()) {
      const auto [low, high] = std::minmax_element(indices.begin(), indices.end());
      given += " in [" + to_text(*low) + ", " + to_text(*high) + "]";
    }
    given += ", " + to_text(values.size()) + " values";
    gradus::detail::throw_invalid_argument(function, argument,
                                           "a message of dimension " + to_text(d) +
                                               ": no values, " + to_text(d) +
                                               " values without indices, or one value per index in [0, " +
                                               to_text(d) + ")",
                                           given);
  }

  // target += scale * C(v).
  void add_to(Eigen::Ref<Vector<S>> target, S scale) const {
    require_valid("MessageView::add_to", "message", target.size());
    if (dense()) {
      target += scale * Eigen::Map<const Vector<S>>(values.data(), dim);
      return;
    }
    for (std::size_t j = 0; j < indices.size(); ++j) target(indices[j]) += scale * values[j];
  }

  Vector<S> to_dense() const {
    gradus::detail::require_nonnegative("MessageView::to_dense", "dim", dim);
    Vector<S> out = Vector<S>::Zero(dim);
    add_to(out, S(1));
    return out;
  }
};

// What a client sends: C(v) as (int32 index, value) pairs, or dense. Reused round after round, so
// its buffers stop allocating after the first call.
template <class S>
struct SparseMessage {
  Index dim = 0;
  std::vector<std::int32_t> indices;
  std::vector<S> values;

  MessageView<S> view() const { return {dim, indices, values}; }
  bool dense() const { return view().dense(); }
  Index nnz() const { return view().nnz(); }
  std::uint64_t value_bits() const { return view().value_bits(); }
  std::uint64_t index_bits() const { return view().index_bits(); }
  void add_to(Eigen::Ref<Vector<S>> target, S scale) const { view().add_to(target, scale); }
  Vector<S> to_dense() const { return view().to_dense(); }

  // An empty message of dimension d: what a silent client (EF21-PP) sends.
  void clear(Index d) {
    dim = d;
    indices.clear();
    values.clear();
  }
};

// Top-k by magnitude, O(d), deterministic. A strided sample of 1024 magnitudes gives a low
// threshold that about 2k + 64 entries pass; one pass over v collects those candidates (in index
// order), nth_element among them finds the exact k-th largest |v_j|, and a pass over the candidates
// keeps everything above it and the lowest-index entries equal to it. If fewer than k entries pass
// the sampled threshold, every entry is a candidate: the result is the same, only slower.
// NaN counts as the largest magnitude, so it is sent and propagates.
struct TopK {
  Index k = 1;

  double alpha(Index d) const {
    validate(d);
    return static_cast<double>(k) / static_cast<double>(d);
  }
  void validate(Index d) const {
    detail::require_message_dim("TopK::compress", d);
    detail::require_k("TopK::compress", k, d);
  }

  template <class D>
  void compress(const Eigen::MatrixBase<D>& v, SparseMessage<typename D::Scalar>& out, Rng& /*rng*/) const {
    using S = typename D::Scalar;
    const Index d = v.size();
    validate(d);
    auto magnitude = [&](Index j) {
      const S value = v(j);
      return value != value ? std::numeric_limits<S>::infinity() : std::abs(value);
    };
    // out.values serves as scratch for magnitudes until the selection is known.
    auto kth_largest = [&](Index rank) {
      std::nth_element(out.values.begin(), out.values.begin() + rank, out.values.end(), std::greater<S>());
      return out.values[static_cast<std::size_t>(rank)];
    };
    auto collect = [&](S low) {  // branch-free compaction through a small stack buffer
      out.indices.clear();
      constexpr Index chunk_size = 256;
      std::int32_t chunk[chunk_size];
      for (Index begin = 0; begin < d; begin += chunk_size) {
        const Index end = std::min(d, begin + chunk_size);
        Index count = 0;
        for (Index j = begin; j < end; ++j) {
          chunk[count] = static_cast<std::int32_t>(j);
          count += magnitude(j) >= low;
        }
        out.indices.insert(out.indices.end(), chunk, chunk + count);
      }
    };
    out.dim = d;
    constexpr Index samples = 1024;
    const Index sample_rank = (2 * k + 64) * samples / d;
    S low = 0;  // every entry passes
    if (d >= 8 * samples && sample_rank < samples) {
      out.values.resize(samples);
      for (Index i = 0; i < samples; ++i) out.values[static_cast<std::size_t>(i)] = magnitude(i * d / samples);
      low = kth_largest(sample_rank);
    }
    collect(low);
    if (static_cast<Index>(out.indices.size()) < k) collect(S(0));
    out.values.resize(out.indices.size());
    for (std::size_t c = 0; c < out.indices.size(); ++c) out.values[c] = magnitude(out.indices[c]);
    const S threshold = kth_largest(k - 1);
    Index ties = k - std::count_if(out.values.begin(), out.values.begin() + (k - 1), [&](S a) { return a > threshold; });
    // Compact the candidates in place, in index order.
    std::size_t kept = 0;
    for (std::size_t c = 0; c < out.indices.size(); ++c) {
      const Index j = out.indices[c];
      const S a = magnitude(j);
      if (a > threshold || (a == threshold && ties-- > 0)) {
        out.indices[kept] = static_cast<std::int32_t>(j);
        out.values[kept++] = v(j);
      }
    }
    out.indices.resize(kept);
    out.values.resize(kept);
  }
};

// Random-k: k coordinates uniform without replacement (sorted indices); scaled by d/k when unbiased.
struct RandK {
  Index k = 1;
  bool scaled = false;  // true: the unbiased form (d/k) C(v)

  // The contraction parameter of the unscaled form. The scaled form is not contractive: use omega().
  double alpha(Index d) const {
    validate(d);
    gradus::detail::require(!scaled, "RandK::alpha", "scaled", "false (the scaled form is unbiased, see omega)",
                            scaled);
    return static_cast<double>(k) / static_cast<double>(d);
  }
  // Variance parameter of the scaled (unbiased) form; its rescaling by 1/(1 + omega) is the unscaled form.
  double omega(Index d) const {
    validate(d);
    return static_cast<double>(d) / static_cast<double>(k) - 1;
  }
  void validate(Index d) const {
    detail::require_message_dim("RandK::compress", d);
    detail::require_k("RandK::compress", k, d);
  }

  template <class D>
  void compress(const Eigen::MatrixBase<D>& v, SparseMessage<typename D::Scalar>& out, Rng& rng) const {
    using S = typename D::Scalar;
    const Index d = v.size();
    validate(d);
    const S factor = scaled ? static_cast<S>(d) / static_cast<S>(k) : S(1);
    out.dim = d;
    out.indices.clear();
    out.values.clear();
    detail::sample_without_replacement(d, k, rng, [&](Index j) {
      out.indices.push_back(static_cast<std::int32_t>(j));
      out.values.push_back(factor * v(j));
    });
  }
};

// No compression: the dense vector (no indices to pay for).
struct Identity {
  double alpha(Index d) const {
    validate(d);
    return 1.0;
  }
  void validate(Index d) const { detail::require_message_dim("Identity::compress", d); }

  template <class D>
  void compress(const Eigen::MatrixBase<D>& v, SparseMessage<typename D::Scalar>& out, Rng& /*rng*/) const {
    validate(v.size());
    out.dim = v.size();
    out.indices.clear();
    out.values.resize(static_cast<std::size_t>(v.size()));
    Eigen::Map<Vector<typename D::Scalar>>(out.values.data(), v.size()) = v;
  }
};

// What EF21 needs from a compressor: validate(d) for early errors and compress(v, message, rng), a
// function of v and the stream alone (EF21 compresses a probe vector to check that processes hold the
// same compressor) that writes a well-formed message (MessageView::valid(d); EF21 checks).
template <class C, class S>
concept Compressor = requires(const C& c, const Vector<S>& v, SparseMessage<S>& message, Rng& rng, Index d) {
  c.validate(d);
  c.compress(v, message, rng);
};

}  // namespace gradus::ef21
