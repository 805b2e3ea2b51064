"""The one typed training config, shared by train.py, multipliers.py and the benchmarks.

Values come from the dataclass defaults, then config files (plain Python assigning config keys, e.g.
config/train_gpt2.py), then `--key=value` overrides, in command-line order. Unknown keys and values of
the wrong type fail with a message naming the file or flag. `--help` lists every key with its comment.
"""

import dataclasses
import difflib
import math
import re
import runpy
import sys
import traceback
import types
from dataclasses import dataclass

from optimizers.registry import OPTIMIZERS
from runtime.errors import UserError


class ConfigError(UserError):
    """A config file or flag that names an unknown key, has a wrong type or an inconsistent value."""

    same_on_every_rank = True


INIT_MODES = ("auto", "resume", "scratch")  # init_from's values other than a pretrained directory
# lwlr.py's measurement inits and baseline rules, named here so that parsing a config needs no torch.
MEASUREMENT_INITS = ("fan_out", "fan_in", "model")
BASELINES = ("depth_increasing", "depth_decreasing", "fan_in", "blockwise")
# The rules whose multipliers come from lwlr's measurement at init (its T, init, power, cache and lwlr_file):
# lwlr itself, and lwlr_matrices (lwlr.lwlr_matrices_multipliers: lwlr among the blocks' weight matrices, fan_in
# for the embeddings, biases and LayerNorms).
MEASURED_RULES = ("lwlr", "lwlr_matrices")

FLOAT32_MAX = 3.4028234663852886e38


def key(default, help: str):
    """A config key: its default, and what it means (`--help` prints it)."""
    return dataclasses.field(default=default, metadata={"help": help})


def choice(*allowed, help: str):
    """A string key that must be one of `allowed`; the first is the default (unless given twice)."""
    return dataclasses.field(default=allowed[0], metadata={"choices": tuple(dict.fromkeys(allowed)), "help": help})


def registered(registry: dict, default: str, help: str):
    """A string key that must name an entry of `registry`, read live: what is registered when the config
    is checked is what it may name (`--help` lists each entry with its summary)."""
    return dataclasses.field(default=default, metadata={"choices": registry.keys(), "registry": registry, "help": help})


def at_least(minimum, default, help: str):
    """A number key that must be >= minimum; a float must also be finite and fit float32, as the kernels
    and optimizer states hold it (a larger value overflows at step 0)."""
    return dataclasses.field(default=default, metadata={"minimum": minimum, "help": help})


