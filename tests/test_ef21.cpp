#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include <gradus/optim/ef21.hpp>
#include <gradus/testing/gradient_check.hpp>

#include "../examples/ef21_heart.hpp"

using namespace gradus;
using namespace gradus::ef21;

namespace {

template <class S>
Vector<S> random_vector(Index d, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal;
  Vector<S> v(d);
  for (Index j = 0; j < d; ++j) v(j) = static_cast<S>(normal(rng));
  return v;
}

template <class S>
RowMatrix<S> random_matrix(Index m, Index d, std::uint64_t seed) {
  const Vector<S> flat = random_vector<S>(m * d, seed);
  return Eigen::Map<const RowMatrix<S>>(flat.data(), m, d);
}

Labels random_labels(Index m, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  Labels y(m);
  for (Index j = 0; j < m; ++j) y(j) = (rng() & 1) ? 1 : -1;
  return y;
}

// n clients of m rows each; client 0's rows scaled by `scale` to make its L_i stand out.
template <class S = double>
std::vector<NonconvexLogistic<S>> make_clients(Index n, Index m, Index d, double scale = 1, std::uint64_t seed = 7) {
  std::vector<NonconvexLogistic<S>> clients;
  for (Index i = 0; i < n; ++i) {
    RowMatrix<S> A = random_matrix<S>(m, d, seed + 2 * static_cast<std::uint64_t>(i));
    if (i == 0) A *= static_cast<S>(scale);
    clients.emplace_back(A, random_labels(m, seed + 2 * static_cast<std::uint64_t>(i) + 1));
  }
  return clients;
}

std::vector<double> smoothness_of(const std::vector<NonconvexLogistic<double>>& clients) {
  std::vector<double> L;
  for (const auto& client : clients) L.push_back(client.smoothness());
  return L;
}

// (|v_j| descending, j ascending): the order TopK promises, by full sort.
template <class S>
std::vector<std::int32_t> top_k_oracle(const Vector<S>& v, Index k) {
  std::vector<std::int32_t> order(static_cast<std::size_t>(v.size()));
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](auto a, auto b) {
    return std::abs(v(a)) != std::abs(v(b)) ? std::abs(v(a)) > std::abs(v(b)) : a < b;
  });
  order.resize(static_cast<std::size_t>(k));
  std::sort(order.begin(), order.end());
  return order;
}

double relative_difference(const Eigen::VectorXd& a, const Eigen::VectorXd& b) {
  return (a - b).norm() / std::max(b.norm(), 1e-300);
}

}  // namespace

// ---------------------------------------------------------------- compressors

TEMPLATE_TEST_CASE("TopK keeps the k largest magnitudes, ties to the lower index", "[ef21][compressors]", float,
                   double) {
  using S = TestType;
  Rng rng(1);
  for (Index d : {1, 2, 3, 7, 8, 9, 17, 64, 1000}) {
    // Small integers: many ties.
    Vector<S> v = (random_vector<S>(d, static_cast<std::uint64_t>(d)) * S(2)).array().round();
    for (Index k : {Index(1), std::max<Index>(1, d / 3), d}) {
      SparseMessage<S> message;
      TopK{k}.compress(v, message, rng);
      const auto expected = top_k_oracle(v, k);
      REQUIRE(message.indices == expected);
      for (std::size_t j = 0; j < expected.size(); ++j) CHECK(message.values[j] == v(expected[j]));
      CHECK(message.dim == d);
      CHECK(message.nnz() == k);
      CHECK(message.value_bits() == static_cast<std::uint64_t>(k) * sizeof(S) * 8);
      CHECK(message.index_bits() == static_cast<std::uint64_t>(k) * 32);
      // Deterministic contraction: ||C(v) - v||^2 <= (1 - k/d) ||v||^2.
      const double error = static_cast<double>((message.to_dense() - v).squaredNorm());
      CHECK(error <= (1 - TopK{k}.alpha(d)) * static_cast<double>(v.squaredNorm()) + 1e-6);
    }
  }
}

TEST_CASE("TopK on long vectors (sampled threshold) matches the full-sort oracle", "[ef21][compressors]") {
  Rng rng;
  SparseMessage<double> message;
  for (Index d : {8192, 10000, 100003}) {
    const Eigen::VectorXd v = (random_vector<double>(d, static_cast<std::uint64_t>(d)) * 3.0).array().round();
    for (Index k : {Index(1), Index(37), d / 100, d / 3}) {
      TopK{k}.compress(v, message, rng);
      CHECK(message.indices == top_k_oracle(v, k));
    }
  }
  // Large entries only where the threshold is sampled: fewer than k candidates pass it.
  const Index d = 8192;
  Eigen::VectorXd v = Eigen::VectorXd::Constant(d, 0.5);
  for (Index i = 0; i < 1024; ++i) v(i * d / 1024) = static_cast<double>(i + 1);
  TopK{2000}.compress(v, message, rng);
  CHECK(message.indices == top_k_oracle(v, 2000));
}

TEST_CASE("TopK sends NaN as the largest entry and takes expressions", "[ef21][compressors]") {
  Rng rng;
  Eigen::VectorXd v(4);
  v << 1, std::nan(""), -3, 2;
  SparseMessage<double> message;
  TopK{2}.compress(v, message, rng);
  CHECK(message.indices == std::vector<std::int32_t>{1, 2});
  CHECK(std::isnan(message.values[0]));
  TopK{1}.compress(2.0 * v.tail(2), message, rng);
  CHECK(message.indices == std::vector<std::int32_t>{0});
  CHECK(message.values[0] == -6);
}

