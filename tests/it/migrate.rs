//! `migrate`: idempotent, safe when run concurrently, lane count fixed at install.

use outbox_relay::schema::{self, MigrateError};

use crate::support::{connect, count, TestSchema};

async fn object_counts(s: &TestSchema) -> (i64, i64, i64) {
    let c = connect().await;
    let schema = s.name.as_str();
    let tables = count(&c, &format!("SELECT count(*) FROM pg_tables WHERE schemaname = '{schema}'")).await;
    let functions =
        count(&c, &format!("SELECT count(*) FROM pg_proc WHERE pronamespace = '{schema}'::regnamespace")).await;
    let ledger = count(&c, &s.q("SELECT count(*) FROM __SCHEMA__.migrations")).await;
    (tables, functions, ledger)
}

#[tokio::test]
async fn migrate_twice_leaves_one_schema() {
    let s = TestSchema::empty();
    let mut c = connect().await;
    let first = schema::migrate(&mut c, &s.name, Some(8)).await.unwrap();
    assert_eq!(first.applied, (1..=schema::latest_version()).collect::<Vec<_>>());
    let after_first = object_counts(&s).await;
    let second = schema::migrate(&mut c, &s.name, None).await.unwrap();
    assert!(second.applied.is_empty());
    assert_eq!(second.lanes, 8, "the recorded lane count is kept");
    assert_eq!(object_counts(&s).await, after_first);
    assert_eq!(after_first.2, schema::latest_version() as i64);
    assert!(after_first.0 >= 7, "tables: {}", after_first.0);
}

#[tokio::test]
async fn migrate_run_concurrently_leaves_one_schema() {
    let s = TestSchema::empty();
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let name = s.name.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = connect().await;
            schema::migrate(&mut c, &name, Some(4)).await
        }));
    }
    let mut applied_total = 0;
    for t in tasks {
        let report = t.await.unwrap().expect("every concurrent migrate succeeds");
        applied_total += report.applied.len();
        assert_eq!(report.lanes, 4);
    }
    assert_eq!(applied_total, schema::latest_version() as usize, "each migration applied exactly once");
    let (_, _, ledger) = object_counts(&s).await;
    assert_eq!(ledger, schema::latest_version() as i64);
}

#[tokio::test]
async fn lane_count_is_fixed_at_install() {
    let s = TestSchema::new(8).await;
    let mut c = connect().await;
    match schema::migrate(&mut c, &s.name, Some(16)).await {
        Err(MigrateError::LanesMismatch { recorded: 8, requested: 16, .. }) => {}
        other => panic!("expected LanesMismatch, got {other:?}"),
    }
    assert!(matches!(schema::migrate(&mut c, &s.name, Some(0)).await, Err(MigrateError::LanesOutOfRange(0))));
    let info = schema::check_installed(&c, &s.name).await.unwrap();
    assert_eq!(info.lanes, 8);
    // Rows spread over every lane, each in range.
    c.batch_execute(&s.q("SELECT __SCHEMA__.enqueue('t', 'key-' || g, '\\x00') FROM generate_series(1, 2000) g"))
        .await
        .unwrap();
    let lanes =
        count(&c, &s.q("SELECT count(DISTINCT lane) FROM __SCHEMA__.messages WHERE lane BETWEEN 0 AND 7")).await;
    assert_eq!(lanes, 8);
}

#[tokio::test]
async fn a_schema_not_migrated_is_reported_with_what_to_do() {
    let s = TestSchema::empty();
    let c = connect().await;
    let err = schema::check_installed(&c, &s.name).await.unwrap_err();
    assert!(matches!(err, MigrateError::NotMigrated { found: 0, .. }), "{err}");
    assert!(err.to_string().contains("outbox-relay migrate"), "{err}");
}

#[tokio::test]
async fn migrate_command_installs_and_refuses_a_changed_lane_count() {
    let s = TestSchema::empty();
    let bin = env!("CARGO_BIN_EXE_outbox-relay");
    let run = |lanes: &str| {
        std::process::Command::new(bin)
            .args(["migrate", "--schema", s.name.as_str(), "--lanes", lanes])
            .output()
            .expect("run outbox-relay migrate")
    };
    let first = run("4");
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    assert!(String::from_utf8_lossy(&first.stdout).contains("4 lanes"));
    let again = run("4");
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stdout).contains("up to date"));
    let changed = run("8");
    assert!(!changed.status.success(), "a changed lane count must fail");
    let stderr = String::from_utf8_lossy(&changed.stderr);
    assert!(stderr.contains("installed with 4 lanes") && stderr.contains("fixed at install"), "{stderr}");
    let c = connect().await;
    assert_eq!(count(&c, &s.q("SELECT count(*) FROM __SCHEMA__.migrations")).await, schema::latest_version() as i64);
}

#[tokio::test]
async fn migrate_by_schema_pattern_installs_and_upgrades_each_tenant_and_reports_the_ones_it_cannot() {
    use crate::support::cli::{cli, fails};
    use outbox_relay::schema::SchemaName;
    let prefix = crate::support::unique_name("mp");
    let c = connect().await;
    // Two new tenants, one already installed, one whose name the product cannot use.
    let fresh: Vec<TestSchema> = ["a", "b"]
        .iter()
        .map(|t| TestSchema { name: SchemaName::new(&format!("{prefix}_{t}")).unwrap(), lanes: 0 })
        .collect();
    for s in &fresh {
        c.batch_execute(&format!("CREATE SCHEMA {}", s.name.ident())).await.unwrap();
    }
    let installed = TestSchema { name: SchemaName::new(&format!("{prefix}_c")).unwrap(), lanes: 4 };
    schema::migrate(&mut connect().await, &installed.name, Some(4)).await.unwrap();
    let bad = format!("{prefix}_Bad");
    c.batch_execute(&format!("CREATE SCHEMA \"{bad}\"")).await.unwrap();

    let out = cli(&["migrate", "--schema-pattern", &format!("{prefix}\\_%"), "--lanes", "8"]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    c.batch_execute(&format!("DROP SCHEMA \"{bad}\"")).await.unwrap();
    fails(&out, "1 of 4 schemas failed");
    assert!(stdout.contains(&format!("[1/4] schema {bad}: FAILED")), "{stdout}");
    for s in &fresh {
        assert!(stdout.contains(&format!("schema {}: applied migrations [1, 2", s.name)), "{stdout}");
        assert_eq!(
            count(&c, &s.q("SELECT count(*) FROM __SCHEMA__.migrations")).await,
            schema::latest_version() as i64
        );
        assert_eq!(count(&c, &s.q("SELECT value::bigint FROM __SCHEMA__.settings WHERE name = 'lanes'")).await, 8);
    }
    assert!(
        stdout.contains(&format!(
            "schema {} is up to date (migration {}, 4 lanes)",
            installed.name,
            schema::latest_version()
        )),
        "{stdout}"
    );
    fails(&cli(&["migrate", "--schema-pattern", "no_such_tenant_%"]), "no schema matches");
}