@dataclass
class TrainConfig:
    # One key a line or two with its meaning beside it, as --help prints them: kept out of the formatter.
    # fmt: off
    # I/O
    out_dir: str = key("out", "checkpoints (step-XXXXXXXX/), log.jsonl, config.json")
    init_from: str = key("auto", "auto (resume when out_dir holds a checkpoint) | resume | scratch | PATH of a local "
                         "Hugging Face GPT-2 directory to fine-tune")
    eval_only: bool = key(False, "evaluate val and train loss over eval_steps batches of the model init_from names (a "
                          "directory) or out_dir's newest checkpoint; write only a log record (eval.py)")
    # data
    dataset: str = key("shakespeare", "reads data/<dataset>/{train,val}.bin (python -m data.<dataset>.prepare "
                       "writes them)")
    data_dir: str = key("", "a folder holding train.bin and val.bin instead (\"\" = data/<dataset>)")
    data_subset_batches: int = at_least(0, 0, help="0 = sample the whole training set; K > 0 cycles through K fixed "
                                                    "batches")
    # model
    model: str = key("gpt2-mini", "a preset of model.PRESETS: gpt2, gpt2-medium, gpt2-large, gpt2-xl (GPT-2's), "
                     "gpt2-mini, gpt2-tiny, narrow-N (small ones)")
    block_size: int = at_least(0, 128, help="sequence length; at most the preset's block_size (0 = the preset's)")
    dropout: float = at_least(0.0, 0.0, help="0 for pretraining")
    residual_scale: bool = key(False, "scale both residual branches of every block by 1/sqrt(n_layer)")
    loss_chunk_rows: int = at_least(0, 512, help="output layer + loss this many rows at a time, never the full logits "
                                    "(faster on CPU, model.LinearCrossEntropy); 0 = full logits")
    # batch: tokens_per_step = micro_batch_size * block_size * grad_accum * world_size
    micro_batch_size: int = at_least(1, 16, help="sequences per forward/backward on one device")
    tokens_per_step: int = at_least(1, 2048, help="tokens per optimizer step over all ranks; sets grad_accum")
    # optimizer
    optimizer: str = registered(OPTIMIZERS, "adamw", help="an optimizer of optimizers/registry.py, each below")
    optimizer_backend: str = choice("auto", "triton", "torch",
                                    help="auto (triton on CUDA once its self-check passes, torch elsewhere) | triton | "
                                         "torch")
    kernel_check: str = choice("auto", "force", "off",
                               help="self-check the optimizer's Triton kernels against its torch path before the first "
                                    "step (optimizers/self_check.py): auto (on CUDA; a pass is cached) | force (also "
                                    "on a CPU under TRITON_INTERPRET=1, where auto then means triton) | off")
    lr: float = at_least(0.0, 2e-3, help="peak learning rate of the global schedule (the small default model takes a "
                         "large one); sgdm_lw, adamw_lw: it scales their step sizes (try 1.0)")
    min_lr: float = at_least(0.0, 2e-4, help="end of the cosine decay (nanoGPT: lr / 10)")
    weight_decay: float = at_least(0.0, 0.1, help="decoupled; applied to matrices and embeddings, not to biases and "
                                   "LayerNorms")
    beta1: float = key(0.9, "also sgdm_lw's momentum")
    beta2: float = key(0.95, "nanoGPT's GPT-2 value (0.999 is unstable at this scale)")
    eps: float = at_least(0.0, 1e-8, help="AdamW, Adam-mini, AdamW-LW")
    rho: float = at_least(0.0, 0.05, help="SophiaG's clipping scale (Sophia's GPT-2 small value)")
    adamw_lr: float = at_least(0.0, 0.0, help="muon: the AdamW part's peak rate (embeddings, output layer, "
                               "LayerNorms, biases) on the same schedule; 0 = lr")
    muon_momentum: float = key(0.95, "muon: the Muon part's Nesterov momentum (torch.optim.Muon's and the "
                               "speedrun's 0.95)")
    muon_ns_dtype: str = choice("bfloat16", "float32", help="muon: Newton-Schulz's precision; bfloat16 is "
                                "torch.optim.Muon's and the speedrun's, float32 the same iteration where bf16 is "
                                "slow (a CPU without native bf16: 14-36x)")
    hess_interval: int = at_least(1, 10, help="SophiaG: refresh the Hessian estimate every this many steps "
                                              "(Sophia's k)")
    grad_clip: float = at_least(0.0, 1.0, help="clip the global gradient norm to this; 0 = off")
    max_bad_steps: int = at_least(1, 10, help="stop after this many consecutive steps with a non-finite loss or "
                                  "gradient (each is skipped)")
    # LW-AS (optimizers/lwas.py), optimizer=sgdm_lw | adamw_lw: per-layer step sizes from the curvature along each
    # layer's direction
    lw_curvature: str = choice("gauss_newton", "rademacher", "exact",
                               help="gauss_newton (sampled labels, one backward) | rademacher (one Hessian-vector "
                                    "product) | exact (one per layer: small models)")
    lw_interval: int = at_least(1, 5, help="refresh the step sizes every this many steps")
    lw_beta: float = key(0.5, "EMA of the curvature, g.d and |d|^2 over refreshes")
    lw_warmup_steps: int = at_least(0, 10, help="steps at lw_warmup_lr before the curvature sets the step "
                                                "sizes")
    lw_warmup_lr: float = at_least(0.0, 0.0, help="the warmup's rate at the schedule's peak; 0 = the optimizer's "
                                                   "(under optimizer above)")
    lw_alpha_max: float = at_least(0.0, 0.0, help="cap on a layer's step size; 0 = the optimizer's (under "
                                                   "optimizer above)")
    lw_damping: float = at_least(0.0, 1e-8, help="delta^2 = max(d.C.d, 0) + lw_damping * |d|^2")
    lw_joint_rescale: bool = key(True, "shrink all step sizes when the joint step overshoots (one more curvature "
                                 "product per refresh)")
    lw_micro_batch_size: int = at_least(0, 0, help="sequences in the curvature pass (a double backward needs more "
                                        "memory); 0 = micro_batch_size")
    # schedule
    schedule: str = choice("cosine", "constant",
                           help="cosine (linear warmup, cosine to min_lr) | constant (warmup, then lr)")
    warmup_steps: int = at_least(0, 30, help="linear warmup from lr / warmup_steps")
    max_steps: int = at_least(0, 200, help="optimizer steps in the run")
    lr_decay_steps: int = at_least(0, 0, help="the cosine reaches min_lr here; 0 = max_steps")
    # layer-wise learning rates (lwlr.py, multipliers.py)
    lr_rule: str = choice(*MEASURED_RULES, "single", *BASELINES,
                          help="lwlr (measured at init, the paper's) | lwlr_matrices (lwlr's measured rates among "
                               "the blocks' weight matrices, fan_in's for embeddings, biases and LayerNorms) | single "
                               "(one rate for every layer) | a baseline of lwlr.baseline_multipliers: "
                               f"{' | '.join(BASELINES)} (Blockwise LR, ICML 2025: embeddings 10, q k 8, MLP 6, v "
                               "attn_out 4, LayerNorms 1)")
    lwlr_T: int = at_least(1, 100, help="batches the gradient magnitude is averaged over (the paper's T)")
    lwlr_init: str = choice("fan_out", *MEASUREMENT_INITS,
                            help="measurement init: fan_out (the paper's) | fan_in | model (the training init)")
    lwlr_power: float = at_least(0.0, 0.5, help="multiplier = (mean |g|)^-power, the paper's 1/2")
    lwlr_file: str = key("", "read multipliers from this lwlr.json instead of measuring")
    lwlr_cache_dir: str = key("auto", "reuse multipliers measured with identical settings from here (auto = "
                              "$XDG_CACHE_HOME/lwlr or ~/.cache/lwlr); none = always measure")
    lwlr_scale_decay: bool = key(True, "the multiplier scales the weight decay too (as a per-layer lr would)")
    # evaluation, logging, checkpoints
    eval_interval: int = at_least(1, 50, help="evaluate on val (and checkpoint) every this many steps, and at the end")
    eval_steps: int = at_least(1, 20, help="batches per evaluation, the same fixed batches every time")
    log_interval: int = at_least(1, 10, help="one log line every this many steps")
    layer_stats_interval: int = at_least(0, 20, help="every this many steps, each tensor's gradient, weight and "
                                         "update RMS into out_dir/layers.jsonl (training/layer_stats.py); 0 = off")
    keep_last: int = at_least(2, 2, help="complete checkpoints kept (>= 2, so one survives a crash during a save)")
    logger: str = choice("none", "wandb", "tensorboard", help="none | wandb | tensorboard (if installed)")
    wandb_project: str = key("lwlr", "the wandb project of logger=wandb")
    # system
    device: str = key("auto", "auto (cuda if present, else cpu) | cpu | cuda | cuda:N")
    dtype: str = choice("auto", "bfloat16", "float32",
                        help="auto (bf16 autocast on CUDA and on CPUs with native bf16, AVX512-BF16 or AMX; else "
                             "fp32) | bfloat16 | float32")
    threads: int = at_least(0, 0, help="torch's CPU threads; 0 = OMP_NUM_THREADS if set, else every core (each "
                            "torchrun rank its share). Waiting threads sleep (OMP_WAIT_POLICY=PASSIVE, unless set)")
    dist_timeout: int = at_least(1, 600, help="seconds a collective waits for every rank before the run ends with the "
                                 "collective's name: a hung or dead rank (NCCL's own default, 600)")
    parallel: str = choice("ddp", "fsdp", help="under torchrun: ddp (a replica of the model per rank) | fsdp "
                           "(FSDP2: each rank holds 1/N of every parameter, gradient and optimizer state; "
                           "docs/distributed.md)")
    compile: str = choice("auto", "true", "false",
                          help="auto (on for CUDA; on a CPU where it repays its compile: a GPT-2-sized vocabulary and "
                               "200+ steps, training.build.compiles) | true | false: torch.compile the model")
    seed: int = at_least(0, 1337, help="model init and batch order")
    allow_resume_changes: str = key("", "keys a resume may change although they define the run, comma-separated "
                                    "(e.g. max_steps,lr_decay_steps to train a finished run further; data: other "
                                    "token files)")
    # fmt: on

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if "choices" in f.metadata and value not in f.metadata["choices"]:
                raise ConfigError(f"{f.name}={value!r}: choose one of {', '.join(f.metadata['choices'])}")
            minimum = f.metadata.get("minimum")
            out_of_range = minimum is not None and not (math.isfinite(value) and minimum <= value <= FLOAT32_MAX)
            if isinstance(value, float) and out_of_range:
                raise ConfigError(
                    f"{f.name}={value} must be a finite number >= {minimum:g} and at most {FLOAT32_MAX:.3g} (float32)"
                )
            if minimum is not None and value < minimum:
                raise ConfigError(f"{f.name}={value} must be >= {minimum}")
        # averages' decay rates and a probability: below 1
        for name in ("lw_beta", "beta1", "beta2", "dropout", "muon_momentum"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must lie in [0, 1)")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"device={self.device!r}: choose auto, cpu, cuda or cuda:N")
        for name in self.resume_changes_allowed():
            if name not in FIELDS and name != "data":
                raise ConfigError(f"allow_resume_changes: unknown key {name!r}; {suggestion(name)}see --help")
        if self.lw_micro_batch_size > self.micro_batch_size:
            raise ConfigError(
                f"lw_micro_batch_size={self.lw_micro_batch_size} exceeds micro_batch_size="
                f"{self.micro_batch_size}: the curvature pass uses part of a micro-batch"
            )

    def resume_changes_allowed(self) -> list[str]:
        return [name.strip() for name in self.allow_resume_changes.split(",") if name.strip()]

    # The keys a config file or flag set, as parse_config saw them: carried by dataclasses.replace, never
    # saved (as_dict), never set by a flag. A default can then give way where a setting implies another
    # (init_from=PATH: the directory's model).
    given: frozenset = dataclasses.field(default=frozenset(), compare=False, repr=False, metadata={"internal": True})

    def as_dict(self) -> dict:
        """Every key and its value, as config.json and a checkpoint save them."""
        return {name: getattr(self, name) for name in FIELDS}


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig) if not f.metadata.get("internal")}

