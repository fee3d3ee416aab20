use super::*;
use crate::aggregate::ErrorKind;
use crate::event::DomainEvent;
use crate::ids::Timestamp;
use crate::testing::{NOW, given, given_nothing};
use p256::elliptic_curve::sec1::ToSec1Point;
use sha2::{Digest, Sha256};

const ID: ServerId = ServerId::from_bytes([0x11; 16]);

fn key_pair_point(compress: bool) -> Vec<u8> {
    let secret = p256::SecretKey::from_slice(&[0x42; 32]).unwrap();
    secret
        .public_key()
        .as_affine()
        .to_sec1_point(compress)
        .as_bytes()
        .to_vec()
}

fn create() -> CreateServer {
    CreateServer {
        id: ID,
        name: "Acme Bank".into(),
        public_key: key_pair_point(false),
    }
}

fn created() -> ServerEvent {
    let public_key = key_pair_point(false);
    ServerEvent::Created(ServerCreated {
        server_id: ID,
        key_thumbprint: Sha256::digest(&public_key).into(),
        public_key,
        settings: ServerSettings::defaults("Acme Bank".into()),
        user_digest: UserDigestScheme::HmacSha256,
    })
}

fn key(n: u8) -> ApiKeyId {
    ApiKeyId::from_bytes([n; 16])
}

fn issue(n: u8) -> IssueApiKey {
    IssueApiKey {
        key_id: key(n),
        label: format!("key {n}"),
        secret_hash: [n; 32],
    }
}

fn issued(n: u8) -> ServerEvent {
    ServerEvent::ApiKeyIssued(ApiKeyIssued {
        key_id: key(n),
        label: format!("key {n}"),
        secret_hash: [n; 32],
        issued_at: NOW,
    })
}

fn deleted() -> ServerEvent {
    ServerEvent::Deleted(ServerDeleted { deleted_at: NOW })
}

fn settings_with(f: impl FnOnce(&mut ServerSettings)) -> ServerSettings {
    let mut s = ServerSettings::defaults("Acme Bank".into());
    f(&mut s);
    s
}

fn invalid(e: ValidationError) -> ServerError {
    ServerError::Invalid(e)
}

#[test]
fn create_emits_key_thumbprint_and_defaults() {
    let state = given_nothing::<Server>()
        .when(create())
        .then(vec![created()]);
    let Server::Active(s) = state else {
        panic!("active")
    };
    assert_eq!(s.settings.session_timeout_secs, 300);
    assert_eq!(s.settings.default_ping_time_secs, 0);
    assert!(s.settings.second_factor.require_for_login);
}

#[test]
fn create_normalises_a_compressed_key_to_uncompressed() {
    let cmd = CreateServer {
        public_key: key_pair_point(true),
        ..create()
    };
    assert_eq!(cmd.public_key.len(), 33);
    given_nothing::<Server>().when(cmd).then(vec![created()]);
}

#[test]
fn create_rejects_bad_keys() {
    for public_key in [
        vec![],
        vec![0x04; 65],
        vec![0x00],
        key_pair_point(false)[..64].to_vec(),
    ] {
        given_nothing::<Server>()
            .when(CreateServer {
                public_key,
                ..create()
            })
            .then_error(invalid(ValidationError::PublicKey));
    }
}

#[test]
fn create_validates_the_name() {
    given_nothing::<Server>()
        .when(CreateServer {
            name: String::new(),
            ..create()
        })
        .then_error(invalid(ValidationError::Empty { field: "name" }));
    given_nothing::<Server>()
        .when(CreateServer {
            name: "x".repeat(101),
            ..create()
        })
        .then_error(invalid(ValidationError::TooLong {
            field: "name",
            max: 100,
            actual: 101,
            unit: "characters",
        }));
    given_nothing::<Server>()
        .when(CreateServer {
            name: "Acme\u{0}".into(),
            ..create()
        })
        .then_error(invalid(ValidationError::ControlCharacter { field: "name" }));
}

