// JNI over apps/runtime's C API for ai.edgequant.Native (Kotlin `object Native` with @JvmStatic externals).
//
// A handle is the edgequant_model pointer as a jlong. Every failure throws ai.edgequant.EdgequantException(status,
// message) with the runtime's one-line message, so Kotlin sees no error codes; a JNI call never aborts the app.
#include <jni.h>

#include <cstdint>
#include <string>
#include <vector>

#include "edgequant_runtime.h"

namespace {

void Throw(JNIEnv* env, int status, const std::string& message) {
  jclass cls = env->FindClass("ai/edgequant/EdgequantException");
  if (cls == nullptr) return;  // NoClassDefFoundError is pending
  jmethodID ctor = env->GetMethodID(cls, "<init>", "(ILjava/lang/String;)V");
  if (ctor == nullptr) return;
  jstring msg = env->NewStringUTF(message.c_str());
  auto ex = static_cast<jthrowable>(env->NewObject(cls, ctor, static_cast<jint>(status), msg));
  if (ex != nullptr) env->Throw(ex);
}

// true when `status` is OK; otherwise a pending exception
bool Check(JNIEnv* env, edgequant_status status) {
  if (status == EDGEQUANT_OK) return true;
  Throw(env, status, std::string(edgequant_status_name(status)) + ": " + edgequant_last_error());
  return false;
}

edgequant_model* Model(JNIEnv* env, jlong handle) {
  if (handle == 0) Throw(env, EDGEQUANT_ERR_STATE, "STATE: the engine is closed");
  return reinterpret_cast<edgequant_model*>(handle);
}

std::string Utf8(JNIEnv* env, jstring s) {
  if (s == nullptr) return {};
  const char* c = env->GetStringUTFChars(s, nullptr);
  std::string out(c == nullptr ? "" : c);
  if (c != nullptr) env->ReleaseStringUTFChars(s, c);
  return out;
}

}  // namespace

extern "C" {

JNIEXPORT jlong JNICALL Java_ai_edgequant_Native_open(JNIEnv* env, jclass, jstring dist, jstring system_lib_prefix,
                                                      jint max_total_seq_len) {
  if (dist == nullptr) {
    Throw(env, EDGEQUANT_ERR_ARGUMENT, "ARGUMENT: dist is null");
    return 0;
  }
  std::string path = Utf8(env, dist), prefix = Utf8(env, system_lib_prefix);
  edgequant_options opts{max_total_seq_len, system_lib_prefix == nullptr ? nullptr : prefix.c_str()};
  edgequant_model* model = nullptr;
  if (!Check(env, edgequant_open(path.c_str(), &opts, &model))) return 0;
  return reinterpret_cast<jlong>(model);
}

JNIEXPORT void JNICALL Java_ai_edgequant_Native_prefill(JNIEnv* env, jclass, jlong handle, jintArray ids) {
  edgequant_model* m = Model(env, handle);
  if (m == nullptr) return;
  if (ids == nullptr) {
    Throw(env, EDGEQUANT_ERR_ARGUMENT, "ARGUMENT: ids is null");
    return;
  }
  jsize n = env->GetArrayLength(ids);
  std::vector<int32_t> buf(static_cast<size_t>(n));
  env->GetIntArrayRegion(ids, 0, n, reinterpret_cast<jint*>(buf.data()));
  Check(env, edgequant_prefill(m, buf.data(), buf.size()));
}

JNIEXPORT jint JNICALL Java_ai_edgequant_Native_decode(JNIEnv* env, jclass, jlong handle, jfloat temperature,
                                                       jfloat top_p) {
  edgequant_model* m = Model(env, handle);
  int32_t token = -1;
  if (m == nullptr || !Check(env, edgequant_decode(m, temperature, top_p, &token))) return -1;
  return token;
}

JNIEXPORT void JNICALL Java_ai_edgequant_Native_reset(JNIEnv* env, jclass, jlong handle, jlong seed) {
  edgequant_model* m = Model(env, handle);
  if (m != nullptr) Check(env, edgequant_reset(m, static_cast<uint64_t>(seed)));
}

// {vocab_size, context_window, max_total_seq_len, seq_len, weight_bytes, kv_cache_bytes}
JNIEXPORT jlongArray JNICALL Java_ai_edgequant_Native_info(JNIEnv* env, jclass, jlong handle) {
  edgequant_model* m = Model(env, handle);
  edgequant_info info{};
  if (m == nullptr || !Check(env, edgequant_get_info(m, &info))) return nullptr;
  jlong v[6] = {info.vocab_size, info.context_window, info.max_total_seq_len, info.seq_len,
                static_cast<jlong>(info.weight_bytes), static_cast<jlong>(info.kv_cache_bytes)};
  jlongArray out = env->NewLongArray(6);
  if (out != nullptr) env->SetLongArrayRegion(out, 0, 6, v);
  return out;
}

JNIEXPORT jstring JNICALL Java_ai_edgequant_Native_device(JNIEnv* env, jclass, jlong handle) {
  edgequant_model* m = Model(env, handle);
  edgequant_info info{};
  if (m == nullptr || !Check(env, edgequant_get_info(m, &info))) return nullptr;
  return env->NewStringUTF(info.device);
}

JNIEXPORT void JNICALL Java_ai_edgequant_Native_close(JNIEnv*, jclass, jlong handle) {
  edgequant_close(reinterpret_cast<edgequant_model*>(handle));
}

}  // extern "C"
