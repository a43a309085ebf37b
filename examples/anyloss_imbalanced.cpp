// AnyLoss on imbalanced data (Han, Moniz, Chawla, KDD 2024): a classifier trained with
// binary cross-entropy against the same classifier trained with AnyLoss-F1, -G-mean and
// -balanced-accuracy, each scored on test F1, G-mean and balanced accuracy.
//
// Data: breast cancer (569 x 30, malignant = positive, 212 vs 357) and a synthetic set
// shaped like the authors' (10,000 points, 10% positive, 2 features): two Gaussian clusters
// at corners of a square of side 2 * 1.2 with random covariances, 1% of labels flipped, as
// scikit-learn's make_classification(weights=[0.9, 0.1], class_sep=1.2) draws them, but
// generated in 2 dimensions directly rather than in 5 and projected by PCA.
// Models: logistic regression and the authors' 2-hidden-unit MLP (sigmoid hidden layer,
// linear output, no batch normalization). Training as in the authors' notebooks: Adam
// (lr 1e-3), minibatches of 5% of the training set, 50 epochs, threshold p = 0.5.
// 5-fold stratified cross-validation with a fresh initialization in every fold.
// The claim checked: each AnyLoss variant at least matches BCE on its own metric.

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include <Eigen/Eigenvalues>

#include <gradus/losses/anyloss.hpp>
#include <gradus/models/linear.hpp>
#include <gradus/models/mlp.hpp>
#include <gradus/optim/minimize.hpp>
#include <gradus/optim/objective.hpp>
#include <gradus/optim/transforms.hpp>

#include "example_data.hpp"

namespace {

using examples::Dataset;
using examples::Index;
using Matrix = gradus::RowMatrix<double>;
using gradus::Metric;

// The baseline: binary cross-entropy on one logit per row, mean of softplus(z) - y z.
struct BinaryCrossEntropy {
  using Scalar = double;

