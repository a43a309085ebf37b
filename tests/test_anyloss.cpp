#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <gradus/core/compose.hpp>
#include <gradus/core/concepts.hpp>
#include <gradus/core/dual.hpp>
#include <gradus/losses/anyloss.hpp>
#include <gradus/testing/gradient_check.hpp>

using namespace gradus;

namespace {

// User metrics, written once as templates of the four counts.
const auto mcc = [](auto tp, auto fn, auto fp, auto tn) {
  return (tp * tn - fp * fn) / sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn));
};
const auto jaccard = [](auto tp, auto fn, auto fp, auto) { return tp / (tp + fn + fp); };
// Precision while recall stays above a floor, recall - 1 below it: branches on the values.
const auto precision_at_recall_floor = [](auto tp, auto fn, auto fp, auto) {
  const auto recall = tp / (tp + fn);
  return recall >= 0.6 ? tp / (tp + fp) : recall - 1;
};
const auto f1_by_hand = [](auto tp, auto fn, auto fp, auto) { return 2 * tp / (2 * tp + fn + fp); };

const Metric kMetrics[] = {Metric::Accuracy, Metric::F1, Metric::FBeta, Metric::GMean, Metric::BalancedAccuracy};
const Index kSizes[] = {1, 2, 3, 7, 8, 9, 17, 64, 1000};

bool needs_both_classes(Metric m) { return m == Metric::GMean || m == Metric::BalancedAccuracy; }

RowMatrix<double> uniform(Index rows, Index cols, double low, double high, unsigned seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<double> u(low, high);
  RowMatrix<double> Z(rows, cols);
  for (Index i = 0; i < Z.size(); ++i) Z.data()[i] = u(rng);
  return Z;
}

// Labels i % classes for multi-class; 1 on every third row for binary (both classes from N = 2).
Labels make_labels(Index n, Index classes) {
  Labels y(n);
  for (Index i = 0; i < n; ++i) y(i) = classes == 2 ? int(i % 3 == 0) : int(i % classes);
  return y;
}

template <class S>
AnyLossOptions<S> options_as(const AnyLossOptions<double>& o) {
  return {o.metric, S(o.amplify), S(o.beta), o.input, S(o.stabilizer)};
}

Eigen::Map<const Eigen::VectorXd> flat(const RowMatrix<double>& M) { return {M.data(), M.size()}; }

// value_and_grad of `loss` (scalar S) against central differences of `reference` (double) at
// the same point; the float gradient is held to a looser tolerance.
template <class S, class Loss, class Reference>
void check_against_fd(const Loss& loss, const Reference& reference, const RowMatrix<double>& Z, const Labels& y) {
  const RowMatrix<S> Zs = Z.cast<S>();
  const RowMatrix<double> point = Zs.template cast<double>();
  RowMatrix<S> dZ(Z.rows(), Z.cols());
  const S value = loss.value_and_grad(Zs, y, dZ);
  const bool is_float = std::is_same_v<S, float>;
  CHECK(double(value) == Approx(reference.value(point, y)).margin(is_float ? 1e-5 : 1e-12));
  CHECK(double(loss.value(Zs, y)) == Approx(double(value)).margin(is_float ? 1e-6 : 1e-14));
  auto f = [&](const Eigen::VectorXd& x) {
    return reference.value(Eigen::Map<const RowMatrix<double>>(x.data(), Z.rows(), Z.cols()), y);
  };
  testing::GradientCheckOptions options;
  options.tolerance = is_float ? 2e-3 : 1e-5;
  // Central differences of a loss of size ~1 carry ~1e-11 of rounding noise at this step.
  options.step = 1e-5;
  options.scale_floor = is_float ? 1e-4 / double(Z.rows()) : 1e-6;
  options.max_coordinates = 64;
  const RowMatrix<double> analytic = dZ.template cast<double>();
  const auto report = testing::check_gradient(f, flat(point), flat(analytic), options);
  INFO(report.summary());
  CHECK(report.ok);
}

// Brute-force soft confusion matrix of binary probabilities, in double.
struct Soft {
  double tp = 0, fn = 0, fp = 0, tn = 0, positives = 0, negatives = 0;
  std::vector<double> a;
};

Soft soft_counts(const Eigen::VectorXd& p, const Labels& y, double L) {
  Soft k;
  for (Index i = 0; i < p.size(); ++i) {
    const double a = 1 / (1 + std::exp(-L * (p(i) - 0.5)));
    k.a.push_back(a);
    (y(i) == 1 ? k.tp : k.fp) += a;
    (y(i) == 1 ? k.fn : k.tn) += 1 - a;
    (y(i) == 1 ? k.positives : k.negatives) += 1;
  }
  return k;
}

Eigen::VectorXd sigmoid(const Eigen::VectorXd& z) { return (1 + (-z.array()).exp()).inverse().matrix(); }

}  // namespace

TEST_CASE("Dual numbers: derivatives of arithmetic and math functions", "[anyloss][dual]") {
  auto f = [](auto x, auto y) {
    using std::exp;
    using std::log;
    using std::max;
    using std::min;
    using std::pow;
    using std::sqrt;
    return x * y / (x + 3) + sqrt(x) - exp(y) / 2 + log(x) * pow(y, 3.0) - 1 / (2 - y) + max(x, y) * min(x, 0.5 * y);
  };
  using D = Dual<double, 2>;
  for (const auto& [x, y] : {std::pair{0.7, 1.3}, std::pair{2.5, -0.4}}) {
    const D r = f(D::variable(x, 0), D::variable(y, 1));
    CHECK(r.value == Approx(f(x, y)).epsilon(1e-15));
    Eigen::Vector2d at(x, y), grad(r.grad[0], r.grad[1]);
    const auto report = testing::check_gradient([&](const Eigen::VectorXd& v) { return f(v(0), v(1)); }, at, grad);
    INFO(report.summary());
    CHECK(report.ok);
  }
  // A zero tangent stays zero where the derivative is infinite.
  const D root = sqrt(D::variable(0, 0) * 0.0 + D(0));
  CHECK(root.grad[0] == 0);
  CHECK(root.grad[1] == 0);
  CHECK(abs(D::variable(-2, 1)).grad[1] == -1);
}

TEMPLATE_TEST_CASE("AnyLoss built-in metrics: gradient matches finite differences", "[anyloss]", float, double) {
  struct Setting {
    double amplify, low, high;
    AnyLossInput input;
  };
  // L = 73 has gradient only near p = 1/2, so its inputs stay near there.
  const Setting settings[] = {{73, -0.4, 0.4, AnyLossInput::Logits},
                              {10, -3, 3, AnyLossInput::Logits},
                              {73, 0.4, 0.6, AnyLossInput::Probabilities},
                              {10, 0.02, 0.98, AnyLossInput::Probabilities}};
  for (const Metric metric : kMetrics) {
    for (const auto& s : settings) {
      for (const Index n : kSizes) {
        if (n == 1 && needs_both_classes(metric)) continue;
        const AnyLossOptions<double> o{.metric = metric, .amplify = s.amplify, .beta = 2, .input = s.input};
        INFO("metric " << int(metric) << ", L " << s.amplify << ", input " << int(s.input) << ", N " << n);
        check_against_fd<TestType>(AnyLoss<TestType>(options_as<TestType>(o)), AnyLoss<double>(o),
                                   uniform(n, 1, s.low, s.high, unsigned(n)), make_labels(n, 2));
      }
    }
  }
}

TEMPLATE_TEST_CASE("AnyLoss user metrics through dual numbers", "[anyloss]", float, double) {
  const AnyLossOptions<double> o{.amplify = 10};
  for (const Index n : {2, 3, 9, 17, 64}) {
    const RowMatrix<double> z = uniform(n, 1, -2, 2, unsigned(n) + 7);
    const Labels y = make_labels(n, 2);
    check_against_fd<TestType>(any_loss<TestType>(mcc, options_as<TestType>(o)), any_loss<double>(mcc, o), z, y);
    check_against_fd<TestType>(any_loss<TestType>(jaccard, options_as<TestType>(o)), any_loss<double>(jaccard, o), z,
                               y);
    check_against_fd<TestType>(any_loss<TestType>(precision_at_recall_floor, options_as<TestType>(o)),
                               any_loss<double>(precision_at_recall_floor, o), z, y);
  }
  const RowMatrix<double> Z = uniform(17, 3, -2, 2, 3);
  check_against_fd<TestType>(any_loss<TestType>(mcc, options_as<TestType>(o)), any_loss<double>(mcc, o), Z,
                             make_labels(17, 3));
}

