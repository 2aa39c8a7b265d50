"""OpenAI's API shapes, without a server: errors, stop strings held back from a stream, usage and
server-sent events."""

from __future__ import annotations

import json

from qwenlocal.generation.engine import Engine, EngineError, Job
from qwenlocal.generation.generate import Summary
from qwenlocal.generation.reasoning import partial_suffix

RETRY_AFTER_S = 1
ENGINE_STATUS = {"queue_full": 503, "shutting_down": 503, "client_closed": 499}


# -- errors in OpenAI's shape --------------------------------------------------------------------
class APIError(Exception):
    """An HTTP error answered as {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        param: str | None = None,
        type: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.type = status, message, code, param, type
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    @classmethod
    def from_engine(cls, e: EngineError) -> APIError:
        status = ENGINE_STATUS[e.code]
        if status == 499:
            return cls(status, str(e), e.code)
        return cls(status, str(e), e.code, type="server_error", headers={"Retry-After": str(RETRY_AFTER_S)})


# -- stop strings ---------------------------------------------------------------------------------
class StopBuffer:
    """Holds back streamed text that may be the start of a stop string, so a stream never sends
    text at or past one (the Generator checks stops only after yielding the token)."""

    def __init__(self, stop: list[str]):
        self.stop, self.text, self.sent, self.stopped = stop, "", 0, False

    def add(self, piece: str) -> str:
        if self.stopped:
            return ""
        self.text += piece
        hits = [i for s in self.stop if (i := self.text.find(s, self.sent)) >= 0]
        if hits:
            self.stopped, end = True, min(hits)
        else:
            end = len(self.text) - max((partial_suffix(self.text, s) for s in self.stop), default=0)
        out, self.sent = self.text[self.sent : end], max(self.sent, end)
        return out

    def finish(self, final_text: str) -> str:
        """The rest of the final text (the Generator's, already cut at the first stop string)."""
        out, self.sent = final_text[self.sent :], len(final_text)
        return out


def submit(engine: Engine, job: Job) -> None:
    try:
        engine.submit(job)
    except EngineError as e:
        raise APIError.from_engine(e) from None


# -- answers --------------------------------------------------------------------------------------
def usage(s: Summary) -> dict:
    return {
        "prompt_tokens": s.prompt_tokens,
        "completion_tokens": s.generated_tokens,
        "total_tokens": s.prompt_tokens + s.generated_tokens,
        "prompt_tokens_details": {"cached_tokens": s.cached_tokens},
    }


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def as_api_error(e: Exception) -> APIError:
    """An error met while a job ran, as the client gets it."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, EngineError):
        return APIError.from_engine(e)
    return APIError(500, f"Generation failed: {e}", "generation_error", type="server_error")
