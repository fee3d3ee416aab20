//! Given/when/then for the OIDC clients and signing keys of the server aggregate.

use super::oidc::{UrlProblem, check_url};
use super::*;
use crate::testing::{NOW, given};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};

const ID: ServerId = ServerId::from_bytes([0x11; 16]);

fn point(seed: u8) -> Vec<u8> {
    p256::SecretKey::from_slice(&[seed; 32])
        .unwrap()
        .public_key()
        .to_sec1_bytes()
        .to_vec()
}

fn created() -> ServerEvent {
    let public_key = point(0x42);
    ServerEvent::Created(ServerCreated {
        server_id: ID,
        key_thumbprint: Sha256::digest(&public_key).into(),
        public_key,
        settings: ServerSettings::defaults("Acme Bank".into()),
        user_digest: UserDigestScheme::HmacSha256,
    })
}

fn client(n: u8) -> OidcClientId {
    OidcClientId::from_bytes([n; 16])
}

fn confidential() -> OidcClientSettings {
    OidcClientSettings {
        name: "Wiki".into(),
        kind: OidcClientKind::Confidential,
        redirect_uris: vec!["https://wiki.example/callback".into()],
        post_logout_redirect_uris: vec!["https://wiki.example/".into()],
        scopes: vec!["openid".into(), "profile".into(), "offline_access".into()],
        backchannel_logout_uri: Some("https://wiki.example/backchannel".into()),
        ciba: None,
    }
}

fn public() -> OidcClientSettings {
    OidcClientSettings {
        name: "Desktop app".into(),
        kind: OidcClientKind::Public,
        redirect_uris: vec!["http://127.0.0.1:7777/cb".into()],
        post_logout_redirect_uris: vec![],
        scopes: vec!["openid".into()],
        backchannel_logout_uri: None,
        ciba: None,
    }
}

fn register(n: u8, settings: OidcClientSettings) -> RegisterOidcClient {
    let secret_hash = (settings.kind == OidcClientKind::Confidential).then_some([n; 32]);
    RegisterOidcClient {
        client_id: client(n),
        settings,
        secret_hash,
    }
}

fn registered(n: u8, settings: OidcClientSettings) -> ServerEvent {
    let cmd = register(n, settings);
    ServerEvent::OidcClientRegistered(OidcClientRegistered {
        client_id: cmd.client_id,
        settings: cmd.settings,
        secret_hash: cmd.secret_hash,
    })
}

fn no_change(n: u8) -> UpdateOidcClient {
    UpdateOidcClient {
        client_id: client(n),
        name: None,
        redirect_uris: None,
        post_logout_redirect_uris: None,
        scopes: None,
        backchannel_logout_uri: None,
        ciba: None,
    }
}

fn refused(settings: OidcClientSettings, error: impl Into<ServerError>) {
    given::<Server>([created()])
        .when(register(1, settings))
        .then_error(error.into());
}

#[test]
fn registering_a_confidential_client_records_only_its_secret_hash() {
    let state = given::<Server>([created()])
        .when(register(1, confidential()))
        .then(vec![registered(1, confidential())]);
    let Server::Active(s) = state else {
        panic!("not active")
    };
    assert_eq!(
        s.oidc_clients.get(&client(1)).map(|c| c.removed),
        Some(false)
    );
}

#[test]
fn a_public_client_has_no_secret_and_a_confidential_one_has_one() {
    let mut with_secret = register(1, public());
    with_secret.secret_hash = Some([1; 32]);
    given::<Server>([created()])
        .when(with_secret)
        .then_error(OidcClientError::SecretMismatch.into());
    let mut without = register(1, confidential());
    without.secret_hash = None;
    given::<Server>([created()])
        .when(without)
        .then_error(OidcClientError::SecretMismatch.into());
    given::<Server>([created()])
        .when(register(2, public()))
        .then(vec![registered(2, public())]);
}

