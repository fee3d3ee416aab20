//! Given/when/then for aggregate tests: given these events, when this command, then these
//! events or this error. Every emitted event is also applied, so `apply` is exercised on
//! exactly what `decide` produces.

use std::fmt::Debug;

use crate::aggregate::{Aggregate, Context};
use crate::ids::Timestamp;
use crate::seal::{CounterSealer, DataKey};

/// The fixed "now" of aggregate tests: 2026-01-01T00:00:00Z.
pub const NOW: Timestamp = Timestamp::from_millis(1_767_225_600_000);

/// The data key of test users.
pub fn test_key() -> DataKey {
    DataKey::from_bytes([0x5a; 32])
}

/// A deterministic sealer under [`test_key`].
pub fn test_sealer() -> CounterSealer {
    CounterSealer::new(test_key(), *b"test")
}

pub struct Given<A: Aggregate> {
    state: A,
    now: Timestamp,
    sealer: CounterSealer,
}

pub fn given<A: Aggregate>(events: impl IntoIterator<Item = A::Event>) -> Given<A> {
    let mut state = A::default();
    for e in events {
        state.apply(&e);
    }
    Given {
        state,
        now: NOW,
        sealer: test_sealer(),
    }
}

pub fn given_nothing<A: Aggregate>() -> Given<A> {
    given(Vec::new())
}

pub struct Then<A: Aggregate> {
    pub result: Result<Vec<A::Event>, A::Error>,
    pub state: A,
}

impl<A: Aggregate> Given<A> {
    pub fn at(mut self, now: Timestamp) -> Self {
        self.now = now;
        self
    }

    pub fn when(mut self, command: impl Into<A::Command>) -> Then<A> {
        let mut ctx = Context::with_sealer(self.now, &mut self.sealer);
        let result = self.state.decide(command.into(), &mut ctx);
        if let Ok(events) = &result {
            for e in events {
                self.state.apply(e);
            }
        }
        Then {
            result,
            state: self.state,
        }
    }
}

impl<A: Aggregate> Then<A>
where
    A::Event: Debug + PartialEq,
    A::Error: Debug + PartialEq,
{
    #[track_caller]
    pub fn then(self, expected: Vec<A::Event>) -> A {
        match self.result {
            Ok(events) => assert_eq!(events, expected),
            Err(e) => panic!("expected events, got error {e:?}"),
        }
        self.state
    }

    #[track_caller]
    pub fn then_nothing(self) -> A {
        self.then(Vec::new())
    }

    #[track_caller]
    pub fn then_error(self, expected: A::Error) {
        match self.result {
            Ok(events) => panic!("expected error {expected:?}, got events {events:?}"),
            Err(e) => assert_eq!(e, expected),
        }
    }

    #[track_caller]
    pub fn events(self) -> Vec<A::Event> {
        match self.result {
            Ok(events) => events,
            Err(e) => panic!("expected events, got error {e:?}"),
        }
    }
}

/// An event as a reviewer reads it in a snapshot: type, version and payload as JSON.
pub fn render<E: crate::event::DomainEvent>(event: &E) -> serde_json::Value {
    let payload = crate::cbor::decode_value(&event.encode().unwrap()).unwrap();
    serde_json::json!({
        "type": event.event_type(),
        "schema_version": event.schema_version(),
        "payload": crate::cbor::value_to_json(&payload),
    })
}

