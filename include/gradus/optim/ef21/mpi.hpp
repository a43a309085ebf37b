#pragma once
// EF21 across processes: MpiTransport carries the clients' messages with MPI collectives.
// Include only from code that links MPI (the rest of gradus never includes <mpi.h>).
//
//   auto [begin, end] = gradus::ef21::block_of_clients(n, comm);   // this rank's clients
//   gradus::ef21::EF21<F, TopK, gradus::ef21::MpiTransport> ef21(my_clients, TopK{1}, x0, options,
//                                                                 gradus::ef21::MpiTransport{comm});
//
// Replicated design, no server rank: every rank keeps x and g. Each round, every rank computes
// its clients' messages, then
//   1. MPI_Allgather of (status, int count, value count), 3 ints per rank; a non-zero status means
//      a rank failed, and then every rank throws (the failing one its own error, the others an error
//      that names the rank and repeats its message) instead of waiting for it in a collective;
//   2. MPI_Allgatherv of the int32 stream [index count, value count, indices...] per client;
//   3. MPI_Allgatherv of the values (and, when monitoring, each client's full gradient).
// Clients are numbered by rank (rank 0 hosts the first block), every rank folds the n messages into
// g in client order with the same arithmetic, so the iterates equal the in-process simulation's
// bit for bit. Options (and x0) must be the same on every rank.

// Only the C API is used; skip the deprecated C++ bindings (and their warnings).
#ifndef OMPI_SKIP_MPICXX
#define OMPI_SKIP_MPICXX 1
#endif
#ifndef MPICH_SKIP_MPICXX
#define MPICH_SKIP_MPICXX 1
#endif
#include <mpi.h>

#include <cstdint>
#include <exception>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "gradus/optim/ef21/ef21.hpp"

namespace gradus::ef21 {

namespace detail {

template <class S>
MPI_Datatype mpi_type() {
  static_assert(std::is_same_v<S, double> || std::is_same_v<S, float>, "EF21 over MPI needs float or double");
  return std::is_same_v<S, double> ? MPI_DOUBLE : MPI_FLOAT;
}

inline int rank_of(MPI_Comm comm) {
  int rank = 0;
  MPI_Comm_rank(comm, &rank);
  return rank;
}

inline int size_of(MPI_Comm comm) {
  int size = 0;
  MPI_Comm_size(comm, &size);
  return size;
}

// Exclusive prefix sums of counts into offsets; returns the total.
inline int prefix_offsets(const std::vector<int>& counts, std::vector<int>& offsets) {
  offsets.resize(counts.size());
  int total = 0;
  for (std::size_t r = 0; r < counts.size(); ++r) {
    offsets[r] = total;
    total += counts[r];
  }
  return total;
}

}  // namespace detail

// Clients [begin, end) of this rank when n clients are spread in contiguous, near-equal blocks.
inline std::pair<Index, Index> block_of_clients(Index n, MPI_Comm comm = MPI_COMM_WORLD) {
  const Index rank = detail::rank_of(comm), size = detail::size_of(comm);
  return {n * rank / size, n * (rank + 1) / size};
}

struct MpiTransport {
  MPI_Comm comm = MPI_COMM_WORLD;

  std::pair<Index, Index> layout(Index local_clients) const {
    long long local = local_clients;
    std::vector<long long> all(static_cast<std::size_t>(detail::size_of(comm)));
    MPI_Allgather(&local, 1, MPI_LONG_LONG, all.data(), 1, MPI_LONG_LONG, comm);
    Index first = 0, total = 0;
    for (std::size_t r = 0; r < all.size(); ++r) {
      if (static_cast<int>(r) < detail::rank_of(comm)) first += all[r];
      total += all[r];
    }
    return {first, total};
  }