TEST_CASE("AnyLoss: a user metric equal to a built-in gives the same loss and gradient", "[anyloss]") {
  const RowMatrix<double> z = uniform(64, 1, -1, 1, 11);
  const Labels y = make_labels(64, 2);
  RowMatrix<double> built_in(64, 1), by_hand(64, 1), j(64, 1);
  const double f1 = AnyLoss<double>({.metric = Metric::F1, .amplify = 20}).value_and_grad(z, y, built_in);
  const double user = any_loss<double>(f1_by_hand, {.amplify = 20}).value_and_grad(z, y, by_hand);
  CHECK(user == Approx(f1).epsilon(1e-14));
  CHECK((built_in - by_hand).cwiseAbs().maxCoeff() < 1e-15);
  // Jaccard = F1 / (2 - F1) on the same soft counts.
  const double jac = any_loss<double>(jaccard, {.amplify = 20}).value(z, y);
  CHECK(1 - jac == Approx((1 - f1) / (1 + f1)).epsilon(1e-13));
}

TEST_CASE("AnyLoss matches a brute-force oracle and the closed-form gradients", "[anyloss]") {
  const double L = 15, b = 0.5;
  for (const Index n : {2, 9, 64}) {
    const Eigen::VectorXd p = uniform(n, 1, 0.05, 0.95, unsigned(n));
    const Labels y = make_labels(n, 2);
    const Soft k = soft_counts(p, y, L);
    const double P = k.positives, Nn = k.negatives, N = double(n), S = k.tp + k.fp;
    const double G = std::sqrt(k.tp / P * k.tn / Nn), D = b * b * P + S;
    struct Expected {
      Metric metric;
      double value;
      double (*slope)(double y, double tp, double tn, double P, double Nn, double N, double D, double G, double b);
    };
    const Expected cases[] = {
        {Metric::Accuracy, (k.tp + k.tn) / N, [](double y, double, double, double, double, double N, double, double,
                                                 double) { return (2 * y - 1) / N; }},
        {Metric::FBeta, (1 + b * b) * k.tp / D, [](double y, double tp, double, double, double, double, double D,
                                                   double, double b) { return (1 + b * b) * (y * D - tp) / (D * D); }},
        {Metric::GMean, G, [](double y, double tp, double tn, double P, double Nn, double, double, double G,
                              double) { return (y * tn - (1 - y) * tp) / (2 * G * P * Nn); }},
        // Balanced accuracy's closed form (N (TP + P) - P (S + P)) / (2 P Nn), slope (y/P - (1-y)/Nn)/2.
        {Metric::BalancedAccuracy, (N * (k.tp + P) - P * (S + P)) / (2 * P * Nn),
         [](double y, double, double, double P, double Nn, double, double, double, double) {
           return (y / P - (1 - y) / Nn) / 2;
         }},
    };
    for (const auto& e : cases) {
      INFO("metric " << int(e.metric) << ", N " << n);
      const AnyLoss<double> loss({.metric = e.metric, .amplify = L, .beta = b, .input = AnyLossInput::Probabilities});
      Eigen::VectorXd grad(n);
      CHECK(loss.value_and_grad(p, y, grad) == Approx(1 - e.value).epsilon(1e-13));
      for (Index i = 0; i < n; ++i) {
        const double a = k.a[std::size_t(i)];
        const double expected = -e.slope(y(i), k.tp, k.tn, P, Nn, N, D, G, b) * L * a * (1 - a);
        CHECK(grad(i) == Approx(expected).epsilon(1e-12).margin(1e-300));
      }
    }
    // Logits: the same counts through p = sigmoid(z), and N is the batch's own size.
    const Eigen::VectorXd z = uniform(n, 1, -1, 1, unsigned(n) + 1);
    const Soft kz = soft_counts(sigmoid(z), y, L);
    CHECK(AnyLoss<double>({.metric = Metric::Accuracy, .amplify = L}).value(z, y) ==
          Approx(1 - (kz.tp + kz.tn) / N).epsilon(1e-13));
  }
}

TEMPLATE_TEST_CASE("AnyLoss approaches the hard metric as L grows", "[anyloss]", float, double) {
  // 40 samples, 12 positives, confidently classified (|z| = 8) with 3 false negatives and 5 false positives.
  const Index n = 40;
  Labels y(n);
  Vector<TestType> z(n);
  for (Index i = 0; i < n; ++i) {
    y(i) = i < 12;
    const bool predicted = (i < 9) || (i >= 12 && i < 17);
    z(i) = predicted ? TestType(8) : TestType(-8);
  }
  const double tp = 9, fn = 3, fp = 5, tn = 23;
  for (const Metric metric : kMetrics) {
    const double hard = ConfusionMetric{metric, 2.0}(tp, fn, fp, tn);
    const double soft = AnyLoss<TestType>({.metric = metric, .beta = 2}).value(z, y);
    CHECK(1 - soft == Approx(hard).margin(std::is_same_v<TestType, float> ? 1e-6 : 1e-12));
    // Moderately confident inputs (|z| = 2): the gap shrinks as L grows.
    double previous = INFINITY;
    for (const double L : {5.0, 10.0, 30.0, 73.0}) {
      const double gap =
          std::abs(1 - AnyLoss<TestType>({.metric = metric, .amplify = TestType(L), .beta = 2}).value(z / 4, y) - hard);
      CHECK(gap < previous);
      previous = gap;
    }
    CHECK(previous < 1e-4);
  }
}

TEMPLATE_TEST_CASE("AnyLoss multi-class: gradients, one-vs-rest oracle, C = 2 reduces to binary", "[anyloss]", float,
                   double) {
  SECTION("finite differences") {
    for (const Metric metric : kMetrics) {
      for (const auto& [n, c] : {std::pair<Index, Index>{7, 3}, {17, 3}, {64, 5}, {64, 9}}) {
        INFO("metric " << int(metric) << ", N " << n << ", C " << c);
        const AnyLossOptions<double> o{.metric = metric, .amplify = 10};
        check_against_fd<TestType>(AnyLoss<TestType>(options_as<TestType>(o)), AnyLoss<double>(o),
                                   uniform(n, c, -2, 2, unsigned(n * c)), make_labels(n, c));
      }
    }
  }
  SECTION("macro average of one-vs-rest binary losses") {
    const Index n = 30, c = 4;
    RowMatrix<double> P = uniform(n, c, 0.01, 1, 5);
    P.array().colwise() /= P.rowwise().sum().array();
    const Labels y = make_labels(n, c);
    for (const Metric metric : kMetrics) {
      const AnyLossOptions<double> o{.metric = metric, .amplify = 12, .input = AnyLossInput::Probabilities};
      RowMatrix<double> dP(n, c);
      const double multi = AnyLoss<double>(o).value_and_grad(P, y, dP);
      double sum = 0;
      for (Index k = 0; k < c; ++k) {
        const Labels one_vs_rest = (y.array() == int(k)).cast<int>();
        Eigen::VectorXd g(n);
        sum += AnyLoss<double>(o).value_and_grad(P.col(k), one_vs_rest, g);
        CHECK((dP.col(k) - g / double(c)).cwiseAbs().maxCoeff() < 1e-14);
      }
      CHECK(multi == Approx(sum / double(c)).epsilon(1e-13));
    }
  }
  SECTION("C = 2") {
    const Index n = 33;
    const RowMatrix<double> z = uniform(n, 1, -1, 1, 9);
    RowMatrix<TestType> Z2(n, 2);
    Z2.col(0).setZero();
    Z2.col(1) = z.cast<TestType>();
    const Labels y = make_labels(n, 2);
    const double tol = std::is_same_v<TestType, float> ? 1e-5 : 1e-12;
    for (const Metric metric : {Metric::Accuracy, Metric::GMean, Metric::BalancedAccuracy}) {
      const AnyLoss<TestType> loss({.metric = metric, .amplify = 20});
      RowMatrix<TestType> d2(n, 2), d1(n, 1);
      const double multi = loss.value_and_grad(Z2, y, d2);
      CHECK(multi == Approx(double(loss.value_and_grad(Z2.col(1), y, d1))).margin(tol));
      CHECK((d2.col(1) - d1).cwiseAbs().maxCoeff() < tol);
      CHECK((d2.col(0) + d1).cwiseAbs().maxCoeff() < tol);
    }
    // F1 is not symmetric in the classes: macro-F1 averages the F1 of both.
    const AnyLoss<TestType> f1({.metric = Metric::F1, .amplify = 20});
    const Labels flipped = 1 - y.array();
    const double both = (f1.value(Z2.col(1), y) + f1.value(-Z2.col(1), flipped)) / 2;
    CHECK(double(f1.value(Z2, y)) == Approx(both).margin(tol));
  }
}

