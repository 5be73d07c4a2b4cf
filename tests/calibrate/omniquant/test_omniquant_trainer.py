"""The block-wise trainer end to end on tiny models: training lowers the block loss, the fused checkpoint computes
exactly what the live LWC/LET model computes, an interrupted run resumes to the same bytes, bad input is refused."""
import copy
import json
import shutil

import pytest
import torch

from edgequant import api
from edgequant.calibrate.omniquant import OmniConfig, calibrate_omniquant
from edgequant.calibrate.omniquant import trainer as trainer_mod
from edgequant.errors import EdgequantError
from edgequant.schemes import QuantScheme

from conftest import assert_fused_checkpoint_equals_live, make_tiny_model


def _samples(n=8, seqlen=48, seed=0):
    return torch.randint(0, 320, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def test_training_lowers_block_loss():
    samples = _samples()
    scheme = QuantScheme(2, 32)
    base = calibrate_omniquant(make_tiny_model("llama"), samples, scheme, OmniConfig(epochs=0), progress=False)[2]
    m = make_tiny_model("llama")
    _, stats, blocks, _ = calibrate_omniquant(m, samples, scheme, OmniConfig(epochs=4, let=True, batch_size=2),
                                              progress=False)
    for b, b0 in zip(blocks, base):
        assert b.steps == 16 and b.loss_after < b.loss_before
    assert blocks[0].loss_after < 0.9 * base[0].loss_after      # better than min-max RTN on the same inputs
    assert all("weight_rel_err" in s and "clip_upper_mean" in s for s in stats.values())


def test_a_block_whose_loss_rises_keeps_its_better_parameters():
    """At lr 2 the first block ends above its start (0.0158 vs 0.0134 without keep_best); it must keep the start."""
    samples = _samples()
    scheme = QuantScheme(3, 32)
    cfg = dict(epochs=3, batch_size=2, lwc_lr=2.0)
    rising = calibrate_omniquant(make_tiny_model("llama"), samples, scheme, OmniConfig(**cfg, keep_best=False),
                                 progress=False)[2]
    assert rising[0].loss_after > rising[0].loss_before      # the setting really makes a block worse
    m = make_tiny_model("llama")
    q, _, blocks, _ = calibrate_omniquant(m, samples, scheme, OmniConfig(**cfg), progress=False)
    for b in blocks:
        losses = b.extra["epoch_losses"]
        assert len(losses) == 3
        assert b.loss_after <= b.loss_before and b.loss_after == pytest.approx(min([b.loss_before] + losses), rel=1e-5)
    # the kept parameters are what the checkpoint holds: block 0 fell back to its initial clipping (sigmoid(4))
    start = calibrate_omniquant(make_tiny_model("llama"), samples, scheme, OmniConfig(epochs=0, batch_size=2),
                                progress=False)[0]
    name = "model.layers.0.self_attn.q_proj"
    assert torch.equal(q[name].q, start[name].q) and torch.equal(q[name].scale, start[name].scale)


def test_held_out_windows_are_scored_and_never_trained_on(monkeypatch):
    """--heldout: the last windows steer which epoch is kept and nothing else. Training on 6 of 8 windows at batch 2
    takes 3 steps an epoch, every training batch is drawn from the first 6 windows, and the per-epoch scores read the
    held-out windows."""
    samples = _samples()
    scheme = QuantScheme(3, 32)
    cfg = OmniConfig(epochs=2, batch_size=2, lwc_lr=5e-2, heldout=2)
    model = make_tiny_model("llama")
    emb = model.get_input_embeddings().weight.detach().clone()
    trained, real = [], trainer_mod._block_forward

    def block_forward(block, params, x, kw):
        if torch.is_grad_enabled():   # a training step (scoring runs under no_grad)
            trained.append(x.detach().clone())
        return real(block, params, x, kw)
    monkeypatch.setattr(trainer_mod, "_block_forward", block_forward)
    _, _, blocks, _ = calibrate_omniquant(model, samples, scheme, cfg, progress=False)
    assert all(b.steps == 2 * 3 and len(b.extra["epoch_losses"]) == 2 for b in blocks)
    first = trained[:6]   # block 0's steps: its inputs are the windows' embeddings
    windows = [emb[w] for w in samples]
    seen = {k for x in first for row in x for k, w in enumerate(windows) if torch.equal(row, w)}
    assert seen == set(range(6)), seen
    other = samples.clone()
    other[-1] = _samples(1, 48, seed=7)[0]
    monkeypatch.setattr(trainer_mod, "_block_forward", real)
    moved = calibrate_omniquant(make_tiny_model("llama"), other, scheme, cfg, progress=False)[2]
    assert moved[0].extra["epoch_losses"] != blocks[0].extra["epoch_losses"]   # scored on the held-out windows
    with pytest.raises(EdgequantError, match="--heldout 8 leaves no training windows"):
        calibrate_omniquant(make_tiny_model("llama"), samples, scheme, OmniConfig(epochs=2, heldout=8),
                            progress=False)
    with pytest.raises(EdgequantError, match="--heldout.*only apply with --epochs"):
        OmniConfig(epochs=0, heldout=2)


@pytest.mark.parametrize("arch,let,sym,loss", [("llama", True, False, "mse"), ("qwen2", True, False, "token_rel"),
                                               ("mistral", False, True, "mse")])
def test_fused_checkpoint_equals_live_model(tmp_path, tokenizer, arch, let, sym, loss):
    samples = _samples()
    scheme = QuantScheme(3, 32, sym)
    model = make_tiny_model(arch, tie=(arch == "llama"))
    live_model = copy.deepcopy(model)
    cfg = OmniConfig(epochs=2, let=let, batch_size=2, lwc_lr=5e-2, **({"let_lr": 1e-2} if let else {}), loss=loss,
                     lwc_init="search" if arch == "mistral" else 4.0)
    q, _, _, live = calibrate_omniquant(model, samples, scheme, cfg, progress=False, keep_live=True)
    fused = assert_fused_checkpoint_equals_live(tmp_path, tokenizer, live_model, model, q, scheme, live, samples)
    if let:   # LET really moved the norms (so the test covers its fusion)
        assert not torch.equal(fused.model.layers[0].input_layernorm.weight,
                               make_tiny_model(arch).model.layers[0].input_layernorm.weight.half().float())


def _split(path):
    b = path.read_bytes()
    n = int.from_bytes(b[:8], "little")
    return json.loads(b[8:8 + n]), b[8 + n:]


class _Interrupt(Exception):
    pass


def test_resume_reproduces_checkpoint_bytes(tmp_path, model_dirs, text_file, monkeypatch):
    kw = dict(method="omniquant", bits=3, group_size=32, calib=text_file, nsamples=6, seqlen=32, batch_size=2,
              epochs=2, let=True, progress=False)
    ref = api.quantize(model_dirs["qwen2"], tmp_path / "ref", **kw)
    state = _interrupted_run(tmp_path, model_dirs, monkeypatch, kw, arch="qwen2")
    assert (state / "block_0000.safetensors").exists() and not (tmp_path / "out").exists()
    out = api.quantize(model_dirs["qwen2"], tmp_path / "out", **kw)
    assert not state.exists()
    # every tensor byte identical; the header identical as JSON (safetensors writes its metadata map in a random
    # order per call, so two uninterrupted runs differ in that order too)
    assert _split(out / "model.safetensors") == _split(ref / "model.safetensors")
    blocks = json.loads((out / "edgequant.json").read_text())["calibration"]["blocks"]
    assert [b["resumed"] for b in blocks] == [True, False]
    assert all(b["loss_after"] <= b["loss_before"] and b["time_s"] >= 0 for b in blocks)


@pytest.mark.parametrize("opts,msg", [({"epochs": -1}, "--epochs"), ({"let_alpha": 2.0}, "--let-alpha"),
                                      ({"lwc": False, "let": False}, "nothing to train"),
                                      ({"lwc_lr": 0.0}, "--lwc-lr"), ({"owq_target_bits": 2.0}, "owq-target-bits"),
                                      ({"loss": "l1"}, "'mse'"),
                                      ({"epochs": 1, "block_target": "local", "aug_loss": True}, "--aug-loss"),
                                      ({"epochs": 0, "block_target": "local"}, "--epochs N")])
def test_bad_options_are_one_line_errors(tmp_path, model_dirs, text_file, opts, msg):
    with pytest.raises(EdgequantError, match=msg) as e:
        api.quantize(model_dirs["llama"], tmp_path / "o", method="omniquant", calib=text_file, nsamples=2,
                               seqlen=32, progress=False, **opts)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "o").exists()


