-- citus-reconcile stand-in for Citus: the metadata contract of Citus 11.2+ (tables, types,
-- constraints and the node-management functions with their real signatures and effects on the
-- tables). It routes no queries and takes no shard locks.
\echo Use "CREATE EXTENSION citus" to load this file. \quit

CREATE SCHEMA citus;

CREATE TYPE citus.noderole AS ENUM ('primary', 'secondary', 'unavailable');
ALTER TYPE citus.noderole SET SCHEMA pg_catalog;
CREATE TYPE citus.shard_transfer_mode AS ENUM ('auto', 'force_logical', 'block_writes');

CREATE SEQUENCE citus.pg_dist_groupid_seq MINVALUE 1 MAXVALUE 4294967296;
CREATE SEQUENCE citus.pg_dist_node_nodeid_seq MINVALUE 1 MAXVALUE 4294967296;
ALTER SEQUENCE citus.pg_dist_groupid_seq SET SCHEMA pg_catalog;
ALTER SEQUENCE citus.pg_dist_node_nodeid_seq SET SCHEMA pg_catalog;

CREATE TABLE citus.pg_dist_node (
    nodeid int NOT NULL DEFAULT nextval('pg_catalog.pg_dist_node_nodeid_seq') PRIMARY KEY,
    groupid int NOT NULL DEFAULT nextval('pg_catalog.pg_dist_groupid_seq'),
    nodename text NOT NULL,
    nodeport int NOT NULL DEFAULT 5432,
    noderack text NOT NULL DEFAULT 'default',
    hasmetadata bool NOT NULL DEFAULT false,
    isactive bool NOT NULL DEFAULT true,
    noderole pg_catalog.noderole NOT NULL DEFAULT 'primary',
    nodecluster name NOT NULL DEFAULT 'default',
    metadatasynced bool DEFAULT false,
    shouldhaveshards bool NOT NULL DEFAULT true,
    nodeisclone bool NOT NULL DEFAULT false,
    nodeprimarynodeid int NOT NULL DEFAULT 0,
    UNIQUE (nodename, nodeport),
    CONSTRAINT primaries_are_only_allowed_in_the_default_cluster
        CHECK (NOT (nodecluster <> 'default' AND noderole = 'primary'))
);
ALTER TABLE citus.pg_dist_node SET SCHEMA pg_catalog;

CREATE FUNCTION citus.pg_dist_node_trigger_func() RETURNS trigger LANGUAGE plpgsql AS $$
#variable_conflict use_variable
BEGIN
    IF NEW.noderole = 'primary' AND EXISTS (
        SELECT 1 FROM pg_catalog.pg_dist_node
        WHERE groupid = NEW.groupid AND noderole = 'primary' AND nodeid <> NEW.nodeid) THEN
        RAISE EXCEPTION 'there cannot be two primary nodes in a group';
    END IF;
    RETURN NEW;
END;
$$;
CREATE TRIGGER dist_node_trigger BEFORE INSERT OR UPDATE ON pg_catalog.pg_dist_node
    FOR EACH ROW EXECUTE FUNCTION citus.pg_dist_node_trigger_func();

-- authinfo and poolinfo accept only a few libpq keywords, as the real CHECK constraints do.
CREATE FUNCTION citus.conninfo_keywords_valid(info text, allowed text[]) RETURNS boolean
LANGUAGE plpgsql IMMUTABLE AS $$
#variable_conflict use_variable
DECLARE
    rest text := btrim(info);
    kw text;
