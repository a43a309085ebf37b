#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include <gradus/core/concepts.hpp>
#include <gradus/losses/comp_sum.hpp>
#include <gradus/testing/gradient_check.hpp>

using namespace gradus;

static_assert(PredictionLoss<CompSumLoss<float>> && PredictionLoss<CrossEntropyLoss<double>>);
static_assert(PredictionLoss<SumExponentialLoss<float>> && PredictionLoss<GeneralizedCrossEntropyLoss<float>>);
static_assert(PredictionLoss<MeanAbsoluteErrorLoss<double>>);
static_assert(Loss<CrossEntropyLoss<float>, RowMatrix<float>, Labels>);
static_assert(Loss<MeanAbsoluteErrorLoss<double>, RowMatrix<double>, Labels>);

namespace {

template <class S>
RowMatrix<S> random_logits(Index n, Index c, double spread, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> normal(0.0, spread);
  RowMatrix<S> h(n, c);
  for (Index k = 0; k < h.size(); ++k) h.data()[k] = S(normal(rng));
  return h;
}

Labels random_labels(Index n, Index c, unsigned seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> pick(0, int(c) - 1);
  Labels y(n);
  for (Index i = 0; i < n; ++i) y(i) = pick(rng);
  return y;
}

// The definition, one sample at a time, in long double: Phi_tau(u), u = sum_{j != y} exp(h_j - h_y).
double oracle(const RowMatrix<double>& h, Index i, int y, double tau) {
  long double u = 0;
  for (Index j = 0; j < h.cols(); ++j)
    if (j != y) u += std::exp((long double)(h(i, j) - h(i, y)));
  if (tau == 1) return double(std::log1p(u));
  return double((std::pow(1 + u, (long double)(1 - tau)) - 1) / (1 - tau));
}

// Checks the gradient of the loss at h: a double loss against its own finite differences, a
// float loss's gradient against finite differences of the double loss at the same point.
template <class S>
void check_loss_gradient(const CompSumOptions<S>& options, const RowMatrix<S>& h, const Labels& y,
                         Index max_coordinates = 0) {
  CompSumOptions<double> options_double{options.tau, options.reduction, options.weight.template cast<double>(),
                                        options.ignore_index, double(options.label_smoothing)};
  const CompSumLoss<double> reference(options_double);
  RowMatrix<S> grad(h.rows(), h.cols());
  CompSumLoss<S>(options).value_and_grad(h, y, grad);
  auto f = [&](const Eigen::VectorXd& x) {
    return reference.value(Eigen::Map<const RowMatrix<double>>(x.data(), h.rows(), h.cols()), y);
  };
  const RowMatrix<double> point = h.template cast<double>();
  testing::GradientCheckOptions check;
  check.max_coordinates = max_coordinates;
  check.step = 1e-4;  // the loss sums many rows: its round-off dominates smaller steps
  check.tolerance = std::is_same_v<S, float> ? 2e-3 : 1e-5;
  const auto report = testing::check_gradient(f, Eigen::Map<const Eigen::VectorXd>(point.data(), point.size()),
                                              Eigen::Map<const Vector<S>>(grad.data(), grad.size()), check);
  INFO("tau " << options.tau << ", " << h.rows() << " x " << h.cols() << ": " << report.summary());
  CHECK(report.ok);
}

}  // namespace

TEMPLATE_TEST_CASE("comp-sum gradients match finite differences across tau and SIMD boundaries", "[comp_sum]",
                   float, double) {
  using S = TestType;
  for (double tau : {0.0, 0.5, 1.0, 1.7, 2.0, 3.0}) {
    for (Index c : {1, 2, 3, 7, 8, 9, 17, 64, 1000}) {
      // Enough rows to fill a block of the small-class path and leave a remainder.
      const Index n = c < detail::kSmallClasses ? 37 : 3;
      const auto h = random_logits<S>(n, c, 1.5, unsigned(11 * c + 7));
      const auto y = random_labels(n, c, unsigned(c));
      check_loss_gradient<S>({.tau = S(tau)}, h, y, c >= 64 ? 150 : 0);
    }
  }
}

TEMPLATE_TEST_CASE("weights, ignore_index and label smoothing have checked gradients", "[comp_sum]", float,
                   double) {
  using S = TestType;
  for (Index c : {3, 9, 17, 40}) {
    const Index n = c < detail::kSmallClasses ? 35 : 6;
    const auto h = random_logits<S>(n, c, 1.0, unsigned(c + 3));
    Labels y = random_labels(n, c, unsigned(c + 5));
    y(1) = y(4) = -1;
    const Vector<S> weight = (Vector<S>::LinSpaced(c, 0, 1).array() * 2 + S(0.1)).matrix();
    for (double tau : {0.5, 1.0, 2.0}) check_loss_gradient<S>({.tau = S(tau), .weight = weight, .ignore_index = -1}, h, y);
    check_loss_gradient<S>({.ignore_index = -1, .label_smoothing = S(0.2)}, h, y);
    check_loss_gradient<S>({.weight = weight, .ignore_index = -1, .label_smoothing = S(0.3)}, h, y);
    check_loss_gradient<S>({.reduction = Reduction::Sum, .weight = weight, .ignore_index = -1}, h, y);
  }
}

TEST_CASE("per-sample values match the definition Phi_tau(sum_j exp(h_j - h_y))", "[comp_sum]") {
  for (double tau : {0.0, 0.5, 1.0, 1.7, 2.0, 3.0}) {
    for (Index c : {2, 5, 15, 16, 33}) {
      const Index n = 21;
      const auto h = random_logits<double>(n, c, 2.0, unsigned(c));
      const auto y = random_labels(n, c, unsigned(c + 1));
      Vector<double> values(n);
      CompSumLoss<double>({.tau = tau}).values(h, y, values);
      for (Index i = 0; i < n; ++i) CHECK(values(i) == Approx(oracle(h, i, y(i), tau)).epsilon(1e-12).margin(1e-14));
    }
  }
}

TEMPLATE_TEST_CASE("identities of the family", "[comp_sum]", float, double) {
  using S = TestType;
  const double tol = std::is_same_v<S, float> ? 1e-5 : 1e-12;
  for (Index c : {4, 50}) {
    const Index n = 19;
    const auto h = random_logits<S>(n, c, 1.0, unsigned(c));
    const auto y = random_labels(n, c, unsigned(c + 2));
    const RowMatrix<S> p = (h.array().colwise() - h.array().exp().rowwise().sum().log()).exp();
    Vector<S> ce(n), mae(n), gce(n), tau17(n), sum_exp(n);
    CrossEntropyLoss<S>{}.values(h, y, ce);
    MeanAbsoluteErrorLoss<S>{}.values(h, y, mae);
    GeneralizedCrossEntropyLoss<S>({.q = S(0.7)}).values(h, y, gce);
    CompSumLoss<S>({.tau = S(1.7)}).values(h, y, tau17);
    SumExponentialLoss<S>{}.values(h, y, sum_exp);
    for (Index i = 0; i < n; ++i) {
      CHECK(ce(i) == Approx(-std::log(p(i, y(i)))).epsilon(tol));
      CHECK(mae(i) == Approx(1 - p(i, y(i))).epsilon(tol));
      CHECK(gce(i) == tau17(i));
      CHECK(gce(i) == Approx((1 - std::pow(p(i, y(i)), S(0.7))) / S(0.7)).epsilon(tol));
      CHECK(sum_exp(i) == Approx(1 / p(i, y(i)) - 1).epsilon(tol));
    }
    for (double tau : {0.0, 1.0, 1.7}) {
      const S mean = CompSumLoss<S>({.tau = S(tau)}).value(h, y);
      const S sum = CompSumLoss<S>({.tau = S(tau), .reduction = Reduction::Sum}).value(h, y);
      Vector<S> values(n);
      CompSumLoss<S>({.tau = S(tau)}).values(h, y, values);
      CHECK(sum == Approx(n * mean).epsilon(tol));
      CHECK(sum == Approx(values.sum()).epsilon(tol));
    }
  }
}

