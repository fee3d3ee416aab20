use super::*;
use crate::aggregate::ErrorKind;
use crate::event::DomainEvent;
use crate::ids::{AccountId, ServerId};
use crate::testing::{NOW, given, given_nothing};
use p256::elliptic_curve::sec1::ToSec1Point;
use sha2::{Digest, Sha256};

const SERVER: ServerId = ServerId::from_bytes([0x11; 16]);
const ACCOUNT: AccountRef = AccountRef::new(SERVER, AccountId::from_bytes([0x33; 16]));
const APP: AppInstanceId = AppInstanceId::from_bytes([0x66; 16]);
const USER: UserDigest = UserDigest::from_bytes([0x44; 16]);
const OTHER_USER: UserDigest = UserDigest::from_bytes([0x45; 16]);

const CHANNEL: u8 = 0x42;
const SIGNING: u8 = 0x43;

/// The public key of the secret `[seed; 32]`, compressed or not.
fn point(seed: u8, compress: bool) -> Vec<u8> {
    p256::SecretKey::from_slice(&[seed; 32])
        .unwrap()
        .public_key()
        .as_affine()
        .to_sec1_point(compress)
        .as_bytes()
        .to_vec()
}

fn thumbprint(seed: u8) -> [u8; 32] {
    Sha256::digest(point(seed, false)).into()
}

fn register() -> RegisterAccount {
    RegisterAccount {
        account: ACCOUNT,
        app_instance: APP,
        user: Some(USER),
        channel_public_key: point(CHANNEL, false),
        signing_public_key: point(SIGNING, false),
        second_factor: Some(SecondFactorKind::Pin),
    }
}

fn registered_payload() -> AccountRegistered {
    AccountRegistered {
        account: ACCOUNT,
        app_instance: APP,
        user: Some(USER),
        channel_public_key: point(CHANNEL, false),
        signing_public_key: point(SIGNING, false),
        signing_key_thumbprint: thumbprint(SIGNING),
        second_factor: Some(SecondFactorKind::Pin),
    }
}

fn registered() -> AccountEvent {
    AccountEvent::Registered(registered_payload())
}

/// A secure-channel account: no user, no second factor yet.
fn registered_headless() -> AccountEvent {
    AccountEvent::Registered(AccountRegistered {
        user: None,
        second_factor: None,
        ..registered_payload()
    })
}

fn deleted(by: DeletedBy) -> AccountEvent {
    AccountEvent::Deleted(AccountDeleted {
        by,
        deleted_at: NOW,
    })
}

fn invalid(field: &'static str) -> AccountError {
    AccountError::Invalid(ValidationError::InvalidKey { field })
}

#[test]
fn register_stores_uncompressed_keys_and_the_signing_thumbprint() {
    let state = given_nothing::<Account>()
        .when(register())
        .then(vec![registered()]);
    assert_eq!(state.user(), Some(USER));
    assert!(!state.is_deleted());
    let active = state.active().unwrap();
    assert_eq!(active.signing_key_thumbprint, thumbprint(SIGNING));
    assert_eq!(active.signing_public_key.len(), 65);
}

#[test]
fn register_normalises_compressed_keys() {
    let cmd = RegisterAccount {
        channel_public_key: point(CHANNEL, true),
        signing_public_key: point(SIGNING, true),
        ..register()
    };
    assert_eq!(cmd.signing_public_key.len(), 33);
    given_nothing::<Account>()
        .when(cmd)
        .then(vec![registered()]);
}

#[test]
fn register_rejects_bad_keys_naming_the_field() {
    let bad = [vec![], vec![0x04; 65], point(CHANNEL, false)[..64].to_vec()];
    for key in bad {
        given_nothing::<Account>()
            .when(RegisterAccount {
                channel_public_key: key.clone(),
                ..register()
            })
            .then_error(invalid("channel_public_key"));
        given_nothing::<Account>()
            .when(RegisterAccount {
                signing_public_key: key,
                ..register()
            })
            .then_error(invalid("signing_public_key"));
    }
}

#[test]
fn register_a_headless_account() {
    let state = given_nothing::<Account>()
        .when(RegisterAccount {
            user: None,
            second_factor: None,
            ..register()
        })
        .then(vec![registered_headless()]);
    assert_eq!(state.user(), None);
}