def test_every_user_setting_reaches_the_trainer(tmp_path, model_dirs, text_file):
    """Options given to the API arrive in the trainer's settings (the CLI's options are generated from OmniConfig)."""
    out = api.quantize(model_dirs["llama"], tmp_path / "q", method="omniquant", calib=text_file, nsamples=2, seqlen=32,
                       epochs=1, loss="token_rel", lwc_init="search", progress=False)
    cfg = json.loads((out / "edgequant.json").read_text())["calibration"]["omniquant"]
    assert cfg["loss"] == "token_rel" and cfg["lwc_init"] == "search"


def test_cli_omniquant(tmp_path, model_dirs, text_file):
    from click.testing import CliRunner
    from edgequant.cli import main
    r = CliRunner().invoke(main, ["quantize", str(model_dirs["mistral"]), "-o", str(tmp_path / "q"), "--method",
                                  "omniquant", "--bits", "4", "--group-size", "32", "--calib", text_file,
                                  "--nsamples", "4", "--seqlen", "32", "--epochs", "1", "--let", "--lwc-init", "search",
                                  "--loss", "token_rel", "-q"])
    assert r.exit_code == 0, r.output
    prov = json.loads((tmp_path / "q" / "edgequant.json").read_text())
    cfg = prov["calibration"]["omniquant"]
    assert prov["method"] == "omniquant" and cfg["let"] is True
    assert cfg["lwc_init"] == "search" and cfg["loss"] == "token_rel"
    assert len(prov["calibration"]["blocks"]) == 2


