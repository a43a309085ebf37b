#include <catch2/catch.hpp>

#include <cmath>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <gradus/core/concepts.hpp>
#include <gradus/losses/regret.hpp>
#include <gradus/models/linear_self_attention.hpp>
#include <gradus/models/online_learners.hpp>
#include <gradus/testing/gradient_check.hpp>

using namespace gradus;
using MatD = RowMatrix<double>;

static_assert(Loss<RegretLoss<double>, RowMatrix<double>, RowMatrix<double>, Index>);
static_assert(Model<LinearSelfAttentionPolicy<float>>);
static_assert(Model<LinearSelfAttentionPolicy<double>>);

namespace {

struct Shape {
  Index k, T, d;
};

// Sizes that cross SIMD boundaries in d, with several sequences and rounds.
const std::vector<Shape> kShapes = {{1, 1, 1}, {2, 3, 2}, {3, 2, 3}, {2, 4, 7}, {3, 2, 8}, {2, 3, 9}, {2, 2, 17}};

MatD uniform_losses(Index rows, Index d, unsigned seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<double> u(0, 1);
  MatD l(rows, d);
  for (Index i = 0; i < l.size(); ++i) l.data()[i] = u(rng);
  return l;
}

MatD normal_matrix(Index rows, Index cols, unsigned seed, double scale = 1) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> n(0, scale);
  MatD m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = n(rng);
  return m;
}

MatD softmax_of(MatD z) {
  detail::softmax_rows_in_place<double>(z);
  return z;
}

// l_1 = (1/2, 0), then (0, 1), (1, 0), (0, 1), ...: follow-the-leader's nemesis.
MatD alternating_losses(Index T) {
  MatD l(T, 2);
  l.row(0) << 0.5, 0;
  for (Index t = 1; t < T; ++t) l.row(t) << (t % 2 == 0 ? 1 : 0), (t % 2 == 1 ? 1 : 0);
  return l;
}

// Brute force, straight from the definition: loops, and f = exp(N R) without any shift.
double oracle_loss(const MatD& losses, const MatD& pi, Index T, double N) {
  const Index k = losses.rows() / T, d = losses.cols();
  std::vector<double> R(k);
  for (Index j = 0; j < k; ++j) {
    double learner = 0;
    std::vector<double> totals(d, 0.0);
    for (Index t = 0; t < T; ++t) {
      for (Index a = 0; a < d; ++a) {
        learner += losses(j * T + t, a) * pi(j * T + t, a);
        totals[a] += losses(j * T + t, a);
      }
    }
    R[j] = learner - *std::min_element(totals.begin(), totals.end());
  }
  auto h = [](double r) { return r > 0 ? r * r : 0.0; };
  if (std::isinf(N)) return h(*std::max_element(R.begin(), R.end()));
  double num = 0, den = 0;
  for (double r : R) {
    num += h(r) * std::exp(N * r);
    den += std::exp(N * r);
  }
  return num / den;
}

template <class S>
RowMatrix<S> as(const MatD& m) {
  return m.cast<S>();
}

// The point at which a float gradient is checked, exactly representable in float.
template <class S>
MatD rounded(const MatD& m) {
  return m.cast<S>().template cast<double>();
}

template <class S>
double fd_tolerance() {
  return std::is_same_v<S, float> ? 2e-3 : 1e-6;
}

template <class S, class F, class G>
void require_gradient(F&& f_double, const Eigen::VectorXd& x, const G& analytic_s) {
  testing::GradientCheckOptions options;
  options.tolerance = fd_tolerance<S>();
  const auto report = testing::check_gradient(f_double, x, analytic_s.template cast<double>(), options);
  INFO(report.summary());
  REQUIRE(report.ok);
}

Eigen::Map<const Eigen::VectorXd> flat(const MatD& m) { return {m.data(), m.size()}; }

}  // namespace

