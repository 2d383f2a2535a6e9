-- pgtrickle-relay catalog, version 1 (docs/interface.md §3: §3.1–3.4 plus the relay-only
-- objects of §3.5).
--
-- pg_trickle 0.29–0.45 ships the §3 objects itself; 0.46+ dropped them, so the relay carries
-- this copy and installs it with `pgtrickle-relay catalog install`. Every statement is
-- idempotent. Run it in ONE transaction (`psql -1 -f catalog.sql`): the advisory lock below is
-- transaction-scoped and serialises installers running against the same database.
--
-- The file has three sections. `pgtrickle-relay catalog install` skips the `core` section when
-- the §3 tables belong to an extension (pg_depend deptype 'e'), so extension-owned objects are
-- never replaced or re-granted; the other two sections always run.

-- >>> section: common

SELECT pg_advisory_xact_lock(hashtextextended('pgtrickle-relay catalog install', 0));

CREATE SCHEMA IF NOT EXISTS pgtrickle;

-- Roles are cluster-wide while the advisory lock above is per database: installs into two
-- databases at once can race on CREATE ROLE, and the loser sees one of these two errors.
DO $do$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'pgtrickle_relay') THEN
        CREATE ROLE pgtrickle_relay NOLOGIN;
    END IF;
EXCEPTION
    WHEN duplicate_object OR unique_violation THEN
        NULL;
END
$do$;

GRANT USAGE ON SCHEMA pgtrickle TO pgtrickle_relay;

-- >>> section: core

CREATE TABLE IF NOT EXISTS pgtrickle.relay_outbox_config (
    name    TEXT    NOT NULL PRIMARY KEY,
    enabled BOOLEAN NOT NULL DEFAULT true,
    config  JSONB   NOT NULL
);

COMMENT ON TABLE pgtrickle.relay_outbox_config IS
    'Forward relay pipelines (outbox -> sink), one row per pipeline; managed with set_relay_outbox().';

CREATE TABLE IF NOT EXISTS pgtrickle.relay_inbox_config (
    name    TEXT    NOT NULL PRIMARY KEY,
    enabled BOOLEAN NOT NULL DEFAULT true,
    config  JSONB   NOT NULL
);

COMMENT ON TABLE pgtrickle.relay_inbox_config IS
    'Reverse relay pipelines (source -> inbox), one row per pipeline; managed with set_relay_inbox().';

CREATE TABLE IF NOT EXISTS pgtrickle.relay_consumer_offsets (
    relay_group_id TEXT        NOT NULL,
    pipeline_id    TEXT        NOT NULL,
    last_change_id BIGINT      NOT NULL DEFAULT 0,
    worker_id      TEXT,
    updated_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (relay_group_id, pipeline_id)
);

COMMENT ON TABLE pgtrickle.relay_consumer_offsets IS
    'Last outbox id published and committed (inclusive) per relay group and forward pipeline.';

-- The payload names the table, not forward/reverse, and carries no config: listeners re-read.
CREATE OR REPLACE FUNCTION pgtrickle.relay_config_notify()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pgtrickle, pg_catalog, pg_temp
AS $fn$
DECLARE
    v_name    TEXT;
    v_enabled BOOLEAN;
BEGIN
    IF TG_OP = 'DELETE' THEN
        v_name    := OLD.name;
        v_enabled := OLD.enabled;
    ELSE
        v_name    := NEW.name;
        v_enabled := NEW.enabled;
    END IF;
    PERFORM pg_notify(
        'pgtrickle_relay_config',
        json_build_object(
            'direction', TG_TABLE_NAME,
            'event',     TG_OP,
            'name',      v_name,
            'enabled',   v_enabled
        )::text
    );
    RETURN NULL;
END;
$fn$;

