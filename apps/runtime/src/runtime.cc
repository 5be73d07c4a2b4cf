// The C API of edgequant_runtime.h over the TVM runtime (libtvm_runtime + libtvm_ffi from the apache-tvm wheels).
//
// It does what export/runtime.py's Runner does, in the same order, so that greedy tokens are identical: the VM's
// `embed`, then `prefill` (in prefill_chunk_size chunks) or `decode` on a paged KV cache holding one sequence; weights
// come from tensor-cache.json through the VM's tensor-cache builtins. A longrope model (Phi-3) is re-encoded once,
// with `prefill_long`, when its sequence first grows past original_max_position_embeddings, as the Runner does
// (export/models/llama.py says why). Like export/dist.py it reads the DIST folder as
// hostile input, because TVM's loaders trust their files (a byteOffset past a shard is read, an outlier column past K
// is gathered, a `../` path is opened).
#include "edgequant_runtime.h"

#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/map.h>
#include <tvm/ffi/container/shape.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/json.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <dlfcn.h>
#include <limits.h>
#include <stdlib.h>
#include <sys/stat.h>

#include <algorithm>
#include <cctype>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <fstream>
#include <functional>
#include <iterator>
#include <map>
#include <mutex>
#include <numeric>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <vector>

namespace {

using tvm::ffi::Any;
using tvm::ffi::Function;
using tvm::ffi::Module;
using tvm::ffi::Shape;
using tvm::ffi::String;
using tvm::ffi::Tensor;
namespace json = tvm::ffi::json;

const char* kExportJson = "edgequant-export.json";
const char* kTensorCache = "tensor-cache.json";
const char* kFix = "export the model again with `edgequant export`";
const char* kTvmSeries = "0.27";        // the TVM release whose runtime this links (and whose libraries it loads)
const int64_t kFormatVersion = 1;       // export/dist.py's FORMAT_VERSION
const int64_t kMaxDim = int64_t(1) << 24;
const size_t kMaxJsonBytes = size_t(64) << 20;
const int kMaxJsonDepth = 32;           // export/dist.py's MAX_JSON_DEPTH: TVM's JSON parser recurses per level

thread_local std::string last_error;

// Internal failures carry their status to the API boundary, where they become a return code.
struct Failure {
  edgequant_status status;
  std::string message;
};

[[noreturn]] void Fail(edgequant_status s, std::string msg) { throw Failure{s, std::move(msg)}; }

[[noreturn]] void Damaged(const std::string& file, const std::string& what) {
  Fail(EDGEQUANT_ERR_DAMAGED, file + " is damaged (" + what + "); " + kFix);
}

std::string FirstLine(const std::string& s) {
  std::string t = s.substr(0, s.find('\n'));
  return t.size() > 300 ? t.substr(0, 300) : t;
}

// ------------------------------------------------------------------------------------------------ files and JSON

std::string RealPath(const std::string& p) {
  char buf[PATH_MAX];
  return realpath(p.c_str(), buf) ? std::string(buf) : std::string();
}

bool IsFile(const std::string& p) {
  struct stat st;
  return stat(p.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

// `dist/name` when `name` is a plain relative path without `..` that resolves (symlinks included) inside `dist`;
// a name written in DIST's own files must not make us open, or load code from, anywhere else.
std::string Inside(const std::string& dist, const std::string& name, const std::string& file,
                   const std::string& field) {
  bool ok = !name.empty() && name[0] != '/' && name.find('\0') == std::string::npos;
  for (size_t b = 0; ok && b <= name.size();) {
    size_t e = name.find('/', b);
    if (e == std::string::npos) e = name.size();
    if (name.compare(b, e - b, "..") == 0 && e - b == 2) ok = false;
    b = e + 1;
  }
  std::string path = dist + "/" + name, root = RealPath(dist), real = ok ? RealPath(path) : "";
  // a file that does not exist yet resolves to "" and is reported as missing by the caller
  if (ok && !real.empty() && real.compare(0, root.size() + 1, root + "/") != 0) ok = false;
  if (!ok) {
    Fail(EDGEQUANT_ERR_DAMAGED, file + " names '" + name + "' as its " + field + ", which is not a file inside " +
                                    dist + "; refusing to open it; " + kFix);
  }
  return path;
}

std::string ReadText(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) Fail(EDGEQUANT_ERR_NOT_FOUND, "cannot read " + path);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

// MD5 (RFC 1321) of a file, lower-case hex: the shard checksum TVM's tensor cache records. Integrity, not
// authenticity: without it a weight shard with flipped bits ran and gave other tokens, without an error.
std::string FileMd5(const std::string& path) {
  static const uint32_t* k = [] {
    static uint32_t t[64];
    for (int i = 0; i < 64; ++i) t[i] = static_cast<uint32_t>(std::floor(std::fabs(std::sin(i + 1.0)) * 4294967296.0));
    return t;
  }();
  static const int kShift[4][4] = {{7, 12, 17, 22}, {5, 9, 14, 20}, {4, 11, 16, 23}, {6, 10, 15, 21}};
  uint32_t h[4] = {0x67452301u, 0xefcdab89u, 0x98badcfeu, 0x10325476u};
  auto block = [&](const unsigned char* p) {
    uint32_t m[16];
    for (int i = 0; i < 16; ++i) {
      m[i] = p[4 * i] | (p[4 * i + 1] << 8) | (p[4 * i + 2] << 16) | (static_cast<uint32_t>(p[4 * i + 3]) << 24);
    }
    uint32_t a = h[0], b = h[1], c = h[2], d = h[3];
    for (int i = 0; i < 64; ++i) {
      uint32_t f;
      int g, r = i / 16;
      if (r == 0) f = (b & c) | (~b & d), g = i;
      else if (r == 1) f = (d & b) | (~d & c), g = (5 * i + 1) % 16;
      else if (r == 2) f = b ^ c ^ d, g = (3 * i + 5) % 16;
      else f = c ^ (b | ~d), g = (7 * i) % 16;
      f += a + k[i] + m[g];
      int s = kShift[r][i % 4];
      a = d, d = c, c = b, b += (f << s) | (f >> (32 - s));
    }
    h[0] += a, h[1] += b, h[2] += c, h[3] += d;
  };
  std::ifstream in(path, std::ios::binary);
  if (!in) Fail(EDGEQUANT_ERR_NOT_FOUND, "cannot read " + path);
  std::vector<unsigned char> buf(1 << 22);
  uint64_t total = 0;
  size_t have = 0;   // bytes of buf not yet consumed (less than one block after each pass)
  while (in) {
    in.read(reinterpret_cast<char*>(buf.data() + have), static_cast<std::streamsize>(buf.size() - have));
    size_t got = static_cast<size_t>(in.gcount());
    total += got;
    have += got;
    size_t whole = have / 64 * 64;
    for (size_t i = 0; i < whole; i += 64) block(buf.data() + i);
    std::memmove(buf.data(), buf.data() + whole, have - whole);
    have -= whole;
  }
  unsigned char tail[128] = {0};
  std::memcpy(tail, buf.data(), have);
  tail[have] = 0x80;
  size_t len = have < 56 ? 64 : 128;
  uint64_t bits = total * 8;
  for (int i = 0; i < 8; ++i) tail[len - 8 + i] = static_cast<unsigned char>(bits >> (8 * i));
  for (size_t i = 0; i < len; i += 64) block(tail + i);
  static const char* hex = "0123456789abcdef";
  std::string out;
  for (uint32_t w : h) {
    for (int i = 0; i < 4; ++i) {
      unsigned char byte = static_cast<unsigned char>(w >> (8 * i));
      out += hex[byte >> 4];
      out += hex[byte & 15];
    }
  }
  return out;
}

// deepest [ / { nesting, brackets inside strings ignored
int JsonDepth(const std::string& text) {
  int depth = 0, deepest = 0;
  bool in_str = false, esc = false;
  for (char c : text) {
    if (in_str) {
      if (esc) esc = false;
      else if (c == '\\') esc = true;
      else if (c == '"') in_str = false;
    } else if (c == '"') {
      in_str = true;
    } else if (c == '[' || c == '{') {
      deepest = std::max(deepest, ++depth);
    } else if (c == ']' || c == '}') {
      --depth;
    }
  }
  return deepest;
}

json::Value ParseJson(const std::string& text, const std::string& file) {
  if (text.size() > kMaxJsonBytes) Damaged(file, "larger than 64 MiB");
  if (JsonDepth(text) > kMaxJsonDepth) Damaged(file, "JSON nested deeper than " + std::to_string(kMaxJsonDepth) + " levels");
  String err;
  json::Value v = json::Parse(String(text), &err);
  if (!err.empty()) Damaged(file, "not valid JSON");
  return v;
}

std::optional<json::Object> AsObject(const Any& v) { return v.as<json::Object>(); }
std::optional<json::Array> AsArray(const Any& v) { return v.as<json::Array>(); }

std::optional<Any> Field(const json::Object& o, const char* key) { return o.Get(String(key)); }

std::optional<std::string> StrField(const json::Object& o, const char* key) {
  auto v = Field(o, key);
  if (!v) return std::nullopt;
  auto s = v->as<String>();
  return s ? std::optional<std::string>(std::string(*s)) : std::nullopt;
}

std::optional<int64_t> IntField(const json::Object& o, const char* key, int64_t lo) {
  auto v = Field(o, key);
  if (!v) return std::nullopt;
  auto i = v->as<int64_t>();  // strict: JSON true/false and 1.0 are not integers
  return i && *i >= lo ? i : std::nullopt;
}

std::optional<std::vector<int64_t>> ShapeField(const json::Object& o, const char* key) {
  auto v = Field(o, key);
  if (!v) return std::nullopt;
  auto a = AsArray(*v);
  if (!a) return std::nullopt;
  std::vector<int64_t> out;
  for (const Any& x : *a) {
    auto i = x.as<int64_t>();
    if (!i || *i < 0 || *i > (int64_t(1) << 40)) return std::nullopt;
    out.push_back(*i);
  }
  return out;
}

// bytes per element of the dtypes a DIST may hold (export/dist.py's list)
int ItemSize(const std::string& dtype) {
  static const std::map<std::string, int> sizes = {{"float16", 2}, {"float32", 4}, {"uint32", 4},
                                                   {"uint8", 1},   {"int32", 4},   {"bfloat16", 2}};
  auto it = sizes.find(dtype);
  return it == sizes.end() ? 0 : it->second;
}

struct Param {
  std::string name, dtype;
  std::vector<int64_t> shape;
  int bits = 0;  // a quantized module's own bit width (per-module schemes); 0: the DIST's
};

struct Record {
  std::string path;
  int64_t offset = 0, nbytes = 0;
  std::string dtype;
  std::vector<int64_t> shape;
};

struct ExportInfo {
  std::string target, device, library;
  std::optional<std::string> fatbin;
  int64_t chunk = 0, vocab = 0, hidden = 0, intermediate = 0, layers = 0, heads = 0, kv_heads = 0, head_dim = 0,
          context = 0;
  int bits = 0;  // 0 when the quantization string names no bit width (unquantized)
  int64_t long_after = -1;  // longrope: past this length every key and query takes the long factors; -1: none
  std::vector<Param> params;
};

// A truncated ELF shared object faults (SIGBUS) inside dlopen: its header tables and loadable segments must lie
// inside the file (export/dist.py's check_elf).
void CheckElf(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::string b((std::istreambuf_iterator<char>(f)), {});
  auto u = [&](size_t off, int n) -> uint64_t {  // little-endian field, 0 when outside the file
    uint64_t v = 0;
    if (off + n > b.size()) return ~uint64_t(0);
    for (int i = n - 1; i >= 0; --i) v = (v << 8) | static_cast<uint8_t>(b[off + i]);
    return v;
  };
  if (b.size() < 52 || b.compare(0, 4, "\x7f" "ELF") != 0 || (b[4] != 1 && b[4] != 2) || b[5] != 1) {
    Fail(EDGEQUANT_ERR_DAMAGED, path + " is not a little-endian ELF shared library; it is damaged or built for "
                                       "another machine; " + kFix);
  }
  // dlopen calls an object of another CPU "cannot open shared object file" although it exists (nineteenth
  // re-run, U12): a cpu-arm64 export on an x86-64 machine is not damaged, it runs elsewhere
  auto cpu = [](uint64_t m) -> std::string {
    switch (m) {
      case 62: return "x86-64";
      case 183: return "aarch64";
      case 40: return "32-bit ARM";
      case 243: return "RISC-V";
      default: return "CPU type " + std::to_string(m);
    }
  };
#if defined(__x86_64__)
  const uint64_t host = 62;
#elif defined(__aarch64__)
  const uint64_t host = 183;
#else
  const uint64_t host = 0;
#endif
  uint64_t machine = u(18, 2);
  if (host && machine != host) {
    Fail(EDGEQUANT_ERR_UNSUPPORTED, path + " is built for " + cpu(machine) + ", and this machine is " + cpu(host) +
                                        ": run the export on such a machine, or export with --target cpu for this one");
  }
  bool is64 = b[4] == 2;
  int w = is64 ? 8 : 4;
  uint64_t size = b.size(), phoff = u(24 + w, w), shoff = u(24 + 2 * w, w);
  uint64_t phentsize = u(24 + 3 * w + 6, 2), phnum = u(24 + 3 * w + 8, 2), shentsize = u(24 + 3 * w + 10, 2),
           shnum = u(24 + 3 * w + 12, 2);
  bool ok = phnum > 0 && phnum < 0xffff && phentsize >= uint64_t(is64 ? 56 : 32) && phoff < size &&
            phentsize * phnum <= size - phoff &&
            (shnum == 0 || (shentsize >= uint64_t(is64 ? 64 : 40) && shoff < size && shentsize * shnum <= size - shoff));
  for (uint64_t i = 0; ok && i < phnum; ++i) {
    size_t e = phoff + i * phentsize;
    uint64_t type = u(e, 4), off = is64 ? u(e + 8, 8) : u(e + 4, 4), filesz = is64 ? u(e + 32, 8) : u(e + 16, 4);
    if (type == 1 && (off > size || filesz > size - off)) ok = false;
  }
  if (!ok) {
    Fail(EDGEQUANT_ERR_DAMAGED, path + " is truncated or damaged (its ELF headers point past its " +
                                    std::to_string(size) + " bytes); " + kFix);
  }
}

// A JSON number as a double (integers too; true/false are not numbers).
std::optional<double> NumberOf(const Any& v) {
  if (auto d = v.as<double>()) return d;
  if (auto i = v.as<int64_t>()) return static_cast<double>(*i);
  return std::nullopt;
}

std::string Shown(double v) {
  if (std::isnan(v)) return "nan";
  if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
  std::ostringstream s;
  s << v;
  return s.str();
}

// The numbers of the `model` block that the model computes with, and their ranges: edgequant/checkpoint.py's
// NUMBER_RULES, which export/dist.py applies to the same block (an epsilon of 0 or a RoPE base of 0 gives NaN logits).
std::optional<std::string> NumberProblem(const json::Object& m) {
  enum Rule { kPositive, kEps, kFraction, kProbability, kPositions, kFactor };
  static const std::map<std::string, Rule> rules = {
      {"rms_norm_eps", kEps}, {"layer_norm_eps", kEps}, {"norm_eps", kEps},
      {"rope_theta", kPositive}, {"rope_local_base_freq", kPositive}, {"rope_scale", kPositive},
      {"partial_rotary_factor", kFraction}, {"query_pre_attn_scalar", kPositive},
      {"attn_logit_softcapping", kPositive}, {"final_logit_softcapping", kPositive},
      {"attention_dropout", kProbability}, {"hidden_dropout", kProbability},
      {"max_position_embeddings", kPositions}, {"sliding_window", kPositions},
      {"factor", kFactor}, {"low_freq_factor", kPositive}, {"high_freq_factor", kPositive},
      {"original_max_position_embeddings", kPositive}, {"beta_fast", kPositive}, {"beta_slow", kPositive},
      {"attention_factor", kPositive}, {"short_factor", kPositive}, {"long_factor", kPositive}};
  static const char* want[] = {"a positive number", "a number between 0 and 1, e.g. 1e-05", "a number in (0, 1]",
                               "a number in [0, 1)", "a positive integer up to 16777216",
                               "a positive number up to 16777216"};
  // NaN or infinity anywhere in the block (it is at most kMaxJsonDepth deep)
  std::function<std::optional<std::string>(const Any&, const std::string&)> walk =
      [&](const Any& v, const std::string& where) -> std::optional<std::string> {
    if (auto d = v.as<double>(); d && !std::isfinite(*d)) return "'" + where + "' is " + Shown(*d) + "; it must be a finite number";
    if (auto o = AsObject(v)) {
      for (const auto& kv : *o) {
        auto k = kv.first.as<String>();
        if (auto bad = walk(kv.second, where + (where.empty() ? "" : ".") + (k ? std::string(*k) : "?"))) return bad;
      }
    } else if (auto a = AsArray(v)) {
      for (size_t i = 0; i < a->size(); ++i) {
        if (auto bad = walk((*a)[i], where + "." + std::to_string(i))) return bad;
      }
    }
    return std::nullopt;
  };
  auto NumberField = [](const json::Object& o, const char* key) -> std::optional<double> {
    auto v = Field(o, key);
    return v ? NumberOf(*v) : std::nullopt;
  };
  auto check = [&](const Any& v, Rule rule, const std::string& where) -> std::optional<std::string> {
    auto d = NumberOf(v);
    bool whole = v.as<int64_t>().has_value();  // strict: 4096.0 and true are not token counts
    bool ok = d && (rule == kPositive ? *d > 0 : rule == kEps ? *d > 0 && *d < 1
                    : rule == kFraction ? *d > 0 && *d <= 1 : rule == kProbability ? *d >= 0 && *d < 1
                    : rule == kPositions ? whole && *d > 0 && *d <= kMaxDim : *d > 0 && *d <= kMaxDim);
    if (ok) return std::nullopt;
    return "'" + where + "' is " + (d ? Shown(*d) : std::string("not a number")) + "; it must be " + want[rule];
  };
  // RoPE types whose frequencies depend on original_max_position_embeddings (checkpoint.py _ORIGINAL_CONTEXT_ROPE);
  // under the others the field is unused (transformers fills it in for Phi-3 configs that lack it)
  auto reads_original = [&](const json::Object& block, bool top) -> bool {
    auto kind_of = [&](const json::Object& b) -> std::optional<std::string> {
      for (const char* k : {"rope_type", "type"}) {
        auto v = Field(b, k);
        if (!v) continue;
        if (auto s = v->as<String>()) return std::string(*s);
      }
      return std::nullopt;
    };
    auto kind = kind_of(block);
    if (!kind && top) {
      for (const char* name : {"rope_scaling", "rope_parameters"}) {
        auto v = Field(m, name);
        auto o = v ? AsObject(*v) : std::nullopt;
        if (o) {
          kind = kind_of(*o);
          break;
        }
      }
    }
    if (!kind) return false;
    for (const char* t : {"longrope", "su", "yarn", "llama3", "dynamic"}) {
      if (*kind == t) return true;
    }
    return false;
  };
  auto ranged = [&](const json::Object& block, const std::string& prefix) -> std::optional<std::string> {
    for (const auto& [key, rule] : rules) {
      auto v = Field(block, key.c_str());
      if (!v || v->type_index() == tvm::ffi::TypeIndex::kTVMFFINone) continue;  // null: not set
      auto list = (key == "short_factor" || key == "long_factor") ? AsArray(*v) : std::nullopt;
      if (list) {  // longrope: each entry
        for (size_t i = 0; i < list->size(); ++i) {
          if (auto bad = check((*list)[i], rule, prefix + key + "[" + std::to_string(i) + "]")) return bad;
        }
      } else if (auto bad = check(*v, rule, prefix + key)) {
        return bad;
      }
    }
    auto low = NumberField(block, "low_freq_factor"), high = NumberField(block, "high_freq_factor");
    if (low && high && *low >= *high) {  // llama3 RoPE divides by high - low
      return "'" + prefix + "low_freq_factor' is " + Shown(*low) + ", not below '" + prefix + "high_freq_factor' " +
             Shown(*high) + "; llama3 RoPE needs low < high";
    }
    auto orig = NumberField(block, "original_max_position_embeddings");
    auto window = NumberField(m, "max_position_embeddings");
    if (orig && window && *orig > *window && reads_original(block, prefix.empty())) {
      return "'" + prefix + "original_max_position_embeddings' is " + Shown(*orig) +
             ", more than max_position_embeddings " + Shown(*window) +
             "; the extended context must be at least the original one";
    }
    return std::nullopt;
  };
  if (auto bad = walk(m, "")) return bad;
  if (auto bad = ranged(m, "")) return bad;
  for (const char* name : {"rope_scaling", "rope_parameters"}) {
    auto v = Field(m, name);
    auto o = v ? AsObject(*v) : std::nullopt;
    if (o) {
      if (auto bad = ranged(*o, std::string(name) + ".")) return bad;
      for (const auto& kv : *o) {  // Gemma 3: one block per layer type
        auto kind = kv.first.as<String>();
        auto inner = AsObject(kv.second);
        if (kind && inner) {
          if (auto bad = ranged(*inner, std::string(name) + "." + std::string(*kind) + ".")) return bad;
        }
      }
    }
  }
  return std::nullopt;
}

ExportInfo ReadExportInfo(const std::string& dist) {
  std::string file = dist + "/" + kExportJson;
  if (!IsFile(file)) {
    Fail(EDGEQUANT_ERR_NOT_FOUND, dist + " is not an exported model folder (no " + kExportJson +
                                      "); create one with `edgequant export CHECKPOINT --target cpu -o DIST`");
  }
  auto root = AsObject(ParseJson(ReadText(file), file));
  if (!root) Damaged(file, "not a JSON object");
  ExportInfo info;
  auto need_str = [&](const char* key) {
    auto s = StrField(*root, key);
    if (!s) Damaged(file, std::string("field '") + key + (Field(*root, key) ? "' must be a string" : "' is missing"));
    return *s;
  };
  if (IntField(*root, "format_version", 0) != std::optional<int64_t>(kFormatVersion)) {
    Fail(EDGEQUANT_ERR_UNSUPPORTED, file + " has another format_version than " + std::to_string(kFormatVersion) +
                                        ", the one this runtime reads: export the model again with this edgequant");
  }
  info.target = need_str("target");
  info.device = need_str("device");
  // export/targets.py's presets and their devices
  static const std::map<std::string, std::string> targets = {
      {"cpu", "cpu"},       {"cpu-arm64", "cpu"},    {"cuda", "cuda"},        {"metal", "metal"},
      {"iphone", "metal"},  {"iphone-sim", "metal"}, {"android", "opencl"},   {"webgpu", "webgpu"}};
  auto t = targets.find(info.target);
  if (t == targets.end() || t->second != info.device) {
    Damaged(file, "field 'target' is not a known target for device '" + info.device + "'");
  }
  std::string tvm_version = need_str("tvm_version");
  if (tvm_version.compare(0, std::strlen(kTvmSeries) + 1, std::string(kTvmSeries) + ".") != 0) {
    Fail(EDGEQUANT_ERR_UNSUPPORTED, dist + " was exported with TVM " + tvm_version + ", this runtime is TVM " +
                                        kTvmSeries + "; export the model again with TVM " + kTvmSeries);
  }
  auto fns = Field(*root, "functions");
  auto fa = fns ? AsArray(*fns) : std::nullopt;
  for (const char* need : {"embed", "prefill", "decode", "create_paged_kv_cache"}) {
    bool found = false;
    for (size_t i = 0; fa && i < fa->size(); ++i) found = found || (*fa)[i].as<String>() == std::optional<String>(String(need));
    if (!found) Damaged(file, "field 'functions' is missing or has the wrong type");
  }
  info.library = need_str("library");
  auto chunk = IntField(*root, "prefill_chunk_size", 1);
  if (!chunk || *chunk > kMaxDim) {
    Damaged(file, Field(*root, "prefill_chunk_size") ? "field 'prefill_chunk_size' must be a positive integer up to " + std::to_string(kMaxDim)
                                                      : std::string("field 'prefill_chunk_size' is missing"));
  }
  info.chunk = *chunk;
  auto model = Field(*root, "model");
  auto m = model ? AsObject(*model) : std::nullopt;
  if (!m) Damaged(file, "field 'model' is missing or has the wrong type");
  std::pair<const char*, int64_t*> dims[] = {{"vocab_size", &info.vocab},           {"hidden_size", &info.hidden},
                                             {"intermediate_size", &info.intermediate}, {"num_layers", &info.layers},
                                             {"num_heads", &info.heads},            {"num_kv_heads", &info.kv_heads},
                                             {"head_dim", &info.head_dim},          {"context_window", &info.context}};
  for (auto& [key, dst] : dims) {
    auto v = IntField(*m, key, 1);
    // bounds keep every product below (KV bytes, shapes) far from overflow
    if (!v || *v > kMaxDim) {
      Damaged(file, std::string("model field '") + key + (Field(*m, key) ? "' must be a positive integer up to " + std::to_string(kMaxDim)
                                                                        : std::string("' is missing")));
    }
    *dst = *v;
  }
  if (info.vocab > INT32_MAX || info.context > INT32_MAX) Damaged(file, "model sizes out of range");
  // edgequant/models' families (export/dist.py refuses the same set): another architecture's graph is not this one
  static const std::set<std::string> model_types = {"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text"};
  auto model_type = StrField(*m, "model_type");
  if (!model_type || !model_types.count(*model_type)) {
    Damaged(file, "model field 'model_type' must be one of llama, mistral, qwen2, qwen3, phi3, gemma2, gemma3_text");
  }
  if (auto bad = NumberProblem(*m)) Damaged(file, "model field " + *bad);
  // longrope (the Runner's rule): the long factors, when present, take over past rope_original_context
  auto long_factors = Field(*m, "rope_long_factors");
  auto long_list = long_factors ? AsArray(*long_factors) : std::nullopt;
  bool has_long = false;
  for (size_t i = 0; fa && i < fa->size(); ++i) has_long = has_long || (*fa)[i].as<String>() == std::optional<String>(String("prefill_long"));
  if (long_list && !long_list->empty()) {
    auto orig = IntField(*m, "rope_original_context", 1);
    if (!orig || *orig > kMaxDim) {
      Damaged(file, "model field 'rope_original_context' must be a positive integer up to " + std::to_string(kMaxDim));
    }
    if (!has_long) Damaged(file, "a longrope model without the function 'prefill_long' in field 'functions'");
    info.long_after = *orig;
  } else if (has_long) {  // the library is a longrope model's: without the switch, long prompts get the short factors
    Damaged(file, "model field 'rope_long_factors' is missing, but the library is a longrope model's (prefill_long)");
  }
  auto params = Field(*root, "params");
  auto pa = params ? AsArray(*params) : std::nullopt;
  if (!pa) Damaged(file, "field 'params' is missing or has the wrong type");
  for (const Any& x : *pa) {
    auto o = AsObject(x);
    auto name = o ? StrField(*o, "name") : std::nullopt;
    auto dtype = o ? StrField(*o, "dtype") : std::nullopt;
    auto shape = o ? ShapeField(*o, "shape") : std::nullopt;
    if (!name || !dtype || !shape || !ItemSize(*dtype)) Damaged(file, "field 'params' has a malformed entry");
    auto bits = o ? IntField(*o, "bits", 1) : std::nullopt;
    if (o && Field(*o, "bits") && (!bits || *bits > 8)) Damaged(file, "field 'params' has a malformed entry");
    info.params.push_back({*name, *dtype, *shape, bits ? static_cast<int>(*bits) : 0});
  }
  if (info.chunk > info.context) Damaged(file, "prefill_chunk_size is larger than the context window");
  // the sizes used below (vocabulary, layers, hidden width) must be those of the compiled parameters, which are
  // compared with the library's own list before anything runs
  int64_t emb_vocab = -1, emb_hidden = -1, norm_hidden = -1, layers = 0;
  for (const Param& p : info.params) {
    if (p.name == "model.embed_tokens.weight" && p.shape.size() == 2) emb_vocab = p.shape[0], emb_hidden = p.shape[1];
    // a quantized table (--embed-bits): its rows are the vocabulary, the final norm has the hidden width
    if (p.name == "model.embed_tokens.scales" && p.shape.size() == 2) emb_vocab = p.shape[0];
    if (p.name == "model.norm.weight" && p.shape.size() == 1) norm_hidden = p.shape[0];
    long n = -1;
    if (std::sscanf(p.name.c_str(), "model.layers.%ld.", &n) == 1 && n >= 0 && n < kMaxDim) layers = std::max<int64_t>(layers, n + 1);
  }
  if (emb_hidden < 0) emb_hidden = norm_hidden;
  std::pair<const char*, std::pair<int64_t, int64_t>> against[] = {
      {"vocab_size", {info.vocab, emb_vocab}}, {"hidden_size", {info.hidden, emb_hidden}}, {"num_layers", {info.layers, layers}}};
  for (auto& [key, v] : against) {
    if (v.first != v.second) {
      Damaged(file, std::string("model field '") + key + "' is " + std::to_string(v.first) +
                        ", the library's parameters say " + std::to_string(v.second));
    }
  }
  // heads, head width and MLP width: the first block's linear rows (and an fp16 linear's columns) and per-head norm
  // widths must be what the model block implies (every family fuses the same way; export/dist.py checks the same)
  const std::string pre = "model.layers.0.";
  std::pair<std::string, std::pair<int64_t, int64_t>> linears[] = {
      {"self_attn.qkv_proj", {(info.heads + 2 * info.kv_heads) * info.head_dim, info.hidden}},
      {"self_attn.o_proj", {info.hidden, info.heads * info.head_dim}},
      {"mlp.gate_up_proj", {2 * info.intermediate, info.hidden}},
      {"mlp.down_proj", {info.hidden, info.intermediate}}};
  for (const Param& p : info.params) {
    for (auto& [lin, nk] : linears) {
      bool scales = p.name == pre + lin + ".scales", weight = p.name == pre + lin + ".weight";
      if ((scales || weight) && !p.shape.empty() &&
          (p.shape[0] != nk.first || (weight && (p.shape.size() != 2 || p.shape[1] != nk.second)))) {
        Damaged(file, "the model fields hidden_size/intermediate_size/num_heads/num_kv_heads/head_dim give '" + pre +
                          lin + "' " + std::to_string(nk.first) + " rows of " + std::to_string(nk.second) +
                          " columns; the library's parameters have " + std::to_string(p.shape[0]) + " rows");
      }
    }
    if ((p.name == pre + "self_attn.q_norm.weight" || p.name == pre + "self_attn.k_norm.weight") &&
        p.shape != std::vector<int64_t>{info.head_dim}) {
      Damaged(file, "the model field head_dim is " + std::to_string(info.head_dim) + ", the library's '" + p.name +
                        "' says otherwise");
    }
  }
  if (auto q = StrField(*root, "quantization")) {
    int b = 0;  // the scheme's name: w4g128, w3, w2g64-sym (DISTs before issue 12: w4g128a)
    if (std::sscanf(q->c_str(), "w%d", &b) == 1 && b > 0 && b < 16) info.bits = b;
  }
  if (auto cuda = Field(*root, "cuda")) {
    if (auto c = AsObject(*cuda)) info.fatbin = StrField(*c, "fatbin");
  }
  return info;
}

int64_t Product(const std::vector<int64_t>& s) {
  return std::accumulate(s.begin(), s.end(), int64_t(1), std::multiplies<int64_t>());
}

// K of the export linear that `param` belongs to (q/k/v and gate/up are fused; see export/params.py)
int64_t InFeatures(const ExportInfo& info, const std::string& param) {
  if (param.find("self_attn.o_proj.") != std::string::npos) return info.heads * info.head_dim;
  if (param.find("mlp.down_proj.") != std::string::npos) return info.intermediate;
  return info.hidden;
}

bool EndsWith(const std::string& s, const char* suffix) {
  size_t n = std::strlen(suffix);
  return s.size() >= n && s.compare(s.size() - n, n, suffix) == 0;
}

std::vector<char> ReadSpan(const Record& r) {
  std::ifstream f(r.path, std::ios::binary);
  std::vector<char> buf(static_cast<size_t>(r.nbytes));
  f.seekg(r.offset);
  if (!f.read(buf.data(), r.nbytes)) Fail(EDGEQUANT_ERR_NOT_FOUND, "cannot read " + r.path);
  return buf;
}

// element i of an integer tensor as int64 (dtypes that can hold indices or zero points)
int64_t IntAt(const std::vector<char>& b, const std::string& dtype, size_t i) {
  if (dtype == "uint8") return static_cast<uint8_t>(b[i]);
  if (dtype == "int32") { int32_t v; std::memcpy(&v, b.data() + 4 * i, 4); return v; }
  if (dtype == "uint32") { uint32_t v; std::memcpy(&v, b.data() + 4 * i, 4); return v; }
  if (dtype == "float16" || dtype == "bfloat16") { uint16_t v; std::memcpy(&v, b.data() + 2 * i, 2); return v; }
  float v;
  std::memcpy(&v, b.data() + 4 * i, 4);
  return static_cast<int64_t>(v);
}

bool FiniteAt(const std::vector<char>& b, const std::string& dtype, size_t i) {
  if (dtype == "float32") { float v; std::memcpy(&v, b.data() + 4 * i, 4); return std::isfinite(v); }
  uint16_t h;
  std::memcpy(&h, b.data() + 2 * i, 2);
  if (dtype == "float16") return (h & 0x7c00) != 0x7c00;   // exponent all ones: inf or NaN
  if (dtype == "bfloat16") return (h & 0x7f80) != 0x7f80;
  return true;
}

// tensor-cache.json against the library's parameter list, and the values that kernels use as indices or small
// integers (small tensors only: no pass over the big weights). Returns the bytes of the parameters' weights.
uint64_t CheckTensorCache(const std::string& dist, const ExportInfo& info) {
  std::string file = dist + "/" + kTensorCache;
  if (!IsFile(file)) Fail(EDGEQUANT_ERR_NOT_FOUND, dist + " has no " + kTensorCache + ": the weights are missing; " + kFix);
  auto root = AsObject(ParseJson(ReadText(file), file));
  auto shards = root ? Field(*root, "records") : std::nullopt;
  auto sa = shards ? AsArray(*shards) : std::nullopt;
  if (!sa) Damaged(file, "no list of 'records'");
  std::map<std::string, Record> where;
  for (const Any& sv : *sa) {
    auto shard = AsObject(sv);
    auto recs = shard ? Field(*shard, "records") : std::nullopt;
    auto ra = recs ? AsArray(*recs) : std::nullopt;
    auto data_path = shard ? StrField(*shard, "dataPath") : std::nullopt;
    if (!ra || !data_path) Damaged(file, "a shard record is not an object with 'records' and 'dataPath'");
    std::string path = Inside(dist, *data_path, file, "dataPath");
    struct stat st;
    if (stat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) {
      Fail(EDGEQUANT_ERR_NOT_FOUND, "weight shard " + *data_path + " is missing from " + dist +
                                        "; copy the whole folder again or " + kFix);
    }
    int64_t size = st.st_size;
    auto fmt = StrField(*shard, "format");
    auto nbytes = Field(*shard, "nbytes");
    // both keys required: TVM's tensor-cache loader reads them unchecked
    if (!fmt || *fmt != "raw-shard") {
      Damaged(file, "the shard record of " + *data_path + " has no format 'raw-shard'");
    }
    if (!nbytes || nbytes->as<int64_t>() != std::optional<int64_t>(size)) {
      Fail(EDGEQUANT_ERR_DAMAGED, "weight shard " + *data_path + " has " + std::to_string(size) + " bytes, " +
                                      kTensorCache + " says otherwise: it is truncated or replaced; " + kFix);
    }
    auto md5 = StrField(*shard, "md5sum");
    std::string want = md5 ? *md5 : "";
    std::transform(want.begin(), want.end(), want.begin(), [](unsigned char ch) { return std::tolower(ch); });
    if (!md5 || FileMd5(path) != want) {
      Fail(EDGEQUANT_ERR_DAMAGED, "weight shard " + *data_path + " does not match the md5sum " + kTensorCache +
                                      " records for it: its bytes were changed or damaged in a copy; " + kFix);
    }
    std::vector<std::pair<int64_t, int64_t>> spans;
    for (const Any& rv : *ra) {
      auto r = AsObject(rv);
      auto name = r ? StrField(*r, "name") : std::nullopt;
      auto dtype = r ? StrField(*r, "dtype") : std::nullopt;
      auto shape = r ? ShapeField(*r, "shape") : std::nullopt;
      auto off = r ? IntField(*r, "byteOffset", 0) : std::nullopt;
      auto nb = r ? IntField(*r, "nbytes", 0) : std::nullopt;
      auto rfmt = r ? StrField(*r, "format") : std::nullopt;
      if (!name || !dtype || !shape || !off || !nb || !ItemSize(*dtype) || !rfmt || *rfmt != "raw") {
        Damaged(file, "a record in " + *data_path + " lacks name/shape/dtype/byteOffset/nbytes");
      }
      if (*nb != Product(*shape) * ItemSize(*dtype)) Damaged(file, "'" + *name + "' has the wrong nbytes for its shape");
      if (*off > size || *nb > size - *off) Damaged(file, "'" + *name + "' lies past the end of " + *data_path);
      // which copy would the runtime use? (it used the last one, silently)
      if (where.count(*name)) Damaged(file, "'" + *name + "' is listed twice");
      spans.emplace_back(*off, *off + *nb);
      where[*name] = Record{path, *off, *nb, *dtype, *shape};
    }
    std::sort(spans.begin(), spans.end());
    for (size_t i = 1; i < spans.size(); ++i) {
      if (spans[i].first < spans[i - 1].second) Damaged(file, "two tensors overlap in " + *data_path);
    }
  }
  uint64_t total = 0;
  for (const Param& p : info.params) {
    auto it = where.find(p.name);
    if (it == where.end()) Fail(EDGEQUANT_ERR_DAMAGED, "weight '" + p.name + "' is missing from " + kTensorCache + "; " + kFix);
    const Record& r = it->second;
    if (r.shape != p.shape || r.dtype != p.dtype) Damaged(file, "'" + p.name + "' differs from what the library expects");
    total += static_cast<uint64_t>(r.nbytes);
    size_t n = static_cast<size_t>(Product(r.shape));
    if (EndsWith(p.name, ".outlier_idx")) {
      auto b = ReadSpan(r);
      int64_t k = InFeatures(info, p.name), prev = -1;
      for (size_t i = 0; i < n; ++i) {
        int64_t v = IntAt(b, r.dtype, i);
        if (v < 0 || v >= k || v <= prev) {
          Fail(EDGEQUANT_ERR_DAMAGED, std::string(kTensorCache) + ": '" + p.name + "' holds column indices outside [0, " +
                                          std::to_string(k) + ") or not strictly increasing; the weights are damaged; " + kFix);
        }
        prev = v;
      }
    } else if (EndsWith(p.name, ".zeros") && (p.bits || info.bits)) {
      int bits = p.bits ? p.bits : info.bits;
      auto b = ReadSpan(r);
      // OpenCL/WebGPU exports pack four zero points per uint32 word (tvm_schedules/dequant.py): check each byte
      bool packed = r.dtype == "uint32";
      for (size_t i = 0; i < (packed ? b.size() : n); ++i) {
        if ((packed ? static_cast<uint8_t>(b[i]) : IntAt(b, r.dtype, i)) >= (int64_t(1) << bits)) {
          Fail(EDGEQUANT_ERR_DAMAGED, std::string(kTensorCache) + ": '" + p.name + "' holds zero points above " +
                                          std::to_string((1 << bits) - 1) + "; the weights are damaged; " + kFix);
        }
      }
    } else if (r.dtype == "float16" || r.dtype == "float32" || r.dtype == "bfloat16") {
      // every fp tensor (scales, embedding, lm_head, norms, biases): read once, cheap next to the load
      auto b = ReadSpan(r);
      for (size_t i = 0; i < n; ++i) {
        if (!FiniteAt(b, r.dtype, i)) {
          Fail(EDGEQUANT_ERR_DAMAGED, std::string(kTensorCache) + ": '" + p.name + "' holds NaN or infinite " +
                                          (EndsWith(p.name, ".scales") ? "scales" : "values") +
                                          "; the weights are damaged; " + kFix);
        }
      }
    }
  }
  return total;
}

// ------------------------------------------------------------------------------------------------ sampling

// splitmix64: the same stream on every platform and standard library (std:: distributions differ between them)
struct Rng {
  uint64_t s = 0;
  uint64_t Next() {
    uint64_t z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  double Uniform() { return static_cast<double>(Next() >> 11) * 0x1.0p-53; }
};

int32_t Sample(const std::vector<float>& logits, float temperature, float top_p, Rng& rng) {
  if (temperature <= 0) {  // first maximum, as numpy.argmax
    return static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
  }
  size_t n = logits.size();
  double mx = *std::max_element(logits.begin(), logits.end());
  std::vector<double> p(n);
  for (size_t i = 0; i < n; ++i) p[i] = std::exp((logits[i] - mx) / temperature);
  std::vector<int32_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  size_t keep = n;
  if (top_p < 1.0f) {
    double sum = std::accumulate(p.begin(), p.end(), 0.0);
    std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return p[a] > p[b]; });
    double cum = 0;
    keep = 0;
    while (keep < n && cum < top_p * sum) cum += p[order[keep++]];
  }
  double total = 0;
  for (size_t i = 0; i < keep; ++i) total += p[order[i]];
  double u = rng.Uniform() * total, acc = 0;
  for (size_t i = 0; i < keep; ++i) {
    acc += p[order[i]];
    if (u < acc) return order[i];
  }
  return order[keep - 1];
}

// the tensor-cache builtins keep one process-wide cache: loads must not interleave
std::mutex load_mutex;

Function Global(const char* name) {
  auto f = Function::GetGlobal(name);
  if (!f) Fail(EDGEQUANT_ERR_RUNTIME, std::string("the TVM runtime lacks ") + name + "; use the runtime of apache-tvm 0.27");
  return *f;
}

edgequant_status Report(edgequant_status s, const std::string& msg) {
  last_error = msg;
  return s;
}

// Runs `body`, turning every exception into a status and a message: nothing may unwind through the C boundary.
template <typename F>
edgequant_status Guard(F&& body) {
  try {
    body();
    return EDGEQUANT_OK;
  } catch (const Failure& f) {
    return Report(f.status, f.message);
  } catch (const tvm::ffi::Error& e) {
    return Report(EDGEQUANT_ERR_RUNTIME, "TVM: " + e.kind() + ": " + FirstLine(e.message()));
  } catch (const std::bad_alloc&) {
    return Report(EDGEQUANT_ERR_RUNTIME, "out of memory");
  } catch (const std::exception& e) {
    return Report(EDGEQUANT_ERR_RUNTIME, FirstLine(e.what()));
  } catch (...) {
    return Report(EDGEQUANT_ERR_RUNTIME, "unknown error");
  }
}

}  // namespace

struct edgequant_model {
  ExportInfo info;
  DLDevice dev{kDLCPU, 0};
  std::optional<Module> lib, vm;  // Module has no empty state
  Any params, kv;
  Function embed, prefill, decode, add_seq, remove_seq, begin, end, alloc, view, from_bytes, to_bytes;
  std::optional<Function> prefill_long;  // longrope models only
  std::vector<int32_t> history;          // longrope: the sequence's tokens, kept for the one re-encoding
  int64_t max_len = 0, length = 0;
  uint64_t weight_bytes = 0;
  std::vector<float> logits;
  bool has_logits = false, has_pending = false, broken = false;
  int32_t pending = 0;  // the token decode returned last, fed on the next call that needs its logits
  Rng rng;

