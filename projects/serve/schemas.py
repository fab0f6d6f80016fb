"""The request bodies of the serving API (pydantic), and the checks their schema cannot express."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from projects.serve.middleware import BadInput, TooLarge


# --------------------------------------------------------------------------------------------------------
# request bodies. Unknown fields are refused (422 naming them): a server must do what a parameter asks or
# say it cannot, never ignore it. OpenAI parameters we do not implement are declared with their neutral
# value, so a client sending that default (n=1, presence_penalty=0, ...) works and any other value is
# refused by `refuse_unsupported`.
class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EmbeddingsRequest(Body):
    input: str | list[str] = Field(description="a text or a list of texts")
    model: str | None = Field(None, description="checked against the served model when given")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1, description="only the model's own dimension (no truncation)")
    user: str | None = Field(None, description="an end-user id (accepted, not stored)")


class SearchRequest(Body):
    query: str | None = Field(None, description="text to embed and search with")
    vector: list[float] | None = Field(None, description="a query vector of the index's dimension")
    top_k: int = Field(10, ge=1, description="how many passages")


class StreamOptions(Body):
    include_usage: bool = False


class Sampling(Body):
    """What completions and chat completions share."""
    model: str | None = Field(None, description="checked against the served model when given")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=1, description="not in OpenAI's API (vLLM's extension)")
    seed: int | None = Field(None, ge=0, lt=2 ** 63)
    stop: str | list[str] | None = Field(None, description="up to 4 strings; the text ends before the first "
                                         "one, which is not returned")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, description="an end-user id (accepted, not stored)")
    # not implemented: only the neutral value is accepted
    n: int = Field(1, description="only 1")
    presence_penalty: float = Field(0.0, description="only 0")
    frequency_penalty: float = Field(0.0, description="only 0")
    logit_bias: dict[str, float] | None = Field(None, description="only empty")

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise BadInput(f"stop: at most 4 strings, got {len(stops)}")
        if any(not s for s in stops):
            raise BadInput("stop: empty strings are not allowed")
        return stops


class CompletionRequest(Sampling):
    prompt: str
    max_tokens: int = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=5, description="log-probabilities of the chosen token and the "
                                 "top `logprobs` alternatives, from the model's distribution")
    echo: bool = Field(False, description="only false")
    best_of: int | None = Field(None, description="only 1")
    suffix: str | None = Field(None, description="only none")


class ContentPart(Body):
    type: Literal["text"]
    text: str


class Message(Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]
    name: str | None = Field(None, description="only none")

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="deprecated by OpenAI for max_completion_tokens")
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: dict | None = Field(None, description='only {"type": "text"}')


NEUTRAL = {"n": 1, "presence_penalty": 0.0, "frequency_penalty": 0.0, "logit_bias": None, "echo": False,
           "best_of": None, "suffix": None, "response_format": None, "name": None}


def refuse_unsupported(body: BaseModel, where: str = "") -> None:
    """422 naming the first declared-but-unimplemented parameter whose value is not the neutral one."""
    for k in body.model_fields_set:
        if k in NEUTRAL:
            v = getattr(body, k)
            ok = v == NEUTRAL[k] or (k == "logit_bias" and not v) or (k == "best_of" and v == 1) or \
                (k == "response_format" and v == {"type": "text"})
            if not ok:
                raise BadInput(f"{where}{k}={v!r} is not supported by this server (only the default)")
    if isinstance(body, ChatRequest):
        for i, m in enumerate(body.messages):
            refuse_unsupported(m, f"messages[{i}].")


def check_text(t: str, what: str, limit: int) -> None:
    if len(t) > limit:
        raise TooLarge(f"{what} has {len(t)} characters; the limit is {limit}")
    try:
        t.encode("utf-8")
    except UnicodeEncodeError:
        raise BadInput(f"{what} is not valid Unicode (lone surrogate)") from None
