use sha2::{Digest as _, Sha256};

use super::*;
use crate::aggregate::ErrorKind;
use crate::ids::{ServerId, TransactionId};
use crate::testing::{NOW, given, given_nothing};

const SERVER: ServerId = ServerId::from_bytes([0x11; 16]);
const TX: TransactionRef = TransactionRef::new(SERVER, TransactionId::from_bytes([0x22; 16]));
const ACCOUNT: AccountId = AccountId::from_bytes([0x33; 16]);
const OTHER_ACCOUNT: AccountId = AccountId::from_bytes([0x34; 16]);
const USER: UserDigest = UserDigest::from_bytes([0x44; 16]);
const OTHER_USER: UserDigest = UserDigest::from_bytes([0x45; 16]);

fn t(secs: u32) -> Timestamp {
    NOW.plus_secs(secs)
}

fn request() -> TransactionRequest {
    TransactionRequest {
        transaction: TX,
        user: USER,
        account_id: None,
        data: b"{\"amount\":\"120.00\",\"to\":\"NL91ABNA0417164300\"}".to_vec(),
        content_type: "application/json".into(),
        text: "Pay €120.00 to ACME BV\nIBAN NL91 ABNA 0417 1643 00".into(),
        announce_info: Some("Payment to approve".into()),
        timeout_secs: 300,
    }
}

fn created_by(request: TransactionRequest, origin: TransactionOrigin) -> TransactionCreated {
    TransactionCreated {
        transaction: request.transaction,
        user: request.user,
        account_id: request.account_id,
        data_hash: Sha256::digest(&request.data).into(),
        text_hash: Sha256::digest(request.text.as_bytes()).into(),
        data: request.data,
        content_type: request.content_type,
        text: request.text,
        announce_info: request.announce_info,
        created_at: NOW,
        expires_at: t(request.timeout_secs),
        origin,
    }
}

fn created() -> TransactionEvent {
    TransactionEvent::Created(created_by(request(), TransactionOrigin::Api))
}

fn signature(account_id: AccountId, user: UserDigest) -> Signature {
    let r = request();
    Signature {
        account_id,
        user,
        data_hash: Sha256::digest(&r.data).into(),
        text_hash: Sha256::digest(r.text.as_bytes()).into(),
        device_signature: vec![0xd2, 0x84, 1],
        attestation: vec![0xd2, 0x84, 2],
        factor: SecondFactorKind::Pin,
        device_time: t(9),
    }
}

fn signed_at(secs: u32) -> TransactionEvent {
    let r = request();
    TransactionEvent::Signed(TransactionSigned {
        account_id: ACCOUNT,
        data_hash: Sha256::digest(&r.data).into(),
        text_hash: Sha256::digest(r.text.as_bytes()).into(),
        content_type: r.content_type,
        created_at: NOW,
        expires_at: t(300),
        device_signature: vec![0xd2, 0x84, 1],
        attestation: vec![0xd2, 0x84, 2],
        factor: SecondFactorKind::Pin,
        device_time: t(9),
        signed_at: t(secs),
    })
}

fn present() -> PresentTransaction {
    PresentTransaction {
        account_id: ACCOUNT,
        user: USER,
    }
}

fn presented() -> TransactionEvent {
    TransactionEvent::Presented(TransactionPresented {
        account_id: ACCOUNT,
        presented_at: t(5),
    })
}

#[test]
fn create_records_data_text_their_hashes_and_the_deadline() {
    let state = given_nothing::<Transaction>()
        .when(CreateTransaction(request()))
        .then(vec![created()]);
    assert_eq!(state.status(), TransactionStatus::Pending);
    let c = state.created().unwrap();
    assert_eq!(
        c.data_hash,
        <[u8; 32]>::from(Sha256::digest(&request().data))
    );
    assert_eq!(c.expires_at, t(300));
}

#[test]
fn create_again_is_idempotent_but_another_request_conflicts() {
    given::<Transaction>([created()])
        .at(t(10))
        .when(CreateTransaction(request()))
        .then_nothing();
    let other = TransactionRequest {
        text: "Pay €1,200.00 to ACME BV".into(),
        ..request()
    };
    given::<Transaction>([created()])
        .when(CreateTransaction(other))
        .then_error(TransactionError::AlreadyExists);
}

