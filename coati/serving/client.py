"""Clients of ``python -m coati.serve``: a synchronous and an asynchronous helper, and a reward function for TRL's
``GRPOTrainer(reward_funcs=...)``.

Example::

    client = RewardClient("http://127.0.0.1:8000")
    client.score("What is 2+2?", ["4.", "5."])       # {"scores": [...], "best": 0, "truncated": [...]}
    client.get_reward(["<rendered prompt>4.<eos>"])  # [reward]

    reward = RemoteRewardFunction("http://127.0.0.1:8000")
    trainer = GRPOTrainer(model=..., reward_funcs=reward, ...)

A 503 (the server's queue is full) is retried after its ``Retry-After`` (``retries`` times); any other error status
raises :class:`RewardServerError` with the server's message.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import httpx

Prompt = str | Sequence[dict] | None


class RewardServerError(RuntimeError):
    """The server refused a request: ``status`` (HTTP), ``field`` and the server's message."""

    def __init__(self, status: int, message: str, field: str | None = None):
        super().__init__(f"{status}: {message}")
        self.status, self.field = status, field


def _result(response: httpx.Response) -> Any:
    if response.status_code == 200:
        return response.json()
    try:
        body = response.json()
        message, field = body.get("error", response.text), body.get("field")
    except ValueError:
        message, field = response.text, None
    raise RewardServerError(response.status_code, message, field)


def _retry_after(response: httpx.Response) -> float | None:
    if response.status_code != 503:
        return None
    try:
        return max(0.0, float(response.headers.get("retry-after", "1")))
    except ValueError:
        return 1.0


def _items(prompts: Sequence[Prompt], completions: Sequence) -> list[dict]:
    """``/score`` items of consecutive completions that share a prompt (GRPO's generations of one prompt). A
    conversational completion (a list of messages) is scored by its last message's content."""
    items: list[dict] = []
    for prompt, completion in zip(prompts, completions, strict=True):
        text = completion[-1]["content"] if isinstance(completion, (list, tuple)) else completion
        if items and items[-1]["prompt"] == prompt:
            items[-1]["responses"].append(text)
        else:
            items.append({"prompt": prompt if isinstance(prompt, (str, type(None))) else list(prompt),
                          "responses": [text]})
    return items


class RewardClient:
    """Synchronous client (httpx) of a coati reward server.

    Args:
        url: the server's base address, e.g. ``http://127.0.0.1:8000``.
        timeout: seconds per HTTP request; retries: how often a 503 is retried.
    """

    def __init__(self, url: str, timeout: float = 120.0, retries: int = 5):
        self.url, self.retries = url.rstrip("/"), retries
        self._http = httpx.Client(timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RewardClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _post(self, path: str, payload: Any) -> Any:
        for attempt in range(self.retries + 1):
            response = self._http.post(self.url + path, json=payload)
            wait = _retry_after(response)
            if wait is None or attempt == self.retries:
                return _result(response)
            time.sleep(wait)

    def health(self) -> bool:
        """Whether the server answers ``/health`` as ready."""
        try:
            return self._http.get(self.url + "/health").status_code == 200
        except httpx.HTTPError:
            return False

    def info(self) -> dict:
        """``GET /info``: model, layout, max_len, reward token, normalisation, counters."""
        return _result(self._http.get(self.url + "/info"))

    def score(self, prompt: Prompt, responses: Sequence[str]) -> dict:
        """``{"scores": [...], "best": i, "truncated": [...]}`` of N responses to one prompt (Best-of-N)."""
        return self._post("/score", {"prompt": prompt, "responses": list(responses)})

    def score_many(self, items: Sequence[dict]) -> list[dict]:
        """Results of several ``{"prompt", "responses"}`` items in one request, in order."""
        return self._post("/score", list(items))["results"]

    def get_reward(self, queries: Sequence[str]) -> list[float]:
        """OpenRLHF's protocol: rewards of full prompt + response texts, in order."""
        return self._post("/get_reward", {"query": list(queries)})["rewards"]


class AsyncRewardClient:
    """Asynchronous client (httpx.AsyncClient); the methods of :class:`RewardClient`, awaited."""

    def __init__(self, url: str, timeout: float = 120.0, retries: int = 5):
        self.url, self.retries = url.rstrip("/"), retries
        self._http = httpx.AsyncClient(timeout=timeout)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncRewardClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def _post(self, path: str, payload: Any) -> Any:
        for attempt in range(self.retries + 1):
            response = await self._http.post(self.url + path, json=payload)
            wait = _retry_after(response)
            if wait is None or attempt == self.retries:
                return _result(response)
            await asyncio.sleep(wait)

    async def health(self) -> bool:
        try:
            return (await self._http.get(self.url + "/health")).status_code == 200
        except httpx.HTTPError:
            return False

    async def info(self) -> dict:
        return _result(await self._http.get(self.url + "/info"))

    async def score(self, prompt: Prompt, responses: Sequence[str]) -> dict:
        return await self._post("/score", {"prompt": prompt, "responses": list(responses)})

    async def score_many(self, items: Sequence[dict]) -> list[dict]:
        return (await self._post("/score", list(items)))["results"]

    async def get_reward(self, queries: Sequence[str]) -> list[float]:
        return (await self._post("/get_reward", {"query": list(queries)}))["rewards"]


class RemoteRewardFunction:
    """A reward function for TRL's ``GRPOTrainer(reward_funcs=[...])`` that asks a coati reward server.

    TRL calls it as ``reward(prompts=[...], completions=[...], **columns)`` with one prompt per completion (each
    prompt repeated for its generations) and expects one float per completion. Prompts may be strings or lists of
    chat messages, completions strings or lists of messages (the last one's content is scored). Consecutive
    completions of the same prompt go as one ``/score`` item, so the server computes that prompt once.

    Args:
        url: the server's base address; timeout, retries: as :class:`RewardClient`.
        name: the ``__name__`` TRL logs the reward under.
    """

    def __init__(self, url: str, timeout: float = 300.0, retries: int = 5, name: str = "coati_reward"):
        self.client = RewardClient(url, timeout, retries)
        self.__name__ = name

    def __call__(self, prompts: Sequence[Prompt], completions: Sequence, **kwargs) -> list[float]:
        return [s for result in self.client.score_many(_items(prompts, completions)) for s in result["scores"]]
