#include <catch2/catch.hpp>

#include <cmath>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <gradus/core/concepts.hpp>
#include <gradus/losses/multi_similarity.hpp>
#include <gradus/testing/gradient_check.hpp>

using namespace gradus;
using Semantics = MultiSimilaritySemantics;

namespace {

RowMatrix<double> random_matrix(Index rows, Index cols, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal;
  RowMatrix<double> X(rows, cols);
  for (Index i = 0; i < X.size(); ++i) X.data()[i] = normal(rng);
  return X;
}

Labels random_labels(Index n, int classes, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  Labels y(n);
  for (Index i = 0; i < n; ++i) y(i) = static_cast<int>(rng() % static_cast<std::uint64_t>(classes));
  return y;
}

// log(1 + sum exp(a)), shifted by the largest exponent so that 1e4 does not overflow.
long double log_one_plus_sum_exp(const std::vector<long double>& a) {
  long double top = 0, sum = 0;
  for (auto v : a) top = std::max(top, v);
  for (auto v : a) sum += std::exp(v - top);
  return top + std::log(std::exp(-top) + sum);
}

// The loss by its definition, in plain loops and long double: normalize, list each anchor's
// positives and negatives, mine them, sum the exponentials. Optionally returns the masks.
double oracle(const RowMatrix<double>& Q, const Labels& yq, const RowMatrix<double>& R, const Labels& yr, bool self,
              const MultiSimilarityOptions& o, PairMasks* masks = nullptr) {
  const Index n = Q.rows(), m = R.rows();
  RowMatrix<double> S(n, m);
  for (Index i = 0; i < n; ++i)
    for (Index k = 0; k < m; ++k) {
      long double dot = 0, qq = 0, rr = 0;
      for (Index j = 0; j < Q.cols(); ++j) {
        dot += (long double)Q(i, j) * R(k, j);
        qq += (long double)Q(i, j) * Q(i, j);
        rr += (long double)R(k, j) * R(k, j);
      }
      S(i, k) = double(dot / std::sqrt(qq * rr));
    }
  const bool official = o.semantics == Semantics::Official;
  if (masks) {
    masks->positive.setConstant(n, m, false);
    masks->negative.setConstant(n, m, false);
  }
  bool any_positive = false, any_negative = false;
  for (Index i = 0; i < n; ++i)
    for (Index k = 0; k < m; ++k) {
      if (self && i == k) continue;
      (yq(i) == yr(k) ? any_positive : any_negative) = true;
    }
  long double total = 0;
  for (Index i = 0; i < n; ++i) {
    std::vector<Index> positives, negatives;
    for (Index k = 0; k < m; ++k) {
      if (self && i == k) continue;
      if (yq(i) != yr(k)) negatives.push_back(k);
      else if (!(official && S(i, k) >= 1 - 1e-5)) positives.push_back(k);
    }
    double min_positive = INFINITY, max_negative = -INFINITY;
    for (Index k : positives) min_positive = std::min(min_positive, S(i, k));
    for (Index k : negatives) max_negative = std::max(max_negative, S(i, k));
    std::vector<Index> kept_positives, kept_negatives;
    for (Index k : positives)
      if (!o.mine || S(i, k) - o.epsilon < max_negative) kept_positives.push_back(k);
    for (Index k : negatives)
      if (!o.mine || S(i, k) + o.epsilon > min_positive) kept_negatives.push_back(k);
    if (masks) {
      for (Index k : kept_positives) masks->positive(i, k) = true;
      for (Index k : kept_negatives) masks->negative(i, k) = true;
    }
    if (official && (kept_positives.empty() || kept_negatives.empty())) continue;
    std::vector<long double> positive_exponents, negative_exponents;
    for (Index k : kept_positives) positive_exponents.push_back(-(long double)o.alpha * (S(i, k) - o.base));
    for (Index k : kept_negatives) negative_exponents.push_back((long double)o.beta * (S(i, k) - o.base));
    total += log_one_plus_sum_exp(positive_exponents) / o.alpha + log_one_plus_sum_exp(negative_exponents) / o.beta;
  }
  if (!any_positive || !any_negative) return 0;
  return double(total / n);
}

double oracle(const RowMatrix<double>& X, const Labels& y, const MultiSimilarityOptions& o, PairMasks* masks = nullptr) {
  return oracle(X, y, X, y, true, o, masks);
}

// True when the labels give both a positive and a negative pair (else the loss is 0 by rule).
bool has_both_kinds(const Labels& yq, const Labels& yr, bool self) {
  bool positive = false, negative = false;
  for (Index i = 0; i < yq.size(); ++i)
    for (Index k = 0; k < yr.size(); ++k)
      if (!(self && i == k)) (yq(i) == yr(k) ? positive : negative) = true;
  return positive && negative;
}

template <class S>
RowMatrix<S> as(const RowMatrix<double>& X) {
  return X.cast<S>();
}

template <class S>
double tolerance() {
  return std::is_same_v<S, float> ? 2e-4 : 1e-11;
}

const std::vector<MultiSimilarityOptions> option_sets = {
    {},
    {.mine = false},
    {.alpha = 2, .beta = 40, .base = 0.5, .semantics = Semantics::Official},
    {.alpha = 2, .beta = 50, .base = 0.5, .epsilon = 0.3},
    {.alpha = 0.5, .beta = 10, .base = 0, .mine = false, .semantics = Semantics::Official},
};

// The point as one flat vector (rows of X), for the gradient checker.
Eigen::VectorXd flat(const RowMatrix<double>& X) { return Eigen::Map<const Eigen::VectorXd>(X.data(), X.size()); }

RowMatrix<double> unflat(const Eigen::VectorXd& v, Index rows, Index cols) {
  return Eigen::Map<const RowMatrix<double>>(v.data(), rows, cols);
}

}  // namespace

