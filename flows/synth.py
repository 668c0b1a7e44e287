"""``brats synth``: write synthetic BraTS 2019 cases (for demos, tests and benchmarks)."""

from __future__ import annotations

from storage.synth import write_dataset


def add_command(sub) -> None:
    p = sub.add_parser("synth", help="write synthetic BraTS 2019 cases in the official layout")
    p.add_argument("out", help="output root")
    p.add_argument("--cases", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shape", default="240,240,155", help="X,Y,Z (default: the BraTS grid)")
    p.add_argument("--layout", choices=["brats", "flat"], default="brats")
    p.add_argument("--no-seg", action="store_true", help="write scans without segmentation (new scans)")
    p.add_argument("--prefix", default="BraTS19")
    p.set_defaults(run=run_cli, api=False)


def run_cli(args) -> int:
    shape = tuple(int(s) for s in args.shape.split(","))
    if len(shape) != 3:
        raise ValueError(f"--shape takes X,Y,Z, got {args.shape!r}")
    dirs = write_dataset(args.out, args.cases, seed=args.seed, shape=shape, with_seg=not args.no_seg, layout=args.layout, prefix=args.prefix)
    print(f"wrote {len(dirs)} cases under {args.out}")
    return 0
