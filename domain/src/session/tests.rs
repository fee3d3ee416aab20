use super::*;
use crate::aggregate::ErrorKind;
use crate::event::DomainEvent;
use crate::ids::{Hsid, ServerId};
use crate::testing::{NOW, given, given_nothing};

const SERVER: ServerId = ServerId::from_bytes([0x11; 16]);
const SESSION: SessionRef = SessionRef::new(SERVER, Hsid::from_bytes([0x22; 32]));
const ACCOUNT: AccountId = AccountId::from_bytes([0x33; 16]);
const OTHER_ACCOUNT: AccountId = AccountId::from_bytes([0x34; 16]);
const USER: UserDigest = UserDigest::from_bytes([0x44; 16]);
const OTHER_USER: UserDigest = UserDigest::from_bytes([0x45; 16]);
const HASH: [u8; 32] = [0x55; 32];

/// `secs` seconds after [`NOW`].
fn t(secs: u32) -> Timestamp {
    NOW.plus_secs(secs)
}

/// A one-shot session with a 300 s timeout.
fn open() -> OpenSession {
    OpenSession {
        session: SESSION,
        ping_time_secs: 0,
        timeout_secs: 300,
        app_login: false,
        user: None,
        announce_info: Some("Log in to Acme?".into()),
        session_info: None,
    }
}

/// A continuous session pinging every 60 s.
fn open_continuous() -> OpenSession {
    OpenSession {
        ping_time_secs: 60,
        ..open()
    }
}

fn opened_by(cmd: OpenSession) -> SessionEvent {
    SessionEvent::Opened(SessionOpened {
        session: cmd.session,
        ping_time_secs: cmd.ping_time_secs,
        timeout_secs: cmd.timeout_secs,
        expires_at: t(cmd.timeout_secs),
        app_login: cmd.app_login,
        user: cmd.user,
        announce_info: cmd.announce_info,
        session_info: cmd.session_info,
        push_to: Vec::new(),
    })
}

fn opened() -> SessionEvent {
    opened_by(open())
}

fn opened_continuous() -> SessionEvent {
    opened_by(open_continuous())
}

fn scanned() -> SessionEvent {
    SessionEvent::Scanned(SessionScanned { scanned_at: t(5) })
}

fn confirmed() -> SessionEvent {
    SessionEvent::Confirmed(SessionConfirmed {
        account_id: ACCOUNT,
    })
}

fn verify() -> VerifySecondFactor {
    VerifySecondFactor {
        factor: SecondFactorKind::Pin,
        attestation_hash: HASH,
        verified_at: t(10),
        reused: false,
    }
}

fn verified() -> SessionEvent {
    SessionEvent::SecondFactorVerified(SessionSecondFactorVerified {
        factor: SecondFactorKind::Pin,
        attestation_hash: HASH,
        verified_at: t(10),
        reused: false,
    })
}

fn log_in() -> LogIn {
    LogIn {
        account_id: ACCOUNT,
        user: USER,
    }
}

fn logged_in() -> SessionEvent {
    SessionEvent::LoggedIn(SessionLoggedIn {
        account_id: ACCOUNT,
        user: USER,
        continuous: false,
        ping_deadline: None,
    })
}

/// Logged in at `at` on a continuous session: first ping due 60 s later.
fn logged_in_continuous(at: Timestamp) -> SessionEvent {
    SessionEvent::LoggedIn(SessionLoggedIn {
        account_id: ACCOUNT,
        user: USER,
        continuous: true,
        ping_deadline: Some(at.plus_secs(60)),
    })
}

fn logged_out(reason: LogoutReason, at: Timestamp) -> SessionEvent {
    SessionEvent::LoggedOut(SessionLoggedOut {
        reason,
        logged_out_at: at,
    })
}

fn aborted(by: AbortedBy, at: Timestamp) -> SessionEvent {
    SessionEvent::Aborted(SessionAborted { by, aborted_at: at })
}

fn expired(at: Timestamp) -> SessionEvent {
    SessionEvent::Expired(SessionExpired { expired_at: at })
}

fn failed(at: Timestamp) -> SessionEvent {
    SessionEvent::Failed(SessionFailed {
        reason: SessionFailure::BadSignature,
        failed_at: at,
    })
}

/// Every state before login, by history.
fn before_login() -> Vec<Vec<SessionEvent>> {
    vec![
        vec![opened()],
        vec![opened(), scanned()],
        vec![opened(), confirmed()],
        vec![opened(), scanned(), confirmed(), verified()],
    ]
}

