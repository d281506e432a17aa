"""The frontend's tokenizer: text and chat messages to ids."""
from __future__ import annotations

from cluster.frontend.validate import InvalidArgument

ROLES = ("system", "user", "assistant")


class PromptEncoder:
    def __init__(self, folder):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        self.has_chat_template = bool(getattr(self.tokenizer, "chat_template", None))

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=True).input_ids)

    def encode_chat(self, messages: list[tuple[str, str]], field: str = "messages") -> list[int]:
        if not messages:
            raise InvalidArgument(field, "is empty")
        for i, (role, content) in enumerate(messages):
            if role not in ROLES:
                raise InvalidArgument(f"{field}[{i}].role", f"{role!r} is not one of {', '.join(ROLES)}")
        if not self.has_chat_template:
            raise InvalidArgument(field, "this model has no chat template; send a raw prompt")
        ids = self.tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in messages],
                                                 add_generation_prompt=True, tokenize=True, return_dict=False)
        return list(ids)