TEST_CASE("weight, ignore_index and label_smoothing follow torch.nn.functional.cross_entropy", "[comp_sum]") {
  // Expected numbers from libtorch 1.13 (F::cross_entropy, then backward of the sum).
  RowMatrix<double> h(4, 3);
  h << 1.0, 2.0, 0.5, 0.3, -1.0, 2.5, -0.5, 0.0, 0.5, 2.0, 1.0, -1.0;
  Labels y(4);
  y << 0, 2, -100, 1;
  Vector<double> weight(3);
  weight << 0.2, 1.0, 3.0;
  RowMatrix<double> grad(4, 3), expected(4, 3);
  Vector<double> values(4), expected_values(4);

  // Weighted mean: divides by the weights of the counted samples, 0.2 + 3 + 1.
  const CrossEntropyLoss<double> weighted({.weight = weight});
  CHECK(weighted.value_and_grad(h, y, grad) == Approx(0.485143478745).epsilon(1e-11));
  expected << -0.0366083858275, 0.0299300818672, 0.00667830396029, 0.0693646586637, 0.0189040747988,
      -0.0882687334625, 0, 0, 0, 0.1679486935, -0.176310366585, 0.00836167308556;
  CHECK((grad - expected).cwiseAbs().maxCoeff() < 1e-11);
  weighted.values(h, y, values);
  expected_values << 0.292873756822, 0.395716637139, 0, 1.34901221677;
  CHECK((values - expected_values).cwiseAbs().maxCoeff() < 1e-11);
  // By hand: sample 0 has -log p_0 = log(e + e^2 + e^0.5) - 1, weighted 0.2.
  CHECK(values(0) == Approx(0.2 * (std::log(std::exp(1.0) + std::exp(2.0) + std::exp(0.5)) - 1)));
  CHECK(CrossEntropyLoss<double>({.reduction = Reduction::Sum, .weight = weight}).value(h, y) ==
        Approx(0.292873756822 + 0.395716637139 + 1.34901221677));

  // Label smoothing without weights: the mean is over the 3 counted samples.
  const CrossEntropyLoss<double> smooth({.label_smoothing = 0.1});
  CHECK(smooth.value_and_grad(h, y, grad) == Approx(1.05065107109).epsilon(1e-11));
  expected << -0.23403647857, 0.198399461959, 0.0356370166109, 0.0212590629319, -0.00228920953834,
      -0.0189698533936, 0, 0, 0, 0.224017059788, -0.224612290997, 0.000595231208669;
  CHECK((grad - expected).cwiseAbs().maxCoeff() < 1e-11);

  // Label smoothing with weights.
  const CrossEntropyLoss<double> both({.weight = weight, .label_smoothing = 0.1});
  CHECK(both.value_and_grad(h, y, grad) == Approx(0.61607519036).epsilon(1e-11));
  expected << -0.026827385578, 0.0399516230511, -0.0131242374731, 0.0640779086143, 0.00995934953969,
      -0.074037258154, 0, 0, 0, 0.173079339652, -0.157965955852, -0.0151133838005;
  CHECK((grad - expected).cwiseAbs().maxCoeff() < 1e-11);
  both.values(h, y, values);
  expected_values << 0.485264677581, 0.505945083158, 0, 1.59630603877;
  CHECK((values - expected_values).cwiseAbs().maxCoeff() < 1e-11);
}

TEMPLATE_TEST_CASE("reductions: None gives the sum and its gradient; nothing counted gives NaN", "[comp_sum]",
                   float, double) {
  using S = TestType;
  const auto h = random_logits<S>(10, 5, 1.0, 3);
  Labels y = random_labels(10, 5, 4);
  RowMatrix<S> g_none(10, 5), g_sum(10, 5);
  const S none = CompSumLoss<S>({.tau = S(1.5), .reduction = Reduction::None}).value_and_grad(h, y, g_none);
  const S sum = CompSumLoss<S>({.tau = S(1.5), .reduction = Reduction::Sum}).value_and_grad(h, y, g_sum);
  CHECK(none == sum);
  CHECK(g_none == g_sum);

  y.setConstant(-100);
  RowMatrix<S> g = RowMatrix<S>::Ones(10, 5);
  CHECK(std::isnan(CrossEntropyLoss<S>{}.value_and_grad(h, y, g)));
  CHECK(g.isZero(0));
  CHECK(CrossEntropyLoss<S>({.reduction = Reduction::Sum}).value_and_grad(h, y, g) == 0);
  CHECK(g.isZero(0));
}

TEMPLATE_TEST_CASE("extreme and all-equal logits", "[comp_sum]", float, double) {
  using S = TestType;
  for (Index c : {3, 20}) {
    RowMatrix<S> h = RowMatrix<S>::Zero(4, c);
    h.col(0).setConstant(S(1e4));
    h.col(1).setConstant(S(-1e4));
    Labels y(4);
    y << 0, 1, 2, 1;
    Vector<S> values(4);
    RowMatrix<S> g(4, c);
    for (double tau : {1.0, 1.7, 2.0, 3.0}) {
      const CompSumLoss<S> loss({.tau = S(tau), .reduction = Reduction::Sum});
      loss.values(h, y, values);
      const S value = loss.value_and_grad(h, y, g);
      REQUIRE(std::isfinite(value));
      REQUIRE(g.allFinite());
      // Rows 1 and 3 put p_y = exp(-2e4); row 2 puts it at exp(-1e4): p_y is 0 in both precisions.
      const double far = tau == 1 ? 2e4 : 1 / (tau - 1);
      CHECK(values(0) == Approx(0).margin(1e-30));
      CHECK(values(1) == Approx(far));
      CHECK(values(2) == Approx(tau == 1 ? 1e4 : 1 / (tau - 1)));
      // Gradient p_y^(tau-1) (p - e_y): row 1 is (1, -1, 0...) for cross-entropy, 0 for tau > 1.
      CHECK(g(1, 0) == Approx(tau == 1 ? 1 : 0).margin(1e-30));
      CHECK(g(1, 1) == Approx(tau == 1 ? -1 : 0).margin(1e-30));
      CHECK(g.row(0).cwiseAbs().maxCoeff() == Approx(0).margin(1e-30));
    }
    // All-equal logits: p = 1/C, cross-entropy log C, gradient (1/C - e_y)/N.
    const RowMatrix<S> same = RowMatrix<S>::Constant(4, c, S(3e3));
    const S ce = CrossEntropyLoss<S>{}.value_and_grad(same, y, g);
    CHECK(ce == Approx(std::log(double(c))).epsilon(1e-6));
    CHECK(g(2, 0) == Approx(1.0 / c / 4).epsilon(1e-5));
    CHECK(g(2, 2) == Approx((1.0 / c - 1) / 4).epsilon(1e-5));
  }
}

// The row max is the shift that keeps the exps finite: a huge logit anywhere in a row,
// including the last, partial packet, must be found.
// Rows of many classes whose gradient exceeds detail::kStreamBytes are built in a scratch row
// and streamed out: the same bits as the rows one at a time, in place and into a strided block.
TEMPLATE_TEST_CASE("large many-class gradients are streamed out unchanged", "[comp_sum]", float, double) {
  using S = TestType;
  const Index c = 1000, n = Index(detail::kStreamBytes / (c * sizeof(S))) + 7;
  const auto h = random_logits<S>(n, c, 2.0, 31);
  Labels y = random_labels(n, c, 32);
  y(3) = -100;
  const CompSumLoss<S> loss({.tau = S(1.5), .reduction = Reduction::Sum, .ignore_index = -100});
  RowMatrix<S> g(n, c), wide(n, c + 3), row(1, c);
  wide.setConstant(7);
  const S total = loss.value_and_grad(h, y, g);
  CHECK(loss.value_and_grad(h, y, wide.leftCols(c)) == total);
  CHECK(wide.leftCols(c) == g);
  CHECK((wide.rightCols(3).array() == 7).all());
  RowMatrix<S> in_place = h;
  CHECK(loss.value_and_grad(in_place, y, in_place) == total);
  CHECK(in_place == g);
  CHECK(g.row(3).isZero(0));
  for (Index i : {Index(0), Index(1), n / 2, n - 1}) {
    loss.value_and_grad(h.row(i), y.segment(i, 1), row);
    CHECK(g.row(i) == row);
  }
}

#ifdef EIGEN_VECTORIZE_AVX512
// Gradients above detail::kStreamBytes go out by streaming stores (AVX-512 few-class path) when
// they are 64-byte aligned: the same numbers as plain stores (a misaligned view of a second
// buffer) and as the rows one at a time.
TEST_CASE("large few-class gradients, streamed or stored, agree bitwise", "[comp_sum]") {
  const Index c = 10, n = Index(detail::kStreamBytes / (c * sizeof(float))) + 1000;
  const auto h = random_logits<float>(n, c, 2.0, 21);
  Labels y = random_labels(n, c, 22);
  y(5) = -100;
  const CrossEntropyLoss<float> loss({.ignore_index = -100});
  RowMatrix<float> streamed(n, c);
  REQUIRE(reinterpret_cast<std::uintptr_t>(streamed.data()) % 64 == 0);  // Eigen's allocation: streamed
  std::vector<float> buffer(std::size_t(n * c) + 1);
  Eigen::Map<RowMatrix<float>> stored(buffer.data() + (reinterpret_cast<std::uintptr_t>(buffer.data()) % 64 == 0), n, c);
  const float v1 = loss.value_and_grad(h, y, streamed), v2 = loss.value_and_grad(h, y, stored);
  CHECK(v1 == v2);
  CHECK(streamed == stored);
  RowMatrix<float> row(1, c);
  CHECK(streamed.row(5).isZero(0));
  for (Index i : {Index(0), Index(12345), n / 2, n - 1}) {
    loss.value_and_grad(h.row(i), y.segment(i, 1), row);
    CHECK(streamed.row(i).isApprox(row / float(n - 1), 1e-5f));
  }
}
#endif

