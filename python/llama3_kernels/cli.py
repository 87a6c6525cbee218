"""`l3k`: one command line for the library. Each subcommand lives in its own module and gets its argv."""

from __future__ import annotations

import importlib
import json
import sys

# subcommand → ("module:function", one-line help); the function takes the remaining argv
COMMANDS = {
    "info": ("llama3_kernels.cli:info_main", "what was built, which GPU is visible, kernel or reference per op"),
    "bench": ("llama3_kernels.bench.cli:main", "benchmark the ops against their peers; --compare gates regressions"),
    "generate": ("llama3_kernels.generate:main", "generate text from a Llama 3 / SmolLM2 checkpoint"),
    "train": ("llama3_kernels.training.train:main", "pretrain a Llama 3 model (single process or torchrun)"),
    "cp-plan": ("llama3_kernels.distributed.plan:main", "estimate context-parallel attention cost at scale"),
    "demo": ("llama3_kernels.demo:main", "the README's main job: info, ops on references or kernels, generation"),
}


def info_main(argv: list[str]) -> int:
    from llama3_kernels import info

    print(json.dumps(info(), indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: l3k <command> [args]\n")
        for name, (_, text) in COMMANDS.items():
            print(f"  {name:10s} {text}")
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    target, _ = COMMANDS[argv[0]]
    module, func = target.split(":")
    return int(getattr(importlib.import_module(module), func)(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
