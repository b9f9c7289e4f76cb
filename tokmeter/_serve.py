"""``tokmeter serve``: LightRAG's stock API server with every model binding metered.

The stock server (``lightrag-server`` / ``lightrag-gunicorn``) builds its LightRAG
instance inside ``create_app(args)`` from the configured bindings and offers no plugin
point for model functions. :func:`install` patches two names of
``lightrag.api.lightrag_server`` before the app is created:

* ``LightRAG`` becomes :class:`MeteredLightRAG` (``create_app`` looks the name up at
  call time). Its ``__post_init__`` meters the embedding function before LightRAG
  queue-wraps it, its ``_wrap_llm_role_func`` meters each role's raw function (the one
  funnel every role goes through, at start-up and when a role is rebuilt at run time),
  and it calls :func:`tokmeter.instrument` on itself.
* ``create_app`` adds the usage endpoints (:func:`tokmeter.api.usage_router`) under the
  same authentication as LightRAG's own routes.

Everything else (flags, ``.env``, environment, storage selection, gunicorn) is
LightRAG's own code path.
"""

from __future__ import annotations

import argparse
import contextvars
import dataclasses
import functools
import importlib
import importlib.util
import inspect
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from tokmeter._metered import metered, spec_of

logger = logging.getLogger("tokmeter")

#: LLM bindings whose completion functions take a ``token_tracker`` keyword and report
#: the provider's usage through it. Other bindings reject unknown keywords (bedrock
#: forwards them to boto) or drop them (lollms): they are estimated.
TRACKER_BINDINGS = frozenset({"openai", "azure_openai", "gemini", "ollama"})

#: Bindings whose streams only carry usage when asked (``stream_options``).
_STREAM_OPTIONS_BINDINGS = frozenset({"openai", "azure_openai"})

#: Where the server's embedding closure imports each provider function from, at call
#: time. The closure passes no extra keywords, so tokmeter swaps that module attribute
#: for a copy that hands the provider the running metered call's usage sink.
_EMBEDDING_PROVIDERS: dict[str, tuple[str, str]] = {
    "openai": ("lightrag.llm.openai", "openai_embed"),
    "azure_openai": ("lightrag.llm.azure_openai", "azure_openai_embed"),
    "ollama": ("lightrag.llm.ollama", "ollama_embed"),
    "gemini": ("lightrag.llm.gemini", "gemini_embed"),
}

STREAM_USAGE_ENV = "TOKMETER_STREAM_USAGE"

# Set by the patched create_app while the original builds the app: the server
# arguments, and a list collecting the LightRAG instances made meanwhile.
_server_args: contextvars.ContextVar[Any] = contextvars.ContextVar(
    "tokmeter_server_args", default=None
)
_created: contextvars.ContextVar[list[Any] | None] = contextvars.ContextVar(
    "tokmeter_created_instances", default=None
)
_routed_providers: set[tuple[str, str]] = set()


def stream_usage_enabled() -> bool:
    """Whether openai / azure_openai streams ask for a final usage chunk.

    On by default; ``TOKMETER_STREAM_USAGE=0`` turns it off for endpoints that reject
    ``stream_options`` (streamed calls are then estimated).
    """
    value = os.environ.get(STREAM_USAGE_ENV, "1").strip().lower()
    return value not in ("0", "false", "no", "off")


