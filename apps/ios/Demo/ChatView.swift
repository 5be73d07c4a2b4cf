// Minimal SwiftUI screen for an app target that depends on the Edgequant package: opens the DIST folder bundled as
// a folder reference named "dist", streams greedy tokens for the ids typed in, shows memory numbers, and stops on
// demand. Ids instead of text keep the demo free of a tokenizer dependency (the DIST holds tokenizer.json).
import Edgequant
import SwiftUI

@main
struct EdgequantDemoApp: App {
    var body: some Scene { WindowGroup { ChatView() } }
}

struct ChatView: View {
    // the prefix given to `edgequant export --target iphone --system-lib-prefix`
    private let prefix = "smollm_"
    @State private var engine: EdgequantEngine?
    @State private var status = "opening…"
    @State private var prompt = ""
    @State private var output = ""
    @State private var task: Task<Void, Never>?

    var body: some View {
        VStack(alignment: .leading, spacing: 12) {
            Text(status).font(.footnote)
            TextField("prompt token ids, e.g. 1 9690 28 2", text: $prompt).textFieldStyle(.roundedBorder)
            HStack {
                Button("Run", action: run).disabled(engine == nil || task != nil)
                Button("Stop") { task?.cancel() }.disabled(task == nil)
            }
            ScrollView { Text(output).frame(maxWidth: .infinity, alignment: .leading) }
        }
        .padding()
        .task { await open() }
    }

    private func open() async {
        guard let dist = Bundle.main.url(forResource: "dist", withExtension: nil) else {
            status = "error: no dist folder in the app bundle"
            return
        }
        do {
            let e = try EdgequantEngine(weights: dist, systemLibPrefix: prefix)
            let m = try await e.memory()
            engine = e
            status = "weights \(m.weightBytes >> 20) MiB, KV cache \(m.kvCacheBytes >> 20) MiB for \(m.maxTotalSeqLen) tokens"
        } catch {
            status = "error: \(error)"
        }
    }

    private func run() {
        guard let engine else { return }
        let ids = prompt.split(separator: " ").compactMap { Int32($0) }
        task = Task {
            defer { task = nil }
            do {
                try await engine.reset()
                for try await token in engine.generate(prompt: ids, maxTokens: 64) { output += "\(token) " }
                output += "\n"
            } catch {
                output += "\nerror: \(error)\n"
            }
        }
    }
}
