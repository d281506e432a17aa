"""The frontend's tokenizer: text and chat messages to ids, off the event loop.

Tokenizing a large prompt takes a second per megabyte here, so it never runs on the event loop
that carries every stream and the health service: `encode` first makes the cheap checks that
need no tokenizer (sizes, roles, and whether the character count alone proves the prompt longer
than the context), then tokenizes on a small thread pool. The fast tokenizer releases the GIL.
"""
from __future__ import annotations

import asyncio
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from cluster.frontend.validate import MAX_PROMPT_CHARS, InvalidArgument
from cluster.router import Overloaded
from workers.engine.sampling_params import check_text

ROLES = ("system", "user", "assistant", "tool")


@dataclass(slots=True)
class PromptInput:
    """A request's prompt as sent (text, chat messages or token ids) and the field that holds it."""

    field: str
    text: str | None = None
    # (role, content) or (role, content, {"tool_calls" | "tool_call_id" | "name": ...})
    messages: list[tuple] | None = None
    tools: list[dict] | None = None  # offered to the chat template (where it renders them)
    token_ids: list[int] | None = None


class PromptEncoder:
    def __init__(self, folder, workers: int = 2, max_waiting: int = 256):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        self.has_chat_template = bool(getattr(self.tokenizer, "chat_template", None))
        # No token covers more characters than its longest vocabulary string (a byte-level token's
        # string has one character per byte), so a text of c characters is >= c / this many tokens.
        self.max_token_chars = max(1, max(len(t) for t in self.tokenizer.get_vocab()))
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tpserve-tokenize")
        self._waiting, self._max_waiting = 0, max_waiting

    # ---- checks that need no tokenizer (on the event loop) --------------------------------------
    def check(self, prompt: PromptInput, context: int | None = None) -> None:
        """Sizes and roles; with `context`, refuse text whose length alone proves it too long."""
        if prompt.text is not None:
            if not prompt.text:
                raise InvalidArgument(prompt.field, "is empty")
            chars = len(prompt.text)
            if chars > MAX_PROMPT_CHARS:
                raise InvalidArgument(prompt.field, f"{chars} characters; at most {MAX_PROMPT_CHARS}")
            check_text(prompt.field, prompt.text, InvalidArgument)
        elif prompt.messages is not None:
            chars = self._check_messages(prompt.field, prompt.messages)
        else:
            return
        least = math.ceil(chars / self.max_token_chars)
        if context is not None and least >= context:
            raise InvalidArgument(prompt.field, f"{chars} characters are at least {least} tokens; "
                                                f"the context holds {context}")

    def _check_messages(self, field: str, messages: list[tuple[str, str]]) -> int:
        if not messages:
            raise InvalidArgument(field, "is empty")
        total = 0
        for i, (role, content, *_) in enumerate(messages):
            if role not in ROLES:
                raise InvalidArgument(f"{field}[{i}].role", f"{role!r} is not one of {', '.join(ROLES)}")
            total += len(content)
            if total > MAX_PROMPT_CHARS:  # the whole conversation is bounded like one prompt
                raise InvalidArgument(f"{field}[{i}].content", f"the messages hold more than {MAX_PROMPT_CHARS} "
                                                               f"characters in all ({total} so far)")
            check_text(f"{field}[{i}].content", content, InvalidArgument)
        if not self.has_chat_template:
            raise InvalidArgument(field, "this model has no chat template; send a raw prompt")
        return total

    # ---- tokenizing ------------------------------------------------------------------------------
    async def encode(self, prompt: PromptInput) -> list[int]:
        """Tokenized on the pool (after `check`, which the servicers run before admission);
        token ids pass through untouched."""
        if prompt.token_ids is not None:
            return prompt.token_ids
        if self._waiting >= self._max_waiting:
            raise Overloaded(f"{self._waiting} prompts are waiting to be tokenized; retry later")
        self._waiting += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, self.encode_now, prompt)
        finally:
            self._waiting -= 1

    async def run(self, fn, *args):
        """Other per-request work that must stay off the event loop (the router's block keys)."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def encode_now(self, prompt: PromptInput) -> list[int]:
        """On the calling thread (the pool, or a test); `check` has run."""
        if prompt.text is not None:
            return list(self.tokenizer(prompt.text, add_special_tokens=True).input_ids)
        from jinja2 import TemplateError

        try:
            messages = [{"role": m[0], "content": m[1], **(m[2] if len(m) > 2 else {})} for m in prompt.messages]
            ids = self.tokenizer.apply_chat_template(messages, tools=prompt.tools, add_generation_prompt=True,
                                                     tokenize=True, return_dict=False)
        except TemplateError as e:  # a template's own rule (roles must alternate, no system role...)
            raise InvalidArgument(prompt.field, f"the model's chat template refused them: {e}") from None
        return list(ids)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