# The keys that say only how or where a run executes, and why each may change when it resumes (resume.py
# reports the change). Every other key defines the optimization (the model, the optimizer and its
# hyperparameters, the schedule and its length, the rule, the seed that orders the batches, the
# precision): a resume that changes one is refused unless allow_resume_changes names it, since the run
# would no longer continue the one its checkpoint holds. The data's identity is checked by fingerprint.
MAY_CHANGE_ON_RESUME = {
    "out_dir": "a run may move",
    "init_from": "a resume starts from the checkpoint whatever it says",
    "eval_only": "an evaluation never trains",
    "dataset": "names where the data is; its fingerprint says what it is",
    "data_dir": "names where the data is; its fingerprint says what it is",
    "micro_batch_size": "tokens_per_step fixes the batch; accumulation follows",
    "loss_chunk_rows": "the same loss, computed in other chunks",
    "optimizer_backend": "the same update, computed by other code",
    "threads": "the same step, on more or fewer CPU threads",
    "kernel_check": "a check before the first step",
    "max_bad_steps": "when to give up, not what a step does",
    "lwlr_file": "a resume takes the multipliers from the checkpoint",
    "lwlr_cache_dir": "a resume takes the multipliers from the checkpoint",
    "eval_interval": "when to measure and save",
    "eval_steps": "how much to measure",
    "log_interval": "when to report",
    "layer_stats_interval": "when to report",
    "keep_last": "what to keep",
    "logger": "where to report",
    "wandb_project": "where to report",
    "device": "where to compute",
    "dist_timeout": "how long to wait for a rank",
    "compile": "the same model, compiled or not",
    "parallel": "the same step, sharded or replicated: checkpoints hold full tensors",
    "allow_resume_changes": "what this resume may change",
}