// Scalar-loop oracle of (macro) F1 AnyLoss in double: binary for one column, else softmax rows
// and one-vs-rest classes. Returns the loss and writes the gradient.
double f1_oracle(const RowMatrix<double>& Z, const Labels& y, double L, bool logits, RowMatrix<double>& grad) {
  const Index n = Z.rows(), cols = Z.cols(), classes = cols == 1 ? 1 : cols;
  RowMatrix<double> P(n, cols), A(n, cols);
  for (Index i = 0; i < n; ++i) {
    double max = -INFINITY, sum = 0;
    for (Index c = 0; c < cols; ++c) max = std::max(max, Z(i, c));
    for (Index c = 0; c < cols; ++c) sum += std::exp(Z(i, c) - max);
    for (Index c = 0; c < cols; ++c) {
      P(i, c) = !logits ? Z(i, c) : cols == 1 ? 1 / (1 + std::exp(-Z(i, c))) : std::exp(Z(i, c) - max) / sum;
      A(i, c) = 1 / (1 + std::exp(-L * (P(i, c) - 0.5)));
    }
  }
  double loss = 0;
  for (Index c = 0; c < classes; ++c) {
    double tp = 0, fn = 0, fp = 0;
    for (Index i = 0; i < n; ++i) {
      const bool positive = cols == 1 ? y(i) == 1 : y(i) == int(c);
      (positive ? tp : fp) += A(i, c);
      if (positive) fn += 1 - A(i, c);
    }
    const double d = 2 * tp + fn + fp, m_tp = 2 * (fn + fp) / (d * d), m_fn = -2 * tp / (d * d);
    loss += 1 - 2 * tp / d;
    for (Index i = 0; i < n; ++i) {  // dloss/dp; M_FP = M_FN, M_TN = 0
      const bool positive = cols == 1 ? y(i) == 1 : y(i) == int(c);
      grad(i, c) = -(positive ? m_tp - m_fn : m_fn) / double(classes) * L * A(i, c) * (1 - A(i, c));
    }
  }
  if (!logits) return loss / double(classes);
  for (Index i = 0; i < n; ++i) {
    if (cols == 1) {
      grad(i, 0) *= P(i, 0) * (1 - P(i, 0));
      continue;
    }
    double dot = 0;
    for (Index c = 0; c < cols; ++c) dot += P(i, c) * grad(i, c);
    for (Index c = 0; c < cols; ++c) grad(i, c) = P(i, c) * (grad(i, c) - dot);
  }
  return loss / double(classes);
}

TEMPLATE_TEST_CASE("AnyLoss kernel matches a scalar-loop oracle across packet and block boundaries", "[anyloss]",
                   float, double) {
  using S = TestType;
  const double tol = std::is_same_v<S, float> ? 2e-5 : 1e-11;
  const double L = 20;
  // Binary: packets of 8 or 16, a partial last packet, and blocks of 256 entries; multi-class:
  // panels of 8 or 16 rows (whole, partial, the last one read through a copy), blocks of
  // panels, C below, at and above the packet width (partial transposed tiles), C above a block.
  const std::pair<Index, Index> shapes[] = {
      {1, 1}, {7, 1}, {15, 1}, {16, 1}, {17, 1}, {31, 1}, {33, 1}, {255, 1}, {256, 1}, {257, 1}, {513, 1},
      {1000, 1}, {1001, 1},
      {1, 2}, {17, 2}, {85, 3}, {86, 3}, {171, 3}, {1001, 3}, {33, 5}, {40, 7},
      {16, 16}, {37, 16}, {17, 15}, {19, 17}, {9, 33}, {1, 300}, {3, 300}};
  for (const auto& [n, c] : shapes) {
    for (const bool logits : {true, false}) {
      INFO("N " << n << ", C " << c << (logits ? ", logits" : ", probabilities"));
      RowMatrix<double> Z = uniform(n, c, -3, 3, unsigned(n * c));
      if (!logits) Z = c == 1 ? uniform(n, 1, 0, 1, 3) : RowMatrix<double>((Z.array().exp().colwise() /
                                                                          Z.array().exp().rowwise().sum()).matrix());
      // Labels: 1 on every third row (binary), i % C (multi-class).
      const Labels y = make_labels(n, c == 1 ? 2 : c);
      const RowMatrix<S> Zs = Z.cast<S>();
      RowMatrix<double> expected(n, c);
      const double value = f1_oracle(Zs.template cast<double>(), y, L, logits, expected);
      const AnyLoss<S> loss({.metric = Metric::F1, .amplify = S(L),
                             .input = logits ? AnyLossInput::Logits : AnyLossInput::Probabilities});
      // The inputs and the gradient as blocks of wider matrices too (strided rows).
      RowMatrix<S> wide_z = RowMatrix<S>::Constant(n, c + 3, S(0.25)), wide_grad(n, c + 3), grad(n, c);
      wide_z.leftCols(c) = Zs;
      CHECK(double(loss.value_and_grad(Zs, y, grad)) == Approx(value).margin(tol));
      CHECK(double(loss.value_and_grad(wide_z.leftCols(c), y, wide_grad.leftCols(c))) == Approx(value).margin(tol));
      const double scale = expected.cwiseAbs().maxCoeff() * (std::is_same_v<S, float> ? 10 : 1);
      CHECK((grad.template cast<double>() - expected).cwiseAbs().maxCoeff() < tol * scale);
      CHECK((wide_grad.leftCols(c).template cast<double>() - expected).cwiseAbs().maxCoeff() < tol * scale);
    }
  }
}

// Binary pass 1 on n copies of one input, all positive or all negative: the counts are n a and
// n (1 - a) exactly (17 equal terms in float lanes and in double need no rounding).
template <class S>
detail::SoftCounts copies_pass(S input, int label, Index n, bool logits, S L, std::vector<S>& weight) {
  const std::vector<S> z(n, input);
  const std::vector<int> y(n, label);
  weight.assign(n, S(0));
  detail::BinaryInputs seen;
  return logits ? detail::binary_pass<true>(z.data(), y.data(), n, L, weight.data(), seen)
                : detail::binary_pass<false>(z.data(), y.data(), n, L, weight.data(), seen);
}

