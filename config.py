"""One Config for every script.

Precedence, lowest to highest: the dataclass defaults (the `cpu` preset), `--preset=NAME`,
`--config=FILE.py` (a Python file assigning Config field names, as in nanoGPT), then
`--field=value` or `--field value` for any field the script reads (values parsed as Python
literals; a bare word is a string; bools also as `--flag` / `--no-flag`). `python SCRIPT.py
--help` lists the fields that script reads with their type, default and help, grouped as GROUPS.

    python train_safe.py --preset=paper --epochs=3 --data=../shared/datasets/ASD
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import math
import re
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, NoReturn


def _f(default: Any, help: str) -> Any:
    """A Config field with its --help text (declared here, not parsed from comments)."""
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    # what a user edits: the data, where the model goes, how long to train, how alarms are raised
    data: str = _f("Dataset/lab", "a split folder or a folder of entity folders")
    entities: str = _f("all", "'all' or a comma list of entity names")
    entity: str = _f("", "one entity: the target of --stage=local, or the one test.py evaluates")
    ckpt: str = _f("checkpoints/puad.ckpt", "the shared model; local files puad.local-<entity>.pt sit beside it")
    out_dir: str = _f("res_hr", "where test.py (and plots) write their outputs")
    epochs: int = _f(8, "stage 1 (global) epochs; the epoch of the lowest validation loss is kept")
    smooth: int = _f(5, "score = causal mean of the last N point scores, capped at the point's own plus the "
                        "calibration's largest (1 = off)")
    alarm_budget: float = _f(1.0, "false alarm events per entity per day the threshold aims at: SPOT's risk is "
                                  "budget x step / 1 day when the timestamps give the step (0 = --spot_q always)")
    alarm_hold: int = _f(2, "an alarm is raised once the score has been above the threshold for N points in a row "
                            "(Prometheus' for:): test.py's alarm events, detect_live.py's alerts")
    alarm_clear: int = _f(5, "an alarm ends once the score has been at or below the threshold for N points in a "
                             "row, so a series flapping around it keeps one alarm: test.py's alarm events, "
                             "detect_live.py's alerts (1 = at the first)")
    device: str = _f("auto", "auto | cpu | cuda | cuda:N")
    num_threads: int = _f(0, "torch CPU threads (0 = torch default)")
    seed: int = _f(0, "seed of training, sampling and the baselines")
    # data
    seq_len: int = _f(20, "sliding window (paper 4.1)")
    val_frac: float = _f(0.1, "fraction of each train series held out (validation and calibration)")
    val_blocks: int = _f(1, "held out as the last val_frac of each of N equal chunks (1 = the tail)")
    # model (the `cpu` preset: the paper's architecture scaled down)
    d_model: int = _f(64, "Transformer hidden size")
    n_heads: int = _f(4, "attention heads")
    n_layers: int = _f(3, "Transformer layers")
    d_ff: int = _f(128, "Transformer feed-forward size")
    d_h1: int = _f(128, "MLP h0 -> h1, and the hidden size of every Gaussian head (the decoder's too)")
    d_theta: int = _f(64, "theta0, theta1 and prototype dimension")
    n_global: int = _f(10, "K_g global prototypes beta_g")
    n_local: int = _f(2, "K_l local prototypes beta_l")
    sinkhorn_eps: float = _f(0.1, "entropic regularisation (costs are divided by sqrt(d_theta))")
    sinkhorn_iters: int = _f(100, "Sinkhorn iterations of a training batch's plan")
    ot_momentum: float = _f(0.1, "running prototype potentials used for scoring")
    dropout: float = _f(0.1, "dropout of the Transformer")
    min_std: float = _f(0.01, "floor of every Gaussian's standard deviation")
    # training
    stage: str = _f("both", "global | local | both")
    local_epochs: int = _f(3, "stage 2 (local) epochs")
    adapt_windows: int = _f(0, "use only the first N windows of each train series (0 = all)")
    batch_size: int = _f(256, "training windows per step")
    lr: float = _f(1e-3, "stage 1 learning rate (Adam)")
    local_lr: float = _f(1e-2, "stage 2 learning rate")
    rho1: float = _f(0.01, "weight of KL(q(theta1) || p(theta1 | theta0'))")
    rho2: float = _f(0.01, "weight of KL(q(theta0) || N(0, I))")
    rho3: float = _f(0.01, "weight of the OT loss")
    warmup_epochs: int = _f(3, "rho1..3 rise linearly from 0 over the first K epochs")
    grad_clip: float = _f(5.0, "gradient norm clip")
    max_train_windows: int = _f(0, "per epoch, a random subset of this many windows (0 = all)")
    resume: bool = _f(False, "continue stage 1 from <ckpt>.last.ckpt")
    # scoring and thresholds (scoring.py; docs/decisions.md for how they were chosen)
    score_floor: float = _f(0.1, "smallest residual scale of a feature (scaled units)")
    name_q: float = _f(0.9, "which metrics: each feature's contribution over its name_q quantile on the "
                            "calibration rows (0 = the contributions as scored)")
    repair_weight: float = _f(1.0, "which metrics: the weight of a feature's repair gain beside its own named "
                                   "contribution, both in log units (Scorer.explain; 0 = by the contribution)")
    latent_weight: float = _f(0.5, "latent term: theta0's mean distance to its 5 nearest among the entity's "
                                   "normal windows over its median on the calibration rows, times this (0 = off)")
    use_local: bool = _f(True, "apply the entity's local prototypes when adapted")
    min_calib_rows: int = _f(200, "an entity adapted from fewer rows than this is calibrated on the history's "
                                  "calibration rows stored in the checkpoint (docs/meta.md)")
    score_batch: int = _f(1024, "windows per scoring batch")
    score_mode: str = _f("point", "point: the window ending at each point | block: non-overlapping windows, each "
                                  "scores all its points (~seq_len x fewer passes, lower quality)")
    spot_q: float = _f(1e-2, "SPOT risk level where the step is unknown (timestamps that are row numbers)")
    spot_level: float = _f(0.98, "initial quantile of the peaks-over-threshold fit (lowered, to 0.5 at most, where "
                                 "fewer than 10 calibration scores lie above it)")
    level_window: float = _f(1800.0, "level gauges (features that moved < 10 % of their magnitude over train): "
                                     "centred on each window's mean in the model (training); scored on their "
                                     "rise above their mean over this many seconds before (a 60 s step where "
                                     "the timestamps give none; 0 = no level gauges / the window's own mean)")
    drift_window: int = _f(1000, "drift guard: the threshold rises by as much as the median of the last N scores "
                                 "stands above the calibration median (0 = fixed threshold)")
    # outputs
    loss_csv: str = _f("loss_metrics.csv", "training's per-epoch losses (plot_loss.py draws them)")
    plots: bool = _f(True, "write the PNG plots")

    def validate(self) -> "Config":
        """Raise ConfigError naming the first field out of its range (see CHECKS at the end)."""
        validate_config(self)
        return self


# the groups --help lists, in order: (title, the fields)
GROUPS: dict[str, tuple[str, ...]] = {
    "common": ("data", "entities", "entity", "ckpt", "out_dir", "epochs", "smooth", "alarm_budget", "alarm_hold",
               "alarm_clear", "device", "num_threads", "seed"),
    "data": ("seq_len", "val_frac", "val_blocks"),
    "model": ("d_model", "n_heads", "n_layers", "d_ff", "d_h1", "d_theta", "n_global", "n_local", "sinkhorn_eps",
              "sinkhorn_iters", "ot_momentum", "dropout", "min_std"),
    "training": ("stage", "local_epochs", "adapt_windows", "batch_size", "lr", "local_lr", "rho1", "rho2", "rho3",
                 "warmup_epochs", "grad_clip", "max_train_windows", "resume", "loss_csv"),
    "scoring and thresholds": ("score_floor", "name_q", "repair_weight", "latent_weight", "use_local",
                               "min_calib_rows", "score_batch", "score_mode", "spot_q", "spot_level",
                               "level_window", "drift_window", "plots"),
}
# what each kind of script reads (cli(reads=...)): its --help lists those, and only those are taken
TRAINS = GROUPS["common"] + GROUPS["data"] + GROUPS["model"] + GROUPS["training"] + ("score_batch", "score_mode",
                                                                                   "level_window")
SCORES = ("data", "entities", "entity", "ckpt", "out_dir", "smooth", "alarm_budget", "alarm_hold", "alarm_clear",
          "device", "num_threads", "seed", "val_frac", "val_blocks") + GROUPS["scoring and thresholds"]


PRESETS: dict[str, dict] = {
    "cpu": {},
    # Paper section 4.1. The paper gives prototypes dimension 256 and theta0 dimension 512, but
    # eq. 4 (theta0' = M x beta) and the cost ||theta0 - beta_j|| need them equal: both are 512.
    "paper": dict(d_model=512, n_heads=8, n_layers=3, d_ff=2048, d_h1=256, d_theta=512,
                  n_global=10, n_local=2, lr=2e-5, batch_size=256, epochs=50, warmup_epochs=10,
                  local_epochs=10, local_lr=1e-3),
    # tiny model for tests
    "test": dict(d_model=16, n_heads=2, n_layers=1, d_ff=32, d_h1=16, d_theta=8, epochs=2,
                 local_epochs=1, warmup_epochs=1, batch_size=64, plots=False),
}


class ConfigError(ValueError):
    pass


# ---- the command line: an argparse parser built from Config (its fields, types, defaults and the
# help declared with each field), so every script answers --help with the options it reads and
# takes --field=value, --field value, --flag / --no-flag and --flag=True|False.

class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # a ConfigError; cli() prints it as one line, exit code 2
        raise ConfigError(message)


class OneLineParser(argparse.ArgumentParser):
    """argparse for a script's own options (bench.py): a bad option is one line, exit code 2."""

    def error(self, message: str) -> NoReturn:
        cli_error(message)