TEMPLATE_TEST_CASE("RandK picks k distinct coordinates; Monte Carlo contraction and unbiasedness",
                   "[ef21][compressors]", float, double) {
  using S = TestType;
  const Index d = 9, k = 2;
  const Vector<S> v = random_vector<S>(d, 3);
  const double norm_sq = static_cast<double>(v.squaredNorm());
  const int trials = 20000;
  for (bool scaled : {false, true}) {
    Rng rng(11);
    RandK compressor{k, scaled};
    SparseMessage<S> message;
    Eigen::VectorXd mean = Eigen::VectorXd::Zero(d);
    double error = 0;
    for (int t = 0; t < trials; ++t) {
      compressor.compress(v, message, rng);
      REQUIRE(message.nnz() == k);
      REQUIRE(std::is_sorted(message.indices.begin(), message.indices.end()));
      REQUIRE(std::adjacent_find(message.indices.begin(), message.indices.end()) == message.indices.end());
      const Eigen::VectorXd dense = message.to_dense().template cast<double>();
      mean += dense;
      error += (dense - v.template cast<double>()).squaredNorm();
    }
    mean /= trials;
    error /= trials;
    if (scaled) {  // E C(v) = v, E||C(v) - v||^2 = omega ||v||^2
      CHECK(relative_difference(mean, v.template cast<double>()) < 0.05);
      CHECK(error == Approx(compressor.omega(d) * norm_sq).epsilon(0.05));
      CHECK_THROWS_AS(compressor.alpha(d), gradus::invalid_argument);
    } else {  // E||C(v) - v||^2 = (1 - k/d) ||v||^2 exactly
      CHECK(error == Approx((1 - compressor.alpha(d)) * norm_sq).epsilon(0.03));
    }
  }
}

TEST_CASE("Identity sends the dense vector without indices; Rng streams are reproducible", "[ef21][compressors]") {
  Rng rng;
  const Eigen::VectorXd v = random_vector<double>(5, 1);
  SparseMessage<double> message;
  Identity{}.compress(v, message, rng);
  CHECK(message.dense());
  CHECK(message.to_dense() == v);
  CHECK(message.index_bits() == 0);
  CHECK(message.value_bits() == 5 * 64);
  CHECK(Identity{}.alpha(5) == 1);
  message.clear(5);
  CHECK(message.nnz() == 0);
  CHECK(message.to_dense() == Eigen::VectorXd::Zero(5));

  Rng a = Rng::stream(3, 1), b = Rng::stream(3, 1), c = Rng::stream(3, 2);
  CHECK(a.next() == b.next());
  CHECK(a.next() != c.next());
}

TEST_CASE("Compressors reject k = 0 and k > d", "[ef21][compressors][errors]") {
  Rng rng;
  SparseMessage<double> message;
  const Eigen::VectorXd v = Eigen::VectorXd::Ones(4);
  CHECK_THROWS_WITH(TopK{0}.compress(v, message, rng),
                    "gradus::TopK::compress: argument 'k': expected a value in [1, d = 4], got 0");
  CHECK_THROWS_AS(TopK{5}.compress(v, message, rng), gradus::invalid_argument);
  CHECK_THROWS_AS(RandK{0}.compress(v, message, rng), gradus::invalid_argument);
  CHECK_THROWS_AS((RandK{5, true}.compress(v, message, rng)), gradus::invalid_argument);
  CHECK_THROWS_AS(TopK{1}.alpha(0), gradus::invalid_argument);
}

TEMPLATE_TEST_CASE("Compressors: the domains of d and k, at their boundaries", "[ef21][compressors][errors]", float,
                   double) {
  using S = TestType;
  Rng rng;
  SparseMessage<S> message;
  const Vector<S> empty(0), v = random_vector<S>(5, 2);
  CHECK_THROWS_WITH(TopK{1}.compress(empty, message, rng),
                    "gradus::TopK::compress: argument 'v': expected a vector of size in [1, 2^31 - 1], got 0");
  CHECK_THROWS_AS(RandK{1}.compress(empty, message, rng), gradus::invalid_argument);
  CHECK_THROWS_AS(Identity{}.compress(empty, message, rng), gradus::invalid_argument);
  CHECK_THROWS_AS(Identity{}.alpha(0), gradus::invalid_argument);
  for (Index k : {Index(1), Index(5)}) {  // both ends of [1, d]
    TopK{k}.compress(v, message, rng);
    CHECK(message.nnz() == k);
    RandK{k}.compress(v, message, rng);
    CHECK(message.nnz() == k);
    RandK{k, true}.compress(v, message, rng);
    CHECK(message.to_dense().allFinite());
  }
  CHECK(TopK{5}.alpha(5) == 1);
  for (Index k : {Index(0), Index(6), Index(-1), std::numeric_limits<Index>::min()}) {
    CHECK_THROWS_AS(TopK{k}.compress(v, message, rng), gradus::invalid_argument);
    CHECK_THROWS_AS(RandK{k}.compress(v, message, rng), gradus::invalid_argument);
    CHECK_THROWS_AS((RandK{k, true}.omega(5)), gradus::invalid_argument);
  }
}

TEMPLATE_TEST_CASE("Compressors propagate NaN and Inf", "[ef21][compressors]", float, double) {
  using S = TestType;
  const S inf = std::numeric_limits<S>::infinity(), nan = std::numeric_limits<S>::quiet_NaN();
  Vector<S> v(6);
  v << 1, -inf, 5, nan, inf, -2;
  Rng rng;
  SparseMessage<S> message;
  TopK{3}.compress(v, message, rng);  // NaN and +-Inf outrank every finite magnitude
  CHECK(message.indices == std::vector<std::int32_t>{1, 3, 4});
  CHECK(message.values[0] == -inf);
  CHECK(std::isnan(message.values[1]));
  CHECK(message.values[2] == inf);
  TopK{4}.compress(v, message, rng);
  CHECK(message.indices == std::vector<std::int32_t>{1, 2, 3, 4});
  Identity{}.compress(v, message, rng);
  CHECK(std::isnan(message.values[3]));
  CHECK(message.values[1] == -inf);
  for (bool scaled : {false, true}) {
    RandK{6, scaled}.compress(v, message, rng);
    CHECK(message.indices == std::vector<std::int32_t>{0, 1, 2, 3, 4, 5});
    CHECK(std::isnan(message.values[3]));
    CHECK(message.values[4] == inf);
  }
}

