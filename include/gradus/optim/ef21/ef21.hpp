#pragma once
// EF21 error feedback (Richtarik, Sokolov, Fatkhullin, NeurIPS 2021) and its variants EF21-W (Error
// Feedback Reloaded, ICLR 2024), EF21-SGD, EF21-PP and EF21-HB (EF21 with Bells & Whistles, 2021),
// for f(x) = (1/n) sum_i f_i(x) over n clients that send compressed vectors.
//
//   init    g_i^0 = grad f_i(x^0) / (n w_i)      (Init::FullGradient; or C(that): Compressed; or 0: Zero)
//           g^0 = sum_i w_i g_i^0,  v^0 = g^0
//   round   x^{t+1} = x^t - gamma v^t             (v = g; with momentum eta: EF21-HB below)
//           client i: c_i = C(grad f_i(x^{t+1}) / (n w_i) - g_i^t),  g_i^{t+1} = g_i^t + c_i, sends c_i
//           server:   g^{t+1} = g^t + sum_i w_i c_i    (= sum_i w_i g_i^{t+1})
// EF21: w_i = 1/n (so n w_i = 1).  EF21-W: w_i = weights_i / sum_j weights_j with weights_i = L_i.
// EF21-SGD: grad f_i is a minibatch gradient (batch_size rows, uniform without replacement).
// EF21-PP: client i takes part with probability p; a silent client sends nothing and keeps g_i.
// EF21-HB: v^{t+1} = eta v^t + g^{t+1} at the server.
// Step sizes: gradus/optim/ef21/step_sizes.hpp.
//
// Every random draw (participation, minibatch, RandK) comes from client i's own stream, seeded by
// (options.seed, i), and the server sums messages in client order: a run is deterministic for a
// seed, whatever the thread count or the way clients are spread over processes. The state (x, g, v,
// every g_i and every stream) is checkpointable; resuming gives identical iterates.
//
// The algorithm is separate from the transport that carries messages. InProcess (here) simulates all
// clients in one process, optionally on threads; gradus/optim/ef21/mpi.hpp has MpiTransport, where
// each rank hosts a block of clients and every rank keeps x and g. Construction and restore() first
// validate everything locally, then agree across processes, in one collective, on the outcome and on
// every quantity that must be the same everywhere (dimension, scalar type, x0, compressor, options):
// a bad input or a mismatch on any process throws gradus::invalid_argument on every process, before
// any buffer is sized from another process's data. A failure on any client (or rank) during a round
// stops every participant with an exception; the object is then in an unspecified state (restore a
// checkpoint to continue). Messages received from any client are checked against d before use.

#include <algorithm>
#include <array>
#include <bit>
#include <cstdint>
#include <cstring>
#include <exception>
#include <limits>
#include <span>
#include <string>
#include <string_view>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include <Eigen/Core>

#include "gradus/core/concepts.hpp"
#include "gradus/core/errors.hpp"
#include "gradus/core/types.hpp"
#include "gradus/optim/ef21/compressors.hpp"

