#include <catch2/catch.hpp>

#include <cmath>
#include <cstdio>
#include <limits>
#include <string>
#include <tuple>
#include <utility>

#include <Eigen/SVD>

#include <gradus/losses/adversarial.hpp>
#include <gradus/models/linear.hpp>
#include <gradus/models/mlp.hpp>
#include <gradus/testing/gradient_check.hpp>

using namespace gradus;

namespace {

template <class S>
RowMatrix<S> random_inputs(Index rows, Index cols, unsigned seed) {
  std::srand(seed);
  return RowMatrix<double>::Random(rows, cols).cast<S>();
}

Labels random_labels(Index rows, int classes, unsigned seed) {
  std::srand(seed);
  Labels y(rows);
  for (Index i = 0; i < rows; ++i) y(i) = std::rand() % classes;
  return y;
}

// A model, its initial parameters and a random batch (inputs in [-1, 1], labels in range).
template <class M>
struct Problem {
  using S = typename M::Scalar;
  M model;
  Vector<S> theta;
  RowMatrix<S> X;
  Labels y;

  Problem(M m, Index n, unsigned seed)
      : model(std::move(m)),
        theta(model.init_params(seed)),
        X(random_inputs<S>(n, model.num_inputs(), seed)),
        y(random_labels(n, int(model.num_outputs()), seed + 1)) {}
};

// Brute-force loop oracle of l_tau(z / rho, y) + nu * ||Delta(z_adv) - Delta(z)||_2 (mean).
double oracle(const RowMatrix<double>& Z, const RowMatrix<double>& Z_adv, const Labels& y, double tau, double rho,
              double nu) {
  double total = 0;
  for (Index i = 0; i < Z.rows(); ++i) {
    double normalizer = 0;
    for (Index j = 0; j < Z.cols(); ++j) normalizer += std::exp((Z(i, j) - Z(i, y(i))) / rho);
    const double p_y = 1 / normalizer;
    total += tau == 1 ? -std::log(p_y) : (1 - std::pow(p_y, tau - 1)) / (tau - 1);
    double squares = 0;
    for (Index j = 0; j < Z.cols(); ++j) {
      const double change = (Z_adv(i, y(i)) - Z_adv(i, j)) - (Z(i, y(i)) - Z(i, j));
      squares += change * change;
    }
    total += nu * std::sqrt(squares);
  }
  return total / double(Z.rows());
}

// The margin Jacobian of a linear model at label y: rows w_y - w_j (W is D x C).
Eigen::MatrixXd margin_jacobian(const LinearModel<double>& model, const Vector<double>& theta, int y) {
  const RowMatrix<double> W = model.weights(theta);
  Eigen::MatrixXd A(W.cols(), W.rows());
  for (Index j = 0; j < W.cols(); ++j) A.row(j) = (W.col(y) - W.col(j)).transpose();
  return A;
}

}  // namespace

TEMPLATE_TEST_CASE("nu = 0 is the comp-sum loss of h / rho", "[adversarial]", float, double) {
  using S = TestType;
  for (auto [n, d, c] : {std::tuple{1, 1, 2}, {3, 7, 3}, {8, 9, 9}, {17, 2, 8}}) {
    const auto [model, theta, X, y] = Problem(LinearModel<S>(d, c), n, 3);
    for (S tau : {S(0), S(1), S(1.5)}) {
      const S rho = S(0.6);
      const SmoothAdversarialLoss<S> loss({.tau = tau, .rho = rho, .nu = 0, .gamma = S(0.3)});
      const CompSumLoss<S> comp_sum({.tau = tau});
      RowMatrix<S> Z(n, c), dZ(n, c);
      model.predict(theta, X, Z);
      const S expected = comp_sum.value_and_grad(Z / rho, y, dZ);
      Vector<S> expected_grad(model.num_params()), grad(model.num_params());
      model.vjp_params(theta, X, dZ / rho, expected_grad);

      CHECK(loss.value(model, theta, X, y) == Approx(expected).epsilon(1e-5));
      CHECK(loss.value_and_grad(model, theta, X, y, grad) == Approx(expected).epsilon(1e-5));
      CHECK((grad - expected_grad).norm() <= S(1e-5) * (S(1) + expected_grad.norm()));
      Vector<S> per_sample(n), expected_per_sample(n);
      loss.values(model, theta, X, y, per_sample);
      comp_sum.values(Z / rho, y, expected_per_sample);
      CHECK((per_sample - expected_per_sample).norm() <= S(1e-5) * (S(1) + expected_per_sample.norm()));
    }
  }
}

TEST_CASE("linear model, l2 ball: the ascent reaches gamma times the top singular value", "[adversarial]") {
  const int n = 9, d = 7;
  const auto [model, theta, X, y] = Problem(LinearModel<double>(d, 4), n, 5);
  const double gamma = 0.5;
  for (bool random_start : {true, false}) {
    // Steps of size gamma: a step then the projection is a power iteration on I + c A^T A.
    const SmoothAdversarialLoss<double> loss({.nu = 1, .gamma = gamma, .norm = PerturbationNorm::L2, .steps = 50,
                                              .step_size = gamma, .random_start = random_start});
    const SmoothAdversarialLoss<double> clean({.nu = 0});
    Vector<double> with_term(n), without(n);
    loss.values(model, theta, X, y, with_term);
    clean.values(model, theta, X, y, without);
    RowMatrix<double> X_adv(n, d);
    loss.perturb(model, theta, X, y, X_adv);
    for (Index i = 0; i < n; ++i) {
      const double sigma = Eigen::JacobiSVD<Eigen::MatrixXd>(margin_jacobian(model, theta, y(i))).singularValues()(0);
      CHECK(with_term(i) - without(i) == Approx(gamma * sigma).epsilon(1e-4));
      CHECK((X_adv.row(i) - X.row(i)).norm() <= gamma * (1 + 1e-12));
    }
  }
}