/// Every terminal state, by history, with its status.
fn ended() -> Vec<(Vec<SessionEvent>, SessionStatus)> {
    vec![
        (
            vec![opened(), logged_in(), logged_out(LogoutReason::User, t(20))],
            SessionStatus::LoggedOut,
        ),
        (
            vec![opened(), aborted(AbortedBy::User, t(20))],
            SessionStatus::Aborted,
        ),
        (vec![opened(), expired(t(300))], SessionStatus::Expired),
        (vec![opened(), failed(t(20))], SessionStatus::Failed),
    ]
}

fn wrong(command: &'static str, status: SessionStatus) -> SessionError {
    SessionError::WrongState { command, status }
}

fn invalid(e: ValidationError) -> SessionError {
    SessionError::Invalid(e)
}

#[test]
fn open_emits_the_options_and_the_expiry() {
    let state = given_nothing::<Session>().when(open()).then(vec![opened()]);
    assert_eq!(state.status(), SessionStatus::Pending);
    assert_eq!(state.expires_at(), Some(t(300)));
    assert_eq!(state.ping_deadline(), None);
    let later = given_nothing::<Session>()
        .at(t(7))
        .when(OpenSession {
            timeout_secs: 30,
            ..open()
        })
        .events();
    let [SessionEvent::Opened(e)] = later.as_slice() else {
        panic!("{later:?}")
    };
    assert_eq!(e.expires_at, t(37));
}

#[test]
fn open_validates_timeout_ping_time_and_infos() {
    let range = |field, min, max, actual| ValidationError::OutOfRange {
        field,
        min,
        max,
        actual,
    };
    let cases = [
        (
            OpenSession {
                timeout_secs: 29,
                ..open()
            },
            range("timeout_secs", 30, 86_400, 29),
        ),
        (
            OpenSession {
                timeout_secs: 86_401,
                ..open()
            },
            range("timeout_secs", 30, 86_400, 86_401),
        ),
        (
            OpenSession {
                ping_time_secs: 3601,
                ..open()
            },
            range("ping_time_secs", 0, 3600, 3601),
        ),
        (
            OpenSession {
                announce_info: Some("é".repeat(1001)),
                ..open()
            },
            ValidationError::TooLong {
                field: "announce_info",
                max: 1000,
                actual: 1001,
                unit: "characters",
            },
        ),
        (
            OpenSession {
                session_info: Some("x".repeat(1001)),
                ..open()
            },
            ValidationError::TooLong {
                field: "session_info",
                max: 1000,
                actual: 1001,
                unit: "characters",
            },
        ),
        (
            OpenSession {
                announce_info: Some("Log in?\r\n".into()),
                ..open()
            },
            ValidationError::ControlCharacter {
                field: "announce_info",
            },
        ),
        (
            OpenSession {
                session_info: Some("\u{1b}[31mred".into()),
                ..open()
            },
            ValidationError::ControlCharacter {
                field: "session_info",
            },
        ),
    ];
    for (cmd, error) in cases {
        given_nothing::<Session>()
            .when(cmd)
            .then_error(invalid(error));
    }
    // The limits themselves are allowed, and so are line breaks.
    for cmd in [
        OpenSession {
            timeout_secs: 30,
            ping_time_secs: 3600,
            ..open()
        },
        OpenSession {
            timeout_secs: 86_400,
            announce_info: Some("é".repeat(1000)),
            session_info: Some("Logged in\nas Alice".into()),
            ..open()
        },
    ] {
        given_nothing::<Session>()
            .when(cmd.clone())
            .then(vec![opened_by(cmd)]);
    }
}

#[test]
fn opening_an_open_session_again_with_the_same_options_emits_nothing() {
    let mut histories = before_login();
    histories.push(vec![opened(), logged_in()]);
    for history in histories {
        given::<Session>(history)
            .at(t(100))
            .when(open())
            .then_nothing();
    }
    // A continuous login is still open while it pings.
    given::<Session>([opened_continuous(), logged_in_continuous(t(20))])
        .at(t(50))
        .when(open_continuous())
        .then_nothing();
}

#[test]
fn opening_an_open_session_with_other_options_conflicts() {
    let others = [
        OpenSession {
            ping_time_secs: 60,
            ..open()
        },
        OpenSession {
            timeout_secs: 600,
            ..open()
        },
        OpenSession {
            app_login: true,
            ..open()
        },
        OpenSession {
            user: Some(USER),
            ..open()
        },
        OpenSession {
            announce_info: None,
            ..open()
        },
        OpenSession {
            session_info: Some("Welcome".into()),
            ..open()
        },
        OpenSession {
            session: SessionRef::new(SERVER, Hsid::from_bytes([0x23; 32])),
            ..open()
        },
    ];
    for cmd in others {
        given::<Session>([opened(), scanned()])
            .at(t(10))
            .when(cmd)
            .then_error(SessionError::AlreadyExists);
    }
}

