// EF21 over MPI (run with 4 ranks) when the ranks disagree or one of them fails: every rank must end
// in a clear error, never a hang or a read past a buffer. Each case runs under ctest's TIMEOUT.
// Only CHECK after collectives: a REQUIRE that fails on one rank would leave the others waiting.
#include <catch2/catch.hpp>

#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include <gradus/optim/ef21.hpp>
#include <gradus/optim/ef21/mpi.hpp>

#include "failing_client.hpp"
#include "mpi_session.hpp"

using namespace gradus;
using namespace gradus::ef21;

namespace {

using mpi_test::rank;

// Two clients per rank, dimension d, rows from a fixed pattern (the same on every rank for a given d).
template <class S = double>
std::vector<NonconvexLogistic<S>> clients_of_dimension(Index d) {
  std::vector<NonconvexLogistic<S>> clients;
  for (Index i = 0; i < 2; ++i) {
    RowMatrix<S> A(4, d);
    for (Index r = 0; r < 4; ++r) {
      for (Index j = 0; j < d; ++j) A(r, j) = static_cast<S>(((r + 3 * j + 5 * i) % 7) - 3) / 3;
    }
    Labels y(4);
    y << 1, -1, 1, -1;
    clients.emplace_back(A, y);
  }
  return clients;
}

template <class S = double>
Vector<S> start(Index d) {
  return Vector<S>::LinSpaced(d, S(-1), S(1));
}

// The error every rank ends with (empty when none), and whether it was a gradus::invalid_argument.
struct Outcome {
  std::string error;
  bool invalid_argument = false;
};

template <class Work>
Outcome outcome_of(Work work) {
  Outcome outcome;
  try {
    work();
  } catch (const gradus::invalid_argument& e) {
    outcome = {e.what(), true};
  } catch (const std::exception& e) {
    outcome = {e.what(), false};
  }
  return outcome;
}

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

}  // namespace

TEST_CASE("Ranks with different dimensions stop with an error before any message is sized", "[ef21][mpi][errors]") {
  for (Index other : {40, 2}) {  // one rank's d larger, then smaller, than the others' d = 4
    const Index d = rank() == 1 ? other : 4;
    const auto result = outcome_of([&] { EF21 method(clients_of_dimension(d), TopK{1}, start(d), {.gamma = 0.1}, MpiTransport{}); });
    INFO(result.error);
    CHECK(result.invalid_argument);
    CHECK(result.error == "gradus::EF21::EF21: argument 'x0': expected the same size on every rank (4 on rank 0), got " +
                              std::to_string(other) + " on rank 1");
  }
}

TEST_CASE("Options that differ on one rank stop every rank with an error naming it", "[ef21][mpi][errors]") {
  const auto clients = clients_of_dimension(4);
  const EF21Options base{.gamma = 0.1, .seed = 3};
  struct Case {
    const char* argument;
    EF21Options options;
  };
  auto with = [&](auto change) {
    EF21Options options = base;
    change(options);
    return options;
  };
  const std::vector<Case> cases = {
      {"options.weights", with([](EF21Options& o) { o.weights = {1, 2, 3}; })},  // the wrong length, on one rank
      {"options.gamma", with([](EF21Options& o) { o.gamma = 0.2; })},
      {"options.init", with([](EF21Options& o) { o.init = Init::Zero; })},
      {"options.participation", with([](EF21Options& o) { o.participation = 0.5; })},
      {"options.momentum", with([](EF21Options& o) { o.momentum = 0.5; })},
      {"options.batch_size", with([](EF21Options& o) { o.batch_size = 2; })},
      {"options.seed", with([](EF21Options& o) { o.seed = 4; })},
      {"options.monitor", with([](EF21Options& o) { o.monitor = false; })},
  };
  for (const auto& c : cases) {
    const EF21Options options = rank() == 2 ? c.options : base;
    const auto result = outcome_of([&] { EF21 method(clients, TopK{1}, start(4), options, MpiTransport{}); });
    INFO(c.argument << ": " << result.error);
    CHECK(result.invalid_argument);
    CHECK(contains(result.error, std::string("gradus::EF21::EF21: argument '") + c.argument + "': expected the same"));
    CHECK(contains(result.error, "on rank 2"));
  }
  // Threads change no result, so they may differ.
  EF21Options threaded = base;
  threaded.threads = rank() + 1;
  const auto result = outcome_of([&] { EF21 method(clients, TopK{1}, start(4), threaded, MpiTransport{}); });
  CHECK(result.error.empty());
}