TEST_CASE("regret of one sequence and of stacked sequences", "[regret]") {
  MatD l(2, 2), pi(2, 2);
  l << 1, 0, 0, 1;
  pi << 0.5, 0.5, 0.5, 0.5;
  CHECK(regret(l, pi) == Approx(0.0));
  pi << 1, 0, 0, 1;
  CHECK(regret(l, pi) == Approx(1.0));  // loses every round; each action lost once
  pi << 0, 1, 1, 0;
  CHECK(regret(l, pi) == Approx(-1.0));

  const Index k = 5, T = 7, d = 3;
  const MatD losses = uniform_losses(k * T, d, 3), policies = softmax_of(normal_matrix(k * T, d, 4));
  Eigen::VectorXd R(k);
  regret(losses, policies, T, R);
  for (Index j = 0; j < k; ++j) {
    CHECK(R(j) == Approx(regret(losses.middleRows(j * T, T), policies.middleRows(j * T, T))));
  }
  Eigen::VectorXf Rf(k);  // expressions and float work too
  regret((2 * losses).cast<float>(), policies.cast<float>(), T, Rf);
  CHECK(Rf(0) == Approx(2 * R(0)).epsilon(1e-5));
}

TEST_CASE("follow-the-leader has linear regret on the alternating sequence, Hedge does not", "[regret][learners]") {
  for (Index T : {25, 101}) {
    const MatD l = alternating_losses(T);
    MatD pi(T, 2);
    FollowTheLeader<double>().policies(l, T, pi);
    CHECK(pi(0, 0) == 0.5);  // ties share the weight
    // Learner: 1/4 + (T - 1); comparator: about (T - 1) / 2. At T = 25 the regret is 12.25.
    const double expected = T == 25 ? 12.25 : 50.25;
    CHECK(regret(l, pi) == Approx(expected));
    Hedge<double>().policies(l, T, pi);
    CHECK(regret(l, pi) <= hedge_regret_bound<double>(2, T));
    CHECK(regret(l, pi) < 0.2 * expected);
  }
}

TEST_CASE("Hedge's regret on i.i.d. losses stays below sqrt(T ln d / 2)", "[regret][learners]") {
  for (Index d : {2, 5, 9}) {
    for (Index T : {25, 100}) {
      const Index k = 200;
      const MatD l = uniform_losses(k * T, d, static_cast<unsigned>(d * 1000 + T));
      MatD pi(k * T, d);
      const Hedge<double> hedge;
      hedge.policies(l, T, pi);
      Eigen::VectorXd R(k);
      regret(l, pi, T, R);
      INFO("d = " << d << ", T = " << T << ", worst regret " << R.maxCoeff());
      CHECK(R.maxCoeff() <= hedge_regret_bound<double>(d, T));
      CHECK(hedge.learning_rate(d, T) == Approx(std::sqrt(8 * std::log(double(d)) / T)));

      MatD z(k * T, d);  // Hedge's logits are -eta times the cumulative losses
      hedge.logits(l, T, z);
      const Index t = T - 1;
      CHECK(z.row(t).isApprox(-hedge.learning_rate(d, T) * l.topRows(t).colwise().sum()));
    }
  }
  const MatD l = uniform_losses(6, 3, 1);
  MatD pi(6, 3), uniform(6, 3);
  Hedge<double>({.learning_rate = 0.0}).policies(l, 3, pi);
  UniformLearner<double>().policies(l, 3, uniform);
  CHECK(pi.isApprox(uniform));
  CHECK(uniform(4, 2) == Approx(1.0 / 3));
}