-- Create only when missing: DROP + CREATE TRIGGER would take an ACCESS EXCLUSIVE lock on a
-- table that running relays read.
DO $do$
BEGIN
    IF NOT EXISTS (
        SELECT 1 FROM pg_catalog.pg_trigger
         WHERE tgname = 'relay_outbox_config_notify'
           AND tgrelid = 'pgtrickle.relay_outbox_config'::regclass
    ) THEN
        CREATE TRIGGER relay_outbox_config_notify
            AFTER INSERT OR UPDATE OR DELETE ON pgtrickle.relay_outbox_config
            FOR EACH ROW EXECUTE FUNCTION pgtrickle.relay_config_notify();
    END IF;
    IF NOT EXISTS (
        SELECT 1 FROM pg_catalog.pg_trigger
         WHERE tgname = 'relay_inbox_config_notify'
           AND tgrelid = 'pgtrickle.relay_inbox_config'::regclass
    ) THEN
        CREATE TRIGGER relay_inbox_config_notify
            AFTER INSERT OR UPDATE OR DELETE ON pgtrickle.relay_inbox_config
            FOR EACH ROW EXECUTE FUNCTION pgtrickle.relay_config_notify();
    END IF;
END
$do$;

CREATE OR REPLACE FUNCTION pgtrickle.set_relay_outbox(
    p_name            TEXT,
    p_outbox          TEXT,
    p_group           TEXT,
    p_sink            JSONB,
    p_retention_hours INT     DEFAULT 24,
    p_enabled         BOOLEAN DEFAULT true
) RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pgtrickle, pg_catalog, pg_temp
AS $fn$
DECLARE
    v_sink_type TEXT := p_sink ->> 'type';
BEGIN
    IF v_sink_type IS NULL OR v_sink_type = '' THEN
        RAISE EXCEPTION 'relay.invalid_config: sink JSONB must contain a "type" key (e.g. "nats", "kafka", "http", "redis", "sqs", "rabbitmq", "stdout", "pg-inbox"). Got %', -- its keys only: values may be secrets
            CASE jsonb_typeof(p_sink) WHEN 'object' THEN 'an object with keys ' || coalesce((SELECT string_agg(quote_ident(k), ', ' ORDER BY k) FROM jsonb_object_keys(p_sink) AS k), '(none)')
                 ELSE coalesce(jsonb_typeof(p_sink), 'NULL') END
            USING ERRCODE = 'raise_exception';
    END IF;
    IF p_outbox IS NULL OR p_outbox = '' THEN
        RAISE EXCEPTION 'relay.invalid_config: outbox name must not be empty'
            USING ERRCODE = 'raise_exception';
    END IF;
    -- Names appear in logs, metrics labels and lock keys: one documented character set (README).
    IF p_name IS NULL OR p_name !~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$' THEN
        RAISE EXCEPTION 'relay.invalid_config: pipeline name % is not valid: 1-128 characters, letters, digits, "_", "-", ".", ":", starting with a letter or digit', coalesce(quote_literal(p_name), 'NULL')
            USING ERRCODE = 'raise_exception';
    END IF;

    INSERT INTO pgtrickle.relay_outbox_config (name, enabled, config)
    VALUES (
        p_name,
        p_enabled,
        jsonb_build_object(
            'source_type', 'outbox',
            'source',      jsonb_build_object('outbox', p_outbox, 'group', p_group, 'retention_hours', p_retention_hours),
            'sink_type',   v_sink_type,
            'sink',        p_sink
        )
    )
    ON CONFLICT (name) DO UPDATE SET enabled = EXCLUDED.enabled, config = EXCLUDED.config;
END;
$fn$;

COMMENT ON FUNCTION pgtrickle.set_relay_outbox(TEXT, TEXT, TEXT, JSONB, INT, BOOLEAN) IS
    'Creates or replaces a forward relay pipeline (outbox -> sink); p_sink must carry a "type" key.';

CREATE OR REPLACE FUNCTION pgtrickle.set_relay_inbox(
    p_name             TEXT,
    p_inbox            TEXT,
    p_source           JSONB,
    p_max_retries      INT     DEFAULT 3,
    p_schedule         TEXT    DEFAULT '1s',
    p_with_dead_letter BOOLEAN DEFAULT true,
    p_retention_hours  INT     DEFAULT 24,
    p_enabled          BOOLEAN DEFAULT true
) RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pgtrickle, pg_catalog, pg_temp
AS $fn$
DECLARE
    v_source_type TEXT := p_source ->> 'type';
