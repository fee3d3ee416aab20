//! Group commit's decision step, shared by both backends and free of I/O.
//!
//! The writer takes many appends at once, reads inside its transaction the head position,
//! the current version of every stream involved and which of the offered event ids already
//! exist, and hands those facts to [`plan_batch`]. The plan decides each append on its own,
//! in arrival order, as if they had been committed one after another: an append whose
//! expected version fails is refused without affecting the others, a retried append whose
//! events are already stored is answered with the original positions and writes nothing,
//! and the accepted events get consecutive positions after the head, so positions stay
//! gapless whatever the mix.

use std::collections::HashMap;

use uuid::Uuid;

use crate::{AppendResult, ExpectedVersion, NewEvent, StoreError};

/// One append waiting in a batch.
#[derive(Debug)]
pub(crate) struct PendingAppend {
    pub stream: String,
    pub expected: ExpectedVersion,
    pub events: Vec<NewEvent>,
}

/// Where an already stored event lives.
#[derive(Debug, Clone)]
pub(crate) struct StoredId {
    pub stream: String,
    pub version: u64,
    pub position: u64,
}

/// A row to insert.
#[derive(Debug)]
pub(crate) struct Row<'a> {
    pub position: u64,
    pub stream: &'a str,
    pub version: u64,
    pub event: &'a NewEvent,
}

/// What a batch writes and answers.
#[derive(Debug)]
pub(crate) struct Plan<'a> {
    pub rows: Vec<Row<'a>>,
    pub outcomes: Vec<Result<AppendResult, StoreError>>,
    /// Last position after the batch; `None` if the log is still empty.
    pub new_head: Option<u64>,
}

/// Decides a batch. `head` is the last stored position, `versions` the last version of each
/// stream that exists, `existing` the stored events among the offered ids.
pub(crate) fn plan_batch<'a>(
    batch: &'a [PendingAppend],
    head: Option<u64>,
    versions: &HashMap<String, u64>,
    existing: &HashMap<Uuid, StoredId>,
) -> Plan<'a> {
    let mut next_position = head.map_or(0, |h| h + 1);
    let mut current: HashMap<&str, Option<u64>> = HashMap::new();
    // Ids written earlier in this same batch count as stored for the appends after them.
    let mut written: HashMap<Uuid, StoredId> = HashMap::new();
    let mut rows = Vec::new();
    let mut outcomes = Vec::with_capacity(batch.len());

    for append in batch {
        let stream = append.stream.as_str();
        let version = *current
            .entry(stream)
            .or_insert_with(|| versions.get(stream).copied());

        if let Some(outcome) = earlier_append(append, existing, &written) {
            outcomes.push(outcome);
            continue;
        }
        if !append.expected.accepts(version) {
            outcomes.push(Err(StoreError::WrongExpectedVersion {
                stream: append.stream.clone(),
                expected: describe_expected(append.expected),
                actual: version.map_or_else(|| "no stream".to_owned(), |v| v.to_string()),
            }));
            continue;
        }

        let first_position = next_position;
        let mut stream_version = version.map_or(0, |v| v + 1);
        for event in &append.events {
            rows.push(Row {
                position: next_position,
                stream,
                version: stream_version,
                event,
            });
            written.insert(
                event.event_id,
                StoredId {
                    stream: append.stream.clone(),
                    version: stream_version,
                    position: next_position,
                },
            );
            next_position += 1;
            stream_version += 1;
        }
        let last_version = stream_version - 1;
        current.insert(stream, Some(last_version));
        outcomes.push(Ok(AppendResult {
            first_position,
            last_position: next_position - 1,
            next_expected_version: last_version,
        }));
    }

    let new_head = if next_position == 0 {
        None
    } else {
        Some(next_position - 1)
    };
    Plan {
        rows,
        outcomes,
        new_head,
    }
}

