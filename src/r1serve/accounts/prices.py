"""The price table (prices.toml beside this file, or `--prices FILE`): what a request costs.

Prices are per million tokens, as DeepSeek and OpenAI publish them: a prompt token served
from the prefix cache (a hit), one computed (a miss), and an output token (reasoning
included).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from r1serve.errors import InvalidRequestError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULT_TABLE = Path(__file__).with_name("prices.toml")
FIELDS = ("input_cache_hit", "input_cache_miss", "output")


@dataclass(frozen=True)
class Price:
    input_cache_hit: float  # per million tokens
    input_cache_miss: float
    output: float
    source: str = ""

    @property
    def cached_weight(self) -> float:
        """What a cache-hit prompt token counts against a token quota: its price over a miss's."""
        return self.input_cache_hit / self.input_cache_miss if self.input_cache_miss else 1.0

    def cost(self, prompt_tokens: int, cached_tokens: int, completion_tokens: int) -> float:
        return (cached_tokens * self.input_cache_hit + (prompt_tokens - cached_tokens) * self.input_cache_miss
                + completion_tokens * self.output) / 1e6


@dataclass(frozen=True)
class PriceTable:
    currency: str
    default: Price
    models: dict[str, Price] = field(default_factory=dict)

    def price(self, model: str) -> Price:
        return self.models.get(model, self.default)


def load_prices(path: str | Path | None = None) -> PriceTable:
    """The table at `path` (default: r1serve's own); a malformed one is refused by name."""
    where = Path(path) if path is not None else DEFAULT_TABLE
    try:
        raw = tomllib.loads(where.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise InvalidRequestError(f"--prices {str(where)!r} cannot be read: {e}") from None
    if "default" not in raw:
        raise InvalidRequestError(f"--prices {str(where)!r} has no [default] table (see {DEFAULT_TABLE})")
    models = raw.get("models", {})
    return PriceTable(str(raw.get("currency", "USD")), _price(raw["default"], where, "default"),
                      {name: _price(p, where, f'models."{name}"') for name, p in models.items()})


def _price(raw: dict, where: Path, table: str) -> Price:
    values = {}
    for name in FIELDS:
        v = raw.get(name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            raise InvalidRequestError(f"--prices {str(where)!r}: [{table}] {name} must be a number >= 0, not {v!r}")
        values[name] = float(v)
    unknown = set(raw) - set(FIELDS) - {"source"}
    if unknown:
        raise InvalidRequestError(f"--prices {str(where)!r}: [{table}] has unknown fields {sorted(unknown)}; "
                                  f"a price has {', '.join(FIELDS)} and source")
    return Price(**values, source=str(raw.get("source", "")))