BEGIN
    IF v_source_type IS NULL OR v_source_type = '' THEN
        RAISE EXCEPTION 'relay.invalid_config: source JSONB must contain a "type" key (e.g. "kafka", "nats", "http", "redis", "sqs", "rabbitmq", "stdin"). Got %', -- its keys only: values may be secrets
            CASE jsonb_typeof(p_source) WHEN 'object' THEN 'an object with keys ' || coalesce((SELECT string_agg(quote_ident(k), ', ' ORDER BY k) FROM jsonb_object_keys(p_source) AS k), '(none)')
                 ELSE coalesce(jsonb_typeof(p_source), 'NULL') END
            USING ERRCODE = 'raise_exception';
    END IF;
    IF p_inbox IS NULL OR p_inbox = '' THEN
        RAISE EXCEPTION 'relay.invalid_config: inbox name must not be empty'
            USING ERRCODE = 'raise_exception';
    END IF;
    -- Names appear in logs, metrics labels and lock keys: one documented character set (README).
    IF p_name IS NULL OR p_name !~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$' THEN
        RAISE EXCEPTION 'relay.invalid_config: pipeline name % is not valid: 1-128 characters, letters, digits, "_", "-", ".", ":", starting with a letter or digit', coalesce(quote_literal(p_name), 'NULL')
            USING ERRCODE = 'raise_exception';
    END IF;

    INSERT INTO pgtrickle.relay_inbox_config (name, enabled, config)
    VALUES (
        p_name,
        p_enabled,
        jsonb_build_object(
            'source_type', v_source_type,
            'source',      p_source,
            'sink_type',   'pg-inbox',
            'sink',        jsonb_build_object(
                               'inbox',            p_inbox,
                               'max_retries',      p_max_retries,
                               'schedule',         p_schedule,
                               'with_dead_letter', p_with_dead_letter,
                               'retention_hours',  p_retention_hours
                           )
        )
    )
    ON CONFLICT (name) DO UPDATE SET enabled = EXCLUDED.enabled, config = EXCLUDED.config;
END;
$fn$;

COMMENT ON FUNCTION pgtrickle.set_relay_inbox(TEXT, TEXT, JSONB, INT, TEXT, BOOLEAN, INT, BOOLEAN) IS
    'Creates or replaces a reverse relay pipeline (source -> inbox); p_source must carry a "type" key.';

CREATE OR REPLACE FUNCTION pgtrickle.enable_relay(p_name TEXT)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pgtrickle, pg_catalog, pg_temp
AS $fn$
DECLARE
    v_outbox BIGINT;
    v_inbox  BIGINT;
BEGIN
    UPDATE pgtrickle.relay_outbox_config SET enabled = true WHERE name = p_name;
    GET DIAGNOSTICS v_outbox = ROW_COUNT;
    UPDATE pgtrickle.relay_inbox_config SET enabled = true WHERE name = p_name;
    GET DIAGNOSTICS v_inbox = ROW_COUNT;
    IF v_outbox + v_inbox = 0 THEN
        RAISE EXCEPTION 'relay: pipeline "%" not found in relay_outbox_config or relay_inbox_config', p_name
            USING ERRCODE = 'no_data_found';
    END IF;
END;
$fn$;

COMMENT ON FUNCTION pgtrickle.enable_relay(TEXT) IS
    'Enables the relay pipeline(s) of that name in both directions; no_data_found if none exists.';

CREATE OR REPLACE FUNCTION pgtrickle.disable_relay(p_name TEXT)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pgtrickle, pg_catalog, pg_temp
AS $fn$
DECLARE
    v_outbox BIGINT;
    v_inbox  BIGINT;
BEGIN
    UPDATE pgtrickle.relay_outbox_config SET enabled = false WHERE name = p_name;
    GET DIAGNOSTICS v_outbox = ROW_COUNT;
    UPDATE pgtrickle.relay_inbox_config SET enabled = false WHERE name = p_name;
    GET DIAGNOSTICS v_inbox = ROW_COUNT;
    IF v_outbox + v_inbox = 0 THEN
        RAISE EXCEPTION 'relay: pipeline "%" not found in relay_outbox_config or relay_inbox_config', p_name
            USING ERRCODE = 'no_data_found';
    END IF;