TEMPLATE_TEST_CASE("the row max is found wherever it lies", "[comp_sum]", float, double) {
  using S = TestType;
  for (Index c : {17, 63, 64, 70, 100, 1000}) {
    const Index n = c;  // row i holds its huge logit at column i
    RowMatrix<S> h = random_logits<S>(n, c, 1.0, unsigned(c));
    Labels y(n);
    for (Index i = 0; i < n; ++i) {
      h(i, i) = S(1e4);
      y(i) = int((i + 1) % c);
    }
    Vector<S> values(n);
    RowMatrix<S> g(n, c);
    const CrossEntropyLoss<S> loss({.reduction = Reduction::Sum});
    loss.values(h, y, values);
    CHECK(std::isfinite(loss.value_and_grad(h, y, g)));
    for (Index i = 0; i < n; ++i) {
      INFO(c << " classes, row " << i);
      CHECK(values(i) == Approx(1e4 - double(h(i, y(i)))).epsilon(1e-6));
      CHECK(g(i, i) == Approx(1).epsilon(1e-6));
      CHECK(g(i, y(i)) == Approx(-1).epsilon(1e-6));
    }
  }
}

TEMPLATE_TEST_CASE("logits may be expressions, column-major or the gradient buffer itself", "[comp_sum]", float,
                   double) {
  using S = TestType;
  // 70 rows: whole blocks of the small-class path (packet transposes) and a partial one.
  // Strided rows take the transposes where contiguous float rows may take the flat path
  // (one shift per 16 rows): the same values to within a few roundings.
  const double tolerance = 8 * std::numeric_limits<S>::epsilon();
  for (Index c : {3, 6, 30}) {
    const Index n = 70;
    const auto h = random_logits<S>(n, c, 1.0, 9);
    const auto y = random_labels(n, c, 10);
    const CompSumLoss<S> loss({.tau = S(0.5)});
    RowMatrix<S> g(n, c), g2(n, c);
    const S v = loss.value_and_grad(h, y, g);
    const S v_expr = loss.value_and_grad(2 * h / 2, y, g2);
    CHECK(v_expr == Approx(v).epsilon(tolerance));
    CHECK(g2.isApprox(g, S(tolerance)));
    const Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic> col_major = h;
    CHECK(loss.value(col_major, y) == Approx(v).epsilon(tolerance));
    RowMatrix<S> in_place = h;
    CHECK(loss.value_and_grad(in_place, y, in_place) == Approx(v).epsilon(tolerance));
    CHECK(in_place.isApprox(g, S(tolerance)));
    // A block of a wider matrix: rows with a stride.
    RowMatrix<S> wide = RowMatrix<S>::Zero(n, c + 5);
    wide.leftCols(c) = h;
    RowMatrix<S> g_wide = RowMatrix<S>::Constant(n, c + 5, 7);
    CHECK(loss.value_and_grad(wide.leftCols(c), y, g_wide.leftCols(c)) == Approx(v).epsilon(tolerance));
    CHECK(g_wide.leftCols(c).isApprox(g, S(tolerance)));
    CHECK((g_wide.rightCols(5).array() == 7).all());
  }
}

TEMPLATE_TEST_CASE("few-class blocks (packet transposes, packed stores, prefetch) match rows one at a time",
                   "[comp_sum]", float, double) {
  using S = TestType;
  // A single row goes through the element-by-element transposes: the oracle for whole blocks,
  // partial last blocks, and enough rows (333) for the prefetch of the block four ahead.
  for (Index c : {1, 2, 3, 7, 8, 9, 10, 15}) {
    for (Index n : {1, 31, 32, 33, 200, 333}) {
      auto h = random_logits<S>(n, c, 3.0, unsigned(c * 1000 + n));
      Labels y = random_labels(n, c, unsigned(c + n));
      for (Index i = 0; i < n; i += 7) y(i) = -100;
      const Vector<S> weight = (random_logits<S>(1, c, 1.0, 3).array().abs() + S(0.1)).transpose();
      for (const CompSumOptions<S>& options :
           {CompSumOptions<S>{.tau = 1, .reduction = Reduction::Sum, .weight = weight, .label_smoothing = S(0.1)},
            CompSumOptions<S>{.tau = S(1.5), .reduction = Reduction::Sum}}) {
        const CompSumLoss<S> loss(options);
        RowMatrix<S> g(n, c), g_row(1, c), expected(n, c);
        double expected_value = 0;
        for (Index i = 0; i < n; ++i) {
          expected_value += loss.value_and_grad(h.row(i), y.segment(i, 1), g_row);
          expected.row(i) = g_row;
        }
        INFO(n << " x " << c << ", tau " << options.tau);
        const S tolerance = 8 * std::numeric_limits<S>::epsilon();
        CHECK(loss.value_and_grad(h, y, g) == Approx(expected_value).epsilon(tolerance));
        CHECK(g.isApprox(expected, tolerance));
        RowMatrix<S> in_place = h;
        CHECK(loss.value_and_grad(in_place, y, in_place) == Approx(expected_value).epsilon(tolerance));
        CHECK(in_place.isApprox(expected, tolerance));
        RowMatrix<S> wide = RowMatrix<S>::Constant(n, c + 3, 5), g_wide = RowMatrix<S>::Constant(n, c + 3, 7);
        wide.leftCols(c) = h;
        CHECK(loss.value_and_grad(wide.leftCols(c), y, g_wide.leftCols(c)) == Approx(expected_value).epsilon(tolerance));
        CHECK(g_wide.leftCols(c).isApprox(expected, tolerance));
        CHECK((g_wide.rightCols(3).array() == 7).all());
      }
    }
  }
}

// Contiguous float rows of 2-15 classes go 16 rows at a time through one shift (AVX-512), in
// chunks of 128 rows, and blocks where that shift is unsafe go back to the transposes: both
// against the definition, in the first, a middle and the last (partial) chunk.
TEMPLATE_TEST_CASE("few-class rows, shifted per block or per row, match the definition in long double",
                   "[comp_sum]", float, double) {
  using S = TestType;
  const S tolerance = std::is_same_v<S, float> ? S(1e-5) : S(1e-13);  // tau = 0 scales by 1/p_y
  for (Index c = 2; c < detail::kSmallClasses; ++c) {
    const Index n = 300;
    RowMatrix<S> h = random_logits<S>(n, c, 4.0, unsigned(c + 77));
    Labels y = random_labels(n, c, unsigned(c + 78));
    y(3) = y(50) = y(200) = -100;
    h.row(37).array() -= S(70);                                 // far below its block: back to the transposes
    h.row(140).array() -= S(70);
    h.row(270).array() -= S(70);
    h.row(70).array() += S(45);                                 // far above: the others fall far below
    h(10, (y(10) + 1) % c) = -std::numeric_limits<S>::infinity();  // a masked class
    h.row(50).setConstant(std::numeric_limits<S>::quiet_NaN());   // ignored, so harmless
    const Vector<S> weight = (random_logits<S>(1, c, 1.0, 5).array().abs() + S(0.2)).transpose();
    for (const double tau : {0.0, 1.0, 1.7, 3.0}) {
      for (const bool weighted : {false, true}) {
        INFO(n << " x " << c << ", tau " << tau << (weighted ? ", weighted" : ""));
        CompSumOptions<S> options{.tau = S(tau), .reduction = Reduction::Sum};
        if (weighted) options.weight = weight;
        const CompSumLoss<S> loss(options);
        RowMatrix<S> g(n, c);
        Vector<S> values(n);
        const double total = loss.value_and_grad(h, y, g);
        loss.values(h, y, values);
        double expected_total = 0, worst_value = 0, worst_grad = 0;
        for (Index i = 0; i < n; ++i) {
          if (y(i) == -100) {
            worst_value = std::max(worst_value, std::abs(double(values(i))));
            worst_grad = std::max(worst_grad, double(g.row(i).cwiseAbs().maxCoeff()));
            continue;
          }
          const RowMatrix<double> row = h.row(i).template cast<double>();
          const double v_y = weighted ? double(weight(y(i))) : 1.0;
          const double value = v_y * oracle(row, 0, y(i), tau);
          expected_total += value;
          worst_value = std::max(worst_value, std::abs(double(values(i)) - value) / (1 + value));
          long double m = row.maxCoeff(), sum = 0;
          for (Index j = 0; j < c; ++j) sum += std::exp((long double)row(0, j) - m);
          const long double p_y = std::exp((long double)row(0, y(i)) - m) / sum;
          for (Index j = 0; j < c; ++j) {
            const long double p = std::exp((long double)row(0, j) - m) / sum;
            const long double grad = v_y * std::pow(p_y, (long double)(tau - 1)) * (p - (j == y(i) ? 1 : 0));
            worst_grad = std::max(worst_grad, double(std::abs(g(i, j) - grad) / (1 + std::abs(grad))));
          }
        }
        CHECK(total == Approx(expected_total).epsilon(tolerance));
        CHECK(worst_value < tolerance);
        CHECK(worst_grad < tolerance);
      }
    }
  }
  // A NaN in a counted row still makes the value NaN, wherever the row is.
  RowMatrix<S> h = random_logits<S>(64, 10, 1.0, 3);
  h(40, 4) = std::numeric_limits<S>::quiet_NaN();
  RowMatrix<S> g(64, 10);
  CHECK(std::isnan(CrossEntropyLoss<S>{}.value_and_grad(h, random_labels(64, 10, 4), g)));
  CHECK(g.row(40).array().isNaN().all());
  CHECK(g.row(39).allFinite());
}

