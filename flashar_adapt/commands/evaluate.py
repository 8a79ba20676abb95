"""``flashar-adapt evaluate``: sample quality (FID, IS, precision/recall) of a sample set
against a reference; or, given a model, raster and two-way decoding side by side in one
report (``flashar_adapt.evaluation``)."""

from __future__ import annotations

import torch

from ..evaluation import evaluate_model, evaluate_samples, report_folder_problem, write_samples_report
from ..generation import GenerateError
from .sample import add_sample_options, load_for_sampling, model_info, processes_of, sample_options_of
from .types import options_of, refuse_given


def _summary(m: dict) -> str:
    keys = ("fid", "inception_score", "precision", "recall", "accuracy", "nll_bits")
    return ", ".join(f"{k} {m[k]:.4g}" for k in keys if m.get(k) is not None)


def _evaluate(args) -> int:
    has_model = any((args.export, args.config, args.model, args.recipe))
    if args.samples and has_model:
        raise GenerateError("give the samples to measure, or a model to sample (--export ...), not both")
    if args.samples:
        refuse_given(
            args,
            args.sampling_options,
            "samples a model: with SAMPLES given there is none to sample (give one or the other)",
            keep=("device", "no_progress"),
        )
        if args.shards:
            raise GenerateError("--shards measures a model's NLL: give a model (--export ...) instead of SAMPLES")
        problem = report_folder_problem(args.out, with_samples=False) if args.out else None
        if problem:  # before measuring
            raise GenerateError(problem)
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        m = evaluate_samples(
            args.samples,
            args.ref,
            extractor=args.extractor,
            device=device,
            save_reference_stats=args.save_ref_stats,
            progress=not args.no_progress,
        )
        if args.out:
            write_samples_report(args.out, m)
        print(f"{m['num_samples']} samples vs {args.ref} ({m['extractor']} features): {_summary(m)}")
        return 0
    if not args.out:
        raise GenerateError("evaluating a model writes samples and a report: give --out DIR")
    procs = processes_of(args)
    model, _, conds, tok, text = load_for_sampling(args, ("raster", "two_way"))
    r = evaluate_model(
        model,
        conds,
        args.out,
        args.ref,
        tok=tok,
        text=text,
        extractor=args.extractor,
        shards=args.shards,
        sample_options=sample_options_of(args),
        procs=procs,
        model_info=model_info(args),
        save_reference_stats=args.save_ref_stats,
    )
    if r is not None:
        for mode, row in r["modes"].items():
            print(f"{mode}: {_summary(row)}, {row['seconds_per_image']:.4f} s/image")
        print(f"two-way speed-up {r['speedup']:.2f}x -> {args.out}/report.md, report.json, samples.png")
    return 0


def add_parsers(sub) -> None:
    s = sub.add_parser(
        "evaluate",
        help="FID/IS/precision/recall of samples against a reference; with a model (--export ...), raster "
        "and two-way side by side in one report",
    )
    s.add_argument("samples", nargs="?", help="a sample folder (flashar-adapt sample), an .npz or an image folder")
    s.add_argument(
        "--ref",
        required=True,
        help="reference images (folder or ADM .npz) or statistics (.npz with mu and sigma)",
    )
    s.add_argument("--out", help="folder for the report (and, with a model, the samples of both modes)")
    s.add_argument(
        "--extractor",
        help="feature extractor (default: the one that suits the samples' recipe, else inception)",
    )
    s.add_argument("--shards", help="a data folder of held-out examples: their NLL under both factorisations")
    s.add_argument("--save-ref-stats", help="also write the reference's statistics (mu, sigma) to this .npz")
    s.set_defaults(fn=_evaluate, sampling_options=options_of(s, add_sample_options))