def _interrupted_run(tmp_path, model_dirs, monkeypatch, kw, arch="llama"):
    """Run `quantize` to tmp_path/out and stop it after block 0; returns the state folder it leaves."""
    def boom(i):
        if i == 0:
            raise _Interrupt
    monkeypatch.setattr(trainer_mod, "_after_block", boom)
    with pytest.raises(_Interrupt):
        api.quantize(model_dirs[arch], tmp_path / "out", **kw)
    monkeypatch.setattr(trainer_mod, "_after_block", lambda i: None)
    return tmp_path / ".out.state"


_RESUME_KW = dict(method="omniquant", bits=3, group_size=32, nsamples=4, seqlen=32, batch_size=2, epochs=1,
                  progress=False)


def test_a_run_refused_before_its_first_block_leaves_no_state_folder(tmp_path, model_dirs, text_file):
    """A refusal inside calibration (too many OWQ columns) left `.NAME.state/meta.json` behind (ninth hostile
    re-run, L6)."""
    with pytest.raises(EdgequantError, match="owq-target-bits|target"):
        api.quantize(model_dirs["llama"], tmp_path / "out", **dict(_RESUME_KW, calib=text_file, owq_target_bits=100))
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.state").exists()


@pytest.mark.parametrize("fail_at", [0, 1])
def test_a_full_disk_while_saving_progress_is_one_line(tmp_path, model_dirs, text_file, monkeypatch, fail_at):
    """safetensors reports a full disk as its own SafetensorError: it was a traceback that left the state folder
    without a word (eleventh hostile re-run, T21). Now one line that says what is kept; nothing half-written."""
    import safetensors.torch
    from safetensors import SafetensorError
    real, calls = safetensors.torch.save_file, []

    def save_file(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) > 2 * fail_at:   # two files per block: the block's, then the streams
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        real(tensors, path, metadata=metadata)
    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    with pytest.raises(EdgequantError, match="cannot save OmniQuant's progress in .*No space left on device") as e:
        api.quantize(model_dirs["llama"], tmp_path / "out", **dict(_RESUME_KW, calib=text_file))
    state = tmp_path / ".out.state"
    assert ("1 finished block(s) saved there are kept" in str(e.value)) == bool(fail_at)
    assert not (tmp_path / "out").exists()
    if fail_at:   # block 0 and its streams stay for a rerun; block 1's half-written file does not
        assert sorted(p.name for p in state.iterdir()) == ["block_0000.safetensors", "meta.json",
                                                           "streams.safetensors"]
    else:
        assert not state.exists()


