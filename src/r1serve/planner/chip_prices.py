"""What a chip-hour costs (`r1serve hw plan|compare --chip-prices FILE.toml`), and so what
a million output tokens cost on it.

Rental and ownership prices move month to month and differ by provider, so r1serve ships
none: the user brings the table they pay.

    currency = "USD"
    [chips]
    h100 = 2.20          # per chip-hour
    ascend-910c = 1.10
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from r1serve.errors import R1ServeError


@dataclass(frozen=True)
class ChipPrices:
    currency: str
    per_chip_hour: dict[str, float]  # chip id (lower case) -> price of one chip for an hour

    def cost(self, chip_id: str, output_tokens_per_s_per_chip: float | None) -> dict | None:
        """A chip's price and what a million output tokens cost on it (None where unpriced)."""
        hourly = self.per_chip_hour.get(chip_id.lower())
        if hourly is None:
            return None
        per_hour = (output_tokens_per_s_per_chip or 0) * 3600
        return {"currency": self.currency, "per_chip_hour": hourly,
                "per_million_output_tokens": hourly / per_hour * 1e6 if per_hour else None,
                "output_tokens_per_unit": per_hour / hourly if hourly else None}


def load_chip_prices(path: str | Path | None) -> ChipPrices | None:
    if path is None:
        return None
    try:
        raw = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise R1ServeError(f"--chip-prices {str(path)!r} cannot be read: {e}") from None
    chips = raw.get("chips")
    if not isinstance(chips, dict) or not chips:
        raise R1ServeError(f"--chip-prices {str(path)!r} has no [chips] table of chip id = price per chip-hour")
    for chip, price in chips.items():
        if isinstance(price, bool) or not isinstance(price, (int, float)) or price < 0:
            raise R1ServeError(f"--chip-prices {str(path)!r}: {chip} must be a price per chip-hour >= 0, "
                               f"not {price!r}")
    return ChipPrices(str(raw.get("currency", "USD")), {c.lower(): float(p) for c, p in chips.items()})