/// One event of every variant of every aggregate, with every optional field filled in some and
/// empty in others, for codec round-trip tests.
pub fn samples() -> Vec<crate::event::AnyEvent> {
    use crate::account::*;
    use crate::enrolment::*;
    use crate::ids::*;
    use crate::second_factor::*;
    use crate::server::*;
    use crate::session::*;
    use crate::transaction::*;
    use crate::user::*;

    let server = ServerId::from_bytes([1; 16]);
    let digest = UserDigest::from_bytes([2; 16]);
    let account_id = AccountId::from_bytes([3; 16]);
    let app = AppInstanceId::from_bytes([4; 16]);
    let t = Timestamp::from_millis(1_767_225_600_123);
    let sealed = crate::seal::Sealed {
        nonce: [5; 12],
        ciphertext: vec![6; 20],
    };
    let settings = ServerSettings::defaults("Acme".into());
    vec![
        ServerEvent::Created(ServerCreated {
            server_id: server,
            public_key: vec![4; 65],
            key_thumbprint: [7; 32],
            settings: settings.clone(),
            user_digest: crate::ids::UserDigestScheme::HmacSha256,
        })
        .into(),
        ServerEvent::Configured(ServerConfigured {
            settings: ServerSettings {
                logo_url: Some("https://a.example/l.png".into()),
                ..settings
            },
        })
        .into(),
        ServerEvent::ApiKeyIssued(ApiKeyIssued {
            key_id: ApiKeyId::from_bytes([8; 16]),
            label: "ci".into(),
            secret_hash: [9; 32],
            issued_at: t,
        })
        .into(),
        ServerEvent::ApiKeyRevoked(ApiKeyRevoked {
            key_id: ApiKeyId::from_bytes([8; 16]),
            revoked_at: t,
        })
        .into(),
        ServerEvent::OidcClientRegistered(OidcClientRegistered {
            client_id: OidcClientId::from_bytes([12; 16]),
            settings: OidcClientSettings {
                name: "Wiki".into(),
                kind: OidcClientKind::Confidential,
                redirect_uris: vec!["https://wiki.example/cb".into()],
                post_logout_redirect_uris: vec![],
                scopes: vec!["openid".into(), "email".into()],
                backchannel_logout_uri: Some("https://wiki.example/bcl".into()),
                ciba: Some(CibaSettings {
                    mode: CibaMode::Ping,
                    notification_endpoint: Some("https://wiki.example/ciba".into()),
                }),
            },
            secret_hash: Some([13; 32]),
        })
        .into(),
        ServerEvent::OidcClientUpdated(OidcClientUpdated {
            client_id: OidcClientId::from_bytes([12; 16]),
            settings: OidcClientSettings {
                name: "App".into(),
                kind: OidcClientKind::Public,
                redirect_uris: vec!["http://127.0.0.1:8080/cb".into()],
                post_logout_redirect_uris: vec!["http://127.0.0.1:8080/".into()],
                scopes: vec!["openid".into()],
                backchannel_logout_uri: None,
                ciba: None,
            },
        })
        .into(),
        ServerEvent::OidcClientSecretRotated(OidcClientSecretRotated {
            client_id: OidcClientId::from_bytes([12; 16]),
            secret_hash: [14; 32],
        })
        .into(),
        ServerEvent::OidcClientRemoved(OidcClientRemoved {
            client_id: OidcClientId::from_bytes([12; 16]),
        })
        .into(),
        ServerEvent::OidcKeyRotated(OidcKeyRotated {
            kid: "kid".into(),
            public_key: vec![4; 65],
            rotated_at: t,
        })
        .into(),
        ServerEvent::Deleted(ServerDeleted { deleted_at: t }).into(),
        UserEvent::Registered(UserRegistered {
            user: UserRef {
                server_id: server,
                digest,
            },
            userid: sealed.clone(),
        })
        .into(),
        UserEvent::AttributeSet(UserAttributeSet {
            name: "email".into(),
            value: sealed,
        })
        .into(),
        UserEvent::AttributeRemoved(UserAttributeRemoved {
            name: "email".into(),
        })
        .into(),
        UserEvent::Deleted(UserDeleted { deleted_at: t }).into(),
        AccountEvent::Registered(AccountRegistered {
            account: AccountRef::new(server, account_id),
            app_instance: app,
            user: None,
            channel_public_key: vec![4; 65],
            signing_public_key: vec![4; 65],
            signing_key_thumbprint: [10; 32],
            second_factor: None,
        })
        .into(),
        AccountEvent::UserLinked(AccountUserLinked { user: digest }).into(),
        AccountEvent::Upgraded(AccountUpgraded {
            second_factor: SecondFactorKind::Pin,
            attestation_hash: [11; 32],
        })
        .into(),
        AccountEvent::KeyRotated(AccountKeyRotated {
            role: KeyRole::Signing,
            public_key: vec![4; 65],
            key_thumbprint: [12; 32],
        })
        .into(),
        AccountEvent::PushRegistered(AccountPushRegistered {
            mc_key_id: [16; 32],
            push_public_key: vec![4; 65],
            token_ref: "push/example".into(),
            registered_at: t,
        })
        .into(),
        AccountEvent::DeviceDataChanged(AccountDeviceDataChanged {
            device_data: DeviceData {
                model: "Pixel 8".into(),
                os: "Android 15".into(),
                app_version: "1.2.3".into(),
            },
            changed_at: t,
        })
        .into(),
        AccountEvent::Deleted(AccountDeleted {
            by: DeletedBy::App,
            deleted_at: t,
        })
        .into(),
        EnrolmentEvent::Started(EnrolmentStarted {
            enrolment: EnrolmentRef::new(server, EnrolmentId::from_bytes([13; 16])),
            user: digest,
            ttl_secs: 600,
            expires_at: t,
        })
        .into(),
        EnrolmentEvent::Completed(EnrolmentCompleted {
            account_id,
            completed_at: t,
        })
        .into(),
        EnrolmentEvent::Expired(EnrolmentExpired { expired_at: t }).into(),
        SessionEvent::Opened(SessionOpened {
            session: SessionRef::new(server, Hsid::from_bytes([14; 32])),
            ping_time_secs: 60,
            timeout_secs: 300,
            expires_at: t,
            app_login: false,
            user: Some(digest),
            announce_info: Some("Log in to Acme?\nFrom Berlin".into()),
            session_info: None,
            push_to: Vec::new(),
        })
        .into(),
        SessionEvent::Scanned(SessionScanned { scanned_at: t }).into(),
        SessionEvent::Confirmed(SessionConfirmed { account_id }).into(),
        SessionEvent::SecondFactorVerified(SessionSecondFactorVerified {
            factor: SecondFactorKind::Biometric,
            attestation_hash: [15; 32],
            verified_at: t,
            reused: true,
        })
        .into(),
        SessionEvent::LoggedIn(SessionLoggedIn {
            account_id,
            user: digest,
            continuous: true,
            ping_deadline: Some(t),
        })
        .into(),
        SessionEvent::Pinged(SessionPinged {
            pinged_at: t,
            ping_deadline: t.plus_secs(60),
        })
        .into(),
        SessionEvent::LoggedOut(SessionLoggedOut {
            reason: LogoutReason::PingMissed,
            logged_out_at: t,
        })
        .into(),
        SessionEvent::Aborted(SessionAborted {
            by: AbortedBy::User,
            aborted_at: t,
        })
        .into(),
        SessionEvent::Expired(SessionExpired { expired_at: t }).into(),
        SessionEvent::Failed(SessionFailed {
            reason: SessionFailure::BadAttestation,
            failed_at: t,
        })
        .into(),
        SessionEvent::Provoked(SessionProvoked {
            account_id,
            user: digest,
            timeout_secs: 120,
            expires_at: t.plus_secs(120),
            announce_info: Some("Log in again?".into()),
            session_info: None,
            provoked_at: t,
        })
        .into(),
        TransactionEvent::Created(TransactionCreated {
            transaction: TransactionRef::new(server, TransactionId::from_bytes([16; 16])),
            user: digest,
            account_id: Some(account_id),
            data: b"{\"amount\":100}".to_vec(),
            data_hash: [17; 32],
            content_type: "application/json".into(),
            text: "Pay €100 to Bob".into(),
            text_hash: [18; 32],
            announce_info: Some("Payment".into()),
            created_at: t,
            expires_at: t,
            origin: TransactionOrigin::Api,
        })
        .into(),
        TransactionEvent::Presented(TransactionPresented {
            account_id,
            presented_at: t,
        })
        .into(),
        TransactionEvent::Signed(TransactionSigned {
            account_id,
            data_hash: [17; 32],
            text_hash: [18; 32],
            content_type: "application/json".into(),
            created_at: t,
            expires_at: t,
            device_signature: vec![0xd2, 0x84],
            attestation: vec![0xd2, 0x84, 0x43],
            factor: SecondFactorKind::Biometric,
            device_time: t,
            signed_at: t,
        })
        .into(),
        TransactionEvent::Rejected(TransactionRejected {
            account_id,
            rejected_at: t,
        })
        .into(),
        TransactionEvent::Expired(TransactionExpired { expired_at: t }).into(),
        SecondFactorEvent::KeyBound(KeyBound {
            app_instance: app,
            key_thumbprint: [17; 32],
            bound_at: t,
        })
        .into(),
        SecondFactorEvent::PinRegistered(PinRegistered {
            app_instance: app,
            record_digest: [18; 32],
        })
        .into(),
        SecondFactorEvent::BiometricKeyRegistered(BiometricKeyRegistered {
            app_instance: app,
            public_key: vec![4; 65],
            key_thumbprint: [19; 32],
        })
        .into(),
        SecondFactorEvent::VerificationSucceeded(VerificationSucceeded {
            factor: SecondFactorKind::Pin,
            challenge_hash: [20; 32],
            attestation_hash: [21; 32],
            verified_at: t,
            attestation_expires_at: t.plus_secs(60),
        })
        .into(),
        SecondFactorEvent::VerificationFailed(VerificationFailed {
            factor: SecondFactorKind::Pin,
            failed_attempts: 3,
            failed_at: t,
        })
        .into(),
        SecondFactorEvent::Locked(SecondFactorLocked {
            factor: SecondFactorKind::Pin,
            failed_attempts: 5,
            locked_until: t.plus_secs(900),
        })
        .into(),
        SecondFactorEvent::Revoked(SecondFactorRevoked {
            factor: SecondFactorKind::Biometric,
            reason: RevocationReason::Replaced,
            revoked_at: t,
        })
        .into(),
        crate::account::AccountEvent::SecondFactorVerified(
            crate::account::AccountSecondFactorVerified {
                factor: SecondFactorKind::Pin,
                attestation_hash: [6; 32],
                verified_at: t,
            },
        )
        .into(),
        crate::server::ServerEvent::SfsKeyTrusted(crate::server::SfsKeyTrusted {
            key_id: [4; 32],
            public_key: vec![4; 65],
            label: "Partner app".to_owned(),
        })
        .into(),
        crate::server::ServerEvent::SfsKeyDistrusted(crate::server::SfsKeyDistrusted {
            key_id: [4; 32],
        })
        .into(),
        crate::attestation::AttestationEvent::Used(crate::attestation::AttestationUsed {
            attestation_hash: [7; 32],
            factor: SecondFactorKind::Pin,
            account_id: crate::ids::AccountId::from_bytes([8; 16]),
            purpose: "login".to_owned(),
            used_at: t,
        })
        .into(),
        crate::grant::GrantEvent::CodeIssued(crate::grant::GrantCodeIssued {
            client_id: crate::ids::OidcClientId::from_bytes([30; 16]),
            session: SessionRef::new(server, Hsid::from_bytes([31; 32])),
            account_id,
            user: digest,
            scope: vec!["openid".to_owned(), "email".to_owned()],
            redirect_uri: "https://rp.example/cb".to_owned(),
            code_challenge: Some([32; 32]),
            nonce: Some("n-0S6".to_owned()),
            code_hash: [33; 32],
            code_expires_at: t.plus_secs(60),
            auth_time: t,
            amr: vec!["hwk".to_owned(), "pin".to_owned()],
            acr: "urn:countersign:acr:2".to_owned(),
        })
        .into(),
        crate::grant::GrantEvent::CibaRequested(crate::grant::GrantCibaRequested {
            client_id: crate::ids::OidcClientId::from_bytes([30; 16]),
            session: SessionRef::new(server, Hsid::from_bytes([34; 32])),
            user: digest,
            scope: vec!["openid".to_owned()],
            binding_message: Some("Pay 10 EUR".to_owned()),
            expires_at: t.plus_secs(300),
            interval_secs: 5,
            ping: true,
            notification_token: Some(crate::seal::Sealed {
                nonce: [38; 12],
                ciphertext: vec![39; 24],
            }),
        })
        .into(),
        crate::grant::GrantEvent::TokensIssued(crate::grant::GrantTokensIssued {
            access_hash: [35; 32],
            refresh_hash: None,
            access_expires_at: t.plus_secs(600),
            issued_at: t,
            account_id,
            auth_time: t,
            amr: vec!["hwk".to_owned()],
            acr: "urn:countersign:acr:1".to_owned(),
        })
        .into(),
        crate::grant::GrantEvent::Refreshed(crate::grant::GrantRefreshed {
            access_hash: [36; 32],
            refresh_hash: [37; 32],
            access_expires_at: t.plus_secs(600),
            refreshed_at: t,
        })
        .into(),
        crate::grant::GrantEvent::Revoked(crate::grant::GrantRevoked {
            reason: crate::grant::RevokeReason::CodeReused,
            revoked_at: t,
        })
        .into(),
    ]
}