TEMPLATE_TEST_CASE("AnyLoss binary kernel: a, 1 - a and da/dz within the stated bound of long double", "[anyloss]",
                   float, double) {
  using S = TestType;
  using R = long double;
  // The bound stated in anyloss.hpp for the AVX-512 float kernel, in units of the scalar's
  // epsilon/2 (2^-24 in float): relative error (8 + L + 4 |x|) for a and 1 - a, x = L (p - 1/2),
  // and (16 + L + 4 |x|) for da/dz, wherever the exact values are normal numbers (p, rounded,
  // makes x uncertain by ~L 2^-25, whatever its size). The generic kernel (double, other
  // instruction sets) keeps it too.
  const R unit = R(std::numeric_limits<S>::epsilon()) / 2;
  const Index n = 17;
  std::vector<S> inputs;
  for (int k = -400; k <= 400; ++k) inputs.push_back(S(k) / 20);  // |z| <= 20: 1 - a down to e^-L/2
  for (const S z : {S(1e-30), S(-1e-30), S(0), S(-0.0), S(1e-7), S(30), S(-30), S(88), S(-88), S(1e4), S(-1e4),
                    std::numeric_limits<S>::infinity(), -std::numeric_limits<S>::infinity()})
    inputs.push_back(z);
  std::vector<S> probabilities;
  for (int k = 0; k <= 1000; ++k) probabilities.push_back(S(k) / 1000);
  for (const S p : {S(1e-30), S(1e-7), S(0.5) - std::numeric_limits<S>::epsilon() / 4,
                    S(0.5) + std::numeric_limits<S>::epsilon() / 2, S(1) - std::numeric_limits<S>::epsilon() / 2})
    probabilities.push_back(p);
  for (const bool logits : {true, false}) {
    for (const S L : {S(1), S(10), S(73)}) {
      R worst = 0;  // the largest error over its bound, for the report
      for (const S input : logits ? inputs : probabilities) {
        const R p = logits ? 1 / (1 + std::exp(-R(input))) : R(input);
        const R one_minus_p = logits ? 1 / (1 + std::exp(R(input))) : 1 - R(input);
        const R x = R(L) * (p - R(0.5));
        const R a = 1 / (1 + std::exp(-x)), not_a = 1 / (1 + std::exp(x));
        const R slope = R(L) * a * not_a * (logits ? p * one_minus_p : 1);
        const R bound = (8 + R(L) + 4 * std::fabs(x)) * unit, slope_bound = (16 + R(L) + 4 * std::fabs(x)) * unit;
        std::vector<S> weight;
        const auto positive = copies_pass<S>(input, 1, n, logits, L, weight);
        INFO((logits ? "z = " : "p = ") << double(input) << ", L = " << double(L));
        CHECK(positive.positives == n);
        const R got_a = R(positive.tp) / n, got_not_a = R(positive.fn) / n;
        CHECK(std::fabs(got_a - a) <= bound * a);
        CHECK(std::fabs(got_not_a - not_a) <= bound * not_a);
        worst = std::max({worst, std::fabs(got_a - a) / bound / a, std::fabs(got_not_a - not_a) / bound / not_a});
        R weight_error = 0;  // over the bound; a slope below the normal range may underflow to 0
        for (const S w : weight) {
          weight_error = std::max(weight_error, slope >= R(std::numeric_limits<S>::min())
                                                    ? std::fabs(R(w) - slope) / (slope_bound * slope)
                                                    : R(w) / (2 * R(std::numeric_limits<S>::min())));
        }
        CHECK(weight_error <= 1);
        worst = std::max(worst, weight_error);
        const auto negative = copies_pass<S>(input, 0, n, logits, L, weight);
        CHECK(negative.negatives == n);
        CHECK(R(negative.fp) / n == got_a);
        CHECK(R(negative.tn) / n == got_not_a);
        CHECK(std::all_of(weight.begin(), weight.end(), [](S w) { return std::signbit(w); }));
      }
      WARN((logits ? "logits" : "probabilities") << ", L = " << double(L) << ": largest error / bound " << double(worst));
    }
  }
}

#ifdef EIGEN_VECTORIZE_AVX512
TEST_CASE("AnyLoss: the base-2 exp of the AVX-512 float kernel", "[anyloss]") {
  // Relative error below 3 x 2^-24 (stated in anyloss.hpp) wherever 2^t is a normal float;
  // below that, denormals or 0; NaN stays NaN.
  double worst = 0;
  for (int k = 0; k <= 200000; ++k) {
    alignas(64) float t[16], got[16];
    for (int j = 0; j < 16; ++j) t[j] = -float(k * 16 + j) * (126.0f / 3200016.0f);  // [-126, 0]
    _mm512_store_ps(got, detail::pexp2_nonpositive(_mm512_load_ps(t)));
    for (int j = 0; j < 16; ++j) {
      const double exact = std::exp2(double(t[j]));
      worst = std::max(worst, std::fabs(double(got[j]) - exact) / exact);
    }
  }
  CHECK(worst <= 3 * std::ldexp(1.0, -24));
  alignas(64) float t[16] = {-126.5f, -140.0f, -149.0f, -150.5f, -200.0f, -1e30f, -0.0f, 0.0f,
                             std::numeric_limits<float>::quiet_NaN(), -1e-30f, -0.5f, 0.5f, -1.5f, -2.5f, -3.0f, -64.0f};
  alignas(64) float got[16];
  _mm512_store_ps(got, detail::pexp2_nonpositive(_mm512_load_ps(t)));
  CHECK(got[0] == Approx(std::exp2(-126.5)).epsilon(1e-6));
  CHECK(got[1] == Approx(std::exp2(-140.0)).epsilon(1e-3));  // a denormal
  CHECK(got[2] == std::exp2f(-149.0f));
  CHECK(got[3] == 0);
  CHECK(got[4] == 0);
  CHECK(got[5] == 0);
  CHECK(got[6] == 1);
  CHECK(got[7] == 1);
  CHECK(std::isnan(got[8]));
  CHECK(got[9] == 1);
  for (int j = 10; j < 16; ++j) CHECK(got[j] == Approx(std::exp2(double(t[j]))).epsilon(3e-7));
}
#endif

TEMPLATE_TEST_CASE("AnyLoss binary kernel: one-class blocks and the padding of the last one", "[anyloss]", float,
                   double) {
  using S = TestType;
  using R = long double;
  const S L = 20;
  for (const Index n : {1, 15, 16, 17, 255, 256, 257, 300, 513, 600}) {
    for (const int pattern : {0, 1, 2, 3}) {  // first block positive, first block negative, all positive, all negative
      for (const bool logits : {true, false}) {
        INFO("N " << n << ", pattern " << pattern << (logits ? ", logits" : ", probabilities"));
        const Eigen::VectorXd draw = uniform(n, 1, logits ? -3 : 0, logits ? 3 : 1, unsigned(n + pattern)).col(0);
        std::vector<S> z(n), weight(n);
        std::vector<int> y(n);
        R tp = 0, fn = 0, fp = 0, tn = 0;
        Index positives = 0;
        for (Index i = 0; i < n; ++i) {
          z[i] = S(draw(i));
          y[i] = pattern == 2 || (pattern == 0 && i < 256) || (pattern == 1 && i >= 256);
          const R p = logits ? 1 / (1 + std::exp(-R(z[i]))) : R(z[i]), x = R(L) * (p - R(0.5));
          const R a = 1 / (1 + std::exp(-x)), not_a = 1 / (1 + std::exp(x));
          (y[i] ? tp : fp) += a;
          (y[i] ? fn : tn) += not_a;
          positives += y[i];
        }
        detail::BinaryInputs seen;
        const auto k = logits ? detail::binary_pass<true>(z.data(), y.data(), n, L, weight.data(), seen)
                              : detail::binary_pass<false>(z.data(), y.data(), n, L, weight.data(), seen);
        CHECK(k.positives == positives);
        CHECK(k.negatives == n - positives);
        CHECK(seen.largest_label == unsigned(positives > 0));
        CHECK_FALSE(seen.outside_unit);
        // Float lanes sum ~16 terms per block before double takes over.
        const R tol = std::is_same_v<S, float> ? 1e-5L : 1e-13L;
        CHECK(std::fabs(R(k.tp) - tp) <= tol * tp);
        CHECK(std::fabs(R(k.fn) - fn) <= tol * fn);
        CHECK(std::fabs(R(k.fp) - fp) <= tol * fp);
        CHECK(std::fabs(R(k.tn) - tn) <= tol * tn);
        for (Index i = 0; i < n; ++i) {
          if (std::signbit(weight[i]) != (y[i] == 0)) FAIL_CHECK("weight " << i << " has the wrong sign");
        }
      }
    }
  }
}

TEMPLATE_TEST_CASE("AnyLoss is stable at extreme logits", "[anyloss]", float, double) {
  using S = TestType;
  const Index n = 9;
  const Labels y = make_labels(n, 2);
  Vector<S> z(n);
  for (Index i = 0; i < n; ++i) z(i) = (i % 2 == 0) ? S(1e4) : S(-1e4);
  for (const Metric metric : kMetrics) {
    const AnyLoss<S> loss({.metric = metric});
    Vector<S> grad(n);
    const S value = loss.value_and_grad(z, y, grad);
    // Hard counts: positives at 0, 3, 6 (predicted 1, 0, 1); predicted positive at even i.
    const double hard = ConfusionMetric{metric}(2.0, 1.0, 3.0, 3.0);
    CHECK(double(value) == Approx(1 - hard).margin(1e-6));
    CHECK(grad.allFinite());
  }
  RowMatrix<S> Z(n, 3);
  for (Index i = 0; i < Z.size(); ++i) Z.data()[i] = S(i % 4 == 0 ? 1e4 : -1e4);
  RowMatrix<S> dZ(n, 3);
  const S value = AnyLoss<S>({.metric = Metric::BalancedAccuracy}).value_and_grad(Z, make_labels(n, 3), dZ);
  CHECK(std::isfinite(value));
  CHECK(dZ.allFinite());
}

