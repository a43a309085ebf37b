#pragma once
// EF21 across processes: MpiTransport carries the clients' messages with MPI collectives.
// Include only from code that links MPI (the rest of gradus never includes <mpi.h>).
//
//   auto [begin, end] = gradus::ef21::block_of_clients(n, comm);   // this rank's clients
//   gradus::ef21::EF21<F, TopK, gradus::ef21::MpiTransport> ef21(my_clients, TopK{1}, x0, options,
//                                                                 gradus::ef21::MpiTransport{comm});
//
// Replicated design, no server rank: every rank keeps x and g. Construction (and restore) is one
// MPI_Allgather of each rank's validation status, client count and the facts that must agree
// (dimension, scalar type, x0, compressor, options, as 64-bit words), so that a bad input or a
// mismatch on any rank becomes an error on every rank before any buffer depends on another rank.
// Each round, every rank computes its clients' messages, then
//   1. MPI_Allgather of (status, int count, value count), 3 64-bit integers per rank; a non-zero
//      status means a rank failed, and then every rank throws (the failing one its own error, the
//      others an error that names the rank and repeats its message) instead of waiting for it;
//   2. MPI_Allgatherv of the int32 stream [index count, value count, indices...] per client;
//   3. MPI_Allgatherv of the values (and, when monitoring, each client's full gradient).
// MPI counts are int: a round of more than 2^31 - 1 ints or values over all ranks is rejected on
// every rank. Received streams are decoded only within their bounds, and EF21 checks every message
// against d before using it. Clients are numbered by rank (rank 0 hosts the first block), every rank
// folds the n messages into g in client order with the same arithmetic, so the iterates equal the
// in-process simulation's bit for bit.

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
#include <limits>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
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

// MPI counts and displacements of one gather from every rank's 64-bit count; returns the total.
// All ranks hold the same counts, so a total beyond int throws on every rank alike.
inline int prefix_offsets(std::span<const long long> wide, std::vector<int>& counts, std::vector<int>& offsets,
                          std::string_view what) {
  counts.resize(wide.size());
  offsets.resize(wide.size());
  long long total = 0;
  for (std::size_t r = 0; r < wide.size(); ++r) {
    offsets[r] = static_cast<int>(total);
    total += wide[r];
    if (wide[r] < 0 || total > std::numeric_limits<int>::max()) {
      gradus::detail::throw_invalid_argument(
          "ef21::MpiTransport::exchange", what,
          "at most 2^31 - 1 of them in a round over all ranks (MPI counts are int)",
          "more (rank " + gradus::detail::to_text(r) + " alone sends " + gradus::detail::to_text(wide[r]) + ")");
    }
    counts[r] = static_cast<int>(wide[r]);
  }
  return static_cast<int>(total);
}

}  // namespace detail

// Clients [begin, end) of this rank when n clients are spread in contiguous, near-equal blocks.
inline std::pair<Index, Index> block_of_clients(Index n, MPI_Comm comm = MPI_COMM_WORLD) {
  gradus::detail::require_nonnegative("ef21::block_of_clients", "n", n);
  const Index rank = detail::rank_of(comm), size = detail::size_of(comm);
  return {n * rank / size, n * (rank + 1) / size};
}

struct MpiTransport {
  MPI_Comm comm = MPI_COMM_WORLD;

  // Collective: one MPI_Allgather of [status, local clients, facts...] from every rank.
  std::pair<Index, Index> agree(std::string_view function, std::exception_ptr error, std::span<const Fact> facts,
                                Index local_clients) const {
    const int rank = detail::rank_of(comm), size = detail::size_of(comm);
    const std::size_t width = 2 + facts.size();
    std::vector<std::uint64_t> mine(width), all(width * static_cast<std::size_t>(size));
    mine[0] = error ? 1 : 0;
    mine[1] = static_cast<std::uint64_t>(local_clients);
    for (std::size_t f = 0; f < facts.size(); ++f) mine[2 + f] = facts[f].value;
    MPI_Allgather(mine.data(), static_cast<int>(width), MPI_UINT64_T, all.data(), static_cast<int>(width),
                  MPI_UINT64_T, comm);
    for (int r = 0; r < size; ++r) {
      if (all[static_cast<std::size_t>(r) * width] != 0) fail_together(r, error);
    }
    // Rows of facts alone, to compare with rank 0's.
    std::vector<std::uint64_t> values;
    values.reserve(facts.size() * static_cast<std::size_t>(size));
    Index first = 0, total = 0;
    for (int r = 0; r < size; ++r) {
      const auto row = all.begin() + static_cast<std::ptrdiff_t>(static_cast<std::size_t>(r) * width);
      values.insert(values.end(), row + 2, row + static_cast<std::ptrdiff_t>(width));
      const auto clients = static_cast<Index>(row[1]);
      if (r < rank) first += clients;
      total += clients;
    }
    detail::require_same_facts(function, facts, values, static_cast<std::size_t>(size));
    return {first, total};
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
    const long long header[3] = {error ? 1 : 0, static_cast<long long>(out.sent_ints.size()),
                                 static_cast<long long>(out.sent_values.size())};
    out.headers.resize(static_cast<std::size_t>(3 * size));
    MPI_Allgather(header, 3, MPI_LONG_LONG, out.headers.data(), 3, MPI_LONG_LONG, comm);
    for (int r = 0; r < size; ++r) {
      if (out.headers[static_cast<std::size_t>(3 * r)] != 0) fail_together(r, error);
    }
    // 2. index streams, 3. values
    auto gather = [&](auto& sent, auto& received, int field, MPI_Datatype type, std::string_view what) {
      out.wide_counts.resize(static_cast<std::size_t>(size));
      for (int r = 0; r < size; ++r) {
        out.wide_counts[static_cast<std::size_t>(r)] = out.headers[static_cast<std::size_t>(3 * r + field)];
      }
      received.resize(static_cast<std::size_t>(detail::prefix_offsets(out.wide_counts, out.counts, out.offsets, what)));
      MPI_Allgatherv(sent.data(), static_cast<int>(sent.size()), type, received.data(), out.counts.data(),
                     out.offsets.data(), type, comm);
    };
    gather(out.sent_ints, out.received_ints, 1, MPI_INT32_T, "indices");
    gather(out.sent_values, out.received_values, 2, detail::mpi_type<S>(), "values");
    decode(dim, with_gradients, out);
  }