TEST_CASE("Messages are checked against the dimension before use", "[ef21][compressors][errors]") {
  const std::vector<std::int32_t> indices = {0, 39};
  const std::vector<double> values = {1, 2}, dense = {1, 2, 3, 4};
  Eigen::VectorXd target = Eigen::VectorXd::Zero(4);
  const MessageView<double> out_of_range{4, indices, values};
  CHECK_FALSE(out_of_range.valid(4));
  CHECK_THROWS_WITH(out_of_range.add_to(target, 1.0),
                    "gradus::MessageView::add_to: argument 'message': expected a message of dimension 4: no values, 4 "
                    "values without indices, or one value per index in [0, 4), got dimension 4, 2 indices in [0, 39], "
                    "2 values");
  const std::vector<std::int32_t> negative = {-1, 2};
  CHECK_THROWS_AS((MessageView<double>{4, negative, values}.add_to(target, 1.0)), gradus::invalid_argument);
  CHECK_THROWS_AS((MessageView<double>{4, std::span(indices).first(1), values}.add_to(target, 1.0)),
                  gradus::invalid_argument);  // 1 index, 2 values
  CHECK_THROWS_AS((MessageView<double>{4, {}, values}.add_to(target, 1.0)), gradus::invalid_argument);
  const MessageView<double> whole{4, {}, dense};
  Eigen::VectorXd longer = Eigen::VectorXd::Zero(40);
  CHECK_THROWS_AS(whole.add_to(longer, 1.0), gradus::invalid_argument);  // a reader with the wrong d
  CHECK_THROWS_AS((MessageView<double>{-1, {}, {}}.to_dense()), gradus::invalid_argument);
  CHECK(target == Eigen::VectorXd::Zero(4));  // every rejection wrote nothing
  whole.add_to(target, 2.0);
  CHECK(target == Eigen::Vector4d(2, 4, 6, 8));
  CHECK((MessageView<double>{4, {}, {}}.valid(4)));
}

// ---------------------------------------------------------------- step sizes

TEST_CASE("theta, beta, xi and the QM / AM step sizes", "[ef21][step_sizes]") {
  const double alpha = 1.0 / 14;  // the worked example of the notes: d = 14, k = 1
  CHECK(theta(alpha) == Approx(0.036376).epsilon(1e-4));
  CHECK(beta(alpha) == Approx(25.527).epsilon(1e-4));
  CHECK(xi(alpha) == Approx(26.4907).epsilon(1e-5));
  CHECK(xi(alpha) == Approx(std::sqrt(beta(alpha) / theta(alpha))).epsilon(1e-12));
  CHECK(xi(1.0) == 0);
  CHECK(beta(1.0) == 0);

  const std::vector<double> L = {1, 1, 10};
  CHECK(arithmetic_mean(L) == Approx(4));
  CHECK(quadratic_mean(L) == Approx(std::sqrt(34.0)));
  CHECK(step_size(2, L, 1.0, StepRule::QuadraticMean) == Approx(0.5));  // alpha = 1: gradient descent
  CHECK(step_size(2, L, alpha, StepRule::ArithmeticMean) == Approx(1 / (2 + 4 * xi(alpha))));
  CHECK(step_size(2, L, alpha, StepRule::QuadraticMean) < step_size(2, L, alpha, StepRule::ArithmeticMean));

  CHECK_THROWS_AS(theta(0.0), gradus::invalid_argument);
  CHECK_THROWS_AS(xi(1.5), gradus::invalid_argument);
  CHECK_THROWS_AS(beta(std::nan("")), gradus::invalid_argument);
  CHECK_THROWS_WITH(step_size(1, std::vector<double>{1, -2}, 0.5, StepRule::ArithmeticMean),
                    "gradus::ef21::arithmetic_mean: argument 'L_i': expected a value > 0, got -2");
  CHECK_THROWS_AS(quadratic_mean(std::vector<double>()), gradus::invalid_argument);
  CHECK_THROWS_AS(step_size(0, L, 0.5, StepRule::QuadraticMean), gradus::invalid_argument);
}

namespace {

// theta = 1 - sqrt(1 - a) in long double, free of cancellation: its binomial series sum c_k a^k
// (c_1 = 1/2, c_{k+1} = c_k (2k - 1) / (2k + 2)) for a <= 1/2, the direct form above.
long double theta_reference(long double a) {
  if (a > 0.5L) return 1 - std::sqrt(1 - a);
  long double sum = 0, term = a / 2;
  for (int k = 1; term > sum * 1e-25L; ++k) {
    sum += term;
    term *= a * (2 * k - 1) / (2 * k + 2);
  }
  return sum;
}

template <class T>
bool near(T value, long double reference, long double ulps = 4) {
  if (reference == 0) return value == 0;
  return std::abs(static_cast<long double>(value) - reference) <= ulps * std::numeric_limits<T>::epsilon() * reference;
}

}  // namespace

TEMPLATE_TEST_CASE("theta, beta and xi are accurate down to alpha = 1e-15 and at the domain's ends",
                   "[ef21][step_sizes]", float, double) {
  using T = TestType;
  const T low = 2 * std::numeric_limits<T>::min();
  std::vector<T> alphas = {1, T(0.75), T(0.5), T(1) / 14, low};
  for (int e = 1; e <= 15; ++e) alphas.push_back(static_cast<T>(std::pow(10.0L, -e)));
  for (T alpha : alphas) {
    const long double a = alpha, t = theta_reference(a);
    INFO("alpha = " << alpha);
    CHECK(near(theta(alpha), t));
    CHECK(near(beta(alpha), (1 - a) / t));
    CHECK(near(xi(alpha), std::sqrt(1 - a) / t));
    CHECK(std::isfinite(beta(alpha)));
    CHECK(theta(alpha) >= std::numeric_limits<T>::min());  // normal
  }
  CHECK(theta(low) == std::numeric_limits<T>::min());
  CHECK(theta(T(1)) == 1);
  for (T bad : {std::nextafter(low, T(0)), T(0), std::nextafter(T(1), T(2)), -T(1), std::numeric_limits<T>::quiet_NaN()}) {
    CHECK_THROWS_AS(theta(bad), gradus::invalid_argument);
    CHECK_THROWS_AS(beta(bad), gradus::invalid_argument);
    CHECK_THROWS_AS(xi(bad), gradus::invalid_argument);
  }
}

