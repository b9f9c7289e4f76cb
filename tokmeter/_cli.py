"""The ``tokmeter`` command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

from tokmeter import __version__


def _demo(args: argparse.Namespace) -> int:
    from tokmeter._demo import ModelChoice, format_table, openai_compatible_models, run_demo

    if args.openai_base_url:
        if not (args.llm_model and args.embedding_model and args.embedding_dim):
            print("tokmeter demo: --openai-base-url needs --llm-model, --embedding-model and "
                  "--embedding-dim", file=sys.stderr)
            return 2
        models = openai_compatible_models(args.openai_base_url, args.llm_model,
                                          args.embedding_model, args.embedding_dim, args.api_key)
    else:
        models = ModelChoice()
    if args.workdir:
        workdir = Path(args.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        if any((workdir / "demo").glob("*.json")):
            print(f"tokmeter demo: {workdir} already holds a demo run; choose an empty "
                  "--workdir (documents already ingested would be skipped)", file=sys.stderr)
            return 2
        cleanup = None
    else:
        cleanup = tempfile.TemporaryDirectory(prefix="tokmeter-demo-")
        workdir = Path(cleanup.name)
    print(f"tokmeter demo: {models.label}", file=sys.stderr)
    print(f"tokmeter demo: LightRAG working_dir {workdir} (JSON store, workspace 'demo')",
          file=sys.stderr)
    try:
        rows = asyncio.run(run_demo(workdir, models, progress=sys.stderr))
    finally:
        if cleanup is not None:
            cleanup.cleanup()
    if args.json:
        json.dump(rows, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(format_table(rows))
        if models.label.startswith("OFFLINE"):
            print("\nFigures are exact o200k_base counts of what the offline demo models read "
                  "and wrote, reported the way a provider reports usage.")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokmeter", description="Per-document token metering for LightRAG.")
    parser.add_argument("--version", action="version", version=f"tokmeter {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show LightRAG's log")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo", help="ingest bundled sample documents and show their token usage",
        description="Ingest bundled sample documents (several sizes, one empty, one that fails "
                    "on purpose) through a real LightRAG on the JSON store, then print each "
                    "document's token usage. Uses offline demo models unless an "
                    "OpenAI-compatible endpoint is given.")
    demo.add_argument("--json", action="store_true",
                      help="print a JSON list of "
                           "{doc_id, file_path, status, track_id, token_usage}")
    demo.add_argument("--workdir", help="LightRAG working_dir to keep (default: a temporary one)")
    real = demo.add_argument_group("real models (optional)")
    real.add_argument("--openai-base-url", help="OpenAI-compatible endpoint, e.g. http://host/v1")
    real.add_argument("--llm-model", help="chat model name at that endpoint")
    real.add_argument("--embedding-model", help="embedding model name at that endpoint")
    real.add_argument("--embedding-dim", type=int, help="embedding vector size")
    real.add_argument("--api-key", help="API key (default: $OPENAI_API_KEY)")
    demo.set_defaults(run=_demo)

    from tokmeter._usage_cli import add_usage_command

    add_usage_command(sub)
    from tokmeter._serve import add_serve_command

    add_serve_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_logs(args.verbose)
    result: Any = args.run(args)
    return int(result)


def _quiet_logs(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not verbose:
        import lightrag.utils  # noqa: F401 - configures its logger on import; override after

        for name in ("lightrag", "nano-vectordb"):
            logging.getLogger(name).setLevel(logging.CRITICAL)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
