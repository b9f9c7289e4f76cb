"""``tokmeter usage``: read and aggregate stored token usage, as a billing job does."""

from __future__ import annotations

import argparse
import asyncio
import csv
import datetime as dt
import io
import json
import sys
from typing import Any

from tokmeter.backends._base import TOTAL_FIELDS
from tokmeter.errors import StoreError, StoreUnavailableError, UnknownWorkspaceError

EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_UNKNOWN_WORKSPACE = 4

DOC_COLUMNS = ("doc_id", "status", "file_path", "total_chunks", "llm_input_tokens",
               "llm_output_tokens", "embedding_tokens", "total_tokens", "estimated", "complete")
TOTAL_COLUMNS = ("key", *TOTAL_FIELDS)


def add_usage_command(sub: Any) -> None:
    """Register ``tokmeter usage`` on the CLI's subparsers."""
    usage = sub.add_parser(
        "usage", help="read or aggregate stored token usage (no LightRAG needed)",
        description="Read per-document token usage from a LightRAG doc-status store, or "
                    "aggregate it in the database. With --track-id and no --group-by, lists "
                    "the documents of that upload; otherwise prints totals.")
    usage.add_argument("--store", required=True,
                       help="json:WORKING_DIR, postgresql://user:pass@host:port/db or "
                            "mongodb://host:port")
    usage.add_argument("--database", help="MongoDB database (default: $MONGO_DATABASE or LightRAG)")
    usage.add_argument("--workspace", default="", help="LightRAG workspace (default: '')")
    usage.add_argument("--track-id", help="only documents of this upload")
    usage.add_argument("--since", type=_timestamp,
                       help="processing ended at or after (ISO date/time, UTC if no zone)")
    usage.add_argument("--until", type=_timestamp,
                       help="processing ended before (ISO date/time, UTC if no zone)")
    usage.add_argument("--group-by", choices=("model", "day", "track_id"))
    usage.add_argument("--format", choices=("table", "json", "csv"), default="table")
    usage.set_defaults(run=run_usage)


def _timestamp(value: str) -> dt.datetime:
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not an ISO date or date-time (e.g. 2026-12-01 or 2026-12-01T08:00)"
        ) from exc
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.timezone.utc)


def run_usage(args: argparse.Namespace) -> int:
    try:
        rows, columns = asyncio.run(_query(args))
    except UnknownWorkspaceError as exc:
        print(f"tokmeter usage: {exc}", file=sys.stderr)
        return EXIT_UNKNOWN_WORKSPACE
    except StoreUnavailableError as exc:
        print(f"tokmeter usage: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except (StoreError, ValueError) as exc:
        print(f"tokmeter usage: {exc}", file=sys.stderr)
        return EXIT_USAGE
    sys.stdout.write(render(rows, columns, args.format))
    return 0


async def _query(args: argparse.Namespace) -> tuple[list[dict[str, Any]], tuple[str, ...]]:
    from tokmeter.backends import open_store

    options: dict[str, Any] = {}
    if args.database:
        options["database"] = args.database
    store = open_store(args.store, workspace=args.workspace, **options)
    async with store:
        if not await store.workspace_exists():
            raise UnknownWorkspaceError(
                f"the store has no LightRAG doc-status data for workspace {args.workspace!r}"
            )
        if args.track_id and not args.group_by and args.since is None and args.until is None:
            docs = await store.usage_for_track(args.track_id)
            return [_doc_row(d) for d in docs], DOC_COLUMNS
        totals = await store.aggregate(since=args.since, until=args.until,
                                       group_by=args.group_by, track_id=args.track_id)
        rows = [t.to_dict() for t in totals]
        for row in rows:
            if row["key"] is None:
                row["key"] = "(all)" if args.group_by is None else "(none)"
        return rows, TOTAL_COLUMNS


def _doc_row(doc: Any) -> dict[str, Any]:
    usage = doc.usage.to_dict() if doc.usage is not None else {}
    return {
        "doc_id": doc.doc_id,
        "status": doc.status,
        "file_path": doc.file_path,
        **{k: usage.get(k) for k in DOC_COLUMNS[3:]},
        "token_usage": usage or None,
    }


def render(rows: list[dict[str, Any]], columns: tuple[str, ...], fmt: str) -> str:
    """Rows as a table, JSON or CSV."""
    if fmt == "json":
        return json.dumps(rows, indent=2, default=str) + "\n"
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=list(columns), extrasaction="ignore",
                                lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return out.getvalue()
    if not rows:
        return "(no metered documents)\n"
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    numeric = [all(isinstance(row.get(c), int) or row.get(c) is None for row in rows)
               for c in columns]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip(),
             "  ".join("-" * w for w in widths)]
    for r in cells:
        lines.append("  ".join(
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(r, widths, numeric, strict=True)).rstrip())
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)