#[test]
fn url_rules() {
    for good in [
        "https://rp.example/cb",
        "https://rp.example:8443/cb?x=1",
        "http://127.0.0.1:9000/cb",
        "http://[::1]/cb",
        "http://localhost:3000/cb",
    ] {
        assert_eq!(check_url("redirect_uris", good), Ok(()), "{good}");
    }
    let long = format!("https://rp.example/{}", "a".repeat(2048));
    for (bad, problem) in [
        ("http://rp.example/cb", UrlProblem::Scheme),
        ("http://127.0.0.2/cb", UrlProblem::Scheme),
        ("http://localhost.evil.example/cb", UrlProblem::Scheme),
        ("ftp://rp.example/cb", UrlProblem::Scheme),
        ("javascript:alert(1)", UrlProblem::Malformed),
        // A private-use scheme has no host.
        ("com.example.app:/oauth", UrlProblem::Malformed),
        ("/relative/cb", UrlProblem::Malformed),
        ("not a url", UrlProblem::Malformed),
        ("https://rp.example/cb ", UrlProblem::Malformed),
        ("https://rp.example/c\tb", UrlProblem::Malformed),
        ("https://rp.example/\0", UrlProblem::Malformed),
        ("https://rp.example/cb#frag", UrlProblem::Fragment),
        ("https://rp.example/cb#", UrlProblem::Fragment),
        ("https://user:pw@rp.example/cb", UrlProblem::Userinfo),
        ("https://user@rp.example/cb", UrlProblem::Userinfo),
        (long.as_str(), UrlProblem::TooLong),
    ] {
        assert_eq!(
            check_url("redirect_uris", bad),
            Err(OidcClientError::Url {
                field: "redirect_uris",
                problem
            }),
            "{bad}"
        );
    }
}

#[test]
fn every_url_field_is_checked() {
    let url = |field| OidcClientError::Url {
        field,
        problem: UrlProblem::Scheme,
    };
    let plain = "http://rp.example/x".to_owned();
    let mut s = confidential();
    s.redirect_uris.push(plain.clone());
    refused(s, url("redirect_uris"));
    let mut s = confidential();
    s.post_logout_redirect_uris = vec![plain.clone()];
    refused(s, url("post_logout_redirect_uris"));
    let mut s = confidential();
    s.backchannel_logout_uri = Some(plain.clone());
    refused(s, url("backchannel_logout_uri"));
    let mut s = confidential();
    s.ciba = Some(CibaSettings {
        mode: CibaMode::Ping,
        notification_endpoint: Some(plain),
    });
    refused(s, url("ciba.notification_endpoint"));
}

#[test]
fn uri_lists_are_bounded_and_distinct() {
    let mut s = confidential();
    s.redirect_uris = (0..11).map(|i| format!("https://rp.example/{i}")).collect();
    refused(
        s,
        OidcClientError::TooMany {
            field: "redirect_uris",
            max: 10,
        },
    );
    let mut s = confidential();
    s.redirect_uris = (0..10).map(|i| format!("https://rp.example/{i}")).collect();
    given::<Server>([created()])
        .when(register(1, s.clone()))
        .then(vec![registered(1, s)]);
    let mut s = confidential();
    s.redirect_uris.push(s.redirect_uris[0].clone());
    refused(
        s,
        OidcClientError::Duplicate {
            field: "redirect_uris",
        },
    );
    let mut s = confidential();
    s.redirect_uris.clear();
    refused(s, OidcClientError::NoRedirectUri);
}

#[test]
fn scope_rules() {
    let mut s = confidential();
    s.scopes = vec!["profile".into()];
    refused(s, OidcClientError::MissingOpenid);
    let mut s = confidential();
    s.scopes = vec!["openid".into(), "admin".into()];
    refused(s, OidcClientError::UnknownScope);
    let mut s = confidential();
    s.scopes = vec!["openid".into(), "openid".into()];
    refused(s, OidcClientError::Duplicate { field: "scopes" });
    let mut s = confidential();
    s.scopes = oidc::OIDC_SCOPES.iter().map(|s| (*s).to_owned()).collect();
    given::<Server>([created()])
        .when(register(1, s.clone()))
        .then(vec![registered(1, s)]);
}

#[test]
fn name_rules() {
    let mut s = public();
    s.name = String::new();
    refused(s, ValidationError::Empty { field: "name" });
    let mut s = public();
    s.name = "a\u{7}b".into();
    refused(s, ValidationError::ControlCharacter { field: "name" });
    let mut s = public();
    s.name = "é".repeat(101);
    refused(
        s,
        ValidationError::TooLong {
            field: "name",
            max: 100,
            actual: 101,
            unit: "characters",
        },
    );
}