TEMPLATE_TEST_CASE("MS loss equals the loop oracle within a batch", "[multi_similarity]", float, double) {
  using S = TestType;
  const std::vector<std::pair<Index, Index>> shapes = {{1, 3}, {2, 1}, {3, 2}, {7, 8}, {8, 7}, {9, 9}, {17, 3}, {64, 17}};
  int seed = 0;
  for (const auto& [n, d] : shapes) {
    for (int classes : {1, 2, 3, 7}) {
      const auto X = random_matrix(n, d, 100 + ++seed);
      const auto y = random_labels(n, classes, seed);  // with few rows, many classes are singletons
      for (const auto& o : option_sets) {
        const MultiSimilarityLoss<S> loss(o);
        const double expected = oracle(X, y, o);
        INFO("n " << n << " d " << d << " classes " << classes << " mine " << o.mine << " official "
                  << (o.semantics == Semantics::Official));
        CHECK(double(loss.value(as<S>(X), y)) == Approx(expected).epsilon(tolerance<S>()).margin(tolerance<S>()));
        RowMatrix<S> dX(n, d);
        CHECK(double(loss.value_and_grad(as<S>(X), y, dX)) ==
              Approx(expected).epsilon(tolerance<S>()).margin(tolerance<S>()));
        // The tiled batch path (several column tiles) agrees with the single tile.
        RowMatrix<S> dX_tiled(n, d);
        auto tiled_options = o;
        tiled_options.tile = 3;
        CHECK(double(MultiSimilarityLoss<S>(tiled_options).value_and_grad(as<S>(X), y, dX_tiled)) ==
              Approx(expected).epsilon(tolerance<S>()).margin(tolerance<S>()));
        CHECK((dX_tiled - dX).cwiseAbs().maxCoeff() <= S(10 * tolerance<S>()) * (1 + dX.cwiseAbs().maxCoeff()));
      }
    }
  }
}

TEST_CASE("miner masks and index lists equal the oracle's", "[multi_similarity]") {
  const auto X = random_matrix(40, 6, 7);
  const auto y = random_labels(40, 4, 8);
  for (auto semantics : {Semantics::PyTorchMetricLearning, Semantics::Official}) {
    PairMasks expected;
    oracle(X, y, {.epsilon = 0.2, .semantics = semantics}, &expected);
    const MultiSimilarityMiner miner({.epsilon = 0.2, .semantics = semantics});
    const auto masks = miner.masks(cosine_similarity(X), y);
    CHECK((masks.positive == expected.positive).all());
    CHECK((masks.negative == expected.negative).all());
    CHECK(masks.positive.count() > 0);
    CHECK(masks.negative.count() > 0);
    const auto pairs = miner.pairs(cosine_similarity(X), y);
    REQUIRE(pairs.positives.size() == static_cast<std::size_t>(masks.positive.count()));
    REQUIRE(pairs.negatives.size() == static_cast<std::size_t>(masks.negative.count()));
    for (std::size_t p = 0; p < pairs.positives.size(); ++p)
      CHECK(masks.positive(pairs.positive_anchors[p], pairs.positives[p]));
    for (std::size_t p = 0; p < pairs.negatives.size(); ++p)
      CHECK(masks.negative(pairs.negative_anchors[p], pairs.negatives[p]));
  }
  // Queries against a reference set: no diagonal exclusion.
  const auto R = random_matrix(23, 6, 9);
  const auto yr = random_labels(23, 4, 10);
  PairMasks expected;
  oracle(X, y, R, yr, false, {}, &expected);
  const auto masks = MultiSimilarityMiner().masks(cosine_similarity(X, R), y, yr);
  CHECK((masks.positive == expected.positive).all());
  CHECK((masks.negative == expected.negative).all());
}