TEST_CASE("bad input throws gradus::invalid_argument naming the argument", "[comp_sum]") {
  const auto h = random_logits<float>(4, 3, 1.0, 1);
  Labels y(4);
  y << 0, 1, 2, 1;
  RowMatrix<float> g(4, 3);
  Vector<float> values(4);
  const CrossEntropyLoss<float> ce;
  auto throws_about = [](auto&& call, const char* argument) {
    try {
      call();
      FAIL("no throw for " << argument);
    } catch (const gradus::invalid_argument& e) {
      INFO(e.what());
      CHECK(std::string(e.what()).find(std::string("'") + argument + "'") != std::string::npos);
    }
  };
  throws_about([&] { ce.value(h, y.head(3)); }, "labels");
  throws_about([&] { ce.value(RowMatrix<float>(0, 3), Labels(0)); }, "logits");
  throws_about([&] { ce.value(RowMatrix<float>(4, 0), y); }, "logits");
  Labels bad = y;
  bad(2) = 3;
  throws_about([&] { ce.value(h, bad); }, "labels");
  bad(2) = -1;
  throws_about([&] { ce.value(h, bad); }, "labels");
  CHECK_NOTHROW(CrossEntropyLoss<float>({.reduction = Reduction::Sum, .ignore_index = -1}).value(h, bad));
  RowMatrix<float> narrow(4, 2), short_grad(3, 3);
  Vector<float> long_values(5);
  throws_about([&] { ce.value_and_grad(h, y, narrow); }, "dlogits");
  throws_about([&] { ce.value_and_grad(h, y, short_grad); }, "dlogits");
  throws_about([&] { ce.values(h, y, long_values); }, "per_sample");
  throws_about([&] { CompSumLoss<float>({.tau = -0.5f}); }, "options.tau");
  throws_about([&] { CompSumLoss<float>({.tau = std::numeric_limits<float>::quiet_NaN()}); }, "options.tau");
  throws_about([&] { CompSumLoss<float>({.tau = INFINITY}); }, "options.tau");
  throws_about([&] { CompSumLoss<float>({.tau = 1.5f, .label_smoothing = 0.1f}); }, "options.label_smoothing");
  throws_about([&] { CrossEntropyLoss<float>({.label_smoothing = 1.5f}); }, "options.label_smoothing");
  throws_about([&] { GeneralizedCrossEntropyLoss<float>({.q = 0}); }, "options.q");
  throws_about([&] { CrossEntropyLoss<float>({.weight = Vector<float>::Constant(3, -1)}); }, "options.weight");
  throws_about([&] { CrossEntropyLoss<float>({.weight = Vector<float>::Constant(3, NAN)}); }, "options.weight");
  throws_about([&] { CrossEntropyLoss<float>({.weight = Vector<float>::Ones(4)}).value(h, y); }, "options.weight");
}

TEST_CASE("non-finite logits propagate as NaN, except from ignored rows", "[comp_sum]") {
  for (Index c : {3, 20}) {
    RowMatrix<float> h = RowMatrix<float>::Zero(3, c);
    h(0, 1) = NAN;
    h(2, 0) = INFINITY;
    Labels y(3);
    y << 0, 1, -100;
    RowMatrix<float> g(3, c);
    CHECK(std::isnan(CrossEntropyLoss<float>{}.value_and_grad(h, y, g)));
    CHECK(g.row(0).array().isNaN().all());
    CHECK(g.row(1).allFinite());
    CHECK(g.row(2).isZero(0));
    y(0) = -100;
    CHECK(std::isfinite(CrossEntropyLoss<float>{}.value_and_grad(h, y, g)));
  }
}

TEMPLATE_TEST_CASE("the kernel's exp of shifted logits is exp to ~1 ulp, underflows to 0, keeps NaN", "[comp_sum]",
                   float, double) {
  using S = TestType;
  using Lanes = Eigen::Array<S, detail::kLanes<S>, 1>;
  constexpr int L = detail::kLanes<S>;
  const Lanes zero = Lanes::Zero();
  alignas(64) S x[L], e[L];
  double worst_ulps = 0, worst_denormal = 0;
  constexpr int kPoints = 1 << 16;
  for (int k = 0; k < kPoints; k += L) {
    for (int l = 0; l < L; ++l) x[l] = S(-110.0 * (k + l) / kPoints);  // into float's denormals and beyond
    detail::exp_shifted(x, zero, e);
    for (int l = 0; l < L; ++l) {
      const double exact = std::exp(double(x[l]));
      if (exact >= double(std::numeric_limits<S>::min())) {
        const double ulp = double(std::numeric_limits<S>::epsilon()) * exact;
        worst_ulps = std::max(worst_ulps, std::abs(double(e[l]) - exact) / ulp);
      } else {  // below the normal range: a denormal or 0, within one denormal
        worst_denormal = std::max(worst_denormal, std::abs(double(e[l]) - exact));
      }
    }
  }
  CHECK(worst_ulps < 2.5);
  CHECK(worst_denormal <= double(std::numeric_limits<S>::denorm_min()));
  for (int l = 0; l < L; ++l) x[l] = l % 3 == 0 ? S(0) : l % 3 == 1 ? -std::numeric_limits<S>::infinity() : S(NAN);
  detail::exp_shifted(x, zero, e);
  for (int l = 0; l < L; ++l) {
    if (l % 3 == 0) CHECK(e[l] == 1);
    if (l % 3 == 1) CHECK(e[l] == 0);
    if (l % 3 == 2) CHECK(std::isnan(e[l]));
  }
}

#ifdef GRADUS_OPENMP
#include <omp.h>

TEST_CASE("OpenMP over rows is deterministic for a thread count and matches one thread", "[comp_sum]") {
  for (Index c : {10, 300}) {
    const Index n = c < detail::kSmallClasses ? 20000 : 400;
    const auto h = random_logits<float>(n, c, 2.0, 5);
    const auto y = random_labels(n, c, 6);
    const CompSumLoss<float> loss({.tau = 1.7f});
    RowMatrix<float> g1(n, c), g2(n, c), g_serial(n, c);
    const int threads = omp_get_max_threads();
    omp_set_num_threads(1);
    const float serial = loss.value_and_grad(h, y, g_serial);
    omp_set_num_threads(std::max(threads, 3));
    const float first = loss.value_and_grad(h, y, g1);
    const float second = loss.value_and_grad(h, y, g2);
    omp_set_num_threads(threads);
    CHECK(first == second);
    CHECK(g1 == g2);
    CHECK(g1 == g_serial);  // rows are independent: only the sum's order depends on threads
    CHECK(first == Approx(serial).epsilon(1e-6));
  }
}
#endif

TEST_CASE("named members are comp-sum losses with their tau", "[comp_sum]") {
  static_assert(std::is_same_v<CrossEntropyLoss<float>::Options, CrossEntropyOptions<float>>);
  CHECK(CrossEntropyLoss<float>{}.options().tau == 1);
  CHECK(SumExponentialLoss<float>{}.options().tau == 0);
  CHECK(GeneralizedCrossEntropyLoss<double>({.q = 0.5}).options().tau == 1.5);
  CHECK(MeanAbsoluteErrorLoss<double>{}.options().tau == 2);
  const CrossEntropyLoss<float> ce({.reduction = Reduction::Sum, .ignore_index = -1, .label_smoothing = 0.25f});
  CHECK(ce.options().reduction == Reduction::Sum);
  CHECK(ce.options().ignore_index == -1);
  CHECK(ce.options().label_smoothing == 0.25f);
}

