"""A reward server for RL pipelines: batched HTTP scoring that a policy trainer (PPO, GRPO, rejection sampling) or a
data-filtering job calls from another process or machine.

Usage::

    python -m coati.serve --model_path out/rm --host 127.0.0.1 --port 8000

Endpoints (JSON in, JSON out, UTF-8):

* ``POST /get_reward``: OpenRLHF's remote reward protocol (``--remote_rm_url http://host:port/get_reward``):
  ``{"query": [text, ...]}``, each text the full prompt + response as the policy produced it (its chat template
  already applied) -> ``{"rewards": [...], "scores": [...], "truncated": [...]}`` in request order (``rewards`` and
  ``scores`` are the same numbers, normalised when normalisation is on; other keys of the request, such as
  OpenRLHF's ``prompts`` and ``labels``, are ignored). The text is tokenized as it is (no special tokens added but the
  tokenizer's BOS where training has one); trailing whitespace and pad tokens are dropped, and the reward token
  (the export's ``reward_token_id``, else the EOS) is appended unless the text already ends with it, so a policy
  output that ends with its EOS and one that does not get the same score. A text longer than ``max_len`` loses
  tokens from its start (after the BOS), never the reward token, as training cuts a prompt.
* ``POST /score``: coati's layout, ``{"prompt": str | messages | null, "responses": [str, ...]}`` or a list of
  those -> ``{"scores": [...], "best": i, "truncated": [...]}`` (a list: ``{"results": [...]}`` in request order).
  Texts are laid out exactly as :class:`~coati.scoring.RewardScorer` lays them out (training's layout, truncation
  included), and the scores equal its scores.
* ``GET /health``: ``{"status": "ready"}`` (the port is bound only after the model has loaded); ``GET /info``:
  model type, layout, ``max_len``, reward token, normalisation, batching settings, counters and version.

Dynamic batching: requests that arrive within ``--max_wait_ms`` of the first waiting one are merged into one forward
pass of at most ``--max_batch_tokens`` tokens; the responses of one prompt (a ``/score`` item, or ``/get_reward``
texts that start with the same tokens, as GRPO's samples of one prompt do) are one packed group
``[P | R1 | ... | RN]`` whose prompt is computed once (:mod:`coati.models.packed_attention`). Within a ``/score``
item, responses whose prompt ``max_len`` cut (by as much as each response needs, training's rule, so they start at
different tokens) are sequences of their own, and the others still share the prompt. Backbones without packed
attention are scored in padded batches. Results go back to each caller in its order.

Limits: ``--max_body_bytes`` (413), ``--max_texts`` per request and ``--max_chars`` per text (422). Malformed JSON,
a body that is not UTF-8 (400), wrong types and empty lists (422) get ``{"error": message, "field": name}``; a full
queue (``--max_queue`` requests waiting) answers 503 with ``Retry-After``; a request still waiting after
``--request_timeout`` seconds answers 504 and is dropped from the queue without delaying the others. SIGTERM (or
Ctrl-C) stops accepting connections, answers the requests already accepted, then exits 0. A bad ``--model_path`` (or
any other option) fails with one ``error: ...`` line and exit code 2 before the port is bound.

FastAPI on uvicorn: a standard ASGI stack with graceful shutdown, whose request handling is plain ``async`` code; the
forward passes run in one worker thread and the encoding (tokenizer, chat template) in others, so the event loop keeps
answering ``/health``, accepting requests and handling SIGTERM whatever a forward or a render does. A chat template
(it comes with the model folder) that renders for longer than
:data:`~coati.data.template.TEMPLATE_SECONDS` is stopped in its thread and the request answered 422.
"""


import argparse
import asyncio
import contextlib
import json
import logging
import math
import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import torch

from coati.config import COUNT, POSITIVE, DefaultsOnceHelpFormatter, Range, checked
from coati.data.packing import prefix_groups
from coati.data.template import Encoded

logger = logging.getLogger("coati.serve")


