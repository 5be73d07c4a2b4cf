// edgequant-run: load an exported DIST folder (edgequant export --target cuda|cpu) and decode greedily from prompt
// token ids, through the C API of apps/runtime (the runtime shared by every app; see apps/runtime/README.md).
//
// usage: edgequant-run DIST cuda|cpu ID[,ID...] [NEW_TOKENS]
// Tokenization is left to the caller (the tokenizer files sit in DIST); the program prints the new token ids and
// the prefill and decode speeds. For cuda the runtime hands TVM the DIST's kernels.fatbin (compiled by nvcc at export
// time), so no CUDA compiler is needed where this runs.
#include "edgequant_runtime.h"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <string>
#include <vector>

static int Fail(const char* what) {
  std::fprintf(stderr, "error: %s: %s\n", what, edgequant_last_error());
  return 1;
}

int main(int argc, char** argv) {
  if (argc < 4) {
    std::fprintf(stderr, "usage: %s DIST cuda|cpu ID[,ID...] [NEW_TOKENS]\n", argv[0]);
    return 2;
  }
  std::string kind = argv[2];
  std::vector<int32_t> prompt;
  std::stringstream ss(argv[3]);
  for (std::string tok; std::getline(ss, tok, ',');) {
    char* end = nullptr;
    long v = std::strtol(tok.c_str(), &end, 10);
    if (tok.empty() || *end) {
      std::fprintf(stderr, "error: '%s' is not a token id\n", tok.c_str());
      return 2;
    }
    prompt.push_back(static_cast<int32_t>(v));
  }
  int new_tokens = argc > 4 ? std::atoi(argv[4]) : 32;
  if (new_tokens < 1) {
    std::fprintf(stderr, "error: NEW_TOKENS must be a positive integer\n");
    return 2;
  }

  edgequant_model* m = nullptr;
  if (edgequant_open(argv[1], nullptr, &m) != EDGEQUANT_OK) return Fail("open");
  edgequant_info info;
  edgequant_get_info(m, &info);
  if (kind != info.device) {
    std::fprintf(stderr, "error: %s was exported for %s, not %s\n", argv[1], info.device, kind.c_str());
    edgequant_close(m);
    return 2;
  }
  auto t0 = std::chrono::steady_clock::now();
  int rc = edgequant_prefill(m, prompt.data(), prompt.size()) ? Fail("prefill") : 0;
  auto t1 = std::chrono::steady_clock::now();
  std::vector<int32_t> out;
  for (int i = 0; !rc && i < new_tokens; ++i) {
    int32_t tok;
    if (edgequant_decode(m, 0.0f, 1.0f, &tok)) rc = Fail("decode");
    else out.push_back(tok);
  }
  auto t2 = std::chrono::steady_clock::now();
  edgequant_close(m);
  if (rc) return rc;
  double prefill_s = std::chrono::duration<double>(t1 - t0).count();
  double decode_s = std::chrono::duration<double>(t2 - t1).count();
  for (size_t i = 0; i < out.size(); ++i) std::printf("%s%d", i ? "," : "", out[i]);
  // the first new token comes from the prefill's logits: decode steps = NEW_TOKENS - 1
  std::printf("\nprefill %g tok/s, decode %g tok/s\n", prompt.size() / prefill_s, (new_tokens - 1) / decode_s);
  return 0;
}