END;
$fn$;

COMMENT ON FUNCTION pgtrickle.disable_relay(TEXT) IS
    'Disables the relay pipeline(s) of that name in both directions; no_data_found if none exists.';

-- Offsets in relay_consumer_offsets survive on purpose: re-creating a pipeline resumes.
CREATE OR REPLACE FUNCTION pgtrickle.delete_relay(p_name TEXT)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pgtrickle, pg_catalog, pg_temp
AS $fn$
DECLARE
    v_outbox BIGINT;
    v_inbox  BIGINT;
BEGIN
    DELETE FROM pgtrickle.relay_outbox_config WHERE name = p_name;
    GET DIAGNOSTICS v_outbox = ROW_COUNT;
    DELETE FROM pgtrickle.relay_inbox_config WHERE name = p_name;
    GET DIAGNOSTICS v_inbox = ROW_COUNT;
    IF v_outbox + v_inbox = 0 THEN
        RAISE EXCEPTION 'relay: pipeline "%" not found in relay_outbox_config or relay_inbox_config', p_name
            USING ERRCODE = 'no_data_found';
    END IF;
END;
$fn$;

COMMENT ON FUNCTION pgtrickle.delete_relay(TEXT) IS
    'Deletes the relay pipeline(s) of that name in both directions; no_data_found if none exists.';

-- Columns are qualified throughout: the OUT parameters share their names.
CREATE OR REPLACE FUNCTION pgtrickle.get_relay_config(p_name TEXT)
RETURNS TABLE (name TEXT, direction TEXT, enabled BOOLEAN, config JSONB)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pgtrickle, pg_catalog, pg_temp
AS $fn$
BEGIN
    RETURN QUERY
        SELECT o.name, 'forward'::TEXT, o.enabled, o.config
          FROM pgtrickle.relay_outbox_config o
         WHERE o.name = p_name
        UNION ALL
        SELECT i.name, 'reverse'::TEXT, i.enabled, i.config
          FROM pgtrickle.relay_inbox_config i
         WHERE i.name = p_name;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'relay: pipeline "%" not found in relay_outbox_config or relay_inbox_config', p_name
            USING ERRCODE = 'no_data_found';
    END IF;
END;
$fn$;

COMMENT ON FUNCTION pgtrickle.get_relay_config(TEXT) IS
    'The pipeline(s) of that name: direction is forward (relay_outbox_config) or reverse (relay_inbox_config).';

CREATE OR REPLACE FUNCTION pgtrickle.list_relay_configs()
RETURNS TABLE (name TEXT, direction TEXT, enabled BOOLEAN, config JSONB)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pgtrickle, pg_catalog, pg_temp
AS $fn$
BEGIN
    -- Positional ORDER BY: `name` would be ambiguous with the OUT parameter. Direction breaks
    -- ties so a name present in both tables always lists forward first.
    RETURN QUERY
        SELECT o.name, 'forward'::TEXT, o.enabled, o.config
          FROM pgtrickle.relay_outbox_config o
        UNION ALL
        SELECT i.name, 'reverse'::TEXT, i.enabled, i.config
          FROM pgtrickle.relay_inbox_config i
        ORDER BY 1, 2;
END;
$fn$;

COMMENT ON FUNCTION pgtrickle.list_relay_configs() IS
    'Every relay pipeline of both directions, enabled or not, ordered by name.';

-- SECURITY DEFINER functions are executable by PUBLIC unless revoked; these write pipeline
-- config (which decides where data flows), so only pgtrickle_relay members may call them.
REVOKE ALL ON FUNCTION pgtrickle.relay_config_notify() FROM PUBLIC;
REVOKE ALL ON FUNCTION pgtrickle.set_relay_outbox(TEXT, TEXT, TEXT, JSONB, INT, BOOLEAN) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgtrickle.set_relay_inbox(TEXT, TEXT, JSONB, INT, TEXT, BOOLEAN, INT, BOOLEAN) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgtrickle.enable_relay(TEXT) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgtrickle.disable_relay(TEXT) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgtrickle.delete_relay(TEXT) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgtrickle.get_relay_config(TEXT) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgtrickle.list_relay_configs() FROM PUBLIC;