TEMPLATE_TEST_CASE("RegretLoss matches a brute-force oracle", "[regret]", float, double) {
  using S = TestType;
  const double tolerance = std::is_same_v<S, float> ? 1e-4 : 1e-10;
  for (const Shape& s : kShapes) {
    const MatD l = rounded<S>(uniform_losses(s.k * s.T, s.d, 11)), z = rounded<S>(normal_matrix(s.k * s.T, s.d, 12));
    const MatD pi = softmax_of(z);
    for (double N : {0.0, 0.5, 2.0, std::numeric_limits<double>::infinity()}) {
      INFO("k = " << s.k << ", T = " << s.T << ", d = " << s.d << ", N = " << N);
      const double expected = oracle_loss(l, pi, s.T, N);
      const RegretLoss<S> on_policies({.N = S(N)}), on_logits({.N = S(N), .from_logits = true});
      CHECK(on_policies.value(as<S>(l), as<S>(pi), s.T) == Approx(expected).epsilon(tolerance).margin(tolerance));
      CHECK(on_logits.value(as<S>(l), as<S>(z), s.T) == Approx(expected).epsilon(tolerance).margin(tolerance));
      RowMatrix<S> grad(l.rows(), l.cols());
      CHECK(on_logits.value_and_grad(as<S>(l), as<S>(z), s.T, grad) ==
            Approx(expected).epsilon(tolerance).margin(tolerance));
      RowMatrix<S> in_place = as<S>(z);  // the gradient may overwrite its input
      on_logits.value_and_grad(as<S>(l), in_place, s.T, in_place);
      CHECK(in_place == grad);
    }
  }
}

TEST_CASE("RegretLoss limits: N = 0 is the mean of h(R), N -> infinity its max", "[regret]") {
  const Index k = 9, T = 25, d = 5;
  const MatD l = uniform_losses(k * T, d, 21), pi = softmax_of(normal_matrix(k * T, d, 22, 3));
  Eigen::VectorXd R(k);
  regret(l, pi, T, R);
  const Eigen::VectorXd h = R.cwiseMax(0).cwiseAbs2();
  CHECK(RegretLoss<double>({.N = 0}).value(l, pi, T) == Approx(h.mean()));
  const double inf = std::numeric_limits<double>::infinity();
  CHECK(RegretLoss<double>({.N = inf}).value(l, pi, T) == Approx(h.maxCoeff()));
  CHECK(RegretLoss<double>({.N = 1e3}).value(l, pi, T) == Approx(h.maxCoeff()).epsilon(1e-3));
  // exp(N R) overflows long before this in float; the max-shifted soft-max does not.
  const float large = RegretLoss<float>({.N = 1e4f}).value(as<float>(l), as<float>(pi), T);
  CHECK(std::isfinite(large));
  CHECK(large == Approx(h.maxCoeff()).epsilon(1e-4));
}

TEMPLATE_TEST_CASE("RegretLoss gradient: finite differences over logits", "[regret][gradient]", float, double) {
  using S = TestType;
  const double inf = std::numeric_limits<double>::infinity();
  for (const Shape& s : kShapes) {
    const MatD l = rounded<S>(uniform_losses(s.k * s.T, s.d, 31)), z = rounded<S>(normal_matrix(s.k * s.T, s.d, 32, 2));
    for (double N : {0.0, 1.0, 8.0, inf}) {
      INFO("k = " << s.k << ", T = " << s.T << ", d = " << s.d << ", N = " << N);
      RowMatrix<S> grad(l.rows(), l.cols());
      RegretLoss<S>({.N = S(N), .from_logits = true}).value_and_grad(as<S>(l), as<S>(z), s.T, grad);
      const RegretLoss<double> exact({.N = N, .from_logits = true});
      require_gradient<S>(
          [&](const Eigen::VectorXd& x) { return exact.value(l, Eigen::Map<const MatD>(x.data(), z.rows(), z.cols()), s.T); },
          flat(z), Eigen::Map<const Vector<S>>(grad.data(), grad.size()));
    }
  }
}

