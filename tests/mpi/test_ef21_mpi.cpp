// EF21 over MPI (run with 4 ranks): iterates equal the in-process simulation, checkpoints resume,
// and a failure on one rank stops every rank with an error instead of a hang.
// Only CHECK after collectives: a REQUIRE that fails on one rank would leave the others waiting.
#include <catch2/catch.hpp>

#include <stdexcept>
#include <string>
#include <vector>

#include <gradus/optim/ef21/mpi.hpp>

#include "failing_client.hpp"
#include "mpi_session.hpp"

#include "../../examples/ef21_heart.hpp"

using namespace gradus;
using namespace gradus::ef21;

namespace {

using mpi_test::rank;

// The heart_scale split of the example (27 clients, client 0 scaled by 10), or its first n clients.
examples::ef21_heart::Problem heart(Index n = 27) {
  auto problem = examples::ef21_heart::make_problem(10);
  problem.clients.erase(problem.clients.begin() + n, problem.clients.end());
  problem.L_i.erase(problem.L_i.begin() + n, problem.L_i.end());
  return problem;
}

template <class F>
std::vector<F> block(const std::vector<F>& all) {
  const auto [begin, end] = block_of_clients(static_cast<Index>(all.size()));
  return {all.begin() + begin, all.begin() + end};
}

bool same_report(const RoundInfo& a, const RoundInfo& b) {
  return a.round == b.round && a.value_bits == b.value_bits && a.index_bits == b.index_bits &&
         a.participants == b.participants &&
         (a.grad_norm_sq == b.grad_norm_sq || (std::isnan(a.grad_norm_sq) && std::isnan(b.grad_norm_sq)));
}

// Runs the same method in process (all clients) and over MPI (this rank's block) and compares
// x, g, the local g_i and every round's report.
template <class F, class C>
void check_same(const std::vector<F>& clients, const Vector<typename F::Scalar>& x0, C compressor,
                const EF21Options& options, int rounds) {
  EF21 local(clients, compressor, x0, options);
  EF21 distributed(block(clients), compressor, x0, options, MpiTransport{});
  CHECK(distributed.num_clients() == local.num_clients());
  CHECK(same_report(distributed.initial(), local.initial()));
  typename F::Scalar worst = 0;
  bool same_reports = true;
  for (int t = 0; t < rounds; ++t) {
    const auto a = local.step(), b = distributed.step();
    worst = std::max(worst, (distributed.x() - local.x()).norm() / local.x().norm());
    same_reports = same_reports && same_report(a, b);
  }
  CHECK(worst <= 1e-12);  // the bar; in fact:
  CHECK(distributed.x() == local.x());  // the same arithmetic in the same order: bit for bit
  CHECK(distributed.g() == local.g());
  CHECK(same_reports);
  for (Index i = 0; i < distributed.num_local_clients(); ++i) {
    CHECK(distributed.client_g(i) == local.client_g(distributed.first_client() + i));
  }
}

}  // namespace

TEST_CASE("EF21 over MPI equals the in-process simulation, for every variant", "[ef21][mpi]") {
  const auto problem = heart();
  const double gamma = step_size(problem.L, problem.L_i, TopK{1}.alpha(14), StepRule::ArithmeticMean);
  check_same(problem.clients, problem.x0, TopK{1}, {.gamma = gamma}, 200);
  check_same(problem.clients, problem.x0, TopK{2}, {.gamma = gamma, .weights = problem.L_i}, 200);
  check_same(problem.clients, problem.x0, RandK{3}, {.gamma = gamma, .init = Init::Compressed, .participation = 0.3, .seed = 4}, 200);
  check_same(problem.clients, problem.x0, RandK{3, true}, {.gamma = gamma / 10, .batch_size = 4, .seed = 5, .monitor = false}, 200);
  check_same(problem.clients, problem.x0, TopK{1}, {.gamma = gamma, .init = Init::Zero, .momentum = 0.4}, 200);
  check_same(problem.clients, problem.x0, Identity{}, {.gamma = gamma}, 50);
}

TEST_CASE("EF21 over MPI with fewer clients than ranks", "[ef21][mpi]") {
  const auto problem = heart(3);
  check_same(problem.clients, problem.x0, TopK{2}, {.gamma = 0.01, .weights = problem.L_i}, 100);
}

TEST_CASE("EF21 over MPI resumes from a checkpoint with identical iterates", "[ef21][mpi]") {
  const auto problem = heart();
  const EF21Options options{.gamma = 0.01, .participation = 0.5, .momentum = 0.2, .batch_size = 5, .seed = 8};
  EF21 first(block(problem.clients), RandK{2}, problem.x0, options, MpiTransport{});
  for (int t = 0; t < 20; ++t) first.step();
  const auto state = first.checkpoint();
  for (int t = 0; t < 20; ++t) first.step();
  EF21 second(block(problem.clients), RandK{2}, problem.x0, options, MpiTransport{});
  second.restore(state);
  for (int t = 0; t < 20; ++t) second.step();
  CHECK(second.x() == first.x());
  CHECK(second.g() == first.g());
}

TEST_CASE("A rank whose client fails makes every rank stop with an error", "[ef21][mpi][errors]") {
  const auto problem = heart();
  std::vector<FailingClient> mine;
  for (const auto& client : block(problem.clients)) mine.push_back({client, rank() == 2 ? 5 : 1000});
  EF21 method(std::move(mine), TopK{1}, problem.x0, {.gamma = 0.01}, MpiTransport{});
  std::string error;
  int rounds = 0;
  try {
    for (; rounds < 100; ++rounds) method.step();
  } catch (const std::exception& e) {
    error = e.what();
  }
  CHECK(rounds == 4);  // the initialization used the first call
  if (rank() == 2) {
    CHECK(error == "disk read failed on client");
  } else {
    CHECK(error.find("rank 2 failed") != std::string::npos);
    CHECK(error.find("disk read failed on client") != std::string::npos);
  }
}

TEST_CASE("Bad input on one rank stops every rank at construction", "[ef21][mpi][errors]") {
  const auto problem = heart();
  auto mine = block(problem.clients);
  if (rank() == 1) mine.front() = NonconvexLogistic<double>(Eigen::MatrixXd::Ones(2, 5), Labels::Ones(2));
  std::string error;
  try {
    EF21 method(std::move(mine), TopK{1}, problem.x0, {.gamma = 0.01}, MpiTransport{});
  } catch (const std::exception& e) {
    error = e.what();
  }
  CHECK(error.find("'clients': expected 14 dimensions") != std::string::npos);
  if (rank() != 1) CHECK(error.find("rank 1 failed") != std::string::npos);

  // The same options everywhere, wrong everywhere: every rank throws the plain error.
  CHECK_THROWS_AS(EF21(block(problem.clients), TopK{1}, problem.x0, {.gamma = 0.01, .weights = {1, 2}}, MpiTransport{}),
                  gradus::invalid_argument);
}

TEST_CASE("EF21 over MPI in float equals the in-process simulation", "[ef21][mpi]") {
  const examples::Dataset data = examples::load_libsvm(examples::data_path("heart_scale"), 13);
  std::vector<NonconvexLogistic<float>> clients;
  for (Index i = 0; i < 27; ++i) {
    clients.emplace_back(data.X.middleRows(i * 10, 10).cast<float>(), Labels(data.y.segment(i * 10, 10)));
  }
  check_same(clients, Vector<float>::Constant(13, 0.5f), TopK{1}, {.gamma = 0.05, .weights = heart().L_i}, 200);
}