namespace gradus::ef21 {

enum class Init { FullGradient, Compressed, Zero };

struct EF21Options {
  double gamma = 0;                // step size, normal and finite in the scalar type, e.g. ef21::step_size(...)
  Init init = Init::FullGradient;  // g_i^0 (the authors' code: the full gradient)
  std::vector<double> weights{};   // EF21-W: one positive weight per client (L_i); empty: EF21
  double participation = 1;        // EF21-PP: probability p in (0, 1] that a client takes part
  double momentum = 0;             // EF21-HB: eta in [0, 1) (also once rounded to the scalar type)
  Index batch_size = 0;            // EF21-SGD: rows per minibatch gradient; 0: full gradients
  std::uint64_t seed = 0;          // seeds every client's random stream
  bool monitor = true;             // report ||grad f(x^t)||^2 (every client computes its full gradient)
  int threads = 1;                 // in-process worker threads over the clients (may differ between ranks)
};

// What one round did. Bits are summed over the clients' uplink messages of this round.
struct RoundInfo {
  Index round = 0;  // t of the new iterate x^t (0: initialization)
  double grad_norm_sq = std::numeric_limits<double>::quiet_NaN();  // ||(1/n) sum_i grad f_i(x^t)||^2 if monitored
  Index participants = 0;                                           // clients that sent a non-empty message
  std::uint64_t value_bits = 0;
  std::uint64_t index_bits = 0;
};

// Round state of one process: x, g, v and the g_i and random streams of the clients it hosts.
// digest covers everything else, so restore() rejects a checkpoint damaged anywhere (in memory, or
// by whatever stored and reloaded it).
template <class S>
struct EF21Checkpoint {
  Index round = 0;
  Vector<S> x, g, v;
  Index first_client = 0;
  std::vector<Vector<S>> client_g;
  std::vector<std::uint64_t> client_rng;
  std::uint64_t digest = 0;
};

namespace detail {

// A 64-bit digest of raw bytes for checkpoints and for processes that must hold the same data; not
// cryptographic. Each 8-byte word goes through h <- rotl(h ^ w, 29) * odd, a bijection in h and in
// w, so changing any single byte always changes the result.
class Digest {
 public:
  template <class T>
    requires std::is_trivially_copyable_v<T>
  Digest& add(std::span<const T> items) {
    add_word(items.size());
    const auto* bytes = reinterpret_cast<const unsigned char*>(items.data());
    std::size_t left = items.size_bytes();
    for (; left >= 8; left -= 8, bytes += 8) {
      std::uint64_t word;
      std::memcpy(&word, bytes, 8);
      add_word(word);
    }
    std::uint64_t tail = 0;
    if (left > 0) std::memcpy(&tail, bytes, left);
    add_word(tail);
    return *this;
  }
  template <class T>
    requires std::is_arithmetic_v<T> || std::is_enum_v<T>
  Digest& add(const T& value) {
    return add(std::span<const T>(&value, 1));
  }
  template <class S>
  Digest& add(const Vector<S>& v) {
    return add(std::span<const S>(v.data(), static_cast<std::size_t>(v.size())));
  }
  std::uint64_t value() const {  // the splitmix64 finalizer, for well-spread bits
    std::uint64_t z = state_;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }

 private:
  void add_word(std::uint64_t word) { state_ = std::rotl(state_ ^ word, 29) * 0x9E3779B97F4A7C15ull; }
  std::uint64_t state_ = 0x243F6A8885A308D3ull;
};

template <class S>
std::uint64_t digest_of(const EF21Checkpoint<S>& state) {
  Digest digest;
  digest.add(state.round).add(state.x).add(state.g).add(state.v).add(state.first_client);
  digest.add(state.client_g.size());
  for (const auto& g : state.client_g) digest.add(g);
  digest.add(std::span<const std::uint64_t>(state.client_rng));
  return digest.value();
}

}  // namespace detail

// A quantity every process must hold the same, for the transport's agreement: what it is (for the
// error message) and its value (a number, or a digest of the data).
struct Fact {
  enum Kind { Integer, Real, Hash };
  std::string_view argument;  // e.g. "options.gamma"
  std::string_view what;      // e.g. "value"
  std::uint64_t value = 0;    // the integer, the bits of the double, or the digest
  Kind kind = Integer;

  static Fact real(std::string_view argument, double value) {
    return {argument, "value", std::bit_cast<std::uint64_t>(value), Real};
  }
  std::string text() const {
    switch (kind) {
      case Integer: return gradus::detail::to_text(value);
      case Real: return gradus::detail::to_text(std::bit_cast<double>(value));
      case Hash: break;
    }
    return "digest " + gradus::detail::to_text(value);
  }
};

namespace detail {

// Throws unless every process (row r of `facts`, one row per process) holds rank 0's facts; names
// the first fact that differs and the lowest process that differs in it.
inline void require_same_facts(std::string_view function, std::span<const Fact> mine,
                               std::span<const std::uint64_t> all, std::size_t processes) {
  for (std::size_t f = 0; f < mine.size(); ++f) {
    for (std::size_t r = 1; r < processes; ++r) {
      if (all[r * mine.size() + f] == all[f]) continue;
      Fact first = mine[f], other = mine[f];
      first.value = all[f];
      other.value = all[r * mine.size() + f];
      gradus::detail::throw_invalid_argument(
          function, mine[f].argument,
          "the same " + std::string(mine[f].what) + " on every rank (" + first.text() + " on rank 0)",
          other.text() + " on rank " + gradus::detail::to_text(r));
    }
  }
}

}  // namespace detail

// Every client's contribution to a round, in client order, as views; plus buffers a transport may
// receive into (so that they are reused from round to round).
template <class S>
struct Exchange {
  std::vector<MessageView<S>> messages;
  std::vector<std::span<const S>> gradients;  // full client gradients, when monitoring
  std::vector<std::int32_t> sent_ints, received_ints;
  std::vector<S> sent_values, received_values;
  std::vector<long long> headers, wide_counts;
  std::vector<int> counts, offsets;
};

// A transport provides
//   agree(function, error, facts, local_clients) -> (first global client of this process, total clients):
//       collective; throws on every process if any has an error or holds different facts;
//   exchange(clients, dim, with_gradients, error, out): collective; every client's message (and full
//       gradient, when monitoring) in client order, or a throw on every process if any has an error.

// All clients in this process: nothing travels.
struct InProcess {
  std::pair<Index, Index> agree(std::string_view /*function*/, std::exception_ptr error,
                                std::span<const Fact> /*facts*/, Index local_clients) const {
    if (error) std::rethrow_exception(error);
    return {0, local_clients};
  }