TEMPLATE_TEST_CASE("RegretLoss gradient: finite differences along the simplex", "[regret][gradient]", float, double) {
  // Policies must stay on the simplex, so differentiate along P(x) = P0 + x - rowmean(x): the
  // gradient in x is the projection of dL/dpi onto zero-sum rows.
  using S = TestType;
  for (const Shape& s : kShapes) {
    if (s.d == 1) continue;  // the simplex of one action has no tangent direction
    const MatD l = rounded<S>(uniform_losses(s.k * s.T, s.d, 41)), P0 = rounded<S>(softmax_of(normal_matrix(s.k * s.T, s.d, 42)));
    for (double N : {0.0, 1.0, 8.0}) {
      INFO("k = " << s.k << ", T = " << s.T << ", d = " << s.d << ", N = " << N);
      RowMatrix<S> grad(l.rows(), l.cols());
      RegretLoss<S>({.N = S(N)}).value_and_grad(as<S>(l), as<S>(P0), s.T, grad);
      grad.colwise() -= grad.rowwise().mean();
      const RegretLoss<double> exact({.N = N});
      auto f = [&](const Eigen::VectorXd& x) {
        MatD step = Eigen::Map<const MatD>(x.data(), P0.rows(), P0.cols());
        step.colwise() -= step.rowwise().mean();
        return exact.value(l, P0 + step, s.T);
      };
      require_gradient<S>(f, Eigen::VectorXd::Zero(P0.size()), Eigen::Map<const Vector<S>>(grad.data(), grad.size()));
      // Off the tangent space the gradient is dL/dR_j l_t: the regret is linear in the policies.
    }
  }
}

TEMPLATE_TEST_CASE("RegretLoss with a custom h and a custom f", "[regret][gradient]", float, double) {
  using S = TestType;
  // h(R) = R^2 (the paper's theory) and f(R, N) = (1 + e^R)^N: log f = N softplus(R), (log f)' = N sigmoid(R).
  auto options = [](auto N) {
    using T = decltype(N);
    RegretLossOptions<T> o{.N = N, .from_logits = true};
    o.h = {.value = [](T r) { return r * r; }, .derivative = [](T r) { return 2 * r; }};
    o.f = {.log_value = [](T r, T n) { return n * (std::max(r, T(0)) + std::log1p(std::exp(-std::abs(r)))); },
           .log_derivative = [](T r, T n) { return n / (1 + std::exp(-r)); }};
    return o;
  };
  const Index k = 6, T = 5, d = 3;
  const MatD l = rounded<S>(uniform_losses(k * T, d, 51)), z = rounded<S>(normal_matrix(k * T, d, 52, 2));
  for (double N : {0.0, 2.0}) {
    RowMatrix<S> grad(l.rows(), l.cols());
    const S value = RegretLoss<S>(options(S(N))).value_and_grad(as<S>(l), as<S>(z), T, grad);
    const RegretLoss<double> exact(options(N));
    auto f = [&](const Eigen::VectorXd& x) { return exact.value(l, Eigen::Map<const MatD>(x.data(), z.rows(), z.cols()), T); };
    require_gradient<S>(f, flat(z), Eigen::Map<const Vector<S>>(grad.data(), grad.size()));
    if (N == 0) {  // any f with N = 0 weighs evenly: the mean of R^2
      Eigen::VectorXd R(k);
      regret(l, softmax_of(z), T, R);
      CHECK(value == Approx(R.squaredNorm() / k).epsilon(1e-5));
    }
  }
}

TEST_CASE("RegretLoss is stable at extreme logits in float", "[regret][numerics]") {
  const Index k = 4, T = 3, d = 9;
  const MatD l = uniform_losses(k * T, d, 61);
  const MatD z = rounded<float>(1e4 * normal_matrix(k * T, d, 62));
  RowMatrix<float> grad(k * T, d);
  RowMatrix<double> grad_double(k * T, d);
  const float value = RegretLoss<float>({.N = 1, .from_logits = true}).value_and_grad(as<float>(l), as<float>(z), T, grad);
  const double expected = RegretLoss<double>({.N = 1, .from_logits = true}).value_and_grad(l, z, T, grad_double);
  CHECK(std::isfinite(value));
  CHECK(grad.allFinite());
  CHECK(value == Approx(expected).epsilon(1e-4));
  CHECK((grad.cast<double>() - grad_double).cwiseAbs().maxCoeff() < 1e-4);
}

