//! Given/when/then tests of the grant aggregate.

use super::*;
use crate::ids::{AccountId, Hsid, OidcClientId, ServerId, SessionRef, UserDigest};
use crate::testing::{NOW, given, given_nothing};

const CLIENT: OidcClientId = OidcClientId::from_bytes([1; 16]);
const OTHER_CLIENT: OidcClientId = OidcClientId::from_bytes([2; 16]);
const CODE: [u8; 32] = [3; 32];
const CHALLENGE: [u8; 32] = [4; 32];
const ACCOUNT: AccountId = AccountId::from_bytes([5; 16]);

fn session() -> SessionRef {
    SessionRef::new(ServerId::from_bytes([9; 16]), Hsid::from_bytes([8; 32]))
}

fn code_issued() -> GrantCodeIssued {
    GrantCodeIssued {
        client_id: CLIENT,
        session: session(),
        account_id: ACCOUNT,
        user: UserDigest::from_bytes([6; 16]),
        scope: vec!["openid".into(), "profile".into()],
        redirect_uri: "https://rp.example/cb".into(),
        code_challenge: Some(CHALLENGE),
        nonce: Some("n-0S6_WzA2Mj".into()),
        code_hash: CODE,
        code_expires_at: NOW.plus_secs(CODE_LIFETIME_SECS),
        auth_time: NOW,
        amr: vec!["hwk".into(), "pin".into()],
        acr: "urn:countersign:acr:2".into(),
    }
}

fn tokens(byte: u8, refresh: bool) -> NewTokens {
    NewTokens {
        access_hash: [byte; 32],
        refresh_hash: refresh.then_some([byte + 1; 32]),
        access_expires_at: NOW.plus_secs(ACCESS_TOKEN_LIFETIME_SECS),
    }
}

fn redeem() -> RedeemCode {
    RedeemCode {
        client_id: CLIENT,
        redirect_uri: "https://rp.example/cb".into(),
        verifier_digest: Some(CHALLENGE),
        code_hash: CODE,
        tokens: tokens(10, true),
    }
}

fn issued(t: NewTokens) -> GrantTokensIssued {
    GrantTokensIssued {
        access_hash: t.access_hash,
        refresh_hash: t.refresh_hash,
        access_expires_at: t.access_expires_at,
        issued_at: NOW,
        account_id: ACCOUNT,
        auth_time: NOW,
        amr: vec!["hwk".into(), "pin".into()],
        acr: "urn:countersign:acr:2".into(),
    }
}

fn revoked(reason: RevokeReason) -> GrantEvent {
    GrantEvent::Revoked(GrantRevoked {
        reason,
        revoked_at: NOW,
    })
}

fn ciba_requested() -> GrantCibaRequested {
    GrantCibaRequested {
        client_id: CLIENT,
        session: session(),
        user: UserDigest::from_bytes([6; 16]),
        scope: vec!["openid".into()],
        binding_message: Some("Pay 10 EUR".into()),
        expires_at: NOW.plus_secs(300),
        interval_secs: 5,
        ping: false,
        notification_token: None,
    }
}

fn invalid(reason: InvalidGrantReason) -> GrantError {
    GrantError::InvalidGrant { reason }
}

#[test]
fn a_code_is_issued_once() {
    given_nothing::<Grant>()
        .when(IssueCode {
            code: code_issued(),
        })
        .then(vec![GrantEvent::CodeIssued(code_issued())]);
    // The same issue again (a retry) changes nothing; another under the same id is refused.
    given::<Grant>([GrantEvent::CodeIssued(code_issued())])
        .when(IssueCode {
            code: code_issued(),
        })
        .then(vec![]);
    let mut other = code_issued();
    other.redirect_uri = "https://rp.example/other".into();
    given::<Grant>([GrantEvent::CodeIssued(code_issued())])
        .when(IssueCode { code: other })
        .then_error(GrantError::AlreadyExists);
}

#[test]
fn a_code_needs_the_openid_scope() {
    let mut code = code_issued();
    code.scope = vec!["profile".into()];
    let then = given_nothing::<Grant>().when(IssueCode { code });
    assert!(matches!(then.result, Err(GrantError::Invalid(_))));
}

#[test]
fn redeeming_the_code_issues_tokens_with_the_login_facts() {
    let state = given::<Grant>([GrantEvent::CodeIssued(code_issued())])
        .when(redeem())
        .then(vec![GrantEvent::TokensIssued(issued(tokens(10, true)))]);
    let active = state.active().unwrap();
    assert_eq!(active.access_hash, [10; 32]);
    assert_eq!(active.refresh_hash, Some([11; 32]));
    assert_eq!(active.origin.nonce(), Some("n-0S6_WzA2Mj"));
}

