#pragma once
// Multi-similarity (MS) loss and miner for deep metric learning
// (Wang, Han, Huang, Dong, Scott, CVPR 2019).
//
// Three pieces that compose:
//   similarity  S = Xhat Xhat^T (or Qhat Rhat^T), rows L2-normalized: cosine_similarity()
//   mining      for anchor i with positives P_i = {k != i : y_k = y_i} and negatives
//               N_i = {k : y_k != y_i}, keep
//                 negative k  iff  S_ik + eps > min_{j in P_i} S_ij
//                 positive k  iff  S_ik - eps < max_{j in N_i} S_ij
//               (min and max over the unmined sets): MultiSimilarityMiner
//   pair loss   L_i = (1/alpha) log(1 + sum_{k in P~_i} exp(-alpha (S_ik - base)))
//                   + (1/beta)  log(1 + sum_{k in N~_i} exp( beta (S_ik - base))),
//               L = mean over all anchors: MultiSimilarityLoss::value_on_pairs
// MultiSimilarityLoss::value / value_and_grad fuse the three, on embeddings (N x D) or on
// queries against a reference set (S = Qhat Rhat^T, as in cross-batch memory).
//
// Gradient (masks are constants): dL/dS_ik = -w+_ik / N on kept positives, +w-_ik / N on kept
// negatives, with w the softmax of each set's exponents plus the virtual pair (the paper's pair
// weights); then dQhat = G Rhat, dRhat = G^T Qhat and, through the normalization,
// dq_i = (dqhat_i - qhat_i (G S^T)_ii) / ||q_i||  (qhat_i . dqhat_i = sum_k G_ik S_ik).
//
// Reference sets are processed in column tiles of `tile` rows with an online log-sum-exp, so
// memory is O(N x tile) whatever M is: one pass for the mining bounds, one for the sums, one
// for the gradient (each recomputes its tile of S unless one tile covers M).
//
// Defaults are the paper's (alpha 2, beta 50, base 1, eps 0.1). The official code uses
// (2, 40, 0.5, 0.1); pytorch-metric-learning uses (2, 50, 0.5, 0.1).
// Empty sets: by default as pytorch-metric-learning (the positive and negative parts count
// independently, an empty mined set adds 0; the mean is over all anchors). Semantics::Official
// reproduces the official code: an anchor is skipped unless both mined sets are non-empty, and
// positives with S >= 1 - 1e-5 are dropped (self pairs and exact duplicates).
// A batch without any positive pair or without any negative pair (by labels) gives 0 and a
// zero gradient; a query without positives (or negatives) adds only its other part. Empty
// batches, reference sets and similarity matrices are errors, as are rows whose norm is 0 or
// outside [m, 1/m], m the smallest normal number (see inverse_row_norms); a non-finite
// embedding makes the value and the whole gradient NaN. Domains: alpha and beta in
// [1e-15, 1e15], base in [-1e15, 1e15], epsilon >= 0 and finite, tile > 0.
// The loss object keeps scratch buffers: use one object per thread.

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include <Eigen/Core>

#include "gradus/core/errors.hpp"
#include "gradus/core/types.hpp"

