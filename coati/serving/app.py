"""The reward server's HTTP side: request parsing, limits and the FastAPI application (:func:`create_app`).

Endpoints (JSON in, JSON out, UTF-8):

* ``POST /get_reward``: OpenRLHF's remote reward protocol (``--remote_rm_url http://host:port/get_reward``):
  ``{"query": [text, ...]}``, each text the full prompt + response as the policy produced it (its chat template
  already applied) -> ``{"rewards": [...], "scores": [...], "truncated": [...]}`` in request order (``rewards`` and
  ``scores`` are the same numbers, normalised when normalisation is on; other keys of the request, such as
  OpenRLHF's ``prompts`` and ``labels``, are ignored). How a text becomes token ids (reward token, truncation):
  :meth:`~coati.serving.engine.RewardEngine.encode_query`.
* ``POST /score``: coati's layout, ``{"prompt": str | messages | null, "responses": [str, ...]}`` or a list of
  those -> ``{"scores": [...], "best": i, "truncated": [...]}`` (a list: ``{"results": [...]}`` in request order).
  Texts are laid out exactly as :class:`~coati.scoring.RewardScorer` lays them out (training's layout, truncation
  included), and the scores equal its scores.
* ``GET /health``: ``{"status": "ready"}`` (the port is bound only after the model has loaded); ``GET /info``:
  model type, layout, ``max_len``, reward token, normalisation, batching settings, counters and version.

Dynamic batching (:mod:`coati.serving.batcher`): requests that arrive within ``--max_wait_ms`` of the first waiting
one are merged into one forward pass of at most ``--max_batch_tokens`` tokens; the responses of one prompt (a
``/score`` item, or ``/get_reward`` texts that start with the same tokens, as GRPO's samples of one prompt do) are one
packed group ``[P | R1 | ... | RN]`` whose prompt is computed once (:mod:`coati.models.packed_attention`). Within a
``/score`` item, responses whose prompt ``max_len`` cut (by as much as each response needs, training's rule, so they
start at different tokens) are sequences of their own, and the others still share the prompt. Backbones without packed
attention are scored in padded batches. Results go back to each caller in its order.

Limits: ``--max_body_bytes`` (413), ``--max_texts`` per request and ``--max_chars`` per text (422). Malformed JSON,
a body that is not UTF-8 (400), wrong types and empty lists (422) get ``{"error": message, "field": name}``; a full
queue (``--max_queue`` requests waiting) answers 503 with ``Retry-After``; a request still waiting after
``--request_timeout`` seconds answers 504 and is dropped from the queue without delaying the others.

FastAPI on uvicorn: a standard ASGI stack with graceful shutdown, whose request handling is plain ``async`` code; the
forward passes run in one worker thread and the encoding (tokenizer, chat template) in others, so the event loop keeps
answering ``/health``, accepting requests and handling SIGTERM whatever a forward or a render does. A chat template
(it comes with the model folder) that renders for longer than
:data:`~coati.data.template.TEMPLATE_SECONDS` is stopped in its thread and the request answered 422.
"""

import asyncio
import contextlib
import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch

from coati.data.packing import prefix_groups
from coati.data.template import Encoded
from coati.serving.batcher import Batcher, Job
from coati.serving.engine import RewardEngine, coati_version

if TYPE_CHECKING:
    from starlette.requests import Request

logger = logging.getLogger("coati.serve")  # the server's one logger, named after its command


