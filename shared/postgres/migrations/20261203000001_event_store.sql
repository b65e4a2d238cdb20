-- The event store on PostgreSQL (tally_postgres::PgEventStore): one row per commit,
-- the outbox and the snapshots beside it.

-- A commit, keyed by its stream and the revision of its first event: of any number of
-- writers inserting the same key, exactly one wins. `body` is the commit as the other
-- stores keep it (StoredCommit JSON). `position` and `tx` order the commits of every
-- stream for a reader of all of them: a reader only takes rows whose transaction is
-- older than every transaction still running (`tx < pg_snapshot_xmin(...)`), so a
-- commit whose transaction commits late is read after those before it, never skipped.
CREATE TABLE event_commits (
    stream        text   NOT NULL,
    revision      bigint NOT NULL CHECK (revision >= 1),
    last_revision bigint NOT NULL CHECK (last_revision >= revision),
    position      bigint GENERATED ALWAYS AS IDENTITY,
    tx            xid8   NOT NULL DEFAULT pg_current_xact_id(),
    body          bytea  NOT NULL,
    PRIMARY KEY (stream, revision)
);
CREATE INDEX event_commits_global ON event_commits (tx, position);
CREATE INDEX event_commits_first ON event_commits (stream) WHERE revision = 1;

-- The outbox: a row per commit still to be published, inserted by the statement that
-- inserts the commit (so neither exists without the other) and deleted once the commit
-- is on the event stream.
CREATE TABLE event_outbox (
    stream      text        NOT NULL,
    revision    bigint      NOT NULL,
    attempt     text        NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (stream, revision, attempt)
);
CREATE INDEX event_outbox_age ON event_outbox (recorded_at);

-- The newest snapshot of each stream (a cache of the stream, never the truth).
CREATE TABLE event_snapshots (
    stream   text   PRIMARY KEY,
    revision bigint NOT NULL,
    body     bytea  NOT NULL
);