TEST_CASE("linear model, l_inf ball: the ascent ends at a vertex, below the brute-force maximum", "[adversarial]") {
  const int n = 8, d = 3;
  const auto [model, theta, X, y] = Problem(LinearModel<double>(d, 5), n, 8);
  const double gamma = 0.25;
  const SmoothAdversarialLoss<double> loss({.nu = 1, .gamma = gamma, .steps = 40});
  RowMatrix<double> X_adv(n, d);
  loss.perturb(model, theta, X, y, X_adv);
  int at_maximum = 0;
  for (Index i = 0; i < n; ++i) {
    const Eigen::MatrixXd A = margin_jacobian(model, theta, y(i));
    double best = 0;
    for (int corner = 0; corner < (1 << d); ++corner) {
      Eigen::VectorXd delta(d);
      for (int k = 0; k < d; ++k) delta(k) = (corner >> k & 1) ? gamma : -gamma;
      best = std::max(best, (A * delta).norm());
    }
    const Eigen::VectorXd delta = (X_adv.row(i) - X.row(i)).transpose();
    CHECK(delta.cwiseAbs().minCoeff() == Approx(gamma));
    const double found = (A * delta).norm();
    CHECK(found <= best * (1 + 1e-12));
    at_maximum += found >= best * (1 - 1e-9);
  }
  CHECK(at_maximum >= n / 2);  // a convex function over a cube: local vertices can trap the ascent
}

TEMPLATE_TEST_CASE("the outer gradient, x' held fixed, matches finite differences", "[adversarial]", float, double) {
  using S = TestType;
  const int n = 9, d = 8, c = 3;
  const RowMatrix<S> X = random_inputs<S>(n, d, 21);
  const Labels y = random_labels(n, c, 22);
  const LinearModel<S> linear(d, c);
  const LinearModel<double> linear_double(d, c);
  const MLP<S> mlp({d, 7, c}, Activation::Tanh);
  const MLP<double> mlp_double({d, 7, c}, Activation::Tanh);
  for (auto [norm, schedule, restarts] : {std::tuple{PerturbationNorm::Linf, StepSchedule::Constant, 1},
                                          {PerturbationNorm::L2, StepSchedule::Constant, 1},
                                          {PerturbationNorm::Linf, StepSchedule::Cosine, 3},
                                          {PerturbationNorm::L2, StepSchedule::Cosine, 3}}) {
    const SmoothAdversarialOptions<S> options{.tau = S(0.5), .rho = S(0.7), .nu = S(2), .gamma = S(0.4), .norm = norm,
                                              .schedule = schedule, .restarts = restarts};
    const SmoothAdversarialLoss<S> loss(options);
    const SmoothAdversarialLoss<double> loss_double({.tau = 0.5, .rho = 0.7, .nu = 2, .gamma = 0.4, .norm = norm});
    auto check = [&](const auto& model, const auto& model_double) {
      const Vector<S> theta = model.init_params(5);
      RowMatrix<S> X_adv(n, d);
      loss.perturb(model, theta, X, y, X_adv);
      Vector<S> grad(model.num_params()), grad_at(model.num_params());
      const S value = loss.value_and_grad(model, theta, X, y, grad);
      CHECK(loss.value_and_grad_at(model, theta, X, X_adv, y, grad_at) == value);
      CHECK(grad == grad_at);

      // The value against the loop oracle.
      RowMatrix<S> Z(n, c), Z_adv(n, c);
      model.predict(theta, X, Z);
      model.predict(theta, X_adv, Z_adv);
      const double expected = oracle(Z.template cast<double>(), Z_adv.template cast<double>(), y, 0.5, 0.7, 2);
      CHECK(value == Approx(expected).epsilon(std::is_same_v<S, float> ? 1e-5 : 1e-12));

      // The gradient against central differences of the double implementation at the same x'.
      const RowMatrix<double> Xd = X.template cast<double>(), X_adv_d = X_adv.template cast<double>();
      Vector<double> scratch(model.num_params());
      auto f = [&](const Eigen::VectorXd& t) {
        return loss_double.value_and_grad_at(model_double, t, Xd, X_adv_d, y, scratch);
      };
      testing::GradientCheckOptions check_options;
      if constexpr (std::is_same_v<S, float>) check_options = {.step = 1e-5, .tolerance = 2e-3};
      else check_options = {.step = 1e-6, .tolerance = 1e-6};
      const auto report = testing::check_gradient(f, theta.template cast<double>(), grad, check_options);
      INFO(report.summary());
      CHECK(report.ok);
    };
    check(linear, linear_double);
    check(mlp, mlp_double);
  }
}

TEMPLATE_TEST_CASE("the inner ascent is deterministic for a seed and stays in the ball", "[adversarial]", float,
                   double) {
  using S = TestType;
  const int n = 17, d = 9;
  const auto [model, theta, X, y] = Problem(MLP<S>({d, 8, 3}, Activation::Tanh), n, 31);
  for (PerturbationNorm norm : {PerturbationNorm::Linf, PerturbationNorm::L2}) {
    SmoothAdversarialLoss<S> loss({.gamma = S(0.2), .norm = norm, .steps = 5, .seed = 3});
    RowMatrix<S> first(n, d), again(n, d), other(n, d);
    loss.perturb(model, theta, X, y, first);
    loss.perturb(model, theta, X, y, again);
    loss.set_seed(4);
    loss.perturb(model, theta, X, y, other);
    CHECK(first == again);
    CHECK(first != other);
    for (Index i = 0; i < n; ++i) {
      const auto delta = (first.row(i) - X.row(i)).eval();
      const S size = norm == PerturbationNorm::Linf ? delta.cwiseAbs().maxCoeff() : delta.norm();
      CHECK(size <= S(0.2) * (1 + 8 * std::numeric_limits<S>::epsilon()));
    }
  }
}