#[test]
fn opening_an_ended_or_overdue_session_is_gone() {
    for (history, status) in ended() {
        given::<Session>(history)
            .at(t(10))
            .when(open())
            .then_error(SessionError::Ended { status });
    }
    given::<Session>([opened(), scanned()])
        .at(t(300))
        .when(open())
        .then_error(SessionError::Expired);
}

#[test]
fn scan_moves_pending_to_scanned_once() {
    let state = given::<Session>([opened()])
        .at(t(5))
        .when(ScanSession)
        .then(vec![scanned()]);
    assert_eq!(state.status(), SessionStatus::Scanned);
    for history in &before_login()[1..] {
        given::<Session>(history.clone())
            .at(t(6))
            .when(ScanSession)
            .then_nothing();
    }
    given::<Session>([opened(), logged_in()])
        .when(ScanSession)
        .then_error(wrong("scan", SessionStatus::LoggedIn));
}

#[test]
fn scan_after_the_deadline_is_expired() {
    given::<Session>([opened()])
        .at(t(299))
        .when(ScanSession)
        .events();
    given::<Session>([opened()])
        .at(t(300))
        .when(ScanSession)
        .then_error(SessionError::Expired);
    given::<Session>([opened(), scanned()])
        .at(t(301))
        .when(ScanSession)
        .then_error(SessionError::Expired);
}

#[test]
fn confirm_from_pending_or_scanned() {
    for history in [vec![opened()], vec![opened(), scanned()]] {
        let state = given::<Session>(history)
            .at(t(8))
            .when(ConfirmSession {
                account_id: ACCOUNT,
            })
            .then(vec![confirmed()]);
        assert_eq!(state.status(), SessionStatus::Scanned);
    }
    // A retry by the same account emits nothing; another account cannot take over.
    for history in [
        vec![opened(), confirmed()],
        vec![opened(), confirmed(), verified()],
    ] {
        given::<Session>(history.clone())
            .when(ConfirmSession {
                account_id: ACCOUNT,
            })
            .then_nothing();
        given::<Session>(history)
            .when(ConfirmSession {
                account_id: OTHER_ACCOUNT,
            })
            .then_error(SessionError::AccountMismatch);
    }
    given::<Session>([opened(), logged_in()])
        .when(ConfirmSession {
            account_id: ACCOUNT,
        })
        .then_error(wrong("confirm", SessionStatus::LoggedIn));
    given::<Session>([opened(), scanned()])
        .at(t(300))
        .when(ConfirmSession {
            account_id: ACCOUNT,
        })
        .then_error(SessionError::Expired);
}

#[test]
fn a_second_factor_is_verified_only_after_confirmation() {
    given::<Session>([opened(), scanned(), confirmed()])
        .at(t(10))
        .when(verify())
        .then(vec![verified()]);
    given::<Session>([opened(), confirmed(), verified()])
        .when(verify())
        .then_nothing();
    for (history, status) in [
        (vec![opened()], SessionStatus::Pending),
        (vec![opened(), scanned()], SessionStatus::Scanned),
        (
            vec![opened(), confirmed(), verified()],
            SessionStatus::Scanned,
        ),
        (vec![opened(), logged_in()], SessionStatus::LoggedIn),
    ] {
        given::<Session>(history)
            .when(VerifySecondFactor {
                attestation_hash: [0x56; 32],
                ..verify()
            })
            .then_error(wrong("verify a second factor", status));
    }
    given::<Session>([opened(), confirmed()])
        .at(t(300))
        .when(verify())
        .then_error(SessionError::Expired);
}

#[test]
fn log_in_from_any_step_before_login() {
    for history in before_login() {
        let state = given::<Session>(history)
            .at(t(20))
            .when(log_in())
            .then(vec![logged_in()]);
        assert_eq!(state.status(), SessionStatus::LoggedIn);
        assert_eq!(state.ping_deadline(), None);
    }
}

#[test]
fn a_continuous_login_carries_its_first_ping_deadline() {
    let state = given::<Session>([opened_continuous()])
        .at(t(20))
        .when(log_in())
        .then(vec![logged_in_continuous(t(20))]);
    assert_eq!(state.ping_deadline(), Some(t(80)));
    assert_eq!(state.expires_at(), Some(t(300)));
}

