"""The options of the calibrated methods as `Options` dataclasses (torch-free, so the command line builds its options
from them without importing torch). Each is registered with its method in `methods.py`."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import EdgequantError
from ..options import MAX_EPOCHS, MAX_SEED, MAX_WINDOW_TOKENS, Options, check_window_tokens, opt

# Adam moves each parameter by about the learning rate per step: far past 1 the clipping logits, LET scales and fp16
# columns only diverge (1e308 trained to NaN), so rates above 10 are refused as typos (2 is a tested experiment).
MAX_LR = 10.0
# --lwc-init is a logit of the clipping factor: past +-20 its sigmoid is flat in fp32 (no gradient), and 1e308
# overflowed torch.full with a traceback.
MAX_LWC_INIT = 20.0


@dataclass
class BlockTuneOptions(Options):
    """Block-output reconstruction after GPTQ's rounding (`calibrate/blocktune.py`), shared by GPTQ and OWQ."""
    tune_epochs: int = opt(0, "after each block is quantized, tune its group scales, fp16 columns, biases and norm "
                              "weights (codes fixed) toward the fp block's output for this many epochs (0: off).",
                           "int", lo=0, hi=MAX_EPOCHS)
    tune_lr: float = opt(1e-3, "learning rate of that tuning (Adam, on relative offsets).", "float", lo=0,
                         lo_open=True)
    tune_loss: str = opt("mse", "its block loss: 'mse' (OmniQuant's) or 'token_rel' (each token's error relative to "
                                "its size, so attention-sink tokens do not own the loss).", "choice",
                         choices=("mse", "token_rel"))
    tune_heldout: int = opt(0, "the last this many calibration windows are never tuned on; the start and every "
                               "epoch are scored on them and the best kept (an early stop; 0: score on all windows).",
                            "int", lo=0)

    def __post_init__(self):
        super().__post_init__()
        self.refuse_unless(self.tune_epochs > 0, ("tune_lr", "tune_loss", "tune_heldout"), "--tune-epochs N (N > 0)")

    def held_out(self) -> dict[str, int]:
        return {"--tune-heldout": self.tune_heldout} if self.tune_epochs else {}


@dataclass
class BudgetOptions(BlockTuneOptions):
    """How a bit budget across layers (`budget.py`) scores each linear's widths, shared by GPTQ and OWQ."""
    # 'relative' won every pair measured on both real models (40 windows; quality-issue11-lead11-cuda.md)
    budget_metric: str = opt("relative", "what the bit budget minimises: 'relative' (each linear's Hessian-weighted "
                                         "error over its output energy tr(W H W^T), so that early blocks, whose "
                                         "activations are small, are not the first to lose bits) or 'output' (the "
                                         "error as measured).", "choice", choices=("relative", "output"))


