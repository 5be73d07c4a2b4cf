package ai.edgequant

/** The JNI functions of src/main/cpp/edgequant_jni.cc (one per C API call of apps/runtime). A failure throws
 *  [EdgequantException]. Handles are not thread-safe: [EdgequantEngine] calls them from one thread. */
internal object Native {
    init {
        System.loadLibrary("edgequant_jni")
    }

    @JvmStatic external fun open(dist: String, systemLibPrefix: String?, maxTotalSeqLen: Int): Long
    @JvmStatic external fun prefill(handle: Long, ids: IntArray)
    @JvmStatic external fun decode(handle: Long, temperature: Float, topP: Float): Int
    @JvmStatic external fun reset(handle: Long, seed: Long)
    /** {vocab_size, context_window, max_total_seq_len, seq_len, weight_bytes, kv_cache_bytes} */
    @JvmStatic external fun info(handle: Long): LongArray
    @JvmStatic external fun device(handle: Long): String
    @JvmStatic external fun close(handle: Long)
}

/** A failed runtime call: [status] is the C API's edgequant_status, the message its one-line error. */
class EdgequantException(val status: Int, message: String) : RuntimeException(message)