TEMPLATE_TEST_CASE("MS loss on queries against a reference set: oracle, tiled == dense", "[multi_similarity]", float,
                   double) {
  using S = TestType;
  for (const auto& [n, m, d] : std::vector<std::tuple<Index, Index, Index>>{{1, 9, 3}, {8, 17, 7}, {9, 64, 8}, {3, 2, 1}}) {
    const auto Q = random_matrix(n, d, 31 + n);
    const auto R = random_matrix(m, d, 41 + m);
    const auto yq = random_labels(n, 3, 51 + n);
    const auto yr = random_labels(m, 3, 61 + m);
    for (auto o : option_sets) {
      const double expected = oracle(Q, yq, R, yr, false, o);
      RowMatrix<S> dQ(n, d), dR(m, d), dQ_tiled(n, d), dR_tiled(m, d), dQ_only(n, d);
      const MultiSimilarityLoss<S> dense(o);
      CHECK(double(dense.value(as<S>(Q), yq, as<S>(R), yr)) == Approx(expected).epsilon(tolerance<S>()).margin(tolerance<S>()));
      CHECK(double(dense.value_and_grad(as<S>(Q), yq, as<S>(R), yr, dQ, dR)) ==
            Approx(expected).epsilon(tolerance<S>()).margin(tolerance<S>()));
      dense.value_and_grad(as<S>(Q), yq, as<S>(R), yr, dQ_only);
      CHECK(dQ_only == dQ);
      for (Index tile : {1, 2, 5, 16}) {
        o.tile = tile;
        CHECK(double(MultiSimilarityLoss<S>(o).value_and_grad(as<S>(Q), yq, as<S>(R), yr, dQ_tiled, dR_tiled)) ==
              Approx(expected).epsilon(tolerance<S>()).margin(tolerance<S>()));
        const S scale = S(10 * tolerance<S>()) * (1 + dQ.cwiseAbs().maxCoeff() + dR.cwiseAbs().maxCoeff());
        CHECK((dQ_tiled - dQ).cwiseAbs().maxCoeff() <= scale);
        CHECK((dR_tiled - dR).cwiseAbs().maxCoeff() <= scale);
      }
    }
  }
}

TEMPLATE_TEST_CASE("MS gradients match finite differences with the masks held fixed", "[multi_similarity]", float,
                   double) {
  using S = TestType;
  const testing::GradientCheckOptions check{.tolerance = std::is_same_v<S, float> ? 2e-3 : 1e-6};
  for (const auto& shape : std::vector<std::pair<Index, Index>>{{2, 1}, {3, 2}, {8, 7}, {9, 8}, {17, 9}, {24, 3}}) {
    const Index n = shape.first, d = shape.second;
    const RowMatrix<double> X = as<S>(random_matrix(n, d, 70 + n)).template cast<double>();  // a float-exact point
    const auto y = random_labels(n, 3, 80 + n);
    if (!has_both_kinds(y, y, true)) continue;  // 0 by rule, tested below
    for (auto o : option_sets) {
      for (Index tile : {Index(1024), Index(4)}) {
        o.tile = tile;
        const MultiSimilarityLoss<S> loss(o);
        const MultiSimilarityLoss<double> reference(o);
        PairMasks masks;
        oracle(X, y, o, &masks);
        RowMatrix<S> dX(n, d);
        const double value = double(loss.value_and_grad(as<S>(X), y, dX));
        const auto fixed = [&](const Eigen::VectorXd& x) {
          return reference.value_on_pairs(cosine_similarity(unflat(x, n, d)), masks);
        };
        CHECK(value == Approx(fixed(flat(X))).epsilon(tolerance<S>()).margin(1e-12));
        const auto report = testing::check_gradient(fixed, flat(X), flat(dX.template cast<double>()), check);
        INFO(report.summary());
        CHECK(report.ok);
      }
    }
  }
  // Queries and references: one flat vector holding both.
  const Index n = 7, m = 19, d = 9;
  const RowMatrix<double> Q = as<S>(random_matrix(n, d, 90)).template cast<double>();
  const RowMatrix<double> R = as<S>(random_matrix(m, d, 91)).template cast<double>();
  const auto yq = random_labels(n, 3, 92), yr = random_labels(m, 3, 93);
  for (auto o : option_sets) {
    o.tile = 4;
    const MultiSimilarityLoss<S> loss(o);
    const MultiSimilarityLoss<double> reference(o);
    PairMasks masks;
    oracle(Q, yq, R, yr, false, o, &masks);
    RowMatrix<S> dQ(n, d), dR(m, d);
    loss.value_and_grad(as<S>(Q), yq, as<S>(R), yr, dQ, dR);
    Eigen::VectorXd point(n * d + m * d), analytic(n * d + m * d);
    point << flat(Q), flat(R);
    analytic << flat(dQ.template cast<double>()), flat(dR.template cast<double>());
    const auto fixed = [&](const Eigen::VectorXd& x) {
      return reference.value_on_pairs(
          cosine_similarity(unflat(x.head(n * d), n, d), unflat(x.tail(m * d), m, d)), masks);
    };
    const auto report = testing::check_gradient(fixed, point, analytic, check);
    INFO(report.summary());
    CHECK(report.ok);
  }
}

