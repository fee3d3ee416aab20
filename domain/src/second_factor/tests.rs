use super::*;
use crate::aggregate::ErrorKind;
use crate::testing::{NOW, given, given_nothing};
use p256::elliptic_curve::sec1::ToSec1Point;

const APP: AppInstanceId = AppInstanceId::from_bytes([0x66; 16]);

fn t(secs: u32) -> Timestamp {
    NOW.plus_secs(secs)
}

fn bound() -> SecondFactorEvent {
    SecondFactorEvent::KeyBound(KeyBound {
        app_instance: APP,
        key_thumbprint: [1; 32],
        bound_at: NOW,
    })
}

fn pin(digest: u8) -> SecondFactorEvent {
    SecondFactorEvent::PinRegistered(PinRegistered {
        app_instance: APP,
        record_digest: [digest; 32],
    })
}

fn failed(n: u32, at: Timestamp) -> SecondFactorEvent {
    SecondFactorEvent::VerificationFailed(VerificationFailed {
        factor: SecondFactorKind::Pin,
        failed_attempts: n,
        failed_at: at,
    })
}

fn locked(n: u32, until: Timestamp) -> SecondFactorEvent {
    SecondFactorEvent::Locked(SecondFactorLocked {
        factor: SecondFactorKind::Pin,
        failed_attempts: n,
        locked_until: until,
    })
}

fn start() -> StartPinLogin {
    StartPinLogin {
        policy: LockoutPolicy::default(),
    }
}

fn success(factor: SecondFactorKind) -> SucceedVerification {
    SucceedVerification {
        factor,
        challenge_hash: [7; 32],
        attestation_hash: [8; 32],
        attestation_expires_at: t(60),
    }
}

fn succeeded(factor: SecondFactorKind, at: Timestamp) -> SecondFactorEvent {
    SecondFactorEvent::VerificationSucceeded(VerificationSucceeded {
        factor,
        challenge_hash: [7; 32],
        attestation_hash: [8; 32],
        verified_at: at,
        attestation_expires_at: t(60),
    })
}

fn biometric_point() -> Vec<u8> {
    p256::SecretKey::from_slice(&[0x31; 32])
        .unwrap()
        .public_key()
        .as_affine()
        .to_sec1_point(false)
        .as_bytes()
        .to_vec()
}

/// A history of `n` failures (with the locks the default policy records on the way), all at
/// `NOW`.
fn failures(n: u32) -> Vec<SecondFactorEvent> {
    let mut events = vec![bound(), pin(1)];
    for i in 1..=n {
        events.push(failed(i, NOW));
        match i {
            5 => events.push(locked(5, t(60))),
            8 => events.push(locked(8, t(3_600))),
            10 => events.push(SecondFactorEvent::Revoked(SecondFactorRevoked {
                factor: SecondFactorKind::Pin,
                reason: RevocationReason::TooManyFailures,
                revoked_at: NOW,
            })),
            _ => {}
        }
    }
    events
}

fn register(digest: u8, pin_proven: bool) -> RegisterPin {
    RegisterPin {
        app_instance: APP,
        record_digest: [digest; 32],
        key_thumbprint: [1; 32],
        pin_proven,
        enrolled: false,
    }
}

#[test]
fn the_first_pin_needs_an_enrolment_and_binds_the_key_in_the_same_append() {
    given_nothing::<SecondFactor>()
        .when(register(1, false))
        .then_error(SecondFactorError::NotEnrolled);
    let enrolled = RegisterPin {
        enrolled: true,
        ..register(1, false)
    };
    let state = given_nothing::<SecondFactor>()
        .when(enrolled)
        .then(vec![bound(), pin(1)]);
    assert_eq!(state.key_thumbprint(), Some(&[1; 32]));
    assert_eq!(SecondFactorError::NotEnrolled.kind(), ErrorKind::Invalid);
    // A stream that only bound a key (before version 1.1 a hello did) is not registered.
    given::<SecondFactor>([bound()])
        .when(register(1, false))
        .then_error(SecondFactorError::NotEnrolled);
    given::<SecondFactor>([bound()])
        .when(enrolled)
        .then(vec![pin(1)]);
    // Another channel key never registers, first time or not.
    let other_key = RegisterPin {
        key_thumbprint: [2; 32],
        ..enrolled
    };
    given::<SecondFactor>([bound()])
        .when(other_key)
        .then_error(SecondFactorError::KeyMismatch);
    given::<SecondFactor>([bound(), pin(1)])
        .when(RegisterPin {
            pin_proven: true,
            ..other_key
        })
        .then_error(SecondFactorError::KeyMismatch);
}