TEST_CASE("RegretLoss and regret reject bad input", "[regret][errors]") {
  const RegretLoss<double> loss;
  const MatD l = uniform_losses(6, 2, 71), pi = MatD::Constant(6, 2, 0.5);
  MatD grad(6, 2);
  Eigen::VectorXd R(2);
  CHECK_NOTHROW(loss.value(l, pi, 3));
  CHECK_THROWS_WITH(loss.value(MatD(0, 2), MatD(0, 2), 3),
                    Catch::Contains("RegretLoss::value") && Catch::Contains("'losses'") && Catch::Contains("k = 0"));
  CHECK_THROWS_WITH(loss.value(l, pi, 0), Catch::Contains("'rounds'"));
  CHECK_THROWS_WITH(loss.value(l, pi, 4), Catch::Contains("divisible by rounds = 4") && Catch::Contains("got 6"));
  CHECK_THROWS_WITH(loss.value(MatD(6, 0), MatD(6, 0), 3), Catch::Contains("columns (actions)"));
  CHECK_THROWS_WITH(loss.value(l, MatD::Constant(6, 3, 1.0 / 3), 3), Catch::Contains("'policies'") && Catch::Contains("2 columns"));
  CHECK_THROWS_WITH(loss.value(l, pi.topRows(3), 3), Catch::Contains("6 rows"));
  CHECK_THROWS_WITH(loss.value_and_grad(l, pi, 3, grad.leftCols(1)), Catch::Contains("'grad'"));
  MatD off = pi;
  off(4, 0) = 0.6;  // sums to 1.1
  CHECK_THROWS_WITH(loss.value(l, off, 3), Catch::Contains("simplex") && Catch::Contains("row 4"));
  off(4, 0) = 1.5, off(4, 1) = -0.5;  // sums to 1 but leaves the simplex
  CHECK_THROWS_AS(loss.value(l, off, 3), gradus::invalid_argument);
  CHECK_THROWS_AS(regret(l, off, 3, R), gradus::invalid_argument);
  Eigen::VectorXd R3(3);
  CHECK_THROWS_WITH(regret(l, pi, 3, R3), Catch::Contains("'regrets'"));
  CHECK_NOTHROW(RegretLoss<double>({.from_logits = true}).value(l, off, 3));  // logits are unconstrained

  CHECK_THROWS_WITH(RegretLoss<double>({.N = -1}), Catch::Contains("options.N"));
  CHECK_THROWS_AS(RegretLoss<double>({.N = std::nan("")}), gradus::invalid_argument);
  CHECK_THROWS_WITH(RegretLoss<double>({.h = {.value = nullptr}}), Catch::Contains("options.h"));
  CHECK_THROWS_WITH(RegretLoss<double>({.f = {.log_derivative = nullptr}}), Catch::Contains("options.f"));

  MatD bad = l;  // non-finite losses propagate rather than throw
  bad(1, 1) = std::nan("");
  CHECK(std::isnan(loss.value_and_grad(bad, pi, 3, grad)));
  CHECK(grad.hasNaN());
  MatD nan_pi = pi;
  nan_pi(0, 0) = std::nan("");
  CHECK(std::isnan(RegretLoss<double>({.N = INFINITY}).value(l, nan_pi, 3)));
}

TEST_CASE("online learners reject bad input", "[learners][errors]") {
  const MatD l = uniform_losses(6, 2, 81);
  MatD pi(6, 2);
  CHECK_THROWS_WITH(Hedge<double>().policies(l, 0, pi), Catch::Contains("Hedge::logits") && Catch::Contains("'rounds'"));
  MatD wide(6, 3);
  CHECK_THROWS_WITH(FollowTheLeader<double>().policies(l, 3, wide), Catch::Contains("'policies'"));
  CHECK_THROWS_WITH(UniformLearner<double>().policies(l, 4, pi), Catch::Contains("divisible"));
  CHECK_THROWS_WITH(Hedge<double>({.learning_rate = -0.1}), Catch::Contains("options.learning_rate"));
  CHECK_THROWS_AS(Hedge<double>({.learning_rate = INFINITY}), gradus::invalid_argument);
  CHECK_THROWS_AS(hedge_learning_rate<double>(0, 5), gradus::invalid_argument);
}