#[test]
fn register_twice_conflicts() {
    given::<Account>([registered()])
        .when(register())
        .then_error(AccountError::AlreadyExists);
    given::<Account>([registered(), deleted(DeletedBy::App)])
        .when(register())
        .then_error(AccountError::Deleted);
}

#[test]
fn link_user_once() {
    let state = given::<Account>([registered_headless()])
        .when(LinkUser { user: USER })
        .then(vec![AccountEvent::UserLinked(AccountUserLinked {
            user: USER,
        })]);
    assert_eq!(state.user(), Some(USER));
    given::<Account>([registered()])
        .when(LinkUser { user: USER })
        .then_nothing();
    given::<Account>([registered()])
        .when(LinkUser { user: OTHER_USER })
        .then_error(AccountError::UserAlreadyLinked);
}

#[test]
fn upgrade_adds_one_second_factor() {
    let upgrade = UpgradeAccount {
        second_factor: SecondFactorKind::Biometric,
        attestation_hash: [0x77; 32],
    };
    let state = given::<Account>([registered_headless()])
        .when(upgrade)
        .then(vec![AccountEvent::Upgraded(AccountUpgraded {
            second_factor: SecondFactorKind::Biometric,
            attestation_hash: [0x77; 32],
        })]);
    assert_eq!(
        state.active().unwrap().second_factor,
        Some(SecondFactorKind::Biometric)
    );
    given::<Account>([registered()])
        .when(UpgradeAccount {
            second_factor: SecondFactorKind::Pin,
            ..upgrade
        })
        .then_nothing();
    given::<Account>([registered()])
        .when(upgrade)
        .then_error(AccountError::AlreadyUpgraded);
}

#[test]
fn rotate_a_key() {
    let state = given::<Account>([registered()])
        .when(RotateKey {
            role: KeyRole::Signing,
            public_key: point(0x44, true),
        })
        .then(vec![AccountEvent::KeyRotated(AccountKeyRotated {
            role: KeyRole::Signing,
            public_key: point(0x44, false),
            key_thumbprint: thumbprint(0x44),
        })]);
    let active = state.active().unwrap();
    assert_eq!(active.signing_public_key, point(0x44, false));
    assert_eq!(active.signing_key_thumbprint, thumbprint(0x44));
    assert_eq!(active.channel_public_key, point(CHANNEL, false));
    let state = given::<Account>([registered()])
        .when(RotateKey {
            role: KeyRole::Channel,
            public_key: point(0x45, false),
        })
        .events();
    assert_eq!(state.len(), 1);
    // To the key it has: nothing; a bad key: refused.
    given::<Account>([registered()])
        .when(RotateKey {
            role: KeyRole::Channel,
            public_key: point(CHANNEL, true),
        })
        .then_nothing();
    given::<Account>([registered()])
        .when(RotateKey {
            role: KeyRole::Signing,
            // A compressed point whose x is not below the field prime.
            public_key: [&[0x02][..], &[0xff; 32]].concat(),
        })
        .then_error(invalid("public_key"));
}

#[test]
fn delete_then_everything_is_gone() {
    let state = given::<Account>([registered()])
        .when(DeleteAccount {
            by: DeletedBy::Server,
        })
        .then(vec![deleted(DeletedBy::Server)]);
    assert!(state.is_deleted());
    assert_eq!(state.user(), Some(USER));
    assert_eq!(state.active(), None);
    given::<Account>([registered(), deleted(DeletedBy::App)])
        .when(DeleteAccount {
            by: DeletedBy::Server,
        })
        .then_nothing();
    let commands: Vec<AccountCommand> = vec![
        LinkUser { user: USER }.into(),
        UpgradeAccount {
            second_factor: SecondFactorKind::Pin,
            attestation_hash: [0; 32],
        }
        .into(),
        RotateKey {
            role: KeyRole::Channel,
            public_key: point(0x45, false),
        }
        .into(),
    ];
    for cmd in commands {
        given::<Account>([registered(), deleted(DeletedBy::App)])
            .when(cmd)
            .then_error(AccountError::Deleted);
    }
}