namespace {

// The exact per-sample value and gradient row of a row of logits, in long double: the reference
// at rows where float and double lose digits or underflow.
struct ExactRow {
  long double value = 0, lp = 0;
  std::vector<long double> grad;
};

template <class S>
ExactRow exact_row(const S* h, Index c, int y, double tau, long double v_y = 1) {
  long double m = -INFINITY;
  for (Index j = 0; j < c; ++j) m = std::max(m, (long double)h[j]);
  long double others = 0, e_y = std::exp((long double)h[y] - m);
  for (Index j = 0; j < c; ++j)
    if (j != y) others += std::exp((long double)h[j] - m);
  const long double s = e_y + others, t = tau - 1;
  ExactRow r;
  r.lp = e_y > others ? -std::log1p(others / e_y) : ((long double)h[y] - m) - std::log(s);
  r.value = v_y * (t == 0 ? -r.lp : -std::expm1(t * r.lp) / t);
  const long double b = v_y * std::exp(t * r.lp);
  for (Index j = 0; j < c; ++j) r.grad.push_back(j == y ? -b * others / s : b * std::exp((long double)h[j] - m) / s);
  return r;
}

// Whether x is within `ulps` of the exact value, counting ulps of S at its magnitude (its
// denormal spacing below the normal range), times (1 + |t lp|), the condition of p_y^t in lp.
template <class S>
bool close_to(S x, long double exact, double ulps, long double condition = 1) {
  if (!std::isfinite(x) || std::isnan(exact)) return false;
  const long double magnitude = std::max(std::fabs(exact), (long double)std::numeric_limits<S>::min());
  const long double ulp = std::ldexp(1.0L, std::ilogb(magnitude) - (std::numeric_limits<S>::digits - 1));
  return std::fabs((long double)x - exact) <= ulps * ulp * condition;
}

// Rows at the edges of S's range for C classes, row r of a set: a far label, far other classes,
// the label alone at the top, equal rows, and all of them in a few mixes.
template <class S>
RowMatrix<S> extreme_rows(Index n, Index c, Labels& y, bool moderate) {
  RowMatrix<S> h = random_logits<S>(n, c, 1.0, unsigned(n + c));
  y = random_labels(n, c, unsigned(n * c));
  const double far = moderate ? 40 : std::is_same_v<S, float> ? 100 : 760;
  for (Index i = 0; i < n; ++i) {
    switch (i % 6) {
      case 0: h(i, y(i)) += S(far); break;                             // p_y = 1 - tiny
      case 1: h(i, y(i)) -= S(far); break;                             // p_y tiny
      case 2: h.row(i).setZero(); h(i, y(i)) = S(far); break;         // the finding's row
      case 3: h(i, (y(i) + 1) % c) += S(far / 2); break;              // another class on top
      case 4: h.row(i) *= S(0); break;                                 // equal (-0 and +0)
      default: h(i, y(i)) += S(far / 3); h(i, (y(i) + 1) % c) -= S(far); break;
    }
  }
  return h;
}

}  // namespace

// The label's entry a p_y - b cancels as p_y nears 1, and exps below -88 (float) came out of
// Eigen's clamped exp as 2.9e-39: CompSumLoss<float>{tau = 3} at [0, 0, 100, 0], label 2, gave
// [2.9e-39, 2.9e-39, 0, 2.9e-39] for about [3.7e-44, 3.7e-44, -1.1e-43, 3.7e-44].
TEMPLATE_TEST_CASE("gradients at underflow match a long-double oracle on every path", "[comp_sum]", float, double) {
  using S = TestType;
  {
    RowMatrix<S> h(1, 4);
    h << 0, 0, 100, 0;
    Labels y(1);
    y << 2;
    RowMatrix<S> g(1, 4);
    for (const double tau : {3.0, 1e30, 1.0}) {
      CompSumLoss<S>({.tau = S(tau)}).value_and_grad(h, y, g);
      const ExactRow exact = exact_row(h.data(), 4, 2, tau);
      INFO("tau " << tau << ": " << g);
      for (Index j = 0; j < 4; ++j) CHECK(close_to(g(0, j), exact.grad[std::size_t(j)], 2));
      if (tau == 3 && std::is_same_v<S, float>) CHECK(g(0, 0) < S(1e-43));
      CHECK(g(0, 2) < 0);
    }
  }
  // Every path: rows of few classes one by one (transposes, element by element), in blocks
  // (flat on AVX-512 floats, else transposed), strided (transposed), and many classes (rows).
  for (const Index c : {2, 4, 7, 15, 40}) {
    for (const bool moderate : {false, true}) {
      Labels y;
      const Index n = 96;
      const RowMatrix<S> h = extreme_rows<S>(n, c, y, moderate);
      RowMatrix<S> wide = RowMatrix<S>::Zero(n, c + 3);
      wide.leftCols(c) = h;
      // tau < 1 only on the moderate rows: p_y^(tau-1) > 1 magnifies the exps there, and where
      // they fall below the normal range their digits are lost (see the README).
      for (const double tau : moderate ? std::vector<double>{0.0, 0.5, 1.0, 1.7, 3.0, 1e30}
                                       : std::vector<double>{1.0, 1.7, 3.0, 1e30}) {
        const CompSumLoss<S> loss({.tau = S(tau), .reduction = Reduction::Sum});
        RowMatrix<S> g(n, c), g_wide(n, c + 3), g_row(1, c);
        Vector<S> values(n);
        loss.value_and_grad(h, y, g);
        loss.value_and_grad(wide.leftCols(c), y, g_wide.leftCols(c));
        loss.values(h, y, values);
        for (Index i = 0; i < n; ++i) {
          loss.value_and_grad(h.row(i), y.segment(i, 1), g_row);
          const ExactRow exact = exact_row(h.row(i).data(), c, y(i), tau);
          if (!(std::fabs(exact.value) < std::numeric_limits<S>::max())) continue;
          // The condition of the problem in the roundings of the kernel: exp(h_j - m) carries the
          // rounding of h_j - m (spread: the row's widest), p_y^(tau-1) that of t lp, and in a
          // float block of 16 rows one shift stands in for the row maxima (up to e^39 above).
          long double m = -INFINITY, spread = 0;
          for (Index j = 0; j < c; ++j) m = std::max(m, (long double)h(i, j));
          for (Index j = 0; j < c; ++j) spread = std::max(spread, m - h(i, j));
          const long double condition = 1 + spread + (std::is_same_v<S, float> ? 40 : 0) +
                                        std::fabs(tau - 1) * (m - h(i, y(i)) + std::fabs(exact.lp));
          INFO(c << " classes, tau " << tau << ", row " << i << ": " << h.row(i) << ", label " << y(i));
          CHECK(std::fabs(values(i) - exact.value) <= 8 * std::numeric_limits<S>::epsilon() * (1 + std::fabs(exact.value)) * condition);
          long double row_sum = 0, row_size = 0;
          for (Index j = 0; j < c; ++j) {
            const long double expected = exact.grad[std::size_t(j)];
            INFO("class " << j << ": " << g(i, j) << " for " << double(expected));
            CHECK(close_to(g(i, j), expected, 8, condition));
            CHECK(close_to(g_wide(i, j), expected, 8, condition));
            CHECK(close_to(g_row(0, j), expected, 8, condition));
            row_sum += g(i, j);
            row_size += std::fabs((long double)g(i, j));
          }
          CHECK(std::fabs(row_sum) <= 4 * c * std::numeric_limits<S>::epsilon() * row_size);
        }
      }
    }
  }
}

