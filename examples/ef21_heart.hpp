#pragma once
// The EF21 vs EF21-W experiment on heart_scale, shared by examples/ef21_heart.cpp (in process) and
// examples/mpi/ef21_heart_mpi.cpp (one block of clients per MPI rank): both print the same table.
//
// heart_scale (270 x 13, labels +/-1) plus a bias column, d = 14; n = 27 clients of 10 consecutive
// rows; client 0's rows times c in {1, 10}; logistic loss with the non-convex regularizer, lambda = 0.1;
// Top-1 (alpha = 1/14); x0 ~ N(0, I) with a fixed seed; g_i^0 = grad f_i(x0).
// EF21 with gamma_QM = 1/(L + L_QM xi) against EF21-W with gamma_AM = 1/(L + L_AM xi): rounds until
// ||grad f(x)||^2 <= 1e-2 ||grad f(x0)||^2, and bits each client sent (values; values + indices).
// Paper's claim (Error Feedback Reloaded): the AM step needs >= 2.5x fewer rounds at c = 10, and is
// within 10% at c = 1 (the thresholds come from the project's notes, measured in numpy).

#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include <gradus/optim/ef21.hpp>

#include "example_data.hpp"

namespace examples::ef21_heart {

using gradus::ef21::EF21Options;
using gradus::ef21::NonconvexLogistic;
using gradus::ef21::TopK;

constexpr gradus::Index kClients = 27, kRowsPerClient = 10;
constexpr double kTolerance = 1e-2;

struct Problem {
  std::vector<NonconvexLogistic<double>> clients;
  std::vector<double> L_i;
  double L = 0;
  Eigen::VectorXd x0;
};

inline Problem make_problem(double c) {
  const Dataset data = load_libsvm(data_path("heart_scale"), 13);
  Matrix A(data.X.rows(), 14);
  A << data.X, Eigen::VectorXd::Ones(data.X.rows());
  A.topRows(kRowsPerClient) *= c;
  Problem problem;
  for (Index i = 0; i < kClients; ++i) {
    problem.clients.emplace_back(A.middleRows(i * kRowsPerClient, kRowsPerClient),
                                 data.y.segment(i * kRowsPerClient, kRowsPerClient));
    problem.L_i.push_back(problem.clients.back().smoothness());
  }
  problem.L = gradus::ef21::logistic_smoothness(A, 0.1);
  std::mt19937_64 rng(0);
  std::normal_distribution<double> normal;
  problem.x0.resize(14);
  for (auto& value : problem.x0) value = normal(rng);
  return problem;
}

struct Outcome {
  Index rounds = -1;  // -1: not reached
  double value_bits_per_client = 0, total_bits_per_client = 0, final_grad_norm_sq = 0;
};

// Runs until the tolerance (or max_rounds) on this process's clients [begin, end).
template <class Transport>
Outcome run(const Problem& problem, Index begin, Index end, EF21Options options, Index max_rounds, Transport transport) {
  std::vector<NonconvexLogistic<double>> mine(problem.clients.begin() + begin, problem.clients.begin() + end);
  gradus::ef21::EF21 method(std::move(mine), TopK{1}, problem.x0, std::move(options), transport);
  const double target = kTolerance * method.initial().grad_norm_sq;
  Outcome outcome;
  double value_bits = 0, index_bits = 0;
  for (Index t = 1; t <= max_rounds; ++t) {
    const auto info = method.step();
    value_bits += static_cast<double>(info.value_bits);
    index_bits += static_cast<double>(info.index_bits);
    outcome.final_grad_norm_sq = info.grad_norm_sq;
    if (info.grad_norm_sq <= target) {
      outcome.rounds = t;
      break;
    }
  }
  outcome.value_bits_per_client = value_bits / kClients;
  outcome.total_bits_per_client = (value_bits + index_bits) / kClients;
  return outcome;
}

inline std::string rounds_text(const Outcome& outcome, Index max_rounds) {
  char text[32];
  std::snprintf(text, sizeof text, outcome.rounds < 0 ? ">%lld" : "%lld",
                static_cast<long long>(outcome.rounds < 0 ? max_rounds : outcome.rounds));
  return text;
}

// client_block(n) -> [begin, end) of this process; print only where asked (rank 0 over MPI).
template <class Transport, class Block>
int main_loop(Transport transport, Block client_block, bool print) {
  const bool quick = smoke();
  const Index max_rounds = quick ? 50 : 40000;
  const auto [begin, end] = client_block(kClients);
  const double alpha = TopK{1}.alpha(14);
  if (print) {
    std::printf("EF21 (L_QM step) vs EF21-W (L_AM step) on heart_scale: n = %lld clients x %lld rows, d = 14, Top-1%s\n",
                static_cast<long long>(kClients), static_cast<long long>(kRowsPerClient), quick ? " [smoke]" : "");
    std::printf("target ||grad f||^2 <= %.0e ||grad f(x0)||^2; bits per client: values (64 per double) | values + int32 indices\n\n",
                kTolerance);
    std::printf("%4s %6s %6s %6s %7s %9s | %9s %12s %12s | %9s %12s %12s | %7s\n", "c", "L", "L_AM", "L_QM",
                "QM/AM", "gAM/gQM", "EF21 QM", "bits", "+indices", "EF21-W AM", "bits", "+indices", "speedup");
  }
  struct Row {
    double c, speedup, qm_final, am_final;
    bool reached;
  };
  std::vector<Row> rows;
  Stopwatch clock;
  for (double c : {1.0, 10.0}) {
    const Problem problem = make_problem(c);
    const double L_AM = gradus::ef21::arithmetic_mean(problem.L_i), L_QM = gradus::ef21::quadratic_mean(problem.L_i);
    const double gamma_QM = gradus::ef21::step_size(problem.L, problem.L_i, alpha, gradus::ef21::StepRule::QuadraticMean);
    const double gamma_AM = gradus::ef21::step_size(problem.L, problem.L_i, alpha, gradus::ef21::StepRule::ArithmeticMean);
    const Outcome qm = run(problem, begin, end, {.gamma = gamma_QM}, max_rounds, transport);
    const Outcome am = run(problem, begin, end, {.gamma = gamma_AM, .weights = problem.L_i}, max_rounds, transport);
    const bool reached = qm.rounds > 0 && am.rounds > 0;
    const double speedup = reached ? double(qm.rounds) / double(am.rounds) : 0;
    rows.push_back({c, speedup, qm.final_grad_norm_sq, am.final_grad_norm_sq, reached});
    if (print) {
      std::printf("%4.0f %6.2f %6.2f %6.2f %7.2f %9.2f | %9s %12.4g %12.4g | %9s %12.4g %12.4g | %6.2fx\n", c,
                  problem.L, L_AM, L_QM, L_QM / L_AM, gamma_AM / gamma_QM, rounds_text(qm, max_rounds).c_str(),
                  qm.value_bits_per_client, qm.total_bits_per_client, rounds_text(am, max_rounds).c_str(),
                  am.value_bits_per_client, am.total_bits_per_client, speedup);
    }
  }
  if (print) {
    std::printf("\ntime %.2f s\n", clock.seconds());
    std::printf("paper's claim: >= 2.5x fewer rounds with L_AM at c = 10, within 10%% at c = 1\n");
    std::printf("(final ||grad f||^2 to 17 digits, to compare runs bit for bit, e.g. in process against MPI)\n");
    for (const Row& row : rows) {
      const bool holds = row.reached && (row.c > 1 ? row.speedup >= 2.5 : row.speedup >= 0.9 && row.speedup <= 1.1);
      std::printf("  c = %2.0f: %s; final ||grad f||^2 EF21 %.17g, EF21-W %.17g\n", row.c,
                  !row.reached ? "target not reached within the round budget"
                  : holds      ? "claim holds"
                               : "claim does NOT hold here",
                  row.qm_final, row.am_final);
    }
  }
  return 0;
}

}  // namespace examples::ef21_heart