#[test]
fn every_mismatch_is_invalid_grant_and_writes_nothing() {
    let given_code = || given::<Grant>([GrantEvent::CodeIssued(code_issued())]);
    let mut cmd = redeem();
    cmd.client_id = OTHER_CLIENT;
    given_code()
        .when(cmd)
        .then_error(invalid(InvalidGrantReason::WrongClient));
    let mut cmd = redeem();
    cmd.redirect_uri = "https://rp.example/cb/".into();
    given_code()
        .when(cmd)
        .then_error(invalid(InvalidGrantReason::WrongRedirectUri));
    let mut cmd = redeem();
    cmd.verifier_digest = None;
    given_code()
        .when(cmd)
        .then_error(invalid(InvalidGrantReason::WrongVerifier));
    let mut cmd = redeem();
    cmd.verifier_digest = Some([0; 32]);
    given_code()
        .when(cmd)
        .then_error(invalid(InvalidGrantReason::WrongVerifier));
    let mut cmd = redeem();
    cmd.code_hash = [0; 32];
    given_code()
        .when(cmd)
        .then_error(invalid(InvalidGrantReason::WrongSecret));
    // Expired: at the expiry instant exactly, and later.
    given_code()
        .at(NOW.plus_secs(CODE_LIFETIME_SECS))
        .when(redeem())
        .then_error(invalid(InvalidGrantReason::Expired));
    given_nothing::<Grant>()
        .when(redeem())
        .then_error(GrantError::NotFound);
}

#[test]
fn a_verifier_for_a_code_without_challenge_is_refused() {
    let mut code = code_issued();
    code.code_challenge = None;
    let mut cmd = redeem();
    cmd.verifier_digest = Some(CHALLENGE);
    given::<Grant>([GrantEvent::CodeIssued(code.clone())])
        .when(cmd)
        .then_error(invalid(InvalidGrantReason::WrongVerifier));
    let mut cmd = redeem();
    cmd.verifier_digest = None;
    given::<Grant>([GrantEvent::CodeIssued(code)])
        .when(cmd)
        .then(vec![GrantEvent::TokensIssued(issued(tokens(10, true)))]);
}

#[test]
fn a_reused_code_revokes_the_grant() {
    let state = given::<Grant>([
        GrantEvent::CodeIssued(code_issued()),
        GrantEvent::TokensIssued(issued(tokens(10, true))),
    ])
    .when(redeem())
    .then(vec![revoked(RevokeReason::CodeReused)]);
    assert!(state.is_revoked());
    // A wrong code for a redeemed grant revokes nothing: only the code's holder can.
    let mut cmd = redeem();
    cmd.code_hash = [0; 32];
    given::<Grant>([
        GrantEvent::CodeIssued(code_issued()),
        GrantEvent::TokensIssued(issued(tokens(10, true))),
    ])
    .when(cmd)
    .then_error(invalid(InvalidGrantReason::WrongSecret));
    // Once revoked, the code is just invalid.
    given::<Grant>([
        GrantEvent::CodeIssued(code_issued()),
        GrantEvent::TokensIssued(issued(tokens(10, true))),
        revoked(RevokeReason::CodeReused),
    ])
    .when(redeem())
    .then_error(invalid(InvalidGrantReason::Revoked));
}

fn refresh(presented: u8, new: u8) -> Refresh {
    Refresh {
        client_id: CLIENT,
        refresh_hash: [presented; 32],
        new_access_hash: [new; 32],
        new_refresh_hash: [new + 1; 32],
        access_expires_at: NOW.plus_secs(ACCESS_TOKEN_LIFETIME_SECS),
    }
}

fn refreshed(new: u8) -> GrantEvent {
    GrantEvent::Refreshed(GrantRefreshed {
        access_hash: [new; 32],
        refresh_hash: [new + 1; 32],
        access_expires_at: NOW.plus_secs(ACCESS_TOKEN_LIFETIME_SECS),
        refreshed_at: NOW,
    })
}