TEMPLATE_TEST_CASE("value_and_grad_on_pairs: dL/dS matches finite differences", "[multi_similarity]", float, double) {
  using S = TestType;
  const Index n = 9, m = 17;
  const RowMatrix<double> Sim = random_matrix(n, m, 5).array().tanh();
  const auto yq = random_labels(n, 3, 6), yr = random_labels(m, 3, 7);
  const auto masks = MultiSimilarityMiner({.epsilon = 0.5}).masks(Sim, yq, yr);
  for (const auto& o : option_sets) {
    RowMatrix<S> dS(n, m);
    MultiSimilarityLoss<S>(o).value_and_grad_on_pairs(as<S>(Sim), masks, dS);
    const MultiSimilarityLoss<double> reference(o);
    const auto report = testing::check_gradient(
        [&](const Eigen::VectorXd& x) { return reference.value_on_pairs(unflat(x, n, m), masks); }, flat(Sim),
        flat(dS.template cast<double>()), {.tolerance = std::is_same_v<S, float> ? 1e-4 : 1e-6});
    INFO(report.summary());
    CHECK(report.ok);
  }
}

TEMPLATE_TEST_CASE("degenerate batches give 0 and a zero gradient", "[multi_similarity]", float, double) {
  using S = TestType;
  const RowMatrix<S> X = as<S>(random_matrix(6, 4, 3));
  RowMatrix<S> dX(6, 4);
  for (const auto& o : option_sets) {
    const MultiSimilarityLoss<S> loss(o);
    // One class: no negative pair.
    CHECK(loss.value_and_grad(X, Labels::Zero(6), dX) == 0);
    CHECK(dX.isZero(0));
    // All singletons: no positive pair (also without mining).
    Labels singletons(6);
    singletons << 0, 1, 2, 3, 4, 5;
    CHECK(loss.value_and_grad(X, singletons, dX) == 0);
    CHECK(dX.isZero(0));
    // A single embedding.
    RowMatrix<S> d1(1, 4);
    CHECK(loss.value_and_grad(X.topRows(1), Labels::Zero(1), d1) == 0);
    CHECK(d1.isZero(0));
  }
}

TEMPLATE_TEST_CASE("duplicates: official semantics drops them, pytorch-metric-learning keeps them", "[multi_similarity]",
                   float, double) {
  using S = TestType;
  RowMatrix<double> X = random_matrix(8, 5, 12);
  X.row(1) = 3 * X.row(0);  // same direction, same class
  X.row(5) = X.row(4);
  Labels y(8);
  y << 0, 0, 0, 1, 1, 1, 2, 2;
  for (auto semantics : {Semantics::PyTorchMetricLearning, Semantics::Official}) {
    for (bool mine : {true, false}) {
      const MultiSimilarityOptions o{.mine = mine, .semantics = semantics};
      CHECK(double(MultiSimilarityLoss<S>(o).value(as<S>(X), y)) ==
            Approx(oracle(X, y, o)).epsilon(tolerance<S>()).margin(tolerance<S>()));
    }
  }
  // Without mining the duplicate positive (S = 1, weight exp(0)) is the only difference.
  const double pml = MultiSimilarityLoss<double>({.mine = false}).value(X, y);
  const double official = MultiSimilarityLoss<double>({.mine = false, .semantics = Semantics::Official}).value(X, y);
  CHECK(pml > official);
  // A memory bank that holds the queries themselves: the official semantics drops the self pairs.
  const auto masks = MultiSimilarityMiner({.semantics = Semantics::Official}).masks(cosine_similarity(X, X), y, y);
  CHECK_FALSE(masks.positive(0, 0));
  CHECK_FALSE(masks.positive(0, 1));
}

TEMPLATE_TEST_CASE("extreme scales stay finite and accurate", "[multi_similarity]", float, double) {
  using S = TestType;
  const auto X = random_matrix(16, 8, 21);
  const auto y = random_labels(16, 3, 22);
  // Large scales: exponents up to 2e4, which overflow without the max shift.
  for (const MultiSimilarityOptions& o : {MultiSimilarityOptions{.alpha = 1e4, .beta = 1e4, .base = 0, .mine = false},
                                          MultiSimilarityOptions{.alpha = 500, .beta = 1e4, .base = -1}}) {
    RowMatrix<S> dX(16, 8);
    const S value = MultiSimilarityLoss<S>(o).value_and_grad(as<S>(X), y, dX);
    CHECK(std::isfinite(value));
    CHECK(dX.allFinite());
    CHECK(double(value) == Approx(oracle(X, y, o)).epsilon(std::is_same_v<S, float> ? 1e-3 : 1e-9));
  }
  // Embedding magnitudes whose squares over- or underflow: the loss only sees directions.
  const MultiSimilarityLoss<S> loss;
  const S at_unit = loss.value(as<S>(X), y);
  for (double magnitude : {1e30, 1e-30}) {
    RowMatrix<S> dX(16, 8);
    const RowMatrix<S> scaled = as<S>(X) * S(magnitude);
    CHECK(loss.value_and_grad(scaled, y, dX) == Approx(at_unit).epsilon(1e-5));
    CHECK(dX.allFinite());
  }
}