#[test]
fn ciba_rules() {
    let ping = CibaSettings {
        mode: CibaMode::Ping,
        notification_endpoint: Some("https://rp.example/ciba".into()),
    };
    let mut s = public();
    s.ciba = Some(ping.clone());
    refused(s, OidcClientError::PublicCiba);
    let mut s = confidential();
    s.ciba = Some(CibaSettings {
        mode: CibaMode::Ping,
        notification_endpoint: None,
    });
    refused(s, OidcClientError::PingWithoutEndpoint);
    let mut s = confidential();
    s.ciba = Some(CibaSettings {
        mode: CibaMode::Poll,
        notification_endpoint: Some("https://rp.example/ciba".into()),
    });
    refused(s, OidcClientError::PollWithEndpoint);
    // A CIBA-only client needs no redirect URI.
    let mut s = confidential();
    s.redirect_uris.clear();
    s.ciba = Some(ping);
    given::<Server>([created()])
        .when(register(1, s.clone()))
        .then(vec![registered(1, s)]);
}

#[test]
fn at_most_a_hundred_clients_and_ids_are_never_reused() {
    let mut history = vec![created()];
    history.extend((0..100).map(|n| registered(n, public())));
    given::<Server>(history.clone())
        .when(register(200, public()))
        .then_error(ServerError::TooManyOidcClients { max: 100 });
    given::<Server>(history.clone())
        .when(register(5, public()))
        .then_error(ServerError::OidcClientExists);
    history.push(ServerEvent::OidcClientRemoved(OidcClientRemoved {
        client_id: client(5),
    }));
    given::<Server>(history.clone())
        .when(register(200, public()))
        .then(vec![registered(200, public())]);
    given::<Server>(history)
        .when(register(5, public()))
        .then_error(ServerError::OidcClientExists);
}

#[test]
fn update_merges_and_emits_the_full_settings() {
    let mut change = no_change(1);
    change.name = Some("Team wiki".into());
    change.backchannel_logout_uri = Some(None);
    let mut expected = confidential();
    expected.name = "Team wiki".into();
    expected.backchannel_logout_uri = None;
    let state = given::<Server>([created(), registered(1, confidential())])
        .when(change)
        .then(vec![ServerEvent::OidcClientUpdated(OidcClientUpdated {
            client_id: client(1),
            settings: expected.clone(),
        })]);
    let Server::Active(s) = state else {
        panic!("not active")
    };
    assert_eq!(
        s.oidc_clients.get(&client(1)).map(|c| &c.settings),
        Some(&expected)
    );
}

#[test]
fn an_update_that_changes_nothing_emits_nothing() {
    given::<Server>([created(), registered(1, confidential())])
        .when(no_change(1))
        .then_nothing();
    let mut same = no_change(1);
    same.name = Some("Wiki".into());
    given::<Server>([created(), registered(1, confidential())])
        .when(same)
        .then_nothing();
}

#[test]
fn an_update_is_checked_as_merged() {
    let mut change = no_change(2);
    change.ciba = Some(Some(CibaSettings {
        mode: CibaMode::Poll,
        notification_endpoint: None,
    }));
    given::<Server>([created(), registered(2, public())])
        .when(change)
        .then_error(OidcClientError::PublicCiba.into());
    let mut change = no_change(2);
    change.redirect_uris = Some(vec![]);
    given::<Server>([created(), registered(2, public())])
        .when(change)
        .then_error(OidcClientError::NoRedirectUri.into());
}

#[test]
fn unknown_and_removed_clients_are_not_found() {
    let removed = ServerEvent::OidcClientRemoved(OidcClientRemoved {
        client_id: client(1),
    });
    for history in [
        vec![created()],
        vec![created(), registered(1, confidential()), removed],
    ] {
        given::<Server>(history.clone())
            .when(no_change(1))
            .then_error(ServerError::OidcClientNotFound);
        given::<Server>(history.clone())
            .when(RemoveOidcClient {
                client_id: client(1),
            })
            .then_error(ServerError::OidcClientNotFound);
        given::<Server>(history)
            .when(RotateOidcClientSecret {
                client_id: client(1),
                secret_hash: [9; 32],
            })
            .then_error(ServerError::OidcClientNotFound);
    }
}

#[test]
fn remove_marks_the_client_removed() {
    let state = given::<Server>([created(), registered(1, confidential())])
        .when(RemoveOidcClient {
            client_id: client(1),
        })
        .then(vec![ServerEvent::OidcClientRemoved(OidcClientRemoved {
            client_id: client(1),
        })]);
    let Server::Active(s) = state else {
        panic!("not active")
    };
    assert_eq!(
        s.oidc_clients.get(&client(1)).map(|c| c.removed),
        Some(true)
    );
}

