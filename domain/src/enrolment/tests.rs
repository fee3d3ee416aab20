use super::*;
use crate::aggregate::ErrorKind;
use crate::event::DomainEvent;
use crate::ids::{EnrolmentId, ServerId};
use crate::testing::{NOW, given, given_nothing};

const SERVER: ServerId = ServerId::from_bytes([0x11; 16]);
const ENROLMENT: EnrolmentRef = EnrolmentRef::new(SERVER, EnrolmentId::from_bytes([0x22; 16]));
const USER: UserDigest = UserDigest::from_bytes([0x44; 16]);
const ACCOUNT: AccountId = AccountId::from_bytes([0x33; 16]);
const OTHER_ACCOUNT: AccountId = AccountId::from_bytes([0x34; 16]);

fn t(secs: u32) -> Timestamp {
    NOW.plus_secs(secs)
}

fn start() -> StartEnrolment {
    StartEnrolment {
        enrolment: ENROLMENT,
        user: USER,
        ttl_secs: 600,
    }
}

fn started() -> EnrolmentEvent {
    EnrolmentEvent::Started(EnrolmentStarted {
        enrolment: ENROLMENT,
        user: USER,
        ttl_secs: 600,
        expires_at: t(600),
    })
}

fn completed(account_id: AccountId, at: Timestamp) -> EnrolmentEvent {
    EnrolmentEvent::Completed(EnrolmentCompleted {
        account_id,
        completed_at: at,
    })
}

fn expired(at: Timestamp) -> EnrolmentEvent {
    EnrolmentEvent::Expired(EnrolmentExpired { expired_at: at })
}

fn complete(account_id: AccountId) -> CompleteEnrolment {
    CompleteEnrolment { account_id }
}

#[test]
fn start_records_the_user_and_the_expiry() {
    let state = given_nothing::<Enrolment>()
        .when(start())
        .then(vec![started()]);
    assert_eq!(state.status(), EnrolmentStatus::Pending);
    assert_eq!(state.expires_at(), Some(t(600)));
}

#[test]
fn start_validates_the_lifetime() {
    for ttl_secs in [0, 59, 604_801] {
        given_nothing::<Enrolment>()
            .when(StartEnrolment {
                ttl_secs,
                ..start()
            })
            .then_error(EnrolmentError::Invalid(ValidationError::OutOfRange {
                field: "ttl_secs",
                min: 60,
                max: 604_800,
                actual: ttl_secs,
            }));
    }
    for ttl_secs in [60, 604_800] {
        let state = given_nothing::<Enrolment>()
            .when(StartEnrolment {
                ttl_secs,
                ..start()
            })
            .then(vec![EnrolmentEvent::Started(EnrolmentStarted {
                enrolment: ENROLMENT,
                user: USER,
                ttl_secs,
                expires_at: t(ttl_secs),
            })]);
        assert_eq!(state.expires_at(), Some(t(ttl_secs)));
    }
}

#[test]
fn starting_again() {
    // The same start, retried while pending: nothing new, the same QR code.
    given::<Enrolment>([started()])
        .at(t(30))
        .when(start())
        .then_nothing();
    for other in [
        StartEnrolment {
            user: UserDigest::from_bytes([0x45; 16]),
            ..start()
        },
        StartEnrolment {
            ttl_secs: 601,
            ..start()
        },
    ] {
        given::<Enrolment>([started()])
            .when(other)
            .then_error(EnrolmentError::AlreadyExists);
    }
    given::<Enrolment>([started(), completed(ACCOUNT, t(10))])
        .when(start())
        .then_error(EnrolmentError::AlreadyCompleted);
    given::<Enrolment>([started(), expired(t(600))])
        .at(t(700))
        .when(start())
        .then_error(EnrolmentError::Expired);
    given::<Enrolment>([started()])
        .at(t(600))
        .when(start())
        .then_error(EnrolmentError::Expired);
}

#[test]
fn complete_before_the_deadline() {
    let state = given::<Enrolment>([started()])
        .at(t(599))
        .when(complete(ACCOUNT))
        .then(vec![completed(ACCOUNT, t(599))]);
    assert_eq!(state.status(), EnrolmentStatus::Completed);
    given::<Enrolment>([started()])
        .at(t(600))
        .when(complete(ACCOUNT))
        .then_error(EnrolmentError::Expired);
    given::<Enrolment>([started(), expired(t(600))])
        .at(t(601))
        .when(complete(ACCOUNT))
        .then_error(EnrolmentError::Expired);
}

