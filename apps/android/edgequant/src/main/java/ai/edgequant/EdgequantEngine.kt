package ai.edgequant

import kotlinx.coroutines.CoroutineDispatcher
import kotlinx.coroutines.asCoroutineDispatcher
import kotlinx.coroutines.currentCoroutineContext
import kotlinx.coroutines.ensureActive
import kotlinx.coroutines.flow.Flow
import kotlinx.coroutines.flow.flow
import kotlinx.coroutines.flow.flowOn
import kotlinx.coroutines.runBlocking
import kotlinx.coroutines.withContext
import java.io.File
import java.util.concurrent.Executors

/** Memory the model holds: weights and the KV cache reserved for [maxTotalSeqLen] tokens. */
data class Memory(val weightBytes: Long, val kvCacheBytes: Long, val maxTotalSeqLen: Int, val seqLen: Int)

/**
 * One exported model (apps/runtime through JNI) and one sequence. Token ids in and out: tokenization is the app's
 * (the DIST folder holds tokenizer.json).
 *
 * Every native call runs on one thread of its own (a handle is not thread-safe), so [generate] can be collected
 * from any coroutine; cancelling the collector stops decoding after the current token.
 */
class EdgequantEngine private constructor(
    private var handle: Long,
    private val thread: CoroutineDispatcher,
) : AutoCloseable {

    companion object {
        /** Opens [weights] (the DIST folder copied to app storage). With [systemLibPrefix] the model library is the
         *  one linked into libedgequant_jni.so under that prefix (`edgequant export --system-lib-prefix`). */
        suspend fun open(weights: File, systemLibPrefix: String?, maxTotalSeqLen: Int = 0): EdgequantEngine {
            val thread = Executors.newSingleThreadExecutor { r -> Thread(r, "edgequant") }.asCoroutineDispatcher()
            val handle = withContext(thread) { Native.open(weights.path, systemLibPrefix, maxTotalSeqLen) }
            return EdgequantEngine(handle, thread)
        }
    }

    /** Feeds [promptIds] to the current sequence (a new one after [reset]) and emits up to [maxTokens] tokens,
     *  stopping after any of [stopIds]. Greedy at temperature 0. */
    fun generate(
        promptIds: IntArray,
        maxTokens: Int,
        temperature: Float = 0f,
        topP: Float = 1f,
        stopIds: Set<Int> = emptySet(),
    ): Flow<Int> = flow {
        Native.prefill(live(), promptIds)
        for (i in 0 until maxTokens) {
            currentCoroutineContext().ensureActive()
            val token = Native.decode(live(), temperature, topP)
            emit(token)
            if (token in stopIds) break
        }
    }.flowOn(thread)

    /** Forgets the sequence and seeds the sampler. */
    suspend fun reset(seed: Long = 0) = withContext(thread) { Native.reset(live(), seed) }

    suspend fun memory(): Memory = withContext(thread) {
        val v = Native.info(live())
        Memory(weightBytes = v[4], kvCacheBytes = v[5], maxTotalSeqLen = v[2].toInt(), seqLen = v[3].toInt())
    }

    suspend fun device(): String = withContext(thread) { Native.device(live()) }

    /** Frees the model on its own thread, so after a decode in flight (collectors should be cancelled first). */
    override fun close() = runBlocking(thread) {
        val h = handle
        handle = 0
        if (h != 0L) Native.close(h)
    }

    private fun live(): Long = handle.also { if (it == 0L) throw EdgequantException(6, "STATE: the engine is closed") }
}