#[test]
fn log_in_after_the_deadline_is_expired() {
    given::<Session>([opened(), confirmed()])
        .at(t(299))
        .when(log_in())
        .events();
    given::<Session>([opened(), confirmed()])
        .at(t(300))
        .when(log_in())
        .then_error(SessionError::Expired);
}

#[test]
fn log_in_must_match_the_intended_user_and_the_confirmed_account() {
    let for_user = opened_by(OpenSession {
        user: Some(USER),
        ..open()
    });
    given::<Session>([for_user.clone()])
        .when(LogIn {
            user: OTHER_USER,
            ..log_in()
        })
        .then_error(SessionError::UserMismatch);
    given::<Session>([for_user])
        .when(log_in())
        .then(vec![logged_in()]);
    given::<Session>([opened(), confirmed(), verified()])
        .when(LogIn {
            account_id: OTHER_ACCOUNT,
            ..log_in()
        })
        .then_error(SessionError::AccountMismatch);
}

#[test]
fn log_in_again_emits_nothing_but_cannot_switch_accounts() {
    given::<Session>([opened(), logged_in()])
        .when(log_in())
        .then_nothing();
    given::<Session>([opened(), logged_in()])
        .when(LogIn {
            account_id: OTHER_ACCOUNT,
            ..log_in()
        })
        .then_error(wrong("log in", SessionStatus::LoggedIn));
}

#[test]
fn pings_move_the_deadline() {
    let first = given::<Session>([opened_continuous(), logged_in_continuous(t(20))])
        .at(t(70))
        .when(Ping);
    let state = first.then(vec![SessionEvent::Pinged(SessionPinged {
        pinged_at: t(70),
        ping_deadline: t(130),
    })]);
    assert_eq!(state.ping_deadline(), Some(t(130)));
    // The session's own expiry no longer matters once logged in.
    given::<Session>([
        opened_continuous(),
        logged_in_continuous(t(20)),
        SessionEvent::Pinged(SessionPinged {
            pinged_at: t(290),
            ping_deadline: t(350),
        }),
    ])
    .at(t(349))
    .when(Ping)
    .then(vec![SessionEvent::Pinged(SessionPinged {
        pinged_at: t(349),
        ping_deadline: t(409),
    })]);
}

#[test]
fn ping_rules() {
    given::<Session>([opened_continuous(), logged_in_continuous(t(20))])
        .at(t(80))
        .when(Ping)
        .then_error(SessionError::Expired);
    given::<Session>([opened(), logged_in()])
        .when(Ping)
        .then_error(SessionError::NotContinuous);
    given::<Session>([opened_continuous(), scanned()])
        .when(Ping)
        .then_error(wrong("ping", SessionStatus::Scanned));
    given::<Session>([
        opened_continuous(),
        logged_in_continuous(t(20)),
        logged_out(LogoutReason::User, t(30)),
    ])
    .when(Ping)
    .then_error(SessionError::Ended {
        status: SessionStatus::LoggedOut,
    });
}

#[test]
fn log_out_a_logged_in_session() {
    let state = given::<Session>([opened(), logged_in()])
        .at(t(40))
        .when(LogOut {
            reason: LogoutReason::User,
        })
        .then(vec![logged_out(LogoutReason::User, t(40))]);
    assert_eq!(state.status(), SessionStatus::LoggedOut);
    assert_eq!(state.ping_deadline(), None);
    for (history, _) in ended() {
        given::<Session>(history)
            .when(LogOut {
                reason: LogoutReason::User,
            })
            .then_nothing();
    }
    given::<Session>([opened(), scanned()])
        .when(LogOut {
            reason: LogoutReason::User,
        })
        .then_error(wrong("log out", SessionStatus::Scanned));
}

#[test]
fn log_out_after_a_missed_ping_records_the_missed_ping() {
    given::<Session>([opened_continuous(), logged_in_continuous(t(20))])
        .at(t(90))
        .when(LogOut {
            reason: LogoutReason::User,
        })
        .then(vec![logged_out(LogoutReason::PingMissed, t(90))]);
}