def parse_bool(text: str) -> bool:
    """--flag=True|False (also 1/0, yes/no) for argparse."""
    value = _coerce("flag", text, False)
    return value


def _type_name(default) -> str:
    return type(default).__name__


def build_parser(prog: str | None = None, description: str | None = None, defaults: dict | None = None,
                 extra: Callable[[argparse.ArgumentParser], None] | None = None,
                 reads: tuple[str, ...] | None = None) -> argparse.ArgumentParser:
    """The parser of a Config script: --preset and --config (when it reads a model field, or
    all), one option per field it reads (`reads`; None = every field), in GROUPS' order, then the
    script's own options (extra(parser) adds them)."""
    wanted = set(f.name for f in fields(Config)) if reads is None else set(reads)
    shown = dict(PRESETS["cpu"], **(defaults or {}))
    by_name = {f.name: f for f in fields(Config)}
    presets = bool(wanted & set(GROUPS["model"]))
    parser = _Parser(prog=prog, description=description, allow_abbrev=False,
                     usage="%(prog)s [-h]" + (" [--preset=NAME] [--config=FILE.py]" if presets else "") + " [--field=value ...]",
                     formatter_class=argparse.RawDescriptionHelpFormatter,
                     epilog="Precedence, lowest to highest: the defaults, --preset, --config, --field. "
                            "Values are Python literals (a bare word is a string); the range checks at "
                            "the end of config.py apply.")
    if presets:  # a script that builds a model takes presets and config files
        base = parser.add_argument_group("run")
        base.add_argument("--preset", default=argparse.SUPPRESS, metavar="NAME",
                          help=f"one of {', '.join(PRESETS)} (default: cpu)")
        base.add_argument("--config", default=argparse.SUPPRESS, metavar="FILE.py",
                          help="a Python file assigning Config field names (as in nanoGPT)")
    for group, names in GROUPS.items():
        names = [n for n in names if n in wanted]
        section = parser.add_argument_group(group) if names else None
        for name in names:
            f = by_name[name]
            default = shown.get(name, f.default)
            kind = "bool: --{0} / --no-{0}".format(name) if isinstance(f.default, bool) else _type_name(f.default)
            help_text = f"{f.metadata.get('help', '')} [{kind}, default {default!r}]".strip().replace("%", "%%")
            if isinstance(f.default, bool):
                section.add_argument(f"--{name}", nargs="?", const=True, default=argparse.SUPPRESS,
                                     metavar="BOOL", help=help_text)
                section.add_argument(f"--no-{name}", dest=name, action="store_const", const=False,
                                     default=argparse.SUPPRESS, help=argparse.SUPPRESS)
            else:
                section.add_argument(f"--{name}", default=argparse.SUPPRESS,
                                     metavar=_type_name(f.default).upper(), help=help_text)
    if extra is not None:
        extra(parser)
    return parser