GRANT EXECUTE ON FUNCTION pgtrickle.set_relay_outbox(TEXT, TEXT, TEXT, JSONB, INT, BOOLEAN) TO pgtrickle_relay;
GRANT EXECUTE ON FUNCTION pgtrickle.set_relay_inbox(TEXT, TEXT, JSONB, INT, TEXT, BOOLEAN, INT, BOOLEAN) TO pgtrickle_relay;
GRANT EXECUTE ON FUNCTION pgtrickle.enable_relay(TEXT) TO pgtrickle_relay;
GRANT EXECUTE ON FUNCTION pgtrickle.disable_relay(TEXT) TO pgtrickle_relay;
GRANT EXECUTE ON FUNCTION pgtrickle.delete_relay(TEXT) TO pgtrickle_relay;
GRANT EXECUTE ON FUNCTION pgtrickle.get_relay_config(TEXT) TO pgtrickle_relay;
GRANT EXECUTE ON FUNCTION pgtrickle.list_relay_configs() TO pgtrickle_relay;

-- The extension's own grants (EXECUTE only, tables revoked) leave a relay login unable to run;
-- these are the privileges the relay process actually uses.
GRANT SELECT ON pgtrickle.relay_outbox_config, pgtrickle.relay_inbox_config TO pgtrickle_relay;
GRANT SELECT, INSERT, UPDATE ON pgtrickle.relay_consumer_offsets TO pgtrickle_relay;

-- >>> section: relay

-- Relay-only (not in any pg_trickle version): messages the relay could not deliver, kept
-- until an operator replays them. One row per (pipeline, direction, dedup key); a repeat
-- failure bumps attempts/last_seen_at instead of adding a row.
CREATE TABLE IF NOT EXISTS pgtrickle.relay_dead_letters (
    id                  BIGSERIAL   PRIMARY KEY,
    pipeline            TEXT        NOT NULL,
    direction           TEXT        NOT NULL CHECK (direction IN ('forward', 'reverse')),
    dedup_key           TEXT        NOT NULL,
    outbox_id           BIGINT,
    message             JSONB,
    error               TEXT        NOT NULL,
    error_kind          TEXT        NOT NULL,
    attempts            INT         NOT NULL DEFAULT 1,
    first_seen_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_seen_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    replay_requested_at TIMESTAMPTZ,
    resolved_at         TIMESTAMPTZ,
    UNIQUE (pipeline, direction, dedup_key)
);

COMMENT ON TABLE pgtrickle.relay_dead_letters IS
    'pgtrickle-relay: messages a pipeline could not deliver (permanent sink/inbox error or undecodable outbox row). '
    'Replay with pgtrickle.replay_relay_dead_letters(pipeline[, id]).';
COMMENT ON COLUMN pgtrickle.relay_dead_letters.outbox_id IS 'forward: id of the outbox header row';
COMMENT ON COLUMN pgtrickle.relay_dead_letters.message IS
    'the envelope, raw outbox header row or raw inbound body that failed';
COMMENT ON COLUMN pgtrickle.relay_dead_letters.error_kind IS 'permanent | decode | inbox_permanent | ...';
COMMENT ON COLUMN pgtrickle.relay_dead_letters.replay_requested_at IS 'set by an operator; the relay re-sends the message';
COMMENT ON COLUMN pgtrickle.relay_dead_letters.resolved_at IS 'set by the relay once a replay was accepted';

-- What the relay polls for: requested replays that are not yet resolved.
CREATE INDEX IF NOT EXISTS relay_dead_letters_replay_pending
    ON pgtrickle.relay_dead_letters (pipeline, direction)
    WHERE replay_requested_at IS NOT NULL AND resolved_at IS NULL;