#[test]
fn create_twice_conflicts() {
    given::<Server>([created()])
        .when(create())
        .then_error(ServerError::AlreadyExists);
}

#[test]
fn configure_emits_the_full_resulting_settings() {
    let cmd = ConfigureServer {
        name: Some("Acme".into()),
        logo_url: Some(Some("https://acme.example/logo.png".into())),
        session_timeout_secs: Some(600),
        default_ping_time_secs: Some(30),
        ..ConfigureServer::default()
    };
    given::<Server>([created()])
        .when(cmd)
        .then(vec![ServerEvent::Configured(ServerConfigured {
            settings: settings_with(|s| {
                s.name = "Acme".into();
                s.logo_url = Some("https://acme.example/logo.png".into());
                s.session_timeout_secs = 600;
                s.default_ping_time_secs = 30;
            }),
        })]);
}

#[test]
fn configure_without_change_emits_nothing() {
    given::<Server>([created()])
        .when(ConfigureServer::default())
        .then_nothing();
    given::<Server>([created()])
        .when(ConfigureServer {
            name: Some("Acme Bank".into()),
            session_timeout_secs: Some(300),
            ..Default::default()
        })
        .then_nothing();
}

#[test]
fn configure_can_remove_the_logo() {
    let with_logo = settings_with(|s| s.logo_url = Some("https://a.example/l.png".into()));
    given::<Server>([
        created(),
        ServerEvent::Configured(ServerConfigured {
            settings: with_logo,
        }),
    ])
    .when(ConfigureServer {
        logo_url: Some(None),
        ..Default::default()
    })
    .then(vec![ServerEvent::Configured(ServerConfigured {
        settings: ServerSettings::defaults("Acme Bank".into()),
    })]);
}

#[test]
fn configure_validates_each_field() {
    let cases: Vec<(ConfigureServer, ValidationError)> = vec![
        (
            ConfigureServer {
                name: Some(String::new()),
                ..Default::default()
            },
            ValidationError::Empty { field: "name" },
        ),
        (
            ConfigureServer {
                name: Some("\u{1b}[31m".into()),
                ..Default::default()
            },
            ValidationError::ControlCharacter { field: "name" },
        ),
        (
            ConfigureServer {
                logo_url: Some(Some("http://a.example/l.png".into())),
                ..Default::default()
            },
            ValidationError::UrlNotHttps,
        ),
        (
            ConfigureServer {
                logo_url: Some(Some("logo.png".into())),
                ..Default::default()
            },
            ValidationError::UrlMalformed,
        ),
        (
            ConfigureServer {
                logo_url: Some(Some(format!("https://a.example/{}", "x".repeat(2040)))),
                ..Default::default()
            },
            ValidationError::TooLong {
                field: "logo_url",
                max: 2048,
                actual: 2058,
                unit: "bytes",
            },
        ),
        (
            ConfigureServer {
                session_timeout_secs: Some(29),
                ..Default::default()
            },
            ValidationError::OutOfRange {
                field: "session_timeout_secs",
                min: 30,
                max: 86_400,
                actual: 29,
            },
        ),
        (
            ConfigureServer {
                session_timeout_secs: Some(86_401),
                ..Default::default()
            },
            ValidationError::OutOfRange {
                field: "session_timeout_secs",
                min: 30,
                max: 86_400,
                actual: 86_401,
            },
        ),
        (
            ConfigureServer {
                session_timeout_secs: Some(86_400),
                default_ping_time_secs: Some(3601),
                ..Default::default()
            },
            ValidationError::OutOfRange {
                field: "default_ping_time_secs",
                min: 0,
                max: 3600,
                actual: 3601,
            },
        ),
        (
            ConfigureServer {
                default_ping_time_secs: Some(300),
                ..Default::default()
            },
            ValidationError::PingNotBelowTimeout {
                ping: 300,
                timeout: 300,
            },
        ),
        (
            ConfigureServer {
                second_factor: Some(SecondFactorPolicy {
                    login_reuse_window_secs: 3601,
                    ..Default::default()
                }),
                ..Default::default()
            },
            ValidationError::OutOfRange {
                field: "second_factor.login_reuse_window_secs",
                min: 0,
                max: 3600,
                actual: 3601,
            },
        ),
        (
            ConfigureServer {
                second_factor: Some(SecondFactorPolicy {
                    pin_allowed: false,
                    biometric_allowed: false,
                    ..Default::default()
                }),
                ..Default::default()
            },
            ValidationError::NoSecondFactorAllowed,
        ),
    ];
    for (cmd, error) in cases {
        given::<Server>([created()])
            .when(cmd)
            .then_error(invalid(error));
    }
}