TEMPLATE_TEST_CASE("AnyLoss at infinite logits is exact: the loss of probabilities 0 and 1", "[anyloss]", float,
                   double) {
  using S = TestType;
  const S inf = std::numeric_limits<S>::infinity();
  const S extremes[] = {inf, -inf, S(1e4), S(-1e4), S(200), S(-200)};
  for (const Index n : {1, 7, 15, 16, 17, 31, 33, 1000, 1001}) {
    Vector<S> z(n), p(n);
    for (Index i = 0; i < n; ++i) {
      z(i) = extremes[(i * 7 + i / 3) % 6];
      p(i) = z(i) > 0 ? S(1) : S(0);
    }
    const Labels y = make_labels(n, 2);
    const Soft k = soft_counts(p.template cast<double>(), y, 73);
    for (const Metric metric : kMetrics) {
      if (needs_both_classes(metric) && (k.positives == 0 || k.negatives == 0)) continue;
      INFO("metric " << int(metric) << ", N " << n);
      Vector<S> grad(n), probability_grad(n);
      const S value = AnyLoss<S>({.metric = metric}).value_and_grad(z, y, grad);
      const S exact = AnyLoss<S>({.metric = metric, .input = AnyLossInput::Probabilities}).value(p, y);
      CHECK(value == exact);  // a = A(sigmoid(+-inf)) = A(1) or A(0) to the last bit
      CHECK(double(value) == Approx(1 - ConfusionMetric{metric}(k.tp, k.fn, k.fp, k.tn)).margin(1e-6));
      // The chain factor p (1 - p) vanishes: 0 in float; in double ~1e-87 at |z| = 200 and ~1e-309
      // at |z| = 1e4 or inf, where Eigen's double exp underflows to 2^-1024, not to 0.
      CHECK(grad.template cast<double>().cwiseAbs().maxCoeff() <= (std::is_same_v<S, float> ? 0 : 1e-80));
    }
    // Multi-class: a logit of -inf is a probability of 0 as a logit of -1e4 is (exp underflows).
    RowMatrix<S> Z = uniform(n, 3, -2, 2, unsigned(n)).cast<S>(), far = Z, dZ(n, 3);
    for (Index i = 0; i < n; i += 2) {
      Z(i, i % 3) = -inf;
      far(i, i % 3) = S(-1e4);
    }
    const AnyLoss<S> loss({.metric = Metric::F1, .amplify = 10});
    CHECK(loss.value_and_grad(Z, make_labels(n, 3), dZ) == loss.value(far, make_labels(n, 3)));
    CHECK(dZ.allFinite());
  }
}

TEMPLATE_TEST_CASE("AnyLoss sums 1 - a as such: a tiny TN stays exact", "[anyloss]", float, double) {
  using S = TestType;
  // All samples confidently positive: 1 - a = e / (1 + e), e = exp(-L/2) ~ 1e-16 for L = 73, on
  // every negative; log(TN) would be -inf if 1 - a were formed by a subtraction.
  const auto log_tn = [](auto, auto, auto, auto tn) {
    using std::log;
    return log(tn);
  };
  const double e = std::exp(-73.0 / 2), tiny = e / (1 + e);
  for (const Index n : {7, 17, 1001}) {
    const Labels y = make_labels(n, 2);
    const double negatives = double((y.array() == 0).count());
    INFO("N " << n);
    const Vector<S> z = Vector<S>::Constant(n, S(1e4));
    Vector<S> grad(n);
    const double value = any_loss<S>(log_tn).value_and_grad(z, y, grad);
    CHECK(value == Approx(1 - std::log(negatives * tiny)).epsilon(std::is_same_v<S, float> ? 1e-6 : 1e-13));
    CHECK(grad.allFinite());
    // Multi-class: every row predicted class 0, so class 0's TN is tiny and the others' are not.
    const Index classes = 3;
    RowMatrix<S> Z = RowMatrix<S>::Constant(n, classes, S(-1e4));
    Z.col(0).setConstant(S(1e4));
    const Labels yc = make_labels(n, classes);
    double expected = 0;
    for (Index c = 0; c < classes; ++c) {
      const double others = double((yc.array() != int(c)).count());
      expected += std::log(others * (c == 0 ? tiny : 1 - tiny)) / double(classes);
    }
    RowMatrix<S> dZ(n, classes);
    CHECK(double(any_loss<S>(log_tn).value_and_grad(Z, yc, dZ)) ==
          Approx(1 - expected).epsilon(std::is_same_v<S, float> ? 1e-6 : 1e-13));
    CHECK(dZ.allFinite());
  }
}

TEMPLATE_TEST_CASE("AnyLoss propagates NaN from any position to the loss and every gradient entry", "[anyloss]",
                   float, double) {
  using S = TestType;
  const S nan = std::numeric_limits<S>::quiet_NaN();
  for (const Index n : {1, 17, 33, 1001}) {
    for (const Index at : {Index(0), n / 2, n - 1}) {
      for (const bool logits : {true, false}) {
        INFO("N " << n << ", NaN at " << at << (logits ? ", logits" : ", probabilities"));
        const AnyLoss<S> loss({.input = logits ? AnyLossInput::Logits : AnyLossInput::Probabilities});
        Vector<S> z = uniform(n, 1, logits ? -2 : 0, logits ? 2 : 1, unsigned(n)).col(0).cast<S>(), grad(n);
        z(at) = nan;
        const Labels y = make_labels(n, 2);
        CHECK(std::isnan(loss.value_and_grad(z, y, grad)));
        CHECK(grad.array().isNaN().all());
        CHECK(std::isnan(loss.value(z, y)));
      }
    }
    RowMatrix<S> Z = uniform(n, 3, -2, 2, unsigned(n)).cast<S>(), dZ(n, 3);
    Z(n - 1, 1) = nan;
    CHECK(std::isnan(AnyLoss<S>().value_and_grad(Z, make_labels(n, 3), dZ)));
    CHECK(dZ.array().isNaN().all());
  }
}

TEST_CASE("AnyLoss composes with models and other losses", "[anyloss]") {
  static_assert(PredictionLoss<AnyLoss<float>>);
  static_assert(PredictionLoss<AnyLoss<double>>);
  static_assert(PredictionLoss<AnyLoss<double, decltype(mcc)>>);
  const RowMatrix<double> Z = uniform(20, 1, -1, 1, 2);
  const Eigen::VectorXd z = Z.col(0);
  const Labels y = make_labels(20, 2);
  const AnyLoss<double> f1({.metric = Metric::F1, .amplify = 20});
  const AnyLoss<double> gmean({.metric = Metric::GMean, .amplify = 20});
  RowMatrix<double> dZ(20, 1);
  Eigen::VectorXd dz(20);
  CHECK(f1.value_and_grad(Z, y, dZ) == f1.value_and_grad(z, y, dz));  // N x 1 and N-vector alike
  CHECK(dZ.col(0) == dz);
  CHECK(f1.value(2.0 * z, y) == f1.value(Eigen::VectorXd(2.0 * z), y));  // expressions work
  // An N x 1 block of a wider row-major matrix is strided, as input and as gradient.
  RowMatrix<double> wide = uniform(20, 3, -1, 1, 8), dwide = RowMatrix<double>::Zero(20, 3);
  wide.col(1) = z;
  CHECK(f1.value_and_grad(wide.block(0, 1, 20, 1), y, dwide.block(0, 1, 20, 1)) == f1.value(z, y));
  CHECK(dwide.col(1) == dz);
  CHECK(dwide.col(0).isZero());

  const auto mix = 0.25 * f1 + 0.75 * gmean;
  RowMatrix<double> dmix(20, 1), dg(20, 1);
  const double expected = 0.25 * f1.value_and_grad(Z, y, dZ) + 0.75 * gmean.value_and_grad(Z, y, dg);
  CHECK(mix.value_and_grad(Z, y, dmix) == Approx(expected).epsilon(1e-14));
  CHECK((dmix - 0.25 * dZ - 0.75 * dg).cwiseAbs().maxCoeff() < 1e-15);
}