CREATE OR REPLACE FUNCTION pgtrickle.replay_relay_dead_letters(p_pipeline TEXT, p_id BIGINT DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pgtrickle, pg_catalog, pg_temp
AS $fn$
DECLARE
    v_count INT;
BEGIN
    UPDATE pgtrickle.relay_dead_letters d
       SET replay_requested_at = now()
     WHERE d.pipeline = p_pipeline
       AND d.resolved_at IS NULL
       AND (p_id IS NULL OR d.id = p_id);
    GET DIAGNOSTICS v_count = ROW_COUNT;
    RETURN v_count;
END;
$fn$;

COMMENT ON FUNCTION pgtrickle.replay_relay_dead_letters(TEXT, BIGINT) IS
    'pgtrickle-relay: asks the relay to re-send the unresolved dead letters of a pipeline (or only id p_id); '
    'returns how many were marked.';

-- Relay-only: what the owner of each pipeline last reported (state, last error), so that
-- `pgtrickle-relay status` can show it from anywhere. Written by the process holding the
-- pipeline's advisory lock on every state change; who owns a pipeline NOW is pg_locks' answer.
CREATE TABLE IF NOT EXISTS pgtrickle.relay_pipeline_status (
    relay_group_id TEXT        NOT NULL,
    pipeline       TEXT        NOT NULL,
    direction      TEXT        NOT NULL CHECK (direction IN ('forward', 'reverse')),
    owner          TEXT,
    state          TEXT        NOT NULL,
    last_error     TEXT,
    updated_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (relay_group_id, pipeline, direction)
);

COMMENT ON TABLE pgtrickle.relay_pipeline_status IS
    'pgtrickle-relay: last reported state and error per pipeline (owner = application_name part <host>:<pid>). Never holds secret values.';

-- Relay-only: where a reverse source that has no broker to remember it (a file) stands, as
-- text the source defines (the file source: JSON with path, byte offset, line, inode). Written
-- by the batch's ack, after the inbox commit; a crash in between replays rows the inbox already
-- holds, and ON CONFLICT skips them. A forward pipeline keeps here how many messages of one
-- outbox row its acknowledged batches carried when a batch ended inside that row (a large
-- claim-check change set; `null` when none), written in the offset's transaction. Relay-only,
-- because from 0.45 on relay_consumer_offsets and the consumer-group offsets may belong to
-- the extension.
CREATE TABLE IF NOT EXISTS pgtrickle.relay_source_positions (
    relay_group_id TEXT        NOT NULL,
    pipeline       TEXT        NOT NULL,
    direction      TEXT        NOT NULL CHECK (direction IN ('forward', 'reverse')),
    position       TEXT        NOT NULL,
    updated_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (relay_group_id, pipeline, direction)
);

COMMENT ON TABLE pgtrickle.relay_source_positions IS
    'pgtrickle-relay: last acknowledged position of a source without broker-side offsets (file input), or within one outbox row (forward), per relay group and pipeline.';

-- One row: which relay catalog version this database holds.
CREATE TABLE IF NOT EXISTS pgtrickle.relay_catalog_version (
    singleton    BOOLEAN     PRIMARY KEY DEFAULT true CHECK (singleton),
    version      TEXT        NOT NULL,
    installed_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);

COMMENT ON TABLE pgtrickle.relay_catalog_version IS
    'pgtrickle-relay: version of the relay catalog installed by `pgtrickle-relay catalog install`.';

INSERT INTO pgtrickle.relay_catalog_version AS v (version) VALUES ('1')
ON CONFLICT (singleton) DO UPDATE SET version = EXCLUDED.version, updated_at = now()
    WHERE v.version IS DISTINCT FROM EXCLUDED.version;

REVOKE ALL ON FUNCTION pgtrickle.replay_relay_dead_letters(TEXT, BIGINT) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgtrickle.replay_relay_dead_letters(TEXT, BIGINT) TO pgtrickle_relay;
GRANT SELECT, INSERT, UPDATE ON pgtrickle.relay_dead_letters TO pgtrickle_relay;
GRANT USAGE ON SEQUENCE pgtrickle.relay_dead_letters_id_seq TO pgtrickle_relay;
GRANT SELECT ON pgtrickle.relay_catalog_version TO pgtrickle_relay;
GRANT SELECT, INSERT, UPDATE ON pgtrickle.relay_pipeline_status TO pgtrickle_relay;
GRANT SELECT, INSERT, UPDATE ON pgtrickle.relay_source_positions TO pgtrickle_relay;