#[test]
fn only_a_confidential_client_rotates_its_secret() {
    given::<Server>([created(), registered(1, confidential())])
        .when(RotateOidcClientSecret {
            client_id: client(1),
            secret_hash: [9; 32],
        })
        .then(vec![ServerEvent::OidcClientSecretRotated(
            OidcClientSecretRotated {
                client_id: client(1),
                secret_hash: [9; 32],
            },
        )]);
    given::<Server>([created(), registered(2, public())])
        .when(RotateOidcClientSecret {
            client_id: client(2),
            secret_hash: [9; 32],
        })
        .then_error(OidcClientError::PublicSecret.into());
}

#[test]
fn rotating_the_signing_key_records_its_kid_once() {
    let compressed = p256::SecretKey::from_slice(&[7; 32])
        .unwrap()
        .public_key()
        .to_sec1_bytes()
        .to_vec();
    let uncompressed = {
        use p256::elliptic_curve::sec1::ToSec1Point as _;
        p256::PublicKey::from_sec1_bytes(&compressed)
            .unwrap()
            .as_affine()
            .to_sec1_point(false)
            .as_bytes()
            .to_vec()
    };
    let rotated = ServerEvent::OidcKeyRotated(OidcKeyRotated {
        kid: oidc_kid(&uncompressed).unwrap(),
        public_key: uncompressed.clone(),
        rotated_at: NOW,
    });
    let state = given::<Server>([created()])
        .when(RotateOidcKey {
            public_key: compressed.clone(),
        })
        .then(vec![rotated.clone()]);
    let Server::Active(s) = state else {
        panic!("not active")
    };
    assert_eq!(s.oidc_keys, vec![oidc_kid(&uncompressed).unwrap()]);
    given::<Server>([created(), rotated])
        .when(RotateOidcKey {
            public_key: compressed,
        })
        .then_nothing();
    given::<Server>([created()])
        .when(RotateOidcKey {
            public_key: vec![4; 65],
        })
        .then_error(ServerError::Invalid(ValidationError::InvalidKey {
            field: "public_key",
        }));
}

#[test]
fn kid_is_the_rfc7638_thumbprint() {
    // The P-256 key of RFC 7517 appendix A.1; the thumbprint input written out by hand, with
    // the members in lexicographic order and no whitespace (RFC 7638 §3.2).
    let x = "MKBCTNIcKUSDii11ySs3526iDZ8AiTo7Tu6KPAqv7D4";
    let y = "4Etl6SRW2YiLUrN5vfvVHuhp7x8PxltmWWlbbM4IFyM";
    let mut sec1 = vec![4];
    sec1.extend(URL_SAFE_NO_PAD.decode(x).unwrap());
    sec1.extend(URL_SAFE_NO_PAD.decode(y).unwrap());
    let json = format!(r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#);
    let expected = URL_SAFE_NO_PAD.encode(Sha256::digest(json.as_bytes()));
    assert_eq!(oidc_kid(&sec1).as_deref(), Some(expected.as_str()));
    assert_eq!(expected.len(), 43);
    assert_eq!(oidc_kid(&[4; 65]), None);
}

#[test]
fn a_deleted_server_refuses_oidc_commands() {
    let history = [
        created(),
        registered(1, confidential()),
        ServerEvent::Deleted(ServerDeleted { deleted_at: NOW }),
    ];
    given::<Server>(history.clone())
        .when(register(2, public()))
        .then_error(ServerError::Deleted);
    given::<Server>(history.clone())
        .when(RemoveOidcClient {
            client_id: client(1),
        })
        .then_error(ServerError::Deleted);
    given::<Server>(history)
        .when(RotateOidcKey {
            public_key: point(9),
        })
        .then_error(ServerError::Deleted);
}

#[test]
fn settings_serialize_with_snake_case_kinds() {
    let mut s = confidential();
    s.ciba = Some(CibaSettings {
        mode: CibaMode::Poll,
        notification_endpoint: None,
    });
    let json = serde_json::to_value(&s).unwrap();
    assert_eq!(json["kind"], "confidential");
    assert_eq!(json["ciba"]["mode"], "poll");
    assert_eq!(
        serde_json::from_value::<OidcClientSettings>(json).unwrap(),
        s
    );
}