namespace gradus {

enum class MultiSimilaritySemantics {
  PyTorchMetricLearning,  // parts independent, empty part adds 0; only the self pair is excluded
  Official,               // anchor skipped if either mined set is empty; positives with S >= 1 - 1e-5 dropped
};

struct MultiSimilarityMinerOptions {
  double epsilon = 0.1;
  MultiSimilaritySemantics semantics = MultiSimilaritySemantics::PyTorchMetricLearning;
};

struct MultiSimilarityOptions {
  double alpha = 2;     // scale of the positive pairs
  double beta = 50;     // scale of the negative pairs
  double base = 1;      // lambda, the similarity the soft thresholds sit at
  double epsilon = 0.1;  // mining margin
  bool mine = true;      // false: every positive and negative pair counts
  MultiSimilaritySemantics semantics = MultiSimilaritySemantics::PyTorchMetricLearning;
  Index tile = 1024;     // reference rows per tile of S (memory ~ 6 N x tile scalars)
};

// Mined pairs over a similarity matrix: positive(i, k) / negative(i, k) for anchor row i.
struct PairMasks {
  Eigen::Array<bool, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> positive, negative;
};

// The same pairs as index lists (pytorch-metric-learning's (a1, p, a2, n) tuple).
struct PairIndices {
  std::vector<Index> positive_anchors, positives, negative_anchors, negatives;
};

namespace detail {

// 1 / ||x_i|| for every row into `inverse`. Returns false when a row is not finite (the caller
// then propagates NaN). The plain norm where its square is a normal number, else stableNorm,
// which scales first. Norms must lie in [m, 1/m], m the smallest normal S (float: 1.2e-38 to
// 8.5e37): then 1/||x|| is normal too, the normalized rows are exact to rounding, and the
// gradient, at most 1.5 / ||x||, stays finite. A zero row has no direction; a smaller one has
// only denormal entries, with few significant bits.
template <class S>
bool inverse_row_norms(const Eigen::Ref<const RowMatrix<S>>& X, const char* function, const char* argument,
                       Vector<S>& inverse) {
  constexpr S low = std::numeric_limits<S>::min(), high = 1 / low;
  inverse.resize(X.rows());
  bool finite = true;
  for (Index i = 0; i < X.rows(); ++i) {
    const S squared = X.row(i).squaredNorm();
    const S norm = squared >= low && squared <= std::numeric_limits<S>::max() ? std::sqrt(squared)
                                                                              : X.row(i).stableNorm();
    if (!(norm >= low && norm <= high) && (std::isfinite(norm) || X.row(i).allFinite())) {
      const std::string row = " at index " + to_text(static_cast<long long>(i));
      throw_invalid_argument(function, argument,
                             "rows with norms in [" + to_text(low) + ", " + to_text(high) + "] (they are L2-normalized)",
                             norm == S(0) ? "a zero row" + row : "a row of norm " + to_text(norm) + row);
    }
    finite = finite && std::isfinite(norm);
    inverse(i) = S(1) / norm;
  }
  return finite;
}

// log(1 + sum_k exp(a_k)) accumulated chunk by chunk with a running max (the 1 is the virtual
// pair exp(0), so the max starts at 0 and every shift is finite).
template <class S>
struct LogOnePlusSumExp {
  S max = 0;
  S sum = 1;

  // args: exponents (-inf where not a member); in: 1 for members, 0 otherwise. Eigen's exp of
  // -inf is a tiny number rather than 0, hence the memberships.
  template <class A, class B>
  void add(const Eigen::ArrayBase<A>& args, const Eigen::ArrayBase<B>& in) {
    const S top = std::max(max, args.maxCoeff());
    sum = sum * std::exp(max - top) + (in * (args - top).exp()).sum();
    max = top;
  }
  S value() const { return max + std::log(sum); }
};

// How many pairs of one anchor the mining kept.
struct KeptPairs {
  Index positives = 0, negatives = 0;
};

// Per anchor: mining bounds over the unmined sets, the two sums, and the kept counts.
template <class S>
struct AnchorState {
  S min_positive = std::numeric_limits<S>::infinity();
  S max_negative = -std::numeric_limits<S>::infinity();
  LogOnePlusSumExp<S> positive, negative;
  KeptPairs kept;
};

// Buffers for one tile of pairs (N x tile): similarity, exponents, memberships, dL/dS.
template <class S>
struct PairTile {
  RowMatrix<S> similarity, arg_positive, arg_negative, in_positive, in_negative, gradient;

