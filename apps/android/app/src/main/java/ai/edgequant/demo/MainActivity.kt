package ai.edgequant.demo

import ai.edgequant.EdgequantEngine
import ai.edgequant.EdgequantException
import android.os.Bundle
import android.widget.Button
import android.widget.EditText
import android.widget.LinearLayout
import android.widget.ScrollView
import android.widget.TextView
import androidx.appcompat.app.AppCompatActivity
import androidx.lifecycle.lifecycleScope
import kotlinx.coroutines.Job
import kotlinx.coroutines.launch
import java.io.File

/**
 * Minimal screen: the DIST folder pushed to the app's files (`adb push dist/. /data/local/tmp/dist` and copied to
 * filesDir/dist by the app, or bundled as assets) is opened once; "Run" feeds the space-separated token ids typed
 * in the box and appends the generated ids as they stream; "Stop" cancels. Tokenization is left to the app
 * (tokenizer.json is in the DIST folder); ids keep this demo free of a tokenizer dependency.
 */
class MainActivity : AppCompatActivity() {
    private var engine: EdgequantEngine? = null
    private var job: Job? = null

    override fun onCreate(savedInstanceState: Bundle?) {
        super.onCreate(savedInstanceState)
        val ids = EditText(this).apply { hint = "prompt token ids, e.g. 1 9690 28 2" }
        val out = TextView(this)
        val run = Button(this).apply { text = "Run" }
        val stop = Button(this).apply { text = "Stop" }
        setContentView(LinearLayout(this).apply {
            orientation = LinearLayout.VERTICAL
            addView(ids); addView(run); addView(stop); addView(ScrollView(context).apply { addView(out) })
        })

        lifecycleScope.launch {
            try {
                val e = EdgequantEngine.open(File(filesDir, "dist"), BuildConfig.SYSTEM_LIB_PREFIX)
                engine = e
                val mem = e.memory()
                out.text = "device ${e.device()}: weights ${mem.weightBytes shr 20} MiB, " +
                    "KV cache ${mem.kvCacheBytes shr 20} MiB for ${mem.maxTotalSeqLen} tokens\n"
            } catch (ex: EdgequantException) {
                out.text = "error: ${ex.message}"
            }
        }
        run.setOnClickListener {
            val e = engine ?: return@setOnClickListener
            val prompt = ids.text.split(" ").mapNotNull { it.toIntOrNull() }.toIntArray()
            job?.cancel()
            job = lifecycleScope.launch {
                try {
                    e.reset()
                    e.generate(prompt, maxTokens = 64).collect { out.append("$it ") }
                    out.append("\n")
                } catch (ex: EdgequantException) {
                    out.append("\nerror: ${ex.message}\n")
                }
            }
        }
        stop.setOnClickListener { job?.cancel() }
    }

    override fun onDestroy() {
        job?.cancel()
        engine?.close()
        super.onDestroy()
    }
}