  void CheckUsable() const {
    if (broken) Fail(EDGEQUANT_ERR_STATE, "a previous call failed inside the runtime; call edgequant_reset first");
  }

  void Forward(Function& fn, const int32_t* ids, int64_t n) {
    broken = true;  // until the KV cache is known consistent again
    Tensor t = alloc(Shape({n}), DLDataType{kDLInt, 32, 1}, dev, nullptr).cast<Tensor>();
    from_bytes(t, static_cast<void*>(const_cast<int32_t*>(ids)), static_cast<size_t>(n) * sizeof(int32_t));
    Tensor e = embed(t, params).cast<Tensor>();
    Tensor e3 = view(e, Shape({1, n, info.hidden}), e.dtype(), 0).cast<Tensor>();
    begin(kv, Shape({0}), Shape({n}));
    auto out = fn(e3, kv, params).cast<tvm::ffi::Array<Any>>();
    end(kv);
    if (out.size() != 2) Fail(EDGEQUANT_ERR_DAMAGED, "the library's forward functions return an unexpected result; " + std::string(kFix));
    kv = out[1];
    Tensor lt = out[0].cast<Tensor>();
    DLDataType dt = lt.dtype();
    if (lt.numel() != info.vocab || dt.code != kDLFloat || dt.bits != 32 || dt.lanes != 1) {
      Fail(EDGEQUANT_ERR_DAMAGED, "the library returns logits of another size or type than the vocabulary's; " + std::string(kFix));
    }
    to_bytes(lt, static_cast<void*>(logits.data()), logits.size() * sizeof(float));
    for (float x : logits) {
      if (std::isnan(x)) Fail(EDGEQUANT_ERR_RUNTIME, "the model produced NaN logits");
    }
    length += n;
    if (info.long_after >= 0) history.insert(history.end(), ids, ids + n);
    has_logits = true;
    broken = false;
  }

