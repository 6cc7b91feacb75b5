"""The `ssdbench` command: subcommands dispatch to their modules.

`ssdbench run ...` hands every remaining argument to the Hydra application (so all Hydra
flags work: -m/--multirun, --cfg job, --help, +key=value). Before that, config-group choices
(model=, task=, ...) are checked against the installed configs so that a typo gets one line
naming the choices instead of Hydra's traceback.
"""
from __future__ import annotations

import argparse
import sys
from importlib import resources

GROUPS = ("model", "task", "trainer", "logger", "experiment", "heads")

SUBCOMMANDS = {
    "run": "train one configuration, or sweep many with -m (a Hydra application; see `ssdbench run --help`)",
    "bench": "time on the GPU: kernels ssd, scan (selective scan, conv), based, window; training throughput: train; "
             "`ssdbench run` against its bare step: study; inference throughput (prefill + decode): generate",
}

# Subcommands with argparse options: name -> (module, help). Each module provides
# add_arguments(parser) and main(args) -> exit code; it is imported only when needed.
COMMANDS = {
    "prepare-data": ("ssdbench.prepare_data",
                     "tokenize Pile-format jsonl(.zst), text or Parquet files into memory-mapped token shards"),
    "table": ("ssdbench.table",
              "aggregate the result records under a results directory into a table (terminal, CSV, Markdown)"),
    "plot-results": ("ssdbench.plots",
                     "figures (PNG and PDF) from the result records: accuracy vs width and state size, "
                     "training curves"),
    "generate": ("ssdbench.generate",
                 "generate text (or tokens) from a trained run: prefill with the parallel forward, decode "
                 "with the recurrent step or KV cache"),
    "fit-scaling": ("ssdbench.scaling",
                    "Chinchilla-style scaling fits (envelope, IsoFLOP parabolas, parametric L(N, D)) "
                    "from result records or a params,tokens,loss CSV"),
}

# `ssdbench bench <name> ...` runs ssdbench.bench_<module>.main(argv)
BENCHES = {"ssd": "bench_ssd", "scan": "bench_scan", "based": "bench_based", "window": "bench_window",
           "train": "bench_train", "study": "bench_study", "generate": "bench_generate"}


def available(group: str) -> list[str]:
    """Config names in conf/<group>/ of the installed package."""
    folder = resources.files("ssdbench.conf") / group
    if not folder.is_dir():
        return []
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def check_group_choices(args: list[str]) -> str | None:
    """An error line for the first override that names a config that does not exist, else None."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    candidates = [a for a in args if "=" in a and not a.startswith("-")]
    try:
        overrides = OverridesParser.create().parse_overrides(candidates)
    except Exception:  # noqa: BLE001 - malformed overrides: let Hydra report them itself
        return None
    for o in overrides:
        group = o.key_or_group.lstrip("+~")
        if group not in GROUPS or o.is_delete():
            continue
        values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
        choices = available(group)
        for v in values:
            if v not in choices and v != "null":
                return (f"ssdbench run: unknown {group} '{v}' "
                        f"(available: {', '.join(choices) or 'none'})")
    return None


def _run(argv: list[str]) -> int:
    error = check_group_choices(argv)
    if error:
        print(error, file=sys.stderr)
        return 2
    from ssdbench import preflight
    from ssdbench.errors import ConfigError

    try:
        argv = preflight.check(argv)  # before the heavy imports: a typo costs a second, not seven
    except ConfigError as e:
        print(f"ssdbench run: invalid config: {e}", file=sys.stderr)
        return 2
    from ssdbench import train

    train.ENTRY_ARGV0 = sys.argv[0]  # DDP re-runs this command for its extra processes
    sys.argv = ["ssdbench run", *argv]
    code = 0
    try:
        train.main()
    except SystemExit as e:  # a sweep stopped by SIGTERM: still say what its jobs did
        if train.SWEEP_JOURNAL is None:
            raise
        code = e.code if isinstance(e.code, int) else 1
    if train.SWEEP_JOURNAL is not None:  # a multirun: the journal covers jobs in any process
        failed = train.print_sweep_summary(train.SWEEP_JOURNAL)
        return code or (1 if failed else 0)
    if train.FAILED_JOBS:
        print(f"ssdbench run: {len(train.FAILED_JOBS)} job(s) did not finish ok:", file=sys.stderr)
        for line in train.FAILED_JOBS:
            print(f"  {line}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "run":
        sys.exit(_run(argv[1:]))
    if argv and argv[0] == "bench" and len(argv) > 1 and argv[1] in BENCHES:
        import importlib

        rc = importlib.import_module(f"ssdbench.{BENCHES[argv[1]]}").main(argv[2:])
        return rc if isinstance(rc, int) else 0  # bench train's exit code (2: bad --override); others return
        # tables (no GPU: bench_report.require_cuda exits 2 itself)

    parser = argparse.ArgumentParser(
        prog="ssdbench",
        description="Synthetic and scaling studies of Mamba-1, Mamba-2 (SSD), Transformer++ and Based.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Examples:\n  ssdbench run task=mqar model=transformerpp\n"
               "  ssdbench run -m model.d_model=32,64\n  ssdbench table results/default",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    sub.add_parser("run", help=SUBCOMMANDS["run"], add_help=False)
    bench = sub.add_parser("bench", help=SUBCOMMANDS["bench"], description=SUBCOMMANDS["bench"])
    bench.add_argument("kernel", choices=sorted(BENCHES), help="which benchmark (its own --help lists options)")
    import importlib

    # only the module of the command being run is imported (each pulls pandas/matplotlib/...)
    chosen = argv[0] if argv and argv[0] in COMMANDS else None
    for name, (module, text) in COMMANDS.items():
        p = sub.add_parser(name, help=text, description=text)
        if name == chosen:
            importlib.import_module(module).add_arguments(p)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command in COMMANDS:
        return importlib.import_module(COMMANDS[args.command][0]).main(args)
    return 0  # `bench` with a valid kernel was dispatched above


if __name__ == "__main__":
    sys.exit(main())
