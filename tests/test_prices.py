"""The price table: r1serve's own, a user's, and what the ledger makes of them."""
from __future__ import annotations

import pytest

from r1serve.errors import InvalidRequestError
from r1serve.accounts.database import open_database
from r1serve.accounts.usage_ledger import Ledger, UsageRecord
from r1serve.accounts.prices import load_prices


def record(request_id: str, model: str, prompt: int, cached: int, completion: int) -> UsageRecord:
    return UsageRecord(request_id, None, model, prompt, cached, completion, 0, 5, "ok")


def test_the_default_table_is_deepseeks_and_weighs_a_hit_at_a_tenth():
    table = load_prices()
    price = table.price("any-model")
    assert (price.input_cache_hit, price.input_cache_miss, price.output) == (0.028, 0.28, 0.42)
    assert price.cached_weight == pytest.approx(0.1) and table.currency == "USD" and "DeepSeek" in price.source


@pytest.mark.parametrize("text, says", [
    ("[models.x]\noutput = 1\n", "no [default] table"),
    ("[default]\ninput_cache_hit = 1\ninput_cache_miss = -2\noutput = 1\n", "input_cache_miss must be a number >= 0"),
    ("[default]\ninput_cache_hit = 1\ninput_cache_miss = 2\n", "output must be a number >= 0, not None"),
    ("[default]\ninput_cache_hit = 1\ninput_cache_miss = 2\noutput = 1\ninput = 3\n", "unknown fields ['input']"),
    ("[default\n", "cannot be read"),
])
def test_a_bad_table_is_refused_by_name(tmp_path, text, says):
    path = tmp_path / "p.toml"
    path.write_text(text)
    with pytest.raises(InvalidRequestError, match=str(path)) as e:
        load_prices(path)
    assert says in str(e.value)


def test_the_ledger_charges_and_prices_each_model_by_its_own_row(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text("[default]\ninput_cache_hit = 1\ninput_cache_miss = 1\noutput = 1\n"
                    '[models."r1"]\ninput_cache_hit = 0.14\ninput_cache_miss = 0.55\noutput = 2.19\n')
    ledger = Ledger(open_database(f"sqlite:///{tmp_path / 'l.db'}"), load_prices(path))
    assert ledger.settle(record("a", "r1", 1000, 600, 200), None) == 400 + 153 + 200  # 600 x 0.14/0.55, rounded up
    assert ledger.settle(record("b", "small", 1000, 600, 200), None) == 1200
    rows = {r["model"]: r for r in ledger.summary(by=("model",))}
    assert rows["r1"]["cost"] == pytest.approx((600 * 0.14 + 400 * 0.55 + 200 * 2.19) / 1e6)
    assert rows["small"]["cost"] == pytest.approx(1200 / 1e6)
    # An operator's fixed weight overrides the table's for the quota, never the price.
    fixed = Ledger(ledger.db, load_prices(path), cached_weight=0.5)
    assert fixed.charge(record("c", "r1", 1000, 600, 200)) == 400 + 300 + 200
    assert fixed.cost(record("c", "r1", 1000, 600, 200)) == pytest.approx(rows["r1"]["cost"])
