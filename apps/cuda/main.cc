// edgequant-run: load an exported DIST folder (edgequant export --target cuda|cpu) with the TVM runtime alone and
// decode greedily from prompt token ids. It mirrors export/runtime.py: the VM calls `embed`, `prefill`, `decode`
// and `create_paged_kv_cache`, weights come from tensor-cache.json through the VM's tensor-cache builtins.
//
// usage: edgequant-run DIST cuda|cpu ID[,ID...] [NEW_TOKENS]
// Tokenization is left to the caller (the tokenizer files sit in DIST); the program prints the new token ids and
// the decode speed. For cuda, DIST/kernels.fatbin (compiled by nvcc at export time) is handed to TVM through the
// `tvm_callback_cuda_compile` hook, so no CUDA compiler is needed where this runs.
#include <tvm/ffi/container/shape.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <dlfcn.h>
#include <fstream>
#include <iostream>
#include <iterator>
#include <sstream>
#include <string>
#include <vector>

using tvm::ffi::Function;
using tvm::ffi::Module;
using tvm::ffi::Shape;
using tvm::ffi::Tensor;

static std::string ReadFile(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot read " + path);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

static Function Global(const char* name) { return Function::GetGlobalRequired(name); }

int main(int argc, char** argv) {
  if (argc < 4) {
    std::cerr << "usage: " << argv[0] << " DIST cuda|cpu ID[,ID...] [NEW_TOKENS]\n";
    return 2;
  }
  std::string dist = argv[1], kind = argv[2];
  std::vector<int32_t> prompt;
  {
    std::stringstream ss(argv[3]);
    for (std::string tok; std::getline(ss, tok, ',');) prompt.push_back(std::stoi(tok));
  }
  int new_tokens = argc > 4 ? std::stoi(argv[4]) : 32;
  DLDevice dev{kind == "cuda" ? kDLCUDA : kDLCPU, 0};

  if (kind == "cuda") {
    // the CUDA device API lives in its own library; loading it registers the cuda module loader
    if (!dlopen("libtvm_runtime_cuda.so", RTLD_NOW | RTLD_GLOBAL)) {
      std::cerr << "cannot load libtvm_runtime_cuda.so: " << dlerror() << "\n";
      return 1;
    }
    std::string fatbin = ReadFile(dist + "/kernels.fatbin");
    Function::SetGlobal("tvm_callback_cuda_compile",
                        Function::FromTyped([fatbin](tvm::ffi::String) {
                          return tvm::ffi::Bytes(fatbin);
                        }),
                        /*override=*/true);
  }

  Module lib = Module::LoadFromFile(dist + "/lib.so");
  Module vm = lib->GetFunction("vm_load_executable").value()().cast<Module>();
  // device, then host (pooled allocators, kind 2)
  vm->GetFunction("vm_initialization").value()(static_cast<int>(dev.device_type), dev.device_id, 2,
                                                static_cast<int>(kDLCPU), 0, 2);
  Global("vm.builtin.tensor_cache.load")(dist, static_cast<int>(dev.device_type), dev.device_id);

  // parameter names in the order the library expects them, from its own _metadata()
  std::string meta = vm->GetFunction("_metadata").value()().cast<tvm::ffi::String>();
  std::vector<tvm::ffi::String> names;
  for (size_t p = meta.find("\"name\": \""); p != std::string::npos; p = meta.find("\"name\": \"", p)) {
    p += 9;
    size_t e = meta.find('"', p);
    names.emplace_back(meta.substr(p, e - p));
  }
  tvm::ffi::Array<tvm::ffi::String> name_array(names.begin(), names.end());
  auto params = Global("vm.builtin.param_array_from_cache_by_name")(name_array);
  int hidden = 0, vocab = 0;
  {  // hidden size and vocabulary from the embedding table's shape ([vocab, hidden])
    // _metadata is JSON with sorted keys: each parameter reads {"dtype": .., "name": .., "shape": [..]}
    size_t p = meta.find("\"model.embed_tokens.weight\"");
    size_t s = meta.find("\"shape\": [", p);
    std::sscanf(meta.c_str() + s, "\"shape\": [%d, %d]", &vocab, &hidden);
  }

  Function embed = vm->GetFunction("embed").value(), prefill = vm->GetFunction("prefill").value(),
           decode = vm->GetFunction("decode").value();
  auto kv = vm->GetFunction("create_paged_kv_cache").value()(Shape({1}), Shape({4096}), Shape({256}),
                                                            Shape({16}), Shape({0}));
  Global("vm.builtin.kv_state_add_sequence")(kv, 0);
  Function begin = Global("vm.builtin.kv_state_begin_forward"), end = Global("vm.builtin.kv_state_end_forward");

  // the runtime's tensor helpers are reached through their registered functions (the wheel ships no
  // tvm/support headers, which tvm/runtime/tensor.h needs)
  Function alloc = Global("runtime.TVMTensorAllocWithScope"), view = Global("runtime.TVMTensorCreateView"),
           from_bytes = Global("runtime.TVMTensorCopyFromBytes"), to_bytes = Global("runtime.TVMTensorCopyToBytes");
  auto run = [&](Function& fn, const std::vector<int32_t>& ids) {
    int64_t n = static_cast<int64_t>(ids.size());
    Tensor t = alloc(Shape({n}), DLDataType{kDLInt, 32, 1}, dev, nullptr).cast<Tensor>();
    from_bytes(t, static_cast<void*>(const_cast<int32_t*>(ids.data())), ids.size() * sizeof(int32_t));
    Tensor e = embed(t, params).cast<Tensor>();
    Tensor e3 = view(e, Shape({1, n, hidden}), e.dtype(), 0).cast<Tensor>();
    begin(kv, Shape({0}), Shape({n}));
    auto out = fn(e3, kv, params).cast<tvm::ffi::Array<tvm::ffi::Any>>();
    end(kv);
    std::vector<float> logits(vocab);
    to_bytes(out[0].cast<Tensor>(), static_cast<void*>(logits.data()), vocab * sizeof(float));
    return static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
  };

  auto t0 = std::chrono::steady_clock::now();
  int32_t tok = run(prefill, prompt);
  auto t1 = std::chrono::steady_clock::now();
  std::vector<int32_t> out{tok};
  for (int i = 1; i < new_tokens; ++i) out.push_back(tok = run(decode, {tok}));
  auto t2 = std::chrono::steady_clock::now();
  double prefill_s = std::chrono::duration<double>(t1 - t0).count();
  double decode_s = std::chrono::duration<double>(t2 - t1).count();
  for (size_t i = 0; i < out.size(); ++i) std::cout << (i ? "," : "") << out[i];
  std::cout << "\nprefill " << prompt.size() / prefill_s << " tok/s, decode " << (new_tokens - 1) / decode_s
            << " tok/s\n";
  return 0;
}