// ---------------------------------------------------------------- the linear self-attention policy

namespace {

// z_t = sum_{i<t} (V x_i)(x_i . w), x_i = (l_i, 1), with loops.
MatD oracle_logits(const Eigen::VectorXd& theta, const MatD& X, Index T) {
  const Index d = X.cols();
  const Eigen::Map<const MatD> V(theta.data(), d, d + 1);
  const Eigen::VectorXd w = theta.tail(d + 1);
  MatD Z = MatD::Zero(X.rows(), d);
  for (Index r = 0; r < X.rows(); ++r) {
    for (Index i = r - r % T; i < r; ++i) {
      Eigen::VectorXd x(d + 1);
      x << X.row(i).transpose(), 1;
      Z.row(r) += (V * x).transpose() * x.dot(w);
    }
  }
  return Z;
}

}  // namespace

TEMPLATE_TEST_CASE("LinearSelfAttentionPolicy vjp: finite differences", "[model][gradient]", float, double) {
  using S = TestType;
  for (const Shape& s : kShapes) {
    INFO("k = " << s.k << ", T = " << s.T << ", d = " << s.d);
    const LinearSelfAttentionPolicy<S> model({.actions = s.d, .rounds = s.T});
    const LinearSelfAttentionPolicy<double> exact({.actions = s.d, .rounds = s.T});
    const MatD X = rounded<S>(uniform_losses(s.k * s.T, s.d, 91)), dZ = rounded<S>(normal_matrix(s.k * s.T, s.d, 92));
    const Eigen::VectorXd theta = rounded<S>(normal_matrix(model.num_params(), 1, 93, 0.5)).col(0);
    const RowMatrix<S> Xs = as<S>(X), dZs = as<S>(dZ);
    const Vector<S> thetas = theta.cast<S>();

    RowMatrix<S> Z(X.rows(), s.d);
    model.predict(thetas, Xs, Z);
    CHECK((Z.template cast<double>() - oracle_logits(theta, X, s.T)).cwiseAbs().maxCoeff() <
          (std::is_same_v<S, float> ? 1e-4 : 1e-12));

    auto projected = [&](const Eigen::VectorXd& params, const MatD& inputs) {
      MatD out(inputs.rows(), s.d);
      exact.predict(params, inputs, out);
      return out.cwiseProduct(dZ).sum();
    };
    Vector<S> dtheta(model.num_params());
    model.vjp_params(thetas, Xs, dZs, dtheta);
    require_gradient<S>([&](const Eigen::VectorXd& p) { return projected(p, X); }, theta, dtheta);

    RowMatrix<S> dX(X.rows(), s.d);
    model.vjp_inputs(thetas, Xs, dZs, dX);
    require_gradient<S>(
        [&](const Eigen::VectorXd& x) { return projected(theta, Eigen::Map<const MatD>(x.data(), X.rows(), s.d)); },
        flat(X), Eigen::Map<const Vector<S>>(dX.data(), dX.size()));
  }
}

TEST_CASE("LinearSelfAttentionPolicy with hedge_params plays Hedge", "[model][learners]") {
  const Index k = 3, T = 25, d = 5;
  const LinearSelfAttentionPolicy<double> model({.actions = d, .rounds = T});
  CHECK(model.num_params() == 36);
  const MatD l = uniform_losses(k * T, d, 101);
  const Hedge<double> hedge;
  MatD z(k * T, d), expected(k * T, d);
  model.predict(model.hedge_params(hedge.learning_rate(d, T)), l, z);
  hedge.logits(l, T, expected);
  CHECK(z.isApprox(expected));
  CHECK(z.row(0).isZero());
  CHECK(z.row(T).isZero());  // every sequence starts afresh
}