TEST_CASE("step_size is accurate for small alpha and rejects a gamma that is not a normal double",
          "[ef21][step_sizes][errors]") {
  const std::vector<double> L = {1, 3, 10};
  for (int e = 0; e <= 15; ++e) {
    const double alpha = std::pow(10.0, -e);
    const long double a = alpha, t = theta_reference(a), x = std::sqrt(1 - a) / t;
    for (StepRule rule : {StepRule::QuadraticMean, StepRule::ArithmeticMean}) {
      const long double mean = rule == StepRule::QuadraticMean ? std::sqrt(110.0L / 3) : 14.0L / 3;
      INFO("alpha = " << alpha);
      CHECK(near(step_size(2, L, alpha, rule), 1 / (2 + mean * x), 8));  // 1 - sqrt(1 - 1e-12) was 9e-5 off
    }
  }
  // Tiny alpha: gamma ~ alpha / (2 Ltilde), finite and positive, until it would underflow.
  const double tiny = 2 * std::numeric_limits<double>::min();
  CHECK(step_size(1, std::vector<double>{1}, tiny, StepRule::ArithmeticMean) == std::numeric_limits<double>::min());
  CHECK_THROWS_AS(step_size(1, std::vector<double>{std::nextafter(1.0, 2.0)}, tiny, StepRule::ArithmeticMean),
                  gradus::invalid_argument);
  CHECK_THROWS_AS(step_size(1, L, std::nextafter(tiny, 0.0), StepRule::ArithmeticMean), gradus::invalid_argument);
  // alpha = 1: gamma = 1 / L, a normal double up to L = 2^1022.
  const double largest = std::ldexp(1.0, 1022);
  CHECK(step_size(largest, L, 1.0, StepRule::QuadraticMean) == std::numeric_limits<double>::min());
  CHECK_THROWS_WITH(step_size(std::nextafter(largest, INFINITY), L, 1.0, StepRule::QuadraticMean),
                    Catch::Contains("argument 'L, L_i': expected constants for which gamma"));
  CHECK_THROWS_AS(step_size(1, std::vector<double>{1e308, 1e308}, 0.5, StepRule::QuadraticMean), gradus::invalid_argument);
  CHECK_THROWS_AS(step_size(1, L, 0.5, StepRule(2)), gradus::invalid_argument);
}

// ---------------------------------------------------------------- logistic objective

TEMPLATE_TEST_CASE("NonconvexLogistic gradient matches finite differences", "[ef21][logistic]", float, double) {
  using S = TestType;
  for (Index d : {1, 2, 3, 7, 8, 9, 17, 64}) {
    const Index m = 5 + d % 4;
    const RowMatrix<double> A = random_matrix<double>(m, d, static_cast<std::uint64_t>(d));
    const Labels y = random_labels(m, static_cast<std::uint64_t>(d) + 1);
    NonconvexLogistic<double> reference(A, y);
    NonconvexLogistic<S> f(A.cast<S>(), y);
    static_assert(MinibatchObjective<NonconvexLogistic<S>>);
    const Eigen::VectorXd x = random_vector<double>(d, 5);
    Vector<S> g(d);
    const S value = f.value_and_grad(x.cast<S>(), g);
    CHECK(static_cast<double>(value) == Approx(reference.value(x)).epsilon(std::is_same_v<S, float> ? 1e-5 : 1e-12));
    testing::GradientCheckOptions options;
    if (std::is_same_v<S, float>) options.tolerance = 2e-3;
    const auto report = testing::check_gradient([&](const Eigen::VectorXd& p) { return reference.value(p); }, x, g,
                                                options);
    INFO("d = " << d << ": " << report.summary());
    CHECK(report.ok);
  }
}

TEST_CASE("NonconvexLogistic minibatch gradient is the mean over the batch's rows", "[ef21][logistic]") {
  const Index m = 12, d = 9;
  const RowMatrix<double> A = random_matrix<double>(m, d, 1);
  const Labels y = random_labels(m, 2);
  NonconvexLogistic<double> f(A, y);
  const Eigen::VectorXd x = random_vector<double>(d, 3);
  Eigen::VectorXd full(d), batched(d), subset(d);
  std::vector<Index> all(static_cast<std::size_t>(m));
  std::iota(all.begin(), all.end(), Index(0));
  const double value = f.value_and_grad(x, full);
  CHECK(f.value_and_grad(x, std::span<const Index>(all), batched) == Approx(value).epsilon(1e-12));
  CHECK(relative_difference(batched, full) < 1e-12);

  const std::vector<Index> rows = {2, 5, 11};
  RowMatrix<double> A_rows(3, d);
  Labels y_rows(3);
  for (Index r = 0; r < 3; ++r) {
    A_rows.row(r) = A.row(rows[static_cast<std::size_t>(r)]);
    y_rows(r) = y(rows[static_cast<std::size_t>(r)]);
  }
  NonconvexLogistic<double> oracle(A_rows, y_rows);
  CHECK(f.value_and_grad(x, std::span<const Index>(rows), batched) == Approx(oracle.value_and_grad(x, subset)));
  CHECK(relative_difference(batched, subset) < 1e-12);
}