/// If the append's events are already stored, answers it the way the first attempt was
/// answered; if only some are, or they sit elsewhere, refuses it. `None`: nothing stored yet.
fn earlier_append(
    append: &PendingAppend,
    existing: &HashMap<Uuid, StoredId>,
    written: &HashMap<Uuid, StoredId>,
) -> Option<Result<AppendResult, StoreError>> {
    let lookup = |id: &Uuid| existing.get(id).or_else(|| written.get(id));
    let stored: Vec<Option<&StoredId>> =
        append.events.iter().map(|e| lookup(&e.event_id)).collect();
    if stored.iter().all(Option::is_none) {
        return None;
    }
    let refuse = |event_id: Uuid| Some(Err(StoreError::DuplicateEventId { event_id }));
    let first = stored.first().copied().flatten();
    let Some(first) = first else {
        let id = append
            .events
            .iter()
            .zip(&stored)
            .find_map(|(e, s)| s.map(|_| e.event_id))?;
        return refuse(id);
    };
    // The whole append must be stored, contiguously, in this stream, in this order.
    for (offset, (event, found)) in append.events.iter().zip(&stored).enumerate() {
        let offset = offset as u64;
        match found {
            Some(s)
                if s.stream == append.stream
                    && s.version == first.version + offset
                    && s.position == first.position + offset => {}
            _ => return refuse(event.event_id),
        }
    }
    if !append.expected.matches_earlier_append(first.version) {
        return Some(Err(StoreError::WrongExpectedVersion {
            stream: append.stream.clone(),
            expected: describe_expected(append.expected),
            actual: format!("already appended these events at version {}", first.version),
        }));
    }
    let count = append.events.len() as u64;
    Some(Ok(AppendResult {
        first_position: first.position,
        last_position: first.position + count - 1,
        next_expected_version: first.version + count - 1,
    }))
}

fn describe_expected(expected: ExpectedVersion) -> String {
    match expected {
        ExpectedVersion::Any => "any".to_owned(),
        ExpectedVersion::NoStream => "no stream".to_owned(),
        ExpectedVersion::StreamExists => "stream exists".to_owned(),
        ExpectedVersion::Exact(n) => n.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Metadata;

    fn event(n: u128) -> NewEvent {
        NewEvent {
            event_id: Uuid::from_u128(n),
            event_type: "test.happened".into(),
            schema_version: 1,
            payload: vec![],
            metadata: Metadata::default(),
        }
    }

    fn append(stream: &str, expected: ExpectedVersion, ids: &[u128]) -> PendingAppend {
        PendingAppend {
            stream: stream.into(),
            expected,
            events: ids.iter().map(|&n| event(n)).collect(),
        }
    }

    #[test]
    fn a_refused_append_leaves_no_gap_for_the_next() {
        let batch = [
            append("a", ExpectedVersion::NoStream, &[1, 2]),
            append("a", ExpectedVersion::NoStream, &[3]),
            append("b", ExpectedVersion::Any, &[4]),
        ];
        let plan = plan_batch(&batch, Some(9), &HashMap::new(), &HashMap::new());
        let positions: Vec<u64> = plan.rows.iter().map(|r| r.position).collect();
        assert_eq!(positions, vec![10, 11, 12]);
        assert!(matches!(
            plan.outcomes[1],
            Err(StoreError::WrongExpectedVersion { .. })
        ));
        assert_eq!(plan.new_head, Some(12));
    }

    #[test]
    fn a_retry_inside_the_same_batch_is_answered_with_the_first_positions() {
        let batch = [
            append("a", ExpectedVersion::NoStream, &[1, 2]),
            append("a", ExpectedVersion::NoStream, &[1, 2]),
        ];
        let plan = plan_batch(&batch, None, &HashMap::new(), &HashMap::new());
        assert_eq!(plan.rows.len(), 2);
        let first = plan.outcomes[0].as_ref().unwrap();
        let second = plan.outcomes[1].as_ref().unwrap();
        assert_eq!(first, second);
    }

    #[test]
    fn a_partly_stored_append_is_refused() {
        let mut existing = HashMap::new();
        existing.insert(
            Uuid::from_u128(1),
            StoredId {
                stream: "a".into(),
                version: 0,
                position: 0,
            },
        );
        let mut versions = HashMap::new();
        versions.insert("a".to_owned(), 0);
        let batch = [append("a", ExpectedVersion::Exact(0), &[2, 1])];
        let plan = plan_batch(&batch, Some(0), &versions, &existing);
        assert!(plan.rows.is_empty());
        assert!(matches!(
            plan.outcomes[0],
            Err(StoreError::DuplicateEventId { .. })
        ));
        assert_eq!(plan.new_head, Some(0));
    }
}