@dataclass
class OWQConfig(BudgetOptions):
    """OWQ: the weak-column budget, as bits per weight or as a fixed count per linear."""
    target_bits: float | None = opt(None, "bits per weight budget, e.g. 3.01, 3.1, 4.01.", "float", lo=0, lo_open=True)
    weak_columns: int | None = opt(None, "fp16 columns per linear (instead of --target-bits).", "int", lo=0)
    width_budget: float | None = opt(None, "a bit budget across layers under the fp16 columns: the mean integer "
                                           "width of the linears, each 2, 3 or 4 bits by its Hessian-weighted error "
                                           "(as GPTQ's --target-bits); the columns of --target-bits come on top "
                                           "(--width-budget 3.15 --target-bits 3.1: 3.15 + 0.1 = 3.25 bits per "
                                           "weight).", "float", lo=0, lo_open=True)
    clip_search: bool = opt(True, "tune each group's range by the paper's MSE search (off: min-max groups).", "bool")
    # the paper's search stays the default until the alternatives are measured on both real models (issue 11)
    clip_metric: str = opt("weight", "what the range search minimises: 'weight' (the paper's |dW|^2.4), 'output' "
                                     "(squared error weighted by diag(H), each input's energy) or 'product' (gate's "
                                     "and up's squared error in the MLP's output act(gate) * up; other linears "
                                     "as 'weight').", "choice",
                           choices=("weight", "output", "product"))
    clip_qk: bool = opt(True, "also search the ranges of q/k, whose outputs feed softmax (off: their groups stay "
                              "min-max; clipping their few large weights moved qwen2's attention).", "bool")
    clip_up: bool = opt(True, "also search the ranges of a gated MLP's up projection (off: its groups stay min-max; "
                              "on qwen2 its clipped extremes cost perplexity that no score on the calibration "
                              "windows sees).", "bool")
    clip_v: bool = opt(True, "also search the ranges of v, whose outputs the attention probabilities mix (off: its "
                             "groups stay min-max; on qwen2's first blocks, RTN, its search cost as much NLL as "
                             "up's).", "bool")
    sink_guard: bool = opt(False, "keep a linear's searched ranges only where they do not raise the output error of "
                                  "each window's first token (the attention sink) above min-max groups' (GPTQ runs "
                                  "both; the search damaged qwen2's sink).", "bool")
    sink_protect: bool = opt(False, "the range search clips no weight of an input where each window's first token "
                                    "(the attention sink) is 32x louder than the other tokens (qwen2's sink "
                                    "channel; off by default: it did not recover qwen2's loss).", "bool")

    def __post_init__(self):
        super().__post_init__()
        if self.target_bits is not None and self.weak_columns is not None:
            raise EdgequantError("pass either --target-bits or --weak-columns, not both")
        from ..budget import check_width_budget   # budget.py imports this module
        check_width_budget(self.width_budget, "--width-budget", "--method owq")
        self.refuse_unless(self.width_budget is not None, ("budget_metric",), "--width-budget")
        self.refuse_unless(self.clip_search, ("clip_metric", "clip_qk", "clip_up", "clip_v", "sink_guard",
                                              "sink_protect"),
                           "--clip-search")


