"""The request bodies of the serving API (pydantic), and the checks their schema cannot express."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from projects.serve.middleware import BadInput, TooLarge


# --------------------------------------------------------------------------------------------------------
# request and response bodies
class EmbeddingsRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    input: str | list[str] = Field(description="a text or a list of texts")
    model: str | None = Field(None, description="ignored beyond a check: the server has one model")
    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = None


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    query: str | None = Field(None, description="text to embed and search with")
    vector: list[float] | None = Field(None, description="a query vector of the index's dimension")
    top_k: int = Field(10, ge=1, description="how many passages")


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    prompt: str
    model: str | None = None
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=1)
    seed: int | None = Field(None, ge=0, lt=2 ** 63)
    n: int = Field(1, ge=1, le=1, description="only 1 is supported")
    stream: bool = False


def check_text(t: str, what: str, limit: int) -> None:
    if len(t) > limit:
        raise TooLarge(f"{what} has {len(t)} characters; the limit is {limit}")
    try:
        t.encode("utf-8")
    except UnicodeEncodeError:
        raise BadInput(f"{what} is not valid Unicode (lone surrogate)") from None