 private:
  // Views of the received streams, in rank order, which is client order. Every rank decodes the same
  // bytes, so a malformed stream throws on every rank alike.
  template <class S>
  static void decode(Index dim, bool with_gradients, Exchange<S>& out) {
    out.messages.clear();
    out.gradients.clear();
    const std::span<const std::int32_t> ints = out.received_ints;
    const std::span<const S> values = out.received_values;
    const auto gradient_size = with_gradients ? static_cast<std::size_t>(dim) : 0;
    std::size_t next_int = 0, next_value = 0;
    auto require_framed = [&](bool ok) {
      if (ok) return;
      gradus::detail::throw_invalid_argument(
          "ef21::MpiTransport::exchange", "messages",
          "streams of [index count, value count, indices] and values within the data received",
          "a malformed stream at message " + gradus::detail::to_text(out.messages.size()));
    };
    while (next_int < ints.size()) {
      require_framed(ints.size() - next_int >= 2);
      const std::int32_t index_count = ints[next_int], value_count = ints[next_int + 1];
      next_int += 2;
      require_framed(index_count >= 0 && value_count >= 0 &&
                     static_cast<std::size_t>(index_count) <= ints.size() - next_int &&
                     static_cast<std::size_t>(value_count) + gradient_size <= values.size() - next_value);
      out.messages.push_back({dim, ints.subspan(next_int, static_cast<std::size_t>(index_count)),
                              values.subspan(next_value, static_cast<std::size_t>(value_count))});
      next_int += static_cast<std::size_t>(index_count);
      next_value += static_cast<std::size_t>(value_count);
      if (with_gradients) {
        out.gradients.push_back(values.subspan(next_value, gradient_size));
        next_value += gradient_size;
      }
    }
    require_framed(next_value == values.size());
  }

  // Every rank knows that rank `failed` failed (the lowest that did): it broadcasts its error, and
  // every rank throws: a failed one its own error, the others one that names rank `failed` and
  // repeats its message, of the same kind (gradus::invalid_argument for bad input).
  [[noreturn]] void fail_together(int failed, std::exception_ptr error) const {
    const int rank = detail::rank_of(comm);
    std::string text;
    int header[2] = {0, 0};  // message length, whether it is a gradus::invalid_argument
    if (rank == failed) {
      text = what(error);
      header[0] = static_cast<int>(text.size());
      header[1] = is_invalid_argument(error);
    }
    MPI_Bcast(header, 2, MPI_INT, failed, comm);
    text.resize(static_cast<std::size_t>(header[0]));
    MPI_Bcast(text.data(), header[0], MPI_CHAR, failed, comm);
    if (error) std::rethrow_exception(error);
    const std::string message =
        "gradus::ef21::MpiTransport: rank " + std::to_string(failed) + " failed, so this rank stops too: " + text;
    if (header[1]) throw gradus::invalid_argument(message);
    throw std::runtime_error(message);
  }

  static std::string what(std::exception_ptr error) {
    try {
      std::rethrow_exception(error);
    } catch (const std::exception& e) {
      return e.what();
    } catch (...) {
      return "unknown exception";
    }
  }

  static bool is_invalid_argument(std::exception_ptr error) {
    try {
      std::rethrow_exception(error);
    } catch (const gradus::invalid_argument&) {
      return true;
    } catch (...) {
      return false;
    }
  }
};

}  // namespace gradus::ef21
