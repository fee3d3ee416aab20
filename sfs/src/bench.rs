//! Measurements, not tests: run with
//! `cargo test --release -p countersign-sfs -- --ignored --nocapture bench`. One thread each;
//! the numbers are printed, never asserted (a wall-clock bound is not a test).
//!
//! - `bench_opaque_login`: the server's two OPAQUE login steps (credential response, then
//!   finalization check) over pre-made client messages; the client's work is not timed.
//! - `bench_attestation`: sign an attestation and verify it (COSE, kid lookup, claims), with
//!   the bare ES256 sign + verify rate of the same run as the baseline.

use std::time::{Duration, Instant};

use countersign_protocol::attestation::{
    self, AttestationClaims, Expected, Factor, sign_attestation, verify_attestation,
};
use countersign_protocol::cose::{sign_es256, verify_es256};
use countersign_protocol::device::Bytes;
use opaque_ke::{
    ClientLogin, ClientLoginFinishParameters, ClientRegistration,
    ClientRegistrationFinishParameters, CredentialResponse, Identifiers, RegistrationResponse,
};
use rand_core::OsRng;

use crate::opaque::{Setup, Suite, registration_record};
use crate::tests::argon;

fn rate(n: u32, elapsed: Duration) -> f64 {
    f64::from(n) / elapsed.as_secs_f64()
}

#[test]
#[ignore = "a measurement; run in release with --ignored --nocapture"]
fn bench_opaque_login() {
    let setup = Setup::generate();
    let id = [7u8; 16];
    let pin = b"917364";
    let argon = argon();
    let start = ClientRegistration::<Suite>::start(&mut OsRng, pin).unwrap();
    let response = setup
        .registration_response(&start.message.serialize(), &id)
        .unwrap();
    let upload = start
        .state
        .finish(
            &mut OsRng,
            pin,
            RegistrationResponse::deserialize(&response).unwrap(),
            ClientRegistrationFinishParameters::new(Identifiers::default(), Some(&argon)),
        )
        .unwrap();
    let record = registration_record(&upload.message.serialize()).unwrap();

    let n = 2_000u32;
    let (mut starts, mut finishes) = (Duration::ZERO, Duration::ZERO);
    for _ in 0..n {
        let client = ClientLogin::<Suite>::start(&mut OsRng, pin).unwrap();
        let request = client.message.serialize();
        let t = Instant::now();
        let (pending, response) = setup.login_start(&record, &request, &id).unwrap();
        starts += t.elapsed();
        let finalization = client
            .state
            .finish(
                pin,
                CredentialResponse::deserialize(&response).unwrap(),
                ClientLoginFinishParameters::new(None, Identifiers::default(), Some(&argon)),
            )
            .unwrap()
            .message
            .serialize();
        let t = Instant::now();
        pending.finish(&finalization).unwrap();
        finishes += t.elapsed();
    }
    println!(
        "bench opaque server login: {:.0} logins/s (start {:.0}/s, finish {:.0}/s, {n} logins, one thread)",
        rate(n, starts + finishes),
        rate(n, starts),
        rate(n, finishes),
    );
}

#[test]
#[ignore = "a measurement; run in release with --ignored --nocapture"]
fn bench_attestation() {
    let key = p256::ecdsa::SigningKey::from_slice(&[0x42; 32]).unwrap();
    let trusted = [*key.verifying_key()];
    let claims = AttestationClaims {
        app_instance: Bytes([1; 16]),
        factor: Factor::Pin,
        challenge: Bytes([2; 32]),
        account_key_thumbprint: Bytes([3; 32]),
        issued_at_ms: 1_790_000_000_000,
        expires_at_ms: 1_790_000_060_000,
        attestation_id: Bytes([4; 16]),
    };
    let expect = Expected {
        challenge: [2; 32],
        account_key_thumbprint: [3; 32],
        now_ms: 1_790_000_001_000,
    };
    let n = 5_000u32;

    let t = Instant::now();
    for i in 0..n {
        let mut claims = claims.clone();
        claims.attestation_id.0[..4].copy_from_slice(&i.to_be_bytes());
        let cose = sign_attestation(&claims, &key).unwrap();
        verify_attestation(&cose, &trusted, &expect).unwrap();
        std::hint::black_box(attestation::attestation_hash(&cose));
    }
    let attest = t.elapsed();

    let t = Instant::now();
    for i in 0..n {
        let message = i.to_be_bytes();
        let signature = sign_es256(&key, &message);
        verify_es256(key.verifying_key(), &message, &signature).unwrap();
    }
    let bare = t.elapsed();
    // The SFS signs and the NS verifies on every core: the machine's rate, both threads busy.
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get()) as u32;
    let t = Instant::now();
    std::thread::scope(|scope| {
        for worker in 0..threads {
            let (key, claims, trusted, expect) = (&key, &claims, &trusted, &expect);
            scope.spawn(move || {
                for i in 0..n / threads {
                    let mut claims = claims.clone();
                    claims.attestation_id.0[..4].copy_from_slice(&i.to_be_bytes());
                    claims.attestation_id.0[4] = worker as u8;
                    let cose = sign_attestation(&claims, key).unwrap();
                    verify_attestation(&cose, trusted, expect).unwrap();
                }
            });
        }
    });
    let parallel = t.elapsed();
    println!(
        "bench attestation sign+verify: {:.0}/s; bare ES256 sign+verify: {:.0}/s ({n} each, one thread); attestation sign+verify on {threads} threads: {:.0}/s",
        rate(n, attest),
        rate(n, bare),
        rate(n / threads * threads, parallel),
    );
}