  // Collective: if any rank has an error, every rank throws (the lowest failing rank's message is
  // broadcast so that every rank's error says what went wrong).
  void agree(std::exception_ptr error) const {
    const int rank = detail::rank_of(comm), size = detail::size_of(comm);
    int failed = error ? rank : size;
    MPI_Allreduce(MPI_IN_PLACE, &failed, 1, MPI_INT, MPI_MIN, comm);
    if (failed == size) return;
    std::string text;
    if (rank == failed) text = what(error);
    int length = static_cast<int>(text.size());
    MPI_Bcast(&length, 1, MPI_INT, failed, comm);
    text.resize(static_cast<std::size_t>(length));
    MPI_Bcast(text.data(), length, MPI_CHAR, failed, comm);
    if (error) std::rethrow_exception(error);
    throw std::runtime_error("gradus::ef21::MpiTransport: rank " + std::to_string(failed) +
                             " failed, so this rank stops too: " + text);
  }

  template <class Clients, class S>
  void exchange(const Clients& clients, Index dim, bool with_gradients, std::exception_ptr error,
                Exchange<S>& out) const {
    out.sent_ints.clear();
    out.sent_values.clear();
    if (!error) {
      for (const auto& client : clients) {
        const auto& message = client.message;
        out.sent_ints.push_back(static_cast<std::int32_t>(message.indices.size()));
        out.sent_ints.push_back(static_cast<std::int32_t>(message.values.size()));
        out.sent_ints.insert(out.sent_ints.end(), message.indices.begin(), message.indices.end());
        out.sent_values.insert(out.sent_values.end(), message.values.begin(), message.values.end());
        if (with_gradients) {
          out.sent_values.insert(out.sent_values.end(), client.gradient.data(),
                                 client.gradient.data() + client.gradient.size());
        }
      }
    }
    // 1. status and sizes
    const int size = detail::size_of(comm);
    const int header[3] = {error ? 1 : 0, static_cast<int>(out.sent_ints.size()), static_cast<int>(out.sent_values.size())};
    std::vector<int> headers(static_cast<std::size_t>(3 * size));
    MPI_Allgather(header, 3, MPI_INT, headers.data(), 3, MPI_INT, comm);
    bool any_failed = false;
    for (int r = 0; r < size; ++r) any_failed = any_failed || headers[static_cast<std::size_t>(3 * r)] != 0;
    if (any_failed) agree(error);  // throws on every rank
    // 2. index streams, 3. values
    auto gather = [&](auto& sent, auto& received, int field, MPI_Datatype type) {
      out.counts.resize(static_cast<std::size_t>(size));
      for (int r = 0; r < size; ++r) out.counts[static_cast<std::size_t>(r)] = headers[static_cast<std::size_t>(3 * r + field)];
      received.resize(static_cast<std::size_t>(detail::prefix_offsets(out.counts, out.offsets)));
      MPI_Allgatherv(sent.data(), static_cast<int>(sent.size()), type, received.data(), out.counts.data(),
                     out.offsets.data(), type, comm);
    };
    gather(out.sent_ints, out.received_ints, 1, MPI_INT32_T);
    gather(out.sent_values, out.received_values, 2, detail::mpi_type<S>());
    // Decode in rank order, which is client order.
    out.messages.clear();
    out.gradients.clear();
    std::size_t next_int = 0, next_value = 0;
    const auto gradient_size = static_cast<std::size_t>(dim);
    while (next_int < out.received_ints.size()) {
      const auto index_count = static_cast<std::size_t>(out.received_ints[next_int]);
      const auto value_count = static_cast<std::size_t>(out.received_ints[next_int + 1]);
      next_int += 2;
      out.messages.push_back({dim, {out.received_ints.data() + next_int, index_count},
                              {out.received_values.data() + next_value, value_count}});
      next_int += index_count;
      next_value += value_count;
      if (with_gradients) {
        out.gradients.emplace_back(out.received_values.data() + next_value, gradient_size);
        next_value += gradient_size;
      }
    }
  }

 private:
  static std::string what(std::exception_ptr error) {
    try {
      std::rethrow_exception(error);
    } catch (const std::exception& e) {
      return e.what();
    } catch (...) {
      return "unknown exception";
    }
  }
};

}  // namespace gradus::ef21