def help_text() -> str:
    rows = []
    for name, f in FIELDS.items():
        fixed = "" if name in MAY_CHANGE_ON_RESUME else " [fixed on resume]"
        rows.append(f"  --{name}={f.default!r}  {f.metadata['help']}{fixed}")
        if "registry" in f.metadata:  # each entry with its summary (importing the entries: torch)
            from optimizers.registry import spec

            rows += [f"      {entry}: {spec(entry).summary}" for entry in f.metadata["registry"]]
    return "usage: [config/FILE.py ...] [--key=value ...]\n\nkeys:\n" + "\n".join(rows)


# nanoGPT's config names, which its users type from habit, and what each is called here.
NANOGPT_NAMES = {
    "max_iters": "max_steps",
    "learning_rate": "lr",
    "batch_size": "micro_batch_size",
    "gradient_accumulation_steps": "tokens_per_step (the global batch in tokens, batch_size * block_size * "
    "gradient_accumulation_steps * processes; the accumulation follows from it)",
    "eval_iters": "eval_steps",
    "warmup_iters": "warmup_steps",
    "lr_decay_iters": "lr_decay_steps",
    "decay_lr": "schedule (decay_lr=False is schedule=constant)",
    "wandb_log": "logger (wandb_log=True is logger=wandb)",
    "always_save_checkpoint": "eval_interval (every evaluation saves a checkpoint)",
    "n_layer": "model (a preset of model.py sets n_layer, n_head and n_embd)",
    "n_head": "model (a preset of model.py sets n_layer, n_head and n_embd)",
    "n_embd": "model (a preset of model.py sets n_layer, n_head and n_embd)",
}


