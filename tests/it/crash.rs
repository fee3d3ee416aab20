//! Invariant 1 under a real crash: a child process appends under load and is killed with
//! SIGKILL; after restart every acknowledged append is stored exactly once, at the position
//! it was acknowledged with, and positions have no gap.
//!
//! The child is this same test binary, re-run with a filter that selects
//! [`crash_child_entry_point`] and an environment variable that tells it where to write.

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use countersign_eventstore::testing::TestDb;
use countersign_eventstore::{
    ExpectedVersion, Metadata, NewEvent, PostgresStore, SharedStore, SqliteStore,
};
use tokio::io::{AsyncBufReadExt, BufReader};
use uuid::Uuid;

const CHILD_URL: &str = "COUNTERSIGN_CRASH_CHILD_URL";
const ACKS_BEFORE_KILL: usize = 1_500;

/// Entry point of the child process; does nothing when run as an ordinary test.
#[test]
fn crash_child_entry_point() {
    let Ok(url) = std::env::var(CHILD_URL) else {
        return;
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async move {
        let store: SharedStore = if url.starts_with("postgres") {
            Arc::new(PostgresStore::connect(&url, 8).await.unwrap())
        } else {
            Arc::new(SqliteStore::connect(&url).await.unwrap())
        };
        let (acks, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        for writer in 0..16 {
            let store = store.clone();
            let acks = acks.clone();
            tokio::spawn(async move {
                for n in 0u64.. {
                    let events: Vec<NewEvent> = (0..1 + n % 3).map(|_| new_event()).collect();
                    let ids: Vec<String> = events.iter().map(|e| e.event_id.to_string()).collect();
                    let stream = format!("crash-{writer}-{}", n % 7);
                    let r = store
                        .append(&stream, ExpectedVersion::Any, events)
                        .await
                        .unwrap();
                    acks.send(format!("ACK {} {}", r.first_position, ids.join(",")))
                        .unwrap();
                }
            });
        }
        // One printer, so each acknowledgement is a whole line, written after the commit.
        use std::io::Write as _;
        while let Some(line) = rx.recv().await {
            let mut out = std::io::stdout().lock();
            writeln!(out, "{line}").unwrap();
            out.flush().unwrap();
        }
    });
}

#[allow(clippy::disallowed_methods)]
fn new_event() -> NewEvent {
    NewEvent {
        event_id: Uuid::now_v7(),
        event_type: "crash.appended".into(),
        schema_version: 1,
        payload: vec![7; 64],
        metadata: Metadata::default(),
    }
}

async fn kill_in_mid_stream(db: &TestDb) {
    let exe = std::env::current_exe().unwrap();
    let mut child = tokio::process::Command::new(exe)
        .args([
            "crash::crash_child_entry_point",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_URL, db.url())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut acked: HashMap<Uuid, u64> = HashMap::new();
    let mut ack_lines = 0;
    let mut killed = false;
    loop {
        let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
            .await
            .expect("child stalled");
        let Some(line) = line.unwrap() else { break };
        let Some(rest) = line.strip_prefix("ACK ") else {
            continue;
        };
        let (first, ids) = rest.split_once(' ').unwrap();
        let first: u64 = first.parse().unwrap();
        for (i, id) in ids.split(',').enumerate() {
            assert!(
                acked
                    .insert(id.parse().unwrap(), first + i as u64)
                    .is_none()
            );
        }
        ack_lines += 1;
        if ack_lines == ACKS_BEFORE_KILL && !killed {
            // SIGKILL: no destructor, no flush, no graceful shutdown.
            child.start_kill().unwrap();
            killed = true;
        }
    }
    let status = child.wait().await.unwrap();
    assert!(
        killed && !status.success(),
        "the child was killed: {status:?}"
    );
    assert!(acked.len() >= ACKS_BEFORE_KILL);

    // Restart: a new instance on the same database.
    let store = db.second_instance().await;
    let head = store
        .last_position()
        .await
        .unwrap()
        .expect("events were written");
    let mut seen: HashMap<Uuid, u64> = HashMap::new();
    let mut from = 0;
    loop {
        let page = store.read_all(from, 5_000).await.unwrap();
        let Some(last) = page.last() else { break };
        for event in &page {
            assert_eq!(event.position, from, "no gap in positions");
            from += 1;
            assert!(
                seen.insert(event.event_id, event.position).is_none(),
                "no event stored twice"
            );
        }
        assert_eq!(last.position + 1, from);
    }
    assert_eq!(from, head + 1, "the head names the last stored position");
    for (id, position) in &acked {
        assert_eq!(
            seen.get(id),
            Some(position),
            "acknowledged event {id} is stored where it was acknowledged"
        );
    }
    // Appends go on after the restart, right after the head.
    let r = store
        .append("after-crash", ExpectedVersion::NoStream, vec![new_event()])
        .await
        .unwrap();
    assert_eq!(r.first_position, head + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_loses_no_acknowledged_append_on_postgres() {
    let db = TestDb::postgres().await;
    kill_in_mid_stream(&db).await;
    db.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_loses_no_acknowledged_append_on_sqlite() {
    let db = TestDb::sqlite().await;
    kill_in_mid_stream(&db).await;
    db.finish().await;
}