/// The device gateway tells only the deleted account's own channel key that it is gone, so the
/// deleted state must name the key it had last, a rotated one included.
#[test]
fn a_deleted_account_remembers_its_last_channel_key() {
    let state = Account::from_events(&[registered(), deleted(DeletedBy::Server)]);
    assert_eq!(
        state,
        Account::Deleted {
            account: ACCOUNT,
            user: Some(USER),
            channel_public_key: point(CHANNEL, false),
        }
    );
    let rotated = AccountEvent::KeyRotated(AccountKeyRotated {
        role: KeyRole::Channel,
        public_key: point(0x45, false),
        key_thumbprint: thumbprint(0x45),
    });
    let state = Account::from_events(&[registered(), rotated, deleted(DeletedBy::App)]);
    assert!(matches!(&state, Account::Deleted { channel_public_key, .. }
        if *channel_public_key == point(0x45, false)));
}

#[test]
fn commands_on_an_unknown_account_are_not_found() {
    let commands: Vec<AccountCommand> = vec![
        LinkUser { user: USER }.into(),
        UpgradeAccount {
            second_factor: SecondFactorKind::Pin,
            attestation_hash: [0; 32],
        }
        .into(),
        RotateKey {
            role: KeyRole::Channel,
            public_key: point(0x45, false),
        }
        .into(),
        DeleteAccount { by: DeletedBy::App }.into(),
    ];
    for cmd in commands {
        given_nothing::<Account>()
            .when(cmd)
            .then_error(AccountError::NotFound);
    }
    let never = Account::default();
    assert_eq!(never.user(), None);
    assert!(!never.is_deleted());
}

#[test]
fn errors_classify_for_http() {
    assert_eq!(invalid("public_key").kind(), ErrorKind::Invalid);
    assert_eq!(
        invalid("signing_public_key").to_string(),
        "signing_public_key is not a valid P-256 SEC1 point"
    );
    for conflict in [
        AccountError::AlreadyExists,
        AccountError::UserAlreadyLinked,
        AccountError::AlreadyUpgraded,
    ] {
        assert_eq!(conflict.kind(), ErrorKind::Conflict);
    }
    assert_eq!(AccountError::NotFound.kind(), ErrorKind::NotFound);
    assert_eq!(AccountError::Deleted.kind(), ErrorKind::Gone);
}

#[test]
fn apply_ignores_events_that_cannot_follow() {
    let mut a = Account::default();
    a.apply(&deleted(DeletedBy::App));
    a.apply(&AccountEvent::UserLinked(AccountUserLinked { user: USER }));
    assert_eq!(a, Account::NotRegistered);
    let mut a = Account::from_events(&[registered(), deleted(DeletedBy::App)]);
    a.apply(&registered_headless());
    assert!(a.is_deleted());
}

/// A secure-channel account that learns its user, gains a PIN, rotates its signing key and is
/// deleted, as a reviewer reads it.
#[test]
fn lifecycle_snapshot() {
    const NAME: &str = "account_lifecycle";
    let t = |s: u32| NOW.plus_secs(s);
    let mut events = Vec::new();
    let mut run = |at: Timestamp, cmd: AccountCommand| {
        let new = given::<Account>(events.clone()).at(at).when(cmd).events();
        events.extend(new);
    };
    run(
        t(0),
        RegisterAccount {
            user: None,
            second_factor: None,
            channel_public_key: point(CHANNEL, true),
            ..register()
        }
        .into(),
    );
    run(t(10), LinkUser { user: USER }.into());
    run(
        t(20),
        UpgradeAccount {
            second_factor: SecondFactorKind::Pin,
            attestation_hash: [0x77; 32],
        }
        .into(),
    );
    run(
        t(30),
        RotateKey {
            role: KeyRole::Signing,
            public_key: point(0x44, false),
        }
        .into(),
    );
    run(t(40), DeleteAccount { by: DeletedBy::App }.into());
    run(
        t(50),
        DeleteAccount {
            by: DeletedBy::Server,
        }
        .into(),
    );
    let rendered: Vec<_> = events.iter().map(crate::testing::render).collect();
    assert!(events.iter().all(|e| e.schema_version() == 1));
    insta::with_settings!({ snapshot_path => "../snapshots", prepend_module_to_snapshot => false }, {
        insta::assert_yaml_snapshot!(NAME, rendered);
    });
}