TEST_CASE("AnyLoss rejects bad input with gradus::invalid_argument", "[anyloss]") {
  const AnyLoss<double> loss;
  const Eigen::VectorXd z = uniform(6, 1, -1, 1, 4);
  Labels y = make_labels(6, 2);
  Eigen::VectorXd g(6);
  auto throws_naming = [](auto&& call, const std::string& what) {
    try {
      call();
      FAIL("no throw");
    } catch (const gradus::invalid_argument& e) {
      INFO(e.what());
      CHECK(std::string(e.what()).find(what) != std::string::npos);
    }
  };

  SECTION("hyperparameters") {
    for (const double L : {0.0, -1.0, double(NAN), double(INFINITY)})
      throws_naming([&] { AnyLoss<double>({.amplify = L}); }, "'options.amplify'");
    for (const double b : {0.0, -2.0, double(NAN)})
      throws_naming([&] { AnyLoss<double>({.beta = b}); }, "'options.beta'");
    for (const double s : {-1e-5, double(NAN)})
      throws_naming([&] { AnyLoss<double>({.stabilizer = s}); }, "'options.stabilizer'");
    throws_naming([&] { any_loss<float>(mcc, {.amplify = -3}); }, "'options.amplify'");
  }
  SECTION("shapes and labels") {
    throws_naming([&] { loss.value(Eigen::VectorXd(0), Labels(0)); }, "'Z (logits)'");
    throws_naming([&] { loss.value(RowMatrix<double>(3, 0), Labels(3)); }, "columns");
    throws_naming([&] { loss.value(z, Labels(5)); }, "'labels': expected 6 entries");
    Eigen::VectorXd short_grad(5);
    throws_naming([&] { loss.value_and_grad(z, y, short_grad); }, "'dZ'");
    RowMatrix<double> wide(6, 2);
    throws_naming([&] { loss.value_and_grad(z, y, wide); }, "'dZ'");
    y(2) = 2;
    throws_naming([&] { loss.value(z, y); }, "labels in [0, 2), got 2 at index 2");
    y(2) = -1;
    throws_naming([&] { loss.value(z, y); }, "got -1 at index 2");
    throws_naming([&] { loss.value(uniform(6, 3, -1, 1, 1), make_labels(6, 4)); }, "labels in [0, 3), got 3");
    const AnyLoss<double> probabilities({.input = AnyLossInput::Probabilities});
    throws_naming([&] { probabilities.value(Eigen::VectorXd::Constant(6, 1.5), make_labels(6, 2)); },
                  "'Z (probabilities)': expected probabilities in [0, 1], got 1.5");
  }
  SECTION("binary labels and probabilities are checked in the kernel's pass, anywhere, labels first") {
    for (const Index n : {1, 17, 256, 257, 1001}) {
      const Eigen::VectorXf p = uniform(n, 1, 0, 1, unsigned(n)).col(0).cast<float>();
      for (const Index at : {Index(0), n / 2, n - 1}) {
        INFO("N " << n << ", at " << at);
        Labels labels = make_labels(n, 2);
        Eigen::VectorXf bad = p, grad(n);
        bad(at) = -0.25f;
        const AnyLoss<float> on_logits, on_probabilities({.input = AnyLossInput::Probabilities});
        throws_naming([&] { on_probabilities.value_and_grad(bad, labels, grad); },
                      "got -0.25 at row " + std::to_string(at));
        labels(at) = at == 0 ? 7 : -3;
        const std::string label = "got " + std::to_string(labels(at)) + " at index " + std::to_string(at);
        throws_naming([&] { on_logits.value_and_grad(p, labels, grad); }, label);
        throws_naming([&] { on_probabilities.value(bad, labels); }, label);
      }
    }
  }
  SECTION("a one-class batch where the metric is undefined, and the opt-in stabilizer") {
    for (const Metric metric : {Metric::GMean, Metric::BalancedAccuracy}) {
      for (const int label : {0, 1}) {
        const Labels one_class = Labels::Constant(6, label);
        throws_naming([&] { AnyLoss<double>({.metric = metric}).value(z, one_class); }, "options.stabilizer");
        const AnyLossOptions<double> o{.metric = metric, .amplify = 10, .stabilizer = 1e-5};
        check_against_fd<double>(AnyLoss<double>(o), AnyLoss<double>(o), z, one_class);
        check_against_fd<float>(AnyLoss<float>(options_as<float>(o)), AnyLoss<double>(o), z, one_class);
      }
      // Multi-class: class 2 absent from the batch.
      throws_naming([&] { AnyLoss<double>({.metric = metric}).value(uniform(6, 3, -1, 1, 2), make_labels(6, 2)); },
                    "class 2: TP=0");
    }
    throws_naming([&] { any_loss<double>(mcc).value(z, Labels::Zero(6)); }, "'labels'");
    // F1 without positives is defined: F1 = 0, constant.
    const AnyLoss<double> f1({.metric = Metric::F1});
    CHECK(f1.value_and_grad(z, Labels::Zero(6), g) == 1);
    CHECK(g.isZero());
  }
  SECTION("non-finite inputs propagate as NaN") {
    Eigen::VectorXd bad = z;
    bad(3) = NAN;
    CHECK(std::isnan(loss.value_and_grad(bad, y, g)));
    CHECK(g.array().isNaN().any());
    bad(3) = INFINITY;
    CHECK(std::isfinite(loss.value_and_grad(bad, y, g)));
    CHECK(g.allFinite());
  }
}

namespace {

template <class S>
S largest_amplify() {
  return std::numeric_limits<S>::max() / 2;
}

}  // namespace

TEMPLATE_TEST_CASE("AnyLoss amplify at the edges of (0, max/2]", "[anyloss]", float, double) {
  using S = TestType;
  using limits = std::numeric_limits<S>;
  // amplify = max(S) made 2 L overflow: a NaN gradient beside a finite value.
  const Index n = 9;
  Vector<S> z(n);
  z << -2, -1, 0, 1, 2, -0.5, 0.5, 0, 3;
  const Labels y = make_labels(n, 2);
  RowMatrix<S> Z(n, 3);
  for (Index i = 0; i < Z.size(); ++i) Z.data()[i] = S(i % 5) - 2;
  for (const Metric metric : kMetrics) {
    INFO("metric " << int(metric));
    for (const bool logits : {true, false}) {
      const AnyLossOptions<S> o{.metric = metric,
                                .amplify = largest_amplify<S>(),
                                .input = logits ? AnyLossInput::Logits : AnyLossInput::Probabilities};
      const Vector<S> input = logits ? z : Vector<S>(sigmoid(z.template cast<double>()).template cast<S>());
      Vector<S> grad(n);
      const S value = AnyLoss<S>(o).value_and_grad(input, y, grad);
      // At this L, A is a step: a = 1 above p = 1/2, 0 below, 1/2 at z = 0 (rows 2 and 7).
      const Soft k = soft_counts(sigmoid(z.template cast<double>()), y, double(o.amplify));
      CHECK(double(value) == Approx(1 - ConfusionMetric{metric}(k.tp, k.fn, k.fp, k.tn)).margin(1e-6));
      CHECK(grad.allFinite());
      RowMatrix<S> dZ(n, 3);
      const RowMatrix<S> P =
          logits ? Z : RowMatrix<S>((Z.array().exp().colwise() / Z.array().exp().rowwise().sum()).matrix());
      CHECK(std::isfinite(AnyLoss<S>(o).value_and_grad(P, make_labels(n, 3), dZ)));
      CHECK(dZ.allFinite());
    }
  }
  // The smallest L: a = 1/2 everywhere, the loss of half counts, a gradient of (almost) 0.
  Vector<S> grad(n);
  const S value = AnyLoss<S>({.metric = Metric::Accuracy, .amplify = limits::denorm_min()}).value_and_grad(z, y, grad);
  CHECK(value == Approx(0.5));
  CHECK(grad.allFinite());
  for (const S L : {std::nextafter(largest_amplify<S>(), limits::infinity()), limits::max(), limits::infinity(), S(0),
                    S(-0.0), limits::quiet_NaN()}) {
    INFO("L " << double(L));
    CHECK_THROWS_AS(AnyLoss<S>({.amplify = L}), gradus::invalid_argument);
    CHECK_THROWS_AS(any_loss<S>(mcc, {.amplify = L}), gradus::invalid_argument);
  }
}