TEST_CASE("A different compressor, x0 or scalar type on one rank stops every rank", "[ef21][mpi][errors]") {
  const auto clients = clients_of_dimension(4);
  auto result = outcome_of([&] { EF21 method(clients, TopK{rank() == 3 ? 2 : 1}, start(4), {.gamma = 0.1}, MpiTransport{}); });
  CHECK(result.invalid_argument);
  CHECK(contains(result.error, "argument 'compressor': expected the same message for a probe vector on every rank"));
  CHECK(contains(result.error, "on rank 3"));

  result = outcome_of([&] { EF21 method(clients, RandK{1, rank() == 1}, start(4), {.gamma = 0.1}, MpiTransport{}); });
  CHECK(contains(result.error, "argument 'compressor'"));

  Vector<double> x0 = start(4);
  if (rank() == 2) x0(3) = std::nextafter(x0(3), 2.0);
  result = outcome_of([&] { EF21 method(clients, TopK{1}, x0, {.gamma = 0.1}, MpiTransport{}); });
  CHECK(result.invalid_argument);
  CHECK(contains(result.error, "argument 'x0': expected the same values on every rank"));

  result = outcome_of([&] {
    if (rank() == 1) {
      EF21 method(clients_of_dimension<float>(4), TopK{1}, start<float>(4), {.gamma = 0.1}, MpiTransport{});
    } else {
      EF21 method(clients, TopK{1}, start(4), {.gamma = 0.1}, MpiTransport{});
    }
  });
  CHECK(result.error == "gradus::EF21::EF21: argument 'x0': expected the same scalar size in bytes on every rank (8 on "
                        "rank 0), got 4 on rank 1");
}

TEST_CASE("Bad input on one rank is a gradus::invalid_argument on every rank", "[ef21][mpi][errors]") {
  const auto clients = clients_of_dimension(4);
  const auto result = outcome_of([&] { EF21 method(clients, TopK{1}, start(4), {.gamma = rank() == 3 ? 0.0 : 0.1}, MpiTransport{}); });
  CHECK(result.invalid_argument);
  CHECK(contains(result.error, "argument 'options.gamma': expected a value > 0, got 0"));
  if (rank() != 3) CHECK(contains(result.error, "gradus::ef21::MpiTransport: rank 3 failed, so this rank stops too"));
  // The same wrong options everywhere: every rank throws the plain error.
  const auto everywhere = outcome_of([&] { EF21 method(clients, TopK{1}, start(4), {.gamma = 0.1, .weights = {1, 2}}, MpiTransport{}); });
  CHECK(everywhere.error == "gradus::EF21::EF21: argument 'options.weights': expected 8 entries (one per client), got 2");
}

namespace {

// A compressor that, on one rank, sends an index past the end of x from its second call on (its
// first, EF21's probe, looks like every other rank's).
struct BrokenOnRank {
  int broken_rank;
  mutable int calls = 0;
  void validate(Index) const {}
  template <class D>
  void compress(const Eigen::MatrixBase<D>& v, SparseMessage<typename D::Scalar>& out, Rng&) const {
    const bool broken = rank() == broken_rank && ++calls > 1;
    out.dim = v.size();
    out.indices.assign({static_cast<std::int32_t>(broken ? 10 * v.size() : 0)});
    out.values.assign({v(0)});
  }
};

}  // namespace

