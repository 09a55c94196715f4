"""`pipeline {sample-data,curate,...,run,plan,console}`: a command per stage; `run` for all; `console` over them.

Every stage reads the previous stage's folder and writes its own under runs/<name>/<stage>/.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
import traceback
from pathlib import Path

from pipeline import journal, terminal
from pipeline.config import DEFAULT_CONFIG, ConfigError, PipelineConfig, keys_help, load_config
from pipeline.errors import CheckpointDamagedError, QualityGateError, inner
from pipeline.terminal import say

log = logging.getLogger("pipeline")
DEMO_TOKENS = 32

EPILOG = """examples:
  pipeline sample-data                       build the demo corpus from this machine's licence texts
  pipeline run                               every stage with configs/demo.yaml, then one HTTP generation
  pipeline train --config my.yaml train.max_steps=200 train.lora.r=8
  pipeline curate --input 'corpus/*.jsonl.gz' --output /data/curated dedup.threshold=0.85
  pipeline distill distill.student_preset=tiny-dense distill.temperature=2
  pipeline adapt --config configs/demo.yaml adapter=support   one LoRA adapter of the config (default: all)
  pipeline eval eval.models=[merged,awq,adapters] eval.limit=100   lm-eval scores of the run's models
  pipeline serve                             serve the last run's model on 127.0.0.1:8000 until Ctrl-C
  pipeline plan --config configs/66b-zero3.yaml train.zero_stage=2   does it fit? (memory per GPU)

