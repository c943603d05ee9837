"""`tunelab data`: convert, split, validate, inspect and register fine-tuning datasets.

    tunelab data convert gsm8k.parquet data/gsm8k.json --to alpaca --map instruction=question,output=answer
    tunelab data split data/gsm8k.json --train 2000 --eval 200 --head 0.9 --seed 42 --out-dir data
    tunelab data validate data/gsm8k_train.json --model Qwen/Qwen2.5-0.5B-Instruct --cutoff-len 1024
    tunelab data stats data/gsm8k_train.json --plot stats.png
    tunelab data preview data/gsm8k_train.json -n 2
    tunelab data register gsm8k_train data/gsm8k_train.json --dataset-dir data

A thin argparse front: each subcommand calls one function of tunelab.datatools.<name> and prints its result.
Exit codes: 0 done (validate: the set is clean), 1 an error, or invalid records found by validate, 2 a usage error.
Errors are tunelab.errors exceptions, printed by tunelab.cli without a traceback. See docs/data.md.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

DESCRIPTION = "Convert, split, validate, inspect and register fine-tuning datasets (see docs/data.md)."
EPILOG = ("exit codes: 0 done (validate: no invalid record), 1 error or invalid records, 2 usage error. "
          "`tunelab data <subcommand> --help` shows each one's options.")


def main(argv: list[str]) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2): a return value, so tunelab.cli.main returns it
        return int(e.code or 0)
    if args.job is None:
        parser.print_help()
        return 2
    from tunelab.utils.logging import setup_logging

    setup_logging()
    return int(JOBS[args.job](args) or 0)


# ----------------------------------------------------------------------------------------------- the parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tunelab data", description=DESCRIPTION, epilog=EPILOG)
    sub = parser.add_subparsers(dest="job", metavar="<subcommand>")

    p = sub.add_parser("convert", help="convert json/jsonl/csv/parquet to alpaca, sharegpt or openai records",
                       description="Convert a file or folder (json, jsonl, csv, parquet, arrow) to alpaca, sharegpt "
                       "or openai records, written as a JSON array (OUT.json) or JSON Lines (OUT.jsonl).")
    p.add_argument("src", metavar="IN", help="input file or folder")
    p.add_argument("out", metavar="OUT", help="output file: .json (an array) or .jsonl")
    p.add_argument("--to", required=True, choices=("alpaca", "sharegpt", "openai"), help="output format")
    p.add_argument("--from", dest="source_format", default="auto", choices=("auto", "alpaca", "sharegpt", "openai"),
                   help="input format (default: detected from the first record, with the reason printed)")
    p.add_argument("--limit", type=int, metavar="N", help="write at most N records (the first N valid ones)")
    p.add_argument("--map", dest="mapping", metavar="TARGET=SOURCE,...",
                   help="copy source columns to the format's names, e.g. instruction=question,output=answer")
    p.add_argument("--output-template", metavar="TEXT",
                   help=r'build the alpaca output from record fields, e.g. "{solution}\n#### {answer}" '
                   r"(\n and \t are newline and tab)")
    p.add_argument("--keep-extra", action="store_true", help="keep fields nothing used (ids, scores, ...)")
    p.add_argument("--skip-invalid", action="store_true",
                   help="skip invalid records and report them (default: stop at the first one)")

    p = sub.add_parser("split", help="reproducible random train / eval selection",
                       description="Draw train and eval records at random (seeded) and write <name>_train and "
                       "<name>_eval files. Counts are whole numbers (2000), fractions have a point (0.1).")
    p.add_argument("src", metavar="IN", help="input file or folder")
    p.add_argument("--train", required=True, metavar="N|FRACTION", help="train records: a count or a fraction")
    p.add_argument("--eval", dest="eval_", default="0", metavar="N|FRACTION",
                   help="eval records: a count or a fraction (default 0: no eval file)")
    p.add_argument("--seed", type=int, default=42, help="random seed (default 42)")
    p.add_argument("--head", type=float, metavar="FRACTION",
                   help="draw train from the first FRACTION of the file and eval from the rest (never overlapping)")
    p.add_argument("--out-dir", default=".", help="where to write the two files (default: the current directory)")
    p.add_argument("--skip-invalid", action="store_true", help="skip unreadable records instead of stopping")

    p = sub.add_parser("validate", help="check every record as training would; token lengths with a tokenizer",
                       description="Report every invalid record with its file, line or index and reason; with "
                       "--model/--template/--cutoff-len, also token lengths, samples over cutoff_len, samples "
                       "that would lose their whole response, and trained tokens. Exit code 0 only when clean.")
    _dataset_args(p)
    _token_args(p, cutoff=True)

    p = sub.add_parser("stats", help="counts, turns, lengths, Chinese share, duplicates",
                       description="Counts, turns per conversation, prompt/response length histograms (characters; "
                       "tokens with --model or --template), share of Chinese text, exact duplicates.")
    _dataset_args(p)
    _token_args(p, cutoff=False)
    p.add_argument("--plot", metavar="OUT.png", help="also draw the histograms into an image")

    p = sub.add_parser("preview", help="show samples as the model sees them, trained tokens marked",
                       description="Print the first samples after the chat template, trained tokens in [[brackets]] "
                       "(green in a terminal). Without --model: the offline Qwen2.5 tokenizer and template qwen.")
    _dataset_args(p)
    p.add_argument("-n", type=int, default=3, help="how many samples (default 3)")
    p.add_argument("--model", metavar="PATH", help="model folder or hub id whose tokenizer to use")
    p.add_argument("--template", metavar="NAME", help="chat template (default: auto with --model, else qwen)")
    p.add_argument("--cutoff-len", type=int, metavar="N", help="truncate as training does")

    p = sub.add_parser("register", help="add or update an entry in dataset_info.json (validated first)",
                       description="Validate FILE, then add or update NAME in <dataset-dir>/dataset_info.json, "
                       "keeping every other entry. A different existing entry is replaced only with --force.")
    p.add_argument("name", metavar="NAME", help="dataset name to register")
    p.add_argument("file", metavar="FILE", help="data file or folder (relative paths: cwd, then --dataset-dir)")
    p.add_argument("--dataset-dir", default="data", help="folder of dataset_info.json (default: data)")
    p.add_argument("--formatting", choices=("alpaca", "sharegpt", "openai"), help="default: detected")
    p.add_argument("--columns", metavar="KEY=COLUMN,...", help="e.g. messages=conversations,system=sys")
    p.add_argument("--tags", metavar="KEY=TAG,...", help="e.g. role_tag=from,content_tag=value,user_tag=human")
    p.add_argument("--force", action="store_true", help="replace a different existing entry")
    return parser


def _dataset_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("dataset", metavar="NAME|PATH", help="a name from dataset_info.json, or a file or folder")
    p.add_argument("--dataset-dir", default="data", help="folder of dataset_info.json (default: data)")


def _token_args(p: argparse.ArgumentParser, cutoff: bool) -> None:
    p.add_argument("--model", metavar="PATH", help="model folder or hub id whose tokenizer to use")
    p.add_argument("--template", metavar="NAME",
                   help="chat template (default: auto with --model; without --model the offline Qwen2.5 "
                   "tokenizer is used with template qwen)")
    if cutoff:
        p.add_argument("--cutoff-len", type=int, metavar="N", help="training's cutoff_len (default 2048)")
    p.add_argument("--workers", type=int, metavar="N", help="tokenizer processes (default: CPU cores, at most 8)")


# ----------------------------------------------------------------------------------------------- the jobs


def run_convert(args: argparse.Namespace) -> int:
    from tunelab.datatools.convert import convert_file

    result = convert_file(args.src, args.out, to=args.to, source_format=args.source_format, limit=args.limit,
                          mapping=args.mapping, output_template=args.output_template, keep_extra=args.keep_extra,
                          skip_invalid=args.skip_invalid)
    print(f"Read {args.src} as {result.formatting} ({result.reason}).")
    print(f"Wrote {result.written:,} {args.to} record{'s' if result.written != 1 else ''} to {args.out}.")
    _print_if(result.skipped.summary())
    return 0


def run_split(args: argparse.Namespace) -> int:
    from tunelab.datatools.split import split_file

    r = split_file(args.src, train=args.train, eval_=args.eval_, seed=args.seed, head=args.head,
                   out_dir=args.out_dir, skip_invalid=args.skip_invalid)
    if args.head is not None:
        print(f"{args.src}: {r.total:,} records; train drawn from records 1-{len(r.pools[0]):,}, eval from "
              f"{len(r.pools[0]) + 1:,}-{r.total:,} (seed {args.seed}).")
    else:
        print(f"{args.src}: {r.total:,} records; train and eval drawn from all of them (seed {args.seed}).")
    print(f"Wrote {r.train:,} train records to {r.train_path}.")
    if r.eval_path:
        print(f"Wrote {r.eval:,} eval records to {r.eval_path}.")
    _print_if(r.skipped.summary())
    return 0


def run_validate(args: argparse.Namespace) -> int:
    from tunelab.datatools.source import local_spec
    from tunelab.datatools.validate import validate_dataset

    spec = local_spec(args.dataset, args.dataset_dir)
    template, cutoff = None, None
    if args.model or args.template or args.cutoff_len:
        template = _template(args.model, args.template)
        cutoff = args.cutoff_len or 2048
    with _progress("validate", template is not None) as progress:
        def report_invalid(invalid: object) -> None:
            if progress is not None:
                progress.clear()
            print(invalid, flush=True)

        report = validate_dataset(spec, report_invalid, template=template, cutoff_len=cutoff,
                                  workers=_workers(args), progress=progress)
    print("\n".join(report.lines()))
    return 0 if report.clean else 1


def run_stats(args: argparse.Namespace) -> int:
    from tunelab.datatools.source import InvalidLog, local_spec
    from tunelab.datatools.stats import collect_stats

    spec = local_spec(args.dataset, args.dataset_dir)
    template = _template(args.model, args.template) if args.model or args.template else None
    log = InvalidLog()
    with _progress("stats", template is not None) as progress:
        report = collect_stats(spec, log, template=template, workers=_workers(args), progress=progress)
    print("\n".join(report.lines()))
    _print_if(log.summary())
    if args.plot and report.valid:
        report.plot(args.plot)
        print(f"Wrote the histograms to {args.plot}.")
    return 0


def run_preview(args: argparse.Namespace) -> int:
    from tunelab.datatools.preview import legend, preview_samples
    from tunelab.datatools.source import InvalidLog, local_spec
    from tunelab.errors import ConfigError

    if args.n < 1:
        raise ConfigError(f"-n must be a positive number of samples, not {args.n}.")
    spec = local_spec(args.dataset, args.dataset_dir)
    template = _template(args.model, args.template)
    colour = sys.stdout.isatty() and "NO_COLOR" not in os.environ
    log = InvalidLog()
    print(legend(colour))
    for block in preview_samples(spec, template, n=args.n, cutoff_len=args.cutoff_len, colour=colour,
                                 on_invalid=log):
        print(block, end="" if block.endswith("\n") else "\n")
    _print_if(log.summary())
    return 0


def run_register(args: argparse.Namespace) -> int:
    import json

    from tunelab.datatools.register import register_dataset

    r = register_dataset(args.name, args.file, dataset_dir=args.dataset_dir, formatting=args.formatting,
                         columns=args.columns, tags=args.tags, force=args.force)
    verb = {"added": "Registered", "replaced": "Replaced", "unchanged": "Already registered"}[r.status]
    print(f"{verb} {args.name!r} in {r.path} ({r.records:,} valid records): "
          f"{json.dumps(r.entry, ensure_ascii=False)}")
    return 0


JOBS: dict[str, Callable[[argparse.Namespace], int]] = {
    "convert": run_convert, "split": run_split, "validate": run_validate, "stats": run_stats,
    "preview": run_preview, "register": run_register,
}

# ----------------------------------------------------------------------------------------------- helpers


def _template(model: str | None, name: str | None):  # -> ChatTemplate
    from tunelab.datatools.tokens import load_template

    template, note = load_template(model, name)
    _print_if(note)
    return template


def _workers(args: argparse.Namespace) -> int:
    from tunelab.datatools.tokens import default_workers
    from tunelab.errors import ConfigError

    if args.workers is not None and args.workers < 1:
        raise ConfigError(f"--workers must be at least 1, not {args.workers}.")
    return args.workers or default_workers()


@contextlib.contextmanager
def _progress(what: str, enabled: bool) -> Iterator[Any]:
    """A Progress display only when tokenizing (reading alone is fast), closed however the job ends."""
    if not enabled:
        yield None
        return
    from tunelab.datatools.tokens import Progress

    progress = Progress(what)
    try:
        yield progress
    finally:
        progress.close()


def _print_if(text: str | None) -> None:
    if text:
        print(text)