TEST_CASE("a reference set of 100,000 rows runs in tiles", "[multi_similarity]") {
  const Index n = 6, m = 100000, d = 8;
  const RowMatrix<float> Q = random_matrix(n, d, 1).cast<float>();
  const RowMatrix<float> R = random_matrix(m, d, 2).cast<float>();
  const auto yq = random_labels(n, 10, 3), yr = random_labels(m, 10, 4);
  RowMatrix<float> dQ(n, d), dR(m, d), dQ_dense(n, d), dR_dense(m, d);
  const float tiled = MultiSimilarityLoss<float>().value_and_grad(Q, yq, R, yr, dQ, dR);
  const float dense = MultiSimilarityLoss<float>({.tile = m}).value_and_grad(Q, yq, R, yr, dQ_dense, dR_dense);
  CHECK(tiled == Approx(dense).epsilon(1e-5));
  CHECK((dQ - dQ_dense).cwiseAbs().maxCoeff() <= 1e-5f * (1 + dQ_dense.cwiseAbs().maxCoeff()));
  CHECK((dR - dR_dense).cwiseAbs().maxCoeff() <= 1e-5f * (1 + dR_dense.cwiseAbs().maxCoeff()));
}

static_assert(gradus::Loss<MultiSimilarityLoss<float>, RowMatrix<float>, Labels>);
static_assert(gradus::Loss<MultiSimilarityLoss<double>, RowMatrix<double>, Labels, RowMatrix<double>, Labels>);

TEST_CASE("expressions are accepted as embeddings", "[multi_similarity]") {
  const auto X = random_matrix(10, 4, 5);
  const auto y = random_labels(10, 3, 6);
  const RowMatrix<double> W = random_matrix(4, 3, 7);
  const MultiSimilarityLoss<double> loss;
  const RowMatrix<double> Z = X * W;
  CHECK(loss.value(X * W, y) == Approx(loss.value(Z, y)).epsilon(1e-14));
  CHECK(loss.value(X.transpose().transpose(), y.head(10)) == loss.value(X, y));
}

TEST_CASE("non-finite embeddings propagate NaN", "[multi_similarity]") {
  RowMatrix<double> X = random_matrix(5, 3, 1);
  const Labels y = random_labels(5, 2, 2);
  X(2, 1) = std::numeric_limits<double>::quiet_NaN();
  RowMatrix<double> dX(5, 3);
  CHECK(std::isnan(MultiSimilarityLoss<double>().value_and_grad(X, y, dX)));
  CHECK(dX.array().isNaN().all());
  X(2, 1) = std::numeric_limits<double>::infinity();
  CHECK(std::isnan(MultiSimilarityLoss<double>().value(X, y)));
}