With RAY_ADDRESS set (or under `ray job submit`) the stages run on that cluster; otherwise on a
local Ray started in this process."""


VERBOSE = (
    "also show what Ray's workers, Serve and the libraries print (it always goes to runs/<name>/logs/), "
    "and on an error its traceback"
)

# the config sections each command reads, listed by its --help
SECTIONS = {
    "curate": ["name", "runs_dir", "data"],
    "train": ["name", "runs_dir", "model", "train"],
    "quantize": ["name", "runs_dir", "quantize"],
    "distill": ["name", "runs_dir", "distill"],
    "adapt": ["name", "runs_dir", "train", "adapters", "adapters_at_once"],
    "eval": ["name", "runs_dir", "eval"],
    "serve": ["name", "runs_dir", "serve"],
    "run": [
        "name",
        "runs_dir",
        "data",
        "model",
        "train",
        "quantize",
        "distill",
        "adapters",
        "adapters_at_once",
        "eval",
        "serve",
    ],
    "plan": ["name", "model", "train", "quantize", "serve"],
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pipeline", description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("-v", "--verbose", action="store_true", help=VERBOSE)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    stages = {
        "sample-data": "build the demo corpus (data/corpus/: jsonl, a WARC crawl) and instruction set from local text",
        "curate": "read, normalize, filter and deduplicate the corpus (Ray Data)",
        "train": "fine-tune the model with LoRA on Ray Train + DeepSpeed",
        "quantize": "merge the adapter and quantize to AWQ 4-bit (llm-compressor)",
        "distill": "train a smaller student on the merged model's soft targets (Ray Train)",
        "adapt": "train the config's LoRA adapters on the run's model, each from its own data (Ray Train); "
        "`pipeline serve` serves them beside it",
        "eval": "score the run's models (eval.models) on the same tasks with lm-evaluation-harness; "
        "report in runs/<name>/eval/, eval.gate stops a model that lost too much",
        "serve": "serve the exported model on Ray Serve until interrupted",
        "run": "curate -> train -> quantize [-> distill] [-> adapt] -> serve, then print a generation and a summary",
        "plan": "memory per worker for each training stage and per serving replica, with a fits verdict "
        "(starts nothing)",
    }
    for name, help_text in stages.items():
        s = sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=keys_help(SECTIONS.get(name, [])),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        s.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: %(default)s)")
        s.add_argument(
            "-v",
            "--verbose",
            action="store_true",
            default=argparse.SUPPRESS,
            help=VERBOSE,
        )
        s.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. train.lr=1e-4")
        if name == "curate":
            s.add_argument(
                "--input",
                nargs="+",
                help="input files, folders or globs (overrides data.input): jsonl/json/parquet/txt, WARC/WET crawls, "
                "HTML pages, MediaWiki dumps (.xml.bz2), CSV/TSV tables, images with sidecar captions",
            )
            s.add_argument("--output", help="output folder (default: runs/<name>/curate)")
        if name == "sample-data":
            s.add_argument("--out", default="data", help="the corpus goes to OUT/corpus/ (default: %(default)s)")
            s.add_argument("--max-mb", type=float, default=4.0, help="corpus size in MB (default: %(default)s)")
            s.add_argument(
                "--instructions",
                action="store_true",
                help="also rewrite OUT/instructions.jsonl and OUT/preferences.jsonl (the repo ships both)",
            )
        if name == "adapt":
            s.add_argument(
                "--adapter",
                action="append",
                metavar="NAME",
                help="an adapter of the config's `adapters` to train (repeatable; `adapter=NAME` works too; "
                "default: all)",
            )
        if name == "run":
            s.add_argument("--keep-serving", action="store_true", help="leave the endpoint up at the end")
        if name == "plan":
            s.add_argument("--json", action="store_true", help="print the plan as JSON")
        if name in ("train", "run"):
            s.add_argument(
                "--force-memory",
                action="store_true",
                help="start training even when the memory plan says a stage does not fit",
            )
        if name in ("train", "distill", "adapt", "run"):
            s.add_argument(
                "--fresh", action="store_true", help="discard the checkpoints of earlier runs instead of resuming them"
            )
        if name in ("quantize", "run"):
            s.add_argument(
                "--force", action="store_true", help="serve the 4-bit model even when it fails the perplexity gate"
            )
    add_console_parser(sub)
    return p


def add_console_parser(sub) -> None:
    console = sub.add_parser(
        "console",
        help="a web console over the runs (stages, data, training curves, export), a playground and launching",
        description="A web console: every run under --runs with its stages and status, curate's rejects by reason, "
        "training curves, the quantization and eval reports, a chat playground on --endpoint, and a Launch page "
        "(local processes, or Ray jobs on RAY_ADDRESS).",
    )
    console.add_argument("--runs", default="runs", help="the runs folder (default: %(default)s)")
    console.add_argument("--host", default="127.0.0.1", help="beyond 127.0.0.1 it requires PIPELINE_API_KEY")
    console.add_argument("--port", type=int, default=7860, help="(default: %(default)s)")
    console.add_argument(
        "--endpoint",
        default="http://127.0.0.1:8000",
        help="the served model, for the playground (default: %(default)s)",
    )
    console.add_argument("--config", default=str(DEFAULT_CONFIG), help="the Launch page's default config")


def _table(rows: list[tuple[str, object]]) -> str:
    width = max(len(k) for k, _ in rows)
    line = "+" + "-" * (width + 2) + "+" + "-" * 52 + "+"
    body = [f"| {k:<{width}} | {str(v)[:50]:<50} |" for k, v in rows]
    return "\n".join([line, *body, line])


def _wait_for_interrupt() -> None:
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    try:
        while not stop:
            time.sleep(1)
    except KeyboardInterrupt:
        pass


def cmd_sample_data(args) -> None:
    from pipeline.sample_data import build_corpus, build_crawl, write_instructions, write_preferences

    out = Path(args.out)
    files = build_corpus(out / "corpus", max_bytes=int(args.max_mb * 1e6))
    print(f"corpus: {len(files)} jsonl files in {out / 'corpus'}")
    print(f"web crawl of this machine's HTML pages: {build_crawl(out / 'corpus' / 'crawl.warc.gz')}")
    if args.instructions:
        print(f"instructions: {write_instructions(out / 'instructions.jsonl')}")
        print(f"preferences: {write_preferences(out / 'preferences.jsonl', out / 'instructions.jsonl')}")


def cmd_curate(cfg: PipelineConfig, args) -> dict:
    from pipeline.curate.stage import run_curate

    stats = run_curate(cfg, inputs=getattr(args, "input", None), out_dir=getattr(args, "output", None))
    by_step = ", ".join(f"{step} {sum(reasons.values())}" for step, reasons in stats["by_step"].items())
    say(
        f"curate: {stats['docs_in']} in, {stats['kept']} kept, {stats['rejected']} rejected ({by_step or 'none'}) "
        f"at {stats['mb_per_s']:.2f} MB/s; reasons in stats.json, histograms.png"
    )
    return stats


def run_or_skip(cfg: PipelineConfig, stage: str, args, run):
    """`pipeline run` skips a stage done before with the same settings and inputs (pipeline.completion),
    unless --fresh; it reads that run's summary instead."""
    from pipeline.completion import clear_done, finished, mark_done

    if not args.fresh and (summary := finished(cfg, stage)) is not None:
        where = cfg.stage_dir(stage)
        say(f"{stage}: done earlier with these settings and inputs, skipped ({where}; --fresh redoes it)")
        journal.record(cfg, "stage_skipped", stage=stage)
        return summary
    terminal.log_to(stage)
    clear_done(cfg, stage)
    with journal.stage(cfg, stage):
        summary = run()
    mark_done(cfg, stage)
    return summary