  void resize(Index rows, Index cols) {
    for (RowMatrix<S>* m : {&similarity, &arg_positive, &arg_negative, &in_positive, &in_negative, &gradient})
      m->resize(rows, cols);
  }
};

// What decides which of anchor i's pairs in a tile are pairs at all.
template <class S>
struct RowPairs {
  const int* column_labels;  // labels of the tile's columns
  int label;                 // the anchor's
  Index diagonal;            // the anchor's own column in this tile, or -1
  S drop_at;                 // same-label pairs with s >= drop_at are not positives (official semantics)
};

// The row loops below are branch-free so that the compiler vectorizes them; the self pair is
// patched afterwards instead of being tested in the loop.

// Updates the mining bounds min over positives / max over negatives with row i of the tile
// (the exponent buffers serve as scratch).
template <class S>
void update_mining_bounds(PairTile<S>& tile, Index i, Index width, const RowPairs<S>& row, AnchorState<S>& state) {
  constexpr S inf = std::numeric_limits<S>::infinity();
  const S* s = tile.similarity.row(i).data();
  S* low = tile.arg_positive.row(i).data();
  S* high = tile.arg_negative.row(i).data();
  for (Index k = 0; k < width; ++k) {
    const bool same = row.column_labels[k] == row.label;
    low[k] = (same & (s[k] < row.drop_at)) ? s[k] : inf;
    high[k] = same ? -inf : s[k];
  }
  if (row.diagonal >= 0 && row.diagonal < width) low[row.diagonal] = inf;
  state.min_positive = std::min(state.min_positive, tile.arg_positive.row(i).head(width).minCoeff());
  state.max_negative = std::max(state.max_negative, tile.arg_negative.row(i).head(width).maxCoeff());
}

// Memberships of row i's mined pairs: positive iff s - eps < max_negative, negative iff
// s + eps > min_positive. Returns the number of same-label pairs (the self pair excluded).
template <class S>
Index mine_row(PairTile<S>& tile, Index i, Index width, const RowPairs<S>& row, S epsilon,
               const AnchorState<S>& state) {
  const S* s = tile.similarity.row(i).data();
  S* ip = tile.in_positive.row(i).data();
  S* in = tile.in_negative.row(i).data();
  Index same_label = 0;
  for (Index k = 0; k < width; ++k) {
    const bool same = row.column_labels[k] == row.label;
    ip[k] = S(same & (s[k] < row.drop_at) & (s[k] - epsilon < state.max_negative));
    in[k] = S(!same & (s[k] + epsilon > state.min_positive));
    same_label += same;
  }
  if (row.diagonal >= 0 && row.diagonal < width) ip[row.diagonal] = 0, --same_label;
  return same_label;
}

// Exponents of row i's member pairs: alpha (base - s) on positives, beta (s - base) on
// negatives, -inf elsewhere.
template <class S>
void fill_exponents(PairTile<S>& tile, Index i, Index width, S alpha, S beta, S base) {
  constexpr S minus_inf = -std::numeric_limits<S>::infinity();
  const S* s = tile.similarity.row(i).data();
  const S* ip = tile.in_positive.row(i).data();
  const S* in = tile.in_negative.row(i).data();
  S* ap = tile.arg_positive.row(i).data();
  S* an = tile.arg_negative.row(i).data();
  for (Index k = 0; k < width; ++k) {
    ap[k] = ip[k] != S(0) ? alpha * (base - s[k]) : minus_inf;
    an[k] = in[k] != S(0) ? beta * (s[k] - base) : minus_inf;
  }
}

// Adds row i's member exponents to the anchor's sums and counts.
template <class S>
void add_row_sums(const PairTile<S>& tile, Index i, Index width, AnchorState<S>& state) {
  const auto ip = tile.in_positive.row(i).head(width).array();
  const auto in = tile.in_negative.row(i).head(width).array();
  state.kept.positives += (ip != S(0)).count();
  state.kept.negatives += (in != S(0)).count();
  state.positive.add(tile.arg_positive.row(i).head(width).array(), ip);
  state.negative.add(tile.arg_negative.row(i).head(width).array(), in);
}

// dL/dS for row i: scale * (w-_ik on negatives - w+_ik on positives).
template <class S>
void row_gradient(PairTile<S>& tile, Index i, Index width, S lse_positive, S lse_negative, S scale) {
  tile.gradient.row(i).head(width).array() =
      scale * (tile.in_negative.row(i).head(width).array() *
                   (tile.arg_negative.row(i).head(width).array() - lse_negative).exp() -
               tile.in_positive.row(i).head(width).array() *
                   (tile.arg_positive.row(i).head(width).array() - lse_positive).exp());
}

template <class S>
bool anchor_counts(const AnchorState<S>& state, bool official) {
  return !official || (state.kept.positives > 0 && state.kept.negatives > 0);
}

template <class S>
S anchor_loss(const AnchorState<S>& state, S alpha, S beta) {
  return state.positive.value() / alpha + state.negative.value() / beta;
}

// Same-label pairs at or above this similarity are not positives: 1 - 1e-5 in the official
// semantics (it drops self pairs and duplicates), nothing otherwise.
template <class S>
S drop_positives_at(MultiSimilaritySemantics semantics) {
  return semantics == MultiSimilaritySemantics::Official ? S(1) - S(1e-5) : std::numeric_limits<S>::infinity();
}

// The options' domains. alpha, beta, |base| <= 1e15 and similarities of magnitude <= 1e15 keep
// every exponent (at most 2e30) and the loss far inside float's range; epsilon is any margin.
inline constexpr double kMaxScale = 1e15;

inline void check_semantics(const char* function, MultiSimilaritySemantics semantics) {
  require_enumerator(function, "options.semantics", semantics, 2);
}

inline void check_epsilon(const char* function, double epsilon) {
  require_nonnegative(function, "options.epsilon", epsilon);
  require_finite(function, "options.epsilon", epsilon);
}

inline void check_options(const char* function, const MultiSimilarityOptions& o) {
  require_in_range(function, "options.alpha", o.alpha, 1 / kMaxScale, kMaxScale, true);
  require_in_range(function, "options.beta", o.beta, 1 / kMaxScale, kMaxScale, true);
  require_in_range(function, "options.base", o.base, -kMaxScale, kMaxScale, true);
  check_epsilon(function, o.epsilon);
  check_semantics(function, o.semantics);
  require(o.tile > 0, function, "options.tile", "a value > 0", static_cast<long long>(o.tile));
}

// Similarities given to value_on_pairs: finite ones of magnitude at most kMaxScale (NaN and
// infinities propagate).
template <class S>
void check_similarities(const char* function, const RowMatrix<S>& similarity) {
  const auto array = similarity.array();
  if (!(array.abs() > S(kMaxScale) && array.isFinite()).any()) return;
  for (Index i = 0; i < similarity.rows(); ++i) {
    for (Index k = 0; k < similarity.cols(); ++k) {
      const S s = similarity(i, k);
      require(!std::isfinite(s) || std::abs(s) <= S(kMaxScale), function, "similarity", "values in [-1e15, 1e15]",
              to_text(s) + " at (" + to_text(static_cast<long long>(i)) + ", " + to_text(static_cast<long long>(k)) + ")");
    }
  }
}

// An empty similarity matrix (or batch) has no anchor or no pair to mine or weigh.
inline void require_nonempty_similarity(const char* function, Index rows, Index cols) {
  require_nonempty(function, "similarity", rows);
  require_nonempty(function, "similarity", cols, "columns");
}

}  // namespace detail

// Cosine similarity of every pair of rows: Xhat Xhat^T, or Qhat Rhat^T. Zero rows are an error.
template <class DQ, class DR>
RowMatrix<typename DQ::Scalar> cosine_similarity(const Eigen::MatrixBase<DQ>& Q, const Eigen::MatrixBase<DR>& R) {
  using S = typename DQ::Scalar;
  static_assert(std::is_same_v<S, typename DR::Scalar>, "cosine_similarity: Q and R must have the same scalar type");
  detail::require_size("cosine_similarity", "R", R.cols(), Q.cols(), "columns (columns of Q)");
  const Eigen::Ref<const RowMatrix<S>> q(Q.derived()), r(R.derived());
  Vector<S> q_inverse, r_inverse;
  detail::inverse_row_norms<S>(q, "cosine_similarity", "Q", q_inverse);
  detail::inverse_row_norms<S>(r, "cosine_similarity", "R", r_inverse);
  return q_inverse.asDiagonal() * (q * r.transpose()) * r_inverse.asDiagonal();
}

template <class D>
RowMatrix<typename D::Scalar> cosine_similarity(const Eigen::MatrixBase<D>& X) {
  return cosine_similarity(X, X);
}

// The epsilon-margin pair miner alone: masks or index lists on a given similarity matrix.
//   auto masks = gradus::MultiSimilarityMiner({.epsilon = 0.1}).masks(gradus::cosine_similarity(X), y);
class MultiSimilarityMiner {
 public:
  using Options = MultiSimilarityMinerOptions;

