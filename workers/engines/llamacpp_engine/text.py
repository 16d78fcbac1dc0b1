"""Text in and out for GGUF models: a tokenizer with the surface ``workers/engines/chat.py``
expects of a Hugging Face tokenizer (so chat rendering and the prompt checks are shared code), and
an exact incremental detokenizer.

Chat templates come from the GGUF's ``tokenizer.chat_template`` metadata and are rendered with
Jinja in a sandbox, the way transformers renders the same template string (SmolLM2's
``<|im_start|>`` turns); a GGUF without one (Gemma 3's) gets the plain format of ``chat.py``.

Detokenizing is exact by construction: llama.cpp gives each token's bytes, and an incremental
UTF-8 decoder holds back a character split over several tokens until it is complete.
"""

from __future__ import annotations

import codecs
import json
from dataclasses import dataclass
from datetime import datetime

from .model import GgufModel


@dataclass(slots=True, frozen=True)
class Encoded:
    input_ids: list[int]


class GgufTokenizer:
    """Tokenizer facade over a :class:`GgufModel`'s vocabulary. Thread-safe (llama.cpp's
    tokenizer is). ``add_bos``: force BOS on (True) or off (False); None keeps the GGUF's rule."""

    def __init__(self, model: GgufModel, add_bos: bool | None = None) -> None:
        self.model = model
        self.add_bos = model.adds_bos if add_bos is None else add_bos
        self.chat_template = model.chat_template()
        self._compiled = None

    def __call__(self, text: str, add_special_tokens: bool = True) -> Encoded:
        ids = self.model.tokenize(text, add_special=False)
        if add_special_tokens and self.add_bos and self.model.bos_id >= 0 and (not ids or ids[0] != self.model.bos_id):
            ids.insert(0, self.model.bos_id)
        return Encoded(ids)

    def token_text(self, token: int) -> str:
        return self.model.piece(token, special=True).decode("utf-8", "replace")

    def apply_chat_template(self, conversation: list[dict], add_generation_prompt: bool = True, tokenize: bool = False) -> str:
        """Render ``conversation`` with the GGUF's template (raises what the template raises)."""
        if tokenize:
            raise ValueError("GgufTokenizer renders text only; tokenize the result")
        if self._compiled is None:
            self._compiled = _environment().from_string(self.chat_template)
        m = self.model
        return self._compiled.render(
            messages=conversation,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.token_text(m.bos_id) if m.bos_id >= 0 else "",
            eos_token=self.token_text(m.eos_id) if m.eos_id >= 0 else "",
        )


def _environment():
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(x, indent=indent, ensure_ascii=ensure_ascii)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


class ByteDetokenizer:
    """Token ids -> text deltas: each token's bytes through an incremental UTF-8 decoder.
    Control tokens (EOS, ``<|im_end|>``) render as nothing, like ``skip_special_tokens``."""

    def __init__(self, model: GgufModel) -> None:
        self.model = model
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        return self._utf8.decode(self.model.piece(token))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)
