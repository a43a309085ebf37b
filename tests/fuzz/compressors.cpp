// Fuzz harness: the EF21 compressors TopK, RandK (scaled or not) and Identity, their messages,
// and the theory step sizes of their alpha.
//
// Asserted, for every call that does not throw:
// - TopK: k entries, increasing indices, values v_j; every kept |v_j| >= every dropped one (NaN
//   the largest), ties to the lower index; ||C(v) - v||^2 <= (1 - k/d) ||v||^2 for finite v;
// - RandK: k distinct increasing indices, values factor v_j, the same message from the same Rng
//   state; Identity: a dense message equal to v bit for bit;
// - to_dense() agrees with the message; alpha in (0, 1]; ef21::step_size(L, L_i, alpha) is finite,
//   positive and at most 1/L for finite accepted L, L_i.
#include "fuzz.hpp"

#include "gradus/optim/ef21/compressors.hpp"
#include "gradus/optim/ef21/step_sizes.hpp"

using gradus::Index;
namespace ef21 = gradus::ef21;

namespace {

template <class S>
S magnitude(S x) {
  return x != x ? std::numeric_limits<S>::infinity() : std::abs(x);
}

template <class S>
void check_sparse(const gradus::Vector<S>& v, const ef21::SparseMessage<S>& m, Index k) {
  FUZZ_CHECK(m.dim == v.size() && Index(m.indices.size()) == k && Index(m.values.size()) == k, "message of the wrong size");
  for (Index j = 0; j < k; ++j) {
    FUZZ_CHECK(m.indices[j] >= 0 && m.indices[j] < v.size(), "index out of range");
    if (j) FUZZ_CHECK(m.indices[j - 1] < m.indices[j], "indices not increasing");
  }
  const gradus::Vector<S> dense = m.to_dense();
  for (Index j = 0; j < k; ++j) {
    const S a = dense(m.indices[j]), b = m.values[j];
    FUZZ_CHECK((a != a && b != b) || a == b, "to_dense disagrees with the message");
  }
}

template <class S>
void harness(FuzzedDataProvider& in) {
  const Index d = in.ConsumeIntegralInRange<int>(0, 7) == 0 ? in.ConsumeIntegralInRange<Index>(0, 9000)
                                                             : in.ConsumeIntegralInRange<Index>(0, 40);
  const Index k = fuzz::pick<Index>(in, {1, 2, d, d + 1, 0, -1, d / 2, Index(in.ConsumeIntegralInRange<int>(0, 64))});
  const bool finite_inputs = in.ConsumeIntegralInRange<int>(0, 3) != 0;
  gradus::Vector<S> v = fuzz::vector<S>(in, std::min<Index>(d, 64), S(1e30), finite_inputs);
  if (d > 64) {  // long vectors: repeat the decoded head, with ties
    gradus::Vector<S> head = v;
    v.resize(d);
    for (Index j = 0; j < d; ++j) v(j) = head.size() ? head(j % head.size()) * S(1 + (j * 7919) % 13) : S(0);
  }
  const std::uint64_t seed = in.ConsumeIntegral<std::uint64_t>();
  const int which = in.ConsumeIntegralInRange<int>(0, 3);
  fuzz::call = [&] {
    return std::string(sizeof(S) == 4 ? "float" : "double") + " compressor " + std::to_string(which) + ", k " +
           std::to_string(k) + ", d " + std::to_string(d) + ", v " + fuzz::show(v.head(std::min<Index>(d, 64)).transpose());
  };
  ef21::SparseMessage<S> message;
  ef21::Rng rng(seed);
  double alpha = 0;
  if (which == 0) {
    const ef21::TopK topk{k};
    if (!fuzz::accepts([&] { topk.compress(v, message, rng); alpha = topk.alpha(d); })) return;
    check_sparse(v, message, k);
    std::vector<bool> kept(std::size_t(d), false);
    S smallest_kept = std::numeric_limits<S>::infinity();
    for (Index j = 0; j < k; ++j) {
      const Index i = message.indices[j];
      kept[std::size_t(i)] = true;
      smallest_kept = std::min(smallest_kept, magnitude(v(i)));
      FUZZ_CHECK(std::memcmp(&message.values[j], &v(i), sizeof(S)) == 0, "TopK value differs from v");
    }
    Index last_tie = -1;  // ties at the threshold go to the lower indices
    for (Index j = 0; j < k; ++j) {
      if (magnitude(v(message.indices[j])) == smallest_kept) last_tie = std::max<Index>(last_tie, message.indices[j]);
    }
    for (Index j = 0; j < d; ++j) {
      if (kept[std::size_t(j)]) continue;
      const S a = magnitude(v(j));
      FUZZ_CHECK(a <= smallest_kept, "TopK dropped |v_" + std::to_string(j) + "| = " + fuzz::text(a) +
                                          " above a kept " + fuzz::text(smallest_kept));
      FUZZ_CHECK(a < smallest_kept || j > last_tie, "TopK kept a tie at a higher index than a dropped one");
    }
    if (fuzz::finite(v)) {
      long double error = 0, total = 0;
      const gradus::Vector<S> dense = message.to_dense();
      for (Index j = 0; j < d; ++j) {
        error += ((long double)dense(j) - v(j)) * ((long double)dense(j) - v(j));
        total += (long double)v(j) * v(j);
      }
      FUZZ_CHECK(error <= (1 - alpha) * total * (1 + 1e-12L), "TopK breaks the contraction bound");
    }
  } else if (which <= 2) {
    const ef21::RandK randk{k, which == 2};
    ef21::Rng again(seed);
    ef21::SparseMessage<S> repeat;
    if (!fuzz::accepts([&] { randk.compress(v, message, rng); })) return;
    randk.compress(v, repeat, again);
    check_sparse(v, message, k);
    FUZZ_CHECK(repeat.indices == message.indices && rng.state() == again.state(), "RandK not reproducible from its Rng state");
    const S factor = which == 2 ? S(d) / S(k) : S(1);
    for (Index j = 0; j < k; ++j) {
      const S expected = factor * v(message.indices[j]);
      FUZZ_CHECK((expected != expected && message.values[j] != message.values[j]) || expected == message.values[j],
                 "RandK value is not factor * v_j");
    }
    if (which == 1) alpha = randk.alpha(d);
    else FUZZ_CHECK(!fuzz::accepts([&] { randk.alpha(d); }), "scaled RandK has an alpha");
  } else {
    const ef21::Identity identity;
    if (!fuzz::accepts([&] { identity.compress(v, message, rng); alpha = identity.alpha(d); })) return;
    FUZZ_CHECK(message.dense() && message.dim == d && Index(message.values.size()) == d, "Identity message not dense");
    FUZZ_CHECK(std::memcmp(message.values.data(), v.data(), sizeof(S) * std::size_t(d)) == 0, "Identity changed v");
  }
  if (alpha == 0) return;
  FUZZ_CHECK(alpha > 0 && alpha <= 1, "alpha " + fuzz::text(alpha) + " outside (0, 1]");
  const double L = fuzz::pick<double>(in, {1, 1e-300, 1e300, 4.9e-324, 0, INFINITY, NAN});
  std::vector<double> Li(std::size_t(in.ConsumeIntegralInRange<int>(0, 3)));
  for (auto& x : Li) x = fuzz::pick<double>(in, {1, 2, 1e-300, 1e300, 1.7976931348623157e308, 4.9e-324, 0, NAN});
  const auto rule = in.ConsumeBool() ? ef21::StepRule::QuadraticMean : ef21::StepRule::ArithmeticMean;
  double gamma = 0;
  if (!fuzz::accepts([&] { gamma = ef21::step_size(L, Li, alpha, rule); })) return;
  FUZZ_CHECK(std::isfinite(gamma) && gamma > 0 && gamma <= 1 / L * (1 + 1e-15) || fuzz::muted("step-size"),
             "step size " + fuzz::text(gamma) + " for L " + fuzz::text(L) + ", alpha " + fuzz::text(alpha));
}

}  // namespace

GRADUS_FUZZ_ENTRY(harness)