  explicit MultiSimilarityMiner(Options options = {}) : options_(options) {
    detail::check_epsilon("MultiSimilarityMiner", options.epsilon);
    detail::check_semantics("MultiSimilarityMiner", options.semantics);
  }

  const Options& options() const { return options_; }

  // Within one batch: S is N x N over the same rows (the diagonal is never a pair).
  template <class D>
  PairMasks masks(const Eigen::MatrixBase<D>& similarity, const Eigen::Ref<const Labels>& labels) const {
    detail::require_size("MultiSimilarityMiner::masks", "similarity", similarity.cols(), similarity.rows(),
                         "columns (a square matrix over one batch)");
    return mine(similarity, labels, labels, true);
  }

  // Queries (rows) against a reference set (columns).
  template <class D>
  PairMasks masks(const Eigen::MatrixBase<D>& similarity, const Eigen::Ref<const Labels>& row_labels,
                  const Eigen::Ref<const Labels>& column_labels) const {
    return mine(similarity, row_labels, column_labels, false);
  }

  template <class D>
  PairIndices pairs(const Eigen::MatrixBase<D>& similarity, const Eigen::Ref<const Labels>& labels) const {
    return indices(masks(similarity, labels));
  }

  template <class D>
  PairIndices pairs(const Eigen::MatrixBase<D>& similarity, const Eigen::Ref<const Labels>& row_labels,
                    const Eigen::Ref<const Labels>& column_labels) const {
    return indices(masks(similarity, row_labels, column_labels));
  }

