/*
 * edgequant runtime: run a model exported by `edgequant export` (a DIST folder) through the TVM runtime.
 *
 * One model handle holds the compiled library, its weights and a KV cache for one sequence. A session is
 *
 *     edgequant_model* m;
 *     if (edgequant_open("DIST", NULL, &m) != EDGEQUANT_OK) { puts(edgequant_last_error()); ... }
 *     edgequant_prefill(m, prompt_ids, n_prompt);                 // the prompt, in chunks
 *     for (...) edgequant_decode(m, 0.0f, 1.0f, &token);          // next token; greedy at temperature 0
 *     edgequant_reset(m, seed);                                    // forget the sequence, seed the sampler
 *     edgequant_close(m);
 *
 * `edgequant_decode` samples from the logits of the last token fed, and feeds the token it returns only when the
 * next call needs its logits (the next decode or prefill). So n decode calls after a prefill run n - 1 forward
 * passes, like `edgequant run`, and a prefill after decoding continues the same sequence (multi-turn chat).
 *
 * Errors never abort: every call returns a status, and edgequant_last_error() holds a one-line message for the
 * last failure on the calling thread. The DIST folder is treated as hostile input: paths, weight records and the
 * index-like weight values are checked before TVM reads them, and token ids are checked against the vocabulary.
 *
 * A handle is not thread-safe: use it from one thread at a time. Different handles may be used concurrently.
 * Tokenization is the caller's (DIST holds the tokenizer files).
 */
#ifndef EDGEQUANT_RUNTIME_H_
#define EDGEQUANT_RUNTIME_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define EDGEQUANT_API __declspec(dllexport)
#else
#define EDGEQUANT_API __attribute__((visibility("default")))
#endif

#define EDGEQUANT_RUNTIME_API_VERSION 1

typedef enum edgequant_status {
  EDGEQUANT_OK = 0,
  EDGEQUANT_ERR_ARGUMENT = 1,    /* a NULL pointer, a token id outside the vocabulary, temperature/top_p out of range */
  EDGEQUANT_ERR_NOT_FOUND = 2,   /* DIST, edgequant-export.json, the library or a weight shard is missing */
  EDGEQUANT_ERR_DAMAGED = 3,     /* DIST's files are malformed or inconsistent with the library */
  EDGEQUANT_ERR_UNSUPPORTED = 4, /* a device this TVM runtime lacks (e.g. opencl), or a library for static linking */
  EDGEQUANT_ERR_CAPACITY = 5,    /* the sequence would not fit the KV cache (see max_total_seq_len) */
  EDGEQUANT_ERR_STATE = 6,       /* decode before any prefill */
  EDGEQUANT_ERR_RUNTIME = 7      /* the TVM runtime failed (the message carries its error) */
} edgequant_status;

typedef struct edgequant_model edgequant_model;

typedef struct edgequant_options {
  /* KV-cache capacity in tokens (prompt + generated); 0: the smaller of the context window and 4096 */
  int32_t max_total_seq_len;
  /* NULL: load DIST/<library> (a shared library). Otherwise the model library is linked into the program as a
   * system library under this prefix (`edgequant export --system-lib-prefix`), and DIST supplies the weights and
   * edgequant-export.json only. */
  const char* system_lib_prefix;
} edgequant_options;

typedef struct edgequant_info {
  int32_t vocab_size;
  int32_t context_window;
  int32_t max_total_seq_len; /* KV-cache capacity in tokens */
  int32_t seq_len;           /* tokens in the KV cache now */
  uint64_t weight_bytes;     /* bytes of the weight tensors loaded */
  uint64_t kv_cache_bytes;   /* fp16 K and V for max_total_seq_len tokens (the pages the cache reserves) */
  const char* target;        /* the export target, e.g. "cpu", "cpu-arm64", "cuda"; valid until close */
  const char* device;        /* "cpu", "cuda", "metal", "opencl" or "vulkan"; valid until close */
} edgequant_info;

/* Opens a DIST folder; `options` may be NULL. On success *out is a new handle, on failure *out is NULL. */
EDGEQUANT_API edgequant_status edgequant_open(const char* dist, const edgequant_options* options,
                                              edgequant_model** out);

/* Feeds `n` token ids (each in [0, vocab_size)) to the current sequence. n may exceed the prefill chunk size. */
EDGEQUANT_API edgequant_status edgequant_prefill(edgequant_model* model, const int32_t* ids, size_t n);

/* The next token: greedy (arg max) when temperature <= 0, else softmax(logits / temperature) restricted to the
 * smallest set of most likely tokens whose probability reaches top_p (0 < top_p <= 1), drawn with the sequence's
 * seeded generator (same seed, same tokens on every platform; not the same stream as `edgequant run`'s NumPy). */
EDGEQUANT_API edgequant_status edgequant_decode(edgequant_model* model, float temperature, float top_p,
                                                int32_t* token);

/* Logits [vocab_size] of the last token fed (after a prefill, or after a decode: of the token before the one it
 * returned). Valid until the next call on the handle. */
EDGEQUANT_API edgequant_status edgequant_logits(edgequant_model* model, const float** logits, size_t* n);

/* Starts a new, empty sequence and seeds its sampler (a new handle starts with seed 0). */
EDGEQUANT_API edgequant_status edgequant_reset(edgequant_model* model, uint64_t seed);

EDGEQUANT_API edgequant_status edgequant_get_info(const edgequant_model* model, edgequant_info* info);

/* Frees the handle and everything it holds; NULL is accepted. */
EDGEQUANT_API void edgequant_close(edgequant_model* model);

/* The message of the last failed call on this thread ("" if none); valid until the next failing call. */
EDGEQUANT_API const char* edgequant_last_error(void);

EDGEQUANT_API const char* edgequant_status_name(edgequant_status status);

#ifdef __cplusplus
}
#endif
#endif /* EDGEQUANT_RUNTIME_H_ */