#[test]
fn abort_before_login() {
    for history in before_login() {
        let state = given::<Session>(history)
            .at(t(30))
            .when(Abort {
                by: AbortedBy::User,
            })
            .then(vec![aborted(AbortedBy::User, t(30))]);
        assert_eq!(state.status(), SessionStatus::Aborted);
    }
    given::<Session>([opened(), logged_in()])
        .when(Abort {
            by: AbortedBy::User,
        })
        .then_error(wrong("abort", SessionStatus::LoggedIn));
    for (history, _) in ended() {
        given::<Session>(history)
            .when(Abort {
                by: AbortedBy::User,
            })
            .then_nothing();
    }
    // The deadline came first.
    given::<Session>([opened(), scanned()])
        .at(t(301))
        .when(Abort {
            by: AbortedBy::User,
        })
        .then(vec![expired(t(301))]);
}

#[test]
fn fail_before_login() {
    for history in before_login() {
        let state = given::<Session>(history)
            .at(t(20))
            .when(Fail {
                reason: SessionFailure::BadSignature,
            })
            .then(vec![failed(t(20))]);
        assert_eq!(state.status(), SessionStatus::Failed);
    }
    given::<Session>([opened(), logged_in()])
        .when(Fail {
            reason: SessionFailure::BadSignature,
        })
        .then_error(wrong("fail", SessionStatus::LoggedIn));
    for (history, _) in ended() {
        given::<Session>(history)
            .when(Fail {
                reason: SessionFailure::BadSignature,
            })
            .then_nothing();
    }
    given::<Session>([opened(), confirmed()])
        .at(t(300))
        .when(Fail {
            reason: SessionFailure::BadSignature,
        })
        .then(vec![expired(t(300))]);
}

#[test]
fn end_by_server_logs_out_or_aborts() {
    given::<Session>([opened(), logged_in()])
        .at(t(50))
        .when(EndByServer)
        .then(vec![logged_out(LogoutReason::Server, t(50))]);
    for history in before_login() {
        given::<Session>(history)
            .at(t(50))
            .when(EndByServer)
            .then(vec![aborted(AbortedBy::Server, t(50))]);
    }
    for (history, _) in ended() {
        given::<Session>(history)
            .at(t(50))
            .when(EndByServer)
            .then_nothing();
    }
    given::<Session>([opened()])
        .at(t(400))
        .when(EndByServer)
        .then(vec![expired(t(400))]);
    given::<Session>([opened_continuous(), logged_in_continuous(t(20))])
        .at(t(81))
        .when(EndByServer)
        .then(vec![logged_out(LogoutReason::PingMissed, t(81))]);
}

#[test]
fn expire_records_only_a_passed_deadline() {
    for history in before_login() {
        given::<Session>(history.clone())
            .at(t(299))
            .when(Expire)
            .then_nothing();
        let state = given::<Session>(history)
            .at(t(300))
            .when(Expire)
            .then(vec![expired(t(300))]);
        assert_eq!(state.status(), SessionStatus::Expired);
    }
    // A one-shot login never expires; a continuous one does when a ping is missed.
    given::<Session>([opened(), logged_in()])
        .at(t(86_400))
        .when(Expire)
        .then_nothing();
    given::<Session>([opened_continuous(), logged_in_continuous(t(20))])
        .at(t(79))
        .when(Expire)
        .then_nothing();
    let state = given::<Session>([opened_continuous(), logged_in_continuous(t(20))])
        .at(t(80))
        .when(Expire)
        .then(vec![logged_out(LogoutReason::PingMissed, t(80))]);
    assert_eq!(state.status(), SessionStatus::LoggedOut);
    for (history, _) in ended() {
        given::<Session>(history)
            .at(t(86_400))
            .when(Expire)
            .then_nothing();
    }
}

#[test]
fn steps_of_an_ended_session_are_gone() {
    let steps: Vec<SessionCommand> = vec![
        ScanSession.into(),
        ConfirmSession {
            account_id: ACCOUNT,
        }
        .into(),
        verify().into(),
        log_in().into(),
        Ping.into(),
    ];
    for (history, status) in ended() {
        for cmd in steps.clone() {
            given::<Session>(history.clone())
                .when(cmd)
                .then_error(SessionError::Ended { status });
        }
    }
}

#[test]
fn commands_on_a_session_never_opened_are_not_found() {
    let commands: Vec<SessionCommand> = vec![
        ScanSession.into(),
        ConfirmSession {
            account_id: ACCOUNT,
        }
        .into(),
        verify().into(),
        log_in().into(),
        Ping.into(),
        LogOut {
            reason: LogoutReason::User,
        }
        .into(),
        Abort {
            by: AbortedBy::User,
        }
        .into(),
        EndByServer.into(),
        Expire.into(),
        Fail {
            reason: SessionFailure::BadAttestation,
        }
        .into(),
    ];
    for cmd in commands {
        given_nothing::<Session>()
            .when(cmd)
            .then_error(SessionError::NotFound);
    }
    let never = Session::default();
    assert_eq!(never.status(), SessionStatus::NotOpened);
    assert_eq!(never.expires_at(), None);
    assert_eq!(never.ping_deadline(), None);
}