def cmd_run(cfg: PipelineConfig, args) -> None:
    from ray import serve

    from pipeline.export.stage import check_gate_before_training, run_quantize
    from pipeline.serving.deploy import deploy, generate
    from pipeline.train.stage import run_train

    t0 = time.time()
    stats = run_or_skip(cfg, "curate", args, lambda: cmd_curate(cfg, args))
    check_gate_before_training(cfg, force=args.force)
    train = run_or_skip(cfg, "train", args, lambda: run_train(cfg, fresh=args.fresh))
    quant = run_or_skip(cfg, "quantize", args, lambda: run_quantize(cfg, force=args.force))
    if cfg.distill.enabled:
        from pipeline.train.distill import run_distill

        distill = run_or_skip(cfg, "distill", args, lambda: run_distill(cfg, fresh=args.fresh))
        say(
            f"distilled student: KL to teacher {distill['kl_to_teacher_before']} -> "
            f"{distill['kl_to_teacher_after']} in {distill['student']}"
        )
    if cfg.adapters:
        terminal.log_to("adapt")
    with journal.stage(cfg, "adapters"):
        adapters = cmd_adapt(cfg, [spec.name for spec in cfg.adapters], args.fresh)
    if cfg.eval.before_serving:
        terminal.log_to("eval")
        with journal.stage(cfg, "eval"):
            cmd_eval(cfg)
    terminal.log_to("serve")
    with journal.stage(cfg, "serve"):
        url = deploy(cfg)
    prompt, key = sample_prompt(cfg), os.environ.get(cfg.serve.api_key_env)
    for model in [None, *adapters]:  # the same question to the model and to each of its adapters
        reply = generate(url, prompt, DEMO_TOKENS, key, model)
        say(f"\nPOST {url}/generate {{'prompt': {prompt!r}, 'model': {model or cfg.name!r}}}\n-> {json.dumps(reply)}")
    say()
    say(
        _table(
            [
                ("docs in / kept / rejected", f"{stats['docs_in']} / {stats['kept']} / {stats['rejected']}"),
                *(
                    (
                        f"train {stage['stage']}: loss, tokens/s",
                        f"{stage['loss_first']:.4f} -> {stage['loss_last']:.4f} in {stage['steps']} steps, "
                        f"{stage['tokens_per_s']:.0f}/s",
                    )
                    for stage in train["stages"]
                ),
                (
                    "quantized size",
                    f"{quant.get('quantized_bytes', quant['merged_bytes']) / 1e6:.2f} MB "
                    f"({quant.get('size_ratio', 1.0):.2f}x of {quant['merged_bytes'] / 1e6:.2f} MB)",
                ),
                (
                    "perplexity 16-bit -> 4-bit",
                    f"{quant['merged_perplexity']:.2f} -> {quant.get('quantized_perplexity', '-')} "
                    f"({quant.get('perplexity_change', 0):+.2%})",
                ),
                *(
                    (
                        f"adapter {name}, {stage['stage']}: held-out loss",
                        f"{stage.get('eval_loss_before', '-')} -> {stage.get('eval_loss_last', '-')}",
                    )
                    for name, m in adapters.items()
                    for stage in m["metrics"]
                ),
                *(
                    (
                        f"adapter {name}: perplexity 16-bit -> 4-bit base",
                        f"{q['merged_perplexity']:.2f} -> {q['quantized_perplexity']:.2f} "
                        f"({q['perplexity_change']:+.2%}){'' if q['passed'] else ' OVER quantize.max_ppl_increase'}",
                    )
                    for name, m in adapters.items()
                    if (q := m.get("quantized_base"))
                ),
                ("endpoint", f"{url}/generate"),
                ("wall time", f"{time.time() - t0:.0f} s"),
            ]
        )
    )
    if os.environ.get("RAY_ADDRESS"):
        # on a cluster the endpoint is the product: it stays up after this driver exits
        say(f"serving at {url} on the cluster; `serve shutdown -y` stops it")
        return
    if args.keep_serving:
        say(f"serving at {url}; Ctrl-C to stop")
        _wait_for_interrupt()
    serve.shutdown()


def cmd_adapt(cfg: PipelineConfig, names: list[str], fresh: bool) -> dict[str, dict]:
    """Each named adapter (skipped when made earlier from the same inputs); their manifests by name."""
    from pipeline.train.adapt import run_adapters

    return run_adapters(cfg, names, fresh)