TEST_CASE("pgd_attack on a linear model reaches the closed-form worst case", "[adversarial]") {
  // Two classes: the margin h_other - h_y = x (w_other - w_y) + const is linear, so the worst
  // l_inf perturbation is gamma sign(w_other - w_y) and the worst l2 one gamma (w_o - w_y) / ||.||.
  const int n = 7, d = 9;
  const auto [model, theta, X, y] = Problem(LinearModel<double>(d, 2), n, 41);
  const RowMatrix<double> W = model.weights(theta);
  for (PerturbationNorm norm : {PerturbationNorm::Linf, PerturbationNorm::L2}) {
    RowMatrix<double> X_adv(n, d);
    pgd_attack(model, theta, X, y, {.gamma = 0.3, .norm = norm, .steps = 20, .random_start = false}, X_adv);
    for (Index i = 0; i < n; ++i) {
      const Eigen::RowVectorXd direction = (W.col(1 - y(i)) - W.col(y(i))).transpose();
      const Eigen::RowVectorXd expected = norm == PerturbationNorm::Linf
                                              ? Eigen::RowVectorXd(0.3 * direction.array().sign())
                                              : Eigen::RowVectorXd((0.3 / direction.norm()) * direction);
      CHECK((X_adv.row(i) - X.row(i) - expected).norm() <= 1e-9);
    }
  }
}

TEST_CASE("projected_gradient_ascent maximizes a user objective of the outputs", "[adversarial]") {
  // Maximizing h_0(x') of a linear model: x' = x + gamma sign(w_0) in l_inf, clipped to the box.
  const LinearModel<double> model(7, 3);
  const Vector<double> theta = model.init_params(23);
  const RowMatrix<double> X = (random_inputs<double>(5, 7, 91).array() + 1) / 2;
  auto first_output = [](const RowMatrix<double>& Z, RowMatrix<double>& dZ) {
    dZ.setZero();
    dZ.col(0).setOnes();
    CHECK(Z.cols() == 3);
  };
  RowMatrix<double> X_adv(5, 7);
  projected_gradient_ascent(model, theta, X, {.gamma = 0.2, .steps = 10, .random_start = false, .upper = 1},
                            first_output, X_adv);
  const Eigen::RowVectorXd step = 0.2 * model.weights(theta).col(0).transpose().array().sign();
  const RowMatrix<double> expected = (X.rowwise() + step).cwiseMin(1.0);
  CHECK((X_adv - expected).cwiseAbs().maxCoeff() <= 1e-12);
}

TEST_CASE("Sum and None reductions give the sum of the per-sample losses", "[adversarial]") {
  const auto [model, theta, X, y] = Problem(MLP<double>({4, 5, 3}, Activation::Tanh), 7, 95);
  const SmoothAdversarialLoss<double> mean({.gamma = 0.3});
  Vector<double> grad_mean(model.num_params()), grad(model.num_params());
  const double value_mean = mean.value_and_grad(model, theta, X, y, grad_mean);
  for (Reduction reduction : {Reduction::Sum, Reduction::None}) {
    const SmoothAdversarialLoss<double> loss({.gamma = 0.3, .reduction = reduction});
    CHECK(loss.value_and_grad(model, theta, X, y, grad) == Approx(7 * value_mean));
    CHECK((grad - 7 * grad_mean).norm() <= 1e-12 * (1 + grad.norm()));
    CHECK(loss.value(model, theta, X, y) == Approx(7 * value_mean));
  }
}

TEMPLATE_TEST_CASE("pgd_attack respects the box and lowers accuracy", "[adversarial]", float, double) {
  using S = TestType;
  const int n = 64, d = 8, c = 3;
  const LinearModel<S> model(d, c);
  const Vector<S> theta = model.init_params(2);
  const RowMatrix<S> X = (random_inputs<S>(n, d, 51).array() + 1) / 2;  // in [0, 1]
  RowMatrix<S> Z(n, c);
  model.predict(theta, X, Z);
  Labels y(n);  // the model's own predictions: clean accuracy 1
  for (Index i = 0; i < n; ++i) Z.row(i).maxCoeff(&y(i));
  const PGDOptions<S> options{.gamma = S(0.3), .seed = 9, .lower = 0, .upper = 1};
  RowMatrix<S> X_adv(n, d);
  pgd_attack(model, theta, X, y, options, X_adv);
  CHECK(X_adv.minCoeff() >= 0);
  CHECK(X_adv.maxCoeff() <= 1);
  CHECK((X_adv - X).cwiseAbs().maxCoeff() <= S(0.3) * (1 + 8 * std::numeric_limits<S>::epsilon()));
  const double robust = robust_accuracy(model, theta, X, y, options);
  CHECK(robust < 1);
  CHECK(robust_accuracy(model, theta, X, y, {.gamma = 0, .steps = 0}) == 1);
}