  // whether appending n tokens takes a longrope sequence past original_max_position_embeddings
  bool SwitchesToLong(int64_t n) const { return info.long_after >= 0 && length <= info.long_after && info.long_after < length + n; }

  // `ids` in prefill_chunk_size chunks; at the longrope switch the whole sequence again, with the long factors
  // everywhere (transformers' Phi-3 `generate` drops its cache there), so no key rotated with the short ones stays
  void Prefill(const int32_t* ids, int64_t n) {
    std::vector<int32_t> again;
    if (SwitchesToLong(n)) {
      again = history;
      again.insert(again.end(), ids, ids + n);
      ids = again.data();
      n = static_cast<int64_t>(again.size());
      broken = true;  // until the sequence is fed again
      remove_seq(kv, 0);
      add_seq(kv, 0);
      length = 0;
      history.clear();
    }
    Function& fn = info.long_after >= 0 && length + n > info.long_after ? *prefill_long : prefill;
    for (int64_t i = 0; i < n; i += info.chunk) Forward(fn, ids + i, std::min<int64_t>(info.chunk, n - i));
  }

  void FeedPending() {
    if (!has_pending) return;
    has_pending = false;
    if (SwitchesToLong(1)) {
      Prefill(&pending, 1);
    } else {
      Forward(decode, &pending, 1);
    }
  }