#[test]
fn ping_rule_checks_the_merged_settings() {
    // Lowering the timeout below an existing ping time is refused even though only the
    // timeout is in the command.
    let continuous = settings_with(|s| s.default_ping_time_secs = 60);
    given::<Server>([
        created(),
        ServerEvent::Configured(ServerConfigured {
            settings: continuous,
        }),
    ])
    .when(ConfigureServer {
        session_timeout_secs: Some(60),
        ..Default::default()
    })
    .then_error(invalid(ValidationError::PingNotBelowTimeout {
        ping: 60,
        timeout: 60,
    }));
}

#[test]
fn configure_unknown_server_is_not_found() {
    given_nothing::<Server>()
        .when(ConfigureServer::default())
        .then_error(ServerError::NotFound);
}

#[test]
fn issue_api_key_records_the_hash_and_time() {
    let later = Timestamp::from_millis(NOW.as_millis() + 5);
    let then = given::<Server>([created()]).at(later).when(issue(1));
    then.then(vec![ServerEvent::ApiKeyIssued(ApiKeyIssued {
        key_id: key(1),
        label: "key 1".into(),
        secret_hash: [1; 32],
        issued_at: later,
    })]);
}

#[test]
fn issue_api_key_rules() {
    given::<Server>([created(), issued(1)])
        .when(issue(1))
        .then_error(ServerError::ApiKeyExists);
    let revoked = ServerEvent::ApiKeyRevoked(ApiKeyRevoked {
        key_id: key(1),
        revoked_at: NOW,
    });
    given::<Server>([created(), issued(1), revoked])
        .when(issue(1))
        .then_error(ServerError::ApiKeyExists);
    given::<Server>([created()])
        .when(IssueApiKey {
            label: String::new(),
            ..issue(1)
        })
        .then_error(invalid(ValidationError::Empty { field: "label" }));
    given::<Server>([created()])
        .when(IssueApiKey {
            label: "l".repeat(101),
            ..issue(1)
        })
        .then_error(invalid(ValidationError::TooLong {
            field: "label",
            max: 100,
            actual: 101,
            unit: "characters",
        }));
    given::<Server>([created()])
        .when(IssueApiKey {
            label: "a\tb".into(),
            ..issue(1)
        })
        .then_error(invalid(ValidationError::ControlCharacter {
            field: "label",
        }));
}

#[test]
fn at_most_twenty_active_api_keys() {
    let mut history = vec![created()];
    history.extend((1..=20).map(issued));
    given::<Server>(history.clone())
        .when(issue(21))
        .then_error(ServerError::TooManyApiKeys { max: 20 });
    // Revoking one frees a slot.
    history.push(ServerEvent::ApiKeyRevoked(ApiKeyRevoked {
        key_id: key(3),
        revoked_at: NOW,
    }));
    given::<Server>(history)
        .when(issue(21))
        .then(vec![issued(21)]);
}

#[test]
fn revoke_api_key() {
    given::<Server>([created(), issued(1)])
        .when(RevokeApiKey { key_id: key(1) })
        .then(vec![ServerEvent::ApiKeyRevoked(ApiKeyRevoked {
            key_id: key(1),
            revoked_at: NOW,
        })]);
    given::<Server>([created()])
        .when(RevokeApiKey { key_id: key(1) })
        .then_error(ServerError::ApiKeyNotFound);
    let revoked = ServerEvent::ApiKeyRevoked(ApiKeyRevoked {
        key_id: key(1),
        revoked_at: NOW,
    });
    given::<Server>([created(), issued(1), revoked])
        .when(RevokeApiKey { key_id: key(1) })
        .then_nothing();
}