TEST_CASE("large logits in float give finite values and gradients", "[adversarial]") {
  auto [model, theta, X, y] = Problem(LinearModel<float>(2, 3), 3, 61);
  theta *= 1e4f;
  const SmoothAdversarialLoss<float> loss({.gamma = 0.1f});
  Vector<float> grad(model.num_params());
  const float value = loss.value_and_grad(model, theta, X, y, grad);
  CHECK(std::isfinite(value));
  CHECK(grad.allFinite());
}

TEST_CASE("expressions are accepted as inputs", "[adversarial]") {
  const auto [model, theta, X, y] = Problem(LinearModel<double>(3, 2), 4, 71);
  const SmoothAdversarialLoss<double> loss({.gamma = 0.1});
  const RowMatrix<double> twice = 2 * X;
  CHECK(loss.value(model, 1 * theta, 2 * X, (y.array() + 0).matrix()) == loss.value(model, theta, twice, y));
}

TEST_CASE("bad input throws gradus::invalid_argument naming the argument", "[adversarial]") {
  using Loss = SmoothAdversarialLoss<double>;
  CHECK_THROWS_WITH(Loss({.gamma = -0.1}), Catch::Contains("'options.gamma'"));
  CHECK_THROWS_WITH(Loss({.gamma = NAN}), Catch::Contains("'options.gamma'"));
  CHECK_THROWS_WITH(Loss({.nu = -1}), Catch::Contains("'options.nu'"));
  CHECK_THROWS_WITH(Loss({.rho = 0}), Catch::Contains("'options.rho'"));
  CHECK_THROWS_WITH(Loss({.rho = -2}), Catch::Contains("'options.rho'"));
  CHECK_THROWS_WITH(Loss({.rho = INFINITY}), Catch::Contains("'options.rho'"));
  CHECK_THROWS_WITH(Loss({.tau = -1}), Catch::Contains("gradus::SmoothAdversarialLoss: argument 'options.tau'"));
  CHECK_THROWS_WITH(Loss({.gamma = 0.1, .steps = 0}), Catch::Contains("'options.steps'"));
  CHECK_THROWS_WITH(Loss({.step_size = -1}), Catch::Contains("'options.step_size'"));
  CHECK_NOTHROW(Loss({.gamma = 0, .steps = 0}));

  const auto [model, theta, X, y] = Problem(LinearModel<double>(3, 4), 5, 81);
  const Loss loss;
  Vector<double> grad(model.num_params());
  const std::string function = "gradus::SmoothAdversarialLoss::value_and_grad: ";
  CHECK_THROWS_WITH(loss.value_and_grad(model, theta.head(4), X, y, grad),
                    function + "argument 'theta': expected 16 entries (num_params), got 4");
  CHECK_THROWS_WITH(loss.value_and_grad(model, theta, X.leftCols(2), y, grad),
                    function + "argument 'X': expected 3 columns (num_inputs), got 2");
  CHECK_THROWS_WITH(loss.value_and_grad(model, theta, X, y.head(4), grad),
                    function + "argument 'labels': expected 5 entries (rows of X), got 4");
  CHECK_THROWS_WITH(loss.value_and_grad(model, theta, X.topRows(0), y.head(0), grad), Catch::Contains("'X'"));
  Labels bad = y;
  bad(2) = 4;
  CHECK_THROWS_WITH(loss.value_and_grad(model, theta, X, bad, grad), Catch::Contains("labels in [0, 4)"));
  Vector<double> short_grad(3);
  CHECK_THROWS_WITH(loss.value_and_grad(model, theta, X, y, short_grad), Catch::Contains("'dtheta'"));
  RowMatrix<double> X_adv(4, 3);
  CHECK_THROWS_WITH(loss.value_and_grad_at(model, theta, X, X_adv, y, grad), Catch::Contains("'X_adv'"));
  CHECK_THROWS_WITH(loss.perturb(model, theta, X, y, X_adv), Catch::Contains("'X_adv'"));
  Vector<double> per_sample(4);
  CHECK_THROWS_WITH(loss.values(model, theta, X, y, per_sample), Catch::Contains("'per_sample'"));

  RowMatrix<double> attacked(5, 3);
  CHECK_THROWS_WITH(pgd_attack(model, theta, X, y, {.gamma = -1}, attacked), Catch::Contains("'options.gamma'"));
  CHECK_THROWS_WITH(pgd_attack(model, theta, X, y, {.steps = 0}, attacked), Catch::Contains("'options.steps'"));
  CHECK_THROWS_WITH(pgd_attack(model, theta, X, y, {.lower = 1, .upper = 0}, attacked),
                    Catch::Contains("'options.lower'"));
  const LinearModel<double> one_output(3, 1);
  CHECK_THROWS_WITH(pgd_attack(one_output, one_output.init_params(1), X, Labels::Zero(5), {}, attacked),
                    Catch::Contains("'model'"));
}

namespace {

// The exact sup of the smooth term of a linear model over the ball: gamma sigma_max(A) in l_2,
// and in l_inf the largest ||A delta|| over the 2^D vertices (a convex function's maximum).
double exact_sup(const Eigen::MatrixXd& A, double gamma, PerturbationNorm norm) {
  if (norm == PerturbationNorm::L2) return gamma * Eigen::JacobiSVD<Eigen::MatrixXd>(A).singularValues()(0);
  const Index d = A.cols();
  double best = 0;
  for (long corner = 0; corner < (1L << d); ++corner) {
    Eigen::VectorXd delta(d);
    for (Index k = 0; k < d; ++k) delta(k) = (corner >> k & 1) ? gamma : -gamma;
    best = std::max(best, (A * delta).norm());
  }
  return best;
}

}  // namespace