class RequestError(Exception):
    """A request the server refuses: HTTP ``status``, the ``field`` at fault (``"body"``, ``"query[3]"``, ...) and
    a one-line ``message``."""

    def __init__(self, status: int, field: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.field, self.message, self.headers = status, field, message, headers or {}



@dataclass
class ServeSettings:
    """The limits and batching options of a server (``python -m coati.serve`` flags of the same names)."""

    max_batch_tokens: int = 16384
    max_wait_ms: float = 5.0
    max_queue: int = 256
    request_timeout: float = 60.0
    max_body_bytes: int = 8 * 2**20
    max_texts: int = 512
    max_chars: int = 100_000
    normalize: bool = False


# ---------------------------------------------------------------------------------------------- request parsing

def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def parse_body(body: bytes) -> Any:
    """The request body as JSON (strict: no NaN / Infinity literals).

    Raises:
        RequestError: 400 for a body that is not UTF-8 or not JSON (with the byte, or the line and column).
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestError(400, "body", f"the body is not valid UTF-8 (byte {e.start})") from None
    if not text.strip():
        raise RequestError(400, "body", "the body is empty; send a JSON object")
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise RequestError(400, "body", f"the body is not valid JSON: {e.msg} at line {e.lineno} column "
                                        f"{e.colno}") from None
    except ValueError as e:
        raise RequestError(400, "body", f"the body is not valid JSON: {e}") from None
    except RecursionError:
        raise RequestError(400, "body", "the body is nested too deeply") from None


def _text(value: Any, where: str, limit: int) -> str:
    if not isinstance(value, str):
        raise RequestError(422, where, f"{where} must be a string, got {_type(value)}")
    if len(value) > limit:
        raise RequestError(422, where, f"{where} has {len(value)} characters, more than --max_chars {limit}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:  # JSON's "\ud800" escape: a lone surrogate no tokenizer can take
        raise RequestError(422, where, f"{where} is not valid Unicode (a lone surrogate at character {e.start})") \
            from None
    return value


def _type(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def _list(value: Any, where: str) -> list:
    if not isinstance(value, list):
        raise RequestError(422, where, f"{where} must be a list, got {_type(value)}")
    if not value:
        raise RequestError(422, where, f"{where} is empty; give at least one text")
    return value


def parse_queries(data: Any, settings: ServeSettings) -> list[str]:
    """The ``query`` texts of a ``/get_reward`` body. Raises :class:`RequestError` (422) naming the field."""
    if not isinstance(data, dict):
        raise RequestError(422, "body", f"the body must be a JSON object with a 'query' list, got {_type(data)}")
    if "query" not in data:
        raise RequestError(422, "query", "missing field 'query' (a list of prompt + response texts)")
    queries = _list(data["query"], "query")
    if len(queries) > settings.max_texts:
        raise RequestError(422, "query", f"query has {len(queries)} texts, more than --max_texts {settings.max_texts}")
    return [_text(q, f"query[{i}]", settings.max_chars) for i, q in enumerate(queries)]


def parse_score_items(data: Any, settings: ServeSettings) -> tuple[list[tuple[Any, list[str]]], bool]:
    """The ``(prompt, responses)`` items of a ``/score`` body and whether it was a list of them.

    Raises:
        RequestError: 422 naming the field (``prompt``, ``[2].responses[0]``, ...).
    """
    many = isinstance(data, list)
    items = _list(data, "body") if many else [data]
    out, total = [], 0
    for k, item in enumerate(items):
        at = f"[{k}]." if many else ""
        if not isinstance(item, dict):
            raise RequestError(422, f"[{k}]" if many else "body",
                               f"{'each item' if many else 'the body'} must be an object with 'prompt' and "
                               f"'responses', got {_type(item)}")
        if "responses" not in item:
            raise RequestError(422, f"{at}responses", f"missing field '{at}responses' (a list of answer texts)")
        responses = _list(item["responses"], f"{at}responses")
        total += len(responses)
        if total > settings.max_texts:
            raise RequestError(422, f"{at}responses", f"the request has more than --max_texts {settings.max_texts} "
                                                      "responses")
        responses = [_text(r, f"{at}responses[{i}]", settings.max_chars) for i, r in enumerate(responses)]
        prompt = item.get("prompt")
        if isinstance(prompt, str):
            _text(prompt, f"{at}prompt", settings.max_chars)
        elif isinstance(prompt, list):
            for i, m in enumerate(prompt):
                if isinstance(m, dict) and isinstance(m.get("content"), str):
                    _text(m["content"], f"{at}prompt[{i}].content", settings.max_chars)
        elif prompt is not None:
            raise RequestError(422, f"{at}prompt", f"{at}prompt must be a string, a list of messages or null, got "
                                                   f"{_type(prompt)}")
        out.append((prompt, responses))
    return out, many


# ---------------------------------------------------------------------------------------------- handler helpers

async def read_json(request: "Request", settings: ServeSettings) -> Any:
    """The body of a POST as JSON, read as it arrives and never past ``settings.max_body_bytes``.

    Raises:
        RequestError: 415 for a body not sent as ``Content-Type: application/json``, 413 for one larger than
            ``max_body_bytes``, 400 from :func:`parse_body`.
    """
    kind = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if kind != "application/json":
        # a browser page may post a form or text/plain to a loopback server without asking first (a CORS
        # "simple request"); JSON bodies must say they are JSON, which such a page cannot send unasked
        raise RequestError(415, "content-type", f"send the body as JSON with Content-Type: application/json "
                                                f"(got {kind or 'none'!r})")
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > settings.max_body_bytes:
        raise RequestError(413, "body", f"the body has {length} bytes, more than --max_body_bytes "
                                        f"{settings.max_body_bytes}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > settings.max_body_bytes:
            raise RequestError(413, "body", f"the body is larger than --max_body_bytes {settings.max_body_bytes}")
    return parse_body(bytes(body))


async def score_groups(batcher: Batcher, settings: ServeSettings,
                       groups: list[list[list[int]]]) -> list[list[float]]:
    """Raw rewards of ``groups`` (token-id sequences), scored by ``batcher`` together with the other waiting requests.

    Raises:
        RequestError: 503 with ``Retry-After`` when ``max_queue`` requests are waiting, 504 when no result came
            within ``request_timeout`` (the request is dropped from the queue).
    """
    job = Job(groups, sum(len(s) for g in groups for s in g), asyncio.get_running_loop().create_future())
    try:
        batcher.submit(job)
    except asyncio.QueueFull:
        raise RequestError(503, "server", f"the server is busy ({settings.max_queue} requests waiting); retry "
                                          "later", headers={"Retry-After": "1"}) from None
    try:
        return await asyncio.wait_for(job.future, settings.request_timeout)
    except TimeoutError:
        raise RequestError(504, "server", f"no result within --request_timeout {settings.request_timeout} s; "
                                          "the request was dropped") from None


async def off_loop(encode: Callable[[], Any], settings: ServeSettings) -> Any:
    """Run ``encode`` (tokenizer, chat template) in a worker thread, so that a slow one never holds the event
    loop (health, other requests, shutdown); past ``request_timeout`` the request gets a 504 (a chat template
    stops itself after :data:`coati.data.template.TEMPLATE_SECONDS`)."""
    future = asyncio.get_running_loop().run_in_executor(None, encode)
    try:
        return await asyncio.wait_for(future, settings.request_timeout)
    except TimeoutError:
        raise RequestError(504, "server", f"encoding took longer than --request_timeout "
                                          f"{settings.request_timeout} s; the request was dropped") from None


def encode_queries(engine: RewardEngine, queries: list[str]) -> list[Encoded]:
    """The ``/get_reward`` texts as scored token ids (:meth:`RewardEngine.encode_query`).

    Raises:
        RequestError: 422 naming the text (``query[3]``) that cannot be scored.
    """
    encoded = []
    for i, q in enumerate(queries):
        try:
            encoded.append(engine.encode_query(q))
        except ValueError as e:
            raise RequestError(422, f"query[{i}]", f"query[{i}] {e}") from None
    return encoded


def encode_items(scorer, items: list, many: bool) -> list[list[Encoded]]:
    """The ``(prompt, responses)`` items of a ``/score`` request laid out as training lays them out
    (:meth:`~coati.scoring.RewardScorer.encode_texts`), one list of sequences per item.

    Raises:
        RequestError: 422 naming the prompt or responses (``[2].prompt``) that cannot be laid out: an empty
            response, a bad prompt, a chat template that fails or runs past its time.
    """
    encoded = []
    for k, (prompt, responses) in enumerate(items):
        at = f"[{k}]." if many else ""
        try:
            encoded.append(scorer.encode_texts([prompt] * len(responses), responses))
        except ValueError as e:
            msg = str(e)
            where = f"{at}responses" if msg.startswith("responses") else f"{at}prompt"
            raise RequestError(422, where, f"{at}{msg}") from None
    return encoded


def served(scorer, settings: ServeSettings, raw: list[float]) -> list[float]:
    """The rewards a response carries: ``raw`` normalised by the scorer's statistics when ``settings.normalize``."""
    return scorer.normalize(torch.tensor(raw)).tolist() if settings.normalize else raw


def server_info(engine: RewardEngine, batcher: Batcher, settings: ServeSettings, info: dict | None) -> dict:
    """The ``GET /info`` body: ``info``, then the model, layout, limits, batching settings, counters and version."""
    scorer = engine.scorer
    enc, tok = scorer.encoder, scorer.tokenizer
    return {**(info or {}), "model_type": scorer.model.hf_model.config.model_type, "layout": scorer.layout,
            "max_len": enc.max_len, "reward_token_id": enc.reward_token_id,
            "reward_token": tok.convert_ids_to_tokens(enc.reward_token_id),
            "normalize": settings.normalize, "reward_mean": scorer.reward_mean, "reward_std": scorer.reward_std,
            "packed": engine.packed, "max_batch_tokens": settings.max_batch_tokens,
            "max_wait_ms": settings.max_wait_ms, "max_queue": settings.max_queue,
            "request_timeout": settings.request_timeout, "max_body_bytes": settings.max_body_bytes,
            "max_texts": settings.max_texts, "max_chars": settings.max_chars,
            "requests": batcher.requests, "batches": batcher.batches, "dropped": batcher.dropped,
            "forward_passes": engine.forward_passes, "sequences_scored": engine.sequences_scored,
            "positions_computed": engine.positions_computed, "version": coati_version()}


# ---------------------------------------------------------------------------------------------- the app

def create_app(engine: RewardEngine, settings: ServeSettings, info: dict | None = None):
    """The FastAPI application serving ``engine`` (see the module docstring for the endpoints).

    Args:
        engine: the loaded model's :class:`RewardEngine`.
        settings: limits, batching and normalisation.
        info: extra fields of ``GET /info`` (model path, device, ...).
    Raises:
        ImportError: FastAPI is not installed (``pip install -e .[serve]``).
    """
    from fastapi import FastAPI

    batcher = Batcher(engine, settings.max_batch_tokens, settings.max_wait_ms, settings.max_queue)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    app = FastAPI(title="coati reward server", version=coati_version(), lifespan=lifespan)
    app.state.batcher = batcher
    add_error_handlers(app)
    add_status_routes(app, engine, batcher, settings, info)
    add_scoring_routes(app, engine, batcher, settings)
    return app


def add_error_handlers(app) -> None:
    """Every refusal as ``{"error": message, "field": name}``: a :class:`RequestError` with its status and headers,
    Starlette's own HTTP errors (404, 405, ...) with ``field`` null, anything else a logged 500."""
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    @app.exception_handler(RequestError)
    async def _request_error(_request, exc: RequestError):
        return JSONResponse({"error": exc.message, "field": exc.field}, exc.status, headers=exc.headers)

    @app.exception_handler(HTTPException)
    async def _http_error(_request, exc: HTTPException):
        return JSONResponse({"error": str(exc.detail), "field": None}, exc.status_code)

    @app.exception_handler(Exception)
    async def _server_error(_request, exc: Exception):
        logger.exception("error while serving a request")
        return JSONResponse({"error": f"internal error: {exc}", "field": None}, 500)


def add_status_routes(app, engine: RewardEngine, batcher: Batcher, settings: ServeSettings,
                      info: dict | None) -> None:
    """``GET /health`` and ``GET /info`` (:func:`server_info`)."""

    @app.get("/health")
    async def health():
        return {"status": "ready"}

    @app.get("/info")
    async def get_info():
        return server_info(engine, batcher, settings, info)


def add_scoring_routes(app, engine: RewardEngine, batcher: Batcher, settings: ServeSettings) -> None:
    """``POST /get_reward`` (OpenRLHF's protocol) and ``POST /score`` (coati's layout); see the module docstring."""
    from fastapi import Request

    scorer = engine.scorer

    @app.post("/get_reward")
    async def get_reward(request: Request):
        queries = parse_queries(await read_json(request, settings), settings)
        encoded = await off_loop(lambda: encode_queries(engine, queries), settings)
        seqs = [e.input_ids for e in encoded]
        clusters = prefix_groups(seqs)
        results = await score_groups(batcher, settings, [[seqs[i] for i in c] for c in clusters])
        raw = [0.0] * len(seqs)
        for c, r in zip(clusters, results):
            for i, v in zip(c, r):
                raw[i] = v
        rewards = served(scorer, settings, raw)
        return {"rewards": rewards, "scores": rewards, "truncated": [e.prompt_truncated for e in encoded]}

    @app.post("/score")
    async def score(request: Request):
        items, many = parse_score_items(await read_json(request, settings), settings)
        encoded = await off_loop(lambda: encode_items(scorer, items, many), settings)
        results = await score_groups(batcher, settings, [[e.input_ids for e in enc] for enc in encoded])
        out = []
        for enc, raw in zip(encoded, results):
            scores = served(scorer, settings, raw)
            out.append({"scores": scores, "best": scores.index(max(scores)),
                        "truncated": [e.prompt_truncated or e.answer_truncated for e in enc]})
        return {"results": out} if many else out[0]