#[test]
fn delete_then_everything_is_gone() {
    let state = given::<Server>([created()])
        .when(DeleteServer)
        .then(vec![deleted()]);
    assert_eq!(state, Server::Deleted { id: ID });
    let commands: Vec<ServerCommand> = vec![
        create().into(),
        ConfigureServer::default().into(),
        issue(1).into(),
        RevokeApiKey { key_id: key(1) }.into(),
        DeleteServer.into(),
    ];
    for cmd in commands {
        given::<Server>([created(), deleted()])
            .when(cmd)
            .then_error(ServerError::Deleted);
    }
}

#[test]
fn commands_on_a_missing_server_are_not_found() {
    let commands: Vec<ServerCommand> = vec![
        issue(1).into(),
        RevokeApiKey { key_id: key(1) }.into(),
        DeleteServer.into(),
    ];
    for cmd in commands {
        given_nothing::<Server>()
            .when(cmd)
            .then_error(ServerError::NotFound);
    }
}

#[test]
fn errors_classify_for_http() {
    assert_eq!(
        ServerError::Invalid(ValidationError::PublicKey).kind(),
        ErrorKind::Invalid
    );
    assert_eq!(ServerError::AlreadyExists.kind(), ErrorKind::Conflict);
    assert_eq!(
        ServerError::TooManyApiKeys { max: 20 }.kind(),
        ErrorKind::Conflict
    );
    assert_eq!(ServerError::ApiKeyNotFound.kind(), ErrorKind::NotFound);
    assert_eq!(ServerError::Deleted.kind(), ErrorKind::Gone);
}

#[test]
fn apply_ignores_events_that_cannot_follow() {
    let mut s = Server::default();
    s.apply(&deleted());
    s.apply(&issued(1));
    assert_eq!(s, Server::NotCreated);
}

/// A realistic lifecycle, as a reviewer reads it.
#[test]
fn lifecycle_snapshot() {
    const NAME: &str = "server_lifecycle";
    let t = |s: i64| Timestamp::from_millis(NOW.as_millis() + s * 1000);
    let mut events = Vec::new();
    let mut run = |at: Timestamp, cmd: ServerCommand| {
        let new = given::<Server>(events.clone()).at(at).when(cmd).events();
        events.extend(new);
    };
    run(t(0), create().into());
    run(
        t(60),
        ConfigureServer {
            logo_url: Some(Some("https://acme.example/logo.svg".into())),
            second_factor: Some(SecondFactorPolicy {
                pin_allowed: true,
                biometric_allowed: true,
                require_for_login: true,
                login_reuse_window_secs: 300,
            }),
            session_timeout_secs: Some(900),
            default_ping_time_secs: Some(60),
            ..Default::default()
        }
        .into(),
    );
    run(t(120), issue(1).into());
    run(t(180), issue(2).into());
    run(t(240), RevokeApiKey { key_id: key(1) }.into());
    run(t(300), DeleteServer.into());
    let rendered: Vec<_> = events.iter().map(crate::testing::render).collect();
    // server.created is at v2 (user digest scheme); every other server event at v1.
    let expected_version = |e: &ServerEvent| u16::from(e.event_type() == "server.created") + 1;
    assert!(
        events
            .iter()
            .all(|e| e.schema_version() == expected_version(e))
    );
    insta::with_settings!({ snapshot_path => "../snapshots", prepend_module_to_snapshot => false }, {
        insta::assert_yaml_snapshot!(NAME, rendered);
    });
}