#[test]
fn refresh_rotates_and_a_spent_refresh_token_revokes() {
    let active = [
        GrantEvent::CodeIssued(code_issued()),
        GrantEvent::TokensIssued(issued(tokens(10, true))),
    ];
    let state = given::<Grant>(active.clone())
        .when(refresh(11, 20))
        .then(vec![refreshed(20)]);
    let a = state.active().unwrap();
    assert_eq!((a.access_hash, a.refresh_hash), ([20; 32], Some([21; 32])));
    assert_eq!(a.spent_refresh, vec![[11; 32]]);
    let rotated = [active[0].clone(), active[1].clone(), refreshed(20)];
    // The new one works, the old one revokes everything.
    given::<Grant>(rotated.clone())
        .when(refresh(21, 30))
        .then(vec![refreshed(30)]);
    given::<Grant>(rotated.clone())
        .when(refresh(11, 30))
        .then(vec![revoked(RevokeReason::RefreshReused)]);
    // An unknown hash, another client, a revoked grant: invalid, nothing written.
    given::<Grant>(rotated.clone())
        .when(refresh(99, 30))
        .then_error(invalid(InvalidGrantReason::WrongSecret));
    let mut other = refresh(21, 30);
    other.client_id = OTHER_CLIENT;
    given::<Grant>(rotated.clone())
        .when(other)
        .then_error(invalid(InvalidGrantReason::WrongClient));
    let mut revoked_grant = rotated.to_vec();
    revoked_grant.push(revoked(RevokeReason::Client));
    given::<Grant>(revoked_grant)
        .when(refresh(21, 30))
        .then_error(invalid(InvalidGrantReason::Revoked));
    // Before any token, and without a refresh token.
    given::<Grant>([GrantEvent::CodeIssued(code_issued())])
        .when(refresh(11, 30))
        .then_error(invalid(InvalidGrantReason::WrongStep));
    given::<Grant>([
        GrantEvent::CodeIssued(code_issued()),
        GrantEvent::TokensIssued(issued(tokens(10, false))),
    ])
    .when(refresh(11, 30))
    .then_error(invalid(InvalidGrantReason::NotRefreshable));
}

#[test]
fn revoking_is_idempotent() {
    let active = vec![
        GrantEvent::CodeIssued(code_issued()),
        GrantEvent::TokensIssued(issued(tokens(10, true))),
    ];
    let state = given::<Grant>(active.clone())
        .when(Revoke {
            reason: RevokeReason::Client,
        })
        .then(vec![revoked(RevokeReason::Client)]);
    assert!(matches!(
        state,
        Grant::Revoked {
            reason: RevokeReason::Client,
            active: Some(_),
            ..
        }
    ));
    let mut done = active;
    done.push(revoked(RevokeReason::Client));
    given::<Grant>(done)
        .when(Revoke {
            reason: RevokeReason::Logout,
        })
        .then(vec![]);
    given_nothing::<Grant>()
        .when(Revoke {
            reason: RevokeReason::Client,
        })
        .then_error(GrantError::NotFound);
    // A code not yet redeemed can be revoked too.
    given::<Grant>([GrantEvent::CodeIssued(code_issued())])
        .when(Revoke {
            reason: RevokeReason::Logout,
        })
        .then(vec![revoked(RevokeReason::Logout)]);
}

fn complete(client: OidcClientId) -> CompleteCiba {
    CompleteCiba {
        client_id: client,
        account_id: ACCOUNT,
        auth_time: NOW,
        amr: vec!["hwk".into(), "pin".into()],
        acr: "urn:countersign:acr:2".into(),
        tokens: tokens(10, true),
    }
}

#[test]
fn a_ciba_request_completes_once_before_it_expires() {
    given_nothing::<Grant>()
        .when(RequestCiba {
            request: ciba_requested(),
        })
        .then(vec![GrantEvent::CibaRequested(ciba_requested())]);
    let pending = || given::<Grant>([GrantEvent::CibaRequested(ciba_requested())]);
    let state = pending()
        .when(complete(CLIENT))
        .then(vec![GrantEvent::TokensIssued(issued(tokens(10, true)))]);
    assert!(matches!(
        state.active().unwrap().origin,
        GrantOrigin::Ciba(_)
    ));
    given::<Grant>([
        GrantEvent::CibaRequested(ciba_requested()),
        GrantEvent::TokensIssued(issued(tokens(10, true))),
    ])
    .when(complete(CLIENT))
    .then_error(invalid(InvalidGrantReason::WrongStep));
    pending()
        .when(complete(OTHER_CLIENT))
        .then_error(invalid(InvalidGrantReason::WrongClient));
    pending()
        .at(NOW.plus_secs(300))
        .when(complete(CLIENT))
        .then_error(GrantError::Expired);
    // A code redemption on a CIBA grant is not a thing.
    pending()
        .when(redeem())
        .then_error(invalid(InvalidGrantReason::WrongStep));
}

#[test]
fn a_binding_message_is_short_text() {
    let mut request = ciba_requested();
    request.binding_message = Some("x".repeat(101));
    let then = given_nothing::<Grant>().when(RequestCiba { request });
    assert!(matches!(then.result, Err(GrantError::Invalid(_))));
}

#[test]
fn digests_compare_by_value() {
    assert!(digest_eq(&[1; 32], &[1; 32]));
    let mut other = [1; 32];
    other[31] = 2;
    assert!(!digest_eq(&[1; 32], &other));
}