  template <class Clients, class S>
  void exchange(const Clients& clients, Index /*dim*/, bool with_gradients, std::exception_ptr error,
                Exchange<S>& out) const {
    if (error) std::rethrow_exception(error);
    out.messages.clear();
    out.gradients.clear();
    for (const auto& client : clients) {
      out.messages.push_back(client.message.view());
      if (with_gradients) out.gradients.emplace_back(client.gradient.data(), static_cast<std::size_t>(client.gradient.size()));
    }
  }
};

template <Objective F, Compressor<typename F::Scalar> C, class Transport = InProcess>
class EF21 {
 public:
  using Scalar = typename F::Scalar;
  using S = Scalar;

  // clients: the objectives hosted by this process (all of them in process); x0: the same on every process.
  EF21(std::vector<F> clients, C compressor, const Vector<S>& x0, EF21Options options, Transport transport = {})
      : compressor_(std::move(compressor)), options_(std::move(options)), transport_(std::move(transport)), x_(x0) {
    std::exception_ptr error;
    std::uint64_t compressor_digest = 0;
    try {
      validate(clients);
      compressor_digest = probe_compressor();
    } catch (...) {
      error = std::current_exception();
    }
    std::tie(first_, n_) = transport_.agree("EF21::EF21", error, agreed_facts(compressor_digest),
                                            static_cast<Index>(clients.size()));
    set_weights();  // from agreed quantities only: it throws on every process or on none
    const Index d = x_.size();
    clients_.reserve(clients.size());
    for (std::size_t i = 0; i < clients.size(); ++i) {
      const Index id = first_ + static_cast<Index>(i);
      clients_.push_back({std::move(clients[i]), scales_[static_cast<std::size_t>(id)], Vector<S>::Zero(d),
                          Vector<S>::Zero(options_.monitor ? d : 0), {},
                          Rng::stream(options_.seed, static_cast<std::uint64_t>(id)), {}});
    }
    g_ = Vector<S>::Zero(d);
    initial_ = communicate([this](Client& client, Vector<S>& target) { initialize(client, target); });
    v_ = g_;
  }

  // One round: x^{t+1} = x^t - gamma v^t, then the clients' messages update every g_i and g.
  RoundInfo step() {
    x_ -= static_cast<S>(options_.gamma) * (options_.momentum > 0 ? v_ : g_);
    ++round_;
    const RoundInfo info = communicate([this](Client& client, Vector<S>& target) { update(client, target); });
    if (options_.momentum > 0) v_ = static_cast<S>(options_.momentum) * v_ + g_;
    return info;
  }

  const Vector<S>& x() const { return x_; }
  const Vector<S>& g() const { return g_; }
  Index round() const { return round_; }
  const RoundInfo& initial() const { return initial_; }  // the initialization (round 0)
  Index num_clients() const { return n_; }
  Index first_client() const { return first_; }  // global index of this process's first client
  Index num_local_clients() const { return static_cast<Index>(clients_.size()); }
  const Vector<S>& client_g(Index local) const { return clients_.at(static_cast<std::size_t>(local)).g; }
  const std::vector<S>& weights() const { return weights_; }  // w_i of every client, summing to 1
  const EF21Options& options() const { return options_; }

  EF21Checkpoint<S> checkpoint() const {
    EF21Checkpoint<S> state{round_, x_, g_, v_, first_, {}, {}};
    for (const auto& client : clients_) {
      state.client_g.push_back(client.g);
      state.client_rng.push_back(client.rng.state());
    }
    state.digest = detail::digest_of(state);
    return state;
  }

