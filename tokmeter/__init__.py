"""tokmeter: per-document LLM and embedding token metering for LightRAG.

Decorate your model functions with :func:`metered`, hand them to ``LightRAG(...)``,
call :func:`instrument` on the instance, and every document's doc-status record
carries ``metadata["token_usage"]``.
"""

from __future__ import annotations

from tokmeter._context import (
    current_scope,
    reset_unattributed,
    scope,
    unattributed_usage,
)
from tokmeter._estimate import count_tokens
from tokmeter._instrument import Instrumentation, instrument, instrumentation_of, uninstrument
from tokmeter._metered import ProviderUsage, apportion, current_usage_sink, metered
from tokmeter._offline import install_tiktoken_rank_files
from tokmeter._record import SCHEMA_VERSION, ModelUsage, UsageRecord, UsageScope
from tokmeter.errors import (
    IncompatibleLightRAGError,
    InstrumentationError,
    InvalidWorkspaceError,
    StoreError,
    StoreUnavailableError,
    TokmeterError,
    UnknownWorkspaceError,
)

__version__ = "0.1.0"

__all__ = [
    "SCHEMA_VERSION",
    "IncompatibleLightRAGError",
    "Instrumentation",
    "InstrumentationError",
    "InvalidWorkspaceError",
    "ModelUsage",
    "ProviderUsage",
    "StoreError",
    "StoreUnavailableError",
    "TokmeterError",
    "UnknownWorkspaceError",
    "UsageRecord",
    "UsageScope",
    "apportion",
    "count_tokens",
    "current_scope",
    "current_usage_sink",
    "install_tiktoken_rank_files",
    "instrument",
    "instrumentation_of",
    "metered",
    "reset_unattributed",
    "scope",
    "unattributed_usage",
    "uninstrument",
]


def _install_rank_files_quietly() -> None:
    # LightRAG builds its tiktoken tokenizer when LightRAG(...) is constructed, before
    # any tokmeter code runs: the rank files must be in place as soon as tokmeter is
    # imported, or that first use tries to download them.
    import logging

    try:
        install_tiktoken_rank_files()
    except Exception as exc:  # never make `import tokmeter` fail
        logging.getLogger("tokmeter").warning(
            "tokmeter: could not install tiktoken's rank files for offline use: %s", exc
        )


_install_rank_files_quietly()