TEST_CASE("NonconvexLogistic: L_i formula, Lipschitz bound, extreme scores, bad input", "[ef21][logistic]") {
  const RowMatrix<double> A = random_matrix<double>(6, 4, 9);
  const Labels y = random_labels(6, 10);
  NonconvexLogistic<double> f(A, y, {.lambda = 0.1});
  const Eigen::MatrixXd gram = A.transpose() * A;
  const double top = Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd>(gram).eigenvalues().maxCoeff();
  CHECK(f.smoothness() == Approx(top / 24 + 0.2).epsilon(1e-12));
  const RowMatrix<double> wide = random_matrix<double>(3, 8, 2);  // the m x m Gram path
  const Eigen::MatrixXd wide_gram = wide.transpose() * wide;
  CHECK(logistic_smoothness(wide, 0.0) ==
        Approx(Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd>(wide_gram).eigenvalues().maxCoeff() / 12).epsilon(1e-10));
  Eigen::VectorXd gx(4), gz(4);
  for (std::uint64_t s = 0; s < 20; ++s) {
    const Eigen::VectorXd x = random_vector<double>(4, s), z = random_vector<double>(4, s + 100);
    f.value_and_grad(x, gx);
    f.value_and_grad(z, gz);
    CHECK((gx - gz).norm() <= f.smoothness() * (x - z).norm() * (1 + 1e-12));
  }

  // Scores of magnitude 1e4 in float: finite value and gradient.
  RowMatrix<float> big(2, 2);
  big << 1e4f, 0, -1e4f, 0;
  Labels ones(2);
  ones << 1, 1;
  NonconvexLogistic<float> g(big, ones);
  Vector<float> grad(2);
  const float value = g.value_and_grad(Vector<float>::Ones(2), grad);
  CHECK(std::isfinite(value));
  CHECK(value == Approx(0.5e4 + 0.1).epsilon(1e-4));  // (0 + 1e4)/2 + lambda (1/2 + 1/2) ... x = (1, 1)
  CHECK(grad.allFinite());

  Eigen::VectorXd wrong(3);
  CHECK_THROWS_WITH(f.value(wrong),
                    "gradus::NonconvexLogistic::value: argument 'x': expected 4 entries (columns of A), got 3");
  CHECK_THROWS_AS(f.value_and_grad(random_vector<double>(4, 1), wrong), gradus::invalid_argument);
  CHECK_THROWS_AS(NonconvexLogistic<double>(A, random_labels(5, 1)), gradus::invalid_argument);
  Labels bad = y;
  bad(0) = 2;
  CHECK_THROWS_AS(NonconvexLogistic<double>(A, bad), gradus::invalid_argument);
  CHECK_THROWS_AS(NonconvexLogistic<double>(A, y, {.lambda = -1}), gradus::invalid_argument);
  const std::vector<Index> out_of_range = {6}, empty = {};
  Eigen::VectorXd g4(4);
  CHECK_THROWS_AS(f.value_and_grad(random_vector<double>(4, 1), std::span<const Index>(out_of_range), g4),
                  gradus::invalid_argument);
  CHECK_THROWS_AS(f.value_and_grad(random_vector<double>(4, 1), std::span<const Index>(empty), g4),
                  gradus::invalid_argument);
}

// ---------------------------------------------------------------- EF21 family

namespace {

using Logistic = NonconvexLogistic<double>;

// Runs `rounds` rounds and returns every iterate.
template <class Method>
std::vector<Eigen::VectorXd> trajectory(Method& method, int rounds) {
  std::vector<Eigen::VectorXd> xs;
  for (int t = 0; t < rounds; ++t) {
    method.step();
    xs.push_back(method.x());
  }
  return xs;
}

// Server g against sum_i w_i g_i.
template <class Method>
double server_mismatch(const Method& method) {
  Eigen::VectorXd mean = Eigen::VectorXd::Zero(method.x().size());
  for (Index i = 0; i < method.num_clients(); ++i) mean += method.weights()[static_cast<std::size_t>(i)] * method.client_g(i);
  return relative_difference(method.g(), mean);
}

const Eigen::VectorXd x0 = random_vector<double>(6, 42);

}  // namespace

TEST_CASE("EF21: server g equals the (weighted) mean of the g_i after every round", "[ef21]") {
  const auto clients = make_clients(5, 8, 6, 4.0);
  const auto L = smoothness_of(clients);
  const std::vector<EF21Options> variants = {
      {.gamma = 0.05},
      {.gamma = 0.05, .weights = L},
      {.gamma = 0.05, .init = Init::Compressed, .participation = 0.5, .seed = 3},
      {.gamma = 0.05, .init = Init::Zero, .batch_size = 3, .seed = 4},
      {.gamma = 0.05, .weights = L, .momentum = 0.5},
  };
  for (std::size_t k = 0; k < variants.size(); ++k) {
    EF21 method(clients, TopK{2}, x0, variants[k]);
    CHECK(server_mismatch(method) < 1e-12);
    for (int t = 0; t < 50; ++t) {
      method.step();
      INFO("variant " << k << ", round " << t);
      REQUIRE(server_mismatch(method) < 1e-12);
    }
  }
}

TEST_CASE("EF21 with TopK, k = d, is distributed gradient descent", "[ef21]") {
  auto clients = make_clients(4, 8, 6);
  const double gamma = 0.3;
  EF21 method(clients, TopK{6}, x0, {.gamma = gamma});
  Eigen::VectorXd x = x0, g(6), sum(6);
  for (int t = 0; t < 30; ++t) {
    sum.setZero();
    for (auto& client : clients) {
      client.value_and_grad(x, g);
      sum += g;
    }
    x -= gamma * sum / 4;
    method.step();
    REQUIRE(relative_difference(method.x(), x) < 1e-12);
  }
}

TEST_CASE("EF21-W equals EF21 at the same step size for TopK", "[ef21]") {
  const auto clients = make_clients(6, 8, 6, 10.0);
  const auto L = smoothness_of(clients);
  const double gamma = step_size(Logistic(random_matrix<double>(2, 6, 1), random_labels(2, 1)).smoothness(), L,
                                 TopK{1}.alpha(6), StepRule::ArithmeticMean);
  EF21 plain(clients, TopK{1}, x0, {.gamma = gamma});
  EF21 weighted(clients, TopK{1}, x0, {.gamma = gamma, .weights = L});
  for (int t = 0; t < 200; ++t) {
    const auto a = plain.step(), b = weighted.step();
    REQUIRE(relative_difference(weighted.x(), plain.x()) < 1e-10);
    REQUIRE(b.grad_norm_sq == Approx(a.grad_norm_sq).epsilon(1e-9));
  }
}

TEST_CASE("EF21-PP with p = 1 and EF21-HB with momentum 0 are EF21; threads change nothing", "[ef21]") {
  const auto clients = make_clients(5, 8, 6, 3.0);
  const EF21Options base{.gamma = 0.1, .seed = 9};
  EF21 reference(clients, RandK{2}, x0, base);
  auto pp = base, hb = base, threaded = base;
  pp.participation = 1;
  hb.momentum = 0;
  threaded.threads = 3;
  EF21 with_pp(clients, RandK{2}, x0, pp), with_hb(clients, RandK{2}, x0, hb), with_threads(clients, RandK{2}, x0, threaded);
  const auto expected = trajectory(reference, 40);
  CHECK(trajectory(with_pp, 40) == expected);
  CHECK(trajectory(with_hb, 40) == expected);
  CHECK(trajectory(with_threads, 40) == expected);
}