TEST_CASE("A rank that throws in the first round or sends a malformed message stops every rank",
          "[ef21][mpi][errors]") {
  std::vector<FailingClient> mine;
  for (const auto& client : clients_of_dimension(4)) mine.push_back({client, rank() == 0 ? 0 : 1000});
  auto result = outcome_of([&] { EF21 method(std::move(mine), TopK{1}, start(4), {.gamma = 0.1}, MpiTransport{}); });
  CHECK_FALSE(result.invalid_argument);
  CHECK(contains(result.error, "disk read failed on client"));
  if (rank() != 0) CHECK(contains(result.error, "rank 0 failed"));

  // A message that passed the probe and then goes out of range: its sender rejects it.
  result = outcome_of([&] {
    EF21 method(clients_of_dimension(4), BrokenOnRank{2}, start(4), {.gamma = 0.1, .init = Init::Compressed},
                MpiTransport{});
  });
  INFO(result.error);
  CHECK(result.invalid_argument);
  CHECK(contains(result.error, "indices in [40, 40]"));
  if (rank() != 2) CHECK(contains(result.error, "rank 2 failed"));
}

TEST_CASE("Checkpoints of different rounds on different ranks are rejected on every rank", "[ef21][mpi][errors]") {
  const auto clients = clients_of_dimension(4);
  const EF21Options options{.gamma = 0.1, .participation = 0.5, .seed = 1};
  EF21 method(clients, RandK{2}, start(4), options, MpiTransport{});
  for (int t = 0; t < 3; ++t) method.step();
  const auto early = method.checkpoint();
  method.step();
  const auto late = method.checkpoint();
  method.step();
  const Vector<double> x = method.x();
  const auto result = outcome_of([&] { method.restore(rank() == 1 ? early : late); });
  CHECK(result.invalid_argument);
  CHECK(result.error == "gradus::EF21::restore: argument 'state.round': expected the same round on every rank (4 on "
                        "rank 0), got 3 on rank 1");
  CHECK(method.x() == x);  // untouched
  auto damaged = late;
  if (rank() == 3) damaged.x(0) += 1;
  const auto corrupt = outcome_of([&] { method.restore(damaged); });
  CHECK(corrupt.invalid_argument);
  CHECK(contains(corrupt.error, "argument 'state.digest'"));
  CHECK(method.x() == x);
  method.restore(late);  // a consistent checkpoint restores on every rank
  CHECK(method.round() == 4);
}

TEST_CASE("MPI counts beyond int are rejected, not wrapped", "[ef21][mpi][errors]") {
  std::vector<int> counts, offsets;
  const long long half = 1ll << 30;
  const std::vector<long long> largest = {half, half - 1, 0, 0};  // 2^31 - 1 in all
  CHECK(ef21::detail::prefix_offsets(largest, counts, offsets, "values") == std::numeric_limits<int>::max());
  CHECK(offsets == std::vector<int>{0, 1 << 30, std::numeric_limits<int>::max(), std::numeric_limits<int>::max()});
  const std::vector<long long> over = {half, half, 0, 0};
  CHECK_THROWS_WITH(ef21::detail::prefix_offsets(over, counts, offsets, "values"),
                    "gradus::ef21::MpiTransport::exchange: argument 'values': expected at most 2^31 - 1 of them in a "
                    "round over all ranks (MPI counts are int), got more (rank 1 alone sends 1073741824)");
  const std::vector<long long> one_rank = {1ll << 31, 0, 0, 0};
  CHECK_THROWS_AS(ef21::detail::prefix_offsets(one_rank, counts, offsets, "indices"), gradus::invalid_argument);
  const std::vector<long long> negative = {1, -1, 0, 0};
  CHECK_THROWS_AS(ef21::detail::prefix_offsets(negative, counts, offsets, "indices"), gradus::invalid_argument);
  CHECK_THROWS_AS(block_of_clients(-1), gradus::invalid_argument);
}