def _coerce(name: str, value, default):
    kind = type(default)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
    elif kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif kind is str:
        return str(value)
    raise ConfigError(f"--{name}: expected {kind.__name__}, got {value!r}")


def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word such as --device=cpu is a string


def _value(name: str, raw, default):
    """A command-line value: a Python literal (a bare word is a string); for a string field only
    a quoted literal is evaluated, so --entities=1,2 stays the text '1,2'."""
    if isinstance(raw, str) and not isinstance(default, str):
        raw = _literal(raw)
    elif isinstance(raw, str) and raw[:1] in "'\"" and len(raw) > 1 and raw[-1] == raw[0]:
        raw = _literal(raw)
    return _coerce(name, raw, default)


@dataclass
class CLI:
    """A parsed command line: the Config, the fields a preset, config file or option set, and
    the script's own options (extra)."""
    cfg: "Config"
    given: set[str]
    opts: argparse.Namespace


def parse_cli(argv: list[str] | None = None, defaults: dict | None = None, check: bool = True,
              prog: str | None = None, description: str | None = None,
              extra: Callable[[argparse.ArgumentParser], None] | None = None,
              reads: tuple[str, ...] | None = None) -> CLI:
    """Parse a command line (see the module docstring); raises ConfigError. `defaults`: the
    script's own defaults, below --preset; `reads`: the fields the script takes (None = all);
    check=False skips the range checks."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(prog, description, defaults, extra, reads)
    ns, unknown = parser.parse_known_args(argv)
    if unknown:
        arg = unknown[0]
        if arg.startswith("--"):
            name = arg.split("=", 1)[0]
            known = name[2:].removeprefix("no-") in {f.name for f in fields(Config)}
            raise ConfigError(f"unknown option {name}" + (f" ({prog or 'this script'} does not read it)" if known
                                                          else " (not a Config field)"))
        raise ConfigError(f"unexpected argument {arg!r}")
    ns = vars(ns)
    names = {f.name: f.default for f in fields(Config)}
    preset, config_file = ns.pop("preset", "cpu"), ns.pop("config", None)
    flags = {k: ns.pop(k) for k in list(ns) if k in names}
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    values = dict(defaults or {})
    values.update(PRESETS[preset])
    given = set(PRESETS[preset])
    if config_file:
        scope: dict = {}
        try:
            with open(config_file) as fh:
                exec(compile(fh.read(), config_file, "exec"), scope)
        except OSError as e:
            raise ConfigError(f"{config_file}: cannot read config file ({e.strerror})") from None
        for key, value in scope.items():
            if key.startswith("_") or callable(value) or type(value).__name__ == "module":
                continue
            if key not in names:
                raise ConfigError(f"{config_file}: unknown Config field {key!r}")
            values[key] = value
            given.add(key)
    values = {k: _coerce(k, v, names[k]) for k, v in values.items()}
    values.update({k: _value(k, v, names[k]) for k, v in flags.items()})
    given |= set(flags)
    cfg = Config(**values)
    return CLI(cfg.validate() if check else cfg, given, argparse.Namespace(**ns))


def parse_config(argv: list[str] | None = None, defaults: dict | None = None, check: bool = True) -> Config:
    """The effective Config of a command line (see parse_cli); raises ConfigError."""
    return parse_cli(argv, defaults, check).cfg


def config_from_dict(d: dict) -> Config:
    """Rebuild a Config stored in a checkpoint; fields added since are left at their defaults."""
    names = {f.name for f in fields(Config)}
    return Config(**{k: v for k, v in d.items() if k in names}).validate()


def changed_fields(cfg: Config) -> dict[str, Any]:
    """The fields of cfg that differ from Config's defaults."""
    default = Config()
    return {k: v for k, v in dataclasses.asdict(cfg).items() if getattr(default, k) != v}


