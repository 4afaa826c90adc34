"""The `normfold` command: convert, inspect, verify, passes, bench.

Exit codes: 0 success (or nothing to do), 1 verification failed, 2 bad input or usage.
Every error is one line on stderr; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import traceback
from pathlib import Path

from normfold import __version__
from normfold.errors import InputError, NormfoldError, VerificationError


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line and exit code 2."""

    def error(self, message: str) -> None:
        raise InputError(f"usage: {message} (see normfold {self.prog.split()[-1]} --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="normfold", description="Rewrite the normalization layers of ONNX models, verified.")
    parser.add_argument("--version", action="version", version=f"normfold {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    convert = sub.add_parser("convert", help="rewrite a model and verify it")
    convert.add_argument("model", type=Path)
    convert.add_argument("-o", "--output", type=Path, help="default: MODEL.normfold.onnx beside the input")
    convert.add_argument("--passes", help="comma-separated pass names (default: every exact pass)")
    convert.add_argument("--target", choices=["auto", "onnx", "ort"], default="auto",
                         help="emit norm ops for onnxruntime (ort), as standard ONNX only (onnx), or "
                              "ort when onnxruntime is installed (auto)")
    convert.add_argument("--no-verify", action="store_true", help="skip the equivalence check")
    convert.add_argument("--force", action="store_true", help="overwrite an existing output")
    convert.add_argument("--report", type=Path, help="write the JSON report here")
    convert.add_argument("--approximate", action="store_true", help="allow approximate passes")
    _add_verify_options(convert)

    inspect = sub.add_parser("inspect", help="list normalization sites and what each pass would do")
    inspect.add_argument("model", type=Path)
    inspect.add_argument("--json", action="store_true", help="machine-readable output")

    verify = sub.add_parser("verify", help="check two models compute the same function")
    verify.add_argument("reference", type=Path)
    verify.add_argument("candidate", type=Path)
    verify.add_argument("--inputs", type=Path, help=".npz file of input arrays")
    verify.add_argument("--json", action="store_true", help="machine-readable output")
    _add_verify_options(verify)

    sub.add_parser("passes", help="list the available passes")

    bench = sub.add_parser("bench", help="measure onnxruntime latency of one or more models")
    bench.add_argument("models", type=Path, nargs="+")
    bench.add_argument("--provider", default="cpu")
    bench.add_argument("--repeats", type=int, default=20)
    bench.add_argument("--shape", action="append", default=[], metavar="INPUT=D0,D1,...")
    bench.add_argument("--json", action="store_true")
    return parser


def _add_verify_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--atol", type=float, help="absolute tolerance before RMS scaling")
    parser.add_argument("--rtol", type=float, help="relative tolerance")
    parser.add_argument("--provider", default="cpu", help="cpu, cuda, tensorrt or auto")
    parser.add_argument("--shape", action="append", default=[], metavar="INPUT=D0,D1,...",
                        help="shape of an input with dynamic dims (repeatable)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated inputs")


def main(argv: list[str] | None = None) -> int:
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except NormfoldError as exc:
        if debug:
            traceback.print_exc()
        print(f"normfold: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:  # the reader (e.g. `| head`) went away: nothing more to say
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("normfold: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, most likely on an input we failed to validate: still one line
        if debug:
            traceback.print_exc()
        print(f"normfold: internal error: {type(exc).__name__}: {exc} (rerun with --debug)", file=sys.stderr)
        return 2


def cmd_convert(args) -> int:
    from normfold import io, pipeline

    output = args.output or args.model.with_name(args.model.stem + ".normfold.onnx")
    if args.model.exists() and output.resolve() == args.model.resolve():
        raise InputError(f"{output}: refusing to overwrite the input model")
    if output.exists() and not args.force:
        raise InputError(f"{output}: already exists (use --force to overwrite)")
    passes = [p.strip() for p in args.passes.split(",") if p.strip()] if args.passes else None
    _progress(f"converting {args.model}")
    try:
        model, report = pipeline.convert(
            args.model, passes, verify=not args.no_verify, approximate=args.approximate, target=args.target,
            **_verify_kwargs(args),
        )
    except VerificationError as exc:
        if args.report:
            _write_json(args.report, exc.report.to_dict())
        for line in exc.report.summary_lines() + _verification_lines(exc.report):
            print(line)
        raise
    report.output = str(output)
    if report.applied:
        io.save(model, output, force=args.force)
    else:
        report.output = None
    if args.report:
        _write_json(args.report, report.to_dict())
    for line in report.summary_lines() + _verification_lines(report):
        print(line)
    print(f"wrote {output}" if report.applied else "nothing to rewrite; no output written")
    return 0


def cmd_inspect(args) -> int:
    from normfold import detect, io

    model = io.load(args.model)
    sites = detect.inspect(model)
    if args.json:
        print(json.dumps({"schema": detect.SCHEMA, "model": str(args.model), "sites": sites}, indent=2))
        return 0
    if not sites:
        print("no normalization sites found")
    for site in sites:
        print(f"{site['kind']} {site['name']}: {site['spelling']}, axis {site['axis']}, eps {site['epsilon']}, "
              f"{site['dtype']}, {len(site['nodes'])} node(s)")
        if site["placement"]:
            print(f"  placement: {site['placement']} ({site['placement_reason']})")
        for name, verdict in site["passes"].items():
            print(f"  {name}: {verdict}")
    return 0


def cmd_verify(args) -> int:
    from normfold import verification as verify_module

    inputs = verify_module.load_inputs(args.inputs) if args.inputs else None
    result = verify_module.verify(args.reference, args.candidate, inputs=inputs, **_verify_kwargs(args))
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print("\n".join(result.summary_lines()))
    return 0 if result.passed else 1


def cmd_passes(args) -> int:
    from normfold.passes import PASSES

    for name, cls in PASSES.items():
        print(f"{name:24} {'exact' if cls.exact else 'approximate':12} {cls.summary}")
    return 0


def cmd_bench(args) -> int:
    from normfold import bench

    results = bench.benchmark(args.models, provider=args.provider, repeats=args.repeats,
                              shapes=_parse_shapes(args.shape))
    if args.json:
        print(json.dumps([r.to_dict() for r in results], indent=2))
    else:
        print("\n".join(bench.table(results)))
    return 0


COMMANDS = {"convert": cmd_convert, "inspect": cmd_inspect, "verify": cmd_verify, "passes": cmd_passes,
            "bench": cmd_bench}


def _verify_kwargs(args) -> dict:
    return dict(atol=args.atol, rtol=args.rtol, provider=args.provider, shapes=_parse_shapes(args.shape),
                seed=args.seed)


def _parse_shapes(items: list[str]) -> dict[str, list[int]]:
    shapes = {}
    for item in items:
        name, sep, dims = item.rpartition("=")
        try:
            shapes[name] = [int(d) for d in dims.split(",")]
        except ValueError:
            shapes[name] = []
        if not sep or not name or not shapes[name] or any(d < 0 for d in shapes[name]):
            raise InputError(f"--shape {item!r}: expected INPUT=D0,D1,... with non-negative integers")
    return shapes


def _verification_lines(report) -> list[str]:
    v = report.verification
    if v is None:
        return ["verification: not run" + ("" if report.applied else " (nothing changed)")]
    lines = [f"verification {'passed' if v['passed'] else 'FAILED'}: max abs error {v['max_abs_error']:.3g}, "
             f"max rel error {v['max_rel_error']:.3g}"]
    lines += [f"  FAIL {o['name']}: {o['message']}" for o in v["outputs"] if not o["passed"]]
    return lines


def _write_json(path: Path, data) -> None:
    """Writes JSON atomically: a temporary file beside `path`, then a rename."""
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise InputError(f"{directory}: report directory does not exist")
    fd, tmp = tempfile.mkstemp(prefix=".normfold-report-", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _progress(message: str) -> None:
    if sys.stderr.isatty():
        print(f"normfold: {message} ...", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
