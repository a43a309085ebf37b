// Fuzz harness: MultiSimilarityLoss (fused on embeddings, queries against references with
// column tiles, value_on_pairs) and MultiSimilarityMiner, both semantics, options at and beyond
// their edges, mismatched shapes, zero and tiny rows.
//
// Asserted, for every call that does not throw:
// - a MultiSimilaritySemantics outside its enumerators was rejected;
// - with finite inputs: the value is >= 0, and finite wherever its exact bound
//   2 (1 + |base|) + log(1 + M) (1/alpha + 1/beta) is below max(S)/16 (alpha and beta as S);
// - the gradient is finite wherever 4 / min_i ||x_i|| is below max(S)/16, and each row is
//   orthogonal to its normalized embedding: |dx_i . xhat_i| <= 64 (D + M + 2) eps (2 + 2/N) / ||x_i||
//   (dL/dxhat_i has norm at most 2 + 2/N: the pair weights of an anchor sum to at most 2/N);
// - the same value with one column tile per reference row as with one tile (mine = false,
//   alpha, beta <= 100; within 1e-3 (float) / 1e-9 (double) relative);
// - the miner pairs only same-label (positive) or other-label (negative) entries, never the
//   diagonal of a batch; on pairs, dL/dS <= 0 on positives, >= 0 on negatives, 0 elsewhere.
#include "fuzz.hpp"

#include "gradus/losses/multi_similarity.hpp"

using gradus::Index;