  static PairIndices indices(const PairMasks& masks) {
    PairIndices out;
    for (Index i = 0; i < masks.positive.rows(); ++i) {
      for (Index k = 0; k < masks.positive.cols(); ++k) {
        if (masks.positive(i, k)) out.positive_anchors.push_back(i), out.positives.push_back(k);
        if (masks.negative(i, k)) out.negative_anchors.push_back(i), out.negatives.push_back(k);
      }
    }
    return out;
  }

 private:
  template <class D>
  PairMasks mine(const Eigen::MatrixBase<D>& similarity, const Eigen::Ref<const Labels>& row_labels,
                 const Eigen::Ref<const Labels>& column_labels, bool self) const {
    using S = typename D::Scalar;
    detail::require_nonempty_similarity("MultiSimilarityMiner::masks", similarity.rows(), similarity.cols());
    detail::require_size("MultiSimilarityMiner::masks", "row_labels", row_labels.size(), similarity.rows(),
                         "entries (rows of similarity)");
    detail::require_size("MultiSimilarityMiner::masks", "column_labels", column_labels.size(), similarity.cols(),
                         "entries (columns of similarity)");
    const Labels columns = column_labels;  // contiguous
    detail::PairTile<S> tile;
    tile.resize(similarity.rows(), similarity.cols());
    tile.similarity = similarity;
    for (Index i = 0; i < similarity.rows(); ++i) {
      const detail::RowPairs<S> row{columns.data(), row_labels(i), self ? i : -1,
                                    detail::drop_positives_at<S>(options_.semantics)};
      detail::AnchorState<S> state;
      detail::update_mining_bounds(tile, i, similarity.cols(), row, state);
      detail::mine_row(tile, i, similarity.cols(), row, S(options_.epsilon), state);
    }
    return {tile.in_positive.array() != S(0), tile.in_negative.array() != S(0)};
  }

  Options options_;
};

template <class S>
class MultiSimilarityLoss {
 public:
  using Scalar = S;
  using Options = MultiSimilarityOptions;

  explicit MultiSimilarityLoss(Options options = {}) : options_(options) {
    detail::check_options("MultiSimilarityLoss", options_);
  }

  const Options& options() const { return options_; }

  // Embeddings (N x D, any scale) and their labels; pairs within the batch.
  template <class D>
  S value(const Eigen::MatrixBase<D>& embeddings, const Eigen::Ref<const Labels>& labels) const {
    return fused("MultiSimilarityLoss::value", embeddings, labels, embeddings, labels, true, nullptr, nullptr);
  }

  // dembeddings (N x D) receives dL/dx through the L2 normalization.
  template <class D>
  S value_and_grad(const Eigen::MatrixBase<D>& embeddings, const Eigen::Ref<const Labels>& labels,
                   Eigen::Ref<RowMatrix<S>> dembeddings) const {
    return fused("MultiSimilarityLoss::value_and_grad", embeddings, labels, embeddings, labels, true, &dembeddings,
                 nullptr);
  }