// Class weights of 1e38 each on one row of 4 logits: the weight sum overflowed float, and
// c W = 0 * inf made the gradient NaN beside a value of 0.342. Weights anywhere in the accepted
// domain (0, or normal up to the largest finite) give what the unweighted loss gives, scaled by
// the weights, or exactly it for a mean.
TEMPLATE_TEST_CASE("class weights from the smallest normal to the largest finite give finite, exact results", "[comp_sum]",
                   float, double) {
  using S = TestType;
  using limits = std::numeric_limits<S>;
  const S tolerance = 8 * limits::epsilon();
  for (const Index c : {4, 40}) {
    const Index n = c == 4 ? 1 : 70;  // the finding's one row, then the blocks and the rows paths
    const RowMatrix<S> h = random_logits<S>(n, c, 1.0, 17);
    const Labels y = random_labels(n, c, 18);
    for (const double tau : {1.0, 0.5, 2.0}) {
      const CompSumLoss<S> plain({.tau = S(tau)}), plain_sum({.tau = S(tau), .reduction = Reduction::Sum});
      RowMatrix<S> g_plain(n, c), g_plain_sum(n, c), g(n, c);
      const S mean = plain.value_and_grad(h, y, g_plain);
      const S sum = plain_sum.value_and_grad(h, y, g_plain_sum);
      Vector<S> per_plain(n), per(n);
      plain.values(h, y, per_plain);
      for (const S w : {S(1e36), limits::max() / S(c + 1), limits::min(), S(1e-30)}) {
        INFO(c << " classes, tau " << tau << ", weights " << w);
        const Vector<S> weight = Vector<S>::Constant(c, w);
        CHECK(CompSumLoss<S>({.tau = S(tau), .weight = weight}).value_and_grad(h, y, g) == Approx(mean).epsilon(tolerance));
        CHECK(g.allFinite());
        CHECK(g.isApprox(g_plain, tolerance));
        const CompSumLoss<S> weighted_sum({.tau = S(tau), .reduction = Reduction::Sum, .weight = weight});
        const S total = weighted_sum.value_and_grad(h, y, g);
        weighted_sum.values(h, y, per);
        // Sum: w times the unweighted results; where a sample's value exceeds the largest S
        // it is inf, and so may be its gradient row (w p_y^(tau-1) beyond the largest S).
        for (Index i = 0; i < n; ++i) {
          const long double exact = (long double)w * per_plain(i);
          if (exact > limits::max()) {
            CHECK(std::isinf(per(i)));
            continue;
          }
          CHECK(close_to(per(i), exact, 8));
          for (Index j = 0; j < c; ++j) CHECK(close_to(g(i, j), (long double)w * g_plain_sum(i, j), 8));
        }
        // The total adds the rounded per-sample values: n denormals' worth apart at most.
        const long double expected = (long double)w * sum;
        if (std::fabs(expected) < limits::max()) {
          CHECK(std::fabs(total - expected) <= tolerance * std::fabs(expected) + n * limits::denorm_min());
        }
      }
    }
    // Mixed: one class 1e38 and one of the smallest normal weight, labels on both; label
    // smoothing with the weights' sum near the largest finite.
    Vector<S> mixed = Vector<S>::Ones(c);
    mixed(0) = S(1e38);
    mixed(1) = limits::min();
    Labels y01 = y;
    for (Index i = 0; i < n; ++i) y01(i) = int(i % 2);
    RowMatrix<S> g(n, c);
    CHECK(std::isfinite(CompSumLoss<S>({.weight = mixed}).value_and_grad(h, y01, g)));
    CHECK(g.allFinite());
    CompSumLoss<S>({.reduction = Reduction::Sum, .weight = mixed}).value_and_grad(h, y01, g);  // a sum may overflow
    CHECK(g.allFinite());
    const Vector<S> at_max = Vector<S>::Constant(c, limits::max() / S(c + 1));
    check_loss_gradient<S>({.weight = (at_max / limits::max()).eval(), .label_smoothing = S(0.5)}, h, y);
    CHECK(std::isfinite(CompSumLoss<S>({.weight = at_max, .label_smoothing = S(0.5)}).value_and_grad(h, y, g)));
    CHECK(g.allFinite());
  }
  // Weights of 0 for every counted label: a mean over nothing (NaN, zero gradient), a sum of 0.
  const RowMatrix<S> h = random_logits<S>(5, 3, 1.0, 3);
  Labels y(5);
  y << 0, 0, 1, 1, 0;
  Vector<S> zero_01(3);
  zero_01 << 0, 0, 1;
  RowMatrix<S> g = RowMatrix<S>::Ones(5, 3);
  CHECK(std::isnan(CompSumLoss<S>({.weight = zero_01}).value_and_grad(h, y, g)));
  CHECK(g.isZero(0));
  g.setOnes();
  CHECK(CompSumLoss<S>({.reduction = Reduction::Sum, .weight = zero_01}).value_and_grad(h, y, g) == 0);
  CHECK(g.isZero(0));
}

TEMPLATE_TEST_CASE("accepted domains: their edges work, the next values are rejected", "[comp_sum]", float, double) {
  using S = TestType;
  using limits = std::numeric_limits<S>;
  const RowMatrix<S> h = random_logits<S>(20, 5, 2.0, 5);
  const Labels y = random_labels(20, 5, 6);
  RowMatrix<S> g(20, 5);
  auto rejects = [](auto&& make, const char* argument) {
    try {
      make();
      FAIL("no throw for " << argument);
    } catch (const gradus::invalid_argument& e) {
      CHECK(std::string(e.what()).find(std::string("'") + argument + "'") != std::string::npos);
    }
  };
  // tau: [0, max]; the largest gives the limit 1/tau... of -log p_y (finite, >= 0).
  for (const S tau : {S(0), limits::denorm_min(), S(1e30), limits::max()}) {
    INFO("tau " << tau);
    const S value = CompSumLoss<S>({.tau = tau}).value_and_grad(h, y, g);
    CHECK(std::isfinite(value));
    CHECK(value >= 0);
    CHECK(g.allFinite());
  }
  rejects([] { CompSumLoss<S>({.tau = -limits::denorm_min()}); }, "options.tau");
  rejects([] { CompSumLoss<S>({.tau = limits::infinity()}); }, "options.tau");
  // label_smoothing: [0, 1], for tau = 1.
  for (const S eps : {limits::denorm_min(), S(1)}) {
    check_loss_gradient<S>({.label_smoothing = eps}, h, y);
    CHECK(std::isfinite(CrossEntropyLoss<S>({.label_smoothing = eps}).value_and_grad(h, y, g)));
  }
  rejects([] { CrossEntropyLoss<S>({.label_smoothing = std::nextafter(S(1), S(2))}); }, "options.label_smoothing");
  rejects([] { CrossEntropyLoss<S>({.label_smoothing = -limits::denorm_min()}); }, "options.label_smoothing");
  // weight: entries 0 or normal and finite, whose sum is finite in S (with or without smoothing).
  Vector<S> halves = Vector<S>::Constant(2, limits::max() / 2);
  const RowMatrix<S> h2 = h.leftCols(2);
  Labels y2 = y;
  for (Index i = 0; i < y2.size(); ++i) y2(i) %= 2;
  RowMatrix<S> g2(20, 2);
  CHECK(std::isfinite(CrossEntropyLoss<S>({.weight = halves, .label_smoothing = S(0.1)}).value_and_grad(h2, y2, g2)));
  CHECK(g2.allFinite());
  CHECK(std::isfinite(CrossEntropyLoss<S>({.weight = halves}).value_and_grad(h2, y2, g2)));
  CHECK(g2.allFinite());
  halves(1) = std::nextafter(halves(1), limits::infinity());
  rejects([&] { CrossEntropyLoss<S>({.weight = halves}); }, "options.weight");
  rejects([&] { CrossEntropyLoss<S>({.weight = halves, .label_smoothing = S(0.1)}); }, "options.weight");
  rejects([] { CrossEntropyLoss<S>({.weight = Vector<S>::Constant(3, limits::infinity())}); }, "options.weight");
  rejects([] { CrossEntropyLoss<S>({.weight = Vector<S>::Constant(3, -limits::denorm_min())}); }, "options.weight");
}

// The reduced loss by its definition in long double: weights, ignore_index and smoothing.
template <class S>
long double weighted_reference(const CompSumOptions<S>& o, const RowMatrix<S>& h, const Labels& y) {
  long double total = 0, denominator = 0;
  const long double tau = o.tau, eps = o.label_smoothing;
  auto v = [&](Index j) { return o.weight.size() ? (long double)o.weight(j) : 1.0L; };
  for (Index i = 0; i < h.rows(); ++i) {
    if (y(i) == o.ignore_index) continue;
    long double top = -INFINITY, sum = 0;
    for (Index j = 0; j < h.cols(); ++j) top = std::max(top, (long double)h(i, j));
    for (Index j = 0; j < h.cols(); ++j) sum += std::exp((long double)h(i, j) - top);
    auto lp = [&](Index j) { return (long double)h(i, j) - top - std::log(sum); };
    const long double lpy = lp(y(i));
    long double l = v(y(i)) == 0 ? 0 : v(y(i)) * (tau == 1 ? -lpy : -std::expm1((tau - 1) * lpy) / (tau - 1));
    if (eps > 0) {
      long double smooth = 0;
      for (Index j = 0; j < h.cols(); ++j) smooth += v(j) * -lp(j);
      l = (1 - eps) * l + eps / h.cols() * smooth;
    }
    total += l;
    denominator += v(y(i));
  }
  return o.reduction == Reduction::Mean ? total / denominator : total;
}

template <class S>
RowMatrix<S> row_of(std::initializer_list<S> values) {
  RowMatrix<S> h(1, Index(values.size()));
  Index j = 0;
  for (const S x : values) h(0, j++) = x;
  return h;
}

template <class S>
Vector<S> vector_of(std::initializer_list<S> values) {
  Vector<S> v(Index(values.size()));
  Index j = 0;
  for (const S x : values) v(j++) = x;
  return v;
}