TEMPLATE_TEST_CASE("the ascent's smooth term is a lower bound of the closed-form sup; Cosine and restarts reach it",
                   "[adversarial]", float, double) {
  // Linear model: the term at delta is ||A delta||_2, A the margin Jacobian (rows w_y - w_j).
  using S = TestType;
  const double tolerance = std::is_same_v<S, float> ? 1e-4 : 1e-5, rounding = std::is_same_v<S, float> ? 1e-5 : 1e-12;
  const int n = 32, d = 6;
  for (int classes : {2, 4}) {
    const LinearModel<double> model_double(d, classes);
    const LinearModel<S> model(d, classes);
    const Vector<double> theta_double = model_double.init_params(7);
    const Vector<S> theta = theta_double.cast<S>();
    const RowMatrix<S> X = random_inputs<S>(n, d, 3);
    const Labels y = random_labels(n, classes, 4);
    for (PerturbationNorm norm : {PerturbationNorm::L2, PerturbationNorm::Linf}) {
      const S gamma = S(0.5);
      Eigen::VectorXd exact(n);
      for (Index i = 0; i < n; ++i) exact(i) = exact_sup(margin_jacobian(model_double, theta_double, y(i)), 0.5, norm);
      // Default (Madry) steps, then the new options: {schedule, restarts, steps}.
      struct Case {
        StepSchedule schedule;
        int restarts, steps;
        bool reaches;
      };
      for (const Case& c : {Case{StepSchedule::Constant, 1, 200, false}, Case{StepSchedule::Cosine, 8, 20, true}}) {
        const SmoothAdversarialLoss<S> loss(
            {.nu = 1, .gamma = gamma, .norm = norm, .steps = c.steps, .schedule = c.schedule, .restarts = c.restarts});
        RowMatrix<S> X_adv(n, d);
        loss.perturb(model, theta, X, y, X_adv);
        double worst = 0;
        for (Index i = 0; i < n; ++i) {
          const Eigen::VectorXd delta = (X_adv.row(i) - X.row(i)).transpose().template cast<double>();
          const double found = (margin_jacobian(model_double, theta_double, y(i)) * delta).norm();
          CHECK(found <= exact(i) * (1 + rounding));  // a lower bound, always
          worst = std::max(worst, 1 - found / exact(i));
        }
        INFO("classes " << classes << ", l_" << (norm == PerturbationNorm::L2 ? "2" : "inf") << ", worst gap " << worst);
        if (c.reaches) {
          CHECK(worst <= tolerance);
        } else if (norm == PerturbationNorm::L2) {
          CHECK(worst > 1e-3);  // Madry's steps travel 2.5 gamma in all: short of the sup, even at K = 200
        }
      }
    }
  }
}

TEST_CASE("l_inf, 4 classes: one start stops at a local vertex; Cosine steps and restarts find the enumerated maximum", "[adversarial]") {
  const int n = 64, d = 6;
  const auto [model, theta, X, y] = Problem(LinearModel<double>(d, 4), n, 3);
  double one_start_worst = 0, restarts_worst = 0;
  for (int restarts : {1, 32}) {
    const StepSchedule schedule = restarts == 1 ? StepSchedule::Constant : StepSchedule::Cosine;
    const SmoothAdversarialLoss<double> loss(
        {.nu = 1, .gamma = 0.5, .steps = 20, .schedule = schedule, .restarts = restarts});
    RowMatrix<double> X_adv(n, d);
    loss.perturb(model, theta, X, y, X_adv);
    for (Index i = 0; i < n; ++i) {
      const Eigen::MatrixXd A = margin_jacobian(model, theta, y(i));
      const double exact = exact_sup(A, 0.5, PerturbationNorm::Linf);
      const double found = (A * (X_adv.row(i) - X.row(i)).transpose()).norm();
      CHECK(found <= exact * (1 + 1e-12));
      (restarts == 1 ? one_start_worst : restarts_worst) = std::max(restarts == 1 ? one_start_worst : restarts_worst,
                                                                    1 - found / exact);
    }
  }
  CHECK(one_start_worst > 0.01);
  CHECK(restarts_worst <= 1e-12);
}

TEMPLATE_TEST_CASE("restarts never lower a sample's term, and are reproducible from the seed", "[adversarial]", float,
                   double) {
  using S = TestType;
  const int n = 17, d = 9;
  const auto [model, theta, X, y] = Problem(MLP<S>({d, 8, 3}, Activation::Tanh), n, 31);
  for (PerturbationNorm norm : {PerturbationNorm::Linf, PerturbationNorm::L2}) {
    for (bool random_start : {true, false}) {
      const SmoothAdversarialOptions<S> one{.nu = 1, .gamma = S(0.3), .norm = norm, .steps = 5,
                                            .random_start = random_start, .seed = 5};
      SmoothAdversarialOptions<S> many = one;
      many.restarts = 4;
      const SmoothAdversarialLoss<S> clean({.nu = 0}), first(one);
      SmoothAdversarialLoss<S> best(many);
      Vector<S> base(n), single(n), several(n), again(n);
      clean.values(model, theta, X, y, base);
      first.values(model, theta, X, y, single);
      best.values(model, theta, X, y, several);
      best.values(model, theta, X, y, again);
      CHECK(several == again);
      CHECK(((several - base).array() >= (single - base).array()).all());
      CHECK(((several - single).array() > 0).any());
      best.set_seed(6);
      best.values(model, theta, X, y, again);
      CHECK(several != again);
      RowMatrix<S> X_adv(n, d);
      best.perturb(model, theta, X, y, X_adv);
      for (Index i = 0; i < n; ++i) {
        const auto delta = (X_adv.row(i) - X.row(i)).eval();
        const S size = norm == PerturbationNorm::Linf ? delta.cwiseAbs().maxCoeff() : delta.norm();
        CHECK(size <= S(0.3) * (1 + 8 * std::numeric_limits<S>::epsilon()));
      }
    }
  }
}