TEST_CASE("bad input throws gradus::invalid_argument naming the argument", "[multi_similarity]") {
  const auto X = random_matrix(5, 3, 1);
  const Labels y = random_labels(5, 2, 2);
  const MultiSimilarityLoss<double> loss;
  RowMatrix<double> dX(5, 3);
  using Catch::Matchers::Contains;

  RowMatrix<double> zero = X;
  zero.row(3).setZero();
  CHECK_THROWS_WITH(loss.value(zero, y), Contains("'embeddings'") && Contains("zero row at index 3"));
  CHECK_THROWS_WITH(loss.value(X, y.head(4)), Contains("'labels'") && Contains("expected 5"));
  CHECK_THROWS_WITH(loss.value(RowMatrix<double>(0, 3), Labels(0)), Contains("'embeddings'"));
  CHECK_THROWS_WITH(loss.value(RowMatrix<double>(5, 0), y), Contains("'embeddings'") && Contains("columns"));
  RowMatrix<double> wrong(5, 2);
  CHECK_THROWS_WITH(loss.value_and_grad(X, y, wrong), Contains("'dembeddings'"));

  CHECK_THROWS_WITH(MultiSimilarityLoss<double>({.alpha = 0}), Contains("'options.alpha'"));
  CHECK_THROWS_WITH(MultiSimilarityLoss<double>({.alpha = -1}), Contains("'options.alpha'"));
  CHECK_THROWS_WITH(MultiSimilarityLoss<double>({.alpha = INFINITY}), Contains("'options.alpha'"));
  CHECK_THROWS_WITH(MultiSimilarityLoss<float>({.beta = 0}), Contains("'options.beta'"));
  CHECK_THROWS_WITH(MultiSimilarityLoss<float>({.beta = std::nan("")}), Contains("'options.beta'"));
  CHECK_THROWS_WITH(MultiSimilarityLoss<double>({.base = INFINITY}), Contains("'options.base'"));
  CHECK_THROWS_WITH(MultiSimilarityLoss<double>({.epsilon = -0.1}), Contains("'options.epsilon'"));
  CHECK_THROWS_WITH(MultiSimilarityLoss<double>({.tile = 0}), Contains("'options.tile'"));
  CHECK_NOTHROW(MultiSimilarityLoss<double>({.epsilon = 0}));
  CHECK_THROWS_WITH(MultiSimilarityMiner({.epsilon = -1}), Contains("'options.epsilon'"));

  const auto R = random_matrix(7, 3, 3);
  const Labels yr = random_labels(7, 2, 4);
  RowMatrix<double> dQ(5, 3), dR(7, 3);
  CHECK_THROWS_WITH(loss.value(X, y.head(4), R, yr), Contains("'query_labels'"));
  CHECK_THROWS_WITH(loss.value(X, y, R, yr.head(6)), Contains("'reference_labels'"));
  CHECK_THROWS_WITH(loss.value(X, y, random_matrix(7, 4, 5), yr), Contains("'references'") && Contains("columns"));
  CHECK_THROWS_WITH(loss.value(X, y, RowMatrix<double>(0, 3), Labels(0)), Contains("'references'"));
  RowMatrix<double> zero_reference = R;
  zero_reference.row(6).setZero();
  CHECK_THROWS_WITH(loss.value(X, y, zero_reference, yr), Contains("'references'") && Contains("index 6"));
  RowMatrix<double> dR_wrong(6, 3);
  CHECK_THROWS_WITH(loss.value_and_grad(X, y, R, yr, dQ, dR_wrong), Contains("'dreferences'"));
  CHECK_THROWS_WITH(loss.value_and_grad(X, y, R, yr, dR, dR), Contains("'dqueries'"));

  const RowMatrix<double> Sim = cosine_similarity(X, R);
  const auto masks = MultiSimilarityMiner().masks(Sim, y, yr);
  RowMatrix<double> dS_wrong(5, 6);
  CHECK_THROWS_WITH(loss.value_and_grad_on_pairs(Sim, masks, dS_wrong), Contains("'dsimilarity'"));
  CHECK_THROWS_WITH(loss.value_on_pairs(Sim.leftCols(6), masks), Contains("'pairs'"));
  CHECK_THROWS_WITH(MultiSimilarityMiner().masks(Sim, y), Contains("'similarity'") && Contains("square"));
  CHECK_THROWS_WITH(MultiSimilarityMiner().masks(Sim, y, yr.head(3)), Contains("'column_labels'"));
  CHECK_THROWS_WITH(MultiSimilarityMiner().masks(Sim, y.head(2), yr), Contains("'row_labels'"));
  CHECK_THROWS_WITH(cosine_similarity(zero), Contains("zero row at index 3"));
  CHECK_THROWS_AS(cosine_similarity(X, random_matrix(2, 4, 1)), gradus::invalid_argument);
}

namespace {

PairMasks masks_of(Index rows, Index cols, bool value) {
  PairMasks masks;
  masks.positive.setConstant(rows, cols, value);
  masks.negative.setConstant(rows, cols, value);
  return masks;
}

}  // namespace

TEST_CASE("empty similarity matrices and batches are rejected by every entry point", "[multi_similarity]") {
  using Catch::Matchers::Contains;
  const MultiSimilarityLoss<double> loss;
  const MultiSimilarityMiner miner;
  // N x 0 used to reach Eigen's empty-matrix assertion through maxCoeff (an abort, or UB without
  // assertions), in value_on_pairs and in the miner alike.
  for (const auto& [n, m] : {std::pair<Index, Index>{4, 0}, {0, 4}, {0, 0}}) {
    INFO(n << " x " << m);
    const RowMatrix<double> Sim(n, m);
    RowMatrix<double> dS(n, m);
    const auto masks = masks_of(n, m, false);
    const std::string what = n == 0 ? "expected at least one of its rows" : "expected at least one of its columns";
    CHECK_THROWS_WITH(loss.value_on_pairs(Sim, masks), Contains("'similarity'") && Contains(what));
    CHECK_THROWS_WITH(loss.value_and_grad_on_pairs(Sim, masks, dS), Contains("'similarity'") && Contains(what));
    CHECK_THROWS_WITH(miner.masks(Sim, Labels::Zero(n), Labels::Zero(m)), Contains("'similarity'") && Contains(what));
    CHECK_THROWS_WITH(miner.pairs(Sim, Labels::Zero(n), Labels::Zero(m)), Contains("'similarity'") && Contains(what));
    if (n == m) CHECK_THROWS_WITH(miner.masks(Sim, Labels::Zero(n)), Contains("'similarity'") && Contains(what));
  }
  // Zero-dimensional embeddings, empty batches and reference sets, mismatched labels.
  const auto X = random_matrix(5, 3, 1), R = random_matrix(7, 3, 2);
  const Labels y = random_labels(5, 2, 3), yr = random_labels(7, 2, 4);
  RowMatrix<double> dX(5, 3), dR(7, 3);
  CHECK_THROWS_WITH(loss.value(RowMatrix<double>(5, 0), y), Contains("'embeddings'") && Contains("columns"));
  CHECK_THROWS_WITH(loss.value(RowMatrix<double>(5, 0), y, RowMatrix<double>(7, 0), yr),
                    Contains("'queries'") && Contains("columns"));
  CHECK_THROWS_WITH(loss.value(RowMatrix<double>(0, 3), Labels(0), R, yr), Contains("'queries'"));
  CHECK_THROWS_WITH(loss.value_and_grad(X, y, RowMatrix<double>(0, 3), Labels(0), dX), Contains("'references'"));
  CHECK_THROWS_WITH(loss.value_and_grad(X, y.head(4), dX), Contains("'labels'"));
  CHECK_THROWS_WITH(loss.value_and_grad(X, y, R, yr.head(3), dX, dR), Contains("'reference_labels'"));
}

