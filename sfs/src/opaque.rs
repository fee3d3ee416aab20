//! The server side of OPAQUE (RFC 9807, `opaque-ke` 3): the cipher suite every countersign app
//! and SFS share, and the three server steps, over the bytes the SFS messages carry.
//!
//! Suite (`docs/second-factor.md`): ristretto255 for the OPRF and the key exchange group,
//! TripleDH with SHA-512, and Argon2id key stretching, which only the client runs (the server
//! never sees the stretching parameters, or anything from which the PIN follows without a
//! guess per OPRF evaluation). The credential identifier is the app instance id, so one OPRF
//! key per app instance follows from the seed in the vault.
//!
//! Nothing here is `Serialize` or prints its contents: the pending login state holds the
//! session's key-exchange secrets, the setup the server's OPRF seed and private key.

use std::fmt;

use opaque_ke::{
    CipherSuite, CredentialFinalization, CredentialRequest, RegistrationRequest,
    RegistrationUpload, ServerLogin, ServerLoginStartParameters, ServerRegistration, ServerSetup,
};
use rand_core::OsRng;
use zeroize::Zeroizing;

/// The OPAQUE cipher suite of countersign: ristretto255 + TripleDH + SHA-512, Argon2id.
#[derive(Debug, Clone, Copy)]
pub struct Suite;

impl CipherSuite for Suite {
    type OprfCs = opaque_ke::Ristretto255;
    type KeGroup = opaque_ke::Ristretto255;
    type KeyExchange = opaque_ke::key_exchange::tripledh::TripleDh;
    type Ksf = argon2::Argon2<'static>;
}

/// An OPAQUE message did not parse, or a login did not verify. Says nothing else: which of
/// the two it was is no business of a log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("OPAQUE message malformed or not verified")]
pub struct OpaqueError;

impl<T> From<opaque_ke::errors::ProtocolError<T>> for OpaqueError {
    fn from(_: opaque_ke::errors::ProtocolError<T>) -> Self {
        Self
    }
}

/// The server's OPAQUE secrets: OPRF seed and key-exchange key pair.
pub struct Setup(ServerSetup<Suite>);

impl fmt::Debug for Setup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Setup(..)")
    }
}

impl Setup {
    /// A fresh setup from the OS generator.
    #[must_use]
    pub fn generate() -> Self {
        Self(ServerSetup::new(&mut OsRng))
    }

    /// The bytes the vault keeps.
    #[must_use]
    pub fn to_bytes(&self) -> Zeroizing<Vec<u8>> {
        Zeroizing::new(self.0.serialize().to_vec())
    }

    /// From the vault's bytes.
    ///
    /// # Errors
    /// [`OpaqueError`] when they are not a setup.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, OpaqueError> {
        Ok(Self(ServerSetup::deserialize(bytes)?))
    }

    /// Registration, server step: answers the `RegistrationResponse` to a
    /// `RegistrationRequest`. Stateless: the upload that follows carries everything.
    ///
    /// # Errors
    /// [`OpaqueError`] for a malformed request.
    pub fn registration_response(
        &self,
        request: &[u8],
        credential_id: &[u8],
    ) -> Result<Vec<u8>, OpaqueError> {
        let request = RegistrationRequest::<Suite>::deserialize(request)?;
        let result = ServerRegistration::<Suite>::start(&self.0, request, credential_id)?;
        Ok(result.message.serialize().to_vec())
    }

    /// Login, first server step: answers the pending login and the `CredentialResponse`.
    ///
    /// # Errors
    /// [`OpaqueError`] for a malformed request or record.
    pub fn login_start(
        &self,
        record: &[u8],
        request: &[u8],
        credential_id: &[u8],
    ) -> Result<(PendingLogin, Vec<u8>), OpaqueError> {
        let record = ServerRegistration::<Suite>::deserialize(record)?;
        let request = CredentialRequest::<Suite>::deserialize(request)?;
        let result = ServerLogin::start(
            &mut OsRng,
            &self.0,
            Some(record),
            request,
            credential_id,
            ServerLoginStartParameters::default(),
        )?;
        Ok((
            PendingLogin(result.state),
            result.message.serialize().to_vec(),
        ))
    }
}

/// The registration record (the "password file") from a `RegistrationUpload`.
///
/// # Errors
/// [`OpaqueError`] for a malformed upload.
pub fn registration_record(upload: &[u8]) -> Result<Vec<u8>, OpaqueError> {
    let upload = RegistrationUpload::<Suite>::deserialize(upload)?;
    Ok(ServerRegistration::<Suite>::finish(upload)
        .serialize()
        .to_vec())
}

/// A login between its two server steps: the key-exchange state. Kept with the connection,
/// never stored, never printed.
pub struct PendingLogin(ServerLogin<Suite>);

impl fmt::Debug for PendingLogin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PendingLogin(..)")
    }
}

impl PendingLogin {
    /// Login, last server step: whether the client's `CredentialFinalization` proves it knew
    /// the PIN.
    ///
    /// # Errors
    /// [`OpaqueError`] for a malformed finalization or a wrong PIN.
    pub fn finish(self, finalization: &[u8]) -> Result<(), OpaqueError> {
        let finalization = CredentialFinalization::<Suite>::deserialize(finalization)?;
        self.0.finish(finalization)?;
        Ok(())
    }
}