TEST_CASE("AnyLoss multi-class compares class indices exactly, also beyond 2^24 in float", "[anyloss]") {
  // As floats, 16777217 and 16777216 are one number: such classes collided.
  constexpr Index kSize = detail::kPacketSize<float>;
  Labels labels(kSize + 1);
  for (Index i = 0; i < labels.size(); ++i) labels(i) = 16777216 + int(i % 3);
  for (const Index q : {Index(0), Index(1)}) {
    const auto y = detail::panel_labels<float>(labels, q);
    for (const int c : {16777216, 16777217, 16777218, -1}) {
      alignas(64) float mask[kSize];
      Eigen::internal::pstore(mask, detail::lanes_of_class<float>(y, c));
      for (Index j = 0; j < kSize; ++j) {
        const Index row = q * kSize + j;
        const bool expected = row < labels.size() ? labels(row) == c : c == -1;  // -1: the padding
        CHECK(std::isnan(mask[j]) == expected);  // all bits set: a NaN
      }
    }
  }
}

TEMPLATE_TEST_CASE("AnyLoss: infinite partials at a saturated class give a zero gradient, not an error",
                   "[anyloss]", float, double) {
  using S = TestType;
  // L large enough that A(0) = exp(-L/2) underflows to 0: every positive at p = 0 makes TP = 0
  // exactly, where G-mean's sqrt has an infinite partial. This used to throw (as if the metric
  // were undefined) although the value is 1 and every chain factor of the positives is 0.
  const S L = std::is_same_v<S, float> ? S(300) : S(1600);
  const Index n = 17;
  const Labels y = make_labels(n, 2);
  Vector<S> p(n), grad(n);
  for (Index i = 0; i < n; ++i) p(i) = y(i) == 1 ? S(0) : S(0.25) + S(i) / 64;
  const AnyLoss<S> gmean({.metric = Metric::GMean, .amplify = L, .input = AnyLossInput::Probabilities});
  CHECK(gmean.value_and_grad(p, y, grad) == 1);
  CHECK(grad.allFinite());
  CHECK(grad.isZero(0));  // positives: zero chain factors; negatives: TP = 0 makes dG/dTN = 0
  // The same through logits and with the stabilizer.
  const Vector<S> z = p.unaryExpr([](S v) { return v == 0 ? S(-1e4) : S(0); });
  CHECK(AnyLoss<S>({.metric = Metric::GMean, .amplify = L, .stabilizer = S(1e-5)}).value_and_grad(z, y, grad) == 1);
  CHECK(grad.allFinite());
  // A user metric with sqrt at FN = 0: every positive at p = 1 (1 - a underflows to 0).
  const auto miss_root = [](auto tp, auto fn, auto fp, auto tn) { return (tn / (tn + fp)) * (1 - sqrt(fn / (tp + fn))); };
  Vector<S> q = p;
  for (Index i = 0; i < n; ++i) q(i) = y(i) == 1 ? S(1) : p(i);
  const auto user = any_loss<S>(miss_root, {.amplify = L, .input = AnyLossInput::Probabilities});
  const S value = user.value_and_grad(q, y, grad);
  CHECK(std::isfinite(value));
  CHECK(grad.allFinite());
  for (Index i = 0; i < n; ++i)
    if (y(i) == 1) CHECK(grad(i) == 0);
  // Multi-class: class 1's positives all at p = 0.
  const Index c = 3;
  const Labels yc = make_labels(n, c);
  RowMatrix<S> P(n, c), dP(n, c);
  for (Index i = 0; i < n; ++i) {
    P.row(i) << S(0.5), S(0.25), S(0.25);
    if (yc(i) == 1) P.row(i) << S(0.75), S(0), S(0.25);
  }
  const S multi = AnyLoss<S>({.metric = Metric::GMean, .amplify = L, .input = AnyLossInput::Probabilities})
                      .value_and_grad(P, yc, dP);
  CHECK(std::isfinite(multi));
  CHECK(dP.allFinite());
  // An infinite partial at a class that is not saturated still throws: sqrt(TP - FP) at TP = FP.
  const auto root_gap = [](auto tp, auto, auto fp, auto) { return sqrt(tp - fp); };
  Labels pair(2);
  pair << 1, 0;
  const Vector<S> same = Vector<S>::Constant(2, S(0.5));
  Vector<S> g2(2);
  CHECK_THROWS_AS(any_loss<S>(root_gap, {.amplify = 10, .input = AnyLossInput::Probabilities}).value_and_grad(same, pair, g2),
                  gradus::invalid_argument);
}

TEMPLATE_TEST_CASE("AnyLoss: slopes beyond float's range keep the gradient finite and correct", "[anyloss]", float,
                   double) {
  using S = TestType;
  // L = 200 and p at 0 or 1: 1 - a or a is e^-100 = 3.7e-44, a float denormal. The slopes
  // (1/TN, or precision's 1/(TP + FP)) then exceed float's range: as floats they were inf, and
  // inf times a chain factor of 0 was NaN.
  const S L = 200;
  const Index n = 33;
  const Labels y = make_labels(n, 2);
  const double negatives = double((y.array() == 0).count()), positives = double(n) - negatives;
  const auto log_tn = [](auto, auto, auto, auto tn) {
    using std::log;
    return log(tn);
  };
  Vector<S> grad(n);
  const auto on_probabilities = AnyLossOptions<S>{.amplify = L, .input = AnyLossInput::Probabilities};
  const S value = any_loss<S>(log_tn, on_probabilities).value_and_grad(Vector<S>::Ones(n), y, grad);
  CHECK(std::isfinite(value));
  REQUIRE(grad.allFinite());
  // dloss/dp_i = L a_i (1 - a_i) / TN = L a_i / negatives on the negatives, 0 on the positives.
  for (Index i = 0; i < n; ++i) CHECK(double(grad(i)) == Approx(y(i) == 1 ? 0.0 : double(L) / negatives).epsilon(1e-5));
  // Logits at 1e4: chain factors p (1 - p) of 0.
  CHECK(std::isfinite(any_loss<S>(log_tn, {.amplify = L}).value_and_grad(Vector<S>::Constant(n, S(1e4)), y, grad)));
  CHECK(grad.allFinite());
  // F_beta at beta -> 0 is precision: with every p = 0, TP + FP = N e^-100.
  const AnyLoss<S> precision({.metric = Metric::FBeta, .amplify = L, .beta = std::numeric_limits<S>::denorm_min(),
                              .input = AnyLossInput::Probabilities});
  CHECK(double(precision.value_and_grad(Vector<S>::Zero(n), y, grad)) == Approx(1 - positives / double(n)).epsilon(1e-6));
  REQUIRE(grad.allFinite());
  // dprecision/da: FP / (TP + FP)^2 on positives, -TP / (TP + FP)^2 on negatives; times L a (1 - a).
  for (Index i = 0; i < n; ++i) {
    const double expected = (y(i) == 1 ? -negatives : positives) * double(L) / (double(n) * double(n));
    CHECK(double(grad(i)) == Approx(expected).epsilon(1e-5));
  }
  // Multi-class: every row at p = (1, 0, 0): class 0's TN is tiny, its slope beyond float.
  const Index c = 3;
  RowMatrix<S> P = RowMatrix<S>::Zero(n, c), dP(n, c);
  P.col(0).setOnes();
  const Labels yc = make_labels(n, c);
  CHECK(std::isfinite(any_loss<S>(log_tn, on_probabilities).value_and_grad(P, yc, dP)));
  REQUIRE(dP.allFinite());
  const double class0_negatives = double((yc.array() != 0).count());
  for (Index i = 0; i < n; ++i) {
    CHECK(double(dP(i, 0)) == Approx(yc(i) == 0 ? 0.0 : double(L) / class0_negatives / double(c)).epsilon(1e-5));
  }
}