TEMPLATE_TEST_CASE("random starts are uniform in the ball", "[adversarial]", float, double) {
  // A flat objective leaves x' at its start. In D = 2 the fraction within half the radius is 1/4
  // for a uniform point of the l_2 disc (a uniform point of the square, projected, gives pi/16).
  using S = TestType;
  const int n = 4000, d = 2;
  const LinearModel<S> model(d, 2);
  const Vector<S> theta = model.init_params(1);
  const RowMatrix<S> X = random_inputs<S>(n, d, 5);
  auto flat = [](const RowMatrix<S>&, RowMatrix<S>& dZ) { dZ.setZero(); };
  for (PerturbationNorm norm : {PerturbationNorm::L2, PerturbationNorm::Linf}) {
    RowMatrix<S> X_adv(n, d);
    projected_gradient_ascent(model, theta, X, {.gamma = S(0.2), .norm = norm, .steps = 1, .seed = 11}, flat, X_adv);
    int inner = 0;
    for (Index i = 0; i < n; ++i) {
      const auto delta = (X_adv.row(i) - X.row(i)).eval();
      const S size = norm == PerturbationNorm::Linf ? delta.cwiseAbs().maxCoeff() : delta.norm();
      CHECK(size <= S(0.2) * (1 + 8 * std::numeric_limits<S>::epsilon()));
      inner += size <= S(0.1);
    }
    CHECK(double(inner) / n == Approx(0.25).margin(0.03));  // 1/4 of the square too, in l_inf
  }
}

TEMPLATE_TEST_CASE("pgd_attack on a linear model: the margin is a lower bound of its closed-form sup", "[adversarial]",
                   float, double) {
  // The margin max_j (h_j - h_y)(x') is convex in x', with sup max_j (h_j - h_y)(x) + gamma ||w_j - w_y||_*
  // (dual norm: l_1 for l_inf, l_2 for l_2); a single start can stop at a rival's local maximum.
  using S = TestType;
  const double rounding = std::is_same_v<S, float> ? 1e-5 : 1e-12, tolerance = std::is_same_v<S, float> ? 1e-5 : 1e-9;
  const int n = 64, d = 5, c = 5;
  const auto [model, theta, X, y] = Problem(LinearModel<S>(d, c), n, 13);
  const RowMatrix<double> W = model.weights(theta).template cast<double>();
  RowMatrix<S> Z(n, c);
  model.predict(theta, X, Z);
  for (PerturbationNorm norm : {PerturbationNorm::Linf, PerturbationNorm::L2}) {
    for (int restarts : {1, 32}) {  // in l_inf one sample of the 64 needs more than 8 restarts
      const PGDOptions<S> options{.gamma = S(0.4), .norm = norm, .steps = 20, .schedule = StepSchedule::Cosine,
                                  .restarts = restarts, .seed = 2};
      RowMatrix<S> X_adv(n, d), Z_adv(n, c);
      pgd_attack(model, theta, X, y, options, X_adv);
      model.predict(theta, X_adv, Z_adv);
      double worst = 0;
      for (Index i = 0; i < n; ++i) {
        double exact = -INFINITY, found = -INFINITY;
        for (Index j = 0; j < c; ++j) {
          if (j == y(i)) continue;
          const Eigen::VectorXd a = W.col(j) - W.col(y(i));
          const double dual = norm == PerturbationNorm::Linf ? a.lpNorm<1>() : a.norm();
          exact = std::max(exact, double(Z(i, j) - Z(i, y(i))) + 0.4 * dual);
          found = std::max(found, double(Z_adv(i, j) - Z_adv(i, y(i))));
        }
        CHECK(found <= exact + rounding * (1 + std::abs(exact)));
        worst = std::max(worst, exact - found);
      }
      if (restarts > 1) CHECK(worst <= tolerance);
    }
  }
}

TEST_CASE("projected_gradient_ascent keeps the best of several starts when the objective writes its values",
          "[adversarial]") {
  // f(x') = cos(h_0(x')), df/dh_0 = -sin(h_0): the ascent climbs to a nearby maximum of the cosine.
  const LinearModel<double> model(4, 2);
  const Vector<double> theta = model.init_params(3);
  const RowMatrix<double> X = random_inputs<double>(9, 4, 17);
  auto gradient = [](const RowMatrix<double>& Z, RowMatrix<double>& dZ) {
    dZ.setZero();
    dZ.col(0) = -Z.col(0).array().sin();
  };
  auto value_and_gradient = [&](const RowMatrix<double>& Z, RowMatrix<double>& dZ, Vector<double>& f) {
    gradient(Z, dZ);
    f = Z.col(0).array().cos();
  };
  const PGDOptions<double> one{.gamma = 2, .steps = 10, .seed = 4};
  PGDOptions<double> many = one;
  many.restarts = 6;
  RowMatrix<double> single(9, 4), several(9, 4), Z(9, 2), Z_best(9, 2);
  projected_gradient_ascent(model, theta, X, one, value_and_gradient, single);
  projected_gradient_ascent(model, theta, X, many, value_and_gradient, several);
  model.predict(theta, single, Z);
  model.predict(theta, several, Z_best);
  CHECK((Z_best.col(0).array().cos() >= Z.col(0).array().cos()).all());
  CHECK_THROWS_WITH(projected_gradient_ascent(model, theta, X, many, gradient, several),
                    Catch::Contains("gradus::projected_gradient_ascent: argument 'options.restarts'"));
}

