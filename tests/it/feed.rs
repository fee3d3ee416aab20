//! The tenant's event feed: `GET /v1/servers/{id}/events` pages and `…/events/stream` SSE
//! carry that tenant's events only, in log order, each with the canonical bytes the audit
//! trail hashes.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use countersign_eventstore::testing::TestDb;
use futures::StreamExt as _;
use reqwest::{Method, StatusCode};
use serde_json::Value;

use crate::api::Api;
use crate::transactions_device::put_user;

async fn tenant_events_page_and_stream(db: &TestDb) {
    let api = Api::start(db).await;
    let (a, a_token) = api.tenant("A").await;
    let (b, b_token) = api.tenant("B").await;
    for i in 0..3 {
        put_user(&api, &a, &a_token, &format!("a{i}")).await;
        put_user(&api, &b, &b_token, &format!("b{i}")).await;
    }

    // Pages of two, followed by `next_after`, give all of A's events and none of B's.
    let mut after: Option<u64> = None;
    let mut seen: Vec<Value> = Vec::new();
    for _ in 0..100 {
        let query = after.map_or(String::new(), |p| format!("&after={p}"));
        let (status, page) = api
            .call(
                Method::GET,
                &format!("/v1/servers/{a}/events?limit=2{query}"),
                Some(&a_token),
                None,
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{page}");
        let events = page["events"].as_array().unwrap().clone();
        if events.is_empty() {
            break;
        }
        assert!(events.len() <= 2);
        seen.extend(events);
        after = page["next_after"].as_u64();
    }
    assert!(
        seen.iter()
            .all(|e| e["stream"].as_str().unwrap().contains(&a)),
        "only A's streams"
    );
    let positions: Vec<u64> = seen
        .iter()
        .map(|e| e["position"].as_u64().unwrap())
        .collect();
    assert!(
        positions.windows(2).all(|w| w[0] < w[1]),
        "in log order: {positions:?}"
    );
    let registered = seen
        .iter()
        .filter(|e| e["type"] == "user.registered")
        .count();
    assert_eq!(registered, 3);
    // The canonical bytes are the event the store holds, position included.
    let first = &seen[0];
    let canonical = URL_SAFE_NO_PAD
        .decode(first["canonical"].as_str().unwrap())
        .unwrap();
    let event = countersign_eventstore::RecordedEvent::from_canonical_bytes(&canonical).unwrap();
    assert_eq!(event.position, positions[0]);
    assert_eq!(event.event_type, first["type"].as_str().unwrap());

    // Refusals: another tenant's key, a bad limit, an unknown parameter.
    let (status, _) = api
        .call(
            Method::GET,
            &format!("/v1/servers/{a}/events"),
            Some(&b_token),
            None,
        )
        .await;
    assert!(
        status == StatusCode::NOT_FOUND || status == StatusCode::UNAUTHORIZED,
        "{status}"
    );
    let (status, _) = api
        .call(
            Method::GET,
            &format!("/v1/servers/{a}/events?limit=0"),
            Some(&a_token),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let (status, _) = api
        .call(
            Method::GET,
            &format!("/v1/servers/{a}/events?from=1"),
            Some(&a_token),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // The stream starts after the last event seen and carries A's next one, not B's.
    let head = api.head().await.unwrap();
    let response = api
        .http
        .get(api.url(&format!("/v1/servers/{a}/events/stream?after={head}")))
        .bearer_auth(&a_token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.bytes_stream();
    put_user(&api, &b, &b_token, "b-late").await;
    put_user(&api, &a, &a_token, "a-late").await;
    let mut buffer = String::new();
    let event: Value = tokio::time::timeout(std::time::Duration::from_secs(20), async {
        loop {
            if let Some(end) = buffer.find("\n\n") {
                let frame: String = buffer.drain(..end + 2).collect();
                if let Some(data) = frame.lines().find_map(|l| l.strip_prefix("data:")) {
                    return serde_json::from_str(data.trim()).unwrap();
                }
                continue;
            }
            let chunk = body.next().await.unwrap().unwrap();
            buffer.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    })
    .await
    .unwrap();
    assert!(event["stream"].as_str().unwrap().contains(&a), "{event}");
    assert!(event["position"].as_u64().unwrap() > head);
    assert_eq!(event["type"], "user.registered");
    // The feed never ends by itself: the client closes it.
    drop(body);
    api.stop().await;
}

countersign_eventstore::on_both_backends!(tenant_events_page_and_stream);