  // Continue from a checkpoint taken by an EF21 with the same clients, compressor and options (over
  // MPI: every rank its own checkpoint of the same round). Collective; a checkpoint of other sizes,
  // another process's, or damaged (its digest does not match) throws on every process, and this
  // object is left as it was.
  void restore(const EF21Checkpoint<S>& state) {
    constexpr auto function = "EF21::restore";
    std::exception_ptr error;
    const std::array<Fact, 2> facts = {
        Fact{"state.round", "round", static_cast<std::uint64_t>(state.round), Fact::Integer},
        Fact{"state", "x, g and v", detail::Digest{}.add(state.x).add(state.g).add(state.v).value(), Fact::Hash}};
    try {
      const Index d = x_.size();
      gradus::detail::require_size(function, "state.x", state.x.size(), d, "entries (the dimension)");
      gradus::detail::require_size(function, "state.g", state.g.size(), d, "entries (the dimension)");
      gradus::detail::require_size(function, "state.v", state.v.size(), d, "entries (the dimension)");
      gradus::detail::require_nonnegative(function, "state.round", state.round);
      gradus::detail::require(state.first_client == first_, function, "state.first_client",
                              gradus::detail::to_text(first_) + " (the first client of this process)",
                              state.first_client);
      gradus::detail::require_size(function, "state.client_g", static_cast<Index>(state.client_g.size()),
                                   num_local_clients(), "vectors (one per local client)");
      gradus::detail::require_size(function, "state.client_rng", static_cast<Index>(state.client_rng.size()),
                                   num_local_clients(), "states (one per local client)");
      for (const auto& g : state.client_g) {
        gradus::detail::require_size(function, "state.client_g", g.size(), d, "entries (the dimension)");
      }
      gradus::detail::require(state.digest == detail::digest_of(state), function, "state.digest",
                              "the digest of the checkpoint's contents (it was changed after EF21::checkpoint)",
                              state.digest);
    } catch (...) {
      error = std::current_exception();
    }
    transport_.agree(function, error, facts, num_local_clients());
    round_ = state.round;
    x_ = state.x;
    g_ = state.g;
    v_ = state.v;
    for (std::size_t i = 0; i < clients_.size(); ++i) {
      clients_[i].g = state.client_g[i];
      clients_[i].rng.set_state(state.client_rng[i]);
    }
  }

 private:
  struct Client {
    F objective;
    S scale;              // 1 / (n w_i): 1 for EF21
    Vector<S> g;          // g_i
    Vector<S> gradient;   // grad f_i(x), full, kept for monitoring
    SparseMessage<S> message;
    Rng rng;
    std::vector<Index> batch;
  };

  void validate(const std::vector<F>& clients) const {
    constexpr auto function = "EF21::EF21";
    using gradus::detail::require;
    const Index d = x_.size();
    gradus::detail::require_nonempty(function, "x0", d, "entries");
    // gamma and momentum act as S: gamma must stay a normal number there, momentum below 1.
    gradus::detail::require_positive(function, "options.gamma", options_.gamma);
    gradus::detail::require_finite(function, "options.gamma", options_.gamma);
    constexpr S low = std::numeric_limits<S>::min(), high = std::numeric_limits<S>::max();
    require(options_.gamma >= low && options_.gamma <= high, function, "options.gamma",
            "a normal number of the scalar type, in [" + gradus::detail::to_text(low) + ", " +
                gradus::detail::to_text(high) + "]",
            options_.gamma);
    gradus::detail::require_enumerator(function, "options.init", options_.init, 3);
    require(options_.participation > 0 && options_.participation <= 1, function, "options.participation",
            "a probability in (0, 1]", options_.participation);
    require(options_.momentum >= 0 && static_cast<S>(options_.momentum) < S(1), function, "options.momentum",
            "a value in [0, 1) that stays below 1 in the scalar type", options_.momentum);
    gradus::detail::require_nonnegative(function, "options.batch_size", options_.batch_size);
    gradus::detail::require_positive(function, "options.threads", options_.threads);
    for (double weight : options_.weights) {
      gradus::detail::require_positive(function, "options.weights", weight);
      gradus::detail::require_finite(function, "options.weights", weight);
    }
    compressor_.validate(d);
    for (const auto& client : clients) {
      gradus::detail::require_size(function, "clients", client.dim(), d, "dimensions (size of x0) for every client");
      if (options_.batch_size > 0) {
        if constexpr (MinibatchObjective<F>) {
          require(options_.batch_size <= client.num_samples(), function, "options.batch_size",
                  "at most the samples of every client (" + gradus::detail::to_text(client.num_samples()) + ")",
                  options_.batch_size);
        } else {
          require(false, function, "options.batch_size", "0 (the clients are not minibatch objectives)",
                  options_.batch_size);
        }
      }
    }
  }