TEMPLATE_TEST_CASE("queries without positives or negatives, and one-class batches", "[multi_similarity]", float,
                   double) {
  using S = TestType;
  const auto Q = random_matrix(6, 4, 11), R = random_matrix(9, 4, 12);
  Labels yq(6), yr(9);
  yq << 0, 1, 7, 0, 8, 1;  // labels 7 and 8 are not in the references: those queries have no positive
  yr << 0, 1, 2, 0, 1, 2, 0, 1, 2;
  for (const auto& o : option_sets) {
    RowMatrix<S> dQ(6, 4), dR(9, 4);
    const double expected = oracle(Q, yq, R, yr, false, o);
    CHECK(double(MultiSimilarityLoss<S>(o).value_and_grad(as<S>(Q), yq, as<S>(R), yr, dQ, dR)) ==
          Approx(expected).epsilon(tolerance<S>()).margin(tolerance<S>()));
    CHECK(dQ.allFinite());
    CHECK(dR.allFinite());
    // Every query of a class absent from the references: no positive pair at all, 0 by rule.
    CHECK(MultiSimilarityLoss<S>(o).value_and_grad(as<S>(Q), Labels::Constant(6, 9), as<S>(R), yr, dQ, dR) == 0);
    CHECK(dQ.isZero(0));
    CHECK(dR.isZero(0));
    // One class throughout: no negative pair.
    CHECK(MultiSimilarityLoss<S>(o).value(as<S>(Q), Labels::Zero(6), as<S>(R), Labels::Zero(9)) == 0);
  }
}

TEMPLATE_TEST_CASE("row norms: tiny, huge and boundary rows are exact, denormal and zero rows are errors",
                   "[multi_similarity]", float, double) {
  using S = TestType;
  using Catch::Matchers::Contains;
  using limits = std::numeric_limits<S>;
  const S low = limits::min(), high = 1 / limits::min();
  const Index n = 8, d = 4;
  RowMatrix<S> X = as<S>(random_matrix(n, d, 31));
  const Labels y = random_labels(n, 3, 32);
  X.row(2) << 1, 0, 0, 0;  // a direction every scale below keeps exactly
  const MultiSimilarityLoss<S> loss;
  RowMatrix<S> unit_grad(n, d);
  const S unit = loss.value_and_grad(X, y, unit_grad);
  for (const S scale : {S(1e-30), S(1e30), low, high}) {
    INFO("row 2 scaled by " << double(scale));
    RowMatrix<S> scaled = X, grad(n, d), reference_grad(n, d);
    scaled.row(2) *= scale;
    const S value = loss.value_and_grad(scaled, y, grad);
    CHECK(value == Approx(unit).epsilon(1e-6));
    CHECK(grad.allFinite());
    // A scale-invariant loss: the gradient of the scaled row scales by 1/scale, the others not at all.
    const double tol = 1e-4 * (1 + unit_grad.cwiseAbs().maxCoeff());
    CHECK((grad.row(2).template cast<double>() * double(scale) - unit_grad.row(2).template cast<double>())
              .cwiseAbs()
              .maxCoeff() <= tol);
    grad.row(2).setZero();
    reference_grad = unit_grad;
    reference_grad.row(2).setZero();
    CHECK((grad - reference_grad).cwiseAbs().maxCoeff() <= S(tol));
    // Queries against references, both with the scaled row.
    RowMatrix<S> dQ(n, d), dR(n, d);
    CHECK(loss.value_and_grad(scaled, y, scaled, y, dQ, dR) ==
          Approx(loss.value(X, y, X, y)).epsilon(1e-6));
    CHECK(dQ.allFinite());
    CHECK(dR.allFinite());
  }
  // Just outside [low, high], denormal rows, zero rows, and finite rows whose norm overflows. Float
  // norms below 2.9e-39 used to give a value of 0 and a NaN gradient (1/norm overflowed).
  const S below = std::nextafter(low, S(0)), above = std::nextafter(high, limits::infinity());
  for (const S scale : {below, limits::denorm_min(), S(0), above, limits::max()}) {
    INFO("row 2 scaled by " << double(scale));
    RowMatrix<S> scaled = X;
    scaled.row(2) *= scale;
    if (scale == limits::max()) scaled(2, 1) = limits::max();
    CHECK_THROWS_WITH(loss.value(scaled, y),
                      Contains("'embeddings'") && Contains("rows with norms in") && Contains("at index 2"));
    CHECK_THROWS_WITH(loss.value(X, y, scaled, y), Contains("'references'") && Contains("at index 2"));
    CHECK_THROWS_WITH(cosine_similarity(scaled), Contains("at index 2"));
  }
  RowMatrix<S> zero = X;
  zero.row(2).setZero();
  CHECK_THROWS_WITH(loss.value(zero, y), Contains("a zero row at index 2"));
  // A row of denormal entries.
  RowMatrix<S> denormal = X;
  denormal.row(2).setConstant(limits::denorm_min() * 4);
  CHECK_THROWS_WITH(loss.value(denormal, y), Contains("a row of norm"));
}