#[test]
fn status_names_are_snake_case() {
    let all = [
        (SessionStatus::NotOpened, "not_opened"),
        (SessionStatus::Pending, "pending"),
        (SessionStatus::Scanned, "scanned"),
        (SessionStatus::LoggedIn, "logged_in"),
        (SessionStatus::LoggedOut, "logged_out"),
        (SessionStatus::Aborted, "aborted"),
        (SessionStatus::Expired, "expired"),
        (SessionStatus::Failed, "failed"),
    ];
    for (status, name) in all {
        assert_eq!(status.as_str(), name);
        assert_eq!(status.to_string(), name);
        assert_eq!(
            status.is_ended(),
            ["logged_out", "aborted", "expired", "failed"].contains(&name)
        );
    }
}

#[test]
fn errors_classify_for_http() {
    assert_eq!(
        invalid(ValidationError::ControlCharacter { field: "x" }).kind(),
        ErrorKind::Invalid
    );
    for conflict in [
        SessionError::AlreadyExists,
        wrong("ping", SessionStatus::Pending),
        SessionError::NotContinuous,
        SessionError::UserMismatch,
        SessionError::AccountMismatch,
    ] {
        assert_eq!(conflict.kind(), ErrorKind::Conflict, "{conflict}");
    }
    assert_eq!(SessionError::NotFound.kind(), ErrorKind::NotFound);
    assert_eq!(SessionError::Expired.kind(), ErrorKind::Gone);
    let ended = SessionError::Ended {
        status: SessionStatus::Aborted,
    };
    assert_eq!(ended.kind(), ErrorKind::Gone);
    assert_eq!(ended.to_string(), "session has ended (aborted)");
    assert_eq!(
        wrong("log out", SessionStatus::Scanned).to_string(),
        "log out is not possible while the session is scanned"
    );
}

#[test]
fn apply_ignores_events_that_cannot_follow() {
    let mut s = Session::default();
    s.apply(&logged_in());
    s.apply(&scanned());
    assert_eq!(s, Session::NotOpened);
    let mut s = Session::from_events(&[opened(), logged_in()]);
    s.apply(&opened_continuous());
    s.apply(&aborted(AbortedBy::User, t(1)));
    s.apply(&confirmed());
    assert_eq!(s, Session::from_events(&[opened(), logged_in()]));
}

/// A continuous login from QR code to missed ping, as a reviewer reads it. Steps that change
/// nothing (a second scan, an early `Expire`, a DELETE after the end) leave no event.
#[test]
fn lifecycle_snapshot() {
    const NAME: &str = "session_lifecycle";
    let mut events = Vec::new();
    let mut run = |at: Timestamp, cmd: SessionCommand| {
        let new = given::<Session>(events.clone()).at(at).when(cmd).events();
        events.extend(new);
    };
    run(
        t(0),
        OpenSession {
            user: Some(USER),
            session_info: Some("Signed in to Acme Bank\nfrom Berlin".into()),
            ..open_continuous()
        }
        .into(),
    );
    run(t(4), ScanSession.into());
    run(t(5), ScanSession.into());
    run(
        t(9),
        ConfirmSession {
            account_id: ACCOUNT,
        }
        .into(),
    );
    run(
        t(15),
        VerifySecondFactor {
            verified_at: t(14),
            ..verify()
        }
        .into(),
    );
    run(t(16), log_in().into());
    run(t(60), Ping.into());
    run(t(100), Expire.into());
    run(t(121), Expire.into());
    run(t(130), EndByServer.into());
    let rendered: Vec<_> = events.iter().map(crate::testing::render).collect();
    assert!(events.iter().all(|e| e.schema_version() == 1));
    insta::with_settings!({ snapshot_path => "../snapshots", prepend_module_to_snapshot => false }, {
        insta::assert_yaml_snapshot!(NAME, rendered);
    });
}

fn open_push(accounts: Vec<AccountId>) -> OpenPushSession {
    OpenPushSession {
        open: OpenSession {
            user: Some(USER),
            ..open()
        },
        push_to: accounts,
    }
}

fn provoke() -> ProvokeSession {
    ProvokeSession {
        timeout_secs: 120,
        announce_info: Some("Log in again?".into()),
        session_info: None,
    }
}