TEST_CASE("regret-loss through the model: end-to-end parameter gradient", "[model][regret][gradient]") {
  const Index k = 8, T = 6, d = 3;
  const LinearSelfAttentionPolicy<double> model({.actions = d, .rounds = T});
  const RegretLoss<double> loss({.N = 2, .from_logits = true});
  const MatD l = uniform_losses(k * T, d, 111);
  const Eigen::VectorXd theta = normal_matrix(model.num_params(), 1, 112).col(0);
  auto fg = [&](const Eigen::VectorXd& p, Eigen::VectorXd& g) {
    MatD z(k * T, d), dz(k * T, d);
    model.predict(p, l, z);
    const double value = loss.value_and_grad(l, z, T, dz);
    model.vjp_params(p, l, dz, g);
    return value;
  };
  const auto report = testing::check_value_and_grad(fg, theta);
  INFO(report.summary());
  CHECK(report.ok);
}

TEST_CASE("LinearSelfAttentionPolicy rejects bad input", "[model][errors]") {
  CHECK_THROWS_WITH(LinearSelfAttentionPolicy<double>({.actions = 0, .rounds = 3}), Catch::Contains("options.actions"));
  CHECK_THROWS_WITH(LinearSelfAttentionPolicy<double>({.actions = 2, .rounds = 0}), Catch::Contains("options.rounds"));
  const LinearSelfAttentionPolicy<double> model({.actions = 2, .rounds = 3});
  const Eigen::VectorXd theta = Eigen::VectorXd::Zero(model.num_params());
  const MatD X = uniform_losses(6, 2, 121);
  MatD Z(6, 2);
  Eigen::VectorXd dtheta(model.num_params());
  CHECK_THROWS_WITH(model.predict(theta.head(4), X, Z), Catch::Contains("'theta'") && Catch::Contains("9 entries"));
  MatD wide(6, 3), empty(0, 2), narrow(6, 1);
  CHECK_THROWS_WITH(model.predict(theta, uniform_losses(6, 3, 1), wide), Catch::Contains("'X'"));
  CHECK_THROWS_WITH(model.predict(theta, X.topRows(4), Z.topRows(4)), Catch::Contains("divisible"));
  CHECK_THROWS_WITH(model.predict(theta, empty, empty), Catch::Contains("k = 0"));
  CHECK_THROWS_WITH(model.predict(theta, X, Z.leftCols(1)), Catch::Contains("'Z'"));
  CHECK_THROWS_WITH(model.vjp_params(theta, X, Z.topRows(3), dtheta), Catch::Contains("'dZ'"));
  CHECK_THROWS_WITH(model.vjp_params(theta, X, Z, dtheta.head(3)), Catch::Contains("'dtheta'"));
  CHECK_THROWS_WITH(model.vjp_inputs(theta, X, Z, narrow), Catch::Contains("'dX'"));
}

