"""The `normfold` command: convert, inspect, verify, passes, bench, remove-layernorm.

Exit codes: 0 success (or nothing to do), 1 verification failed, 2 bad input or usage.
Every error is one line on stderr; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
import warnings
from pathlib import Path

from normfold import __version__, remove_layernorm_command
from normfold.atomic import strict_json, write_json
from normfold.errors import InputError, NormfoldError, VerificationError


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line and exit code 2."""

    def error(self, message: str) -> None:
        raise InputError(f"usage: {message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="normfold", description="Rewrite the normalization layers of ONNX models, verified.")
    parser.add_argument("--version", action="version", version=f"normfold {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    convert = sub.add_parser("convert", help="rewrite a model and verify it")
    convert.add_argument("model", type=Path)
    convert.add_argument("-o", "--output", type=Path, help="default: MODEL.normfold.onnx beside the input")
    convert.add_argument("--passes", help="comma-separated pass names (default: fold-batchnorm, layernorm-to-rmsnorm, "
                                          "emit-rmsnorm, fold-norm-affine; see normfold passes)")
    convert.add_argument("--target", choices=["auto", "onnx", "ort"], default="auto",
                         help="emit norm ops for onnxruntime (ort), as standard ONNX only (onnx), or "
                              "ort when onnxruntime is installed (auto)")
    convert.add_argument("--no-verify", action="store_true", help="skip the equivalence check")
    convert.add_argument("--force", action="store_true", help="overwrite an existing output")
    convert.add_argument("--report", type=Path, help="write the JSON report here")
    convert.add_argument("--approximate", action="store_true", help="allow approximate passes")
    convert.add_argument("--calibration", type=Path, metavar="FILE.npz",
                         help="calibration inputs (arrays keyed by input name, leading sample dim) for approximate "
                              "passes (remove-layernorm); the report gives the drift on them")
    _add_verify_options(convert)

    inspect = sub.add_parser("inspect", help="list normalization sites and what each pass would do")
    inspect.add_argument("model", type=Path)
    inspect.add_argument("--json", action="store_true", help="machine-readable output")

    verify = sub.add_parser(
        "verify", help="check a candidate computes the same function as a reference model or reference file",
        usage="normfold verify REFERENCE.onnx CANDIDATE.onnx [options]\n"
              "       normfold verify CANDIDATE.onnx --reference REF.npz [options]\n"
              "       normfold verify MODEL.onnx [CANDIDATE.onnx] --save-reference REF.npz [options]",
        description="Exit 0: equivalent within tolerance (or reference saved); 1: not equivalent; 2: bad input.")
    verify.add_argument("models", type=Path, nargs="+", metavar="MODEL.onnx",
                        help="the reference and candidate models, or one model with --reference/--save-reference")
    verify.add_argument("--reference", dest="reference_file", type=Path, metavar="REF.npz",
                        help="check the one model given against this reference file instead of a reference model")
    verify.add_argument("--save-reference", type=Path, metavar="REF.npz",
                        help="save the reference run's inputs, outputs, seed and tolerances to this .npz")
    verify.add_argument("--force", action="store_true", help="overwrite an existing --save-reference file")
    verify.add_argument("--inputs", type=Path, help=".npz file of input arrays")
    verify.add_argument("--tolerance", action="append", default=[], metavar="NAME=ATOL,RTOL",
                        help="tolerances of one output, overriding the dtype defaults (repeatable)")
    verify.add_argument("--tolerance-class", choices=["fold", "renorm"],
                        help="default tolerances: fold (BN/affine folds, the default) or renorm (LN -> RMSNorm)")
    verify.add_argument("--bisect", action="store_true",
                        help="on failure, find the first intermediate value (same name in both) that diverges")
    verify.add_argument("--junit", type=Path, metavar="FILE.xml", help="write a JUnit XML report")
    verify.add_argument("--report", type=Path, metavar="FILE.json", help="write the JSON result to a file")
    verify.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    _add_verify_options(verify)
    verify.set_defaults(seed=None)  # None: not given (a reference file brings its own seed); 0 otherwise

    sub.add_parser("passes", help="list the available passes")
    remove_layernorm_command.add_parser(sub)

    bench = sub.add_parser("bench", help="measure onnxruntime latency and memory of one or more models",
                           description="Times the models on the same seeded inputs, repetitions interleaved "
                                       "across models; ratio is each median over the first model's.")
    bench.add_argument("models", type=Path, nargs="+", metavar="MODEL.onnx")
    _add_provider_options(bench)
    bench.add_argument("--repeats", type=int, default=20, help="timed runs per model (default 20)")
    bench.add_argument("--warmup", type=int, default=3, help="untimed runs per model before timing (default 3)")
    bench.add_argument("--batch", type=int, help="first dimension of every input whose batch is dynamic")
    bench.add_argument("--shape", action="append", default=[], metavar="INPUT=D0,D1,...",
                       help="shape of an input with dynamic dims (repeatable; wins over --batch)")
    bench.add_argument("--seed", type=int, default=0, help="seed of the generated inputs")
    bench.add_argument("--no-memory", action="store_true",
                       help="skip the peak-memory measurement (a child process per model)")
    bench.add_argument("--spin", action="store_true",
                       help="keep onnxruntime's spinning idle threads (default: they sleep, so interleaved "
                            "sessions do not take each other's cores)")
    bench.add_argument("--json", action="store_true", help="machine-readable output (schema normfold.bench/1)")
    bench.add_argument("--plot", type=Path, metavar="FILE.png",
                       help="write a bar chart of median latency with p90 whiskers (needs matplotlib)")
    return parser


def _add_verify_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--atol", type=float, help="absolute tolerance before RMS scaling")
    parser.add_argument("--rtol", type=float, help="relative tolerance")
    _add_provider_options(parser)
    parser.add_argument("--shape", action="append", default=[], metavar="INPUT=D0,D1,...",
                        help="shape of an input with dynamic dims (repeatable)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated inputs")


def _add_provider_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--provider", default="cpu",
                        help="execution provider: cpu (default), cuda, tensorrt or auto (the best available)")
    parser.add_argument("--provider-option", action="append", default=[], metavar="KEY=VALUE",
                        help="onnxruntime provider option, e.g. device_id=1, trt_engine_cache_enable=True "
                             "(repeatable)")
    parser.add_argument("--fp16", action="store_true",
                        help="TensorRT fp16 kernels (trt_fp16_enable=True; needs --provider tensorrt)")
    parser.add_argument("--allow-fallback", action="store_true",
                        help="when the provider is unavailable, run on the next best one with a warning")


def main(argv: list[str] | None = None) -> int:
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        args = build_parser().parse_args(argv)
        with warnings.catch_warnings():
            warnings.showwarning = _warning_line
            warnings.filterwarnings("always", module="normfold")
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
    calibration = None
    if args.calibration:
        from normfold.calibration import load_calibration

        if not args.approximate:
            raise InputError("--calibration is for approximate passes: add --approximate")
        calibration = load_calibration(args.calibration)
    _progress(f"converting {args.model}")
    try:
        model, report = pipeline.convert(
            args.model, passes, verify=not args.no_verify, approximate=args.approximate, target=args.target,
            calibration=calibration, **_verify_kwargs(args),
        )
    except VerificationError as exc:
        if args.report:
            write_json(args.report, exc.report.to_dict())
        for line in exc.report.summary_lines() + _verification_lines(exc.report):
            print(line)
        raise
    report.output = str(output)
    if report.applied:
        io.save(model, output, force=args.force)
    else:
        report.output = None
    if args.report:
        write_json(args.report, report.to_dict())
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
    import dataclasses
    import time

    from normfold import io, provider_tolerances
    from normfold import reference as reference_file
    from normfold import verification as verify_module

    reference_model, candidate = _verify_operands(args)
    shapes = _parse_shapes(args.shape)
    tolerances = _parse_tolerances(args.tolerance)
    if args.save_reference and os.path.lexists(args.save_reference) and not args.force:
        raise InputError(f"{args.save_reference}: already exists (use --force to overwrite)")
    start = time.perf_counter()
    if candidate is not None:
        io.load(candidate)  # validates it before any run
    if args.reference_file:
        data = reference_file.load(args.reference_file)
    else:
        inputs = verify_module.load_inputs(args.inputs) if args.inputs else None
        _progress(f"running {reference_model}")
        data = verify_module.run_reference(reference_model, inputs=inputs, shapes=shapes,
                                           seed=0 if args.seed is None else args.seed)
    tolerance_class, atol, rtol, per_output = verify_module.resolve_tolerances(
        data, atol=args.atol, rtol=args.rtol, tolerance_class=args.tolerance_class, tolerances=tolerances)
    data = dataclasses.replace(data, tolerance_class=tolerance_class, atol=atol, rtol=rtol, tolerances=per_output)

    if candidate is None:  # only saving a reference
        reference_file.save(data, args.save_reference, force=args.force)
        document = _reference_document(data, reference_model, args.save_reference)
        print(json.dumps(strict_json(document), indent=2) if args.json else _reference_line(data, args.save_reference))
        return 0

    _progress(f"checking {candidate}")
    provider = provider_tolerances.for_verification(_provider(args))
    result = verify_module.check_candidate(data, candidate, provider=provider, allow_fallback=args.allow_fallback)
    bisected = None
    if args.bisect and not result.passed:
        from normfold.bisect import bisect

        _progress("bisecting")
        bisected = bisect(reference_model, candidate, inputs=data.inputs, atol=atol, rtol=rtol,
                          tolerance_class=tolerance_class, tolerances=per_output, provider=provider)
    seconds = time.perf_counter() - start
    reference_label = str(args.reference_file or reference_model)
    if args.save_reference:
        reference_file.save(data, args.save_reference, force=args.force)
    document = {
        "schema": VERIFY_SCHEMA,
        "reference": str(reference_model) if reference_model else None,
        "reference_file": str(args.reference_file) if args.reference_file else None,
        "candidate": str(candidate),
        **result.to_dict(),
        "bisect": bisected.to_dict() if bisected is not None else None,
        "saved_reference": str(args.save_reference) if args.save_reference else None,
        "seconds": round(seconds, 3),
    }
    if args.junit:
        from normfold.junit import write_junit

        write_junit(args.junit, result, reference=reference_label, candidate=str(candidate), seconds=seconds,
                    bisect=bisected)
    if args.report:

        write_json(args.report, document)
    if args.json:
        print(json.dumps(strict_json(document), indent=2))
        return 0 if result.passed else 1
    lines = result.summary_lines()
    if not result.passed:
        lines.append("  reproduce: " + _reproduce_command(args, data, reference_model, candidate))
    if bisected is not None:
        lines += bisected.summary_lines()
    elif args.bisect:
        lines.append("bisect: not needed, every output is within tolerance")
    if args.save_reference:
        lines.append(_reference_line(data, args.save_reference))
    print("\n".join(lines))
    return 0 if result.passed else 1


VERIFY_SCHEMA = "normfold.verify/1"


def _verify_operands(args) -> tuple[Path | None, Path | None]:
    """(reference model, candidate model) from `verify`'s positionals and flags; bad combinations exit 2."""
    models = args.models
    if len(models) > 2:
        raise InputError("verify takes at most two models: REFERENCE.onnx CANDIDATE.onnx")
    npz = next((m for m in models if m.suffix == ".npz"), None)
    if npz is not None:
        raise InputError(f"{npz}: a reference file goes after --reference: normfold verify CANDIDATE.onnx "
                         f"--reference {npz}")
    if args.reference_file:
        if args.save_reference:
            raise InputError("--reference reads a reference file and --save-reference writes one; use one of them")
        if len(models) != 1:
            raise InputError("with --reference give only CANDIDATE.onnx: the reference file replaces the reference "
                             "model")
        given = [flag for flag, value in (("--inputs", args.inputs), ("--shape", args.shape),
                                          ("--seed", args.seed is not None)) if value]
        if given:
            raise InputError(f"{', '.join(given)} cannot be combined with --reference: the reference file "
                             "brings its own inputs")
        if args.bisect:
            raise InputError("--bisect needs both models (a reference file holds only inputs and outputs): "
                             "normfold verify REFERENCE.onnx CANDIDATE.onnx --bisect")
        reference_model, candidate = None, models[0]
    else:
        if len(models) == 1 and not args.save_reference:
            raise InputError("give REFERENCE.onnx CANDIDATE.onnx, or CANDIDATE.onnx --reference REF.npz, or "
                             "MODEL.onnx --save-reference REF.npz")
        reference_model, candidate = models[0], (models[1] if len(models) == 2 else None)
    if candidate is None:
        needing = [flag for flag, value in (("--bisect", args.bisect), ("--junit", args.junit),
                                            ("--report", args.report)) if value]
        if needing:
            raise InputError(f"{', '.join(needing)} need a candidate model: normfold verify REFERENCE.onnx "
                             "CANDIDATE.onnx ...")
    reads = [p for p in (*models, args.reference_file, args.inputs) if p is not None]
    writes = [(flag, p) for flag, p in (("--save-reference", args.save_reference), ("--junit", args.junit),
                                        ("--report", args.report)) if p is not None]
    for i, (flag, path) in enumerate(writes):
        for other in reads + [p for _, p in writes[:i]]:
            if _same_file(path, other):
                raise InputError(f"{flag} {path}: would overwrite {other}, which this command reads or writes")
    return reference_model, candidate


def _same_file(a: Path, b: Path) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _parse_tolerances(items: list[str]) -> dict[str, tuple[float, float]]:
    tolerances = {}
    for item in items:
        name, sep, values = item.rpartition("=")
        parts = values.split(",")
        try:
            numbers = [float(p) for p in parts]
        except ValueError:
            numbers = []
        if not sep or not name or len(numbers) != 2 or not all(0 <= n < float("inf") for n in numbers):
            raise InputError(f"--tolerance {item!r}: expected NAME=ATOL,RTOL with two non-negative numbers")
        if name in tolerances:
            raise InputError(f"--tolerance: output {name!r} is given twice")
        tolerances[name] = (numbers[0], numbers[1])
    return tolerances


def _reproduce_command(args, data, reference_model, candidate) -> str:
    import shlex

    if args.reference_file:
        return shlex.join(["normfold", "verify", str(candidate), "--reference", str(args.reference_file)])
    command = ["normfold", "verify", str(reference_model), str(candidate), "--seed", str(data.seed)]
    if args.inputs:
        command += ["--inputs", str(args.inputs)]
    for name, dims in data.shapes.items():
        command += ["--shape", f"{name}={','.join(map(str, dims))}"]
    command += ["--tolerance-class", data.tolerance_class]
    if data.atol is not None:
        command += ["--atol", repr(data.atol)]
    if data.rtol is not None:
        command += ["--rtol", repr(data.rtol)]
    for name, (a, r) in data.tolerances.items():
        command += ["--tolerance", f"{name}={a!r},{r!r}"]
    if args.provider != "cpu":
        command += ["--provider", args.provider]
    for item in args.provider_option:
        command += ["--provider-option", item]
    command += [flag for flag, on in (("--fp16", args.fp16), ("--allow-fallback", args.allow_fallback)) if on]
    return shlex.join(command) + " (add --save-reference REF.npz to keep these inputs and outputs)"


def _reference_document(data, reference_model, path) -> dict:
    def arrays(values, generated=None):
        return {name: {"dtype": str(a.dtype), "shape": list(a.shape),
                       **({"generated": name in generated} if generated is not None else {})}
                for name, a in values.items()}

    return {"schema": VERIFY_SCHEMA, "reference": str(reference_model), "saved_reference": str(path),
            "seed": data.seed, "tolerance_class": data.tolerance_class,
            "inputs": arrays(data.inputs, set(data.generated)), "outputs": arrays(data.outputs)}


def _reference_line(data, path) -> str:
    generated = f"{len(data.generated)} generated with seed {data.seed}" if data.generated else "all given"
    return (f"saved reference {path}: {len(data.inputs)} input(s) ({generated}), {len(data.outputs)} output(s), "
            f"tolerance class {data.tolerance_class}")


def cmd_passes(args) -> int:
    from normfold.passes import PASSES

    for name, cls in PASSES.items():
        print(f"{name:24} {'exact' if cls.exact else 'approximate':12} {cls.summary}")
    return 0


def cmd_bench(args) -> int:
    from normfold import bench

    if args.plot:
        clash = next((m for m in args.models if _same_file(args.plot, m)), None)
        if clash is not None:
            raise InputError(f"--plot {args.plot}: would overwrite {clash}, which this command reads")
        bench.check_plot_path(args.plot)
    choice = _provider(args)
    memory = not args.no_memory
    results = bench.benchmark(args.models, provider=choice, allow_fallback=args.allow_fallback, repeats=args.repeats,
                              warmup=args.warmup, shapes=_parse_shapes(args.shape), batch=args.batch, seed=args.seed,
                              memory=memory, spin=args.spin)
    if args.plot:
        bench.plot(results, args.plot)
    if args.json:
        document = bench.document(results, choice, seed=args.seed, memory=memory, spin=args.spin)
        print(json.dumps(strict_json(document), indent=2))
        return 0
    print("\n".join(bench.table(results)))
    if args.plot:
        print(f"wrote {args.plot}")
    return 0


COMMANDS = {"convert": cmd_convert, "inspect": cmd_inspect, "verify": cmd_verify, "passes": cmd_passes,
            "bench": cmd_bench, "remove-layernorm": remove_layernorm_command.run}


def _verify_kwargs(args) -> dict:
    provider = args.provider if getattr(args, "no_verify", False) else _provider(args)
    return dict(atol=args.atol, rtol=args.rtol, provider=provider, shapes=_parse_shapes(args.shape),
                seed=args.seed, allow_fallback=args.allow_fallback)


def _provider(args):
    """The provider from --provider, --provider-option, --fp16 and --allow-fallback; auto says what it picked."""
    from normfold import runtime

    options = runtime.parse_options(args.provider_option)
    if args.fp16:
        if options.get("trt_fp16_enable", "True") != "True":
            raise InputError("--fp16 contradicts --provider-option trt_fp16_enable=False")
        options["trt_fp16_enable"] = "True"
    choice = runtime.select_provider(args.provider, options, allow_fallback=args.allow_fallback)
    if choice.requested == "auto":
        print(f"normfold: --provider auto picked {choice.describe()}", file=sys.stderr)
    return choice


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
    if v.get("approximate"):
        from normfold.drift import summary_lines

        return summary_lines(v["drift"])
    on = f" on {v['provider']}" if v.get("provider", "cpu") != "cpu" else ""
    lines = [f"verification {'passed' if v['passed'] else 'FAILED'}{on}: max abs error {v['max_abs_error']:.3g}, "
             f"max rel error {v['max_rel_error']:.3g}"]
    lines += [f"  FAIL {o['name']}: {o['message']}" for o in v["outputs"] if not o["passed"]]
    return lines


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    """Python warnings as one line on stderr, like errors."""
    print(f"normfold: warning: {message}", file=sys.stderr)


def _progress(message: str) -> None:
    if sys.stderr.isatty():
        print(f"normfold: {message} ...", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
