"""The ``tide`` command line: one subcommand per stage, each driven by its config dataclass.

Every subcommand takes ``--config file.yaml`` (keys = the dataclass fields) and a flag per field;
flags override the YAML. Errors print one line and exit with status 2.

Start-up stays light: the command table names each config class by its import path, and only the
command being run (or asked for ``--help``) imports its stage; ``tide --help`` imports no stage.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from dataclasses import dataclass
from typing import Callable, Sequence

from tide.config import add_arguments, from_args
from tide.errors import TideError


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    config: str | type
    """The config dataclass, or its import path ``module:Class`` (imported only when the command runs)."""
    run: Callable

    @property
    def config_cls(self) -> type:
        if isinstance(self.config, type):
            return self.config
        module, name = self.config.split(":")
        return getattr(importlib.import_module(module), name)


def _hooks(config) -> int:
    from tide.config import resolve_backbone_path

    resolve_backbone_path(config.backbone)  # a bad name costs no model imports
    from tide.hooks import HookedBackbone, HookName

    backbone = config.load_backbone()
    hooked = HookedBackbone.of(backbone)
    shapes = hooked.hook_shapes()
    print(f"# {backbone.family} backbone '{backbone.name}': {len(hooked.block_specs)} blocks, "
          f"d_model={backbone.d_model}, {backbone.num_tokens} image tokens "
          f"({'x'.join(map(str, backbone.patch_grid))} patches"
          f"{': frames x rows x cols, token = (frame * rows + row) * cols + col' if backbone.is_video else ''})")
    names = backbone.condition_names
    print(f"# conditions (--classes ids): " + ", ".join(f"{i}={n}" for i, n in enumerate(names[:20]))
          + (", ..." if len(names) > 20 else ""))
    if backbone.vocabulary is not None:
        print(f"# prompts as text (--prompts 'dark trouser; large bag'), at most one word per group: "
              + "; ".join(f"{g}: {', '.join(w)}" for g, w in backbone.vocabulary.groups.items()))
    width = max(map(len, hooked.hook_names))
    for name in hooked.hook_names:
        spec = hooked.block_specs[HookName.parse(name).block]
        print(f"{name:<{width}}  {str(tuple(shapes[name])):<14}  {spec.kind}")
    return 0


def _sample(config) -> int:
    import time

    from tide.sampling import generate_grid

    start = time.perf_counter()
    out, path = generate_grid(config)
    print(f"wrote {path} ({len(out.images)} samples in {time.perf_counter() - start:.1f} s)")
    return 0


def _capture(config) -> int:
    from tide.capture import capture

    result = capture(config)
    rank = int(__import__("os").environ.get("RANK", "0"))
    if rank == 0:
        print(f"captured {result.rows:,} rows in {result.shards} shards -> {result.path} (complete: {result.complete})")
    return 0


@dataclass
class DataConfig:
    """`tide data info|verify DIR`: summarise or check a captured dataset."""

    dir: str = ""
    """Dataset directory (with manifest.json)."""
    hashes: bool = True
    """verify: recompute every shard's SHA-256."""
    scan: bool = True
    """verify: scan every activation for NaN/inf."""


def _data(action: str):
    def run(config: DataConfig) -> int:
        from tide.data import ActivationStore

        if not config.dir:
            raise TideError("give the dataset directory: tide data info DIR")
        if action == "info":
            print(ActivationStore(config.dir).format_info())
            return 0
        report = ActivationStore(config.dir, strict=False).verify(check_hashes=config.hashes, scan=config.scan)
        print(report.format())
        return 0 if report.ok else 1
    return run


def _train(config) -> int:
    from tide.train import train

    result = train(config)
    if int(__import__("os").environ.get("RANK", "0")) == 0:
        print(f"trained {', '.join(result.saes)} for {result.steps} steps "
              f"({result.vectors_per_s:,.0f} vectors/s) -> {config.out}")
    return 0


