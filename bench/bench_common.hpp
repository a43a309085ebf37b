#pragma once
// Shared by the gradus benchmarks: smoke mode, the memcpy physical bound, and a reporter
// that prints throughput ratios between variants measured side by side in one run.
//
// Benchmarks are named "<group>/<variant>/<shape>". GRADUS_BENCH_MAIN({"fused", "memcpy"}, ...)
// prints, after the usual table, time(baseline) / time(variant) for every group and shape
// where both ran: the variant's throughput as a multiple of the baseline's.

#include <benchmark/benchmark.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace gradus::bench {

// GRADUS_SMOKE=1: tiny shapes and few iterations, so CI can check every benchmark runs.
inline bool smoke() {
  const char* value = std::getenv("GRADUS_SMOKE");
  return value != nullptr && *value != '\0' && std::strcmp(value, "0") != 0;
}

// The physical bound for a kernel that reads and writes `bytes` once each.
inline void memcpy_bound(benchmark::State& state, std::size_t bytes) {
  std::vector<char> source(bytes, 1), target(bytes);
  for (auto _ : state) {
    std::memcpy(target.data(), source.data(), bytes);
    benchmark::DoNotOptimize(target.data());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations()) * static_cast<std::int64_t>(2 * bytes));
}

struct Ratio {
  std::string variant;
  std::string baseline;
};

class RatioReporter : public benchmark::ConsoleReporter {
 public:
  explicit RatioReporter(std::vector<Ratio> ratios) : ratios_(std::move(ratios)) {}

  void ReportRuns(const std::vector<Run>& runs) override {
    ConsoleReporter::ReportRuns(runs);
    for (const auto& run : runs) {
      // One time per benchmark: the median when repetitions ran, else the single run.
      const bool median = run.run_type == Run::RT_Aggregate && run.aggregate_name == "median";
      if (run.error_occurred || (run.run_type != Run::RT_Iteration && !median)) continue;
      const std::string name = run.run_name.str();
      const auto first = name.find('/');
      const auto second = name.find('/', first + 1);
      if (first == std::string::npos || second == std::string::npos) continue;
      std::string shape = name.substr(second + 1);
      // A fixed iteration count is part of the name but not of the shape being compared.
      if (const auto at = shape.find("/iterations:"); at != std::string::npos) {
        shape.erase(at, shape.find('/', at + 1) - at);
      }
      const std::string key = name.substr(0, first) + " " + shape;
      times_[key][name.substr(first + 1, second - first - 1)] = {run.GetAdjustedRealTime(), run.GetAdjustedCPUTime()};
    }
  }

  // Ratios of real time and of CPU time: on a shared machine the CPU-time ratio of a
  // single-threaded kernel is the steadier of the two.
  void Finalize() override {
    ConsoleReporter::Finalize();
    bool header = false;
    for (const auto& [key, variants] : times_) {
      for (const auto& ratio : ratios_) {
        const auto v = variants.find(ratio.variant);
        const auto b = variants.find(ratio.baseline);
        if (v == variants.end() || b == variants.end() || v->second.real <= 0 || v->second.cpu <= 0) continue;
        if (!header) std::printf("\nThroughput ratios (same run; baseline time / variant time):\n");
        header = true;
        std::printf("  %-40s %-12s / %-12s = %6.2fx real", key.c_str(), ratio.variant.c_str(), ratio.baseline.c_str(),
                    b->second.real / v->second.real);
        // Manually timed benchmarks report their own time; their CPU time covers more work.
        if (key.find("manual_time") == std::string::npos) std::printf(", %6.2fx cpu", b->second.cpu / v->second.cpu);
        std::printf("\n");
      }
    }
    std::fflush(stdout);
  }

 private:
  struct Times {
    double real, cpu;
  };
  std::vector<Ratio> ratios_;
  std::map<std::string, std::map<std::string, Times>> times_;
};

inline int run(int argc, char** argv, std::vector<Ratio> ratios) {
  std::vector<char*> args(argv, argv + argc);
  std::string min_time = "--benchmark_min_time=0.01";
  if (smoke()) args.push_back(min_time.data());
  int count = static_cast<int>(args.size());
  benchmark::Initialize(&count, args.data());
  if (benchmark::ReportUnrecognizedArguments(count, args.data())) return 1;
  RatioReporter reporter(std::move(ratios));
  benchmark::RunSpecifiedBenchmarks(&reporter);
  benchmark::Shutdown();
  return 0;
}

}  // namespace gradus::bench

#define GRADUS_BENCH_MAIN(...)                                 \
  int main(int argc, char** argv) {                           \
    return gradus::bench::run(argc, argv, {__VA_ARGS__});     \
  }