def print_config(cfg: Config, extra: dict[str, Any] | None = None) -> None:
    """The effective config as the fields that differ from the defaults (the whole config goes
    into the checkpoint and metrics.json), then a script's own options that differ from theirs
    (`extra`: detect_live.py's), credentials in URLs redacted (prometheus.redact_url)."""
    from prometheus import redact_url  # the one rule for a URL in a log (prometheus.py imports requests)
    changed = {**changed_fields(cfg), **(extra or {})}
    print("config:", ", ".join(f"{k}={redact_url(repr(v))}" for k, v in changed.items()) if changed else "the defaults",
          flush=True)


def cli(argv: list[str] | None = None, defaults: dict | None = None, description: str | None = None,
        extra: Callable[[argparse.ArgumentParser], None] | None = None, show: bool = True,
        reads: tuple[str, ...] | None = None) -> CLI:
    """parse_cli for scripts: --help prints the options the script reads (`reads`) and exits 0; a
    bad option is a one-line error and exit code 2; show=True prints the effective config."""
    prog = Path(sys.argv[0]).name
    try:
        parsed = parse_cli(argv, defaults, prog=prog, description=description, extra=extra, reads=reads)
    except ConfigError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2)
    if show:
        print_config(parsed.cfg)
    return parsed


def cli_config(argv: list[str] | None = None, defaults: dict | None = None,
               description: str | None = None, reads: tuple[str, ...] | None = None) -> Config:
    """cli() for a script with no options of its own: the Config."""
    return cli(argv, defaults, description, reads=reads).cfg


