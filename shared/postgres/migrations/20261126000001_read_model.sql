-- The account read model: one row per account, one row per money movement.
-- Everything here can be dropped and rebuilt from the event store.

CREATE TABLE accounts (
    id          TEXT        PRIMARY KEY,
    currency    TEXT        NOT NULL,
    balance     BIGINT      NOT NULL CHECK (balance >= 0),
    closed      BOOLEAN     NOT NULL DEFAULT FALSE,
    -- The revision of the last event applied: commits apply only at revision + 1.
    revision    BIGINT      NOT NULL CHECK (revision >= 1),
    opened_at   TIMESTAMPTZ NOT NULL,
    updated_at  TIMESTAMPTZ NOT NULL
);

CREATE TABLE transactions (
    account_id  TEXT        NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    revision    BIGINT      NOT NULL,
    kind        TEXT        NOT NULL CHECK (kind IN ('deposit', 'withdrawal')),
    amount      BIGINT      NOT NULL CHECK (amount > 0),
    balance     BIGINT      NOT NULL CHECK (balance >= 0),
    recorded_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (account_id, revision)
);
