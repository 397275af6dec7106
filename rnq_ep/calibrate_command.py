"""`rnq-ep calibrate`: its flags, their checks and the command; no torch or transformers until the checks pass.

`calibrate_main` checks every flag, the output folders and the data file before it imports the
model code (`rnq_ep.calibration`, torch, transformers) and loads the model, so bad input is refused
in a moment rather than after the imports and the model load.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path

from rnq_ep.report import check_folder
from rnq_ep.specs import FORMATS, MAX_SEED, SpecError, encode_json, stats_to_dict, write_atomic

BUILTIN = "builtin"  # textdata.BUILTIN (textdata imports torch; a test keeps the two equal)


def check_options(formats: Sequence[str], importance: str | None, cap_factor: float) -> None:
    """Raise SpecError unless formats is a non-empty subset of FORMATS, importance None or 'removal', and
    cap_factor a finite number > 0."""
    bad = [fmt for fmt in formats if fmt not in FORMATS]
    if bad or not formats:
        raise SpecError(f"formats: {list(formats)} is not a non-empty subset of {list(FORMATS)}")
    if importance not in (None, "removal"):
        raise SpecError(f"importance: unknown method {importance!r}, expected 'removal' or none")
    if not (math.isfinite(cap_factor) and cap_factor > 0):
        raise SpecError(f"cap_factor: must be a finite number > 0, got {cap_factor}")



def add_calibrate_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `rnq-ep calibrate`."""
    add = parser.add_argument
    add("--model", required=True, metavar="PATH|tiny-<family>",
        help="save_pretrained folder, or a random-weight tiny model of a family: tiny-mixtral, tiny-qwen3-moe, ... "
        "(an unknown family lists them all)")
    add("--data", default=BUILTIN, metavar="FILE|builtin",
        help="plain-text file, JSONL with a 'text' field, or builtin (Python's help topics, no download)")
    add("--out", required=True, metavar="STATS.json", help="LoadStats JSON to write (input of `rnq-ep plan --loads`)")
    add("--tokens", type=int, default=8192, metavar="N", help="calibration tokens in all")
    add("--batch", type=int, default=8, metavar="B", help="sequences per forward pass")
    add("--seq-len", type=int, default=256, metavar="S", help="tokens per sequence")
    add("--formats", default="int8,int4", metavar="F,F", help="formats to measure quantization sensitivity for")
    add("--importance", choices=["removal"], default=None, help=(
        "also record removal importance, the calibration loss change when each expert is dropped; costs one extra "
        "forward pass per (MoE layer, expert used in the batch): up to layers x experts times the plain run"))
    add("--cap-factor", type=float, default=2.0, metavar="F",
        help="balanced sampling: sensitivity uses at most F x the mean tokens per expert per batch")
    add("--seed", type=int, default=0, metavar="K", help="seed of tiny models and of the sampling")
    add("--spec-out", metavar="MODEL.json", help="also write the model's ModelSpec (input of `rnq-ep plan --model`)")


def check_arguments(args: argparse.Namespace) -> tuple[str, ...]:
    """The --formats of `rnq-ep calibrate` after checking every flag and output folder; SpecError names the flag."""
    for flag, path in (("--out", args.out), ("--spec-out", args.spec_out)):
        check_folder(None if path is None else Path(path), flag)
    for flag, value, least in (("--tokens", args.tokens, 2), ("--batch", args.batch, 1), ("--seq-len", args.seq_len, 2),
                               ("--seed", args.seed, 0)):
        if not least <= value <= MAX_SEED:
            raise SpecError(f"{flag} {value}: expected an integer in [{least}, 2**63)")
    if args.data != BUILTIN and not Path(args.data).is_file():
        raise SpecError(f"--data {args.data}: no such file, expected plain text, JSONL with a 'text' field, or {BUILTIN}")
    formats = tuple(fmt.strip() for fmt in args.formats.split(",") if fmt.strip())
    check_options(formats, args.importance, args.cap_factor)
    return formats


def calibrate_main(args: argparse.Namespace) -> int:
    """`rnq-ep calibrate`: load model and text, calibrate with a progress bar, write the stats file."""
    formats = check_arguments(args)  # every flag and the data file before torch, transformers and the model load
    from rich.console import Console
    from rich.progress import Progress
    from transformers.utils import logging as transformers_logging

    from rnq_ep import hf
    from rnq_ep.calibration import calibrate
    from rnq_ep.textdata import load_text, token_batches, tokenize

    text = load_text(args.data)

    transformers_logging.disable_progress_bar()  # one rich bar, not transformers' tqdm ones
    model, tokenizer, name = hf.load_model(args.model, args.seed)
    ids = tokenize(text, model.config.vocab_size, tokenizer)
    batches = token_batches(ids, args.batch, args.seq_len, args.tokens)
    with Progress(transient=True) as progress:
        batch_bar = progress.add_task("calibrating batches", total=len(batches))
        removal_bar = progress.add_task("removal importance: forwards of this batch", visible=bool(args.importance))
        stats = calibrate(
            model, progress.track(batches, task_id=batch_bar), formats, args.importance, args.cap_factor, args.seed,
            model_name=name, data_name=args.data,
            on_removal_forward=lambda done, total: progress.update(removal_bar, completed=done, total=total),
        )
    write_atomic(args.out, encode_json(stats_to_dict(stats)))
    if args.spec_out:
        write_atomic(args.spec_out, encode_json(hf.model_spec(model, name)))
    total = sum(stats.counts[0]) // stats.top_k
    recorded = f"sensitivity for {', '.join(formats)}" + (", removal importance" if args.importance else "")
    console = Console(stderr=True)
    console.print(
        f"wrote {args.out}: {len(stats.counts)} MoE layers x {stats.num_experts} experts, top-{stats.top_k}, "
        f"{total} tokens, {recorded}", soft_wrap=True,
    )
    where_spec = "" if args.spec_out else " (MODEL.json: the model's MoE shape, which --spec-out writes)"
    console.print(
        f"next: rnq-ep plan --model {args.spec_out or 'MODEL.json'} --cluster NAME --loads {args.out} "
        f"--out plan.json{where_spec}", soft_wrap=True,
    )
    return 0