  // What every process must agree on (threads may differ: they change no result).
  std::array<Fact, 12> agreed_facts(std::uint64_t compressor_digest) const {
    const auto& o = options_;
    return {Fact{"x0", "scalar size in bytes", sizeof(S), Fact::Integer},
            Fact{"x0", "size", static_cast<std::uint64_t>(x_.size()), Fact::Integer},
            Fact{"x0", "values", detail::Digest{}.add(x_).value(), Fact::Hash},
            Fact{"compressor", "message for a probe vector", compressor_digest, Fact::Hash},
            Fact::real("options.gamma", o.gamma),
            Fact{"options.init", "value", static_cast<std::uint64_t>(o.init), Fact::Integer},
            Fact{"options.weights", "values", detail::Digest{}.add(std::span<const double>(o.weights)).value(),
                 Fact::Hash},
            Fact::real("options.participation", o.participation),
            Fact::real("options.momentum", o.momentum),
            Fact{"options.batch_size", "value", static_cast<std::uint64_t>(o.batch_size), Fact::Integer},
            Fact{"options.seed", "value", o.seed, Fact::Integer},
            Fact{"options.monitor", "value", o.monitor, Fact::Integer}};
  }

  // The compressor's message for a fixed vector and stream: equal on processes with equal compressors.
  std::uint64_t probe_compressor() const {
    SparseMessage<S> probe;
    Rng rng;
    compressor_.compress(Vector<S>::LinSpaced(x_.size(), S(1), static_cast<S>(x_.size())), probe, rng);
    return detail::Digest{}.add(probe.dim).add(std::span<const std::int32_t>(probe.indices))
        .add(std::span<const S>(probe.values)).value();
  }

  // w_i and the client scales 1/(n w_i); the same on every process. Both enter the arithmetic in S,
  // so every w_i must stay a normal number there (then 1/(n w_i) <= 1/min is finite too).
  void set_weights() {
    constexpr auto function = "EF21::EF21";
    gradus::detail::require(n_ >= 1, function, "clients", "at least one client over all processes", n_);
    const auto n = static_cast<std::size_t>(n_);
    weights_.assign(n, S(1) / static_cast<S>(n_));
    scales_.assign(n, S(1));
    if (options_.weights.empty()) return;
    gradus::detail::require_size(function, "options.weights", static_cast<Index>(options_.weights.size()), n_,
                                 "entries (one per client)");
    double sum = 0;
    for (double weight : options_.weights) sum += weight;
    for (std::size_t i = 0; i < n; ++i) {
      const double weight = options_.weights[i] / sum;
      gradus::detail::require(weight >= std::numeric_limits<S>::min(), function, "options.weights",
                              "weights whose shares w_i / sum are normal numbers in the scalar type", weight);
      weights_[i] = static_cast<S>(weight);
      scales_[i] = static_cast<S>(sum / (static_cast<double>(n_) * options_.weights[i]));
    }
  }

  // target: scratch of the worker thread (cache-warm from client to client).
  void initialize(Client& client, Vector<S>& target) {
    Vector<S>& gradient = options_.monitor ? client.gradient : target;
    client.objective.value_and_grad(x_, gradient);
    client.g.setZero();
    switch (options_.init) {
      case Init::FullGradient:
        client.g = client.scale * gradient;
        Identity{}.compress(client.g, client.message, client.rng);
        return;
      case Init::Compressed:
        target = client.scale * gradient;
        compressor_.compress(target, client.message, client.rng);
        client.message.add_to(client.g, S(1));
        return;
      case Init::Zero:
        client.message.clear(x_.size());
        return;
    }
  }