namespace {

template <class S>
gradus::RowMatrix<S> embeddings(FuzzedDataProvider& in, Index rows, Index cols, bool finite) {
  const S bound = fuzz::pick<S>(in, {S(1), S(10), S(1e4), S(1e30), std::numeric_limits<S>::max()});
  gradus::RowMatrix<S> x = fuzz::matrix<S>(in, rows, cols, bound, finite);
  if (rows > 0 && in.ConsumeIntegralInRange<int>(0, 7) == 0) {  // a tiny, denormal or zero row
    const Index i = in.ConsumeIntegralInRange<Index>(0, rows - 1);
    x.row(i) *= fuzz::pick<S>(in, {S(1e-20), S(0), std::numeric_limits<S>::denorm_min(), std::numeric_limits<S>::min()});
  }
  return x;
}

template <class S>
void check_gradient(const gradus::RowMatrix<S>& x, const gradus::RowMatrix<S>& dx, Index anchors, Index columns) {
  using L = std::numeric_limits<S>;
  for (Index i = 0; i < x.rows(); ++i) {
    const long double norm = fuzz::norm(x.row(i));
    if (!(4 / norm < L::max() / 16)) continue;
    FUZZ_CHECK(fuzz::finite(dx.row(i)) || fuzz::muted("tiny-row"),
               "non-finite gradient row " + std::to_string(i) + " (||x_i|| " + fuzz::text(double(norm)) + ")");
    if (!fuzz::finite(dx.row(i))) continue;
    long double dot = 0;
    for (Index j = 0; j < x.cols(); ++j) dot += (long double)dx(i, j) * ((long double)x(i, j) / norm);
    const long double tolerance = 64 * (x.cols() + columns + 2) * L::epsilon() * (2 + 2.0L / anchors) / norm;
    FUZZ_CHECK(std::abs(dot) <= tolerance, "gradient row " + std::to_string(i) + " not orthogonal to xhat_i: dot " +
                                               fuzz::text(double(dot)) + ", tolerance " + fuzz::text(double(tolerance)));
  }
}

template <class S>
void harness(FuzzedDataProvider& in) {
  using L = std::numeric_limits<S>;
  gradus::MultiSimilarityOptions o;
  o.alpha = fuzz::pick<double>(in, {2, 1, 0.5, 1e-50, 4.9e-324, 1e30, 1.7976931348623157e308, 0, -1, INFINITY, NAN});
  o.beta = fuzz::pick<double>(in, {50, 40, 1, 1e-50, 4.9e-324, 1e30, 1.7976931348623157e308, 0, INFINITY, NAN});
  o.base = fuzz::pick<double>(in, {1, 0.5, 0, -1, 1e30, -1e30, 1.7976931348623157e308, INFINITY, NAN});
  o.epsilon = fuzz::pick<double>(in, {0.1, 0, 1, 2, 1e30, 1.7976931348623157e308, -0.0, -1e-300, INFINITY, NAN});
  o.mine = in.ConsumeBool();
  o.semantics = gradus::MultiSimilaritySemantics(in.ConsumeIntegralInRange<int>(0, 31) == 0 ? 2 : in.ConsumeIntegralInRange<int>(0, 1));
  o.tile = fuzz::pick<Index>(in, {1024, 1, 2, 3, 0, -1});
  const bool valid_semantics = int(o.semantics) <= 1;
  const bool finite_inputs = in.ConsumeIntegralInRange<int>(0, 7) != 0;
  const int mode = in.ConsumeIntegralInRange<int>(0, 2);
  const Index n = in.ConsumeIntegralInRange<Index>(0, 9), d = in.ConsumeIntegralInRange<Index>(0, 5);
  const Index m = mode == 1 ? in.ConsumeIntegralInRange<Index>(0, 9) : n;
  const Index classes = in.ConsumeIntegralInRange<Index>(1, 4);

  std::optional<gradus::MultiSimilarityLoss<S>> made;
  const bool accepted = fuzz::accepts([&] { made.emplace(o); });
  fuzz::call = [&] {
    return std::string(sizeof(S) == 4 ? "float" : "double") + " MultiSimilarity{alpha " + fuzz::text(o.alpha) +
           ", beta " + fuzz::text(o.beta) + ", base " + fuzz::text(o.base) + ", epsilon " + fuzz::text(o.epsilon) +
           ", mine " + std::to_string(o.mine) + ", semantics " + std::to_string(int(o.semantics)) + ", tile " +
           std::to_string(o.tile) + "}, mode " + std::to_string(mode);
  };
  const long double bound = 2 * (1 + std::abs((long double)o.base)) +
                            std::log1p((long double)m) * (1 / (long double)S(o.alpha) + 1 / (long double)S(o.beta));
  const bool value_bounded = bound < L::max() / 16;

  if (mode == 2) {  // miner, then the loss on its pairs
    const gradus::RowMatrix<S> similarity = fuzz::matrix<S>(in, n, fuzz::size_like(in, n, 9), S(1), finite_inputs);
    const gradus::Labels y = fuzz::labels(in, fuzz::size_like(in, n, 10), classes);
    gradus::PairMasks pairs;
    const bool mined = fuzz::accepts([&] {
      pairs = gradus::MultiSimilarityMiner({o.epsilon, o.semantics}).masks(similarity, y);
    });
    if (mined) {
      for (Index i = 0; i < n; ++i) {
        FUZZ_CHECK(!pairs.positive(i, i) && !pairs.negative(i, i), "the miner paired the diagonal");
        for (Index k = 0; k < n; ++k) {
          FUZZ_CHECK(!pairs.positive(i, k) || y(i) == y(k), "a positive pair with different labels");
          FUZZ_CHECK(!pairs.negative(i, k) || y(i) != y(k), "a negative pair with the same label");
        }
      }
    } else {
      pairs.positive.setConstant(fuzz::size_like(in, n, 9), fuzz::size_like(in, similarity.cols(), 9), true);
      pairs.negative = pairs.positive;
    }
    if (!accepted) return;
    gradus::RowMatrix<S> dS(fuzz::size_like(in, n, 9), fuzz::size_like(in, similarity.cols(), 9));
    S value = 0;
    if (!fuzz::accepts([&] { value = made->value_and_grad_on_pairs(similarity, pairs, dS); })) return;
    FUZZ_CHECK(valid_semantics || fuzz::muted("enum"), "accepted MultiSimilaritySemantics(" + std::to_string(int(o.semantics)) + ")");
    if (!finite_inputs) return;
    FUZZ_CHECK(value >= 0, "negative value " + fuzz::text(value));
    if (value_bounded) FUZZ_CHECK(std::isfinite(value), "non-finite value " + fuzz::text(value));
    FUZZ_CHECK(fuzz::finite(dS), "non-finite dL/dS");
    for (Index i = 0; i < dS.rows(); ++i) {
      for (Index k = 0; k < dS.cols(); ++k) {
        const bool p = pairs.positive(i, k), q = pairs.negative(i, k);
        if (!p && !q) FUZZ_CHECK(dS(i, k) == 0, "dL/dS nonzero off the pairs");
        if (p && !q) FUZZ_CHECK(dS(i, k) <= 0, "dL/dS > 0 on a positive pair");
        if (q && !p) FUZZ_CHECK(dS(i, k) >= 0, "dL/dS < 0 on a negative pair");
      }
    }
    return;
  }
  if (!accepted) return;
  const gradus::RowMatrix<S> x = embeddings<S>(in, n, d, finite_inputs);
  const gradus::Labels y = fuzz::labels(in, fuzz::size_like(in, n, 10), classes);
  const gradus::RowMatrix<S> r = mode == 1 ? embeddings<S>(in, m, fuzz::size_like(in, d, 5), finite_inputs) : x;
  const gradus::Labels ry = mode == 1 ? fuzz::labels(in, fuzz::size_like(in, m, 10), classes) : y;
  gradus::RowMatrix<S> dx(fuzz::size_like(in, n, 9), fuzz::size_like(in, d, 5)), dr(fuzz::size_like(in, m, 9), r.cols());
  const auto describe = fuzz::call;
  fuzz::call = [&, describe] {
    return describe() + ", X " + fuzz::show(x) + ", labels " + fuzz::show(y) +
           (mode == 1 ? ", R " + fuzz::show(r) + ", reference_labels " + fuzz::show(ry) : std::string());
  };
  S value = 0;
  const bool ran = fuzz::accepts([&] {
    value = mode == 1 ? made->value_and_grad(x, y, r, ry, dx, dr) : made->value_and_grad(x, y, dx);
  });
  if (!ran) return;
  FUZZ_CHECK(valid_semantics || fuzz::muted("enum"), "accepted MultiSimilaritySemantics(" + std::to_string(int(o.semantics)) + ")");
  if (!finite_inputs) return;
  FUZZ_CHECK(value >= 0, "negative value " + fuzz::text(value));
  if (value_bounded) FUZZ_CHECK(std::isfinite(value), "non-finite value " + fuzz::text(value));
  check_gradient(x, dx, n, m);
  if (mode == 1) check_gradient(r, dr, n, n);
  if (mode == 1 && !o.mine && o.alpha <= 100 && o.beta <= 100 && std::isfinite(value)) {
    auto one_tile = o;
    one_tile.tile = 1 << 20;
    const S single = gradus::MultiSimilarityLoss<S>(one_tile).value(x, y, r, ry);
    const S tolerance = (sizeof(S) == 4 ? S(1e-3) : S(1e-9)) * (1 + std::abs(value));
    FUZZ_CHECK(std::abs(single - value) <= tolerance,
               "tiled value " + fuzz::text(value) + " != single-tile value " + fuzz::text(single));
  }
}

}  // namespace

GRADUS_FUZZ_ENTRY(harness)