#[test]
fn a_server_trusts_and_distrusts_third_party_sfs_keys() {
    let mut server = Server::default();
    let mut ctx = Context::new(NOW);
    for event in server.decide(create().into(), &mut ctx).unwrap_or_default() {
        server.apply(&event);
    }
    let key = key_pair_point(true);
    let trust = TrustSfsKey {
        public_key: key.clone(),
        label: "Partner app".into(),
    };
    let events = server
        .decide(trust.clone().into(), &mut ctx)
        .unwrap_or_default();
    let [ServerEvent::SfsKeyTrusted(trusted)] = events.as_slice() else {
        panic!("trusted: {events:?}")
    };
    assert_eq!(trusted.public_key.len(), 65, "stored uncompressed");
    assert_eq!(Some(trusted.key_id), sfs_key_id(&key));
    server.apply(&events[0]);
    assert_eq!(
        server.decide(trust.into(), &mut ctx),
        Ok(Vec::new()),
        "again: nothing"
    );
    let Server::Active(active) = &server else {
        panic!("active")
    };
    assert!(active.trusted_sfs_keys.contains_key(&trusted.key_id));
    let distrust = DistrustSfsKey {
        key_id: trusted.key_id,
    };
    let events = server.decide(distrust.into(), &mut ctx).unwrap_or_default();
    assert!(matches!(
        events.as_slice(),
        [ServerEvent::SfsKeyDistrusted(_)]
    ));
    server.apply(&events[0]);
    assert_eq!(server.decide(distrust.into(), &mut ctx), Ok(Vec::new()));
    let bad = TrustSfsKey {
        public_key: vec![4; 65],
        label: "x".into(),
    };
    assert!(server.decide(bad.into(), &mut ctx).is_err(), "not a point");
}

#[test]
fn a_new_server_names_users_with_keyed_digests() {
    let events = given_nothing::<Server>().when(create()).events();
    let [ServerEvent::Created(e)] = events.as_slice() else {
        panic!("{events:?}")
    };
    assert_eq!(e.user_digest, UserDigestScheme::HmacSha256);
    let mut state = Server::default();
    state.apply(&events[0]);
    let Server::Active(active) = state else {
        panic!("{state:?}")
    };
    assert_eq!(active.user_digest, UserDigestScheme::HmacSha256);
}

/// A `server.created` v1 written before keyed digests reads back as v2 with the unkeyed
/// scheme: that server's users keep the stream names they were given.
#[test]
fn server_created_v1_upcasts_to_the_unkeyed_user_digest_scheme() {
    let ServerEvent::Created(current) = created() else {
        panic!()
    };
    let v1 = ServerCreatedV1 {
        server_id: current.server_id,
        public_key: current.public_key.clone(),
        key_thumbprint: current.key_thumbprint,
        settings: current.settings.clone(),
    };
    let bytes = crate::cbor::to_canonical_vec(&v1).unwrap();
    let decoded = ServerEvent::decode("server.created", 1, &bytes).unwrap();
    assert_eq!(
        decoded,
        ServerEvent::Created(ServerCreated {
            user_digest: UserDigestScheme::Sha256Unkeyed,
            ..current.clone()
        })
    );
    // Written again it is v2, whose bytes name the scheme; v1 bytes are not v2 bytes.
    assert_eq!(decoded.schema_version(), 2);
    assert!(ServerEvent::decode("server.created", 2, &bytes).is_err());
    let v2 = ServerEvent::Created(current).encode().unwrap();
    assert!(v2.windows(11).any(|w| w == b"hmac-sha256"));
    assert_eq!(
        ServerEvent::decode("server.created", 2, &v2).unwrap(),
        created()
    );
}

fn data_service(url: &str, timeout_ms: u32) -> DataServiceSettings {
    DataServiceSettings {
        url: url.into(),
        timeout_ms,
    }
}

