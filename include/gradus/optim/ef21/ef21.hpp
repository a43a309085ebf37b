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
// each rank hosts a block of clients and every rank keeps x and g. A failure on any client (or rank)
// stops every participant with an exception; the object is then in an unspecified state (restore a
// checkpoint to continue).

#include <algorithm>
#include <cstdint>
#include <exception>
#include <limits>
#include <span>
#include <thread>
#include <tuple>
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
  double gamma = 0;                // step size > 0, e.g. ef21::step_size(...)
  Init init = Init::FullGradient;  // g_i^0 (the authors' code: the full gradient)
  std::vector<double> weights{};   // EF21-W: one positive weight per client (L_i); empty: EF21
  double participation = 1;        // EF21-PP: probability p in (0, 1] that a client takes part
  double momentum = 0;             // EF21-HB: eta in [0, 1)
  Index batch_size = 0;            // EF21-SGD: rows per minibatch gradient; 0: full gradients
  std::uint64_t seed = 0;          // seeds every client's random stream
  bool monitor = true;             // report ||grad f(x^t)||^2 (every client computes its full gradient)
  int threads = 1;                 // in-process worker threads over the clients
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
template <class S>
struct EF21Checkpoint {
  Index round = 0;
  Vector<S> x, g, v;
  Index first_client = 0;
  std::vector<Vector<S>> client_g;
  std::vector<std::uint64_t> client_rng;
};

// Every client's contribution to a round, in client order, as views; plus buffers a transport may
// receive into (so that they are reused from round to round).
template <class S>
struct Exchange {
  std::vector<MessageView<S>> messages;
  std::vector<std::span<const S>> gradients;  // full client gradients, when monitoring
  std::vector<std::int32_t> sent_ints, received_ints;
  std::vector<S> sent_values, received_values;
  std::vector<int> counts, offsets;
};

// All clients in this process: nothing travels.
struct InProcess {
  // (first global client index of this process, total number of clients)
  std::pair<Index, Index> layout(Index local_clients) const { return {0, local_clients}; }

  // Every participant learns whether any failed; the failing one rethrows its own error.
  void agree(std::exception_ptr error) const {
    if (error) std::rethrow_exception(error);
  }

  template <class Clients, class S>
  void exchange(const Clients& clients, Index /*dim*/, bool with_gradients, std::exception_ptr error,
                Exchange<S>& out) const {
    agree(error);
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
    try {
      validate(clients);
    } catch (...) {
      error = std::current_exception();
    }
    transport_.agree(error);
    std::tie(first_, n_) = transport_.layout(static_cast<Index>(clients.size()));
    set_weights();
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
    return state;
  }

  // Continue from a checkpoint taken by an EF21 with the same clients, compressor and options.
  void restore(const EF21Checkpoint<S>& state) {
    std::exception_ptr error;
    try {
      constexpr auto function = "EF21::restore";
      const Index d = x_.size();
      gradus::detail::require_size(function, "state.x", state.x.size(), d, "entries (the dimension)");
      gradus::detail::require_size(function, "state.g", state.g.size(), d, "entries (the dimension)");
      gradus::detail::require_size(function, "state.v", state.v.size(), d, "entries (the dimension)");
      gradus::detail::require(state.first_client == first_, function, "state.first_client",
                              gradus::detail::to_text(first_), state.first_client);
      gradus::detail::require_size(function, "state.client_g", static_cast<Index>(state.client_g.size()),
                                   num_local_clients(), "vectors (one per local client)");
      gradus::detail::require_size(function, "state.client_rng", static_cast<Index>(state.client_rng.size()),
                                   num_local_clients(), "states (one per local client)");
      for (const auto& g : state.client_g) {
        gradus::detail::require_size(function, "state.client_g", g.size(), d, "entries (the dimension)");
      }
    } catch (...) {
      error = std::current_exception();
    }
    transport_.agree(error);
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
    const Index d = x_.size();
    gradus::detail::require_nonempty(function, "x0", d, "entries");
    gradus::detail::require_positive(function, "options.gamma", options_.gamma);
    gradus::detail::require_finite(function, "options.gamma", options_.gamma);
    gradus::detail::require(options_.participation > 0 && options_.participation <= 1, function,
                            "options.participation", "a probability in (0, 1]", options_.participation);
    gradus::detail::require_in_range(function, "options.momentum", options_.momentum, 0.0, 1.0);
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
          gradus::detail::require(options_.batch_size <= client.num_samples(), function, "options.batch_size",
                                  "at most the samples of every client (" +
                                      gradus::detail::to_text(client.num_samples()) + ")",
                                  options_.batch_size);
        } else {
          gradus::detail::require(false, function, "options.batch_size", "0 (the clients are not minibatch objectives)",
                                  options_.batch_size);
        }
      }
    }
  }

  // w_i and the client scales 1/(n w_i); the same on every process.
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
      weights_[i] = static_cast<S>(options_.weights[i] / sum);
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

  RoundInfo aggregate() {
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
      mean_gradient_.setZero(x_.size());
      for (const auto& gradient : exchange_.gradients) {
        mean_gradient_ += Eigen::Map<const Vector<S>>(gradient.data(), x_.size());
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
