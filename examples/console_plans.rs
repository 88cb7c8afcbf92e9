//! The console's queries with a million tasks: fills a database of your
//! choosing with 1,000,000 task rows (and 100,000 operations of 3 steps
//! among them, and the dashboard's `kser.task_minutes` as the workers would
//! have kept it), then prints, for each listing, detail and dashboard query
//! the console runs, Postgres's plan and how long it took (`EXPLAIN
//! ANALYZE`, each run twice, the second shown). A measurement, not a test.
//!
//! ```sh
//! createdb kser_plans
//! DATABASE_URL=postgres://localhost/kser_plans cargo run --release --example console_plans
//! ```
//!
//! It refuses a database that already holds tasks. `scripts/bench_console_writes`
//! then measures, on the same database, what the indexes and the summary
//! the console reads cost the finisher's writes.

use std::time::Instant;

use anyhow::{Context, bail};

const FILL: &str = "
INSERT INTO kser.operations (uuid, entrypoint, status, params, metadata, steps, topic,
    created_at, updated_at, started_at, finished_at, error)
SELECT 'op-' || i, CASE WHEN i > 70000 THEN 'plans.OldOp' ELSE 'plans.Op' || (i % 7) END,
    CASE WHEN i % 50 = 0 THEN 'FAILED' ELSE 'SUCCESS' END, '{}', '{}', 3, 'kser',
    now() - (i || ' seconds')::interval, now(), now() - (i || ' seconds')::interval,
    now() - (i || ' seconds')::interval + interval '2 seconds',
    CASE WHEN i % 50 = 0 THEN 'boom' END
FROM generate_series(1, 100000) AS i;
INSERT INTO kser.tasks (uuid, entrypoint, status, params, metadata, attempts, topic,
    kafka_partition, kafka_offset, created_at, updated_at, started_at, finished_at,
    operation_uuid, position, error)
SELECT 'task-' || i, 'plans.Task' || (i % 13),
    CASE WHEN i % 97 = 0 AND (i % 13 <> 5 OR i % 9700 = 0) THEN 'FAILED'
        WHEN i % 1000 = 1 THEN 'PENDING' ELSE 'SUCCESS' END,
    jsonb_build_object('n', i), '{}', 1, 'kser', i % 6, i,
    now() - (i * 0.3 || ' seconds')::interval, now(), now() - (i * 0.3 || ' seconds')::interval,
    now() - (i * 0.3 || ' seconds')::interval + interval '50 milliseconds',
    CASE WHEN i <= 300000 THEN 'op-' || ((i - 1) / 3 + 1) END,
    CASE WHEN i <= 300000 THEN (i - 1) % 3 END,
    CASE WHEN i % 97 = 0 AND (i % 13 <> 5 OR i % 9700 = 0) THEN 'failed' END
FROM generate_series(1, 1000000) AS i;
-- What the finisher's writes would have counted, minute by minute, spread
-- over all 8 shards (the most rows the dashboard can have to sum).
INSERT INTO kser.task_minutes (minute, entrypoint, status, shard, tasks, last_error, last_at)
SELECT date_trunc('minute', finished_at), entrypoint, status, (abs(hashtext(uuid)) % 8)::int2,
    count(*), (array_agg(error ORDER BY finished_at DESC))[1], max(finished_at)
FROM kser.tasks WHERE status IN ('SUCCESS', 'FAILED') GROUP BY 1, 2, 3, 4;
";