# -- metering the bindings -----------------------------------------------------------
def _with_stream_usage(func: Callable[..., Any]) -> Callable[..., Any]:
    """Ask an OpenAI-style binding for a final usage chunk on streamed calls."""

    @functools.wraps(func)
    async def call(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("stream") and "stream_options" not in kwargs:
            kwargs["stream_options"] = {"include_usage": True}
        return await func(*args, **kwargs)

    return call


def meter_role_function(func: Callable[..., Any], *, binding: str | None,
                        model: str | None) -> Callable[..., Any]:
    """Meter one LLM role's raw function of the stock server.

    The provider's usage is read for bindings that report it (``token_tracker``), the
    rest is estimated. Already metered functions are returned unchanged.
    """
    if spec_of(func) is not None:
        return func
    inner = func
    if (binding in _STREAM_OPTIONS_BINDINGS and stream_usage_enabled()
            and inspect.iscoroutinefunction(func)):
        inner = _with_stream_usage(func)
    if binding is None:
        tracker: bool | None = None  # not a server role: go by the signature
    else:
        tracker = binding in TRACKER_BINDINGS
    return metered("llm", model=model or None, token_tracker=tracker)(inner)


def route_embedding_usage(binding: str | None) -> bool:
    """Let the configured embedding provider report usage to the running metered call.

    Replaces the provider module attribute the server's embedding closure imports at
    call time with a copy whose function receives ``token_tracker`` =
    :func:`tokmeter.current_usage_sink` (when a metered call is running and the caller
    passed none). Only the configured binding's module is touched: importing the
    others installs their SDKs. Returns whether usage is routed for ``binding``.
    """
    where = _EMBEDDING_PROVIDERS.get(binding or "")
    if where is None:
        return False
    if where in _routed_providers:
        return True
    module_name, attr = where
    try:
        module = importlib.import_module(module_name)
        original = getattr(module, attr)
    except Exception:  # never stop the server over metering
        logger.exception("tokmeter: cannot read %s.%s; embedding usage will be estimated",
                         module_name, attr)
        return False
    from lightrag.utils import EmbeddingFunc

    from tokmeter._metered import current_usage_sink

    inner = original.func if isinstance(original, EmbeddingFunc) else original

    @functools.wraps(inner)
    async def with_usage_sink(*args: Any, **kwargs: Any) -> Any:
        sink = current_usage_sink()
        if sink is not None and kwargs.get("token_tracker") is None:
            kwargs["token_tracker"] = sink
        return await inner(*args, **kwargs)

    with_usage_sink.__tokmeter_routed__ = True  # type: ignore[attr-defined]
    if isinstance(original, EmbeddingFunc):
        replacement: Any = dataclasses.replace(original, func=with_usage_sink)
    else:
        replacement = with_usage_sink
    setattr(module, attr, replacement)
    _routed_providers.add(where)
    return True


def _provider_default_model(binding: str | None) -> str | None:
    where = _EMBEDDING_PROVIDERS.get(binding or "")
    module = sys.modules.get(where[0]) if where else None
    found = getattr(getattr(module, where[1], None), "model_name", None) if where else None
    return found if isinstance(found, str) and found else None


def meter_server_embedding(embedding_func: Any, *, binding: str | None) -> Any:
    """Return a copy of the server's ``EmbeddingFunc`` whose function is metered."""
    if spec_of(embedding_func.func) is not None:
        return embedding_func
    routed = route_embedding_usage(binding)
    model = getattr(embedding_func, "model_name", None) or _provider_default_model(binding)
    if not routed and binding is not None:
        logger.info("tokmeter: the %s embedding binding reports no usage; "
                    "embedding tokens are estimated", binding)
    # The closure takes no token_tracker: the routed provider picks the sink up.
    func = metered("embedding", model=model or None, token_tracker=False)(embedding_func.func)
    return dataclasses.replace(embedding_func, func=func)


# -- the LightRAG subclass -----------------------------------------------------------------
def metered_lightrag_class(base: Any) -> Any:
    """A subclass of ``base`` (``lightrag.LightRAG``) that meters and instruments itself."""

    class MeteredLightRAG(base):  # type: ignore[misc]
        """LightRAG whose model functions are metered and whose documents carry usage.

        A plain subclass of the dataclass: it inherits the generated ``__init__``,
        which calls this ``__post_init__``.
        """

        def __post_init__(self, addon_params: Any) -> None:
            args = _server_args.get()
            embedding_func: Any = getattr(self, "embedding_func", None)
            if embedding_func is not None:
                try:
                    self.embedding_func = meter_server_embedding(
                        embedding_func,
                        binding=getattr(args, "embedding_binding", None),
                    )
                except Exception:
                    logger.exception("tokmeter: could not meter the embedding function")
            super().__post_init__(addon_params)
            from tokmeter._instrument import instrument

            instrument(self)
            created = _created.get()
            if created is not None:
                created.append(self)

        def _wrap_llm_role_func(self, role_name: str, raw_func: Callable[..., Any],
                                max_async: int, timeout: int,
                                model_kwargs: dict[str, Any]) -> Callable[..., Any]:
            try:
                state = self._role_llm_states.get(role_name)
                metadata = dict(getattr(state, "metadata", None) or {})
                raw_func = meter_role_function(
                    raw_func,
                    binding=metadata.get("binding"),
                    model=metadata.get("model") or self.llm_model_name,
                )
            except Exception:
                logger.exception("tokmeter: could not meter the %s LLM role", role_name)
            wrapped: Callable[..., Any] = super()._wrap_llm_role_func(
                role_name, raw_func, max_async, timeout, model_kwargs)
            return wrapped

    MeteredLightRAG.__module__ = __name__
    return MeteredLightRAG


# -- patching the stock server -----------------------------------------------------------
def install() -> None:
    """Patch ``lightrag.api.lightrag_server`` so the apps it creates are metered.

    Call it before the server creates its app (``main()``, ``get_application()`` and
    gunicorn's preload all go through ``create_app``). Idempotent.
    """
    from lightrag.api import lightrag_server as server

    if not getattr(server.LightRAG, "__tokmeter_metered__", False):
        cls = metered_lightrag_class(server.LightRAG)
        cls.__tokmeter_metered__ = True
        server.LightRAG = cls
    if getattr(server.create_app, "__tokmeter_metered__", False):
        return
    original = server.create_app

    @functools.wraps(original)
    def create_app(args: Any) -> Any:
        created: list[Any] = []
        args_token = _server_args.set(args)
        created_token = _created.set(created)
        try:
            app = original(args)
        finally:
            _created.reset(created_token)
            _server_args.reset(args_token)
        if created:
            _add_usage_routes(app, created[-1], args)
        else:
            logger.warning("tokmeter: create_app() made no LightRAG instance; "
                           "the usage endpoints are not mounted")
        return app

    create_app.__tokmeter_metered__ = True  # type: ignore[attr-defined]
    server.create_app = create_app


def _add_usage_routes(app: Any, rag: Any, args: Any) -> None:
    from tokmeter.api import usage_router
    from tokmeter.backends import store_for_rag

    # The same key create_app hands LightRAG's own routers.
    api_key = os.getenv("LIGHTRAG_API_KEY") or getattr(args, "key", None)
    app.include_router(usage_router(lambda: store_for_rag(rag), api_key=api_key,
                                    workspace=rag.workspace or ""))


# -- the command -------------------------------------------------------------------------
_HELP_PREFACE = """\
tokmeter {command}: LightRAG's API server with per-document token metering.
Every option below is lightrag-server's own and passes through unchanged.
tokmeter adds:
  --gunicorn                 (serve only) run multi-worker through gunicorn, like
                             lightrag-gunicorn (same as `tokmeter serve-gunicorn`)
  TOKMETER_STREAM_USAGE=0    do not ask openai/azure_openai streams for a usage chunk
Usage endpoints: GET /usage/documents/{{doc_id}}, /usage/tracks/{{track_id}}, /usage/summary
"""


def serve(argv: Sequence[str] = (), *, gunicorn: bool = False) -> int:
    """Run LightRAG's server with metering; ``argv`` are lightrag-server's flags.

    Blocks until the server stops. ``--gunicorn`` in ``argv`` (or ``gunicorn=True``)
    runs LightRAG's gunicorn launcher instead of uvicorn.
    """
    argv = list(argv)
    if "--gunicorn" in argv:
        argv = [a for a in argv if a != "--gunicorn"]
        gunicorn = True
    command = "serve-gunicorn" if gunicorn else "serve"
    missing = [name for name in ("fastapi", "uvicorn", *(["gunicorn"] if gunicorn else []))
               if importlib.util.find_spec(name) is None]
    if missing:
        print(f"tokmeter {command}: LightRAG's API server needs {', '.join(missing)}; "
              "install them with: pip install 'tokmeter[server]'", file=sys.stderr)
        return 2
    if "-h" in argv or "--help" in argv:
        print(_HELP_PREFACE.format(command=command))
    _prepare_offline_tokenizers()
    saved_argv = sys.argv
    # LightRAG reads its flags from sys.argv (lazily, on first use of global_args).
    sys.argv = [f"tokmeter {command}", *argv]
    try:
        from lightrag.api import config

        config.initialize_config(config.parse_args(), force=True)
        install()
        if gunicorn:
            from lightrag.api import run_with_gunicorn

            run_with_gunicorn.main()
        else:
            from lightrag.api import lightrag_server

            lightrag_server.main()
    finally:
        sys.argv = saved_argv
    return 0


def _prepare_offline_tokenizers() -> None:
    from tokmeter._offline import install_tiktoken_rank_files

    try:
        install_tiktoken_rank_files()
    except Exception as exc:  # the server may still work with a reachable network
        logger.warning("tokmeter: could not install tiktoken's rank files offline: %s", exc)


class _PassThroughParser(argparse.ArgumentParser):
    """A subcommand parser that keeps every argument for LightRAG's own parser."""

    def parse_known_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                         namespace: argparse.Namespace | None = None,
                         ) -> tuple[argparse.Namespace, list[str]]:
        namespace = namespace if namespace is not None else argparse.Namespace()
        for key, value in self._defaults.items():
            setattr(namespace, key, value)
        namespace.server_args = list(args) if args is not None else sys.argv[1:]
        return namespace, []


def _run_from_cli(args: argparse.Namespace, *, gunicorn: bool) -> int:
    # Undo the CLI's quiet defaults: the server logs like lightrag-server does.
    for name in ("lightrag", "nano-vectordb"):
        logging.getLogger(name).setLevel(logging.NOTSET)
    return serve(getattr(args, "server_args", []), gunicorn=gunicorn)


def add_serve_command(subparsers: Any) -> None:
    """Register ``tokmeter serve`` and ``tokmeter serve-gunicorn`` on the CLI."""
    for name, gunicorn, summary in (
        ("serve", False, "run LightRAG's API server with token metering "
                         "(lightrag-server's flags pass through; --gunicorn for workers)"),
        ("serve-gunicorn", True, "run LightRAG's multi-worker gunicorn server with token "
                                 "metering (lightrag-gunicorn's flags pass through)"),
    ):
        parser = subparsers.add_parser(name, help=summary, description=summary, add_help=False)
        parser.__class__ = _PassThroughParser
        parser.set_defaults(run=functools.partial(_run_from_cli, gunicorn=gunicorn))