TEST_CASE("EF21-PP: silent clients send nothing and keep g_i", "[ef21]") {
  const auto clients = make_clients(8, 6, 6);
  EF21 method(clients, TopK{1}, x0, {.gamma = 0.1, .participation = 0.4, .seed = 1});
  Index total = 0;
  for (int t = 0; t < 100; ++t) {
    std::vector<Eigen::VectorXd> before;
    for (Index i = 0; i < 8; ++i) before.push_back(method.client_g(i));
    const auto info = method.step();
    Index unchanged = 0;
    for (Index i = 0; i < 8; ++i) unchanged += method.client_g(i) == before[static_cast<std::size_t>(i)];
    CHECK(unchanged >= 8 - info.participants);
    CHECK(info.value_bits == static_cast<std::uint64_t>(info.participants) * 64);
    CHECK(info.index_bits == static_cast<std::uint64_t>(info.participants) * 32);
    total += info.participants;
  }
  CHECK(total > 8 * 100 * 0.3);
  CHECK(total < 8 * 100 * 0.5);
}

TEST_CASE("EF21-HB and EF21-SGD converge; init modes and bits", "[ef21]") {
  const auto clients = make_clients(4, 20, 6);
  const auto L = smoothness_of(clients);
  const double gamma = step_size(1.0, L, TopK{2}.alpha(6), StepRule::QuadraticMean);
  for (const EF21Options& options : {EF21Options{.gamma = gamma, .momentum = 0.5},
                                     EF21Options{.gamma = gamma, .init = Init::Compressed, .batch_size = 10}}) {
    EF21 method(clients, TopK{2}, x0, options);
    double last = 0;
    for (int t = 0; t < 800; ++t) last = method.step().grad_norm_sq;
    CHECK(last < 0.05 * method.initial().grad_norm_sq);
  }
  EF21 full(clients, TopK{2}, x0, {.gamma = gamma});
  CHECK(full.initial().value_bits == 4 * 6 * 64);  // dense g_i^0
  CHECK(full.initial().index_bits == 0);
  EF21 compressed(clients, TopK{2}, x0, {.gamma = gamma, .init = Init::Compressed});
  CHECK(compressed.initial().value_bits == 4 * 2 * 64);
  CHECK(compressed.initial().index_bits == 4 * 2 * 32);
  EF21 zero(clients, TopK{2}, x0, {.gamma = gamma, .init = Init::Zero});
  CHECK(zero.g() == Eigen::VectorXd::Zero(6));
  CHECK(zero.initial().value_bits == 0);
  EF21 quiet(clients, TopK{2}, x0, {.gamma = gamma, .monitor = false});
  CHECK(std::isnan(quiet.step().grad_norm_sq));
}

TEST_CASE("EF21 checkpoint and resume reproduce the iterates exactly", "[ef21]") {
  const auto clients = make_clients(5, 10, 6);
  const EF21Options options{.gamma = 0.1, .participation = 0.7, .momentum = 0.3, .batch_size = 4, .seed = 5};
  EF21 first(clients, RandK{2}, x0, options);
  trajectory(first, 15);
  const auto state = first.checkpoint();
  const auto expected = trajectory(first, 15);
  EF21 second(clients, RandK{2}, random_vector<double>(6, 1), options);
  second.restore(state);
  CHECK(second.round() == 15);
  CHECK(trajectory(second, 15) == expected);
  CHECK(second.checkpoint().client_rng == first.checkpoint().client_rng);

  auto broken = state;
  broken.client_g.pop_back();
  CHECK_THROWS_AS(second.restore(broken), gradus::invalid_argument);
  broken = state;
  broken.x.resize(3);
  CHECK_THROWS_AS(second.restore(broken), gradus::invalid_argument);
}

TEST_CASE("EF21 works in float", "[ef21]") {
  const auto clients = make_clients<float>(4, 10, 6);
  EF21 method(clients, TopK{2}, x0.cast<float>(), {.gamma = 0.1});
  for (int t = 0; t < 300; ++t) method.step();
  CHECK(method.x().allFinite());
  // g drifts from the mean of the g_i by float rounding only; g itself shrinks towards 0, so
  // measure against the size of the g_i.
  Eigen::VectorXd mean = Eigen::VectorXd::Zero(6);
  double scale = 0;
  for (Index i = 0; i < 4; ++i) {
    mean += method.client_g(i).cast<double>() / 4;
    scale = std::max(scale, static_cast<double>(method.client_g(i).norm()));
  }
  CHECK((method.g().cast<double>() - mean).norm() < 1e-5 * scale);
}

namespace {

// A client that fails in a chosen round.
struct FailingClient {
  using Scalar = double;
  Logistic inner;
  int fail_at;
  int calls = 0;
  Index dim() const { return inner.dim(); }
  double value_and_grad(const Eigen::VectorXd& x, Eigen::Ref<Eigen::VectorXd> g) {
    if (++calls > fail_at) throw std::runtime_error("client data unavailable");
    return inner.value_and_grad(x, g);
  }
};

}  // namespace

TEST_CASE("EF21 stops with the client's error", "[ef21][errors]") {
  const auto logistic = make_clients(3, 5, 6);
  std::vector<FailingClient> clients = {{logistic[0], 100}, {logistic[1], 3}, {logistic[2], 100}};
  EF21 method(clients, TopK{1}, x0, {.gamma = 0.1, .threads = 2});
  method.step();
  method.step();
  CHECK_THROWS_WITH(method.step(), "client data unavailable");
}