class RequestError(Exception):
    """A request the server refuses: HTTP ``status``, the ``field`` at fault (``"body"``, ``"query[3]"``, ...) and
    a one-line ``message``."""

    def __init__(self, status: int, field: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.field, self.message, self.headers = status, field, message, headers or {}


def coati_version() -> str:
    """The installed coati-rm version (``"unknown"`` when not installed as a package)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("coati-rm")
    except PackageNotFoundError:
        return "unknown"


class RewardEngine:
    """Scores groups of encoded sequences in one forward pass, the prompt of each group computed once.

    Args:
        scorer: a loaded :class:`~coati.scoring.RewardScorer` (its model, tokenizer, encoder and layout).
        max_batch_tokens: token positions per forward pass; larger batches are split between whole groups.

    Attributes:
        packed: the backbone has packed attention (:data:`~coati.models.backbones.BACKBONES`), so groups are packed
            rows with shared prompts; otherwise padded batches, one row per sequence.
        forward_passes: forward passes run so far; sequences_scored: sequences scored so far; positions_computed:
            token positions run through the model so far, packed backbones only (a shared prompt counts once).
    """

    def __init__(self, scorer, max_batch_tokens: int = 16384):
        from coati.models.backbones import BACKBONES

        self.scorer, self.max_batch_tokens = scorer, max_batch_tokens
        backbone = scorer.model.backbone
        self.packed = backbone.name in BACKBONES
        self.capacity = backbone.row_capacity(scorer.encoder.max_len, True) if self.packed else 0
        self.forward_passes = self.sequences_scored = self.positions_computed = 0

    # ------------------------------------------------------------------ encoding (event-loop side, cheap)

    def encode_query(self, text: str) -> Encoded:
        """One ``/get_reward`` text as scored token ids (see the module docstring): its tokens, the reward token at
        the end, at most ``max_len`` tokens (the start cut, ``prompt_truncated`` set).

        Raises:
            ValueError: an empty text (nothing but whitespace).
        """
        scorer = self.scorer
        enc, tok = scorer.encoder, scorer.tokenizer
        text = text.rstrip()
        if not text:
            raise ValueError("is empty")
        ids = tok(text, add_special_tokens=False).input_ids
        pad = tok.pad_token_id
        while ids and ids[-1] == pad and pad != enc.reward_token_id:
            ids.pop()
        prefix = enc.prefix if scorer.layout == "coati" else []
        if prefix and ids[:len(prefix)] != prefix:
            ids = prefix + ids
        if not ids or ids[-1] != enc.reward_token_id:
            ids.append(enc.reward_token_id)
        cut = len(ids) > enc.max_len
        if cut:
            ids = prefix + ids[len(ids) - (enc.max_len - len(prefix)):]
        return Encoded(ids, cut, False)

    # ------------------------------------------------------------------ scoring (worker thread)

    @torch.no_grad()
    def rewards(self, groups: list[list[list[int]]]) -> list[list[float]]:
        """Raw rewards of ``groups`` (each a list of token-id sequences ending in the reward token), in the same
        nesting and order. Called from one thread at a time (the server's worker thread). Packed: the sequences of a
        group that share a start are one packed group, the prompt computed once
        (:func:`~coati.data.packing.item_groups`).

        Raises:
            ValueError: a reward that is not finite (see :meth:`~coati.scoring.RewardScorer.score_ids`).
        """
        from coati.data.packing import item_groups, pack_groups

        if not self.packed:  # padded batches, one row per sequence
            flat = [s for g in groups for s in g]
            values = self.scorer.score_ids(flat).tolist()
            self.forward_passes += -(-len(flat) // self.scorer.batch_size)
        else:
            values = []
            for chunk in self._chunks(groups):
                packed, count = [], 0  # each sequence numbered in the order of ``values``
                for seqs in chunk:  # sequences sharing a start: one group each start (item_groups)
                    packed += item_groups(seqs, list(range(count, count + len(seqs))), self.capacity)
                    count += len(seqs)
                inputs = pack_groups(packed, count, self.scorer.tokenizer.pad_token_id, self.capacity)
                self.positions_computed += inputs["input_ids"].numel()
                out = self.scorer.model(**{k: v.to(self.scorer.device) for k, v in inputs.items()})
                values += out.float().cpu().tolist()
                self.forward_passes += 1
            if not all(map(math.isfinite, values)):
                raise ValueError("a score is not finite (NaN/inf): the model's forward pass overflowed or the export "
                                 "is broken")
        self.sequences_scored += len(values)
        res, start = [], 0
        for g in groups:
            res.append(values[start:start + len(g)])
            start += len(g)
        return res

    def _chunks(self, groups: list[list[list[int]]]) -> list[list[list[list[int]]]]:
        """The groups of each forward pass, in order: consecutive groups while their tokens fit ``max_batch_tokens``
        (a group larger than that is a pass of its own)."""
        chunks, size = [[]], 0
        for g in groups:
            n = sum(map(len, g))
            if chunks[-1] and size + n > self.max_batch_tokens:
                chunks.append([])
                size = 0
            chunks[-1].append(g)
            size += n
        return chunks


@dataclass
class Job:
    """One request's sequences, waiting for the batcher: ``groups`` of token-id sequences, their token count and
    the future its handler awaits (cancelled when the request times out or its client goes away)."""

    groups: list[list[list[int]]]
    tokens: int
    future: asyncio.Future


class Batcher:
    """Merges the jobs that arrive together into forward passes (dynamic batching).

    The first waiting job opens a batch; jobs arriving within ``max_wait_ms`` join it while the batch stays within
    ``max_batch_tokens`` (a job that would overflow it opens the next batch). Jobs whose future is already done
    (timed out, client gone) are dropped before the forward pass. At most ``max_queue`` jobs wait; more raise
    :class:`asyncio.QueueFull`.
    """

    def __init__(self, engine: RewardEngine, max_batch_tokens: int, max_wait_ms: float, max_queue: int):
        self.engine, self.max_batch_tokens, self.max_wait = engine, max_batch_tokens, max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.queue: asyncio.Queue | None = None
        self.batches = self.requests = self.dropped = 0
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="coati-forward")

    async def start(self) -> None:
        """Start the batching loop on the running event loop."""
        self.queue = asyncio.Queue(self.max_queue)
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Stop the loop (after uvicorn has answered every accepted request) and the worker thread."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._executor.shutdown(wait=True)

    def submit(self, job: Job) -> None:
        """Queue a job. Raises :class:`asyncio.QueueFull` when ``max_queue`` jobs are waiting."""
        self.queue.put_nowait(job)

    async def _next_batch(self, carry: Job | None) -> tuple[list[Job], Job | None]:
        loop = asyncio.get_running_loop()
        job = carry if carry is not None else await self.queue.get()
        batch, tokens, deadline = [job], job.tokens, loop.time() + self.max_wait
        while tokens < self.max_batch_tokens:
            if self.queue.empty():
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    nxt = await asyncio.wait_for(self.queue.get(), left)
                except TimeoutError:
                    break
            else:
                nxt = self.queue.get_nowait()
            if tokens + nxt.tokens > self.max_batch_tokens:
                return batch, nxt
            batch.append(nxt)
            tokens += nxt.tokens
        return batch, None

    async def _run(self) -> None:
        loop, carry = asyncio.get_running_loop(), None
        while True:
            batch, carry = await self._next_batch(carry)
            live = [j for j in batch if not j.future.done()]
            self.dropped += len(batch) - len(live)
            if not live:
                continue
            groups = [g for j in live for g in j.groups]
            try:
                results = await loop.run_in_executor(self._executor, self.engine.rewards, groups)
            except Exception as e:  # noqa: BLE001 - handed to the waiting requests, the loop goes on
                for j in live:
                    if not j.future.done():
                        j.future.set_exception(e)
                continue
            self.batches += 1
            self.requests += len(live)
            start = 0
            for j in live:
                if not j.future.done():
                    j.future.set_result(results[start:start + len(j.groups)])
                start += len(j.groups)


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
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    batcher = Batcher(engine, settings.max_batch_tokens, settings.max_wait_ms, settings.max_queue)
    scorer = engine.scorer

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    app = FastAPI(title="coati reward server", version=coati_version(), lifespan=lifespan)
    app.state.batcher = batcher

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

    async def read_json(request: Request) -> Any:
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

    async def run(groups: list[list[list[int]]]) -> list[list[float]]:
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

    def served(raw: list[float]) -> list[float]:
        return scorer.normalize(torch.tensor(raw)).tolist() if settings.normalize else raw

    @app.get("/health")
    async def health():
        return {"status": "ready"}

    @app.get("/info")
    async def get_info():
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

    async def off_loop(encode: Callable[[], Any]) -> Any:
        """Run ``encode`` (tokenizer, chat template) in a worker thread, so that a slow one never holds the event
        loop (health, other requests, shutdown); past ``request_timeout`` the request gets a 504 (a chat template
        stops itself after :data:`coati.data.template.TEMPLATE_SECONDS`)."""
        future = asyncio.get_running_loop().run_in_executor(None, encode)
        try:
            return await asyncio.wait_for(future, settings.request_timeout)
        except TimeoutError:
            raise RequestError(504, "server", f"encoding took longer than --request_timeout "
                                              f"{settings.request_timeout} s; the request was dropped") from None

    def encode_queries(queries: list[str]) -> list[Encoded]:
        encoded = []
        for i, q in enumerate(queries):
            try:
                encoded.append(engine.encode_query(q))
            except ValueError as e:
                raise RequestError(422, f"query[{i}]", f"query[{i}] {e}") from None
        return encoded

    def encode_items(items: list, many: bool) -> list[list[Encoded]]:
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

    @app.post("/get_reward")
    async def get_reward(request: Request):
        queries = parse_queries(await read_json(request), settings)
        encoded = await off_loop(lambda: encode_queries(queries))
        seqs = [e.input_ids for e in encoded]
        clusters = prefix_groups(seqs)
        results = await run([[seqs[i] for i in c] for c in clusters])
        raw = [0.0] * len(seqs)
        for c, r in zip(clusters, results):
            for i, v in zip(c, r):
                raw[i] = v
        rewards = served(raw)
        return {"rewards": rewards, "scores": rewards, "truncated": [e.prompt_truncated for e in encoded]}

    @app.post("/score")
    async def score(request: Request):
        items, many = parse_score_items(await read_json(request), settings)
        encoded = await off_loop(lambda: encode_items(items, many))
        results = await run([[e.input_ids for e in enc] for enc in encoded])
        out = []
        for enc, raw in zip(encoded, results):
            scores = served(raw)
            out.append({"scores": scores, "best": scores.index(max(scores)),
                        "truncated": [e.prompt_truncated or e.answer_truncated for e in enc]})
        return {"results": out} if many else out[0]

    return app


# ---------------------------------------------------------------------------------------------- connections

def bounded_h11_protocol(header_timeout: float) -> type:
    """uvicorn's h11 protocol with a deadline on each request's headers: a connection that has not sent a whole
    request head within ``header_timeout`` seconds of opening (or of its previous response) is closed. uvicorn
    bounds idle keep-alive connections but not one that trickles its headers a byte at a time, so a few hundred
    such clients would otherwise hold their connections open for as long as they like."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class BoundedH11Protocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def _in_request(self) -> bool:
            return self.cycle is not None and not self.cycle.response_complete

        def _arm(self) -> None:
            self._disarm()
            self._head_timer = self.loop.call_later(header_timeout, self._head_too_slow)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_too_slow(self) -> None:
            self._head_timer = None
            if not self._in_request() and not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport) -> None:  # noqa: D102
            super().connection_made(transport)
            self._arm()

        def handle_events(self) -> None:  # noqa: D102
            super().handle_events()
            if self._in_request():
                self._disarm()

        def on_response_complete(self) -> None:  # noqa: D102
            super().on_response_complete()
            if not self.transport.is_closing() and not self._in_request():
                self._arm()

        def connection_lost(self, exc) -> None:  # noqa: D102
            self._disarm()
            super().connection_lost(exc)

    return BoundedH11Protocol


# ---------------------------------------------------------------------------------------------- command line

#: the flags' defaults
DEFAULTS = ServeSettings()


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m coati.serve`` argument parser (defaults from :class:`ServeSettings`)."""
    from coati.score import add_model_options

    p = argparse.ArgumentParser(prog="python -m coati.serve", description=__doc__.split("\n\n")[0],
                                formatter_class=DefaultsOnceHelpFormatter)
    p.add_argument("--model_path", required=True, help="exported reward model folder (or another trainer's)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: every interface)")
    p.add_argument("--port", type=checked(int, Range(0, 65535, integer=True)), default=8000, help="port to bind")
    p.add_argument("--normalize", choices=("auto", "true", "false"), default="auto",
                   help="serve (r - reward_mean) / reward_std: auto = when the export's config.json stores the "
                        "statistics (or --reward_mean/--reward_std are given)")
    p.add_argument("--reward_mean", type=checked(float, Range()), default=None, help="override the stored reward_mean")
    p.add_argument("--reward_std", type=checked(float, POSITIVE), default=None, help="override the stored reward_std")
    p.add_argument("--max_batch_tokens", type=checked(int, COUNT), default=DEFAULTS.max_batch_tokens,
                   help="token positions per forward pass (requests are merged up to this)")
    p.add_argument("--max_wait_ms", type=checked(float, Range(0)), default=DEFAULTS.max_wait_ms,
                   help="how long the first waiting request waits for others to join its batch")
    p.add_argument("--max_queue", type=checked(int, COUNT), default=DEFAULTS.max_queue,
                   help="requests waiting at most; more are answered 503 with Retry-After")
    p.add_argument("--request_timeout", type=checked(float, POSITIVE), default=DEFAULTS.request_timeout,
                   help="seconds a request may wait for its scores before a 504")
    p.add_argument("--max_body_bytes", type=checked(int, COUNT), default=DEFAULTS.max_body_bytes,
                   help="largest request body")
    p.add_argument("--max_texts", type=checked(int, COUNT), default=DEFAULTS.max_texts,
                   help="texts per request at most")
    p.add_argument("--max_chars", type=checked(int, COUNT), default=DEFAULTS.max_chars,
                   help="characters per text at most")
    p.add_argument("--max_connections", type=checked(int, COUNT), default=1024,
                   help="open connections at most; a request on one more is answered 503")
    p.add_argument("--header_timeout", type=checked(float, POSITIVE), default=10.0,
                   help="seconds a connection may take to send a request's headers before it is closed")
    p.add_argument("--keep_alive_timeout", type=checked(int, COUNT), default=5,
                   help="seconds an idle keep-alive connection stays open")
    p.add_argument("--shutdown_timeout", type=checked(float, POSITIVE), default=120.0,
                   help="seconds SIGTERM waits for the accepted requests before closing their connections")
    p.add_argument("--log_level", choices=("debug", "info", "warning", "error"), default="info")
    add_model_options(p)
    p.set_defaults(batch_size=16)
    return p


def load(args) -> tuple[RewardEngine, ServeSettings, dict]:
    """Load the model and resolve the options (everything before the port is bound).

    Raises:
        ValueError / OSError / ImportError: a bad model folder, device or option, ``--normalize true`` without
        statistics, FastAPI or uvicorn missing.
    """
    import importlib.util

    from coati.scoring import RewardScorer, resolve_device

    for module in ("fastapi", "uvicorn"):
        if importlib.util.find_spec(module) is None:
            raise ImportError(f"python -m coati.serve needs {module}: pip install -e '.[serve]'")
    device = resolve_device(args.device)
    scorer = RewardScorer.from_pretrained(args.model_path, device=device, dtype=getattr(torch, args.dtype),
                                          max_len=args.max_len, batch_size=args.batch_size,
                                          reward_mean=args.reward_mean, reward_std=args.reward_std,
                                          load_in_4bit=args.load_in_4bit, layout=args.layout)
    normalize = args.normalize == "true" or (args.normalize == "auto" and scorer.reward_mean is not None)
    if normalize:
        scorer.normalize(torch.zeros(1))  # one line naming the missing statistics
    settings = ServeSettings(args.max_batch_tokens, args.max_wait_ms, args.max_queue, args.request_timeout,
                             args.max_body_bytes, args.max_texts, args.max_chars, normalize)
    info = {"model_path": args.model_path, "device": str(device), "dtype": args.dtype,
            "load_in_4bit": args.load_in_4bit}
    return RewardEngine(scorer, args.max_batch_tokens), settings, info


def main(argv: list[str] | None = None) -> int:
    """CLI entry: load, bind, serve until SIGTERM / SIGINT (then exit 0); user errors are one ``error: ...`` line
    with exit code 2, before the port is bound."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), format="[%(asctime)s] %(message)s",
                        datefmt="%H:%M:%S")
    try:
        engine, settings, info = load(args)
    except (ValueError, OSError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import uvicorn

    app = create_app(engine, settings, info)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False,
                            timeout_graceful_shutdown=math.ceil(args.shutdown_timeout),
                            http=bounded_h11_protocol(args.header_timeout), limit_concurrency=args.max_connections,
                            timeout_keep_alive=args.keep_alive_timeout)
    server = uvicorn.Server(config)
    # uvicorn re-raises the signal that stopped it once it has shut down gracefully; these handlers (which it
    # restores first) make that a no-op, so a SIGTERM that was served cleanly ends with exit code 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    logger.info("model %s loaded (%s layout, max_len %d, %s, normalize %s)", args.model_path, engine.scorer.layout,
                engine.scorer.encoder.max_len, "packed groups" if engine.packed else "padded batches",
                settings.normalize)
    server.run()
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
