#pragma once
// Data set readers and small utilities shared by the gradus examples (not part of the
// library). The files live in examples/data/ with their provenance in PROVENANCE.md.

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include <gradus/core/types.hpp>

namespace examples {

using gradus::Index;
using Matrix = gradus::RowMatrix<double>;

struct Dataset {
  Matrix X;
  gradus::Labels y;
};

inline std::string data_path(const std::string& name) { return std::string(GRADUS_DATA_DIR) + "/" + name; }

// GRADUS_SMOKE=1: the examples run a few steps only, so CI can check they work.
inline bool smoke() {
  const char* value = std::getenv("GRADUS_SMOKE");
  return value != nullptr && *value != '\0' && std::strcmp(value, "0") != 0;
}

// Rows of comma-separated numbers, the label last; skip_header for scikit-learn's files
// whose first line is "n_samples,n_features,class names...".
inline Dataset load_csv(const std::string& path, bool skip_header) {
  std::ifstream in(path);
  if (!in) throw std::runtime_error("cannot open " + path);
  std::vector<std::vector<double>> rows;
  std::string line;
  if (skip_header) std::getline(in, line);
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    std::vector<double> row;
    std::stringstream fields(line);
    for (std::string field; std::getline(fields, field, ',');) row.push_back(std::stod(field));
    rows.push_back(std::move(row));
  }
  if (rows.empty()) throw std::runtime_error(path + " has no rows");
  const Index n = static_cast<Index>(rows.size()), d = static_cast<Index>(rows[0].size()) - 1;
  Dataset data{Matrix(n, d), gradus::Labels(n)};
  for (Index i = 0; i < n; ++i) {
    for (Index j = 0; j < d; ++j) data.X(i, j) = rows[i][j];
    data.y(i) = static_cast<int>(rows[i][d]);
  }
  return data;
}

inline Dataset load_digits() { return load_csv(data_path("digits.csv"), false); }
inline Dataset load_breast_cancer() { return load_csv(data_path("breast_cancer.csv"), true); }

// LIBSVM sparse format "label index:value ...", 1-based indices; labels kept as given.
inline Dataset load_libsvm(const std::string& path, Index num_features) {
  std::ifstream in(path);
  if (!in) throw std::runtime_error("cannot open " + path);
  std::vector<std::pair<int, std::vector<std::pair<Index, double>>>> rows;
  std::string line;
  while (std::getline(in, line)) {
    std::stringstream tokens(line);
    double label;
    if (!(tokens >> label)) continue;
    std::vector<std::pair<Index, double>> entries;
    for (std::string token; tokens >> token;) {
      const auto colon = token.find(':');
      entries.emplace_back(std::stol(token.substr(0, colon)) - 1, std::stod(token.substr(colon + 1)));
    }
    rows.emplace_back(static_cast<int>(label), std::move(entries));
  }
  Dataset data{Matrix::Zero(static_cast<Index>(rows.size()), num_features), gradus::Labels(rows.size())};
  for (Index i = 0; i < static_cast<Index>(rows.size()); ++i) {
    data.y(i) = rows[i].first;
    for (const auto& [j, v] : rows[i].second) data.X(i, j) = v;
  }
  return data;
}

inline Dataset take_rows(const Dataset& data, const std::vector<Index>& rows) {
  Dataset out{Matrix(static_cast<Index>(rows.size()), data.X.cols()), gradus::Labels(rows.size())};
  for (Index i = 0; i < static_cast<Index>(rows.size()); ++i) {
    out.X.row(i) = data.X.row(rows[i]);
    out.y(i) = data.y(rows[i]);
  }
  return out;
}

// Stratified split: test_fraction of every class goes to the test set.
inline std::pair<Dataset, Dataset> stratified_split(const Dataset& data, double test_fraction, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  const int classes = data.y.maxCoeff() + 1;
  std::vector<Index> train, test;
  for (int c = 0; c < classes; ++c) {
    std::vector<Index> members;
    for (Index i = 0; i < data.y.size(); ++i)
      if (data.y(i) == c) members.push_back(i);
    std::shuffle(members.begin(), members.end(), rng);
    const auto cut = static_cast<std::size_t>(std::lround(test_fraction * static_cast<double>(members.size())));
    test.insert(test.end(), members.begin(), members.begin() + static_cast<std::ptrdiff_t>(cut));
    train.insert(train.end(), members.begin() + static_cast<std::ptrdiff_t>(cut), members.end());
  }
  return {take_rows(data, train), take_rows(data, test)};
}

// Scales columns to zero mean and unit variance with the training set's statistics.
inline void standardize(Matrix& train, Matrix& test) {
  const Eigen::RowVectorXd mean = train.colwise().mean();
  Eigen::RowVectorXd sd = ((train.rowwise() - mean).array().square().colwise().sum() / double(train.rows())).sqrt();
  sd = (sd.array() > 1e-12).select(sd, 1.0);
  train = (train.rowwise() - mean).array().rowwise() / sd.array();
  test = (test.rowwise() - mean).array().rowwise() / sd.array();
}

// Fraction of rows whose largest score is at the label.
template <class DZ>
double accuracy(const Eigen::MatrixBase<DZ>& scores, const gradus::Labels& y) {
  Index correct = 0;
  for (Index i = 0; i < scores.rows(); ++i) {
    Index best;
    scores.row(i).maxCoeff(&best);
    correct += (best == y(i));
  }
  return double(correct) / double(scores.rows());
}

class Stopwatch {
 public:
  double seconds() const { return std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count(); }

 private:
  std::chrono::steady_clock::time_point start_ = std::chrono::steady_clock::now();
};

}  // namespace examples
