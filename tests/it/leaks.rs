//! Where a secret must never be: log lines, captured in memory, and everything the server
//! wrote (events and tables), with the encodings a leak could take.

use std::sync::{Arc, Mutex, OnceLock};

use base64::Engine as _;
use countersign_eventstore::testing::TestDb;

use crate::api::Api;
use crate::second_factor::dump_tables;

/// The bytes a `tracing` subscriber wrote.
#[derive(Clone, Default)]
pub(crate) struct Logged(pub(crate) Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Logged {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logged {
    /// Everything logged at `level` or above on this thread while the guard lives.
    pub(crate) fn capture(&self, level: tracing::Level) -> tracing::subscriber::DefaultGuard {
        let writer = self.clone();
        tracing::subscriber::set_default(
            tracing_subscriber::fmt()
                .with_writer(move || writer.clone())
                .with_ansi(false)
                .with_max_level(level)
                .finish(),
        )
    }

    pub(crate) fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// Every log line of this process at DEBUG and above, from the first test that asks on (the
/// server and the phone both run in the test's process). It is the process's global
/// subscriber, set once and shared by every test that asks.
pub(crate) fn logs() -> &'static Logged {
    static LOGGED: OnceLock<Logged> = OnceLock::new();
    LOGGED.get_or_init(|| {
        let logged = Logged::default();
        let writer = logged.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::DEBUG)
            .finish();
        tracing::subscriber::set_global_default(subscriber)
            .expect("no other test of this process sets the global log subscriber");
        logged
    })
}

/// Every event's payload, metadata and stream, then every table's rows.
pub(crate) async fn written(api: &Api, db: &TestDb) -> Vec<u8> {
    let events = api
        .running
        .state
        .store()
        .read_all(0, 100_000)
        .await
        .unwrap();
    let mut written: Vec<u8> = Vec::new();
    for event in &events {
        written.extend_from_slice(&event.payload);
        written.extend_from_slice(&event.metadata_cbor);
        written.extend_from_slice(event.stream.as_bytes());
    }
    written.extend_from_slice(&dump_tables(db).await);
    written
}

/// `bytes` as they are, in hex, in base64 and in unpadded base64url.
pub(crate) fn encodings(bytes: &[u8]) -> Vec<Vec<u8>> {
    vec![
        bytes.to_vec(),
        hex::encode(bytes).into_bytes(),
        base64::engine::general_purpose::STANDARD
            .encode(bytes)
            .into_bytes(),
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(bytes)
            .into_bytes(),
    ]
}

pub(crate) fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}