def test_a_full_disk_while_writing_the_checkpoint_names_the_kept_blocks(tmp_path, model_dirs, text_file, monkeypatch):
    """The progress fits, the checkpoint does not: the line said "nothing was changed" while the finished blocks
    stayed in the hidden state folder unnamed (twelfth hostile re-run, L6). Now it names them; a rerun uses them."""
    import edgequant.artifact as artifact

    def full(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(artifact, "write_tensors", full)
    with pytest.raises(EdgequantError, match=r"cannot write .*No space left.*finished blocks are kept in .*\.out\.state"):
        api.quantize(model_dirs["llama"], tmp_path / "out", **dict(_RESUME_KW, calib=text_file))
    assert not (tmp_path / "out").exists() and (tmp_path / ".out.state" / "block_0000.safetensors").is_file()


def test_resume_state_never_unpickles(tmp_path, model_dirs, text_file, monkeypatch):
    """A pickle planted in the state folder (old format name or new) is never loaded: no code runs."""
    kw = dict(_RESUME_KW, calib=text_file)
    state = _interrupted_run(tmp_path, model_dirs, monkeypatch, kw)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))
    import pickle
    (state / "block_0000.pt").write_bytes(pickle.dumps(Evil()))   # the name the pickled format used
    torch.save({"x": Evil()}, state / "block_0000.safetensors")   # a pickle under the new name: refused as damaged
    api.quantize(model_dirs["llama"], tmp_path / "out", **kw)
    assert not marker.exists()
    assert not state.exists() and (tmp_path / "out" / "model.safetensors").is_file()


# CI time: each case is a whole rerun; the value checks are asked directly in the test above
@pytest.mark.parametrize("damage", ["truncate", pytest.param("out_of_range", marks=pytest.mark.slow), "other_run",
                                    "streams_nan", pytest.param("zero_nan", marks=pytest.mark.slow),
                                    pytest.param("scale_negative", marks=pytest.mark.slow)])
def test_damaged_or_foreign_state_starts_over(tmp_path, model_dirs, text_file, monkeypatch, capsys, damage):
    """A damaged block file or another run's folder costs recomputation, never a failed or wrong run."""
    kw = dict(_RESUME_KW, calib=text_file)
    ref = api.quantize(model_dirs["llama"], tmp_path / "ref", **kw)
    state = _interrupted_run(tmp_path, model_dirs, monkeypatch, kw)
    block = state / "block_0000.safetensors"
    if damage == "truncate":
        block.write_bytes(block.read_bytes()[:100])
    elif damage == "out_of_range":   # a well-formed file whose integers exceed 3 bits
        from safetensors import safe_open
        from safetensors.torch import save_file
        with safe_open(str(block), "pt") as f:
            meta, t = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
        t["q/self_attn.q_proj/q"] = torch.full_like(t["q/self_attn.q_proj/q"], 200)
        save_file(t, str(block), metadata=meta)
    elif damage == "zero_nan":   # passed the range check and went into the checkpoint (seventeenth re-run)
        from safetensors import safe_open
        from safetensors.torch import save_file
        with safe_open(str(block), "pt") as f:
            meta, t = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
        t["q/self_attn.v_proj/zero"].view(-1)[-1] = float("nan")
        save_file(t, str(block), metadata=meta)
    elif damage == "scale_negative":   # (seventeenth re-run, S42; a 2.5 zero point likewise)
        from safetensors import safe_open
        from safetensors.torch import save_file
        with safe_open(str(block), "pt") as f:
            meta, t = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
        t["q/mlp.down_proj/scale"].view(-1)[0] = -1.0
        t["q/self_attn.v_proj/zero"].view(-1)[0] = 2.5
        save_file(t, str(block), metadata=meta)
    elif damage == "streams_nan":   # every rerun failed with a loss of nan (sixteenth re-run, L7)
        from safetensors import safe_open
        from safetensors.torch import save_file
        with safe_open(str(state / "streams.safetensors"), "pt") as f:
            meta, t = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
        t["q"].view(-1)[0] = float("nan")
        save_file(t, str(state / "streams.safetensors"), metadata=meta)
    else:
        (state / "meta.json").write_text(json.dumps({"fingerprint": "0" * 64, "version": 2}))
    capsys.readouterr()
    out = api.quantize(model_dirs["llama"], tmp_path / "out", **kw)
    assert "starting over" in capsys.readouterr().err
    assert _split(out / "model.safetensors") == _split(ref / "model.safetensors")
    blocks = json.loads((out / "edgequant.json").read_text())["calibration"]["blocks"]
    assert [b["resumed"] for b in blocks] == [False, False]