TEST_CASE("out-of-range enums are rejected by every entry point", "[adversarial]") {
  using Loss = SmoothAdversarialLoss<double>;
  CHECK_THROWS_WITH(Loss({.reduction = Reduction(7)}),
                    "gradus::SmoothAdversarialLoss: argument 'reduction': expected one of its 3 enumerators, got 7");
  CHECK_THROWS_WITH(Loss({.norm = PerturbationNorm(2)}),
                    "gradus::SmoothAdversarialLoss: argument 'options.norm': expected one of its 2 enumerators, got 2");
  CHECK_THROWS_WITH(Loss({.norm = PerturbationNorm(-1)}), Catch::Contains("'options.norm'"));
  CHECK_THROWS_WITH(Loss({.schedule = StepSchedule(5)}), Catch::Contains("'options.schedule'"));
  const auto [model, theta, X, y] = Problem(LinearModel<double>(3, 4), 5, 81);
  RowMatrix<double> X_adv(5, 3);
  auto flat = [](const RowMatrix<double>&, RowMatrix<double>& dZ) { dZ.setZero(); };
  X_adv.setConstant(7);
  for (const PGDOptions<double>& bad : {PGDOptions<double>{.norm = PerturbationNorm(2)},
                                        PGDOptions<double>{.schedule = StepSchedule(-3)}}) {
    CHECK_THROWS_WITH(pgd_attack(model, theta, X, y, bad, X_adv), Catch::StartsWith("gradus::pgd_attack: argument"));
    CHECK_THROWS_WITH(robust_accuracy(model, theta, X, y, bad), Catch::StartsWith("gradus::robust_accuracy: argument"));
    CHECK_THROWS_WITH(projected_gradient_ascent(model, theta, X, bad, flat, X_adv),
                      Catch::StartsWith("gradus::projected_gradient_ascent: argument"));
  }
  CHECK((X_adv.array() == 7).all());  // checked before any write
}

TEMPLATE_TEST_CASE("option edges: the largest accepted values work, the next ones are rejected", "[adversarial]", float,
                   double) {
  using S = TestType;
  using Loss = SmoothAdversarialLoss<S>;
  constexpr S inf = std::numeric_limits<S>::infinity(), largest = std::numeric_limits<S>::max();
  const S below_zero = std::nextafter(S(0), S(-1)), tiny = std::numeric_limits<S>::denorm_min();
  using Options = SmoothAdversarialOptions<S>;
  for (auto [name, field] : {std::pair{"'options.gamma'", &Options::gamma}, std::pair{"'options.nu'", &Options::nu},
                             std::pair{"'options.step_size'", &Options::step_size}}) {
    auto with = [field = field](S value) {
      Options options;
      options.*field = value;
      return options;
    };
    CHECK_THROWS_WITH(Loss(with(inf)), Catch::Contains(name));
    CHECK_THROWS_WITH(Loss(with(below_zero)), Catch::Contains(name));
    CHECK_THROWS_WITH(Loss(with(S(NAN))), Catch::Contains(name));
    CHECK_NOTHROW(Loss(with(largest)));
    CHECK_NOTHROW(Loss(with(tiny)));
  }
  CHECK_THROWS_WITH(Loss({.steps = 0}), Catch::Contains("'options.steps': expected a value > 0 when gamma > 0"));
  CHECK_THROWS_WITH(Loss({.gamma = 0, .steps = -1}), Catch::Contains("'options.steps'"));
  CHECK_THROWS_WITH(Loss({.restarts = 0}), Catch::Contains("'options.restarts': expected a value >= 1, got 0"));
  CHECK_NOTHROW(Loss({.steps = 1, .restarts = 1}));

  // One sample, one input, two classes, small weights: h and its gradients stay finite even for
  // x' = x +- the largest radius; the term is gamma |w_1 - w_0| in either norm.
  const LinearModel<S> model(1, 2);
  Vector<S> theta(4);
  theta << S(1e-3), S(-2e-3), S(0.1), S(-0.1);
  const RowMatrix<S> X = RowMatrix<S>::Constant(1, 1, S(0.5));
  const Labels y = Labels::Zero(1);
  const S clean = SmoothAdversarialLoss<S>({.nu = 0}).value(model, theta, X, y);
  for (PerturbationNorm norm : {PerturbationNorm::Linf, PerturbationNorm::L2}) {
    for (StepSchedule schedule : {StepSchedule::Constant, StepSchedule::Cosine}) {
      for (int steps : {1, 10}) {
        const Loss loss({.gamma = largest, .norm = norm, .steps = steps, .schedule = schedule, .restarts = 2});
        Vector<S> grad(4);
        const S value = loss.value_and_grad(model, theta, X, y, grad);
        CHECK(value == Approx(clean + S(3e-3) * largest).epsilon(1e-5));
        CHECK(grad.allFinite());
      }
    }
    // The largest step: one step to the sup from x, in l_2 as in l_inf.
    const Loss big_step({.gamma = S(0.3), .norm = norm, .steps = 1, .step_size = largest, .random_start = false});
    Vector<S> grad(4);
    CHECK(big_step.value_and_grad(model, theta, X, y, grad) == Approx(clean + S(0.3 * 3e-3)).epsilon(1e-5));
    CHECK(grad.allFinite());
    const Loss small_step({.gamma = S(0.3), .norm = norm, .steps = 3, .step_size = tiny});
    CHECK(std::isfinite(small_step.value_and_grad(model, theta, X, y, grad)));
    CHECK(grad.allFinite());
  }
  // The largest nu with gamma = 0: the term is 0 and its subgradient 0, so the comp-sum loss is left.
  Vector<S> grad(4), expected(4);
  const S value = Loss({.nu = largest, .gamma = 0, .steps = 0}).value_and_grad(model, theta, X, y, grad);
  CHECK(value == Approx(clean));
  CHECK(SmoothAdversarialLoss<S>({.nu = 0}).value_and_grad(model, theta, X, y, expected) == Approx(clean));
  CHECK((grad - expected).norm() <= S(1e-6));
}

