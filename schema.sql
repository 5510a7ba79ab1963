-- proxy-pool schema. Applied by `proxy-pool migrate` and at `serve` start, in
-- one transaction under an advisory lock; every statement is idempotent, so
-- running it again (or from an older schema) leaves one correct schema.
-- Rows of `proxies` are never deleted: `is_active` says whether a proxy works now.

CREATE TABLE IF NOT EXISTS proxies (
    id                bigserial PRIMARY KEY,
    protocol          text        NOT NULL,
    ip                inet        NOT NULL,
    port              integer     NOT NULL,
    username          text,
    password          text,
    is_active         boolean     NOT NULL DEFAULT false,
    latency_ms        integer,
    anonymity         text,
    country           text,
    first_seen_at     timestamptz NOT NULL DEFAULT now(),
    last_seen_at      timestamptz NOT NULL DEFAULT now(),
    last_validated_at timestamptz,
    supports_https    boolean,
    exit_ip           inet,
    CONSTRAINT proxies_protocol_check CHECK (protocol IN ('http', 'https', 'socks4', 'socks5')),
    CONSTRAINT proxies_port_check CHECK (port BETWEEN 1 AND 65535),
    CONSTRAINT proxies_anonymity_check CHECK (anonymity IN ('elite', 'anonymous', 'transparent'))
);

-- History of checks, so that a proxy's record stays traceable.
ALTER TABLE proxies ADD COLUMN IF NOT EXISTS check_count integer NOT NULL DEFAULT 0;
ALTER TABLE proxies ADD COLUMN IF NOT EXISTS alive_count integer NOT NULL DEFAULT 0;
-- Why the last check failed (refused, timeout, not_judge, ...), NULL when alive.
ALTER TABLE proxies ADD COLUMN IF NOT EXISTS last_dead_reason text;
-- Which headers gave the proxy away, e.g. 'Via: 1.1 squid', NULL for elite proxies.
ALTER TABLE proxies ADD COLUMN IF NOT EXISTS anonymity_evidence text;
-- Validation leases, so that several instances never check one proxy twice in a cycle.
ALTER TABLE proxies ADD COLUMN IF NOT EXISTS lease_until timestamptz;
-- The https check: why the last one failed (tls_intercepted, connect_refused 403,
-- timeout, ...), NULL when it succeeded or none ran; and when it last ran.
ALTER TABLE proxies ADD COLUMN IF NOT EXISTS https_failure text;
ALTER TABLE proxies ADD COLUMN IF NOT EXISTS https_checked_at timestamptz;

-- One row per distinct proxy: NULL usernames compare equal through coalesce.
CREATE UNIQUE INDEX IF NOT EXISTS proxies_identity
    ON proxies (protocol, ip, port, (coalesce(username, '')));

-- The validator's selection: claims walk the primary key from a cursor (keyset
-- paging), and these partial indexes serve its branches when due rows are few.
-- Never-validated rows have no index of their own: it cost every new proxy an
-- index entry (5% of a first ingest here), and served only the claims and
-- count of a cycle with few due rows (at 1M rows with 1,000 due: a claim 30 ms
-- instead of 4, the count 87 ms instead of 8, once per cycle).
DROP INDEX IF EXISTS proxies_never_validated;
CREATE INDEX IF NOT EXISTS proxies_active_by_validation
    ON proxies (last_validated_at) WHERE is_active;
-- (The re-listing condition, last_seen_at > last_validated_at, is checked on
-- the rows this index finds: an index whose predicate named last_seen_at
-- would turn every re-listing of a proxy into a non-HOT update.)
-- Never-validated rows stay out of it, so a new proxy costs no entry in it.
DROP INDEX IF EXISTS proxies_relisted_inactive;
DROP INDEX IF EXISTS proxies_inactive_by_validation;
CREATE INDEX IF NOT EXISTS proxies_inactive_validated
    ON proxies (last_validated_at) WHERE NOT is_active AND last_validated_at IS NOT NULL;

-- Room on each page for re-listings to be HOT updates (no index entries
-- rewritten): a re-listing touches only unindexed columns (last_seen_at,
-- password), and at 50% every row of a page has room for its next version,
-- so nearly every re-listing stays on its page (at 80% only a quarter did;
-- the rest moved, grew every index and left the table as large as at 50%).
-- Applies to pages written from now on; VACUUM FULL proxies rewrites the rest.
ALTER TABLE proxies SET (fillfactor = 50);

-- Which list gave which proxy: each list's yield (active now, ever active).
-- The list that first gave a proxy is written with its row, for free
-- (proxies.first_list_id, a number from `lists`); every other list that gives
-- it is a row of proxy_sources. The view proxy_lists shows both as one.
CREATE TABLE IF NOT EXISTS lists (
    id            serial      PRIMARY KEY,
    name          text        NOT NULL UNIQUE,
    first_seen_at timestamptz NOT NULL DEFAULT now()
);
-- NULL for proxies stored before this column existed (their lists are in
-- proxy_sources). No foreign key: its row-by-row check slows bulk upserts.
ALTER TABLE proxies ADD COLUMN IF NOT EXISTS first_list_id integer;

-- Lists beyond a proxy's first. last_seen_at is kept for compatibility;
-- re-listings do not rewrite it (proxies.last_seen_at says when any list
-- last listed it).
CREATE TABLE IF NOT EXISTS proxy_sources (
    source        text        NOT NULL,
    proxy_id      bigint      NOT NULL,
    first_seen_at timestamptz NOT NULL DEFAULT now(),
    last_seen_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source, proxy_id)
);
-- Lookups go from a list to its proxies (the primary key); an index by
-- proxy would only slow every link insert down.
DROP INDEX IF EXISTS proxy_sources_proxy;
-- No foreign key to proxies: its row-by-row check made bulk upserts several
-- times slower, and rows of proxies are never deleted, so it guards nothing.
ALTER TABLE proxy_sources DROP CONSTRAINT IF EXISTS proxy_sources_proxy_id_fkey;

-- Every (list, proxy) pair once: a proxy's first list, then the others (a
-- link row naming the first list, as a binary older than first_list_id may
-- write, is not counted twice).
CREATE OR REPLACE VIEW proxy_lists AS
    SELECT l.name AS source, p.id AS proxy_id
    FROM proxies p JOIN lists l ON l.id = p.first_list_id
    UNION ALL
    SELECT s.source, s.proxy_id
    FROM proxy_sources s JOIN proxies p ON p.id = s.proxy_id
        LEFT JOIN lists f ON f.id = p.first_list_id
    WHERE f.name IS DISTINCT FROM s.source;

-- One row per list, so that several instances fetch each list once per interval.
CREATE TABLE IF NOT EXISTS fetch_leases (
    source       text PRIMARY KEY,
    fetched_at   timestamptz NOT NULL,
    fetched_by   text NOT NULL
);

-- Each connection takes ids 50,000 (one batch) at a time: two connections
-- upserting one list's batches then neither queue on the sequence nor fill
-- the same index pages (an 11% faster first ingest of a long list here).
-- Ids only identify: the gaps a connection's unused ids leave mean nothing.
ALTER SEQUENCE proxies_id_seq CACHE 50000;