fn provoked(at: Timestamp) -> SessionEvent {
    SessionEvent::Provoked(SessionProvoked {
        account_id: ACCOUNT,
        user: USER,
        timeout_secs: 120,
        expires_at: at.plus_secs(120),
        announce_info: Some("Log in again?".into()),
        session_info: None,
        provoked_at: at,
    })
}

#[test]
fn a_push_session_lets_only_the_accounts_it_asked_log_in() {
    let events = given_nothing::<Session>()
        .when(open_push(vec![OTHER_ACCOUNT, ACCOUNT, ACCOUNT]))
        .events();
    let [SessionEvent::Opened(e)] = events.as_slice() else {
        panic!("{events:?}")
    };
    // Sorted and without duplicates: a retried provoke compares equal.
    assert_eq!(e.push_to, vec![ACCOUNT, OTHER_ACCOUNT]);
    let opened = events[0].clone();
    given::<Session>([opened.clone()])
        .when(open_push(vec![ACCOUNT, OTHER_ACCOUNT]))
        .then_nothing();
    given::<Session>([opened.clone()])
        .when(open_push(vec![ACCOUNT]))
        .then_error(SessionError::AlreadyExists);
    let stranger = AccountId::from_bytes([0x99; 16]);
    given::<Session>([opened.clone()])
        .when(LogIn {
            account_id: stranger,
            user: USER,
        })
        .then_error(SessionError::AccountMismatch);
    given::<Session>([opened.clone()])
        .when(ConfirmSession {
            account_id: stranger,
        })
        .then_error(SessionError::AccountMismatch);
    given::<Session>([opened])
        .when(LogIn {
            account_id: OTHER_ACCOUNT,
            user: USER,
        })
        .then(vec![SessionEvent::LoggedIn(SessionLoggedIn {
            account_id: OTHER_ACCOUNT,
            user: USER,
            continuous: false,
            ping_deadline: None,
        })]);
}

#[test]
fn a_push_session_names_its_user_and_one_to_sixteen_accounts() {
    given_nothing::<Session>()
        .when(open_push(Vec::new()))
        .then_error(invalid(ValidationError::OutOfRange {
            field: "push_to",
            min: 1,
            max: 16,
            actual: 0,
        }));
    let many = (0..17u8).map(|i| AccountId::from_bytes([i; 16])).collect();
    given_nothing::<Session>()
        .when(open_push(many))
        .then_error(invalid(ValidationError::OutOfRange {
            field: "push_to",
            min: 1,
            max: 16,
            actual: 17,
        }));
    given_nothing::<Session>()
        .when(OpenPushSession {
            open: open(),
            push_to: vec![ACCOUNT],
        })
        .then_error(invalid(ValidationError::Empty { field: "user" }));
}

#[test]
fn provoke_asks_the_last_account_again_after_a_logout_or_a_one_shot_login() {
    let out = vec![
        opened_continuous(),
        logged_in_continuous(t(10)),
        logged_out(LogoutReason::PingMissed, t(70)),
    ];
    let state = given::<Session>(out.clone())
        .at(t(100))
        .when(provoke())
        .then(vec![provoked(t(100))]);
    assert_eq!(state.status(), SessionStatus::Pending);
    assert_eq!(state.expires_at(), Some(t(220)));
    let reopened = state.opened().unwrap();
    assert_eq!(reopened.push_to, vec![ACCOUNT]);
    assert_eq!(reopened.user, Some(USER));
    assert_eq!(reopened.ping_time_secs, 60, "the session stays continuous");
    // Only that account may log in; it does, and the session is continuous again.
    let mut history = out;
    history.push(provoked(t(100)));
    given::<Session>(history.clone())
        .at(t(110))
        .when(LogIn {
            account_id: OTHER_ACCOUNT,
            user: USER,
        })
        .then_error(SessionError::AccountMismatch);
    given::<Session>(history.clone())
        .at(t(110))
        .when(log_in())
        .then(vec![logged_in_continuous(t(110))]);
    // A provoke that is not answered expires, and an expired one is not asked again.
    history.push(expired(t(220)));
    given::<Session>(history)
        .at(t(230))
        .when(provoke())
        .then_error(SessionError::Ended {
            status: SessionStatus::Expired,
        });
    // One-shot logins may be provoked while logged in (they never log out).
    given::<Session>([opened(), logged_in()])
        .at(t(100))
        .when(provoke())
        .then(vec![provoked(t(100))]);
}