  void NewSequence(uint64_t seed) {
    remove_seq(kv, 0);
    add_seq(kv, 0);
    length = 0;
    history.clear();
    has_logits = has_pending = broken = false;
    rng.s = seed;
  }
};

extern "C" {

const char* edgequant_last_error(void) { return last_error.c_str(); }

const char* edgequant_status_name(edgequant_status s) {
  switch (s) {
    case EDGEQUANT_OK: return "ok";
    case EDGEQUANT_ERR_ARGUMENT: return "invalid argument";
    case EDGEQUANT_ERR_NOT_FOUND: return "not found";
    case EDGEQUANT_ERR_DAMAGED: return "damaged model folder";
    case EDGEQUANT_ERR_UNSUPPORTED: return "unsupported";
    case EDGEQUANT_ERR_CAPACITY: return "KV cache full";
    case EDGEQUANT_ERR_STATE: return "invalid state";
    case EDGEQUANT_ERR_RUNTIME: return "runtime error";
  }
  return "unknown status";
}

edgequant_status edgequant_open(const char* dist_c, const edgequant_options* options, edgequant_model** out) {
  if (out) *out = nullptr;
  if (!dist_c || !out) return Report(EDGEQUANT_ERR_ARGUMENT, "edgequant_open: dist and out must not be NULL");
  std::unique_ptr<edgequant_model> m(new (std::nothrow) edgequant_model());
  if (!m) return Report(EDGEQUANT_ERR_RUNTIME, "out of memory");
  edgequant_status s = Guard([&] {
    std::string dist = dist_c;
    while (dist.size() > 1 && dist.back() == '/') dist.pop_back();
    m->info = ReadExportInfo(dist);
    ExportInfo& info = m->info;
    const char* prefix = options ? options->system_lib_prefix : nullptr;
    static const std::map<std::string, DLDeviceType> devices = {
        {"cpu", kDLCPU}, {"cuda", kDLCUDA}, {"metal", kDLMetal}, {"opencl", kDLOpenCL}, {"vulkan", kDLVulkan}};
    auto dev = devices.find(info.device);
    if (dev == devices.end()) {
      Fail(EDGEQUANT_ERR_UNSUPPORTED, dist + " was exported for " + info.target + " (" + info.device +
                                          "), which this runtime cannot run");
    }
    m->dev = DLDevice{dev->second, 0};
    std::string lib_path;
    if (!prefix) {
      lib_path = Inside(dist, info.library, dist + "/" + kExportJson, "library");
      if (!EndsWith(info.library, ".so")) {
        Fail(EDGEQUANT_ERR_UNSUPPORTED, lib_path + " is a library for static linking: link it into the program and "
                                                   "pass its system_lib_prefix, or link the objects into a .so");
      }
      if (!IsFile(lib_path)) Fail(EDGEQUANT_ERR_NOT_FOUND, "the library " + lib_path + " is missing; " + kFix);
      CheckElf(lib_path);
    }
    int32_t want = options ? options->max_total_seq_len : 0;
    if (want < 0) Fail(EDGEQUANT_ERR_ARGUMENT, "max_total_seq_len must be >= 0");
    m->max_len = std::min<int64_t>(info.context, want ? want : 4096);
    m->weight_bytes = CheckTensorCache(dist, info);
    m->logits.assign(static_cast<size_t>(info.vocab), 0.0f);

    std::lock_guard<std::mutex> lock(load_mutex);
    if (m->dev.device_type == kDLCUDA) {
      // the CUDA device API is a separate library of the wheel; loading it registers the CUDA module loader
      if (!Function::GetGlobal("ffi.Module.load_from_bytes.cuda") &&
          !dlopen("libtvm_runtime_cuda.so", RTLD_NOW | RTLD_GLOBAL)) {
        Fail(EDGEQUANT_ERR_UNSUPPORTED, std::string("cannot load libtvm_runtime_cuda.so: ") + dlerror());
      }
      // the library carries CUDA C source; hand TVM the fatbin compiled at export time instead of a compiler
      if (!info.fatbin) Damaged(dist + "/" + kExportJson, "a cuda export without its 'cuda' record");
      std::string fatbin = ReadText(Inside(dist, *info.fatbin, dist + "/" + kExportJson, "fatbin"));
      Function::SetGlobal("tvm_callback_cuda_compile",
                          Function::FromTyped([fatbin](String) { return tvm::ffi::Bytes(fatbin); }),
                          /*override=*/true);
    }
    // a TVM runtime built without this device's API would fail deep inside the VM; say which build is needed
    if (m->dev.device_type != kDLCPU && !Function::GetGlobal("device_api." + info.device)) {
      Fail(EDGEQUANT_ERR_UNSUPPORTED, "this TVM runtime has no " + info.device + " device API, which " + dist +
                                          " (" + info.target + ") needs; link a TVM runtime built with it");
    }
    try {
      m->lib = prefix ? Global("ffi.SystemLib")(String(prefix)).cast<Module>() : Module::LoadFromFile(lib_path);
    } catch (const tvm::ffi::Error& e) {
      Fail(EDGEQUANT_ERR_DAMAGED, "cannot load " + (prefix ? "the system library " + std::string(prefix) : lib_path) +
                                      " (" + FirstLine(e.message()) + "); it is damaged or built for another machine; " + kFix);
    }
    auto load_exec = (*m->lib)->GetFunction("vm_load_executable");
    if (!load_exec && prefix) {
      // ffi.SystemLib(prefix) answers with an empty library when nothing registered under that prefix
      Fail(EDGEQUANT_ERR_NOT_FOUND, "no model library is linked into this program under the system-lib prefix '" +
                                        std::string(prefix) + "'; link the export's objects whole (--whole-archive / "
                                        "-force_load) and pass the prefix it was exported with");
    }
    if (!load_exec) Fail(EDGEQUANT_ERR_DAMAGED, "the library is not a model library (no vm_load_executable); " + std::string(kFix));
    m->vm = (*load_exec)().cast<Module>();
    auto fn = [&](const char* name) {
      auto f = (*m->vm)->GetFunction(name);
      if (!f) Fail(EDGEQUANT_ERR_DAMAGED, std::string("the library has no function ") + name + "; " + kFix);
      return *f;
    };
    // device, then host (pooled allocators, kind 2)
    fn("vm_initialization")(static_cast<int>(m->dev.device_type), m->dev.device_id, 2, static_cast<int>(kDLCPU), 0, 2);

    // the library's own parameter list must be the one the weights were checked against
    std::string meta = fn("_metadata")().cast<String>();
    auto mo = AsObject(ParseJson(meta, "the library's _metadata"));
    auto mp = mo ? Field(*mo, "params") : std::nullopt;
    auto ma = mp ? AsArray(*mp) : std::nullopt;
    bool same = ma && ma->size() == info.params.size();
    for (size_t i = 0; same && i < info.params.size(); ++i) {
      auto o = AsObject((*ma)[i]);
      // a per-module bit width must be the library's too (`run` compares the same four fields)
      same = o && StrField(*o, "name") == info.params[i].name && ShapeField(*o, "shape") == info.params[i].shape &&
             StrField(*o, "dtype") == info.params[i].dtype &&
             IntField(*o, "bits", 1).value_or(0) == info.params[i].bits && (Field(*o, "bits") || !info.params[i].bits);
    }
    same = same && IntField(*mo, "context_window_size", 1) == std::optional<int64_t>(info.context) &&
           IntField(*mo, "prefill_chunk_size", 1) == std::optional<int64_t>(info.chunk);
    if (!same) {
      Fail(EDGEQUANT_ERR_DAMAGED, "the library's parameters or sizes differ from " + std::string(kExportJson) +
                                      "'s: the library and the weights come from different exports; " + kFix);
    }

    Global("vm.builtin.tensor_cache.load")(String(dist), static_cast<int>(m->dev.device_type), m->dev.device_id);
    std::vector<String> names;
    for (const Param& p : info.params) names.emplace_back(p.name);
    m->params = Global("vm.builtin.param_array_from_cache_by_name")(tvm::ffi::Array<String>(names.begin(), names.end()));
    Global("vm.builtin.tensor_cache.clear")();  // the param array keeps its tensors alive

    m->embed = fn("embed");
    m->prefill = fn("prefill");
    m->decode = fn("decode");
    if (info.long_after >= 0) m->prefill_long = fn("prefill_long");
    m->kv = fn("create_paged_kv_cache")(Shape({1}), Shape({m->max_len}), Shape({info.chunk}), Shape({16}), Shape({0}));
    m->add_seq = Global("vm.builtin.kv_state_add_sequence");
    m->remove_seq = Global("vm.builtin.kv_state_remove_sequence");
    m->begin = Global("vm.builtin.kv_state_begin_forward");
    m->end = Global("vm.builtin.kv_state_end_forward");
    // tensor helpers through their registered functions: the wheel ships no tvm/support headers, which
    // tvm/runtime/tensor.h needs
    m->alloc = Global("runtime.TVMTensorAllocWithScope");
    m->view = Global("runtime.TVMTensorCreateView");
    m->from_bytes = Global("runtime.TVMTensorCopyFromBytes");
    m->to_bytes = Global("runtime.TVMTensorCopyToBytes");
    m->add_seq(m->kv, 0);
  });
  if (s == EDGEQUANT_OK) *out = m.release();
  return s;
}

edgequant_status edgequant_prefill(edgequant_model* m, const int32_t* ids, size_t n) {
  if (!m || (!ids && n)) return Report(EDGEQUANT_ERR_ARGUMENT, "edgequant_prefill: model and ids must not be NULL");
  return Guard([&] {
    m->CheckUsable();
    // the embedding kernel does not bound-check: an id past the table reads outside it
    for (size_t i = 0; i < n; ++i) {
      if (ids[i] < 0 || ids[i] >= m->info.vocab) {
        Fail(EDGEQUANT_ERR_ARGUMENT, "token id " + std::to_string(ids[i]) + " is outside the vocabulary (0.." +
                                         std::to_string(m->info.vocab - 1) + ") of this model");
      }
    }
    int64_t total = m->length + static_cast<int64_t>(m->has_pending) + static_cast<int64_t>(n);
    if (total > m->max_len) {
      Fail(EDGEQUANT_ERR_CAPACITY, "sequence of " + std::to_string(total) + " tokens exceeds the KV cache (" +
                                       std::to_string(m->max_len) + "); use a shorter prompt or a larger max_total_seq_len");
    }
    m->FeedPending();
    m->Prefill(ids, static_cast<int64_t>(n));
  });
}

edgequant_status edgequant_decode(edgequant_model* m, float temperature, float top_p, int32_t* token) {
  if (!m || !token) return Report(EDGEQUANT_ERR_ARGUMENT, "edgequant_decode: model and token must not be NULL");
  if (!std::isfinite(temperature) || !(top_p > 0.0f && top_p <= 1.0f)) {
    return Report(EDGEQUANT_ERR_ARGUMENT, "temperature must be finite and top_p in (0, 1]");
  }
  return Guard([&] {
    m->CheckUsable();
    if (!m->has_logits) Fail(EDGEQUANT_ERR_STATE, "decode needs a prefill first");
    if (m->has_pending && m->length + 1 > m->max_len) {
      Fail(EDGEQUANT_ERR_CAPACITY, "the sequence fills the KV cache (" + std::to_string(m->max_len) + " tokens)");
    }
    m->FeedPending();
    *token = Sample(m->logits, temperature, top_p, m->rng);
    m->pending = *token;
    m->has_pending = true;
  });
}

edgequant_status edgequant_logits(edgequant_model* m, const float** logits, size_t* n) {
  if (!m || !logits || !n) return Report(EDGEQUANT_ERR_ARGUMENT, "edgequant_logits: arguments must not be NULL");
  if (!m->has_logits) return Report(EDGEQUANT_ERR_STATE, "no logits before a prefill");
  *logits = m->logits.data();
  *n = m->logits.size();
  return EDGEQUANT_OK;
}

edgequant_status edgequant_reset(edgequant_model* m, uint64_t seed) {
  if (!m) return Report(EDGEQUANT_ERR_ARGUMENT, "edgequant_reset: model must not be NULL");
  return Guard([&] { m->NewSequence(seed); });
}

edgequant_status edgequant_get_info(const edgequant_model* m, edgequant_info* out) {
  if (!m || !out) return Report(EDGEQUANT_ERR_ARGUMENT, "edgequant_get_info: arguments must not be NULL");
  const ExportInfo& i = m->info;
  out->vocab_size = static_cast<int32_t>(i.vocab);
  out->context_window = static_cast<int32_t>(i.context);
  out->max_total_seq_len = static_cast<int32_t>(m->max_len);
  out->seq_len = static_cast<int32_t>(m->length);
  out->weight_bytes = m->weight_bytes;
  // K and V, fp16, per layer and KV head: what export/runtime.py's kv_cache_bytes reports
  out->kv_cache_bytes = 2ull * i.layers * i.kv_heads * i.head_dim * m->max_len * 2;
  out->target = i.target.c_str();
  out->device = i.device.c_str();
  return EDGEQUANT_OK;
}

void edgequant_close(edgequant_model* m) {
  // TVM objects release in their destructors, which do not throw
  delete m;
}

}  // extern "C"