#[test]
fn an_enrolment_is_used_once() {
    given::<Enrolment>([started(), completed(ACCOUNT, t(10))])
        .at(t(20))
        .when(complete(ACCOUNT))
        .then_nothing();
    given::<Enrolment>([started(), completed(ACCOUNT, t(10))])
        .at(t(20))
        .when(complete(OTHER_ACCOUNT))
        .then_error(EnrolmentError::AlreadyCompleted);
}

#[test]
fn expire_records_only_a_passed_deadline() {
    given::<Enrolment>([started()])
        .at(t(599))
        .when(ExpireEnrolment)
        .then_nothing();
    let state = given::<Enrolment>([started()])
        .at(t(600))
        .when(ExpireEnrolment)
        .then(vec![expired(t(600))]);
    assert_eq!(state.status(), EnrolmentStatus::Expired);
    for history in [
        vec![started(), completed(ACCOUNT, t(10))],
        vec![started(), expired(t(600))],
    ] {
        given::<Enrolment>(history)
            .at(t(10_000))
            .when(ExpireEnrolment)
            .then_nothing();
    }
}

#[test]
fn commands_on_an_enrolment_never_started_are_not_found() {
    let commands: Vec<EnrolmentCommand> = vec![complete(ACCOUNT).into(), ExpireEnrolment.into()];
    for cmd in commands {
        given_nothing::<Enrolment>()
            .when(cmd)
            .then_error(EnrolmentError::NotFound);
    }
    let never = Enrolment::default();
    assert_eq!(never.status(), EnrolmentStatus::NotStarted);
    assert_eq!(never.expires_at(), None);
}

#[test]
fn status_names_and_error_classes() {
    for (status, name) in [
        (EnrolmentStatus::NotStarted, "not_started"),
        (EnrolmentStatus::Pending, "pending"),
        (EnrolmentStatus::Completed, "completed"),
        (EnrolmentStatus::Expired, "expired"),
    ] {
        assert_eq!(status.as_str(), name);
        assert_eq!(status.to_string(), name);
    }
    assert_eq!(
        EnrolmentError::Invalid(ValidationError::Empty { field: "x" }).kind(),
        ErrorKind::Invalid
    );
    assert_eq!(EnrolmentError::AlreadyExists.kind(), ErrorKind::Conflict);
    assert_eq!(EnrolmentError::AlreadyCompleted.kind(), ErrorKind::Conflict);
    assert_eq!(EnrolmentError::NotFound.kind(), ErrorKind::NotFound);
    assert_eq!(EnrolmentError::Expired.kind(), ErrorKind::Gone);
}

#[test]
fn apply_ignores_events_that_cannot_follow() {
    let mut e = Enrolment::default();
    e.apply(&completed(ACCOUNT, t(1)));
    assert_eq!(e, Enrolment::NotStarted);
    let mut e = Enrolment::from_events(&[started(), completed(ACCOUNT, t(1))]);
    e.apply(&expired(t(600)));
    e.apply(&started());
    assert_eq!(e.status(), EnrolmentStatus::Completed);
}

/// Two enrolments for one user, as a reviewer reads them: one used, one left to expire.
#[test]
fn lifecycle_snapshot() {
    const NAME: &str = "enrolment_lifecycle";
    let other = EnrolmentRef::new(SERVER, EnrolmentId::from_bytes([0x23; 16]));
    let mut streams: [Vec<EnrolmentEvent>; 2] = [Vec::new(), Vec::new()];
    let mut run = |stream: usize, at: Timestamp, cmd: EnrolmentCommand| {
        let history = streams[stream].clone();
        let new = given::<Enrolment>(history).at(at).when(cmd).events();
        streams[stream].extend(new);
    };
    run(0, t(0), start().into());
    run(0, t(1), start().into());
    run(0, t(90), complete(ACCOUNT).into());
    run(0, t(91), complete(ACCOUNT).into());
    run(0, t(900), ExpireEnrolment.into());
    run(
        1,
        t(100),
        StartEnrolment {
            enrolment: other,
            ttl_secs: 60,
            ..start()
        }
        .into(),
    );
    run(1, t(120), ExpireEnrolment.into());
    run(1, t(160), ExpireEnrolment.into());
    let rendered: Vec<_> = streams
        .iter()
        .flatten()
        .map(crate::testing::render)
        .collect();
    assert!(streams.iter().flatten().all(|e| e.schema_version() == 1));
    insta::with_settings!({ snapshot_path => "../snapshots", prepend_module_to_snapshot => false }, {
        insta::assert_yaml_snapshot!(NAME, rendered);
    });
}
