//! Measurements for `countersign bench sfs`: the numbers are printed by the bench harness,
//! never asserted (a wall-clock bound is not a test).
//!
//! - [`opaque_logins`]: the server's two OPAQUE login steps (credential response, then
//!   finalization check) over client messages made beforehand; the client's work (Argon2id
//!   included) is not timed.
//! - [`attestations`]: sign an attestation and verify it (COSE, kid lookup, claims), on one
//!   thread and on every core, with the bare ES256 sign + verify rate of the same run as the
//!   baseline.

use std::time::{Duration, Instant};

use countersign_protocol::attestation::{
    AttestationClaims, Expected, Factor, attestation_hash, sign_attestation, verify_attestation,
};
use countersign_protocol::cose::{sign_es256, verify_es256};
use countersign_protocol::device::Bytes;
use opaque_ke::{
    ClientLogin, ClientLoginFinishParameters, ClientRegistration,
    ClientRegistrationFinishParameters, CredentialResponse, Identifiers, RegistrationResponse,
};
use rand_core::OsRng;

use crate::opaque::{Setup, Suite, registration_record};

/// What [`opaque_logins`] measured, per second on one thread.
#[derive(Debug, Clone, Copy)]
pub struct OpaqueRates {
    /// Whole server-side logins (both steps).
    pub logins: f64,
    /// The first step alone.
    pub starts: f64,
    /// The second step alone.
    pub finishes: f64,
}

/// What [`attestations`] measured, per second.
#[derive(Debug, Clone, Copy)]
pub struct AttestationRates {
    /// Sign + verify, one thread.
    pub one_thread: f64,
    /// Sign + verify, one thread per core.
    pub all_cores: f64,
    /// How many threads `all_cores` used.
    pub threads: u32,
    /// Bare ES256 sign + verify of a short message, one thread: the baseline.
    pub bare_es256: f64,
}

fn rate(n: u32, elapsed: Duration) -> f64 {
    f64::from(n) / elapsed.as_secs_f64().max(f64::MIN_POSITIVE)
}

fn failed(what: &str) -> String {
    format!("bench: {what} failed")
}

/// Times `n` server-side OPAQUE logins of one registered PIN.
///
/// # Errors
/// When an OPAQUE step fails (it does not, with these inputs).
pub fn opaque_logins(n: u32) -> Result<OpaqueRates, String> {
    let setup = Setup::generate();
    let id = [7u8; 16];
    let pin = b"917364";
    // The client's key stretching is not what is measured: the cheapest Argon2id.
    let argon = argon2::Argon2::new(
        argon2::Algorithm::Argon2id,
        argon2::Version::V0x13,
        argon2::Params::new(64, 1, 1, None).map_err(|_| failed("argon2 parameters"))?,
    );
    let start = ClientRegistration::<Suite>::start(&mut OsRng, pin)
        .map_err(|_| failed("registration start"))?;
    let response = setup
        .registration_response(&start.message.serialize(), &id)
        .map_err(|_| failed("registration response"))?;
    let upload = start
        .state
        .finish(
            &mut OsRng,
            pin,
            RegistrationResponse::deserialize(&response)
                .map_err(|_| failed("registration response"))?,
            ClientRegistrationFinishParameters::new(Identifiers::default(), Some(&argon)),
        )
        .map_err(|_| failed("registration finish"))?;
    let record = registration_record(&upload.message.serialize())
        .map_err(|_| failed("registration record"))?;

    let (mut starts, mut finishes) = (Duration::ZERO, Duration::ZERO);
    for _ in 0..n {
        let client =
            ClientLogin::<Suite>::start(&mut OsRng, pin).map_err(|_| failed("login start"))?;
        let request = client.message.serialize();
        let t = Instant::now();
        let (pending, response) = setup
            .login_start(&record, &request, &id)
            .map_err(|_| failed("login start"))?;
        starts += t.elapsed();
        let finalization = client
            .state
            .finish(
                pin,
                CredentialResponse::deserialize(&response)
                    .map_err(|_| failed("credential response"))?,
                ClientLoginFinishParameters::new(None, Identifiers::default(), Some(&argon)),
            )
            .map_err(|_| failed("login finish"))?
            .message
            .serialize();
        let t = Instant::now();
        pending
            .finish(&finalization)
            .map_err(|_| failed("login finish"))?;
        finishes += t.elapsed();
    }
    Ok(OpaqueRates {
        logins: rate(n, starts + finishes),
        starts: rate(n, starts),
        finishes: rate(n, finishes),
    })
}

/// Times `n` attestations signed and verified, on one thread and on every core, and `n` bare
/// ES256 sign + verify in the same run.
///
/// # Errors
/// When an attestation does not verify (it does, with these inputs).
pub fn attestations(n: u32) -> Result<AttestationRates, String> {
    let key =
        p256::ecdsa::SigningKey::from_slice(&[0x42; 32]).map_err(|_| failed("attestation key"))?;
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
    let round = |i: u32, worker: u8| -> Result<(), String> {
        let mut claims = claims.clone();
        let [a, b, c, d] = i.to_be_bytes();
        claims.attestation_id.0 = [a, b, c, d, worker, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        let cose = sign_attestation(&claims, &key).map_err(|_| failed("sign"))?;
        verify_attestation(&cose, &trusted, &expect).map_err(|_| failed("verify"))?;
        std::hint::black_box(attestation_hash(&cose));
        Ok(())
    };

    let t = Instant::now();
    for i in 0..n {
        round(i, 0)?;
    }
    let one_thread = rate(n, t.elapsed());

    let threads = std::thread::available_parallelism().map_or(2, |c| c.get());
    let threads = u32::try_from(threads).unwrap_or(2).max(1);
    let per_thread = n / threads;
    let t = Instant::now();
    let results: Vec<Result<(), String>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|worker| {
                let round = &round;
                scope.spawn(move || (0..per_thread).try_for_each(|i| round(i, worker as u8 + 1)))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(failed("a worker panicked")))
            })
            .collect()
    });
    let all_cores = rate(per_thread * threads, t.elapsed());
    results.into_iter().collect::<Result<(), _>>()?;

    let t = Instant::now();
    for i in 0..n {
        let message = i.to_be_bytes();
        let signature = sign_es256(&key, &message);
        verify_es256(key.verifying_key(), &message, &signature).map_err(|_| failed("es256"))?;
    }
    let bare_es256 = rate(n, t.elapsed());
    Ok(AttestationRates {
        one_thread,
        all_cores,
        threads,
        bare_es256,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    /// The measurements run (tiny sizes: what is checked is that they work, not their speed).
    #[test]
    fn the_measurements_run() {
        let opaque = super::opaque_logins(3).unwrap();
        assert!(opaque.logins > 0.0 && opaque.starts > 0.0 && opaque.finishes > 0.0);
        let attest = super::attestations(4).unwrap();
        assert!(attest.one_thread > 0.0 && attest.bare_es256 > 0.0 && attest.threads >= 1);
    }
}