  template <class DZ, class DY>
  double value(const Eigen::MatrixBase<DZ>& Z, const Eigen::MatrixBase<DY>& y) const {
    double sum = 0;
    for (Index i = 0; i < Z.rows(); ++i) {
      const double z = Z(i, 0);
      sum += std::max(z, 0.0) + std::log1p(std::exp(-std::abs(z))) - y(i) * z;
    }
    return sum / double(Z.rows());
  }
  template <class DZ, class DY>
  double value_and_grad(const Eigen::MatrixBase<DZ>& Z, const Eigen::MatrixBase<DY>& y,
                        Eigen::Ref<Matrix> dZ) const {
    for (Index i = 0; i < Z.rows(); ++i) dZ(i, 0) = (1 / (1 + std::exp(-Z(i, 0))) - y(i)) / double(Z.rows());
    return value(Z, y);
  }
};

// The authors' synthetic set: scikit-learn's make_classification(n_samples=n, weights=[1 - q, q],
// class_sep=1.2, n_features=5, n_informative=3, n_redundant=1, n_clusters_per_class=1,
// flip_y=0.01) followed by PCA to 2 dimensions, re-implemented with its recipe (our random
// stream, so not the same points): one Gaussian cluster per class at a vertex of the cube
// [-sep, sep]^3, N(0, I) times a random matrix with entries U(-1, 1); a redundant feature
// that is a random combination of the informative ones; a pure-noise feature; 1% of labels
// redrawn at random.
Dataset authors_synthetic(Index n, double positive_fraction, double sep, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal;
  std::uniform_real_distribution<double> uniform(-1, 1), unit(0, 1);
  // Two distinct random vertices of the cube.
  const int first = int(unit(rng) * 8), second = (first + 1 + int(unit(rng) * 7)) % 8;
  Eigen::Vector3d vertex[2];
  for (int k = 0; k < 3; ++k) {
    vertex[0](k) = (first >> k & 1) ? sep : -sep;
    vertex[1](k) = (second >> k & 1) ? sep : -sep;
  }
  Eigen::Matrix3d shape[2];
  for (auto& A : shape)
    for (Index k = 0; k < 9; ++k) A.data()[k] = uniform(rng);
  Eigen::Vector3d redundant;
  for (auto& b : redundant) b = uniform(rng);
  Matrix X(n, 5);
  gradus::Labels y(n);
  const Index positives = std::lround(positive_fraction * double(n));
  for (Index i = 0; i < n; ++i) {
    const int c = i < positives;
    Eigen::Vector3d z;
    for (auto& v : z) v = normal(rng);
    const Eigen::Vector3d x = shape[c].transpose() * z + vertex[c];
    X.row(i) << x(0), x(1), x(2), x.dot(redundant), normal(rng);
    y(i) = unit(rng) < 0.01 ? int(unit(rng) < 0.5) : c;
  }
  // PCA: the two leading eigenvectors of the covariance of the centred features.
  X.rowwise() -= X.colwise().mean();
  const Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> pca(X.transpose() * X / double(n));
  return {X * pca.eigenvectors().rightCols(2).rowwise().reverse(), y};
}

// fold[i] in [0, k): every class spread evenly over the folds after a seeded shuffle.
std::vector<int> stratified_folds(const gradus::Labels& y, int k, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<int> fold(std::size_t(y.size()));
  for (int c = 0; c <= y.maxCoeff(); ++c) {
    std::vector<Index> members;
    for (Index i = 0; i < y.size(); ++i)
      if (y(i) == c) members.push_back(i);
    std::shuffle(members.begin(), members.end(), rng);
    for (std::size_t j = 0; j < members.size(); ++j) fold[std::size_t(members[j])] = int(j % std::size_t(k));
  }
  return fold;
}

struct Training {
  const char* name;
  double learning_rate;
  int epochs;
  double batch_fraction = 0.05;
  int folds = 5;
  bool carry_over = false;  // the notebook's weights carried from fold to fold (optimistic)
};

struct Scores {
  std::vector<double> f1, gmean, balanced;
  double seconds = 0;
};

// Hard test metrics at threshold z = 0 (p = 0.5), through the same formulas as the losses.
void score(const Matrix& Z, const gradus::Labels& y, Scores& s) {
  double tp = 0, fn = 0, fp = 0, tn = 0;
  for (Index i = 0; i < y.size(); ++i) {
    const bool predicted = Z(i, 0) > 0;
    (y(i) ? (predicted ? tp : fn) : (predicted ? fp : tn)) += 1;
  }
  s.f1.push_back(gradus::ConfusionMetric{Metric::F1}(tp, fn, fp, tn));
  s.gmean.push_back(gradus::ConfusionMetric{Metric::GMean}(tp, fn, fp, tn));
  s.balanced.push_back(gradus::ConfusionMetric{Metric::BalancedAccuracy}(tp, fn, fp, tn));
}

template <class Model, class Loss>
Scores cross_validate(const Dataset& data, const std::vector<int>& fold, const Model& model, const Loss& loss,
                      const Training& t) {
  Scores scores;
  gradus::Vector<double> theta;
  for (int k = 0; k < t.folds; ++k) {
    std::vector<Index> train_rows, test_rows;
    for (Index i = 0; i < data.y.size(); ++i) (fold[std::size_t(i)] == k ? test_rows : train_rows).push_back(i);
    Dataset train = examples::take_rows(data, train_rows), test = examples::take_rows(data, test_rows);
    examples::standardize(train.X, test.X);
    const Index batch = std::max<Index>(1, std::lround(t.batch_fraction * double(train.X.rows())));
    const Index steps = t.epochs * ((train.X.rows() + batch - 1) / batch);
    const examples::Stopwatch watch;
    auto objective = gradus::make_objective(model, loss, train.X, train.y);
    if (k == 0 || !t.carry_over) theta = model.init_params(100 + std::uint64_t(k));  // fresh per fold
    const gradus::Minibatch minibatches{.batch_size = batch, .seed = std::uint64_t(k)};
    gradus::minimize(objective, theta, gradus::adam<double>({.learning_rate = t.learning_rate}),
                     gradus::Stop{.max_steps = steps}, minibatches);
    scores.seconds += watch.seconds();
    Matrix Z(test.X.rows(), 1);
    model.predict(theta, test.X, Z);
    score(Z, test.y, scores);
  }
  return scores;
}

double mean(const std::vector<double>& xs) {
  double s = 0;
  for (double x : xs) s += x;
  return s / double(xs.size());
}
double sd(const std::vector<double>& xs) {
  const double m = mean(xs);
  double s = 0;
  for (double x : xs) s += (x - m) * (x - m);
  return std::sqrt(s / double(std::max<std::size_t>(xs.size() - 1, 1)));
}

struct Verdicts {
  int better = 0, matches = 0, worse = 0;
};

void print_row(const char* model, const std::string& loss, const Scores& s, const Training& t) {
  std::printf("  %-10s %-25s %.4f +- %.4f  %.4f +- %.4f  %.4f +- %.4f  %6.3f s", model, loss.c_str(), mean(s.f1),
              sd(s.f1), mean(s.gmean), sd(s.gmean), mean(s.balanced), sd(s.balanced), s.seconds / t.folds);
}

// Rows for one model: BCE, then each AnyLoss variant at L = 73 (the authors' code) and 30,
// with its difference to BCE on the metric it optimizes. A difference within one sd of the
// per-fold differences is a tie: the claim is "at least matches".
template <class Model>
void compare(const char* name, const Dataset& data, const Model& model, const Training& t, Verdicts& verdicts) {
  const auto fold = stratified_folds(data.y, t.folds, 2);
  const Scores bce = cross_validate(data, fold, model, BinaryCrossEntropy{}, t);
  print_row(name, "BCE", bce, t);
  std::printf("\n");
  struct Variant {
    Metric metric;
    const char* name;
    std::vector<double> Scores::*own;
  };
  const Variant variants[] = {{Metric::F1, "AnyLoss-F1", &Scores::f1},
                              {Metric::GMean, "AnyLoss-G-mean", &Scores::gmean},
                              {Metric::BalancedAccuracy, "AnyLoss-bal.acc.", &Scores::balanced}};
  for (const double L : {73.0, 30.0}) {
    for (const auto& v : variants) {
      // The authors' stabilizer keeps a one-class minibatch (possible at 5% batches) defined.
      const gradus::AnyLoss<double> loss({.metric = v.metric, .amplify = L, .stabilizer = 1e-5});
      const Scores s = cross_validate(data, fold, model, loss, t);
      std::vector<double> diff;
      for (int k = 0; k < t.folds; ++k) diff.push_back((s.*v.own)[std::size_t(k)] - (bce.*v.own)[std::size_t(k)]);
      const double d = mean(diff), spread = sd(diff);
      const char* verdict = d > spread ? "better" : d >= -spread ? "tie" : "WORSE";
      ++(d > spread ? verdicts.better : d >= -spread ? verdicts.matches : verdicts.worse);
      print_row(name, std::string(v.name) + " (L=" + std::to_string(int(L)) + ")", s, t);
      std::printf("   %+.4f +- %.4f %s\n", d, spread, verdict);
    }
  }
}

template <class Logistic, class Net>
void data_set(const char* title, const Dataset& data, const Logistic& logistic, const Net& mlp,
              const char* mlp_name, const Training& t) {
  std::printf("%s -- %s: Adam lr %g, %d epochs, batch %g%% of the training set\n", title, t.name, t.learning_rate,
              t.epochs, 100 * t.batch_fraction);
  std::printf("  %-10s %-25s %-17s %-17s %-17s %-9s %s\n", "model", "loss", "test F1", "test G-mean",
              "test bal. acc.", "fit/fold", "own metric - BCE");
  Verdicts v;
  compare("logistic", data, logistic, t, v);
  compare(mlp_name, data, mlp, t, v);
  std::printf("  AnyLoss vs BCE on its own metric: %d better, %d tie, %d worse (of %d): ", v.better, v.matches,
              v.worse, v.better + v.matches + v.worse);
  if (v.worse == 0) std::printf("the claim (at least matches BCE) holds here\n\n");
  else std::printf("the claim (at least matches BCE) FAILS in %d of them\n\n", v.worse);
}

}  // namespace

