// Fuzz harness: the checkpoint readers. load_state on arbitrary bytes and on mutated valid
// checkpoints (truncated, a byte changed, a length field overwritten) of sgd (momentum), adam
// and chain(clip_by_global_norm, adam) states; EF21::restore on mutated EF21Checkpoints.
//
// Asserted: a reader either succeeds or throws gradus::invalid_argument (never another
// exception, a crash or an allocation beyond the input's size), and when it throws, the object
// it was reading into is untouched (its saved bytes, or x, g, round and every g_i, are the same).
// A load that succeeds consumed a checkpoint that save_state writes back byte for byte.
#include "fuzz.hpp"

#include <sstream>

#include "gradus/optim/ef21/ef21.hpp"
#include "gradus/optim/ef21/logistic.hpp"
#include "gradus/optim/transforms.hpp"

using gradus::Index;
using gradus::Vector;

namespace {

template <class State>
std::string saved(const State& state) {
  std::ostringstream out;
  gradus::save_state(out, state);
  return out.str();
}

template <class S, class T>
void transform_state(FuzzedDataProvider& in, const T& transform) {
  const Index d = in.ConsumeIntegralInRange<Index>(0, 6);
  const Vector<S> params = fuzz::vector<S>(in, d, S(10), true);
  auto state = transform.init(params);
  for (int t = in.ConsumeIntegralInRange<int>(0, 2); t > 0; --t) {
    Vector<S> g = fuzz::vector<S>(in, d, S(100), true);  // save_state refuses non-finite states
    transform.update(g, state, params);
  }
  std::string bytes = saved(state);
  switch (in.ConsumeIntegralInRange<int>(0, 3)) {
    case 0:  // arbitrary bytes
      bytes = in.ConsumeBytesAsString(in.ConsumeIntegralInRange<std::size_t>(0, 256));
      break;
    case 1:  // truncated
      bytes.resize(in.ConsumeIntegralInRange<std::size_t>(0, bytes.size()));
      break;
    case 2:  // a byte changed
      if (!bytes.empty()) bytes[in.ConsumeIntegralInRange<std::size_t>(0, bytes.size() - 1)] = char(in.ConsumeIntegral<std::uint8_t>());
      break;
    default: {  // an 8-byte field (a length, a step, a magic) overwritten
      const std::int64_t field = fuzz::pick<std::int64_t>(in, {-1, 0, 1, 7, std::int64_t(1) << 31, std::int64_t(1) << 40,
                                                               (std::int64_t(1) << 48) - 1, std::numeric_limits<std::int64_t>::max(),
                                                               std::numeric_limits<std::int64_t>::min(), in.ConsumeIntegral<std::int64_t>()});
      if (bytes.size() >= 8) std::memcpy(&bytes[in.ConsumeIntegralInRange<std::size_t>(0, bytes.size() - 8)], &field, 8);
    }
  }
  auto target = transform.init(fuzz::vector<S>(in, in.ConsumeIntegralInRange<Index>(0, 6), S(1), true));
  const std::string before = saved(target);
  fuzz::call = [&] { return std::string(sizeof(S) == 4 ? "float" : "double") + " load_state of " + std::to_string(bytes.size()) + " bytes"; };
  std::istringstream stream(bytes);
  if (fuzz::accepts([&] { gradus::load_state(stream, target); })) {
    const std::string after = saved(target);
    FUZZ_CHECK(bytes.compare(0, after.size(), after) == 0, "a loaded state does not save back to the bytes it came from");
  } else {
    FUZZ_CHECK(saved(target) == before || fuzz::muted("partial-load"), "a failed load_state changed the state");
  }
}

template <class S>
void ef21_restore(FuzzedDataProvider& in) {
  const Index d = 3;
  gradus::RowMatrix<S> A = fuzz::matrix<S>(in, 4, d, S(4), true);
  const gradus::Labels b = (gradus::Labels(4) << 1, -1, 1, -1).finished();
  std::vector<gradus::ef21::NonconvexLogistic<S>> clients;
  for (int i = 0; i < 2; ++i) clients.emplace_back(A, b);
  gradus::ef21::EF21 ef21(clients, gradus::ef21::TopK{1}, Vector<S>::Ones(d), {.gamma = 0.1});
  ef21.step();
  auto state = ef21.checkpoint();
  switch (in.ConsumeIntegralInRange<int>(0, 6)) {
    case 0: state.x.resize(in.ConsumeIntegralInRange<Index>(0, 5)); break;
    case 1: state.g.resize(in.ConsumeIntegralInRange<Index>(0, 5)); break;
    case 2: state.v.resize(in.ConsumeIntegralInRange<Index>(0, 5)); break;
    case 3: state.client_g.resize(in.ConsumeIntegralInRange<std::size_t>(0, 3), Vector<S>::Zero(d)); break;
    case 4: state.client_g[in.ConsumeIntegralInRange<std::size_t>(0, 1)].resize(in.ConsumeIntegralInRange<Index>(0, 5)); break;
    case 5: state.client_rng.resize(in.ConsumeIntegralInRange<std::size_t>(0, 3)); break;
    default: state.first_client = in.ConsumeIntegralInRange<Index>(-2, 2); break;
  }
  const auto before = ef21.checkpoint();
  fuzz::call = [&] { return std::string(sizeof(S) == 4 ? "float" : "double") + " EF21::restore of a mutated checkpoint"; };
  if (fuzz::accepts([&] { ef21.restore(state); })) return;
  const auto after = ef21.checkpoint();
  bool same = after.round == before.round && after.x == before.x && after.g == before.g && after.v == before.v &&
              after.client_rng == before.client_rng;
  for (std::size_t i = 0; i < after.client_g.size(); ++i) same = same && after.client_g[i] == before.client_g[i];
  FUZZ_CHECK(same, "a failed EF21::restore changed the object");
}

template <class S>
void harness(FuzzedDataProvider& in) {
  switch (in.ConsumeIntegralInRange<int>(0, 3)) {
    case 0: return transform_state<S>(in, gradus::momentum<S>());
    case 1: return transform_state<S>(in, gradus::adam<S>());
    case 2: return transform_state<S>(in, gradus::chain(gradus::clip_by_global_norm<S>(1), gradus::adam<S>()));
    default: return ef21_restore<S>(in);
  }
}

}  // namespace

GRADUS_FUZZ_ENTRY(harness)