TEMPLATE_TEST_CASE("AnyLoss beta and stabilizer at the edges of their domains", "[anyloss]", float, double) {
  using S = TestType;
  using limits = std::numeric_limits<S>;
  const Index n = 17;
  const Labels y = make_labels(n, 2);
  const Vector<S> p = uniform(n, 1, 0.1, 0.9, 3).col(0).cast<S>();
  const Soft k = soft_counts(p.template cast<double>(), y, 10);
  const double recall = k.tp / (k.tp + k.fn), precision = k.tp / (k.tp + k.fp);
  const double tol = std::is_same_v<S, float> ? 1e-5 : 1e-12;
  Vector<S> grad(n);
  // beta^2 overflowed double for beta above 1e154: NaN, reported as an undefined metric.
  for (const auto& [beta, expected] : {std::pair{limits::max(), recall}, std::pair{S(1e20), recall},
                                       std::pair{limits::denorm_min(), precision}, std::pair{S(1e-20), precision}}) {
    INFO("beta " << double(beta));
    const AnyLoss<S> loss({.metric = Metric::FBeta, .amplify = 10, .beta = beta, .input = AnyLossInput::Probabilities});
    CHECK(double(loss.value_and_grad(p, y, grad)) == Approx(1 - expected).margin(tol));
    CHECK(grad.allFinite());
  }
  CHECK(ConfusionMetric{Metric::FBeta, 1e200}(8.0, 2.0, 3.0, 7.0) == Approx(0.8).epsilon(1e-15));
  CHECK(ConfusionMetric{Metric::FBeta, 1e-200}(8.0, 2.0, 3.0, 7.0) == Approx(8.0 / 11).epsilon(1e-15));
  CHECK(ConfusionMetric{Metric::FBeta, 1.0}(8.0, 2.0, 3.0, 7.0) == Approx(ConfusionMetric{Metric::F1}(8.0, 2.0, 3.0, 7.0)));
  for (const S beta : {S(0), S(-1), limits::infinity(), limits::quiet_NaN()})
    CHECK_THROWS_AS(AnyLoss<S>({.beta = beta}), gradus::invalid_argument);
  // The stabilizer: any finite s >= 0.
  for (const Metric metric : kMetrics) {
    for (const S s : {limits::max(), limits::denorm_min()}) {
      INFO("metric " << int(metric) << ", s " << double(s));
      const AnyLoss<S> loss({.metric = metric, .amplify = 10, .stabilizer = s});
      const S value = loss.value_and_grad(p, Labels::Zero(n), grad);  // one class: the stabilizer's case
      CHECK(std::isfinite(value));
      CHECK(grad.allFinite());
    }
  }
  for (const S s : {std::nextafter(S(0), S(-1)), limits::infinity(), limits::quiet_NaN()})
    CHECK_THROWS_AS(AnyLoss<S>({.stabilizer = s}), gradus::invalid_argument);
}

TEST_CASE("AnyLoss and ConfusionMetric reject enumerators out of range", "[anyloss]") {
  using Catch::Matchers::Contains;
  // Metric(9) gave a metric of 0, a loss of 1.
  CHECK_THROWS_WITH(AnyLoss<double>({.metric = Metric(9)}), Contains("'options.metric'") && Contains("got 9"));
  CHECK_THROWS_WITH(AnyLoss<float>({.metric = Metric(-1)}), Contains("'options.metric'"));
  CHECK_THROWS_WITH(AnyLoss<double>({.input = AnyLossInput(2)}), Contains("'options.input'") && Contains("got 2"));
  CHECK_THROWS_WITH(any_loss<double>(mcc, {.input = AnyLossInput(5)}), Contains("'options.input'"));
  CHECK_THROWS_WITH(ConfusionMetric{Metric(5)}(1.0, 1.0, 1.0, 1.0),
                    Contains("ConfusionMetric") && Contains("'metric'") && Contains("got 5"));
  CHECK_NOTHROW(AnyLoss<double>({.metric = Metric::BalancedAccuracy, .input = AnyLossInput::Probabilities}));
}

TEMPLATE_TEST_CASE("AnyLoss F1 without positives nor predicted positives is undefined: an error, or 0 with s",
                   "[anyloss]", float, double) {
  using S = TestType;
  // Every a_i exactly 0 (L large, p = 0) on a batch of negatives: F1 = 0 / 0.
  const S L = std::is_same_v<S, float> ? S(300) : S(1600);
  const Index n = 9;
  Vector<S> grad(n);
  CHECK_THROWS_AS(AnyLoss<S>({.amplify = L, .input = AnyLossInput::Probabilities}).value_and_grad(
                      Vector<S>::Zero(n), Labels::Zero(n), grad),
                  gradus::invalid_argument);
  CHECK(AnyLoss<S>({.amplify = L, .input = AnyLossInput::Probabilities, .stabilizer = S(1e-5)})
            .value_and_grad(Vector<S>::Zero(n), Labels::Zero(n), grad) == 1);
  CHECK(grad.isZero(0));
}

// Each row of a multi-class gradient from logits sums to zero, as the softmax's Jacobian rows
// do: within (C + 1)^2 2 eps of its l1 norm plus 2 C denormals, what the backward pass
// guarantees (g - g_r for the row's most probable class r before the dot product).
template <class S>
void check_row_sums(const RowMatrix<S>& dZ) {
  const S eps = std::numeric_limits<S>::epsilon();
  const Index c = dZ.cols();
  for (Index i = 0; i < dZ.rows(); ++i) {
    const long double sum = dZ.row(i).template cast<long double>().sum();
    const long double l1 = dZ.row(i).template cast<long double>().cwiseAbs().sum();
    INFO("row " << i << ": sum " << double(sum) << ", l1 norm " << double(l1));
    CHECK(std::abs(sum) <= 2 * (c + 1) * (c + 1) * eps * l1 + 2 * c * std::numeric_limits<S>::denorm_min());
  }
}

TEMPLATE_TEST_CASE("AnyLoss multi-class gradient rows sum to zero where the g_c are nearly equal", "[anyloss]", float,
                   double) {
  using S = TestType;
  const auto run = [](const AnyLossOptions<S>& o, const RowMatrix<S>& Z, const Labels& y) {
    RowMatrix<S> dZ(Z.rows(), Z.cols());
    const S value = AnyLoss<S>(o).value_and_grad(Z, y, dZ);
    CHECK(std::isfinite(value));
    REQUIRE(dZ.allFinite());
    check_row_sums<S>(dZ);
    return dZ;
  };
  SECTION("accuracy, L = 1: dz of 1e-19 beside g of 1e-2") {
    RowMatrix<S> Z(1, 5);
    Z << 0, 0, 0, -8, 8;
    run({.metric = Metric::Accuracy, .amplify = 1, .beta = std::numeric_limits<S>::denorm_min(), .stabilizer = 1}, Z,
        Labels::Zero(1));
  }
  SECTION("G-mean, L = 73, rows of equal logits") {
    RowMatrix<S> Z(4, 2);
    Z << -4, -4, -4, 3, 0, 4, 4, 4;
    Labels y(4);
    y << 0, 1, 0, 0;
    run({.metric = Metric::GMean}, Z, y);
  }
  SECTION("F_beta, beta 1/2, L = 73") {
    RowMatrix<S> Z(1, 2);
    Z << -4, 4;
    run({.metric = Metric::FBeta, .beta = S(0.5)}, Z, Labels::Ones(1));
  }
  SECTION("a label class of vanishing probability beside equal ones") {
    // p_0 ~ 1e-16 and three classes with the same g: dz_1..3 ~ p_0 g, far below eps |g|.
    RowMatrix<S> Z(3, 4);
    Z << -30, 5, 5, 5, -40, 0, 0, 0, 3, 3, 3, -60;
    Labels y(3);
    y << 0, 0, 3;
    for (const Metric metric : kMetrics) {
      INFO("metric " << int(metric));
      run({.metric = metric, .amplify = 10, .stabilizer = S(1e-5)}, Z, y);
    }
  }
  SECTION("slopes beyond float's range: the backward pass in double") {
    // L = 200 and p_0 ~ 1: class 0's 1 - a is e^-100, its TN tiny, its slope beyond float.
    const auto log_tn = [](auto, auto, auto, auto tn) {
      using std::log;
      return log(tn);
    };
    const Index n = 9, c = 3;
    RowMatrix<S> Z = RowMatrix<S>::Zero(n, c), dZ(n, c);
    Z.col(0).setConstant(S(30));
    Z(0, 1) = Z(0, 2) = S(1e-3);
    const Labels y = make_labels(n, c);
    CHECK(std::isfinite(any_loss<S>(log_tn, {.amplify = 200}).value_and_grad(Z, y, dZ)));
    REQUIRE(dZ.allFinite());
    check_row_sums<S>(dZ);
  }
}
