// What the C++ test programs under tests/cpp share: Check(ok, what) counts a check and
// prints it if it failed (from any thread); Report(name) prints "name: N checks passed", or
// how many failed, and returns main's exit code. tests/test_cpp.py reads that line.
#pragma once

#include <atomic>
#include <cstdio>
#include <string>

namespace checks {

inline std::atomic<int> count{0}, failures{0};

inline void Check(bool ok, const std::string& what) {
  ++count;
  if (!ok) {
    ++failures;
    std::printf("FAILED: %s\n", what.c_str());
  }
}

inline int Report(const char* name) {
  if (failures > 0) {
    std::printf("%s: %d of %d checks failed\n", name, failures.load(), count.load());
    return 1;
  }
  std::printf("%s: %d checks passed\n", name, count.load());
  return 0;
}

}  // namespace checks