  // Queries (N x D) against a reference set (M x D), e.g. a cross-batch memory: every reference
  // row with the query's label is a positive (no self pair is excluded), every other a negative.
  template <class DQ, class DR>
  S value(const Eigen::MatrixBase<DQ>& queries, const Eigen::Ref<const Labels>& query_labels,
          const Eigen::MatrixBase<DR>& references, const Eigen::Ref<const Labels>& reference_labels) const {
    return fused("MultiSimilarityLoss::value", queries, query_labels, references, reference_labels, false, nullptr,
                 nullptr);
  }

  // dqueries (N x D) and, unless it is omitted (a memory bank needs none), dreferences (M x D).
  template <class DQ, class DR>
  S value_and_grad(const Eigen::MatrixBase<DQ>& queries, const Eigen::Ref<const Labels>& query_labels,
                   const Eigen::MatrixBase<DR>& references, const Eigen::Ref<const Labels>& reference_labels,
                   Eigen::Ref<RowMatrix<S>> dqueries, Eigen::Ref<RowMatrix<S>> dreferences) const {
    return fused("MultiSimilarityLoss::value_and_grad", queries, query_labels, references, reference_labels, false,
                 &dqueries, &dreferences);
  }

  template <class DQ, class DR>
  S value_and_grad(const Eigen::MatrixBase<DQ>& queries, const Eigen::Ref<const Labels>& query_labels,
                   const Eigen::MatrixBase<DR>& references, const Eigen::Ref<const Labels>& reference_labels,
                   Eigen::Ref<RowMatrix<S>> dqueries) const {
    return fused("MultiSimilarityLoss::value_and_grad", queries, query_labels, references, reference_labels, false,
                 &dqueries, nullptr);
  }

  // The pair-weighting step alone, on a given similarity matrix (N x M) and mined pairs (for
  // example from MultiSimilarityMiner); the mean is over the N rows. Only the per-anchor rule of
  // the semantics applies here; the pairs are whatever `pairs` says.
  template <class D>
  S value_on_pairs(const Eigen::MatrixBase<D>& similarity, const PairMasks& pairs) const {
    return on_pairs("MultiSimilarityLoss::value_on_pairs", similarity, pairs, nullptr);
  }

  // dsimilarity (N x M) receives dL/dS.
  template <class D>
  S value_and_grad_on_pairs(const Eigen::MatrixBase<D>& similarity, const PairMasks& pairs,
                            Eigen::Ref<RowMatrix<S>> dsimilarity) const {
    return on_pairs("MultiSimilarityLoss::value_and_grad_on_pairs", similarity, pairs, &dsimilarity);
  }

 private:
  using Out = Eigen::Ref<RowMatrix<S>>;

  bool official() const { return options_.semantics == MultiSimilaritySemantics::Official; }
  S alpha() const { return S(options_.alpha); }
  S beta() const { return S(options_.beta); }
  S base() const { return S(options_.base); }

  // Mean over all anchors of the anchor losses (skipped anchors count as 0).
  S finish(Index rows) const {
    S total = 0;
    for (const auto& state : anchors_)
      if (detail::anchor_counts(state, official())) total += detail::anchor_loss(state, alpha(), beta());
    return total / S(rows);
  }

  // dL/dS for every row of the current tile, once the sums are final.
  void tile_gradient(Index width) const {
    const S scale = S(1) / S(anchors_.size());
    for (Index i = 0; i < static_cast<Index>(anchors_.size()); ++i) {
      const auto& state = anchors_[static_cast<std::size_t>(i)];
      detail::row_gradient(tile_, i, width, state.positive.value(), state.negative.value(),
                           detail::anchor_counts(state, official()) ? scale : S(0));
    }
  }