#[test]
fn create_rules() {
    let refuse = |request: TransactionRequest, field: &str| {
        let error = given_nothing::<Transaction>()
            .when(CreateTransaction(request))
            .result
            .unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Invalid, "{field}");
        assert!(error.to_string().contains(field), "{field}: {error}");
    };
    refuse(
        TransactionRequest {
            data: vec![0; MAX_DATA_BYTES + 1],
            ..request()
        },
        "data",
    );
    refuse(
        TransactionRequest {
            text: String::new(),
            ..request()
        },
        "text",
    );
    refuse(
        TransactionRequest {
            text: "x".repeat(MAX_TEXT_BYTES + 1),
            ..request()
        },
        "text",
    );
    refuse(
        TransactionRequest {
            text: "Pay\u{7}".into(),
            ..request()
        },
        "text",
    );
    refuse(
        TransactionRequest {
            content_type: "text/plain; charset=utf-8".into(),
            ..request()
        },
        "content_type",
    );
    refuse(
        TransactionRequest {
            content_type: String::new(),
            ..request()
        },
        "content_type",
    );
    refuse(
        TransactionRequest {
            timeout_secs: 29,
            ..request()
        },
        "timeout_secs",
    );
    refuse(
        TransactionRequest {
            announce_info: Some("a".repeat(ANNOUNCE_MAX_CHARS + 1)),
            ..request()
        },
        "announce_info",
    );
    // The limits themselves are allowed, and so is empty data.
    given_nothing::<Transaction>()
        .when(CreateTransaction(TransactionRequest {
            data: vec![0; MAX_DATA_BYTES],
            text: "é".repeat(MAX_TEXT_BYTES / 2),
            ..request()
        }))
        .events();
    given_nothing::<Transaction>()
        .when(CreateTransaction(TransactionRequest {
            data: Vec::new(),
            ..request()
        }))
        .events();
}

#[test]
fn present_then_sign() {
    given::<Transaction>([created()])
        .at(t(5))
        .when(present())
        .then(vec![presented()]);
    given::<Transaction>([created(), presented()])
        .at(t(6))
        .when(present())
        .then_nothing();
    let state = given::<Transaction>([created(), presented()])
        .at(t(10))
        .when(SignTransaction(signature(ACCOUNT, USER)))
        .then(vec![signed_at(10)]);
    assert_eq!(state.status(), TransactionStatus::Signed);
    // A device retrying the same signature changes nothing.
    given::<Transaction>([created(), signed_at(10)])
        .at(t(11))
        .when(SignTransaction(signature(ACCOUNT, USER)))
        .then_nothing();
}

#[test]
fn signing_without_presenting_is_allowed() {
    given::<Transaction>([created()])
        .at(t(10))
        .when(SignTransaction(signature(ACCOUNT, USER)))
        .then(vec![signed_at(10)]);
}

#[test]
fn only_the_users_accounts_and_only_the_named_account() {
    given::<Transaction>([created()])
        .at(t(10))
        .when(SignTransaction(signature(ACCOUNT, OTHER_USER)))
        .then_error(TransactionError::NotAllowed);
    given::<Transaction>([created()])
        .when(PresentTransaction {
            account_id: ACCOUNT,
            user: OTHER_USER,
        })
        .then_error(TransactionError::NotAllowed);
    let named = TransactionEvent::Created(created_by(
        TransactionRequest {
            account_id: Some(ACCOUNT),
            ..request()
        },
        TransactionOrigin::Api,
    ));
    given::<Transaction>([named.clone()])
        .at(t(10))
        .when(SignTransaction(signature(OTHER_ACCOUNT, USER)))
        .then_error(TransactionError::NotAllowed);
    given::<Transaction>([named])
        .at(t(10))
        .when(RejectTransaction {
            account_id: OTHER_ACCOUNT,
            user: USER,
        })
        .then_error(TransactionError::NotAllowed);
}