int main() {
  const bool smoke = examples::smoke();
  const examples::Stopwatch total;
  Dataset cancer = examples::load_breast_cancer();
  cancer.y = 1 - cancer.y.array();  // scikit-learn's 0 = malignant: the minority becomes the positive class
  const Dataset synth = authors_synthetic(smoke ? 2000 : 10000, 0.1, 1.2, 0);
  std::printf("AnyLoss vs BCE, 5-fold stratified CV with a fresh initialization in every fold, threshold p = 0.5\n");
  std::printf("breast cancer: %ld x %ld, %ld positive (malignant); synthetic (authors' recipe): %ld x 2, %ld "
              "positive\n\n", long(cancer.X.rows()), long(cancer.X.cols()), long(cancer.y.sum()),
              long(synth.X.rows()), long(synth.y.sum()));

  // The authors' budget, and a longer one under which BCE itself has converged.
  const Training budgets[] = {{"authors' budget", 1e-3, smoke ? 1 : 50}, {"longer budget", 1e-2, smoke ? 1 : 100}};
  const gradus::LinearModel<double> logistic_cancer(cancer.X.cols(), 1), logistic_synth(2, 1);
  const gradus::MLP<double> mlp_cancer({cancer.X.cols(), 2, 1}, gradus::Activation::Sigmoid);
  const gradus::MLP<double> mlp_synth({2, 2, 1}, gradus::Activation::Sigmoid);
  for (const Training& t : budgets) {
    data_set("breast cancer", cancer, logistic_cancer, mlp_cancer, "MLP 30-2-1", t);
    data_set("synthetic", synth, logistic_synth, mlp_synth, "MLP 2-2-1", t);
  }

  // The authors' notebook: AnyLoss-F1, L = 73, 2-unit MLP, weights carried over between folds.
  Training notebook = budgets[0];
  notebook.carry_over = true;
  const auto fold = stratified_folds(synth.y, notebook.folds, 2);
  const Scores carried = cross_validate(
      synth, fold, mlp_synth, gradus::AnyLoss<double>({.metric = Metric::F1, .amplify = 73, .stabilizer = 1e-5}),
      notebook);
  std::printf("Authors' notebook ([Hyper_T1_1]_ValidL): AnyLoss-F1, L = 73, 2-unit MLP with batch normalization,\n"
              "weights carried over between folds: mean test F1 0.6334 on their draw of the synthetic set.\n"
              "Here, MLP 2-2-1 without batch normalization, weights carried over: F1 %.4f +- %.4f\n"
              "(fresh initialization per fold: the MLP 2-2-1 AnyLoss-F1 (L=73) row of the first synthetic\n"
              "table).\n",
              mean(carried.f1), sd(carried.f1));
  std::printf("total %.1f s\n", total.seconds());
  if (smoke) std::printf("(smoke run: 1 epoch, the numbers mean nothing)\n");
  return 0;
}