  template <class D>
  S on_pairs(const char* function, const Eigen::MatrixBase<D>& similarity, const PairMasks& pairs, Out* dS) const {
    static_assert(std::is_same_v<typename D::Scalar, S>, "MultiSimilarityLoss<S>: similarity must have scalar type S");
    const Index n = similarity.rows(), m = similarity.cols();
    detail::require_nonempty_similarity(function, n, m);
    for (const auto* mask : {&pairs.positive, &pairs.negative}) {
      detail::require_size(function, "pairs", mask->rows(), n, "mask rows (rows of similarity)");
      detail::require_size(function, "pairs", mask->cols(), m, "mask columns (columns of similarity)");
    }
    if (dS) {
      detail::require_size(function, "dsimilarity", dS->rows(), n, "rows (rows of similarity)");
      detail::require_size(function, "dsimilarity", dS->cols(), m, "columns (columns of similarity)");
    }
    tile_.resize(n, m);
    tile_.similarity = similarity;
    detail::check_similarities(function, tile_.similarity);
    tile_.in_positive = pairs.positive.template cast<S>();
    tile_.in_negative = pairs.negative.template cast<S>();
    anchors_.assign(static_cast<std::size_t>(n), {});
    for (Index i = 0; i < n; ++i) {
      detail::fill_exponents(tile_, i, m, alpha(), beta(), base());
      detail::add_row_sums(tile_, i, m, anchors_[static_cast<std::size_t>(i)]);
    }
    if (dS) {
      tile_gradient(m);
      *dS = tile_.gradient;
    }
    return finish(n);
  }