TEMPLATE_TEST_CASE("options at the edges of their domains", "[multi_similarity]", float, double) {
  using S = TestType;
  using Catch::Matchers::Contains;
  const auto X = random_matrix(12, 5, 41);
  const auto y = random_labels(12, 3, 42);
  const double largest = 1e15, smallest = 1e-15;
  auto finite_and_exact = [&](const MultiSimilarityOptions& o) {
    RowMatrix<S> dX(12, 5);
    const S value = MultiSimilarityLoss<S>(o).value_and_grad(as<S>(X), y, dX);
    CHECK(std::isfinite(value));
    CHECK(dX.allFinite());
    const double expected = oracle(as<S>(X).template cast<double>(), y, o);
    CHECK(double(value) == Approx(expected).epsilon(std::is_same_v<S, float> ? 1e-5 : 1e-10));
  };
  for (const double scale : {smallest, largest}) {
    INFO("scale " << scale);
    finite_and_exact({.alpha = scale});
    finite_and_exact({.beta = scale});
    finite_and_exact({.alpha = scale, .beta = scale, .base = scale == largest ? -largest : 0, .mine = false});
  }
  finite_and_exact({.base = largest});
  finite_and_exact({.base = -largest});
  finite_and_exact({.epsilon = 1e300});  // any margin: every pair is kept
  finite_and_exact({.epsilon = 0});
  for (const double scale : {std::nextafter(smallest, 0.0), std::nextafter(largest, INFINITY), 0.0, -1.0,
                             double(INFINITY), double(NAN)}) {
    INFO("scale " << scale);
    CHECK_THROWS_WITH(MultiSimilarityLoss<S>({.alpha = scale}), Contains("'options.alpha'"));
    CHECK_THROWS_WITH(MultiSimilarityLoss<S>({.beta = scale}), Contains("'options.beta'"));
  }
  for (const double base : {std::nextafter(largest, INFINITY), -std::nextafter(largest, INFINITY), double(NAN)})
    CHECK_THROWS_WITH(MultiSimilarityLoss<S>({.base = base}), Contains("'options.base'"));
  for (const double epsilon : {-1e-300, double(INFINITY), double(NAN)}) {
    CHECK_THROWS_WITH(MultiSimilarityLoss<S>({.epsilon = epsilon}), Contains("'options.epsilon'"));
    CHECK_THROWS_WITH(MultiSimilarityMiner({.epsilon = epsilon}), Contains("'options.epsilon'"));
  }
  // Out-of-range enumerators.
  CHECK_THROWS_WITH(MultiSimilarityLoss<S>({.semantics = MultiSimilaritySemantics(2)}),
                    Contains("'options.semantics'") && Contains("got 2"));
  CHECK_THROWS_WITH(MultiSimilarityLoss<S>({.semantics = MultiSimilaritySemantics(-1)}), Contains("'options.semantics'"));
  CHECK_THROWS_WITH(MultiSimilarityMiner({.semantics = MultiSimilaritySemantics(7)}), Contains("'options.semantics'"));
  CHECK_THROWS_WITH(MultiSimilarityLoss<S>({.tile = -1}), Contains("'options.tile'"));
}

TEMPLATE_TEST_CASE("value_on_pairs: similarities up to 1e15 in magnitude, non-finite ones propagate",
                   "[multi_similarity]", float, double) {
  using S = TestType;
  using Catch::Matchers::Contains;
  const Index n = 5, m = 6;
  RowMatrix<S> Sim = as<S>(random_matrix(n, m, 51).array().tanh().matrix());
  const auto masks = masks_of(n, m, true);
  const MultiSimilarityLoss<S> loss({.alpha = 1e15, .beta = 1e15, .base = -1e15});
  RowMatrix<S> dS(n, m);
  for (const S edge : {S(1e15), S(-1e15)}) {
    Sim(1, 2) = edge;
    CHECK(std::isfinite(loss.value_and_grad_on_pairs(Sim, masks, dS)));
    CHECK(dS.allFinite());
  }
  Sim(1, 2) = std::nextafter(S(1e15), std::numeric_limits<S>::infinity());
  CHECK_THROWS_WITH(loss.value_on_pairs(Sim, masks), Contains("'similarity'") && Contains("at (1, 2)"));
  Sim(1, 2) = std::numeric_limits<S>::quiet_NaN();
  CHECK(std::isnan(loss.value_on_pairs(Sim, masks)));
}