BEGIN
    IF rest ~ '^[a-z]+://' OR rest ~ '^postgres(ql)?:' THEN
        RETURN false;
    END IF;
    WHILE rest <> '' LOOP
        kw := substring(rest from '^([A-Za-z_]+)\s*=');
        IF kw IS NULL OR NOT kw = ANY (allowed) THEN
            RETURN false;
        END IF;
        rest := ltrim(substring(rest from '^[A-Za-z_]+\s*=\s*(.*)$'));
        IF left(rest, 1) = '''' THEN
            rest := substring(rest from '^''(?:[^''\\]|\\.)*''(.*)$');
            IF rest IS NULL THEN
                RETURN false;
            END IF;
        ELSE
            rest := substring(rest from '^\S*(.*)$');
        END IF;
        rest := ltrim(rest);
    END LOOP;
    RETURN true;
END;
$$;

CREATE FUNCTION pg_catalog.authinfo_valid(text) RETURNS boolean LANGUAGE sql IMMUTABLE
AS $$ SELECT citus.conninfo_keywords_valid($1, ARRAY['password', 'sslcert', 'sslkey']) $$;
CREATE FUNCTION pg_catalog.poolinfo_valid(text) RETURNS boolean LANGUAGE sql IMMUTABLE
AS $$ SELECT citus.conninfo_keywords_valid($1, ARRAY['dbname', 'host', 'port']) $$;
CREATE FUNCTION citus.role_exists(name) RETURNS boolean LANGUAGE sql STABLE
AS $$ SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = $1) $$;

CREATE TABLE citus.pg_dist_authinfo (
    nodeid integer NOT NULL,
    rolename name NOT NULL CHECK (citus.role_exists(rolename)),
    authinfo text NOT NULL CHECK (pg_catalog.authinfo_valid(authinfo)),
    UNIQUE (rolename, nodeid)
);
ALTER TABLE citus.pg_dist_authinfo SET SCHEMA pg_catalog;

CREATE TABLE citus.pg_dist_poolinfo (
    nodeid integer PRIMARY KEY,
    poolinfo text NOT NULL CHECK (pg_catalog.poolinfo_valid(poolinfo))
);
ALTER TABLE citus.pg_dist_poolinfo SET SCHEMA pg_catalog;

CREATE FUNCTION pg_catalog.citus_version() RETURNS text LANGUAGE sql IMMUTABLE
AS $$ SELECT 'Citus stand-in 0.0-standin-1 (citus-reconcile test extension)'::text $$;

CREATE FUNCTION pg_catalog.citus_is_coordinator() RETURNS boolean LANGUAGE sql STABLE
AS $$ SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_dist_node WHERE groupid = 0) $$;

CREATE FUNCTION citus.node_id_of(text, int) RETURNS int LANGUAGE sql STABLE
AS $$ SELECT nodeid FROM pg_catalog.pg_dist_node WHERE nodename = $1 AND nodeport = $2 $$;

CREATE FUNCTION pg_catalog.citus_add_node(nodename text, nodeport integer, groupid integer DEFAULT -1,
    noderole pg_catalog.noderole DEFAULT 'primary', nodecluster name DEFAULT 'default')
RETURNS integer LANGUAGE plpgsql AS $$
#variable_conflict use_variable
DECLARE
    existing int := citus.node_id_of(nodename, nodeport);
    new_id int;
    new_group int := groupid;
BEGIN
    IF existing IS NOT NULL THEN
        RETURN existing;
    END IF;
    IF new_group = -1 THEN
        IF noderole <> 'primary' THEN
            RAISE EXCEPTION 'group should be set for secondary nodes';
        END IF;
        new_group := nextval('pg_catalog.pg_dist_groupid_seq');
    END IF;
    INSERT INTO pg_catalog.pg_dist_node (groupid, nodename, nodeport, hasmetadata, metadatasynced,
                                         noderole, nodecluster, shouldhaveshards)
    VALUES (new_group, nodename, nodeport, true, true, noderole, nodecluster, new_group <> 0)
    RETURNING nodeid INTO new_id;
    RETURN new_id;
END;
$$;

CREATE FUNCTION pg_catalog.citus_add_secondary_node(nodename text, nodeport integer, primaryname text,
    primaryport integer, nodecluster name DEFAULT 'default')
RETURNS integer LANGUAGE plpgsql AS $$
#variable_conflict use_variable
DECLARE
    primary_group int;
BEGIN
    SELECT n.groupid INTO primary_group FROM pg_catalog.pg_dist_node n
    WHERE n.nodename = primaryname AND n.nodeport = primaryport;
    IF primary_group IS NULL THEN
        RAISE EXCEPTION 'node at "%:%" does not exist', primaryname, primaryport;
    END IF;
    RETURN pg_catalog.citus_add_node(nodename, nodeport, primary_group, 'secondary', nodecluster);
END;
$$;

CREATE FUNCTION pg_catalog.citus_update_node(node_id integer, new_node_name text, new_node_port integer,
    force boolean DEFAULT false, lock_cooldown integer DEFAULT 10000)
RETURNS void LANGUAGE plpgsql AS $$
#variable_conflict use_variable
DECLARE
    current record;
BEGIN
    SELECT * INTO current FROM pg_catalog.pg_dist_node WHERE nodeid = node_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'node % not found', node_id;
    END IF;
    IF current.nodename = new_node_name AND current.nodeport = new_node_port THEN
        RETURN;
    END IF;
    IF citus.node_id_of(new_node_name, new_node_port) IS NOT NULL THEN
        RAISE EXCEPTION 'there is already another node with the specified hostname and port';
    END IF;
    UPDATE pg_catalog.pg_dist_node
    SET nodename = new_node_name, nodeport = new_node_port, metadatasynced = false
    WHERE nodeid = node_id;
END;
$$;

CREATE FUNCTION pg_catalog.citus_pause_node_within_txn(node_id integer, force boolean DEFAULT false,
    lock_cooldown integer DEFAULT 10000)
RETURNS void LANGUAGE plpgsql AS $$
#variable_conflict use_variable
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_dist_node WHERE nodeid = node_id) THEN
        RAISE EXCEPTION 'node % not found', node_id;
    END IF;
END;
$$;

CREATE FUNCTION citus.require_node(nodename text, nodeport integer) RETURNS int LANGUAGE plpgsql AS $$
#variable_conflict use_variable
DECLARE
    id int := citus.node_id_of(nodename, nodeport);
BEGIN
    IF id IS NULL THEN
        RAISE EXCEPTION 'node at "%:%" does not exist', nodename, nodeport;
    END IF;
    RETURN id;
END;
$$;

CREATE FUNCTION pg_catalog.citus_remove_node(nodename text, nodeport integer)
RETURNS void LANGUAGE plpgsql AS $$
#variable_conflict use_variable
BEGIN
    DELETE FROM pg_catalog.pg_dist_node WHERE nodeid = citus.require_node(nodename, nodeport);
END;
$$;

CREATE FUNCTION pg_catalog.citus_disable_node(nodename text, nodeport integer, synchronous boolean DEFAULT false)
RETURNS void LANGUAGE plpgsql AS $$
#variable_conflict use_variable
BEGIN
    UPDATE pg_catalog.pg_dist_node SET isactive = false WHERE nodeid = citus.require_node(nodename, nodeport);
END;
$$;

CREATE FUNCTION pg_catalog.citus_activate_node(nodename text, nodeport integer)
RETURNS integer LANGUAGE plpgsql AS $$
#variable_conflict use_variable
DECLARE
    id int := citus.require_node(nodename, nodeport);
BEGIN
    UPDATE pg_catalog.pg_dist_node SET isactive = true, metadatasynced = true WHERE nodeid = id;
    RETURN id;
END;
$$;

CREATE FUNCTION pg_catalog.citus_set_coordinator_host(host text,
    port integer DEFAULT current_setting('port')::int,
    node_role pg_catalog.noderole DEFAULT 'primary', node_cluster name DEFAULT 'default')
RETURNS void LANGUAGE plpgsql AS $$
#variable_conflict use_variable
DECLARE
    coordinator int;
BEGIN
    SELECT nodeid INTO coordinator FROM pg_catalog.pg_dist_node WHERE groupid = 0 AND noderole = node_role;
    IF coordinator IS NULL THEN
        PERFORM pg_catalog.citus_add_node(host, port, 0, node_role, node_cluster);
    ELSE
        PERFORM pg_catalog.citus_update_node(coordinator, host, port);
    END IF;
END;
$$;

CREATE FUNCTION pg_catalog.citus_set_node_property(nodename text, nodeport integer, property text, value boolean)
RETURNS void LANGUAGE plpgsql AS $$
#variable_conflict use_variable
BEGIN
    IF property <> 'shouldhaveshards' THEN
        RAISE EXCEPTION 'only the ''shouldhaveshards'' property can be set using this function';
    END IF;
    UPDATE pg_catalog.pg_dist_node SET shouldhaveshards = value WHERE nodeid = citus.require_node(nodename, nodeport);
END;
$$;

CREATE FUNCTION pg_catalog.citus_drain_node(nodename text, nodeport integer,
    shard_transfer_mode citus.shard_transfer_mode DEFAULT 'auto', rebalance_strategy name DEFAULT NULL)
RETURNS void LANGUAGE plpgsql AS $$
#variable_conflict use_variable
BEGIN
    -- No shards exist here, so draining only marks the node as not wanting any.
    PERFORM pg_catalog.citus_set_node_property(nodename, nodeport, 'shouldhaveshards', false);
END;
$$;

CREATE FUNCTION pg_catalog.citus_rebalance_start(rebalance_strategy name DEFAULT NULL,
    drain_only boolean DEFAULT false, shard_transfer_mode citus.shard_transfer_mode DEFAULT 'auto')
RETURNS bigint LANGUAGE plpgsql AS $$
#variable_conflict use_variable
BEGIN
    RAISE NOTICE 'No moves available for rebalancing';
    RETURN NULL;
END;
$$;

CREATE FUNCTION pg_catalog.citus_rebalance_status(raw boolean DEFAULT false)
RETURNS TABLE (job_id bigint, state text, job_type name, description text, started_at timestamptz,
               finished_at timestamptz, details jsonb)
LANGUAGE sql AS $$ SELECT NULL::bigint, NULL::text, NULL::name, NULL::text, NULL::timestamptz,
                          NULL::timestamptz, NULL::jsonb WHERE false $$;