def _eval(config) -> int:
    from pathlib import Path

    from tide.eval.report import evaluate

    result = evaluate(config)
    overall = result.report["reconstruction"]["overall"]
    print(f"FVU {overall['fvu']:.4f}, L0 {overall['l0']:.1f}, dead {overall['dead_fraction']:.1%} "
          f"-> {Path(config.out) / 'eval.json'}, {Path(config.out) / 'eval.png'}")
    return 0


def _stats(config) -> int:
    result = config.run()
    print(f"feature statistics -> {result.path} ({result.alive_features} of {result.num_features} features fire "
          f"on {result.rows:,} rows)")
    return 0


def _dashboard(config) -> int:
    from tide.analysis.dashboard import export_dashboard

    result = export_dashboard(config)
    print(f"feature atlas of {result.num_features} features ({result.num_images} top images from "
          f"{result.num_samples} regenerated samples, causal strips for {result.num_effects}; "
          f"{result.bytes / 1e6:.1f} MB in {result.seconds.get('total', 0):.0f} s) -> {result.index_path} "
          "(open it in a browser; no server needed)")
    return 0


def _profile(config) -> int:
    path = config.run()
    print(f"steering profile -> {path}")
    return 0


def _steer(config) -> int:
    result = config.run()
    line = f"wrote {result.grid_path} (mean pixel change {result.pixel_change:.3f})"
    if result.target_class is not None:
        line += (f"; classified as {result.target_class}: {result.target_rate_before:.0%} before, "
                 f"{result.target_rate_after:.0%} after")
    if config.save_images:
        line += f"; images -> {config.save_images}"
    print(line)
    return 0


def _export(config) -> int:
    result = config.run()
    print(f"exported {len(result.dirs)} {config.format} SAEs (t = {', '.join(f'{t:g}' for t in result.timesteps)}) "
          f"-> {result.path}")
    return 0


def _demo(config) -> int:
    from tide.demo import run_demo

    summary = run_demo(config)
    print(json.dumps(summary["artefacts"], indent=2))
    return 0


def commands() -> list[Command]:
    return [
        Command("hooks", "list every hook name of a backbone with its activation shape",
                "tide.config:BackboneConfig", _hooks),
        Command("sample", "sample a grid of images, one row per class", "tide.sampling:GenerateConfig", _sample),
        Command("capture", "record activations at every denoising step into HDF5 shards",
                "tide.capture.run:CaptureConfig", _capture),
        Command("train", "train SAEs (TIDE, plain, per-bucket) on a captured dataset; SAEs from the YAML `saes` list",
                "tide.train.config:TrainConfig", _train),
        Command("eval", "evaluate an SAE: per-timestep reconstruction and spliced fidelity -> eval.json, eval.png",
                "tide.eval.report:EvalConfig", _eval),
        Command("stats", "per-feature statistics of an SAE over a dataset (one streaming pass)",
                "tide.analysis.feature_stats:FeatureStatsConfig", _stats),
        Command("dashboard", "export a static HTML dashboard of SAE features (opens from file://)",
                "tide.analysis.dashboard:DashboardConfig", _dashboard),
        Command("profile", "measure the paired feature shifts that steer toward conditions (a steering profile)",
                "tide.analysis.steering_profile:ProfileConfig", _profile),
        Command("steer", "steer generations toward / away from a condition, or edit named SAE features; before/after grid",
                "tide.analysis.steering:SteerConfig", _steer),
        Command("export", "write an SAE folded at chosen timesteps as plain SAEs for SAELens (5, 6) or sparsify",
                "tide.sae.export:ExportConfig", _export),
        Command("demo", "run the whole pipeline end to end on the embedded model", "tide.demo:DemoConfig", _demo),
    ]


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line, ``tide VERB: error: ...`` with a pointer to ``--help``, and exit status 2
    (instead of the usage block and the message); ``--help`` is unchanged. Subparsers inherit the class. Flags are
    never abbreviated: ``--overwrit`` is an unknown flag, not ``--overwrite`` (nor ``--n`` ``--num-steps``)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        message = " ".join(str(message).split())
        if message.startswith("the following arguments are required: COMMAND"):
            message = "give a command (tide --help lists them)"
        elif message.startswith("the following arguments are required: ACTION"):
            message = f"give an action: info or verify (see {self.prog} --help)"
        else:
            message += f" (see {self.prog} --help)"
        self.exit(2, f"{self.prog}: error: {message}\n")

    def flag_names(self) -> list[str]:
        return [o for action in self._actions for o in action.option_strings if o.startswith("--")]