TEST_CASE("EF21 rejects bad input with clear errors", "[ef21][errors]") {
  const auto clients = make_clients(3, 5, 6);
  auto make = [&](EF21Options options, Index k = 1) { EF21 method(clients, TopK{k}, x0, options); };
  CHECK_THROWS_WITH(make({.gamma = 0}), "gradus::EF21::EF21: argument 'options.gamma': expected a value > 0, got 0");
  CHECK_THROWS_AS(make({.gamma = -1}), gradus::invalid_argument);
  CHECK_THROWS_AS(make({.gamma = INFINITY}), gradus::invalid_argument);
  CHECK_THROWS_AS(make({.gamma = 0.1}, 0), gradus::invalid_argument);
  CHECK_THROWS_WITH(make({.gamma = 0.1}, 7), "gradus::TopK::compress: argument 'k': expected a value in [1, d = 6], got 7");
  CHECK_THROWS_WITH(make({.gamma = 0.1, .participation = 0}),
                    "gradus::EF21::EF21: argument 'options.participation': expected a probability in (0, 1], got 0");
  CHECK_THROWS_AS(make({.gamma = 0.1, .participation = 1.5}), gradus::invalid_argument);
  CHECK_THROWS_AS(make({.gamma = 0.1, .momentum = 1}), gradus::invalid_argument);
  CHECK_THROWS_AS(make({.gamma = 0.1, .momentum = -0.1}), gradus::invalid_argument);
  CHECK_THROWS_WITH(make({.gamma = 0.1, .weights = {1, 0, 1}}),
                    "gradus::EF21::EF21: argument 'options.weights': expected a value > 0, got 0");
  CHECK_THROWS_AS(make({.gamma = 0.1, .weights = {1, -1, 1}}), gradus::invalid_argument);
  CHECK_THROWS_WITH(make({.gamma = 0.1, .weights = {1, 1}}),
                    "gradus::EF21::EF21: argument 'options.weights': expected 3 entries (one per client), got 2");
  CHECK_THROWS_AS(make({.gamma = 0.1, .batch_size = 6}), gradus::invalid_argument);
  CHECK_THROWS_AS(make({.gamma = 0.1, .batch_size = -1}), gradus::invalid_argument);
  CHECK_THROWS_AS(make({.gamma = 0.1, .threads = 0}), gradus::invalid_argument);

  auto mixed = clients;
  mixed.emplace_back(random_matrix<double>(5, 4, 1), random_labels(5, 1));
  CHECK_THROWS_WITH((EF21(mixed, TopK{1}, x0, {.gamma = 0.1})),
                    "gradus::EF21::EF21: argument 'clients': expected 6 dimensions (size of x0) for every client, got 4");
  CHECK_THROWS_AS((EF21(std::vector<Logistic>{}, TopK{1}, x0, {.gamma = 0.1})), gradus::invalid_argument);
  std::vector<FailingClient> plain = {{clients[0], 100}};
  CHECK_THROWS_AS((EF21(plain, TopK{1}, x0, {.gamma = 0.1, .batch_size = 2})), gradus::invalid_argument);
}

TEST_CASE("heart_scale: the L_AM step needs >= 2.5x fewer rounds at c = 10 and is within 10% at c = 1",
          "[ef21][claim]") {
  using namespace examples::ef21_heart;
  const double alpha = TopK{1}.alpha(14);
  for (double c : {1.0, 10.0}) {
    const Problem problem = make_problem(c);
    const double gamma_QM = step_size(problem.L, problem.L_i, alpha, StepRule::QuadraticMean);
    const double gamma_AM = step_size(problem.L, problem.L_i, alpha, StepRule::ArithmeticMean);
    const Outcome qm = run(problem, 0, kClients, {.gamma = gamma_QM}, 40000, InProcess{});
    const Outcome am = run(problem, 0, kClients, {.gamma = gamma_AM, .weights = problem.L_i}, 40000, InProcess{});
    REQUIRE(qm.rounds > 0);
    REQUIRE(am.rounds > 0);
    const double speedup = double(qm.rounds) / double(am.rounds);
    INFO("c = " << c << ": " << qm.rounds << " / " << am.rounds << " rounds");
    if (c > 1) {
      CHECK(speedup >= 2.5);
    } else {
      CHECK(speedup == Approx(1).margin(0.1));
    }
  }
}

TEMPLATE_TEST_CASE("EF21 options at the ends of their domains", "[ef21][errors]", float, double) {
  using S = TestType;
  using Limits = std::numeric_limits<S>;
  const auto clients = make_clients<S>(2, 5, 6);
  const Vector<S> start = x0.cast<S>();
  auto run = [&](EF21Options options, int rounds = 5) {
    EF21 method(clients, TopK{2}, start, options);
    for (int t = 0; t < rounds; ++t) method.step();
    return method.x();
  };
  auto rejects = [&](EF21Options options) {
    CHECK_THROWS_AS(EF21(clients, TopK{2}, start, options), gradus::invalid_argument);
  };
  const double low = Limits::min(), high = Limits::max();
  CHECK(run({.gamma = low}) == start);  // moves by less than an ulp, but runs
  CHECK_NOTHROW(EF21(clients, TopK{2}, start, {.gamma = high}));
  rejects({.gamma = std::nextafter(low, 0.0)});
  rejects({.gamma = std::nextafter(high, INFINITY)});
  // momentum in [0, 1) once rounded to S
  const double below_one = std::nextafter(S(1), S(0));
  CHECK(run({.gamma = 0.01, .momentum = below_one}).allFinite());
  rejects({.gamma = 0.01, .momentum = (1 + below_one) / 2});  // rounds to 1 in S
  rejects({.gamma = 0.01, .momentum = std::nextafter(0.0, -1.0)});
  CHECK(run({.gamma = 0.01, .participation = std::nextafter(0.0, 1.0)}).allFinite());  // nobody takes part
  CHECK(run({.gamma = 0.01, .participation = 1}).allFinite());
  rejects({.gamma = 0.01, .participation = std::nextafter(1.0, 2.0)});
  CHECK(run({.gamma = 0.01, .batch_size = 5}).allFinite());  // every sample of a client
  rejects({.gamma = 0.01, .batch_size = 6});
  CHECK(run({.gamma = 0.01, .init = Init::Zero}).allFinite());
  CHECK_THROWS_WITH(EF21(clients, TopK{2}, start, {.gamma = 0.01, .init = Init(3)}),
                    "gradus::EF21::EF21: argument 'options.init': expected one of its 3 enumerators, got 3");
  // weights: every share w_i / sum a normal S (and 1 / (n w_i) finite)
  CHECK(run({.gamma = 0.01, .weights = {1, low}}).allFinite());
  CHECK_THROWS_WITH(EF21(clients, TopK{2}, start, {.gamma = 0.01, .weights = {1, std::nextafter(low, 0.0)}}),
                    Catch::Contains("argument 'options.weights': expected weights whose shares w_i / sum are normal"));
  CHECK_NOTHROW(EF21(clients, TopK{2}, start, {.gamma = 0.01, .threads = std::numeric_limits<int>::max()}));
}

