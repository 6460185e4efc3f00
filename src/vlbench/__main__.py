"""Command line: ``python -m vlbench <command> [options]``; ``<command> --help`` for each."""
from __future__ import annotations

import errno
import importlib
import sys

COMMANDS = {
    "check": ("vlbench.commands.check", "validate params.yaml and exit"),
    "download": ("vlbench.stages.download", "fetch or generate the dataset and verify it"),
    "split": ("vlbench.stages.split", "write train/val/test manifests"),
    "features": ("vlbench.stages.features", "cache image-encoder features for one backbone"),
    "train": ("vlbench.stages.train", "train one variant"),
    "evaluate": ("vlbench.stages.evaluate", "evaluate one variant on the test split"),
    "transfer": ("vlbench.stages.transfer", "score every trained variant on another dataset's test split"),
    "report": ("vlbench.stages.report", "write metrics/summary.md and the plots"),
    "caption": ("vlbench.commands.caption", "caption image files with a trained variant"),
    "search": ("vlbench.commands.search", "find images for a text query with a trained variant"),
}


def usage() -> str:
    lines = ["usage: python -m vlbench <command> [--help]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] not in COMMANDS:
        print(f"vlbench: unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    from .errors import ParamError

    module = importlib.import_module(COMMANDS[argv[0]][0])
    try:
        module.main(argv[1:])
    except ParamError as e:
        print(f"vlbench {argv[0]}: bad params: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        # outputs are written under temporary names, so nothing partial is left behind
        print(f"vlbench {argv[0]}: disk full ({e.filename or 'while writing'}); nothing was written, "
              "free some space and run again", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
