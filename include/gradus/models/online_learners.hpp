#pragma once
// Classic online learners, the baselines a regret-loss-trained model is measured against.
// Each writes the policy it plays at every round of k stacked loss sequences ((k T) x d rows,
// the layout of losses/regret.hpp); row t depends on l_1..l_{t-1} only.
//
//   Hedge (entropic FTRL, multiplicative weights): pi_t = softmax(-eta sum_{i<t} l_i). For losses in
//     [0,1]^d its regret is at most ln d / eta + eta T / 8 on every sequence; eta = sqrt(8 ln d / T)
//     makes that sqrt(T ln d / 2) (Cesa-Bianchi & Lugosi, Prediction, Learning, and Games, Thm 2.2).
//   FollowTheLeader: pi_t uniform over argmin_a sum_{i<t} l_{i,a}. Linear regret on alternating losses
//     l_1 = (1/2, 0), then (0, 1), (1, 0), ...: about T / 2.
//   UniformLearner: pi_t = 1/d, whatever the losses.

#include <cmath>
#include <optional>
#include <string_view>

#include <Eigen/Core>

#include "gradus/core/errors.hpp"
#include "gradus/core/types.hpp"
#include "gradus/losses/regret.hpp"

namespace gradus {

// The horizon-tuned rate sqrt(8 ln d / T) and the regret bound sqrt(T ln d / 2) it guarantees.
template <class S>
S hedge_learning_rate(Index actions, Index rounds) {
  detail::require_positive("hedge_learning_rate", "actions", actions);
  detail::require_positive("hedge_learning_rate", "rounds", rounds);
  return std::sqrt(S(8) * std::log(S(actions)) / S(rounds));
}

template <class S>
S hedge_regret_bound(Index actions, Index rounds) {
  detail::require_positive("hedge_regret_bound", "actions", actions);
  detail::require_positive("hedge_regret_bound", "rounds", rounds);
  return std::sqrt(S(rounds) * std::log(S(actions)) / 2);
}

namespace detail {

// The checks every learner makes; returns k.
template <class S>
Index require_learner_io(std::string_view function, const Eigen::Ref<const RowMatrix<S>>& losses, Index rounds,
                         const Eigen::Ref<RowMatrix<S>>& policies) {
  const Index k = require_sequences(function, "losses", losses.rows(), losses.cols(), rounds);
  require_shape(function, "policies", policies.rows(), policies.cols(), losses.rows(), losses.cols());
  return k;
}

}  // namespace detail

template <class S>
struct HedgeOptions {
  std::optional<S> learning_rate;  // eta >= 0; unset: hedge_learning_rate(d, T) of the input
};

template <class S>
class Hedge {
 public:
  using Scalar = S;
  using Options = HedgeOptions<S>;

  explicit Hedge(Options options = {}) : options_(options) {
    if (options_.learning_rate) {
      detail::require_nonnegative("Hedge", "options.learning_rate", *options_.learning_rate);
      detail::require_finite("Hedge", "options.learning_rate", *options_.learning_rate);
    }
  }

  S learning_rate(Index actions, Index rounds) const {
    return options_.learning_rate ? *options_.learning_rate : hedge_learning_rate<S>(actions, rounds);
  }

  // The pre-softmax logits -eta sum_{i<t} l_i.
  void logits(const Eigen::Ref<const RowMatrix<S>>& losses, Index rounds, Eigen::Ref<RowMatrix<S>> logits) const {
    detail::require_learner_io<S>("Hedge::logits", losses, rounds, logits);
    logits = -learning_rate(losses.cols(), rounds) * losses;
    detail::exclusive_sums<S>(logits, rounds);
  }

  void policies(const Eigen::Ref<const RowMatrix<S>>& losses, Index rounds, Eigen::Ref<RowMatrix<S>> policies) const {
    logits(losses, rounds, policies);
    detail::softmax_rows_in_place<S>(policies);
  }

 private:
  Options options_;
};

template <class S>
class FollowTheLeader {
 public:
  using Scalar = S;

  void policies(const Eigen::Ref<const RowMatrix<S>>& losses, Index rounds, Eigen::Ref<RowMatrix<S>> policies) const {
    detail::require_learner_io<S>("FollowTheLeader::policies", losses, rounds, policies);
    policies = losses;
    detail::exclusive_sums<S>(policies, rounds);
    for (Index r = 0; r < policies.rows(); ++r) {  // ties share the weight evenly
      auto row = policies.row(r).array();
      row = (row == row.minCoeff()).template cast<S>();
      row /= row.sum();
    }
  }
};

template <class S>
class UniformLearner {
 public:
  using Scalar = S;

  void policies(const Eigen::Ref<const RowMatrix<S>>& losses, Index rounds, Eigen::Ref<RowMatrix<S>> policies) const {
    detail::require_learner_io<S>("UniformLearner::policies", losses, rounds, policies);
    policies.setConstant(S(1) / S(losses.cols()));
  }
};

}  // namespace gradus
