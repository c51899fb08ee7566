"""Token logprobs in OpenAI's shapes: the chat one (an entry per token with its top
alternatives) and the legacy completions one (parallel lists)."""
from __future__ import annotations

from r1serve.outputs import Logprob

# JSON has no -inf; vLLM reports this for tokens whose probability underflowed.
NEG_INF_LOGPROB = -9999.0


def _entry(token: str, lp: float) -> dict:
    return {"token": token, "logprob": max(lp, NEG_INF_LOGPROB), "bytes": list(token.encode("utf-8"))}


def _token_text(d: dict[int, Logprob], t: int, tokenizer) -> str:
    info = d.get(t)
    return info.decoded_token if info is not None and info.decoded_token is not None else tokenizer.decode([t])


def _top(d: dict[int, Logprob], k: int) -> list[tuple[int, Logprob]]:
    return sorted(((t, v) for t, v in d.items() if v.rank <= k), key=lambda tv: tv[1].rank)


def chat_logprobs(token_ids: list[int], logprobs: list[dict[int, Logprob]], k: int, tokenizer) -> list[dict]:
    """OpenAI chat shape: one entry per token with its top_logprobs."""
    content = []
    for t, d in zip(token_ids, logprobs):
        chosen = d.get(t)
        item = _entry(_token_text(d, t, tokenizer), chosen.logprob if chosen else NEG_INF_LOGPROB)
        item["top_logprobs"] = [_entry(_token_text(d, tt, tokenizer), v.logprob) for tt, v in _top(d, k)]
        content.append(item)
    return content


def completion_logprobs(token_ids: list[int], logprobs: list[dict[int, Logprob]], k: int, tokenizer,
                        offset: int) -> dict:
    """OpenAI legacy completions shape: parallel lists; text_offset counts from `offset`."""
    tokens, token_lps, tops, offsets = [], [], [], []
    for t, d in zip(token_ids, logprobs):
        text = _token_text(d, t, tokenizer)
        chosen = d.get(t)
        tokens.append(text)
        token_lps.append(max(chosen.logprob, NEG_INF_LOGPROB) if chosen else NEG_INF_LOGPROB)
        tops.append({_token_text(d, tt, tokenizer): max(v.logprob, NEG_INF_LOGPROB) for tt, v in _top(d, k)})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}
