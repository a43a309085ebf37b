#include <catch2/catch.hpp>

#include <cmath>
#include <vector>

#include <gradus/core/concepts.hpp>
#include <gradus/models/linear.hpp>
#include <gradus/models/mlp.hpp>
#include <gradus/testing/gradient_check.hpp>

using namespace gradus;

static_assert(Model<LinearModel<float>> && Model<LinearModel<double>>);
static_assert(Model<MLP<float>> && Model<MLP<double>>);

namespace {

template <class S>
RowMatrix<S> random_matrix(Index rows, Index cols, unsigned seed) {
  std::srand(seed);
  return RowMatrix<double>::Random(rows, cols).cast<S>();
}

// phi(theta, X) = <R, f(theta; X)>: its gradients are exactly the two vjps with dZ = R.
template <class M>
double projected_output(const M& model, const Vector<double>& theta, const RowMatrix<double>& X,
                        const RowMatrix<double>& R) {
  RowMatrix<double> Z(X.rows(), model.num_outputs());
  model.predict(theta, X, Z);
  return (Z.array() * R.array()).sum();
}

// Checks both vjps of model_s (scalar S) against central differences of model_d (double).
template <class S, class M, class MD>
void check_vjps(const M& model_s, const MD& model_d, Index rows, std::uint64_t seed) {
  const double tolerance = std::is_same_v<S, float> ? 2e-3 : 1e-6;
  testing::GradientCheckOptions options{.tolerance = tolerance, .max_coordinates = 200};
  const Vector<double> theta = model_d.init_params(seed) + Vector<double>::Constant(model_d.num_params(), 0.05);
  const RowMatrix<double> X = random_matrix<double>(rows, model_d.num_inputs(), unsigned(seed));
  const RowMatrix<double> R = random_matrix<double>(rows, model_d.num_outputs(), unsigned(seed + 1));

  Vector<S> dtheta(model_s.num_params());
  model_s.vjp_params(theta.cast<S>(), X.cast<S>(), R.cast<S>(), dtheta);
  auto by_params = [&](const Vector<double>& t) { return projected_output(model_d, t, X, R); };
  const auto params_report = testing::check_gradient(by_params, theta, dtheta, options);
  INFO(params_report.summary());
  CHECK(params_report.ok);

  RowMatrix<S> dX(rows, model_s.num_inputs());
  model_s.vjp_inputs(theta.cast<S>(), X.cast<S>(), R.cast<S>(), dX);
  auto by_inputs = [&](const Vector<double>& x) {
    return projected_output(model_d, theta, Eigen::Map<const RowMatrix<double>>(x.data(), X.rows(), X.cols()), R);
  };
  const Vector<double> flat_X = Eigen::Map<const Vector<double>>(X.data(), X.size());
  const auto inputs_report =
      testing::check_gradient(by_inputs, flat_X, Eigen::Map<const Vector<S>>(dX.data(), dX.size()), options);
  INFO(inputs_report.summary());
  CHECK(inputs_report.ok);
}

}  // namespace

TEMPLATE_TEST_CASE("LinearModel predicts X W + b, checked against a loop", "[models]", float, double) {
  using S = TestType;
  for (Index outputs : {1, 3, 9}) {
    LinearModel<S> model(7, outputs);
    const Vector<S> theta = model.init_params(3) + Vector<S>::Constant(model.num_params(), S(0.5));
    const RowMatrix<S> X = random_matrix<S>(5, 7, 11);
    RowMatrix<S> Z(5, outputs);
    model.predict(theta, X, Z);
    for (Index n = 0; n < 5; ++n) {
      for (Index c = 0; c < outputs; ++c) {
        double expected = theta(7 * outputs + c);
        for (Index d = 0; d < 7; ++d) expected += double(X(n, d)) * double(theta(d * outputs + c));
        CHECK(double(Z(n, c)) == Approx(expected).epsilon(1e-5));
      }
    }
    CHECK(model.num_params() == 7 * outputs + outputs);
    CHECK(model.bias(theta).isConstant(S(0.5)));  // Glorot init leaves the bias at zero
  }
}

TEMPLATE_TEST_CASE("LinearModel vjps pass finite-difference checks", "[models][gradient]", float, double) {
  using S = TestType;
  for (Index inputs : {1, 2, 8, 17}) {
    for (Index outputs : {1, 3, 9}) {
      CAPTURE(inputs, outputs);
      check_vjps<S>(LinearModel<S>(inputs, outputs), LinearModel<double>(inputs, outputs), 7, 5);
    }
  }
  // Expressions work as inputs.
  LinearModel<S> model(3, 2);
  const Vector<S> theta = model.init_params(1);
  const RowMatrix<S> X = random_matrix<S>(4, 3, 2);
  RowMatrix<S> Z(4, 2), Z2(4, 2);
  model.predict(theta, S(2) * X, Z);
  model.predict(theta, X + X, Z2);
  CHECK(Z.isApprox(Z2));
}

TEMPLATE_TEST_CASE("MLP vjps pass finite-difference checks for every activation", "[models][gradient]", float,
                   double) {
  using S = TestType;
  for (Activation activation : {Activation::Tanh, Activation::ReLU, Activation::Sigmoid}) {
    for (const std::vector<Index>& sizes : std::vector<std::vector<Index>>{{3, 2}, {2, 8, 1}, {9, 7, 3, 2}, {17, 9, 4}}) {
      CAPTURE(int(activation), sizes);
      check_vjps<S>(MLP<S>(sizes, activation), MLP<double>(sizes, activation), 9, 7);
    }
  }
}