def _edit_block(block, tensors=None, record=None, rehash=True):
    """Edit a state file's tensors and record; `rehash`: as an attacker who also rewrites the checksum would."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from edgequant.calibrate.omniquant.state import _checksum
    with safe_open(str(block), "pt") as f:
        rec, t = json.loads(f.metadata()["record"]), {k: f.get_tensor(k) for k in f.keys()}
    (tensors or (lambda t: None))(t)
    (record or (lambda r: None))(rec)
    if rehash:
        rec["sha256"] = _checksum(t)
    save_file(t, str(block), metadata={"record": json.dumps(rec)})


_STORED_DAMAGE = {   # finite float32 values the fp16 checkpoint cannot hold, and records the trainer cannot rebuild
    "scale_past_fp16": lambda t: t["q/mlp.down_proj/scale"].view(-1).__setitem__(0, 1e5),
    "scale_below_fp16": lambda t: t["q/mlp.down_proj/scale"].view(-1).__setitem__(0, 1e-10),
    "norm_past_fp16": lambda t: t["plain/input_layernorm.weight"].view(-1).__setitem__(0, 1e38),
}
_RECORD_DAMAGE = {
    "loss_nan": lambda r: r["summary"].__setitem__("loss_after", float("nan")),
    "other_block": lambda r: r["summary"].__setitem__("block", 5),
    "steps_missing": lambda r: r["summary"].pop("steps"),
}


def test_resumed_values_are_checked_as_the_checkpoint_holds_them(tmp_path, model_dirs, text_file, monkeypatch):
    """Scales of 1e5 or 1e-10 and a norm weight of 1e38 are finite in the state's float32 but Inf or 0 in the
    checkpoint's fp16: quantize exited 0 with a checkpoint its own reader calls damaged (eighteenth re-run, S43); a
    NaN loss went into edgequant.json and a record without `steps` was a TypeError (these with the checksum rewritten,
    so the value checks are what refuses them). A stream value of 1e38 made every rerun fail with an infinite loss
    (L10), and an in-range zero point changed by one passed every check: the checksum finds both. Each is damage:
    starting over."""
    from edgequant.calibrate.omniquant import state as state_mod
    STREAMS = state_mod.STREAMS
    kw = dict(_RESUME_KW, calib=text_file)
    state = _interrupted_run(tmp_path, model_dirs, monkeypatch, kw)
    pristine = tmp_path / "pristine"
    shutil.copytree(state, pristine)
    real_load, asked = state_mod.ResumeState.load, []

    class Loaded(Exception):
        pass

    def load(self, *a):   # the run's own load arguments, kept to ask each damaged copy below without a whole run
        asked.append((self.fp, a))
        raise Loaded(real_load(self, *a))
    monkeypatch.setattr(state_mod.ResumeState, "load", load)
    with pytest.raises(Loaded) as e:
        api.quantize(model_dirs["llama"], tmp_path / "out", **kw)
    assert e.value.args[0] is not None   # the intact state is taken
    fp, args = asked[0]
    cases = {**{k: dict(tensors=v) for k, v in _STORED_DAMAGE.items()},
             **{k: dict(record=v) for k, v in _RECORD_DAMAGE.items()}, "intact": {},
             # finite values in range that no check of ranges can tell from real ones: the checksum does (L10)
             "stream_1e38": dict(tensors=lambda t: t["q"].view(-1).__setitem__(0, 1e38), rehash=False,
                                 file=STREAMS),
             "zero_changed": dict(tensors=lambda t: t["q/self_attn.v_proj/zero"].view(-1).__setitem__(
                 0, (t["q/self_attn.v_proj/zero"].view(-1)[0] + 1) % 8), rehash=False)}
    for name, edit in cases.items():
        shutil.rmtree(state, ignore_errors=True)
        shutil.copytree(pristine, state)
        _edit_block(state / edit.pop("file", "block_0000.safetensors"), **edit)
        notes = []
        taken = real_load(state_mod.ResumeState(state, fp, notify=notes.append), *args) is not None
        assert taken == (name == "intact"), name
        assert taken or "starting over" in notes[0], (name, notes)


def test_a_diverging_loss_is_one_line_without_warnings(monkeypatch):
    """float() of the loss that needs grad printed torch's UserWarning (3 lines) above the error (eighteenth re-run)."""
    import warnings
    monkeypatch.setattr(trainer_mod, "block_loss", lambda y, target, kind: y.sum() * float("inf"))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(EdgequantError, match="OmniQuant loss became (nan|inf) in block 0; lower --lwc-lr"):
            calibrate_omniquant(make_tiny_model("llama"), _samples(), QuantScheme(3, 32),
                                OmniConfig(epochs=1, batch_size=2), progress=False)
    assert [str(w.message) for w in seen] == []