namespace {

// A compressor that sends one index past the end: a message no reader may trust.
struct OutOfRange {
  void validate(Index) const {}
  template <class D>
  void compress(const Eigen::MatrixBase<D>& v, SparseMessage<typename D::Scalar>& out, Rng&) const {
    out.dim = v.size();
    out.indices.assign({0, static_cast<std::int32_t>(10 * v.size())});
    out.values.assign({v(0), v(0)});
  }
};

// A compressor that sends fewer values than indices.
struct ShortValues {
  void validate(Index) const {}
  template <class D>
  void compress(const Eigen::MatrixBase<D>& v, SparseMessage<typename D::Scalar>& out, Rng&) const {
    out.dim = v.size();
    out.indices.assign({0, 1, 2});
    out.values.assign({v(0)});
  }
};

}  // namespace

TEST_CASE("EF21 rejects malformed messages instead of reading past a buffer", "[ef21][errors]") {
  const auto clients = make_clients(3, 5, 6);
  EF21 method(clients, OutOfRange{}, x0, {.gamma = 0.1});
  CHECK_THROWS_WITH(method.step(), Catch::Contains("got dimension 6, 2 indices in [0, 60], 2 values"));
  CHECK_THROWS_AS((EF21(clients, ShortValues{}, x0, {.gamma = 0.1, .init = Init::Compressed})),
                  gradus::invalid_argument);
}

namespace {

template <class S>
bool same_state(const EF21Checkpoint<S>& a, const EF21Checkpoint<S>& b) {
  return a.round == b.round && a.x == b.x && a.g == b.g && a.v == b.v && a.first_client == b.first_client &&
         a.client_g == b.client_g && a.client_rng == b.client_rng && a.digest == b.digest;
}

// Every byte of a checkpoint's payload, as (pointer, size) spans, digest included.
template <class S>
std::vector<std::span<unsigned char>> bytes_of(EF21Checkpoint<S>& state) {
  auto of = [](auto* data, std::size_t count) {
    return std::span<unsigned char>(reinterpret_cast<unsigned char*>(data), count * sizeof *data);
  };
  std::vector<std::span<unsigned char>> parts = {of(&state.round, 1), of(state.x.data(), state.x.size()),
                                                 of(state.g.data(), state.g.size()), of(state.v.data(), state.v.size()),
                                                 of(&state.first_client, 1), of(state.client_rng.data(), state.client_rng.size()),
                                                 of(&state.digest, 1)};
  for (auto& g : state.client_g) parts.push_back(of(g.data(), static_cast<std::size_t>(g.size())));
  return parts;
}

}  // namespace

TEMPLATE_TEST_CASE("EF21::restore rejects every truncated or corrupted checkpoint and leaves the target as it was",
                   "[ef21][errors][checkpoint]", float, double) {
  using S = TestType;
  const auto clients = make_clients<S>(2, 5, 3);
  const Vector<S> start = random_vector<S>(3, 4);
  const EF21Options options{.gamma = 0.1, .participation = 0.7, .momentum = 0.3, .seed = 2};
  EF21 source(clients, RandK{1}, start, options);
  for (int t = 0; t < 4; ++t) source.step();
  const EF21Checkpoint<S> state = source.checkpoint();
  EF21 target(clients, RandK{1}, start, options);
  target.step();
  const EF21Checkpoint<S> before = target.checkpoint();
  auto rejected = [&](const EF21Checkpoint<S>& bad) {
    bool threw = false;
    try {
      target.restore(bad);
    } catch (const gradus::invalid_argument&) {
      threw = true;
    }
    return threw && same_state(target.checkpoint(), before);
  };
  Index failures = 0, cases = 0;
  // Every length of every vector but the right one.
  for (int field = 0; field < 5; ++field) {
    for (Index length = 0; length <= 4; ++length) {
      auto bad = state;
      Vector<S>& v = field == 0 ? bad.x : field == 1 ? bad.g : field == 2 ? bad.v : bad.client_g[static_cast<std::size_t>(field - 3)];
      if (length == v.size()) continue;
      v.conservativeResize(length);
      ++cases;
      failures += !rejected(bad);
    }
  }
  for (int change : {-1, 1}) {  // one client too few or too many; one stream too few or too many
    auto bad = state;
    if (change < 0) bad.client_g.pop_back(); else bad.client_g.push_back(bad.client_g.back());
    failures += !rejected(bad);
    bad = state;
    if (change < 0) bad.client_rng.pop_back(); else bad.client_rng.push_back(7);
    failures += !rejected(bad);
    cases += 2;
  }
  // Every byte flipped, one at a time, in three ways.
  auto bad = state;
  for (auto part : bytes_of(bad)) {
    for (unsigned char& byte : part) {
      for (unsigned char flip : {0x01, 0x80, 0xFF}) {
        byte ^= flip;
        ++cases;
        failures += !rejected(bad);
        byte ^= flip;
      }
    }
  }
  CHECK(cases == 20 + 4 + 3 * (40 + 15 * static_cast<Index>(sizeof(S))));  // lengths, counts, bytes
  CHECK(failures == 0);
  // A consistent checkpoint that no EF21 wrote: a negative round, or another process's first client.
  auto negative = state;
  negative.round = -1;
  negative.digest = ef21::detail::digest_of(negative);
  CHECK_THROWS_WITH(target.restore(negative),
                    "gradus::EF21::restore: argument 'state.round': expected a value >= 0, got -1");
  auto other = state;
  other.first_client = 1;
  other.digest = ef21::detail::digest_of(other);
  CHECK(rejected(other));
  // A checkpoint with another client count, and one of another scalar type (a compile error).
  EF21 three(make_clients<S>(3, 5, 3), RandK{1}, start, options);
  CHECK(rejected(three.checkpoint()));
  using Other = std::conditional_t<std::is_same_v<S, float>, double, float>;
  STATIC_REQUIRE_FALSE(requires(decltype(target)& method, const EF21Checkpoint<Other>& s) { method.restore(s); });
  // The untouched checkpoint still restores, and continues like the source.
  target.restore(state);
  source.step();
  target.step();
  CHECK(target.x() == source.x());
}