#[test]
fn a_pin_registers_once_and_changes_only_after_a_login() {
    let state = given::<SecondFactor>([bound()])
        .when(RegisterPin {
            enrolled: true,
            ..register(1, false)
        })
        .then(vec![pin(1)]);
    assert_eq!(state.status(NOW), FactorStatus::Active);
    given::<SecondFactor>([bound(), pin(1)])
        .when(register(2, false))
        .then_error(SecondFactorError::AlreadyRegistered);
    given::<SecondFactor>([bound(), pin(1)])
        .when(register(1, false))
        .then_nothing();
    let state = given::<SecondFactor>([bound(), pin(1)])
        .when(register(2, true))
        .then(vec![pin(2)]);
    assert_eq!(state.pin_record_digest(), Some(&[2; 32]));
    given::<SecondFactor>(failures(10))
        .when(register(2, true))
        .then_error(SecondFactorError::Revoked);
}

#[test]
fn a_pin_login_counts_a_failure_before_it_is_answered() {
    let state = given::<SecondFactor>([bound(), pin(1)])
        .when(start())
        .then(vec![failed(1, NOW)]);
    assert_eq!(state.failures(), 1);
    assert_eq!(LockoutPolicy::default().attempts_left(state.failures()), 4);
    given::<SecondFactor>([bound()])
        .when(start())
        .then_error(SecondFactorError::NotRegistered);
}

#[test]
fn the_fifth_failure_locks_for_a_minute_and_the_lock_ends_on_time() {
    let state = given::<SecondFactor>(failures(4))
        .when(start())
        .then(vec![failed(5, NOW), locked(5, t(60))]);
    assert_eq!(state.status(NOW), FactorStatus::Locked(t(60)));
    given::<SecondFactor>(failures(5))
        .at(t(59))
        .when(start())
        .then_error(SecondFactorError::Locked { until: t(60) });
    // Once the clock passes the lock, the sixth try is counted, and no second 1-minute lock.
    given::<SecondFactor>(failures(5))
        .at(t(60))
        .when(start())
        .then(vec![failed(6, t(60))]);
}

#[test]
fn the_eighth_failure_locks_for_an_hour_and_the_tenth_revokes() {
    given::<SecondFactor>(failures(7))
        .at(t(60))
        .when(start())
        .then(vec![failed(8, t(60)), locked(8, t(3_660))]);
    given::<SecondFactor>(failures(8))
        .at(t(3_599))
        .when(start())
        .then_error(SecondFactorError::Locked { until: t(3_600) });
    let state = given::<SecondFactor>(failures(9))
        .at(t(3_600))
        .when(start())
        .then(vec![
            failed(10, t(3_600)),
            SecondFactorEvent::Revoked(SecondFactorRevoked {
                factor: SecondFactorKind::Pin,
                reason: RevocationReason::TooManyFailures,
                revoked_at: t(3_600),
            }),
        ]);
    assert_eq!(state.status(t(86_400)), FactorStatus::Revoked);
    given::<SecondFactor>(failures(10))
        .at(t(86_400))
        .when(start())
        .then_error(SecondFactorError::Revoked);
    given::<SecondFactor>(failures(10))
        .when(success(SecondFactorKind::Pin))
        .then_error(SecondFactorError::Revoked);
    assert_eq!(SecondFactorError::Revoked.kind(), ErrorKind::Gone);
}