def cmd_eval(cfg: PipelineConfig) -> dict:
    """Score and print the table, then apply eval.gate (a failed gate leaves its report to read)."""
    from pipeline.eval.report import check_gate, markdown
    from pipeline.eval.stage import run_eval

    report = run_eval(cfg)
    say(markdown(report))
    say(f"eval: {len(report['models'])} model(s) x {len(report['tasks'])} task(s) in {report['wall_s']:.0f} s")
    check_gate(report["gate"])
    return report


def sample_prompt(cfg: PipelineConfig) -> str:
    """serve.demo_prompt, or a held-out prompt of the run's (or its adapters') instruction data, or the start
    of a held-out curated document: something this model was trained to continue, not the demo's licence text."""
    from pipeline.handoff import trained_model
    from pipeline.heldout import split_texts
    from pipeline.loading import load_tokenizer
    from pipeline.train.data import held_out_prompt, instruction_files

    if cfg.serve.demo_prompt:
        return cfg.serve.demo_prompt
    stages = [*cfg.train.stages, *(stage for adapter in cfg.adapters for stage in adapter.stages)]
    files = instruction_files(stages)
    tokenizer = load_tokenizer(trained_model(cfg).base_model, cfg.model.trust_remote_code)
    if files and (prompt := held_out_prompt(files, tokenizer)):
        return prompt
    documents = split_texts(cfg.stage_dir("curate") / "kept", 1, held_out=True)
    return " ".join(documents[0].split()[:8]) if documents else "Hello"


def cmd_serve(cfg: PipelineConfig, args) -> None:
    from ray import serve

    from pipeline.serving.deploy import deploy

    url = deploy(cfg)
    say(f"serving at {url} (POST /generate, GET /healthz); Ctrl-C to stop")
    _wait_for_interrupt()
    serve.shutdown()


# the stage folders each command reads and writes (a URI runs_dir is staged through pipeline.storage)
STAGE_IO = {
    "curate": ([], ["curate"]),
    "train": (["curate"], ["train"]),
    "quantize": (["curate", "train"], ["quantize"]),
    "distill": (["curate", "quantize"], ["distill"]),
    "adapt": (["quantize", "adapters"], ["adapters"]),
    "eval": (["curate", "train", "quantize", "distill", "adapters"], ["eval"]),
    "serve": (["quantize", "adapters"], []),
    "run": (
        ["curate", "train", "quantize", "distill", "adapters"],
        ["curate", "train", "quantize", "distill", "adapters", "eval"],
    ),
}


def run_command(cfg: PipelineConfig, args) -> None:
    from pipeline.completion import clear_done, mark_done

    if args.command == "serve":
        return cmd_serve(cfg, args)
    if args.command == "run":
        return cmd_run(cfg, args)
    if args.command == "eval":  # scores only: nothing later depends on it, so no completion marker
        cmd_eval(cfg)
        return None
    if args.command == "adapt":  # each adapter keeps its own record of what it was made from (train/adapt.py)
        names = args.adapter or [spec.name for spec in cfg.adapters]
        if not names:
            raise ConfigError("this config lists no `adapters`: add one (name, stage: {kind: sft, data: FILE})")
        manifests = cmd_adapt(cfg, names, args.fresh)
        say(json.dumps({name: m["metrics"] for name, m in manifests.items()}, indent=2, default=str))
        return None
    # a single stage: its marker says so once it ends, so that a later `pipeline run` skips it
    elsewhere = getattr(args, "input", None) or getattr(args, "output", None)  # not the config's stage
    if not elsewhere:
        clear_done(cfg, args.command)
    if args.command == "curate":
        cmd_curate(cfg, args)
    elif args.command == "train":
        from pipeline.train.stage import run_train

        summary = run_train(cfg, fresh=args.fresh)
        say(json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=2))
    elif args.command == "quantize":
        from pipeline.export.stage import run_quantize

        say(json.dumps(run_quantize(cfg, force=args.force), indent=2))
    elif args.command == "distill":
        from pipeline.train.distill import run_distill

        summary = run_distill(cfg, fresh=args.fresh)
        say(json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=2))
    if not elsewhere:
        mark_done(cfg, args.command)


def cmd_plan(cfg: PipelineConfig, args) -> None:
    from pipeline.plan import make_plan, report
    from pipeline.preflight import base_architecture

    plan = make_plan(cfg, base_architecture(cfg)[0])
    print(json.dumps(plan.to_json(), indent=2) if args.json else report(plan))