#[test]
fn a_signature_over_other_bytes_is_refused() {
    let mut other_data = signature(ACCOUNT, USER);
    other_data.data_hash = [0; 32];
    given::<Transaction>([created()])
        .at(t(10))
        .when(SignTransaction(other_data))
        .then_error(TransactionError::Mismatch("data"));
    let mut other_text = signature(ACCOUNT, USER);
    other_text.text_hash = [0; 32];
    given::<Transaction>([created()])
        .at(t(10))
        .when(SignTransaction(other_text))
        .then_error(TransactionError::Mismatch("text"));
}

#[test]
fn deadline() {
    given::<Transaction>([created()])
        .at(t(300))
        .when(SignTransaction(signature(ACCOUNT, USER)))
        .then_error(TransactionError::Expired);
    given::<Transaction>([created()])
        .at(t(299))
        .when(ExpireTransaction)
        .then_nothing();
    let state = given::<Transaction>([created()])
        .at(t(300))
        .when(ExpireTransaction)
        .then(vec![TransactionEvent::Expired(TransactionExpired {
            expired_at: t(300),
        })]);
    assert_eq!(state.status(), TransactionStatus::Expired);
    given::<Transaction>([created(), signed_at(10)])
        .at(t(400))
        .when(ExpireTransaction)
        .then_nothing();
}

#[test]
fn terminal_states_refuse_everything_else() {
    let rejected = TransactionEvent::Rejected(TransactionRejected {
        account_id: ACCOUNT,
        rejected_at: t(7),
    });
    given::<Transaction>([created()])
        .at(t(7))
        .when(RejectTransaction {
            account_id: ACCOUNT,
            user: USER,
        })
        .then(vec![rejected.clone()]);
    given::<Transaction>([created(), rejected.clone()])
        .at(t(8))
        .when(RejectTransaction {
            account_id: ACCOUNT,
            user: USER,
        })
        .then_nothing();
    given::<Transaction>([created(), rejected])
        .at(t(8))
        .when(SignTransaction(signature(ACCOUNT, USER)))
        .then_error(TransactionError::Ended {
            status: TransactionStatus::Rejected,
        });
    let mut another = signature(ACCOUNT, USER);
    another.device_signature = vec![9];
    given::<Transaction>([created(), signed_at(10)])
        .at(t(11))
        .when(SignTransaction(another))
        .then_error(TransactionError::Ended {
            status: TransactionStatus::Signed,
        });
    given::<Transaction>([created(), signed_at(10)])
        .at(t(11))
        .when(RejectTransaction {
            account_id: ACCOUNT,
            user: USER,
        })
        .then_error(TransactionError::Ended {
            status: TransactionStatus::Signed,
        });
}

#[test]
fn never_created() {
    given_nothing::<Transaction>()
        .when(SignTransaction(signature(ACCOUNT, USER)))
        .then_error(TransactionError::NotFound);
    given_nothing::<Transaction>()
        .when(ExpireTransaction)
        .then_error(TransactionError::NotFound);
}

#[test]
fn the_apps_own_transaction_is_created_and_signed_at_once() {
    let own = TransactionRequest {
        account_id: Some(ACCOUNT),
        ..request()
    };
    let mut signed = signed_at(0);
    if let TransactionEvent::Signed(s) = &mut signed {
        s.created_at = NOW;
    }
    let command = CreateSignedTransaction {
        request: own.clone(),
        signature: signature(ACCOUNT, USER),
    };
    let state = given_nothing::<Transaction>()
        .when(command.clone())
        .then(vec![
            TransactionEvent::Created(created_by(own.clone(), TransactionOrigin::Device)),
            signed,
        ]);
    assert_eq!(state.status(), TransactionStatus::Signed);
    let events = vec![
        TransactionEvent::Created(created_by(own.clone(), TransactionOrigin::Device)),
        signed_at(0),
    ];
    given::<Transaction>(events.clone())
        .when(command)
        .then_nothing();
    // The id taken by another transaction, or the signer not the named account: refused.
    given::<Transaction>([created()])
        .when(CreateSignedTransaction {
            request: own.clone(),
            signature: signature(ACCOUNT, USER),
        })
        .then_error(TransactionError::AlreadyExists);
    given_nothing::<Transaction>()
        .when(CreateSignedTransaction {
            request: own,
            signature: signature(OTHER_ACCOUNT, USER),
        })
        .then_error(TransactionError::NotAllowed);
}