#[test]
fn a_recorded_verification_counts_within_the_window_only() {
    let mut account = Account::default();
    let mut ctx = Context::new(Timestamp::from_millis(1_000));
    let events = account
        .decide(register().into(), &mut ctx)
        .unwrap_or_default();
    events.iter().for_each(|e| account.apply(e));
    let record = RecordVerification {
        factor: SecondFactorKind::Pin,
        attestation_hash: [3; 32],
        verified_at: Timestamp::from_millis(10_000),
    };
    let events = account.decide(record.into(), &mut ctx).unwrap_or_default();
    assert_eq!(events.len(), 1);
    events.iter().for_each(|e| account.apply(e));
    let Account::Active(active) = &account else {
        panic!("active")
    };
    assert!(active.verified_within(60, Timestamp::from_millis(70_000)));
    assert!(!active.verified_within(60, Timestamp::from_millis(70_001)));
    assert!(
        !active.verified_within(0, Timestamp::from_millis(10_000)),
        "0: never reuse"
    );
    assert!(
        !active.verified_within(60, Timestamp::from_millis(9_999)),
        "not from the future"
    );
}

#[test]
fn push_registration_needs_an_uncompressed_key_and_replaces_the_earlier_one() {
    let key = point(7, false);
    let register = |token_ref: &str| RegisterPush {
        mc_key_id: [9; 32],
        push_public_key: key.clone(),
        token_ref: token_ref.into(),
    };
    let events = given::<Account>([registered()])
        .when(register("push/1"))
        .events();
    let [AccountEvent::PushRegistered(e)] = events.as_slice() else {
        panic!("{events:?}")
    };
    assert_eq!(e.push_public_key, key);
    let state = given::<Account>([registered(), events[0].clone()])
        .when(register("push/1"))
        .then_nothing();
    let Account::Active(active) = &state else {
        panic!("{state:?}")
    };
    assert_eq!(
        active.push.as_ref().map(|p| p.token_ref.as_str()),
        Some("push/1")
    );
    assert_eq!(
        given::<Account>([registered(), events[0].clone()])
            .when(register("push/2"))
            .events()
            .len(),
        1
    );
    let compressed = point(7, true);
    given::<Account>([registered()])
        .when(RegisterPush {
            push_public_key: compressed,
            ..register("push/1")
        })
        .then_error(AccountError::Invalid(ValidationError::InvalidKey {
            field: "push_public_key",
        }));
    given_nothing::<Account>()
        .when(register("push/1"))
        .then_error(AccountError::NotFound);
}

fn device(model: &str) -> DeviceData {
    DeviceData {
        model: model.into(),
        os: "Android 15".into(),
        app_version: "1.2.3".into(),
    }
}

#[test]
fn device_data_is_recorded_when_it_changes() {
    let changed = |model: &str| {
        AccountEvent::DeviceDataChanged(AccountDeviceDataChanged {
            device_data: device(model),
            changed_at: NOW,
        })
    };
    let state = given::<Account>(vec![registered()])
        .when(SetDeviceData {
            device_data: device("Pixel 8"),
        })
        .then(vec![changed("Pixel 8")]);
    assert_eq!(state.active().unwrap().device_data, Some(device("Pixel 8")));
    given::<Account>(vec![registered(), changed("Pixel 8")])
        .when(SetDeviceData {
            device_data: device("Pixel 8"),
        })
        .then_nothing();
    given::<Account>(vec![registered(), changed("Pixel 8")])
        .when(SetDeviceData {
            device_data: device("Pixel 9"),
        })
        .then(vec![changed("Pixel 9")]);
    // Empty fields are allowed (an app may not know its model).
    given::<Account>(vec![registered()])
        .when(SetDeviceData {
            device_data: DeviceData::default(),
        })
        .then(vec![AccountEvent::DeviceDataChanged(
            AccountDeviceDataChanged {
                device_data: DeviceData::default(),
                changed_at: NOW,
            },
        )]);
}

#[test]
fn device_data_rules() {
    given::<Account>(vec![registered()])
        .when(SetDeviceData {
            device_data: device(&"x".repeat(101)),
        })
        .then_error(AccountError::Invalid(ValidationError::TooLong {
            field: "device_data.model",
            max: 100,
            actual: 101,
            unit: "characters",
        }));
    given::<Account>(vec![registered()])
        .when(SetDeviceData {
            device_data: DeviceData {
                os: "Android\n15".into(),
                ..device("Pixel 8")
            },
        })
        .then_error(AccountError::Invalid(ValidationError::ControlCharacter {
            field: "device_data.os",
        }));
    given_nothing::<Account>()
        .when(SetDeviceData {
            device_data: device("Pixel 8"),
        })
        .then_error(AccountError::NotFound);
}
