-- The data keys of holders' personal data, each wrapped by the master key
-- (tally_vault). Deleting a row erases every value sealed under that key, wherever the
-- events went (crypto-shredding). Used when the event store is PostgreSQL.

CREATE TABLE holder_keys (
    id      TEXT  PRIMARY KEY,
    wrapped BYTEA NOT NULL
);