TEMPLATE_TEST_CASE("finite inputs give finite gradients wherever the value is finite; NaN inputs propagate",
                   "[adversarial]", float, double) {
  using S = TestType;
  const int n = 9, d = 8, c = 3;
  const auto [model, theta, X, y] = Problem(MLP<S>({d, 7, c}, Activation::Tanh), n, 41);
  const Vector<S> zero = Vector<S>::Zero(theta.size());  // h constant: the term and its subgradient are 0
  Vector<S> grad(theta.size());
  for (PerturbationNorm norm : {PerturbationNorm::Linf, PerturbationNorm::L2}) {
    for (StepSchedule schedule : {StepSchedule::Constant, StepSchedule::Cosine}) {
      for (bool random_start : {true, false}) {
        const SmoothAdversarialLoss<S> loss({.gamma = S(0.3), .norm = norm, .steps = 4, .schedule = schedule,
                                             .restarts = 2, .random_start = random_start});
        for (const Vector<S>& parameters : {theta, zero, Vector<S>(S(1e4) * theta)}) {
          const S value = loss.value_and_grad(model, parameters, X, y, grad);
          CHECK(std::isfinite(value));
          CHECK(grad.allFinite());
        }
        RowMatrix<S> bad = X;
        bad(2, 3) = S(NAN);
        CHECK(std::isnan(loss.value_and_grad(model, theta, bad, y, grad)));
        CHECK(grad.array().isNaN().any());
        Vector<S> bad_theta = theta;
        bad_theta(0) = S(NAN);
        CHECK(std::isnan(loss.value_and_grad(model, bad_theta, X, y, grad)));
      }
    }
  }
}

TEST_CASE("the margin change of huge outputs neither overflows nor underflows", "[adversarial]") {
  // Outputs whose squares overflow (or underflow) a float, and denormal ones (where 2^-exponent
  // alone overflows, so u is scaled by ldexp): the term and its unit gradient stay exact, the
  // term of denormal outputs within the denormal it rounds to.
  const float tiny = std::numeric_limits<float>::denorm_min();
  for (float scale : {1e30f, 1e-30f, tiny, 1e-40f}) {
    const float adv[3] = {3 * scale, 0, -scale}, clean[3] = {0, 0, 0};
    float grad[3];
    const float length = detail::margin_change(adv, clean, 3, 1, grad), expected = std::sqrt(10.0f) * scale;
    if (scale >= std::numeric_limits<float>::min()) {
      CHECK(length == Approx(expected));
    } else {
      CHECK(std::abs(length - expected) <= tiny);
    }
    CHECK(grad[0] == Approx(3 / std::sqrt(10.0f)));
    CHECK(grad[2] == Approx(-1 / std::sqrt(10.0f)));
    CHECK(grad[1] == Approx(-2 / std::sqrt(10.0f)));
  }
}

TEST_CASE("denormal inputs and parameters give a finite loss", "[adversarial][numerics]") {
  // The fuzz reproducer: outputs of a few denormals made the smooth term 0 * inf = NaN.
  const double tiny = std::numeric_limits<double>::denorm_min();
  const LinearModel<double> model(4, 4);
  const RowMatrix<double> X = RowMatrix<double>::Constant(3, 4, -tiny);
  Vector<double> theta = Vector<double>::Constant(model.num_params(), -tiny), dtheta(model.num_params());
  theta(4) = std::numeric_limits<double>::min();
  const Labels y = Labels::Constant(3, 3);
  const SmoothAdversarialLoss<double> loss(
      {.tau = 0.5, .gamma = 8 / 255.0, .norm = PerturbationNorm::L2, .step_size = 1, .restarts = 3, .seed = 3});
  const double value = loss.value_and_grad(model, theta, X, y, dtheta);
  CHECK(std::isfinite(value));
  CHECK(value >= CompSumLoss<double>({.tau = 0.5}).value(RowMatrix<double>::Zero(3, 4), y) * (1 - 1e-12));
  CHECK(dtheta.allFinite());
}

TEST_CASE("the box: X must lie in it, and a one-point box pins x'", "[adversarial]") {
  const auto [model, theta, X, y] = Problem(LinearModel<double>(3, 4), 5, 81);
  RowMatrix<double> X_adv(5, 3);
  CHECK_THROWS_WITH(pgd_attack(model, theta, X, y, {.lower = 0, .upper = 1}, X_adv),
                    Catch::Contains("gradus::pgd_attack: argument 'X': expected entries in [options.lower, options.upper]"));
  CHECK_THROWS_WITH(pgd_attack(model, theta, X, y, {.lower = NAN}, X_adv), Catch::Contains("'options.lower'"));
  const RowMatrix<double> half = RowMatrix<double>::Constant(5, 3, 0.5);
  pgd_attack(model, theta, half, y, {.gamma = 0.2, .lower = 0.5, .upper = 0.5}, X_adv);
  CHECK(X_adv == half);
}