def log_dir(cfg: PipelineConfig) -> Path:
    """runs/<name>/logs; for a URI runs_dir, the run's folder in the local cache (logs are not pushed)."""
    return journal.run_folder(cfg) / "logs"


def cmd_console(args) -> None:
    import uvicorn

    from pipeline.console.app import Settings, make_app, sha256

    key = os.environ.get("PIPELINE_API_KEY")
    if args.host not in ("127.0.0.1", "localhost", "::1") and not key:
        raise ConfigError(f"--host {args.host} opens the console beyond this machine: set PIPELINE_API_KEY first")
    address = os.environ.get("RAY_ADDRESS")
    settings = Settings(Path(args.runs), args.endpoint, sha256(key), address is not None, address, args.config)
    say(f"console at http://{args.host}:{args.port} over {Path(args.runs).resolve()}; Ctrl-C to stop")
    uvicorn.run(make_app(settings), host=args.host, port=args.port, log_level="warning")


def dispatch(args, capture: bool = False) -> None:
    if args.command == "sample-data":
        return cmd_sample_data(args)
    if args.command == "console":
        return cmd_console(args)
    if args.command == "adapt":  # `adapter=NAME` reads like an override but names an adapter
        picked = [o.partition("=")[2] for o in args.overrides if o.startswith("adapter=")]
        args.adapter = (args.adapter or []) + picked
        args.overrides = [o for o in args.overrides if not o.startswith("adapter=")]
    cfg = load_config(args.config, args.overrides)
    if args.command == "plan":
        return cmd_plan(cfg, args)
    from pipeline import preflight
    from pipeline.runtime import init_ray
    from pipeline.storage import staged

    journal.command_started(cfg, args.command, getattr(args, "argv", []))
    try:
        # seconds, before Ray starts
        preflight.check(args.command, cfg, getattr(args, "input", None), getattr(args, "force_memory", False))
        if capture:
            terminal.capture(log_dir(cfg), args.command if args.command != "run" else "ray", args.verbose)
        init_ray()
        reads, writes = STAGE_IO[args.command]
        with staged(cfg, reads, writes) as local:
            # `run` records its stages one by one (run_or_skip); `serve` writes no stage folder
            if args.command in ("run", "serve"):
                run_command(local, args)
            else:
                with journal.stage(cfg, writes[0]):
                    run_command(local, args)
    except BaseException as e:
        interrupted = isinstance(e, KeyboardInterrupt)
        journal.record(cfg, "end", status="interrupted" if interrupted else "failed", reason=describe(e))
        raise
    journal.record(cfg, "end", status="done")
    for stage in writes:
        if local.stage_dir(stage).is_dir():
            where = f"{cfg.runs_dir.rstrip('/')}/{cfg.name}/{stage}" if local is not cfg else local.stage_dir(stage)
            say(f"{stage} outputs: {where}")
    if logs := terminal.logs():
        say(f"logs: {', '.join(p.name for p in logs)} in {logs[0].parent} (-v shows them as they are written)")


# errors whose message is written for the user: shown whole; others show their type and last line
# OSError: a missing input, an unwritable or full disk
USER_ERRORS = (ConfigError, OSError, QualityGateError, CheckpointDamagedError)


def describe(error: BaseException) -> str:
    """One message for any failure: the error a Ray task or training worker raised, not its wrapper."""
    while True:
        cause = inner(error)
        if cause is None or cause is error:
            break
        error = cause
    text = str(error).strip()
    if isinstance(error, USER_ERRORS) or type(error).__name__ == "RecordError":
        return text
    return f"{type(error).__name__}: {text.splitlines()[-1] if text else '(no message)'}"


def main(argv: list[str] | None = None, capture: bool = False) -> int:
    """The CLI. `capture` (the `pipeline` program and the rayjobs/ entrypoints) sends everything but the
    stages' own lines to runs/<name>/logs/ (pipeline.terminal); a caller in process keeps its stdout."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    args = _parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        dispatch(args, capture)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # noqa: BLE001 - every failure ends as one line (-v adds the traceback)
        if args.verbose:
            traceback.print_exc()
        if logs := terminal.logs():
            terminal.error(f"pipeline {args.command}: what Ray and the libraries printed is in {logs[-1]}")
        terminal.error(f"pipeline {args.command}: error: {describe(e)}")
        return 2
    return 0


def entry() -> None:
    sys.exit(main(sys.argv[1:], capture=True))


if __name__ == "__main__":
    entry()