  void update(Client& client, Vector<S>& target) {
    const bool takes_part = options_.participation >= 1 || client.rng.uniform() < options_.participation;
    if (options_.monitor) client.objective.value_and_grad(x_, client.gradient);
    if (!takes_part) {
      client.message.clear(x_.size());
      return;
    }
    if (options_.batch_size > 0) {
      if constexpr (MinibatchObjective<F>) {
        client.batch.clear();
        detail::sample_without_replacement(client.objective.num_samples(), options_.batch_size, client.rng,
                                           [&](Index row) { client.batch.push_back(row); });
        client.objective.value_and_grad(x_, std::span<const Index>(client.batch), target);
      }
    } else if (options_.monitor) {
      target = client.gradient;
    } else {
      client.objective.value_and_grad(x_, target);
    }
    // Compress the expression: a sparsifier reads it once (RandK only k entries), no vector is written.
    compressor_.compress(client.scale * target - client.g, client.message, client.rng);
    client.message.add_to(client.g, S(1));
  }

  // Runs work on every local client (on threads if asked), exchanges the messages and lets the
  // server fold them into g in client order.
  template <class Work>
  RoundInfo communicate(Work work) {
    errors_.assign(clients_.size(), nullptr);
    const std::size_t threads = std::min<std::size_t>(static_cast<std::size_t>(options_.threads), clients_.size());
    scratch_.resize(std::max<std::size_t>(threads, 1), Vector<S>(x_.size()));
    auto run = [&](std::size_t worker, std::size_t begin, std::size_t end) {
      for (std::size_t i = begin; i < end; ++i) {
        try {
          work(clients_[i], scratch_[worker]);
        } catch (...) {
          errors_[i] = std::current_exception();
        }
      }
    };
    if (threads <= 1) {
      run(0, 0, clients_.size());
    } else {
      std::vector<std::thread> pool;
      for (std::size_t t = 0; t < threads; ++t) {
        pool.emplace_back(run, t, clients_.size() * t / threads, clients_.size() * (t + 1) / threads);
      }
      for (auto& thread : pool) thread.join();
    }
    std::exception_ptr error;
    for (const auto& e : errors_) {
      if (e && !error) error = e;
    }
    transport_.exchange(clients_, x_.size(), options_.monitor, error, exchange_);
    return aggregate();
  }

  // Checks every message (and gradient) against d before the first is added.
  RoundInfo aggregate() {
    constexpr auto function = "EF21";
    const Index d = x_.size();
    gradus::detail::require_size(function, "messages", static_cast<Index>(exchange_.messages.size()), n_,
                                 "messages in a round (one per client)");
    for (std::size_t i = 0; i < exchange_.messages.size(); ++i) {
      if (!exchange_.messages[i].valid(d)) {
        exchange_.messages[i].require_valid(function, "message of client " + gradus::detail::to_text(i), d);
      }
    }
    if (options_.monitor) {
      gradus::detail::require_size(function, "gradients", static_cast<Index>(exchange_.gradients.size()), n_,
                                   "gradients in a round (one per client)");
      for (const auto& gradient : exchange_.gradients) {
        gradus::detail::require_size(function, "gradients", static_cast<Index>(gradient.size()), d,
                                     "entries (the dimension)");
      }
    }
    RoundInfo info;
    info.round = round_;
    for (std::size_t i = 0; i < exchange_.messages.size(); ++i) {
      const auto& message = exchange_.messages[i];
      message.add_to(g_, weights_[i]);
      info.participants += message.nnz() > 0;
      info.value_bits += message.value_bits();
      info.index_bits += message.index_bits();
    }
    if (options_.monitor) {
      mean_gradient_.setZero(d);
      for (const auto& gradient : exchange_.gradients) {
        mean_gradient_ += Eigen::Map<const Vector<S>>(gradient.data(), d);
      }
      mean_gradient_ /= static_cast<S>(n_);
      info.grad_norm_sq = static_cast<double>(mean_gradient_.squaredNorm());
    }
    return info;
  }

  C compressor_;
  EF21Options options_;
  Transport transport_;
  Vector<S> x_, g_, v_, mean_gradient_;
  Index round_ = 0, first_ = 0, n_ = 0;
  std::vector<S> weights_, scales_;
  std::vector<Client> clients_;
  std::vector<std::exception_ptr> errors_;
  std::vector<Vector<S>> scratch_;  // one target vector per worker thread
  Exchange<S> exchange_;
  RoundInfo initial_;
};

}  // namespace gradus::ef21
