#include <catch2/catch.hpp>

#include <cmath>
#include <limits>
#include <utility>
#include <string>

#include <gradus/gradus.hpp>

using namespace gradus;

TEST_CASE("invalid_argument names the function, the argument and both values", "[core]") {
  try {
    detail::require_positive("Thing::value", "beta", -2.5);
    FAIL("no throw");
  } catch (const gradus::invalid_argument& e) {
    const std::string message = e.what();
    CHECK(message.find("gradus::Thing::value") != std::string::npos);
    CHECK(message.find("'beta'") != std::string::npos);
    CHECK(message.find("> 0") != std::string::npos);
    CHECK(message.find("-2.5") != std::string::npos);
  }
  CHECK_THROWS_AS(detail::require_positive("f", "x", std::nan("")), std::invalid_argument);
  CHECK_THROWS_AS(detail::require_nonnegative("f", "x", -1e-300), gradus::invalid_argument);
  CHECK_NOTHROW(detail::require_nonnegative("f", "x", 0.0));
  CHECK_THROWS_AS(detail::require_finite("f", "x", INFINITY), gradus::invalid_argument);
  CHECK_THROWS_AS(detail::require_in_range("f", "p", -0.1, 0.0, 1.0, true), gradus::invalid_argument);
  CHECK_NOTHROW(detail::require_in_range("f", "p", 1.0, 0.0, 1.0, true));
  CHECK_THROWS_AS(detail::require_in_range("f", "eps", 0.5, 0.0, 0.5), gradus::invalid_argument);
  CHECK_THROWS_WITH(detail::require_size("f", "labels", 3, 4, "entries (rows of logits)"),
                    "gradus::f: argument 'labels': expected 4 entries (rows of logits), got 3");
  CHECK_THROWS_AS(detail::require_nonempty("f", "logits", 0), gradus::invalid_argument);
}

TEST_CASE("require_labels checks the range and honours ignore_index", "[core]") {
  Labels y(4);
  y << 0, 2, -100, 1;
  CHECK_NOTHROW(detail::require_labels("f", "labels", y, 3, -100, true));
  CHECK_THROWS_WITH(detail::require_labels("f", "labels", y, 3),
                    "gradus::f: argument 'labels': expected labels in [0, 3), got -100 at index 2");
  y(2) = 3;
  CHECK_THROWS_AS(detail::require_labels("f", "labels", y, 3, -100, true), gradus::invalid_argument);
}

TEST_CASE("check_gradient passes a right gradient and reports a wrong one", "[testing]") {
  Eigen::VectorXd x(3);
  x << 0.3, -1.2, 2.0;
  auto f = [](const Eigen::VectorXd& v) { return std::sin(v(0)) * v(1) + v(2) * v(2) * v(2); };
  Eigen::VectorXd right(3);
  right << std::cos(x(0)) * x(1), std::sin(x(0)), 3 * x(2) * x(2);
  const auto good = testing::check_gradient(f, x, right);
  CHECK(good.ok);
  CHECK(good.checked == 3);
  CHECK(good.max_error < 1e-7);

  Eigen::VectorXd wrong = right;
  wrong(1) += 0.1;
  const auto bad = testing::check_gradient(f, x, wrong);
  CHECK_FALSE(bad.ok);
  REQUIRE_FALSE(bad.worst.empty());
  CHECK(bad.worst.front().index == 1);
  CHECK(bad.summary().find("FAILED") != std::string::npos);

  Eigen::VectorXd nan_grad = right;
  nan_grad(0) = std::nan("");
  CHECK_FALSE(testing::check_gradient(f, x, nan_grad).ok);
  CHECK_THROWS_AS(testing::check_gradient(f, x, Eigen::VectorXd(2)), gradus::invalid_argument);
}

TEST_CASE("check_value_and_grad and coordinate subsets", "[testing]") {
  const Eigen::VectorXd x = Eigen::VectorXd::LinSpaced(50, -1, 1);
  auto fg = [](const Eigen::VectorXd& v, Eigen::VectorXd& g) {
    g = 2 * v;
    return v.squaredNorm();
  };
  testing::GradientCheckOptions options;
  options.max_coordinates = 10;
  const auto report = testing::check_value_and_grad(fg, x, options);
  CHECK(report.ok);
  CHECK(report.checked == 10);
}

TEST_CASE("check_gradient and check_value_and_grad reject options outside their domain", "[testing][errors]") {
  const Eigen::VectorXd x = Eigen::VectorXd::LinSpaced(4, -1, 1), grad = 2 * x;
  auto f = [](const Eigen::VectorXd& v) { return v.squaredNorm(); };
  auto fg = [](const Eigen::VectorXd& v, Eigen::VectorXd& g) {
    g = 2 * v;
    return v.squaredNorm();
  };
  const double inf = std::numeric_limits<double>::infinity(), nan = std::numeric_limits<double>::quiet_NaN();
  using Options = testing::GradientCheckOptions;
  const std::pair<const char*, Options> bad[] = {
      {"options.step", {.step = 0}},          {"options.step", {.step = inf}},
      {"options.step", {.step = nan}},        {"options.tolerance", {.tolerance = -1e-9}},
      {"options.tolerance", {.tolerance = inf}}, {"options.tolerance", {.tolerance = nan}},
      {"options.scale_floor", {.scale_floor = -1}}, {"options.scale_floor", {.scale_floor = inf}},
      {"options.max_coordinates", {.max_coordinates = -1}}, {"options.worst_reported", {.worst_reported = -1}},
  };
  for (const auto& [argument, options] : bad) {
    INFO(argument);
    CHECK_THROWS_WITH(testing::check_gradient(f, x, grad, options), Catch::Contains(argument));
    CHECK_THROWS_WITH(testing::check_value_and_grad(fg, x, options), Catch::Contains(argument));
  }
  // The edges: a tolerance and a floor of 0, no coordinate listed.
  CHECK(testing::check_gradient(f, x, grad, {.tolerance = 0.5, .scale_floor = 0, .worst_reported = 0}).worst.empty());
  CHECK_NOTHROW(testing::check_gradient(f, x, grad, {.tolerance = 0}));
}
