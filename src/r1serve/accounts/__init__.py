"""The platform's accounts: keys, quotas, rate limits, the usage ledger and its database; no
HTTP (the server's routes and its caller.py stand above it).

    accounts.py         Accounts: keys, ledger and stored responses over one database, a
                        server's lease and admission; Meter: one request's hold and charge
    api_keys.py         API keys: hashed secrets, limits, admin, revocation
    admission.py        rate limits and quota holds, under a lease that dies with the server
    usage_ledger.py     one row per request: tokens, cost, status; summaries
    prices.py           the price table (prices.toml) a request's cost is read from
    settle_journal.py   settlements kept on local disk while the database is away
    database.py         the schema, its migrations, SQLite or PostgreSQL
    database_health.py  whether the database answers, for /health
    response_store.py   Responses API objects kept with store: true
"""
