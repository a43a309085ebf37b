// Regret-loss training of a linear self-attention policy (Park, Liu, Ozdaglar, Zhang, ICLR 2025).
//
// Online learning with d = 2 and d = 5 actions over T = 25 rounds, losses i.i.d. uniform on
// [0,1]^d (synthetic: the setting is a distribution of loss sequences, there is no data file).
// The single-layer linear self-attention model is trained with the regret-loss (h = max(R,0)^2,
// f = exp(N R), N = 1, k = 64 fresh sequences per step, Adam), then compared with Hedge
// (eta = sqrt(8 ln d / T)), follow-the-leader and the uniform policy on held-out i.i.d.
// sequences and on the alternating sequence l_1 = (1/2, 0), (0, 1), (1, 0), ... (actions beyond
// the second always lose 1 there). Finally the model's logits are fitted against
// -eta * sum_{i<t} l_i (after removing each row's mean, which a softmax ignores).
// The paper's claim: the trained model behaves like FTRL/Hedge, so it should be close to Hedge
// and far better than FTL on the alternating sequence, where FTL's regret is about T / 2.

#include <cstdio>
#include <random>

#include <gradus/losses/regret.hpp>
#include <gradus/models/linear_self_attention.hpp>
#include <gradus/models/online_learners.hpp>
#include <gradus/optim/transforms.hpp>

#include "example_data.hpp"

using gradus::Index;
using Matrix = gradus::RowMatrix<double>;
using Vector = gradus::Vector<double>;