  template <class DQ, class DR>
  S fused(const char* function, const Eigen::MatrixBase<DQ>& Q, const Eigen::Ref<const Labels>& query_labels,
          const Eigen::MatrixBase<DR>& R, const Eigen::Ref<const Labels>& reference_labels, bool self, Out* dQ,
          Out* dR) const {
    static_assert(std::is_same_v<typename DQ::Scalar, S> && std::is_same_v<typename DR::Scalar, S>,
                  "MultiSimilarityLoss<S>: embeddings must have scalar type S");
    const char* q_name = self ? "embeddings" : "queries";
    const Index n = Q.rows(), m = R.rows(), d = Q.cols();
    detail::require_nonempty(function, q_name, n);
    detail::require_nonempty(function, q_name, d, "columns");
    detail::require_size(function, self ? "labels" : "query_labels", query_labels.size(), n,
                         self ? "entries (rows of embeddings)" : "entries (rows of queries)");
    if (!self) {
      detail::require_nonempty(function, "references", m);
      detail::require_size(function, "references", R.cols(), d, "columns (columns of queries)");
      detail::require_size(function, "reference_labels", reference_labels.size(), m, "entries (rows of references)");
    }
    if (dQ) {
      detail::require_size(function, self ? "dembeddings" : "dqueries", dQ->rows(), n, "rows");
      detail::require_size(function, self ? "dembeddings" : "dqueries", dQ->cols(), d, "columns");
    }
    if (dR) {
      detail::require_size(function, "dreferences", dR->rows(), m, "rows (rows of references)");
      detail::require_size(function, "dreferences", dR->cols(), d, "columns");
    }
    const Eigen::Ref<const RowMatrix<S>> q(Q.derived()), r(R.derived());
    bool finite = detail::inverse_row_norms<S>(q, function, q_name, q_inverse_);
    if (self)
      r_inverse_ = q_inverse_;
    else
      finite = detail::inverse_row_norms<S>(r, function, "references", r_inverse_) && finite;
    if (!finite) return fill(dQ, dR, std::numeric_limits<S>::quiet_NaN());
    q_hat_ = q_inverse_.asDiagonal() * q;

    const Index width = std::min(options_.tile, m), tiles = (m + width - 1) / width;
    tile_.resize(n, width);
    r_hat_.resize(width, d);
    Index loaded = -1;  // the tile whose similarities are in tile_.similarity
    auto load = [&](Index t) {
      if (loaded == t) return;
      const Index c0 = t * width, w = std::min(width, m - c0);
      r_hat_.topRows(w) = r_inverse_.segment(c0, w).asDiagonal() * r.middleRows(c0, w);
      tile_.similarity.leftCols(w).noalias() = q_hat_ * r_hat_.topRows(w).transpose();
      loaded = t;
    };
    anchors_.assign(static_cast<std::size_t>(n), {});
    const S drop_at = detail::drop_positives_at<S>(options_.semantics);
    auto row_pairs = [&](Index i, Index c0) {
      return detail::RowPairs<S>{reference_labels.data() + c0, query_labels(i), self ? i - c0 : -1, drop_at};
    };

    // Pass 1: mining bounds over the unmined sets (without mining they stay open).
    if (!options_.mine) {
      for (auto& state : anchors_) {
        state.min_positive = -std::numeric_limits<S>::infinity();
        state.max_negative = std::numeric_limits<S>::infinity();
      }
    }
    for (Index t = 0; t < tiles && options_.mine; ++t) {
      load(t);
      const Index c0 = t * width, w = std::min(width, m - c0);
      for (Index i = 0; i < n; ++i)
        detail::update_mining_bounds(tile_, i, w, row_pairs(i, c0), anchors_[static_cast<std::size_t>(i)]);
    }
    // Pass 2: exponents of the mined pairs and their online log-sum-exp.
    Index same_label = 0;        // pairs by label, the self pairs excluded
    Index exponents_of = -1;     // the tile whose exponents are in tile_
    auto exponents = [&](Index t, bool sums) {
      if (exponents_of == t) return;
      load(t);
      const Index c0 = t * width, w = std::min(width, m - c0);
      for (Index i = 0; i < n; ++i) {
        auto& state = anchors_[static_cast<std::size_t>(i)];
        const Index same = detail::mine_row(tile_, i, w, row_pairs(i, c0), S(options_.epsilon), state);
        detail::fill_exponents(tile_, i, w, alpha(), beta(), base());
        if (sums) same_label += same, detail::add_row_sums(tile_, i, w, state);
      }
      exponents_of = t;
    };
    // Backwards, so that it starts on the tile pass 1 ended with (and pass 3 on pass 2's last).
    for (Index t = tiles - 1; t >= 0; --t) exponents(t, true);
    const Index different_label = n * m - same_label - (self ? n : 0);
    if (same_label == 0 || different_label == 0) return fill(dQ, dR, S(0));
    const S loss = finish(n);
    if (!dQ) return loss;

    // Pass 3: G = dL/dS tile by tile; dQhat = G Rhat, dRhat = G^T Qhat, then back through the
    // normalizations with qhat_i . dqhat_i = sum_k G_ik S_ik (and likewise for the references).
    d_q_hat_.setZero(n, d);
    gs_rows_.setZero(n);
    for (Index t = 0; t < tiles; ++t) {
      exponents(t, false);  // sums and counts are final: refill the exponents only
      const Index c0 = t * width, w = std::min(width, m - c0);
      tile_gradient(w);
      const auto G = tile_.gradient.leftCols(w);
      const auto Sim = tile_.similarity.leftCols(w);
      gs_rows_ += (G.array() * Sim.array()).rowwise().sum().matrix();
      if (self && tiles == 1) {
        // One tile over the whole batch: d(Xhat) = (G + G^T) Xhat in a single product
        // (arg_positive is free scratch once G is formed).
        tile_.arg_positive = G + G.transpose();
        d_q_hat_.noalias() = tile_.arg_positive * q_hat_;
        gs_rows_ += (G.array() * Sim.array()).colwise().sum().matrix().transpose();
        continue;
      }
      d_q_hat_.noalias() += G * r_hat_.topRows(w);
      Out* target = self ? dQ : dR;  // in the batch form the reference rows are the embeddings
      if (!target) continue;
      gs_cols_ = (G.array() * Sim.array()).colwise().sum().matrix().transpose();
      target->middleRows(c0, w).noalias() = G.transpose() * q_hat_;
      target->middleRows(c0, w) -= gs_cols_.asDiagonal() * r_hat_.topRows(w);
      target->middleRows(c0, w) = r_inverse_.segment(c0, w).asDiagonal() * target->middleRows(c0, w);
    }
    d_q_hat_ -= gs_rows_.asDiagonal() * q_hat_;
    if (self && tiles > 1)
      dQ->noalias() += q_inverse_.asDiagonal() * d_q_hat_;
    else
      dQ->noalias() = q_inverse_.asDiagonal() * d_q_hat_;
    return loss;
  }

  static S fill(Out* dQ, Out* dR, S value) {
    if (dQ) dQ->setConstant(value);
    if (dR) dR->setConstant(value);
    return value;
  }

  Options options_;
  // Scratch reused across calls (no allocation once the shapes repeat).
  mutable std::vector<detail::AnchorState<S>> anchors_;
  mutable detail::PairTile<S> tile_;
  mutable Vector<S> q_inverse_, r_inverse_, gs_rows_, gs_cols_;
  mutable RowMatrix<S> q_hat_, r_hat_, d_q_hat_;
};

}  // namespace gradus
