// EdgequantEngine: one exported model and one sequence, over apps/runtime's C API (edgequant_runtime.h).
//
// Token ids in and out (tokenization is the app's; the DIST folder holds tokenizer.json). The C handle is not
// thread-safe: the actor serialises every call. generate() returns an AsyncThrowingStream; cancelling the consuming
// task (or dropping the stream) stops decoding after the current token.
import EdgequantRuntime
import Foundation

public struct EdgequantError: Error, CustomStringConvertible {
    public let status: Int32      // edgequant_status
    public let message: String   // the runtime's one-line message
    public var description: String { message }
}

/// Memory the model holds: its weights and the KV cache reserved for `maxTotalSeqLen` tokens.
public struct EdgequantMemory: Sendable {
    public let weightBytes: UInt64
    public let kvCacheBytes: UInt64
    public let maxTotalSeqLen: Int
    public let seqLen: Int
}

public actor EdgequantEngine {
    private var handle: OpaquePointer?

    /// Opens the weights folder (a DIST folder in the app bundle or its documents) of the model linked into the app
    /// as a system library under `systemLibPrefix` (`edgequant export --target iphone --system-lib-prefix`).
    public init(weights: URL, systemLibPrefix: String, maxTotalSeqLen: Int32 = 0) throws {
        var model: OpaquePointer?
        let status = systemLibPrefix.withCString { prefix -> edgequant_status in
            var opts = edgequant_options(max_total_seq_len: maxTotalSeqLen, system_lib_prefix: prefix)
            return edgequant_open(weights.path, &opts, &model)
        }
        try Self.check(status)
        handle = model
    }

    deinit { edgequant_close(handle) }

    /// Feeds `prompt` to the current sequence and streams up to `maxTokens` tokens (greedy at temperature 0),
    /// ending after any token of `stop`.
    public nonisolated func generate(prompt: [Int32], maxTokens: Int, temperature: Float = 0, topP: Float = 1,
                                     stop: Set<Int32> = []) -> AsyncThrowingStream<Int32, Error> {
        AsyncThrowingStream { continuation in
            let task = Task {
                do {
                    try await self.run(prompt: prompt, maxTokens: maxTokens, temperature: temperature, topP: topP,
                                       stop: stop) { continuation.yield($0) }
                    continuation.finish()
                } catch {
                    continuation.finish(throwing: error)
                }
            }
            continuation.onTermination = { _ in task.cancel() }
        }
    }

    /// Starts a new, empty sequence and seeds the sampler.
    public func reset(seed: UInt64 = 0) throws { try Self.check(edgequant_reset(try live(), seed)) }

    public func memory() throws -> EdgequantMemory {
        var info = edgequant_info()
        try Self.check(edgequant_get_info(try live(), &info))
        return EdgequantMemory(weightBytes: info.weight_bytes, kvCacheBytes: info.kv_cache_bytes,
                               maxTotalSeqLen: Int(info.max_total_seq_len), seqLen: Int(info.seq_len))
    }

    public func close() {
        edgequant_close(handle)
        handle = nil
    }

    private func run(prompt: [Int32], maxTokens: Int, temperature: Float, topP: Float, stop: Set<Int32>,
                     emit: (Int32) -> Void) throws {
        let model = try live()
        try prompt.withUnsafeBufferPointer { try Self.check(edgequant_prefill(model, $0.baseAddress, $0.count)) }
        for _ in 0..<maxTokens {
            if Task.isCancelled { return }
            var token: Int32 = -1
            try Self.check(edgequant_decode(model, temperature, topP, &token))
            emit(token)
            if stop.contains(token) { return }
        }
    }

    private func live() throws -> OpaquePointer {
        guard let h = handle else {
            throw EdgequantError(status: Int32(EDGEQUANT_ERR_STATE.rawValue), message: "STATE: the engine is closed")
        }
        return h
    }

    private static func check(_ status: edgequant_status) throws {
        guard status != EDGEQUANT_OK else { return }
        let message = String(cString: edgequant_status_name(status)) + ": " + String(cString: edgequant_last_error())
        throw EdgequantError(status: Int32(status.rawValue), message: message)
    }
}