TEMPLATE_TEST_CASE("RegretLoss at huge N: the worst-sequence limit where N R overflows", "[regret][numerics]", float,
                   double) {
  using S = TestType;
  const S max = std::numeric_limits<S>::max(), inf = std::numeric_limits<S>::infinity();
  // Regrets 1e9, 2e9 - 1, 3e9 - 1 (times 1e30 overflow in float) and of order 1.
  RowMatrix<S> large(9, 2), small(9, 2);
  large << S(1e9), 0, 0, S(1e9), S(1e9), 0, 0, S(2e9), S(3e9), 0, 0, 1, S(4e9), 0, 0, 1, 0, S(1e3);
  small << 1, 0, 0, 1, 1, 0, 0, 1, 1, 0, 0, S(0.5), 0, 1, 1, 0, 0, 1;
  const RowMatrix<S> pi = RowMatrix<S>::Constant(9, 2, S(0.5));
  for (const RowMatrix<S>* l : {&large, &small}) {
    RowMatrix<S> limit_grad(9, 2);
    const S limit = RegretLoss<S>({.N = inf}).value_and_grad(*l, pi, 3, limit_grad);
    for (S N : {S(1e30), max}) {
      INFO("N=" << N);
      RowMatrix<S> grad(9, 2);
      const S value = RegretLoss<S>({.N = N}).value_and_grad(*l, pi, 3, grad);
      CHECK(value == Approx(limit));
      CHECK(grad.allFinite());
      CHECK((grad - limit_grad).cwiseAbs().maxCoeff() <= 1e-6 * limit_grad.cwiseAbs().maxCoeff());
    }
  }
  // All regrets negative: every log f = N R is -inf; the best of them still takes the weight.
  RowMatrix<S> negative(6, 2);
  negative << 0, S(1e9), S(1e9), 0, 0, S(1e9), S(2e9), 0, 0, S(2e9), S(2e9), 0;
  RowMatrix<S> play(6, 2), grad(6, 2);
  play << 1, 0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 1;
  Eigen::Matrix<S, Eigen::Dynamic, 1> R(2);
  regret(negative, play, 3, R);
  REQUIRE(R.maxCoeff() < 0);
  const S value = RegretLoss<S>({.N = max}).value_and_grad(negative, play, 3, grad);
  CHECK(value == 0);  // h(max R) with max R < 0
  CHECK(grad.allFinite());
  // N's domain: [0, +infinity].
  CHECK_NOTHROW(RegretLoss<S>({.N = 0}));
  CHECK_NOTHROW(RegretLoss<S>({.N = inf}));
  CHECK_THROWS_WITH(RegretLoss<S>({.N = std::nextafter(S(0), S(-1))}), Catch::Contains("options.N"));
}

TEMPLATE_TEST_CASE("RegretLoss N: 0 or a normal number up to infinity", "[regret][errors]", float, double) {
  using S = TestType;
  using L = std::numeric_limits<S>;
  const Index k = 3, T = 4, d = 3;
  const RowMatrix<S> l = as<S>(uniform_losses(k * T, d, 5)), pi = as<S>(softmax_of(normal_matrix(k * T, d, 6, 1)));
  for (S N : {S(0), L::min(), S(1), L::max(), L::infinity()}) {
    INFO("N = " << N);
    RowMatrix<S> grad(k * T, d);
    CHECK(std::isfinite(RegretLoss<S>({.N = N}).value_and_grad(l, pi, T, grad)));
    CHECK(grad.allFinite());
  }
  for (S N : {L::denorm_min(), std::nextafter(L::min(), S(0)), -L::denorm_min(), L::quiet_NaN()}) {
    INFO("N = " << N);
    CHECK_THROWS_AS(RegretLoss<S>({.N = N}), gradus::invalid_argument);
  }
}

TEMPLATE_TEST_CASE("RegretLoss from logits: an action far below the others has probability 0 exactly",
                   "[regret][numerics]", float, double) {
  // A logit 18000 below its row's max: exp underflows to 0, where Eigen's exp, clamped at its
  // argument's range, left 1e-308 (double), and the row's gradient was that times |dR l|, not 0.
  using S = TestType;
  RowMatrix<S> l(4, 2), z(4, 2), grad(4, 2);
  l << -10000, 0, -8, 0, -6, -10000, 0, -10000;
  z << -8000, 10000, -8, -7, -8, -8, -8, -10000;
  RegretLoss<S>({.N = std::numeric_limits<S>::infinity(), .from_logits = true}).value_and_grad(l, z, 4, grad);
  REQUIRE(grad.allFinite());
  for (Index r : {0, 3}) {
    INFO("row " << r);
    CHECK(grad(r, 0) == 0);
    CHECK(grad(r, 1) == 0);
  }
  CHECK(grad(1, 0) != 0);
}
