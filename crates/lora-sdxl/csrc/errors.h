// How every shim entry point reports an error to Rust: a malloc'ed copy of
// the message (freed by `lorakit_free`), or nullptr for success.
#pragma once

#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>

namespace lorakit {

inline char* error_copy(const std::string& s) {
  char* m = static_cast<char*>(std::malloc(s.size() + 1));
  if (m) std::memcpy(m, s.c_str(), s.size() + 1);
  return m;
}

// Runs `f`; nullptr when it returns, the message when it throws.
template <typename F>
char* guarded(F f) {
  try {
    f();
    return nullptr;
  } catch (const std::exception& e) {
    return error_copy(e.what());
  }
}

}  // namespace lorakit
