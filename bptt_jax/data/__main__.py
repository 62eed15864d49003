"""``python -m bptt_jax.data``: generate offline datasets and inspect trajectory files.

    python -m bptt_jax.data generate si_defects --out data/si [--n N] [--seed S] [--workers W] [--preset P]
    python -m bptt_jax.data inspect PATH [--strict] [--format FMT]

Errors are one line on stderr (file and record named) with a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main(argv: list[str] | None = None) -> int:
    from bptt_jax.data.generate import PARAMS, PRESETS

    parser = argparse.ArgumentParser(prog="python -m bptt_jax.data", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="make relaxation trajectories with real potentials (offline)")
    gen.add_argument("name", choices=sorted(PARAMS))
    gen.add_argument("--out", required=True, help="output directory (one extxyz per trajectory + manifest.json)")
    gen.add_argument("--n", type=int, default=None, help="number of trajectories")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--workers", type=int, default=1, help="worker processes")
    gen.add_argument("--preset", default="default", help="size preset: " + "; ".join(
        f"{k}: {', '.join(v)}" for k, v in PRESETS.items()))
    gen.add_argument("--oracle", default=None, choices=["chgnet"], help="DFT-like forces from CHGNet (extra 'oracle')")
    gen.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a generator parameter (JSON value), e.g. --set repeat=3")
    gen.add_argument("--force", action="store_true", help="replace a different dataset in --out")
    gen.add_argument("--quiet", action="store_true", help="no progress bar")

    ins = sub.add_parser("inspect", help="summarise trajectories in a file or directory (any supported format)")
    ins.add_argument("path")
    ins.add_argument("--strict", action="store_true", help="fail on the first bad record")
    ins.add_argument("--format", default=None, help="force a reader: ase, mptrj, oc20_lmdb, s2ef, asedb")

    args = parser.parse_args(argv)
    try:
        if args.command == "generate":
            from bptt_jax.data.generate import generate

            overrides = {}
            for item in args.set:
                key, sep, value = item.partition("=")
                if not sep:
                    parser.error(f"--set expects KEY=VALUE, got {item!r}")
                overrides[key] = _parse_value(value)
            if args.n is not None:
                overrides["n"] = args.n
            manifest = generate(args.name, args.out, preset=args.preset, seed=args.seed, workers=args.workers,
                                oracle=args.oracle, progress=not args.quiet, force=args.force, **overrides)
            c = manifest["counts"]
            print(f"{args.out}: {c['trajectories']} trajectories, {c['frames']} frames "
                  f"({c['frames_min']}-{c['frames_max']} per trajectory), {c['atoms_min']}-{c['atoms_max']} atoms, "
                  f"{c['not_converged']} not converged within the step limit")
        else:
            from bptt_jax.data.readers import format_summary, summarize

            print(format_summary(summarize(args.path, strict=args.strict, fmt=args.format)))
    except KeyboardInterrupt:
        print("interrupted (finished trajectories are kept; re-run to resume)", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError) as err:
        print(f"error: {err}".splitlines()[0], file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