TEST_CASE("MLP without hidden layers is a LinearModel; with them it stacks layers", "[models]") {
  MLP<double> flat({4, 3}, Activation::Tanh);
  LinearModel<double> linear(4, 3);
  REQUIRE(flat.num_params() == linear.num_params());
  const Vector<double> theta = linear.init_params(9);
  const RowMatrix<double> X = random_matrix<double>(6, 4, 3);
  RowMatrix<double> Z1(6, 3), Z2(6, 3);
  flat.predict(theta, X, Z1);
  linear.predict(theta, X, Z2);
  CHECK(Z1 == Z2);

  MLP<double> net({4, 5, 2}, Activation::Sigmoid);
  CHECK(net.num_params() == 4 * 5 + 5 + 5 * 2 + 2);
  CHECK(net.num_layers() == 2);
  const Vector<double> t = net.init_params(2) + Vector<double>::Constant(net.num_params(), 0.1);
  RowMatrix<double> Z(6, 2);
  net.predict(t, X, Z);
  RowMatrix<double> H = ((X * Eigen::Map<const RowMatrix<double>>(t.data(), 4, 5)).rowwise() +
                         t.segment(20, 5).transpose()).array().logistic();
  RowMatrix<double> expected = (H * Eigen::Map<const RowMatrix<double>>(t.data() + 25, 5, 2)).rowwise() +
                               t.tail(2).transpose();
  CHECK(Z.isApprox(expected, 1e-12));
  CHECK(net.init_params(2) == net.init_params(2));
  CHECK(net.init_params(2) != net.init_params(3));
}

TEST_CASE("Models reject bad shapes and sizes", "[models][errors]") {
  CHECK_THROWS_AS(LinearModel<double>(0, 2), gradus::invalid_argument);
  CHECK_THROWS_AS(LinearModel<double>(2, 0), gradus::invalid_argument);
  CHECK_THROWS_AS(MLP<double>({3}, Activation::ReLU), gradus::invalid_argument);
  CHECK_THROWS_AS(MLP<double>({3, 0, 2}, Activation::ReLU), gradus::invalid_argument);
  CHECK_THROWS_WITH(MLP<double>({3, 2}, Activation(3)), Catch::Contains("'activation'"));
  CHECK_THROWS_WITH(MLP<double>({3, 2}, Activation(-1)), Catch::Contains("'activation'"));

  LinearModel<double> linear(3, 2);
  MLP<double> net({3, 4, 2}, Activation::Tanh);
  const RowMatrix<double> X = random_matrix<double>(5, 3, 1);
  RowMatrix<double> Z(5, 2), dX(5, 3);
  Vector<double> dtheta(linear.num_params());
  const Vector<double> theta = linear.init_params(1);

  CHECK_THROWS_WITH(linear.predict(Vector<double>(3), X, Z),
                    "gradus::LinearModel::predict: argument 'theta': expected 8 entries (num_params), got 3");
  CHECK_THROWS_WITH(linear.predict(theta, RowMatrix<double>(5, 4), Z),
                    "gradus::LinearModel::predict: argument 'X': expected 3 columns (num_inputs), got 4");
  RowMatrix<double> empty_Z(0, 2), short_Z(4, 2), wide_Z(5, 3), narrow_dX(5, 2), wide_dX(5, 4);
  Vector<double> short_dtheta(7);
  CHECK_THROWS_AS(linear.predict(theta, RowMatrix<double>(0, 3), empty_Z), gradus::invalid_argument);
  CHECK_THROWS_AS(linear.predict(theta, X, short_Z), gradus::invalid_argument);
  CHECK_THROWS_AS(linear.predict(theta, X, wide_Z), gradus::invalid_argument);
  CHECK_THROWS_AS(linear.vjp_params(theta, X, wide_Z, dtheta), gradus::invalid_argument);
  CHECK_THROWS_AS(linear.vjp_params(theta, X, Z, short_dtheta), gradus::invalid_argument);
  CHECK_THROWS_AS(linear.vjp_inputs(theta, X, short_Z, dX), gradus::invalid_argument);
  CHECK_THROWS_AS(linear.vjp_inputs(theta, X, Z, narrow_dX), gradus::invalid_argument);

  const Vector<double> net_theta = net.init_params(1);
  Vector<double> net_dtheta(net.num_params());
  CHECK_THROWS_WITH(net.predict(theta, X, Z),
                    "gradus::MLP::predict: argument 'theta': expected 26 entries (num_params), got 8");
  CHECK_THROWS_AS(net.predict(net_theta, RowMatrix<double>(5, 2), Z), gradus::invalid_argument);
  CHECK_THROWS_AS(net.vjp_params(net_theta, X, RowMatrix<double>(5, 1), net_dtheta), gradus::invalid_argument);
  CHECK_THROWS_AS(net.vjp_params(net_theta, X, Z, short_dtheta), gradus::invalid_argument);
  CHECK_THROWS_AS(net.vjp_inputs(net_theta, X, Z, wide_dX), gradus::invalid_argument);
}

TEST_CASE("Non-finite parameters propagate as NaN through the models", "[models]") {
  MLP<double> net({2, 3, 1}, Activation::Tanh);
  Vector<double> theta = net.init_params(1);
  theta(0) = std::nan("");
  RowMatrix<double> Z(4, 1);
  net.predict(theta, RowMatrix<double>::Ones(4, 2), Z);
  CHECK(Z.array().isNaN().all());
}