#[test]
fn provoke_is_refused_without_a_login_while_one_is_on_and_after_a_decline() {
    given_nothing::<Session>()
        .when(provoke())
        .then_error(SessionError::NotFound);
    given::<Session>([opened()])
        .when(provoke())
        .then_error(SessionError::NotProvokable);
    given::<Session>([opened(), scanned()])
        .when(provoke())
        .then_error(wrong("provoke", SessionStatus::Scanned));
    given::<Session>([opened_continuous(), logged_in_continuous(t(10))])
        .at(t(20))
        .when(provoke())
        .then_error(wrong("provoke", SessionStatus::LoggedIn));
    // Declined: the user said no to the push; it is not asked again.
    given::<Session>([
        opened(),
        logged_in(),
        provoked(t(100)),
        aborted(AbortedBy::User, t(110)),
    ])
    .at(t(120))
    .when(provoke())
    .then_error(SessionError::Ended {
        status: SessionStatus::Aborted,
    });
    given::<Session>([opened(), logged_in()])
        .when(ProvokeSession {
            timeout_secs: 5,
            ..provoke()
        })
        .then_error(invalid(ValidationError::OutOfRange {
            field: "timeout_secs",
            min: MIN_TIMEOUT_SECS,
            max: MAX_TIMEOUT_SECS,
            actual: 5,
        }));
}

/// An AppLogin for [`USER`], pinging every 60 s.
fn open_app_login() -> OpenSession {
    OpenSession {
        app_login: true,
        user: Some(USER),
        announce_info: None,
        ..open_continuous()
    }
}

#[test]
fn an_app_login_logs_in_only_after_a_second_factor_proven_on_it() {
    let no_factor = SessionError::WrongState {
        command: "an AppLogin's log in without a second factor",
        status: SessionStatus::Scanned,
    };
    given::<Session>([opened_by(open_app_login()), confirmed()])
        .at(t(20))
        .when(log_in())
        .then_error(no_factor);
    given::<Session>([opened_by(open_app_login())])
        .at(t(20))
        .when(log_in())
        .then_error(SessionError::WrongState {
            command: "an AppLogin's log in without a second factor",
            status: SessionStatus::Pending,
        });
    // A factor reused under the server's window does not stand in.
    given::<Session>([opened_by(open_app_login()), confirmed()])
        .at(t(20))
        .when(VerifySecondFactor {
            reused: true,
            ..verify()
        })
        .then_error(SessionError::WrongState {
            command: "an AppLogin's reuse of a second factor",
            status: SessionStatus::Scanned,
        });
    given::<Session>([opened_by(open_app_login()), confirmed(), verified()])
        .at(t(20))
        .when(log_in())
        .then(vec![logged_in_continuous(t(20))]);
}

#[test]
fn an_app_login_opens_confirmed_for_its_account_in_one_decision() {
    let open = || OpenAppLogin {
        open: open_app_login(),
        account_id: ACCOUNT,
    };
    given_nothing::<Session>()
        .when(open())
        .then(vec![opened_by(open_app_login()), confirmed()]);
    // A retry of the same command decides nothing new; another account is refused.
    given::<Session>([opened_by(open_app_login()), confirmed()])
        .at(t(5))
        .when(open())
        .then(vec![]);
    given::<Session>([opened_by(open_app_login()), confirmed()])
        .at(t(5))
        .when(OpenAppLogin {
            account_id: OTHER_ACCOUNT,
            ..open()
        })
        .then_error(SessionError::AccountMismatch);
    given_nothing::<Session>()
        .when(OpenAppLogin {
            open: OpenSession {
                user: None,
                ..open_app_login()
            },
            ..open()
        })
        .then_error(SessionError::Invalid(ValidationError::Empty {
            field: "user",
        }));
}

#[test]
fn status_at_takes_a_passed_deadline_as_recorded() {
    // A continuous login whose ping is due at t(70): logged in until then, out after.
    let login = Session::from_events(&[
        opened_continuous(),
        scanned(),
        confirmed(),
        logged_in_continuous(t(10)),
    ]);
    assert_eq!(login.status_at(t(69)), SessionStatus::LoggedIn);
    assert_eq!(login.status(), SessionStatus::LoggedIn);
    assert_ne!(login.status_at(t(10_000)), SessionStatus::LoggedIn);
    // A login not completed by its expiry (t(300)) expired.
    let waiting = Session::from_events(&[opened()]);
    assert_eq!(waiting.status_at(t(299)), SessionStatus::Pending);
    assert_eq!(waiting.status_at(t(301)), SessionStatus::Expired);
}