// Class weights at the ends of their domain. A denormal weight made 1/denominator overflow
// (scale inf, 0 * inf = NaN: weight [5e-324, 10, 4.2], smoothing 5e-324, logits [-8, -8, -8],
// label 0 gave NaN; tau 2/3, weight [8, 1.39e-309, 8], logits [4, -4, -4], label 1, a
// non-finite gradient); weights whose sum is finite only in long double ([1e4, 6.2e307, 1.8e308],
// smoothing 1 - 2^-53, logits [-7, 0.5, 2.2e-16], label 2, ignore_index 1) gave inf for 0.379.
// Denormal weights and sums beyond the largest S are now rejected; the edges of the domain work.
TEMPLATE_TEST_CASE("class weights at the ends of their domain: denormals and overflowing sums rejected, the edges exact",
                   "[comp_sum]", float, double) {
  using S = TestType;
  using limits = std::numeric_limits<S>;
  auto rejects = [](auto&& make) {
    try {
      make();
      FAIL("no throw");
    } catch (const gradus::invalid_argument& e) {
      CHECK(std::string(e.what()).find("'options.weight'") != std::string::npos);
    }
  };
  const S largest_denormal = std::nextafter(limits::min(), S(0));
  // The reproducers, their denormal weight, then the smallest normal one in its place.
  rejects([&] { CompSumLoss<S>({.weight = vector_of<S>({limits::denorm_min(), 10, S(4.2)}), .label_smoothing = limits::denorm_min()}); });
  rejects([&] { CompSumLoss<S>({.weight = vector_of<S>({largest_denormal, 10, S(4.2)})}); });
  rejects([&] { CompSumLoss<S>({.tau = S(2) / 3, .weight = vector_of<S>({8, largest_denormal, 8})}); });
  rejects([&] { CompSumLoss<S>({.weight = vector_of<S>({-limits::min(), 10, S(4.2)})}); });
  const Labels y0 = Labels::Constant(1, 0), y1 = Labels::Constant(1, 1), y2 = Labels::Constant(1, 2);
  RowMatrix<S> g(1, 3);
  Vector<S> per(1);
  for (const Reduction reduction : {Reduction::Mean, Reduction::Sum}) {
    INFO("reduction " << int(reduction));
    const CompSumOptions<S> tiny{.reduction = reduction, .weight = vector_of<S>({limits::min(), 10, S(4.2)}),
                                 .label_smoothing = limits::denorm_min()};
    const RowMatrix<S> flat = row_of<S>({-8, -8, -8});
    CHECK(close_to(CompSumLoss<S>(tiny).value_and_grad(flat, y0, g), weighted_reference(tiny, flat, y0), 16));
    CHECK(g.allFinite());
    for (const S tau : {S(2) / 3, S(0), S(2), S(3)}) {
      INFO("tau " << tau);
      const CompSumOptions<S> o{.tau = tau, .reduction = reduction, .weight = vector_of<S>({8, limits::min(), 8})};
      const RowMatrix<S> h = row_of<S>({4, -4, -4});
      CHECK(close_to(CompSumLoss<S>(o).value_and_grad(h, y1, g), weighted_reference(o, h, y1), 64));
      CHECK(g.allFinite());
      CompSumLoss<S>(o).values(h, y1, per);
      CHECK(std::isfinite(per(0)));
    }
  }
  // Sums: the largest finite works, with and without smoothing; the next one is rejected.
  const S big = limits::max() / 4;
  const S rest = limits::max() / 2;
  for (const S eps : {S(0), std::nextafter(S(1), S(0)), S(0.5)}) {
    INFO("smoothing " << eps);
    const CompSumOptions<S> o{.weight = vector_of<S>({S(1e4), big, rest}), .ignore_index = 1, .label_smoothing = eps};
    const RowMatrix<S> h = row_of<S>({-7, S(0.5), limits::epsilon()});
    const long double exact = weighted_reference(o, h, y2);
    CHECK(close_to(CompSumLoss<S>(o).value_and_grad(h, y2, g), exact, 64));
    CHECK(g.allFinite());
    rejects([&] { CompSumLoss<S>({.weight = vector_of<S>({S(1e4), big, limits::max()}), .label_smoothing = eps}); });
  }
  const S half = limits::max() / 2;
  const RowMatrix<S> pair = row_of<S>({S(0.5), -2});
  CHECK(close_to(CompSumLoss<S>({.weight = vector_of<S>({half, half}), .label_smoothing = S(0.5)}).value(pair, y0),
                 weighted_reference<S>({.weight = vector_of<S>({half, half}), .label_smoothing = S(0.5)}, pair, y0), 16));
  rejects([&] { CompSumLoss<S>({.weight = vector_of<S>({half, std::nextafter(half, limits::infinity())})}); });
  // A mean over a tiny weight with smoothing: its spread eps/(C v_y) > 1 multiplies last
  // (the weight sum times it overflowed, and inf * log s = inf * 0 was NaN for 5000).
  for (const S eps : {S(1), S(0.5), limits::denorm_min()}) {
    INFO("smoothing " << eps);
    const CompSumOptions<S> o{.weight = vector_of<S>({limits::min(), limits::max() / 2}), .label_smoothing = eps};
    for (const Index c : {Index(2), Index(20)}) {  // the few-class blocks and the rows
      RowMatrix<S> h = RowMatrix<S>::Constant(3, 2, S(0));
      h.col(0).setConstant(S(-1e4));
      if (c == 20) {
        RowMatrix<S> wide = RowMatrix<S>::Constant(3, 20, S(-1e4));
        wide.leftCols(2) = h;
        h = wide;
      }
      CompSumOptions<S> oc = o;
      oc.weight = Vector<S>::Zero(c);
      oc.weight.head(2) = o.weight;
      const Labels y = Labels::Zero(3);
      RowMatrix<S> gc(3, c);
      const long double exact = weighted_reference(oc, h, y);
      INFO(c << " classes, exact " << double(exact));
      REQUIRE(std::isfinite(double(exact)));
      CHECK(close_to(CompSumLoss<S>(oc).value_and_grad(h, y, gc), exact, 256, 1e4));
    }
  }
}

// A class weight of 0 times an overflowing sum-exponential loss (float tau 0, weight [0, 6],
// logits [-9921.9, -8], label 0) gave NaN in values(): the row now contributes exactly 0, like an
// ignored row, on every path (few-class blocks, rows, float AVX-512 rows).
TEMPLATE_TEST_CASE("a row of class weight 0 contributes exactly 0, even where its loss overflows", "[comp_sum]", float,
                   double) {
  using S = TestType;
  for (const Index c : {Index(2), Index(5), Index(20)}) {
    for (const Index n : {Index(1), Index(3), Index(40)}) {
      for (const S tau : {S(0), S(0.5)}) {
        INFO(n << " x " << c << ", tau " << tau);
        RowMatrix<S> h = RowMatrix<S>::Constant(n, c, S(-8));
        Labels y = Labels::Zero(n);
        for (Index i = 0; i < n; ++i) {
          if (i % 2 == 0) {
            h(i, 0) = S(-9921.875);  // weight 0, a loss beyond the largest float and double
          } else {
            y(i) = 1;
            h(i, 1) = S(-6);
          }
        }
        Vector<S> weight = Vector<S>::Constant(c, S(3));
        weight(0) = 0;
        weight(1) = 6;
        const CompSumOptions<S> o{.tau = tau, .reduction = Reduction::Sum, .weight = weight, .ignore_index = -100};
        const CompSumLoss<S> loss(o);
        Vector<S> per(n);
        loss.values(h, y, per);
        RowMatrix<S> g(n, c);
        const S value = loss.value_and_grad(h, y, g);
        CHECK(std::isfinite(value));
        CHECK(close_to(value, weighted_reference(o, h, y), 16 * double(n)));
        CHECK(g.allFinite());
        for (Index i = 0; i < n; i += 2) {
          CHECK(per(i) == 0);
          CHECK((g.row(i).array() == 0).all());
        }
        for (Index i = 1; i < n; i += 2) CHECK(per(i) > 0);
        // Mean over the counted weights (the odd rows), and the value() path.
        if (n > 1) {
          CompSumOptions<S> mean = o;
          mean.reduction = Reduction::Mean;
          CHECK(close_to(CompSumLoss<S>(mean).value(h, y), weighted_reference(mean, h, y), 16 * double(n)));
        } else {
          CHECK(loss.value(h, y) == 0);
        }
      }
    }
  }
}

// A row whose logit spread overflows S is outside what the kernel computes (float smoothing
// 1e-45, logits [-3.38e38, 2.50e38] gave NaN, as documented); spreads up to the largest finite
// work with label smoothing.
TEMPLATE_TEST_CASE("label smoothing over logit spreads up to the largest finite", "[comp_sum]", float, double) {
  using S = TestType;
  using limits = std::numeric_limits<S>;
  const Labels y = Labels::Constant(1, 1);
  RowMatrix<S> g(1, 2);
  for (const S eps : {limits::denorm_min(), S(0.1), S(1)}) {
    for (const S z : {limits::max() / 4, limits::max() / 2}) {
      INFO("smoothing " << eps << ", logits +-" << z);
      const CompSumOptions<S> o{.label_smoothing = eps};
      const RowMatrix<S> h = row_of<S>({-z, z});
      // Accurate to the rounding of lse at |h| = z, and to the smoothing term's own size where
      // eps/C rounds in the denormals.
      const S value = CrossEntropyLoss<S>({.label_smoothing = eps}).value_and_grad(h, y, g);
      const long double exact = weighted_reference(o, h, y);
      CHECK(std::isfinite(value));
      CHECK(std::fabs(value - exact) <= 8 * limits::epsilon() * exact + (long double)eps * z + limits::denorm_min());
      CHECK(g.allFinite());
    }
  }
}