#[test]
fn a_success_resets_the_count_and_ends_the_lock_its_own_start_caused() {
    let state = given::<SecondFactor>(failures(5))
        .when(success(SecondFactorKind::Pin))
        .then(vec![succeeded(SecondFactorKind::Pin, NOW)]);
    assert_eq!(state.failures(), 0);
    assert_eq!(state.status(NOW), FactorStatus::Active);
    // After a success, the next lock threshold is 5 again.
    let mut history = failures(5);
    history.push(succeeded(SecondFactorKind::Pin, NOW));
    history.extend((1..=4).map(|i| failed(i, t(1))));
    given::<SecondFactor>(history)
        .at(t(2))
        .when(start())
        .then(vec![failed(5, t(2)), locked(5, t(62))]);
}

#[test]
fn a_custom_policy_is_data() {
    let policy = LockoutPolicy {
        lock_after: vec![(2, 10)],
        revoke_after: 3,
    };
    assert_eq!(policy.attempts_left(0), 2);
    assert_eq!(policy.attempts_left(2), 1);
    assert_eq!(policy.attempts_left(3), 0);
    given::<SecondFactor>([bound(), pin(1), failed(1, NOW)])
        .when(StartPinLogin { policy })
        .then(vec![failed(2, NOW), locked(2, t(10))]);
}

#[test]
fn biometric_registration_needs_a_proven_pin_and_a_valid_key() {
    let register = |public_key: Vec<u8>, pin_proven| RegisterBiometric {
        app_instance: APP,
        public_key,
        pin_proven,
    };
    given::<SecondFactor>([bound()])
        .when(register(biometric_point(), true))
        .then_error(SecondFactorError::NotRegistered);
    given::<SecondFactor>([bound(), pin(1)])
        .when(register(biometric_point(), false))
        .then_error(SecondFactorError::NotAllowed);
    given::<SecondFactor>([bound(), pin(1)])
        .when(register(vec![4; 65], true))
        .then_error(SecondFactorError::Invalid(ValidationError::PublicKey));
    let events = given::<SecondFactor>([bound(), pin(1)])
        .when(register(biometric_point(), true))
        .events();
    let [SecondFactorEvent::BiometricKeyRegistered(e)] = events.as_slice() else {
        panic!("{events:?}");
    };
    assert_eq!(e.public_key, biometric_point());
    let registered = events[0].clone();
    given::<SecondFactor>([bound(), pin(1), registered.clone()])
        .when(register(biometric_point(), true))
        .then_nothing();
    // Biometric failures count like PIN failures; a biometric success is refused while locked.
    let mut history = failures(4);
    history.push(registered.clone());
    given::<SecondFactor>(history)
        .when(FailBiometric {
            policy: LockoutPolicy::default(),
        })
        .then(vec![
            SecondFactorEvent::VerificationFailed(VerificationFailed {
                factor: SecondFactorKind::Biometric,
                failed_attempts: 5,
                failed_at: NOW,
            }),
            SecondFactorEvent::Locked(SecondFactorLocked {
                factor: SecondFactorKind::Biometric,
                failed_attempts: 5,
                locked_until: t(60),
            }),
        ]);
    let mut history = failures(5);
    history.push(registered.clone());
    given::<SecondFactor>(history)
        .when(success(SecondFactorKind::Biometric))
        .then_error(SecondFactorError::Locked { until: t(60) });
    given::<SecondFactor>([bound(), pin(1), registered])
        .when(success(SecondFactorKind::Biometric))
        .then(vec![succeeded(SecondFactorKind::Biometric, NOW)]);
    given::<SecondFactor>([bound(), pin(1)])
        .when(success(SecondFactorKind::Biometric))
        .then_error(SecondFactorError::NotRegistered);
}

#[test]
fn lockout_policies_parse_from_text() {
    assert_eq!(
        LockoutPolicy::parse("5:60, 8:3600, 10:revoke"),
        Ok(LockoutPolicy::default())
    );
    assert_eq!(
        LockoutPolicy::parse("3:revoke").map(|p| p.revoke_after),
        Ok(3)
    );
    for bad in [
        "",
        "5:60",
        "5:x,10:revoke",
        "8:60,5:60,10:revoke",
        "10:60,10:revoke",
        "0:revoke",
    ] {
        assert!(LockoutPolicy::parse(bad).is_err(), "{bad}");
    }
}