@pytest.mark.parametrize("arch,extra", [("llama", {}), ("qwen2", {"let": True, "owq_target_bits": 3.5})])
def test_gptq_rounds_within_the_learned_ranges(arch, extra):
    """LWC then GPTQ: the same learned scales and zero points, GPTQ's rounding inside them, and a lower block loss
    than rounding to nearest."""
    samples = _samples()
    scheme = QuantScheme(3, 32)
    cfg = dict(epochs=2, batch_size=2, lwc_lr=5e-2, **extra)
    rtn_q, _, rtn_blocks, _ = calibrate_omniquant(make_tiny_model(arch), samples, scheme, OmniConfig(**cfg),
                                                  progress=False)
    q, stats, blocks, _ = calibrate_omniquant(make_tiny_model(arch), samples, scheme, OmniConfig(**cfg, gptq=True),
                                              progress=False)
    name = "model.layers.0.mlp.down_proj"
    assert torch.equal(q[name].scale, rtn_q[name].scale) and torch.equal(q[name].zero, rtn_q[name].zero)
    assert not torch.equal(q[name].q, rtn_q[name].q)
    assert "gptq_loss" in stats[name]
    assert blocks[0].loss_after < rtn_blocks[0].loss_after
    assert sum(b.loss_after for b in blocks) < sum(b.loss_after for b in rtn_blocks)


def test_gptq_rounding_reads_percdamp_and_act_order():
    """`--percdamp` and `--act-order` reached OmniQuant's GPTQ rounding not at all (a re-run saw byte-identical
    checkpoints for --percdamp 1e-12, 0.01 and 1)."""
    samples = _samples()
    scheme = QuantScheme(3, 32)
    name = "model.layers.0.mlp.down_proj"
    codes = {}
    for kw in ({}, {"percdamp": 1.0}, {"act_order": False}):
        q, *_ = calibrate_omniquant(make_tiny_model("llama"), samples, scheme,
                                    OmniConfig(epochs=0, batch_size=2, gptq=True, **kw), progress=False)
        codes[tuple(kw)] = q[name].q
    assert not torch.equal(codes[()], codes[("percdamp",)]) and not torch.equal(codes[()], codes[("act_order",)])


def test_local_target_counts_only_the_blocks_own_error():
    """`block_target="local"`: each block is trained toward the fp block fed the *quantized* stream, so the error the
    earlier blocks passed on through the residual (which its clipping cannot undo) is not in its loss. Block 0 sees
    the same stream either way; block 1's start loss under the paper's target holds block 0's error on top."""
    from edgequant.calibrate.blocks import BlockInputs, capture_first_block_inputs, run_block
    from edgequant.quantizer import group_minmax, params_from_range, quantize_weight
    samples = _samples()
    scheme = QuantScheme(2, 32)
    paper = calibrate_omniquant(make_tiny_model("qwen2"), samples, scheme, OmniConfig(epochs=1, batch_size=2),
                                progress=False)[2]
    m = make_tiny_model("qwen2")
    ref = copy.deepcopy(m)
    q, _, local, _ = calibrate_omniquant(m, samples, scheme, OmniConfig(epochs=1, batch_size=2, block_target="local"),
                                         progress=False)
    assert local[0].loss_before == pytest.approx(paper[0].loss_before, rel=1e-6)
    assert paper[1].loss_before > 2 * local[1].loss_before
    # block 1's start, recomputed here: its initial clipping (sigmoid(4)) on block 0's quantized output, against the
    # fp block 1 on that same input
    layers = m.model.layers
    x = capture_first_block_inputs(m, layers, samples)
    h = BlockInputs(run_block(layers[0], x, batch_size=2), x.kwargs)
    with torch.no_grad():
        fp1 = ref.model.layers[1]
        want = run_block(fp1, h, batch_size=2)
        start = copy.deepcopy(fp1)
        for lin in start.modules():
            if isinstance(lin, torch.nn.Linear):
                w = lin.weight.float()
                lo, hi = group_minmax(w, scheme)
                f = torch.sigmoid(torch.tensor(4.0))
                lin.weight.copy_(quantize_weight(w, scheme, *params_from_range(lo * f, hi * f, scheme)).dequantize())
                if lin.bias is not None:
                    lin.bias.copy_(lin.bias.half().float())
        for n, p in start.named_parameters():
            if n.endswith("layernorm.weight"):
                p.copy_(p.half().float())
        got = run_block(start, h, batch_size=2)
    assert local[1].loss_before == pytest.approx(float(torch.nn.functional.mse_loss(got, want)), rel=1e-4)