def suggestion(unknown: str) -> str:
    """'did you mean ...? ' for an unknown key: nanoGPT's name for one of ours, or the closest key."""
    if unknown in NANOGPT_NAMES:
        return f"nanoGPT's {unknown} is {NANOGPT_NAMES[unknown]} here; "
    close = difflib.get_close_matches(unknown, FIELDS, n=1, cutoff=0.6)
    return f"did you mean {close[0]}? " if close else ""


def coerce(key: str, value, source: str):
    """value (a string from the command line, or a Python value from a file) as the field's type."""
    if key not in FIELDS:
        raise ConfigError(f"{source}: unknown config key {key!r}; {suggestion(key)}see --help for the keys")
    kind = FIELDS[key].type
    if isinstance(value, str) and kind is not str:
        text = value.strip()
        if kind is bool:
            if text.lower() not in ("true", "false", "1", "0"):
                raise ConfigError(f"{source}: {key} must be true or false, got {value!r}")
            return text.lower() in ("true", "1")
        try:
            return kind(text)
        except ValueError:
            raise ConfigError(f"{source}: {key} must be {kind.__name__}, got {value!r}") from None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is not kind:
        raise ConfigError(f"{source}: {key} must be {kind.__name__}, got {type(value).__name__} {value!r}")
    return value


def load_config_file(path: str) -> dict:
    """Run a config file in its own namespace and return its config assignments."""
    try:
        namespace = runpy.run_path(path)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except SyntaxError as e:
        raise ConfigError(f"config file {path}, line {e.lineno}: syntax error: {e.msg}") from None
    except Exception as e:  # a config file is plain assignments; anything it raises is the file's error
        frames = reversed(traceback.extract_tb(e.__traceback__))
        line = next((frame.lineno for frame in frames if frame.filename == path), "?")
        raise ConfigError(f"config file {path}, line {line}: {type(e).__name__}: {e}") from None
    return {
        key: coerce(key, value, path)
        for key, value in namespace.items()
        if not key.startswith("_") and not isinstance(value, (types.ModuleType, types.FunctionType, type))
    }


def parse_config(argv: list[str] | None = None, base: TrainConfig | None = None) -> TrainConfig:
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        print(help_text())
        sys.exit(0)
    values = (base or TrainConfig()).as_dict()
    given = set(base.given) if base else set()
    for arg in argv:
        if arg.startswith("--"):
            key, sep, value = arg[2:].partition("=")
            if not sep:
                raise ConfigError(f"flag {arg!r} must be written --key=value")
            values[key] = coerce(key, value, f"flag {arg}")
            given.add(key)
        elif arg.endswith(".py"):
            from_file = load_config_file(arg)
            values.update(from_file)
            given.update(from_file)
        else:
            raise ConfigError(f"argument {arg!r} is neither a config file (*.py) nor a --key=value flag")
    return TrainConfig(**values, given=frozenset(given))