@dataclass
class OmniConfig(Options):
    """OmniQuant settings; defaults are the paper's weight-only LLaMA recipe (LWC only, 20 epochs, AdamW)."""
    lwc: bool = opt(True, "learnable weight clipping.", "bool")
    let: bool = opt(False, "learnable equivalent transformation.", "bool")
    epochs: int = opt(20, "epochs per block (0 keeps the initial clipping: min-max round to nearest).", "int", lo=0, hi=MAX_EPOCHS)
    lwc_lr: float = opt(1e-2, "LWC learning rate.", "float", lo=0, lo_open=True, hi=MAX_LR)
    let_lr: float = opt(5e-3, "LET learning rate.", "float", lo=0, lo_open=True, hi=MAX_LR)
    let_alpha: float = opt(0.5, "SmoothQuant-style LET init exponent.", "float", lo=0, hi=1)
    aug_loss: bool = opt(False, "also match the fp block fed quantized inputs.", "bool")
    block_target: str = opt("fp", "what each block is trained to reproduce: 'fp' (the paper: the fp block on the fp "
                            "stream, so the loss also holds the error the earlier blocks passed on through the "
                            "residual, which clipping cannot undo) or 'local' (the fp block on the quantized stream: "
                            "this block's own error only, as GPTQ measures it).", "choice", choices=("fp", "local"))
    lwc_init: float | str = opt(4.0, "initial clipping strength (paper 4.0) or 'search' (activation-aware clip "
                                     "search; better when few epochs fit).", "float|search", lo=-MAX_LWC_INIT,
                                hi=MAX_LWC_INIT)
    let_pairs: tuple = opt(("qkv", "fc1", "vo", "qk", "down"), "LET pairs to learn.", "tuple", cli=False)
    batch_size: int = opt(4, "calibration windows per step (from the shared --batch-size).", "int", lo=1, cli=False)
    seed: int = opt(0, "seed (from the shared --seed).", "int", lo=0, hi=MAX_SEED, cli=False)
    loss: str = opt("mse", "block loss, the paper's 'mse' or 'token_rel' (each token relative to its size).",
                    "choice", choices=("mse", "token_rel"))
    owq_target_bits: float | None = opt(None, "choose OWQ weak columns first (kept fp16), LWC/LET learned on the "
                                              "rest.", "float", lo=0, lo_open=True)
    clip_qk: bool = opt(True, "with --lwc-init search, also search q/k's ranges (off: they start unclipped, as "
                              "their outputs feed softmax).", "bool")
    clip_up: bool = opt(True, "with --lwc-init search, also search a gated MLP's up projection (off: it starts "
                              "unclipped).", "bool")
    lwc_init_metric: str = opt("output", "with --lwc-init search, what that search minimises: 'output' (squared "
                                         "error weighted by each input's E[x^2]) or 'product' (gate's and up's "
                                         "squared error in the MLP's output act(gate) * up).", "choice",
                               choices=("output", "product"))
    gptq: bool = opt(False, "round with GPTQ inside the learned ranges (LWC's scales and zero points fixed, GPTQ's "
                            "error compensation on each block's quantized stream) instead of to nearest.", "bool")
    keep_best: bool = opt(True, "score the start and every epoch on all windows and keep the best parameters.",
                          "bool")
    heldout: int = opt(0, "with --keep-best, the last this many calibration windows are never trained on; the start "
                          "and every epoch are scored on them alone (an early stop against fitting the training "
                          "windows; 0: score on all windows).", "int", lo=0)
    percdamp: float = opt(0.01, "--gptq rounding's Hessian damping (from the shared --percdamp).", "float", lo=0,
                          hi=1, lo_open=True, cli=False)
    act_order: bool = opt(True, "--gptq rounding's column order (from the shared --act-order).", "bool", cli=False)

    def __post_init__(self):
        super().__post_init__()
        if self.epochs > 0 and not (self.lwc or self.let):
            raise EdgequantError("nothing to train: enable --lwc or --let, or pass --epochs 0")
        self.refuse_unless(self.let, ("let_lr", "let_alpha"), "--let")
        self.refuse_unless(self.lwc, ("lwc_lr", "lwc_init"), "--lwc")
        self.refuse_unless(self.epochs > 0, ("lwc_lr", "let_lr", "aug_loss", "loss", "keep_best", "block_target"),
                           "--epochs N (N > 0)")
        self.refuse_unless(self.epochs > 0 and self.keep_best, ("heldout",), "--epochs N (N > 0) and --keep-best")
        if self.aug_loss and self.block_target == "local":
            raise EdgequantError("--aug-loss adds the local target beside the fp one; with --block-target local it would "
                                 "count it twice: pass one of them")
        self.refuse_unless(self.lwc and self.lwc_init == "search", ("clip_qk", "clip_up", "lwc_init_metric"),
                           "--lwc-init search")

    @property
    def reads_data(self) -> bool:
        """Whether the calibration windows change the result: training, LET's initial scales, the range search,
        GPTQ's rounding and OWQ's column choice read them; `--epochs 0` without those keeps the initial clipping."""
        return self.epochs > 0 or self.let or self.gptq or self.lwc_init == "search" or self.owq_target_bits is not None

    def unread_note(self) -> str:
        """Why the shared calibration options are unread, for their refusal (`Method.check_shared`)."""
        return "" if self.reads_data else (" with --epochs 0 and nothing else that reads the calibration windows "
                                           "(--let, --gptq, --lwc-init search, --owq-target-bits)")

    def held_out(self) -> dict[str, int]:
        return {"--heldout": self.heldout} if self.epochs and self.keep_best else {}


@dataclass
class WCTConfig(Options):
    """Weak-column tuning (`tune-weak-columns`): training windows drawn from the task text, the last held out."""
    epochs: int = opt(1, "Passes over the training windows.", "int", lo=1, hi=MAX_EPOCHS)
    lr: float = opt(1e-4, "Adam learning rate.", "float", lo=0, lo_open=True, hi=MAX_LR)
    seqlen: int = opt(512, "Tokens per window.", "int", lo=1)
    nsamples: int = opt(64, "Training windows drawn from the text.", "int", lo=1)
    heldout: int = opt(8, "Held-out windows at the end of the text.", "int", lo=1)
    batch_size: int = opt(4, "Windows per step.", "int", lo=1, hi=MAX_WINDOW_TOKENS)
    seed: int = opt(0, "Seed for drawing the windows.", "int", lo=0, hi=MAX_SEED)
    device: str = opt("cpu", "cpu, cuda or cuda:N.", "device")

    def __post_init__(self):
        super().__post_init__()
        check_window_tokens(self.nsamples, self.seqlen)