def _unknown_flags(parser: Parser, extra: list[str]) -> None:
    """Refuse arguments no flag took, in one line, suggesting the nearest flag names."""
    import difflib

    flags = [a.split("=", 1)[0] for a in extra if a.startswith("-")]
    known = parser.flag_names()
    hints = {f: difflib.get_close_matches(f, known, n=1, cutoff=0.75) for f in flags}
    if flags:
        near = "; ".join(f"did you mean {hint[0]} for {f}?" for f, hint in hints.items() if hint)
        parser.error(f"unknown flag{'s' if len(flags) > 1 else ''} {' '.join(flags)}" + (f" ({near})" if near else ""))
    parser.error(f"unexpected argument{'s' if len(extra) > 1 else ''} {' '.join(map(repr, extra))}: every value "
                 "follows its --flag")


def build_parser(argv: Sequence[str] | None = None) -> tuple[argparse.ArgumentParser, dict[str, Command]]:
    """The parser and the command table. Only the command named in ``argv`` gets its flags (and imports its
    config); with ``argv`` None every command does. Each command's parser is ``parser.command_parsers[name]``."""
    parser = Parser(prog="tide", description="Interpret diffusion transformers with timestep-aware sparse autoencoders.")
    parser.command_parsers = {}
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    table = {}
    chosen = None if argv is None else next((a for a in argv if not a.startswith("-")), "")
    for cmd in commands():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        p.add_argument("--config", metavar="YAML", help="YAML file with the fields below; flags override it")
        if chosen is None or chosen == cmd.name:
            add_arguments(p, cmd.config_cls)
        table[cmd.name] = cmd
        parser.command_parsers[cmd.name] = p
    data = sub.add_parser("data", help="inspect captured datasets: info, verify").add_subparsers(
        dest="action", metavar="ACTION", required=True)
    for action, help_ in (("info", "summarise a dataset"), ("verify", "check schema, row counts, checksums, NaN/inf")):
        p = data.add_parser(action, help=help_, description=help_)
        p.add_argument("dir", metavar="DIR", help="dataset directory")
        p.add_argument("--config", help=argparse.SUPPRESS)
        if action == "verify":
            p.add_argument("--hashes", action=argparse.BooleanOptionalAction, default=None,
                           help="recompute every shard's SHA-256 (default: on)")
            p.add_argument("--scan", action=argparse.BooleanOptionalAction, default=None,
                           help="scan every activation for NaN/inf (default: on)")
        table[f"data {action}"] = Command(f"data {action}", help_, DataConfig, _data(action))
        parser.command_parsers[f"data {action}"] = p
    return parser, table


def _one_line(exc: BaseException) -> str:
    """An OS error (unreadable or unwritable file, full disk) as one line naming the file."""
    if isinstance(exc, OSError) and exc.strerror:
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{exc.strerror}: check the path and its permissions"
    return " ".join(str(exc).split())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser, table = build_parser(argv)
    args, extra = parser.parse_known_args(argv)
    name = args.command if args.command != "data" else f"data {args.action}"
    cmd = table[name]
    if extra:
        _unknown_flags(parser.command_parsers[name], extra)
    try:
        config = from_args(cmd.config_cls, args, args.config)
        return cmd.run(config)
    except TideError as exc:
        print(f"tide {cmd.name}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except OSError as exc:  # what no up-front check caught (a disk filling up, a file vanishing): still one line
        print(f"tide {cmd.name}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tide {cmd.name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