namespace {

constexpr Index kRounds = 25;
constexpr Index kSequencesPerStep = 64;
constexpr Index kHeldOut = 4096;

Matrix uniform_losses(Index sequences, Index d, std::mt19937& rng) {
  std::uniform_real_distribution<double> u(0, 1);
  Matrix l(sequences * kRounds, d);
  for (Index i = 0; i < l.size(); ++i) l.data()[i] = u(rng);
  return l;
}

Matrix alternating_losses(Index d) {
  Matrix l = Matrix::Ones(kRounds, d);
  l.row(0).head(2) << 0.5, 0;
  for (Index t = 1; t < kRounds; ++t) l.row(t).head(2) << (t % 2 == 0 ? 1 : 0), (t % 2 == 1 ? 1 : 0);
  return l;
}

Vector regrets(const Matrix& losses, const Matrix& policies) {
  Vector R(losses.rows() / kRounds);
  gradus::regret(losses, policies, kRounds, R);
  return R;
}

double mean_regret(const Matrix& losses, const Matrix& policies) { return regrets(losses, policies).mean(); }

// Least-squares fit of the model's logits z against -eta C, C the cumulative losses before each
// round, both with each row's mean removed. Returns eta and the R^2 of the fit.
std::pair<double, double> fit_learning_rate(const Matrix& logits, const Matrix& losses) {
  Matrix C = -losses;
  gradus::detail::exclusive_sums<double>(C, kRounds);
  C.colwise() -= C.rowwise().mean();
  Matrix z = logits;
  z.colwise() -= z.rowwise().mean();
  const double eta = z.cwiseProduct(C).sum() / C.squaredNorm();
  return {eta, 1 - (z - eta * C).squaredNorm() / z.squaredNorm()};
}

void run(Index d, std::int64_t steps, std::mt19937& rng) {
  const gradus::LinearSelfAttentionPolicy<double> model({.actions = d, .rounds = kRounds});
  const gradus::RegretLoss<double> loss({.N = 1, .from_logits = true});
  const auto adam = gradus::adam<double>(
      {.learning_rate = gradus::CosineDecay<double>{.initial = 0.02, .decay_steps = steps, .alpha = 0.05}});

  std::normal_distribution<double> init(0, 0.1);
  Vector theta(model.num_params());
  for (Index i = 0; i < theta.size(); ++i) theta(i) = init(rng);
  auto state = adam.init(theta);

  std::printf("\nd = %lld actions, T = %lld rounds, %lld parameters, %lld Adam steps of k = %lld sequences\n",
              static_cast<long long>(d), static_cast<long long>(kRounds), static_cast<long long>(model.num_params()),
              static_cast<long long>(steps), static_cast<long long>(kSequencesPerStep));
  std::printf("  %8s  %14s\n", "step", "regret-loss");
  const examples::Stopwatch clock;
  Matrix z(kSequencesPerStep * kRounds, d), dz(z.rows(), d);
  Vector grad(theta.size());
  double running = 0;
  const std::int64_t report_every = std::max<std::int64_t>(1, steps / 8);
  for (std::int64_t step = 1; step <= steps; ++step) {
    const Matrix l = uniform_losses(kSequencesPerStep, d, rng);
    model.predict(theta, l, z);
    running += loss.value_and_grad(l, z, kRounds, dz);
    model.vjp_params(theta, l, dz, grad);
    adam.update(grad, state, theta);
    theta += grad;
    if (step % report_every == 0) {
      std::printf("  %8lld  %14.4f\n", static_cast<long long>(step), running / double(report_every));
      running = 0;
    }
  }
  const double train_seconds = clock.seconds();

  // Held-out i.i.d. sequences and the alternating one, for every learner.
  const Matrix held_out = uniform_losses(kHeldOut, d, rng), alternating = alternating_losses(d);
  const double eta = gradus::hedge_learning_rate<double>(d, kRounds);
  auto model_policies = [&](const Matrix& l) {
    Matrix pi(l.rows(), d);
    model.predict(theta, l, pi);
    gradus::detail::softmax_rows_in_place<double>(pi);
    return pi;
  };
  auto learner_policies = [&](const auto& learner, const Matrix& l) {
    Matrix pi(l.rows(), d);
    learner.policies(l, kRounds, pi);
    return pi;
  };
  struct Row {
    const char* name;
    Matrix iid, alt;
  };
  const Row rows[] = {
      {"regret-loss LSA", model_policies(held_out), model_policies(alternating)},
      {"Hedge", learner_policies(gradus::Hedge<double>(), held_out), learner_policies(gradus::Hedge<double>(), alternating)},
      {"follow-the-leader", learner_policies(gradus::FollowTheLeader<double>(), held_out),
       learner_policies(gradus::FollowTheLeader<double>(), alternating)},
      {"uniform", learner_policies(gradus::UniformLearner<double>(), held_out),
       learner_policies(gradus::UniformLearner<double>(), alternating)},
  };
  std::printf("  trained in %.2f s\n\n", train_seconds);
  std::printf("  %-18s  %14s  %14s  %12s\n", "regret", "i.i.d. mean", "i.i.d. worst", "alternating");
  for (const Row& row : rows) {
    const Vector R = regrets(held_out, row.iid);
    std::printf("  %-18s  %14.3f  %14.3f  %12.3f\n", row.name, R.mean(), R.maxCoeff(), mean_regret(alternating, row.alt));
  }
  std::printf("  (%lld held-out i.i.d. sequences: every learner's expected loss is T/2 there, so the means agree;\n"
              "   the regret-loss acts on the spread and the worst sequences)\n",
              static_cast<long long>(kHeldOut));
  std::printf("  Hedge's worst-case bound sqrt(T ln d / 2) = %.3f\n", gradus::hedge_regret_bound<double>(d, kRounds));

  Matrix logits(held_out.rows(), d);
  model.predict(theta, held_out, logits);
  const auto [fitted_eta, r2] = fit_learning_rate(logits, held_out);
  std::printf("\n  fit of the model's logits to -eta * sum_{i<t} l_i (row means removed):\n");
  std::printf("    fitted eta = %.3f (Hedge's sqrt(8 ln d / T) = %.3f), R^2 = %.4f\n", fitted_eta, eta, r2);

  const double model_alt = mean_regret(alternating, rows[0].alt), hedge_alt = mean_regret(alternating, rows[1].alt),
               ftl_alt = mean_regret(alternating, rows[2].alt);
  std::printf("\n  paper's claim, checked here:\n");
  std::printf("    logits of the FTRL / Hedge form -eta * cumulative loss (R^2 > 0.9):        %s\n",
              r2 > 0.9 ? "yes" : "NO");
  std::printf("    alternating sequence closer to Hedge (%.2f) than to FTL (%.2f): model %.2f  %s\n", hedge_alt,
              ftl_alt, model_alt, model_alt - hedge_alt < ftl_alt - model_alt ? "yes" : "NO");
  std::printf("    learned eta vs Hedge's worst-case tuning: %.2fx\n", fitted_eta / eta);
}

}  // namespace

int main() {
  const std::int64_t steps = examples::smoke() ? 5 : 20000;
  std::mt19937 rng(2025);
  std::printf("Regret-loss training of a single-layer linear self-attention policy (Park et al., ICLR 2025)\n");
  std::printf("losses i.i.d. uniform on [0,1]^d; h(R) = max(R,0)^2, f = exp(N R) with N = 1\n");
  for (Index d : {2, 5}) run(d, steps, rng);
  return 0;
}
