//! The Citus metadata contract, checked against whichever `citus` extension this machine has:
//! the real one when installed, otherwise the stand-in (installed here if needed). The same
//! assertions hold for both; nothing here knows which one it talks to.

mod common;

use common::pg::ScratchPg;

fn sqlstate(e: &tokio_postgres::Error) -> String {
    e.code()
        .map(|c| c.code().to_string())
        .unwrap_or_else(|| format!("no code: {e}"))
}

#[tokio::test]
async fn metadata_tables_and_functions_behave_as_citus() {
    if !common::lab_available("citus contract") {
        return;
    }
    let install = citus_reconcile::lab::standin::ensure(common::pg::BIN).expect("citus available");
    eprintln!("testing against {install}");
    let settings = [
        "shared_preload_libraries=citus",
        "max_prepared_transactions=20",
        "wal_level=logical",
    ];
    let coord = ScratchPg::start(&settings);
    let worker = ScratchPg::start(&settings);
    for pg in [&coord, &worker] {
        let c = pg.connect("postgres").await;
        c.batch_execute("CREATE DATABASE citus")
            .await
            .expect("create database");
        let c = pg.connect("citus").await;
        c.batch_execute("CREATE EXTENSION citus")
            .await
            .expect("create extension");
    }
    let c = coord.connect("citus").await;

    // Columns of pg_dist_node, in order, as the contract lists them.
    let cols: Vec<String> = c
        .query(
            "SELECT attname || ':' || format_type(atttypid, atttypmod) FROM pg_attribute \
             WHERE attrelid = 'pg_catalog.pg_dist_node'::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
            &[],
        )
        .await
        .expect("pg_dist_node exists")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let expected = [
        "nodeid:integer",
        "groupid:integer",
        "nodename:text",
        "nodeport:integer",
        "noderack:text",
        "hasmetadata:boolean",
        "isactive:boolean",
        "noderole:noderole",
        "nodecluster:name",
        "metadatasynced:boolean",
        "shouldhaveshards:boolean",
    ];
    assert_eq!(&cols[..expected.len()], &expected[..], "{cols:?}");
    for table in ["pg_dist_authinfo", "pg_dist_poolinfo"] {
        c.query_one(&format!("SELECT count(*) FROM pg_catalog.{table}"), &[])
            .await
            .expect(table);
    }

    // The coordinator registers itself in group 0, with no shards.
    c.execute(
        "SELECT citus_set_coordinator_host('127.0.0.1', $1)",
        &[&i32::from(coord.port)],
    )
    .await
    .expect("set coordinator");
    let row = c
        .query_one(
            "SELECT groupid, shouldhaveshards FROM pg_dist_node WHERE nodeport = $1",
            &[&i32::from(coord.port)],
        )
        .await
        .expect("coordinator row");
    assert_eq!((row.get::<_, i32>(0), row.get::<_, bool>(1)), (0, false));

    // Adding a worker returns its node id; adding it again returns the same id.
    let wport = i32::from(worker.port);
    let id: i32 = c
        .query_one("SELECT citus_add_node('127.0.0.1', $1)", &[&wport])
        .await
        .expect("add node")
        .get(0);
    let again: i32 = c
        .query_one("SELECT citus_add_node('127.0.0.1', $1)", &[&wport])
        .await
        .expect("add again")
        .get(0);
    assert_eq!(id, again);
    let row = c
        .query_one(
            "SELECT groupid, isactive, noderole::text FROM pg_dist_node WHERE nodeid = $1",
            &[&id],
        )
        .await
        .expect("row");
    assert!(row.get::<_, i32>(0) > 0 && row.get::<_, bool>(1));
    assert_eq!(row.get::<_, String>(2), "primary");

    // (nodename, nodeport) is unique; a second primary in a group is refused.
    let dup = c
        .execute(
            "INSERT INTO pg_dist_node (nodename, nodeport, groupid) VALUES ('127.0.0.1', $1, 999)",
            &[&wport],
        )
        .await;
    assert_eq!(
        dup.as_ref().map_err(sqlstate).err().as_deref(),
        Some("23505")
    );
    let group: i32 = row.get(0);
    let second = c
        .execute(
            "INSERT INTO pg_dist_node (nodename, nodeport, groupid) VALUES ('127.0.0.2', 1, $1)",
            &[&group],
        )
        .await;
    assert!(
        second.is_err(),
        "two primaries in group {group} were accepted"
    );

    // citus_update_node: same address is a no-op; someone else's address and unknown ids fail.
    c.execute(
        "SELECT citus_update_node($1, '127.0.0.1', $2)",
        &[&id, &wport],
    )
    .await
    .expect("no-op update");
    let taken = c
        .execute(
            "SELECT citus_update_node($1, '127.0.0.1', $2)",
            &[&id, &i32::from(coord.port)],
        )
        .await;
    assert!(
        taken.is_err(),
        "moving onto the coordinator's address was accepted"
    );
    assert!(
        c.execute("SELECT citus_update_node(987654, 'x', 1)", &[])
            .await
            .is_err()
    );
    assert!(
        c.execute("SELECT citus_remove_node('no-such-host', 1)", &[])
            .await
            .is_err()
    );

    // pg_dist_authinfo: only password/sslcert/sslkey; the role must exist; (rolename, nodeid) unique.
    c.execute(
        "INSERT INTO pg_dist_authinfo VALUES (0, 'postgres', 'password=secret sslcert=/c.pem')",
        &[],
    )
    .await
    .expect("valid authinfo");
    for bad in [
        "host=elsewhere",
        "postgresql://u@h/db",
        "password=x dbname=y",
    ] {
        let r = c
            .execute(
                "INSERT INTO pg_dist_authinfo VALUES (-1, 'postgres', $1)",
                &[&bad],
            )
            .await;
        assert_eq!(
            r.as_ref().map_err(sqlstate).err().as_deref(),
            Some("23514"),
            "{bad} accepted"
        );
    }
    let no_role = c
        .execute(
            "INSERT INTO pg_dist_authinfo VALUES (0, 'nobody_here', 'password=x')",
            &[],
        )
        .await;
    assert!(no_role.is_err());
    let dup = c
        .execute(
            "INSERT INTO pg_dist_authinfo VALUES (0, 'postgres', 'password=other')",
            &[],
        )
        .await;
    assert_eq!(
        dup.as_ref().map_err(sqlstate).err().as_deref(),
        Some("23505")
    );

    // pg_dist_poolinfo: only dbname/host/port.
    c.execute(
        "INSERT INTO pg_dist_poolinfo VALUES ($1, 'host=10.0.0.1 port=6432')",
        &[&id],
    )
    .await
    .expect("valid poolinfo");
    let bad = c
        .execute(
            "INSERT INTO pg_dist_poolinfo VALUES (12345, 'password=x')",
            &[],
        )
        .await;
    assert_eq!(
        bad.as_ref().map_err(sqlstate).err().as_deref(),
        Some("23514")
    );

    // The node-management functions the reconciler relies on exist with their signatures.
    for signature in [
        "citus_add_node(text,integer,integer,noderole,name)",
        "citus_add_secondary_node(text,integer,text,integer,name)",
        "citus_update_node(integer,text,integer,boolean,integer)",
        "citus_remove_node(text,integer)",
        "citus_disable_node(text,integer,boolean)",
        "citus_activate_node(text,integer)",
        "citus_set_coordinator_host(text,integer,noderole,name)",
        "citus_set_node_property(text,integer,text,boolean)",
    ] {
        c.query_one(
            &format!("SELECT 'pg_catalog.{signature}'::regprocedure"),
            &[],
        )
        .await
        .unwrap_or_else(|e| panic!("{signature}: {e}"));
    }
    // Newer than 11.2: detected, not assumed.
    let has_pause: bool = c
        .query_one("SELECT to_regprocedure('pg_catalog.citus_pause_node_within_txn(integer,boolean,integer)') IS NOT NULL", &[])
        .await
        .expect("lookup")
        .get(0);
    if has_pause {
        c.execute("BEGIN", &[]).await.expect("begin");
        c.execute(
            "SELECT citus_pause_node_within_txn($1, false, 1000)",
            &[&id],
        )
        .await
        .expect("pause");
        c.execute("ROLLBACK", &[]).await.expect("rollback");
    }

    // Draining and properties only touch shouldhaveshards; remove deletes the row.
    c.execute(
        "SELECT citus_set_node_property('127.0.0.1', $1, 'shouldhaveshards', false)",
        &[&wport],
    )
    .await
    .expect("property");
    let shards: bool = c
        .query_one(
            "SELECT shouldhaveshards FROM pg_dist_node WHERE nodeid = $1",
            &[&id],
        )
        .await
        .expect("row")
        .get(0);
    assert!(!shards);
    c.execute("DELETE FROM pg_dist_poolinfo", &[])
        .await
        .expect("clean poolinfo");
    c.execute("SELECT citus_remove_node('127.0.0.1', $1)", &[&wport])
        .await
        .expect("remove");
    let left: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_dist_node WHERE nodeid = $1",
            &[&id],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(left, 0);
}
