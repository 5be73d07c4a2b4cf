// edgequant-runtime-cli: generate from prompt token ids with the C API of edgequant_runtime.h.
//
//   edgequant-runtime-cli [--temperature T] [--top-p P] [--seed S] [--max-seq-len L] DIST ID [ID...] N
//
// IDs may also be given comma-separated in one argument. Prints the N new token ids (comma-separated) on stdout,
// timings and memory on stderr. Tokenization is left to the caller (DIST holds the tokenizer files).
#include "edgequant_runtime.h"

#include <chrono>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

static int Usage(const char* argv0) {
  std::fprintf(stderr,
               "usage: %s [--temperature T] [--top-p P] [--seed S] [--max-seq-len L] [--system-lib-prefix P] "
               "DIST ID [ID...] N\n"
               "prints N new token ids (greedy unless --temperature > 0); with --system-lib-prefix the model is the\n"
               "system library linked into this program under prefix P, and DIST supplies its weights\n",
               argv0);
  return 2;
}

// strict integer parse: a typo must not silently become token 0
static bool ParseInt(const std::string& s, long long lo, long long hi, long long* out) {
  if (s.empty()) return false;
  errno = 0;
  char* end = nullptr;
  long long v = std::strtoll(s.c_str(), &end, 10);
  if (errno || *end || v < lo || v > hi) return false;
  *out = v;
  return true;
}

static int Check(edgequant_status s, const char* what) {
  if (s == EDGEQUANT_OK) return 0;
  std::fprintf(stderr, "error: %s: %s (%s)\n", what, edgequant_last_error(), edgequant_status_name(s));
  return 1;
}

int main(int argc, char** argv) {
  float temperature = 0.0f, top_p = 1.0f;
  unsigned long long seed = 0;
  edgequant_options opts{};
  std::vector<std::string> pos;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto value = [&](const char* name) -> const char* {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "error: %s needs a value\n", name);
        std::exit(2);
      }
      return argv[++i];
    };
    long long v;
    if (a == "--temperature") {
      temperature = std::strtof(value("--temperature"), nullptr);
    } else if (a == "--top-p") {
      top_p = std::strtof(value("--top-p"), nullptr);
    } else if (a == "--seed") {
      if (!ParseInt(value("--seed"), 0, INT64_MAX, &v)) return Usage(argv[0]);
      seed = static_cast<unsigned long long>(v);
    } else if (a == "--max-seq-len") {
      if (!ParseInt(value("--max-seq-len"), 1, INT32_MAX, &v)) return Usage(argv[0]);
      opts.max_total_seq_len = static_cast<int32_t>(v);
    } else if (a == "--system-lib-prefix") {
      opts.system_lib_prefix = value("--system-lib-prefix");
    } else if (a == "-h" || a == "--help") {
      return Usage(argv[0]);
    } else {
      pos.push_back(a);
    }
  }
  if (pos.size() < 3) return Usage(argv[0]);
  long long n_new;
  if (!ParseInt(pos.back(), 1, INT32_MAX, &n_new)) {
    std::fprintf(stderr, "error: N (the number of new tokens) must be a positive integer, not '%s'\n", pos.back().c_str());
    return 2;
  }
  std::vector<int32_t> prompt;
  for (size_t i = 1; i + 1 < pos.size(); ++i) {
    const std::string& arg = pos[i];
    for (size_t b = 0; b <= arg.size();) {
      size_t e = arg.find(',', b);
      if (e == std::string::npos) e = arg.size();
      long long id;
      if (!ParseInt(arg.substr(b, e - b), INT32_MIN, INT32_MAX, &id)) {
        std::fprintf(stderr, "error: '%s' is not a token id\n", arg.substr(b, e - b).c_str());
        return 2;
      }
      prompt.push_back(static_cast<int32_t>(id));
      b = e + 1;
    }
  }

  using clock = std::chrono::steady_clock;
  auto t0 = clock::now();
  edgequant_model* m = nullptr;
  if (Check(edgequant_open(pos[0].c_str(), &opts, &m), "open")) return 1;
  auto t1 = clock::now();
  int rc = Check(edgequant_reset(m, seed), "reset") || Check(edgequant_prefill(m, prompt.data(), prompt.size()), "prefill");
  auto t2 = clock::now();
  std::vector<int32_t> out;
  for (long long i = 0; !rc && i < n_new; ++i) {
    int32_t tok;
    rc = Check(edgequant_decode(m, temperature, top_p, &tok), "decode");
    if (!rc) out.push_back(tok);
  }
  auto t3 = clock::now();
  for (size_t i = 0; i < out.size(); ++i) std::printf("%s%d", i ? "," : "", out[i]);
  std::printf("\n");
  edgequant_info info;
  if (!rc && edgequant_get_info(m, &info) == EDGEQUANT_OK) {
    auto s = [](clock::time_point a, clock::time_point b) { return std::chrono::duration<double>(b - a).count(); };
    // the first new token comes from the prefill's logits: decode steps = N - 1
    std::fprintf(stderr,
                 "target %s; load %.2f s; prefill %zu tokens in %.3f s (%.1f tok/s); decode %zu tokens in %.3f s "
                 "(%.1f tok/s); weights %llu bytes, KV cache %llu bytes (%d tokens)\n",
                 info.target, s(t0, t1), prompt.size(), s(t1, t2), prompt.size() / s(t1, t2), out.size() - 1, s(t2, t3),
                 out.size() > 1 ? (out.size() - 1) / s(t2, t3) : 0.0, (unsigned long long)info.weight_bytes,
                 (unsigned long long)info.kv_cache_bytes, info.max_total_seq_len);
  }
  edgequant_close(m);
  return rc;
}