/// What the console asks, as it asks it (diesel's SQL with its values; the
/// dashboard's SQL is `src/store/console.rs`'s).
const QUERIES: &[(&str, &str)] = &[
    (
        "tasks, newest 50",
        "SELECT * FROM kser.tasks ORDER BY created_at DESC LIMIT 50",
    ),
    (
        "tasks FAILED, newest 50",
        "SELECT * FROM kser.tasks WHERE status = 'FAILED' ORDER BY created_at DESC LIMIT 50",
    ),
    (
        "tasks PENDING (rare)",
        "SELECT * FROM kser.tasks WHERE status = 'PENDING' ORDER BY created_at DESC LIMIT 50",
    ),
    (
        "tasks CANCELLED (none at all)",
        "SELECT * FROM kser.tasks WHERE status = 'CANCELLED' ORDER BY created_at DESC LIMIT 50",
    ),
    (
        "tasks of an entrypoint",
        "SELECT * FROM kser.tasks WHERE entrypoint = 'plans.Task3' ORDER BY created_at DESC LIMIT 50",
    ),
    (
        "tasks of an entrypoint, standalone (behind 300,000 newer rows)",
        "SELECT * FROM kser.tasks WHERE entrypoint = 'plans.Task3' AND operation_uuid IS NULL ORDER BY created_at DESC LIMIT 50",
    ),
    (
        "tasks of an entrypoint, FAILED",
        "SELECT * FROM kser.tasks WHERE entrypoint = 'plans.Task3' AND status = 'FAILED' ORDER BY created_at DESC LIMIT 50",
    ),
    (
        "tasks of an entrypoint that almost never fails (8 in 77,000), FAILED",
        "SELECT * FROM kser.tasks WHERE entrypoint = 'plans.Task5' AND status = 'FAILED' ORDER BY created_at DESC LIMIT 50",
    ),
    (
        "tasks of an entrypoint, PENDING (rare)",
        "SELECT * FROM kser.tasks WHERE entrypoint = 'plans.Task3' AND status = 'PENDING' ORDER BY created_at DESC LIMIT 50",
    ),
    (
        "tasks of an entrypoint, next page",
        "SELECT * FROM kser.tasks WHERE entrypoint = 'plans.Task3' AND created_at < now() - interval '2 days' ORDER BY created_at DESC LIMIT 50",
    ),
    (
        "tasks, next page",
        "SELECT * FROM kser.tasks WHERE created_at < now() - interval '1 day' ORDER BY created_at DESC LIMIT 50",
    ),
    (
        "tasks, a time range",
        "SELECT * FROM kser.tasks WHERE created_at >= now() - interval '3 days' AND created_at < now() - interval '2 days' ORDER BY created_at DESC LIMIT 50",
    ),
    (
        "task detail",
        "SELECT * FROM kser.tasks WHERE uuid = 'task-500000'",
    ),
    (
        "task attempts",
        "SELECT * FROM kser.task_attempts WHERE task_uuid = 'task-500000' ORDER BY attempt",
    ),
    (
        "operations, newest 50",
        "SELECT * FROM kser.operations ORDER BY created_at DESC LIMIT 50",
    ),
    (
        "operations FAILED",
        "SELECT * FROM kser.operations WHERE status = 'FAILED' ORDER BY created_at DESC LIMIT 50",
    ),
    (
        "operations of an entrypoint (behind 70,000 newer rows)",
        "SELECT * FROM kser.operations WHERE entrypoint = 'plans.OldOp' ORDER BY created_at DESC LIMIT 50",
    ),
    (
        "operations of an entrypoint, FAILED",
        "SELECT * FROM kser.operations WHERE entrypoint = 'plans.OldOp' AND status = 'FAILED' ORDER BY created_at DESC LIMIT 50",
    ),
    (
        "operation detail",
        "SELECT * FROM kser.operations WHERE uuid = 'op-5000'",
    ),
    (
        "operation steps",
        "SELECT * FROM kser.tasks WHERE operation_uuid = 'op-5000' ORDER BY position",
    ),
    (
        "dashboard: tasks ended by state (24 h, kser.task_minutes)",
        "SELECT 'task' AS kind, status, sum(tasks)::bigint AS count FROM kser.task_minutes WHERE minute > now() - interval '1 day' GROUP BY status",
    ),
    (
        "dashboard: tasks in other states (24 h, tasks_not_success_idx)",
        "SELECT 'task', status, count(*) FROM kser.tasks WHERE created_at > now() - interval '1 day' AND status NOT IN ('SUCCESS', 'FAILED') GROUP BY status",
    ),
    (
        "dashboard: operations by state (24 h)",
        "SELECT 'operation', status, count(*) FROM kser.operations WHERE created_at > now() - interval '1 day' GROUP BY status",
    ),
    (
        "dashboard: throughput (1 h, kser.task_minutes)",
        "SELECT minute, coalesce(sum(tasks) FILTER (WHERE status = 'SUCCESS'), 0)::bigint AS succeeded, coalesce(sum(tasks) FILTER (WHERE status = 'FAILED'), 0)::bigint AS failed FROM kser.task_minutes WHERE minute > now() - interval '1 hour' GROUP BY minute ORDER BY minute",
    ),
    (
        "dashboard: failures by entrypoint (24 h, kser.task_minutes)",
        "SELECT entrypoint, sum(tasks)::bigint AS failed, (array_agg(last_error ORDER BY last_at DESC))[1] AS last_error FROM kser.task_minutes WHERE status = 'FAILED' AND minute > now() - interval '1 day' GROUP BY entrypoint ORDER BY failed DESC, entrypoint LIMIT 10",
    ),
];

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let url = std::env::var("DATABASE_URL").context("set DATABASE_URL to a scratch database")?;
    let store = kser::Store::connect(&url, 2).await?;
    store.migrate().await?;
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    let held: i64 = client
        .query_one(
            "SELECT count(*) FROM (SELECT 1 FROM kser.tasks LIMIT 1) t",
            &[],
        )
        .await?
        .get(0);
    if held > 0 {
        bail!("the database holds tasks already: use a scratch database");
    }
    let started = Instant::now();
    client.batch_execute(FILL).await.context("filling")?;
    // One statement each: VACUUM runs outside a transaction. It sets the
    // visibility map, as autovacuum would have on a table this old.
    for table in ["kser.tasks", "kser.operations", "kser.task_minutes"] {
        client
            .batch_execute(&format!("VACUUM ANALYZE {table}"))
            .await
            .context("vacuuming")?;
    }
    println!(
        "filled 1,000,000 tasks and 100,000 operations in {:.1?}\n",
        started.elapsed()
    );
    for (name, sql) in QUERIES {
        // The first run warms the cache; the second is the one shown.
        store.explain(&format!("ANALYZE {sql}")).await?;
        let plan = store.explain(&format!("ANALYZE {sql}")).await?;
        let took = plan
            .iter()
            .find(|line| line.starts_with("Execution Time"))
            .cloned()
            .unwrap_or_default();
        println!("== {name}: {took}");
        for line in plan
            .iter()
            .filter(|l| !l.starts_with("Planning") && !l.starts_with("Execution"))
        {
            println!("   {line}");
        }
    }
    Ok(())
}