// Label smoothing on a many-class row whose entries lie max/4 apart: the sum of h_j - m over
// the row overflowed before eps/C met it (double, smoothing 0.1, 16 classes, logits -8 and
// 4.49e307, label 15: inf for 4.49e306).
TEMPLATE_TEST_CASE("label smoothing: the sum over a row of wide logits overflows no sooner than the value", "[comp_sum]",
                   float, double) {
  using S = TestType;
  using limits = std::numeric_limits<S>;
  for (const Index c : {Index(16), Index(40)}) {
    RowMatrix<S> h = RowMatrix<S>::Constant(1, c, S(-8));
    h(0, c - 1) = limits::max() / 4;
    const Labels y = Labels::Constant(1, int(c) - 1);
    const CompSumOptions<S> o{.reduction = Reduction::Sum, .label_smoothing = S(0.1)};
    RowMatrix<S> g(1, c);
    const S value = CompSumLoss<S>(o).value_and_grad(h, y, g);
    const long double exact = weighted_reference(o, h, y);
    INFO(c << " classes: " << value << " for " << double(exact));
    CHECK(std::isfinite(value));
    CHECK(std::fabs(value - exact) <= 1e-5L * exact);
    CHECK(g.allFinite());
  }
}

// Rows of many classes without a gradient (value(), values()) took the others' sum as s - e_y,
// which loses its digits as p_y nears 1: tau 2, logits [27.346045, -8 (16 times)], label 0 gave
// per-sample values away from value_and_grad()'s 7.1372e-15. It is now summed around the label.
TEMPLATE_TEST_CASE("value() and values() of confident many-class rows match value_and_grad()", "[comp_sum]", float,
                   double) {
  using S = TestType;
  for (const Index c : {Index(17), Index(64)}) {
    for (const S tau : {S(2), S(1.7), S(3), S(0.5)}) {
      for (const int label : {0, 5, int(c) - 1}) {
        INFO(c << " classes, tau " << tau << ", label " << label);
        RowMatrix<S> h = RowMatrix<S>::Constant(1, c, S(-8));
        h(0, label) = S(27.346045);
        const Labels y = Labels::Constant(1, label);
        const CompSumOptions<S> o{.tau = tau, .reduction = Reduction::Sum};
        const CompSumLoss<S> loss(o);
        RowMatrix<S> g(1, c);
        Vector<S> per(1);
        const S value = loss.value_and_grad(h, y, g);
        loss.values(h, y, per);
        const long double exact = weighted_reference(o, h, y);
        // Near the reference (itself rounded: log of 1 + 7e-15 in long double); the three agree
        // to a few eps.
        CHECK(std::fabs(value - exact) <= 1e-4L * exact);
        CHECK(std::fabs(per(0) - exact) <= 1e-4L * exact);
        CHECK(std::fabs(per(0) - value) <= 8 * std::numeric_limits<S>::epsilon() * value);
        CHECK(std::fabs(loss.value(h, y) - value) <= 8 * std::numeric_limits<S>::epsilon() * value);
      }
    }
  }
}

// Reduction(7) behaved as Sum.
TEST_CASE("out-of-range reductions are rejected by every comp-sum loss", "[comp_sum]") {
  const auto bad = static_cast<Reduction>(7);
  auto rejects = [](auto&& make, const std::string& function) {
    try {
      make();
      FAIL("no throw from " << function);
    } catch (const gradus::invalid_argument& e) {
      const std::string what = e.what();
      INFO(what);
      CHECK(what.find("gradus::" + function + ":") != std::string::npos);
      CHECK(what.find("'reduction'") != std::string::npos);
    }
  };
  rejects([&] { CompSumLoss<float>({.reduction = bad}); }, "CompSumLoss");
  rejects([&] { CrossEntropyLoss<double>({.reduction = bad}); }, "CrossEntropyLoss");
  rejects([&] { SumExponentialLoss<float>({.reduction = bad}); }, "SumExponentialLoss");
  rejects([&] { GeneralizedCrossEntropyLoss<float>({.reduction = bad}); }, "GeneralizedCrossEntropyLoss");
  rejects([&] { MeanAbsoluteErrorLoss<double>({.reduction = bad}); }, "MeanAbsoluteErrorLoss");
  rejects([&] { CompSumLoss<float>({.reduction = static_cast<Reduction>(-1)}); }, "CompSumLoss");
  CHECK_NOTHROW(CompSumLoss<float>({.reduction = Reduction::None}));
}

TEMPLATE_TEST_CASE("odd inputs: -0, denormal and huge logits, one class, NaN and inf", "[comp_sum]", float, double) {
  using S = TestType;
  using limits = std::numeric_limits<S>;
  for (const Index c : {1, 3, 20}) {
    const Index n = 40;
    Labels y = random_labels(n, c, 7);
    for (const S fill : {S(-0.0), limits::denorm_min(), -limits::denorm_min(), S(1e30), S(-1e30)}) {
      RowMatrix<S> h = RowMatrix<S>::Constant(n, c, fill);
      h(0, 0) = S(0);
      RowMatrix<S> g(n, c);
      INFO(c << " classes, fill " << fill);
      const S value = CrossEntropyLoss<S>({.reduction = Reduction::Sum}).value_and_grad(h, y, g);
      CHECK(std::isfinite(value));
      CHECK(g.allFinite());
      for (Index i = 1; i < n; ++i) CHECK(std::fabs(g.row(i).sum()) <= 8 * c * limits::epsilon());
    }
    // 1e30 logits apart: p is 0 or 1 exactly, the value 1e30 where the label is far below.
    RowMatrix<S> h = RowMatrix<S>::Zero(n, c);
    h.col(0).setConstant(S(1e30));
    for (Index i = 0; i < n; ++i) y(i) = int(i % c);
    Vector<S> values(n);
    RowMatrix<S> g(n, c);
    const CrossEntropyLoss<S> ce({.reduction = Reduction::Sum});
    ce.values(h, y, values);
    ce.value_and_grad(h, y, g);
    CHECK(g.allFinite());
    for (Index i = 0; i < n; ++i) CHECK(values(i) == (y(i) == 0 ? S(0) : S(1e30)));
  }
  // N x 0 and zero rows are rejected; an inf logit makes its row NaN, not others.
  CHECK_THROWS_AS(CrossEntropyLoss<S>{}.value(RowMatrix<S>(3, 0), Labels::Zero(3)), gradus::invalid_argument);
  CHECK_THROWS_AS(CrossEntropyLoss<S>{}.value(RowMatrix<S>(0, 3), Labels(0)), gradus::invalid_argument);
  RowMatrix<S> h = RowMatrix<S>::Zero(40, 4);
  h(5, 2) = limits::infinity();
  h(6, 1) = -limits::infinity();
  RowMatrix<S> g(40, 4);
  Labels y = random_labels(40, 4, 9);
  y(6) = 0;
  CHECK(std::isnan(CrossEntropyLoss<S>{}.value_and_grad(h, y, g)));
  CHECK(g.row(5).array().isNaN().any());
  CHECK(g.row(6).allFinite());
  CHECK(g(6, 1) == 0);
  CHECK(g.row(7).allFinite());
}

#ifdef GRADUS_OPENMP
// value_and_grad(X, y, X) with 2-7 threads: the packet transposes read past a block's last row
// into the next thread's rows while that thread wrote its gradient there (a data race that
// ThreadSanitizer reports; this test is the one its build runs). Floats of 3 classes, strided
// and contiguous, and doubles.
TEMPLATE_TEST_CASE("in-place gradients under OpenMP: no thread reads another's rows", "[comp_sum][openmp]", float,
                   double) {
  using S = TestType;
  const Index n = 70000, c = 3;
  const auto h = random_logits<S>(n, c, 2.0, 41);
  const auto y = random_labels(n, c, 42);
  const CompSumLoss<S> loss({.tau = S(1.5)});
  RowMatrix<S> expected(n, c);
  const int threads = omp_get_max_threads();
  omp_set_num_threads(1);
  const S serial = loss.value_and_grad(h, y, expected);
  for (int team = 2; team <= 7; ++team) {
    omp_set_num_threads(team);
    INFO(team << " threads");
    RowMatrix<S> in_place = h;
    CHECK(loss.value_and_grad(in_place, y, in_place) == Approx(serial).epsilon(1e-5));
    CHECK(in_place.isApprox(expected, 8 * std::numeric_limits<S>::epsilon()));
    RowMatrix<S> wide = RowMatrix<S>::Zero(n, c + 1);
    wide.leftCols(c) = h;
    CHECK(loss.value_and_grad(wide.leftCols(c), y, wide.leftCols(c)) == Approx(serial).epsilon(1e-5));
    CHECK(wide.leftCols(c).isApprox(expected, 8 * std::numeric_limits<S>::epsilon()));
  }
  omp_set_num_threads(threads);
}
#endif
