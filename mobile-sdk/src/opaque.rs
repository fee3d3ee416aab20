//! The client side of OPAQUE (RFC 9807, `opaque-ke` 3) over the bytes the SFS messages carry:
//! registration and login, with the PIN stretched by Argon2id on this device.
//!
//! The cipher suite is the one of `docs/second-factor.md` and of the SFS (`sfs/src/opaque.rs`):
//! ristretto255 for the OPRF and the key-exchange group, TripleDH with SHA-512 (the OPRF
//! suite's hash), Argon2id as key stretching function. The SDK may not depend on the SFS
//! crate, so the suite is restated here type for type; a client and a server on different
//! suites fail every registration, which the end-to-end tests would show at once.
//!
//! Rules: the PIN only ever lives in [`Pin`] (wiped on drop); Argon2id runs on a blocking
//! thread, never on the async runtime; nothing here prints or stores protocol state.

use std::fmt;

use opaque_ke::{
    CipherSuite, ClientLogin, ClientLoginFinishParameters, ClientRegistration,
    ClientRegistrationFinishParameters, CredentialResponse, Identifiers, RegistrationResponse,
};
use rand_core::OsRng;

use crate::error::SdkError;
use crate::second_factor::{Argon2Params, Pin};

/// The OPAQUE cipher suite of countersign: ristretto255 + TripleDH + SHA-512, Argon2id.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Suite;

impl CipherSuite for Suite {
    type OprfCs = opaque_ke::Ristretto255;
    type KeGroup = opaque_ke::Ristretto255;
    type KeyExchange = opaque_ke::key_exchange::tripledh::TripleDh;
    type Ksf = argon2::Argon2<'static>;
}

fn ksf(params: Argon2Params) -> Result<argon2::Argon2<'static>, SdkError> {
    let params = argon2::Params::new(params.m_kib, params.t, params.p, None)
        .map_err(|_| SdkError::InvalidConfig("argon2 parameters out of range"))?;
    Ok(argon2::Argon2::new(
        argon2::Algorithm::Argon2id,
        argon2::Version::V0x13,
        params,
    ))
}

fn opaque_failed(step: &'static str) -> SdkError {
    SdkError::Transport(format!("OPAQUE {step} failed"))
}

/// Runs CPU-bound work (Argon2id) off the async runtime.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, SdkError> + Send + 'static,
) -> Result<T, SdkError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|_| SdkError::Transport("the OPAQUE worker stopped".into()))?
}

/// A registration between its two client steps.
pub(crate) struct Registration(ClientRegistration<Suite>);

impl fmt::Debug for Registration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Registration(..)")
    }
}

/// Registration, first step: answers the state and the `RegistrationRequest` bytes.
pub(crate) fn register_start(pin: &Pin) -> Result<(Registration, Vec<u8>), SdkError> {
    let start = ClientRegistration::<Suite>::start(&mut OsRng, pin.expose())
        .map_err(|_| opaque_failed("registration"))?;
    Ok((
        Registration(start.state),
        start.message.serialize().to_vec(),
    ))
}

/// Registration, last step: answers the `RegistrationUpload` bytes.
pub(crate) async fn register_finish(
    state: Registration,
    pin: &Pin,
    response: Vec<u8>,
    params: Argon2Params,
) -> Result<Vec<u8>, SdkError> {
    let pin = pin.clone();
    blocking(move || {
        let ksf = ksf(params)?;
        let response = RegistrationResponse::<Suite>::deserialize(&response)
            .map_err(|_| opaque_failed("registration response"))?;
        let finish = state
            .0
            .finish(
                &mut OsRng,
                pin.expose(),
                response,
                ClientRegistrationFinishParameters::new(Identifiers::default(), Some(&ksf)),
            )
            .map_err(|_| opaque_failed("registration"))?;
        Ok(finish.message.serialize().to_vec())
    })
    .await
}

/// A login between its two client steps.
pub(crate) struct Login(ClientLogin<Suite>);

impl fmt::Debug for Login {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Login(..)")
    }
}

/// Login, first step: answers the state and the `CredentialRequest` bytes.
pub(crate) fn login_start(pin: &Pin) -> Result<(Login, Vec<u8>), SdkError> {
    let start = ClientLogin::<Suite>::start(&mut OsRng, pin.expose())
        .map_err(|_| opaque_failed("login"))?;
    Ok((Login(start.state), start.message.serialize().to_vec()))
}

/// Login, last step: the `CredentialFinalization` bytes, or `None` when the envelope does not
/// open (a wrong PIN, or a response that is not for this record).
pub(crate) async fn login_finish(
    state: Login,
    pin: &Pin,
    response: Vec<u8>,
    params: Argon2Params,
) -> Result<Option<Vec<u8>>, SdkError> {
    let pin = pin.clone();
    blocking(move || {
        let ksf = ksf(params)?;
        let Ok(response) = CredentialResponse::<Suite>::deserialize(&response) else {
            return Ok(None);
        };
        Ok(state
            .0
            .finish(
                pin.expose(),
                response,
                ClientLoginFinishParameters::new(None, Identifiers::default(), Some(&ksf)),
            )
            .ok()
            .map(|finish| finish.message.serialize().to_vec()))
    })
    .await
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use opaque_ke::{
        CredentialFinalization, CredentialRequest, RegistrationRequest, RegistrationUpload,
        ServerLogin, ServerLoginStartParameters, ServerRegistration, ServerSetup,
    };

    use super::*;

    const SMALL: Argon2Params = Argon2Params {
        m_kib: 64,
        t: 1,
        p: 1,
    };

    /// The server half, as the SFS runs it, to check the client against.
    fn login(setup: &ServerSetup<Suite>, record: &[u8], pin: &str) -> Option<()> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let (state, request) = login_start(&Pin::new(pin)).unwrap();
        let server = ServerLogin::start(
            &mut OsRng,
            setup,
            Some(ServerRegistration::<Suite>::deserialize(record).unwrap()),
            CredentialRequest::deserialize(&request).unwrap(),
            b"app",
            ServerLoginStartParameters::default(),
        )
        .unwrap();
        let finalization = rt
            .block_on(login_finish(
                state,
                &Pin::new(pin),
                server.message.serialize().to_vec(),
                SMALL,
            ))
            .unwrap()?;
        server
            .state
            .finish(CredentialFinalization::deserialize(&finalization).unwrap())
            .ok()
            .map(|_| ())
    }

    #[test]
    fn registers_and_logs_in_against_the_server_half_and_a_wrong_pin_does_not() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let setup = ServerSetup::<Suite>::new(&mut OsRng);
        let pin = Pin::new("482916");
        let (state, request) = register_start(&pin).unwrap();
        let response = ServerRegistration::<Suite>::start(
            &setup,
            RegistrationRequest::deserialize(&request).unwrap(),
            b"app",
        )
        .unwrap();
        let upload = rt
            .block_on(register_finish(
                state,
                &pin,
                response.message.serialize().to_vec(),
                SMALL,
            ))
            .unwrap();
        let record =
            ServerRegistration::<Suite>::finish(RegistrationUpload::deserialize(&upload).unwrap())
                .serialize()
                .to_vec();
        assert_eq!(login(&setup, &record, "482916"), Some(()));
        assert_eq!(login(&setup, &record, "482917"), None);
    }

    #[test]
    fn out_of_range_argon2_parameters_are_a_config_error() {
        let bad = Argon2Params {
            m_kib: 1,
            t: 0,
            p: 0,
        };
        assert!(matches!(ksf(bad), Err(SdkError::InvalidConfig(_))));
    }
}