def cli_error(message: str) -> NoReturn:
    """A script's own option error: one line, exit code 2."""
    print(f"{Path(sys.argv[0]).name}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


# ---- range checks: one entry per field, {field: (ok(value) -> bool, allowed values in words)}.
# Every float must also be finite. Cross-field checks are in validate_config below.

def _choice(*allowed: str):
    return (lambda v: v in allowed), "one of " + " | ".join(allowed)


_pos = (lambda v: v >= 1), ">= 1"
_nonneg = (lambda v: v >= 0), ">= 0"
_positive = (lambda v: v > 0), "> 0"
_nonempty = (lambda v: v.strip() != ""), "a non-empty string"

CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "data": _nonempty, "entities": _nonempty,
    "seq_len": _pos,
    "val_frac": ((lambda v: 0 <= v < 1), "in [0, 1)"), "val_blocks": _pos,
    "d_model": _pos, "n_heads": _pos, "n_layers": _pos, "d_ff": _pos, "d_h1": _pos, "d_theta": _pos,
    "n_global": _pos, "n_local": _pos,
    "sinkhorn_eps": _positive, "sinkhorn_iters": _pos,
    "ot_momentum": ((lambda v: 0 < v <= 1), "in (0, 1]"),
    "dropout": ((lambda v: 0 <= v < 1), "in [0, 1)"),
    "min_std": _positive,
    "stage": _choice("global", "local", "both"),
    "epochs": _pos, "local_epochs": _pos, "adapt_windows": _nonneg,
    "min_calib_rows": _nonneg,
    "batch_size": _pos, "lr": _positive, "local_lr": _positive,
    "rho1": _nonneg, "rho2": _nonneg, "rho3": _nonneg, "warmup_epochs": _nonneg,
    "grad_clip": _positive, "max_train_windows": _nonneg,
    "score_batch": _pos,
    "score_mode": _choice("point", "block"),
    "score_floor": _positive,
    "smooth": _pos, "latent_weight": _nonneg, "repair_weight": _nonneg, "name_q": ((lambda v: 0 <= v < 1), "in [0, 1)"),
    "spot_q": ((lambda v: 0 < v < 1), "in (0, 1)"), "alarm_budget": _nonneg, "alarm_hold": _pos, "alarm_clear": _pos,
    "spot_level": ((lambda v: 0 < v < 1), "in (0, 1)"),
    "drift_window": _nonneg, "level_window": _nonneg,
    "ckpt": _nonempty, "loss_csv": _nonempty, "out_dir": _nonempty,
    "device": ((lambda v: re.fullmatch(r"auto|cpu|cuda(:\d+)?", v) is not None), "auto | cpu | cuda | cuda:N"),
    "num_threads": _nonneg,
}


def check_fields(obj: Any, checks: dict[str, tuple[Callable[[Any], bool], str]]) -> None:
    """Raise ConfigError naming the first field of a dataclass (a Config, detect_live.py's
    options) out of its range: every float finite, each field in `checks` ok."""
    for f in fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"--{f.name}={value!r}: must be a finite number")
        if f.name in checks:
            ok, allowed = checks[f.name]
            if not ok(value):
                raise ConfigError(f"--{f.name}={value!r}: must be {allowed}")


def validate_config(cfg: Config) -> None:
    check_fields(cfg, CHECKS)
    if cfg.d_model % cfg.n_heads:
        raise ConfigError(f"--d_model={cfg.d_model}: must be divisible by --n_heads={cfg.n_heads}")