#[test]
fn configure_sets_and_clears_the_data_service() {
    let ds = data_service("http://127.0.0.1:8081/in", 2000);
    let set = ServerEvent::Configured(ServerConfigured {
        settings: settings_with(|s| s.data_service = Some(ds.clone())),
    });
    given::<Server>(vec![created()])
        .when(ConfigureServer {
            data_service: Some(Some(ds.clone())),
            ..Default::default()
        })
        .then(vec![set.clone()]);
    // Setting what is set emits nothing; clearing goes back to no Data Service.
    given::<Server>(vec![created(), set.clone()])
        .when(ConfigureServer {
            data_service: Some(Some(ds)),
            ..Default::default()
        })
        .then_nothing();
    given::<Server>(vec![created(), set])
        .when(ConfigureServer {
            data_service: Some(None),
            ..Default::default()
        })
        .then(vec![ServerEvent::Configured(ServerConfigured {
            settings: ServerSettings::defaults("Acme Bank".into()),
        })]);
}

#[test]
fn configure_turns_headless_enrolment_on_and_off() {
    let on = ServerEvent::Configured(ServerConfigured {
        settings: settings_with(|s| s.headless_enrolment = true),
    });
    given::<Server>(vec![created()])
        .when(ConfigureServer {
            headless_enrolment: Some(true),
            ..Default::default()
        })
        .then(vec![on.clone()]);
    given::<Server>(vec![created()])
        .when(ConfigureServer {
            headless_enrolment: Some(false),
            ..Default::default()
        })
        .then_nothing();
    given::<Server>(vec![created(), on])
        .when(ConfigureServer {
            headless_enrolment: Some(false),
            ..Default::default()
        })
        .then(vec![ServerEvent::Configured(ServerConfigured {
            settings: ServerSettings::defaults("Acme Bank".into()),
        })]);
}

#[test]
fn configure_validates_the_data_service() {
    let cases = [
        (
            data_service("ftp://ds.example/", 1000),
            ValidationError::DataServiceUrl,
        ),
        (
            data_service("https://u:p@ds.example/", 1000),
            ValidationError::DataServiceUrl,
        ),
        (
            data_service("https://ds.example/", 99),
            ValidationError::OutOfRange {
                field: "data_service.timeout_ms",
                min: 100,
                max: 30_000,
                actual: 99,
            },
        ),
        (
            data_service("https://ds.example/", 30_001),
            ValidationError::OutOfRange {
                field: "data_service.timeout_ms",
                min: 100,
                max: 30_000,
                actual: 30_001,
            },
        ),
    ];
    for (ds, error) in cases {
        given::<Server>(vec![created()])
            .when(ConfigureServer {
                data_service: Some(Some(ds)),
                ..Default::default()
            })
            .then_error(invalid(error));
    }
}

#[test]
fn settings_without_the_secure_channel_fields_keep_their_bytes() {
    // A payload written before the fields existed decodes with them off, and settings with
    // them off encode to the same bytes, so old events and their hashes stay as they are.
    #[derive(serde::Serialize)]
    struct OldSettings {
        name: String,
        logo_url: Option<String>,
        second_factor: SecondFactorPolicy,
        session_timeout_secs: u32,
        default_ping_time_secs: u32,
    }
    #[derive(serde::Serialize)]
    struct OldConfigured {
        settings: OldSettings,
    }
    let old = OldConfigured {
        settings: OldSettings {
            name: "Acme Bank".into(),
            logo_url: None,
            second_factor: SecondFactorPolicy::default(),
            session_timeout_secs: 300,
            default_ping_time_secs: 0,
        },
    };
    let bytes = crate::cbor::to_canonical_vec(&old).unwrap();
    let decoded = ServerEvent::decode("server.configured", 1, &bytes).unwrap();
    let defaults = ServerEvent::Configured(ServerConfigured {
        settings: ServerSettings::defaults("Acme Bank".into()),
    });
    assert_eq!(decoded, defaults);
    assert_eq!(defaults.encode().unwrap(), bytes);
    // With them on, they are in the payload and come back.
    let on = ServerEvent::Configured(ServerConfigured {
        settings: settings_with(|s| {
            s.headless_enrolment = true;
            s.data_service = Some(data_service("https://ds.example/", 5000));
        }),
    });
    let bytes = on.encode().unwrap();
    assert_ne!(bytes, defaults.encode().unwrap());
    assert_eq!(
        ServerEvent::decode("server.configured", 1, &bytes).unwrap(),
        on
    );
}
