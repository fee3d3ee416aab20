//! Reading stored rows back into domain types, the same way on both backends: queries select
//! a fixed column list and [`Get`] reads columns by index. A value that does not fit its type
//! (an id of the wrong length, a negative position) is [`ProjectionError::Damaged`].

use countersign_domain::{
    AccountId, ApiKeyId, AppInstanceId, EnrolmentId, Hsid, Sealed, ServerId, Timestamp,
    TransactionId, UserDigest,
};
use sqlx::Row as _;
use sqlx::postgres::PgRow;
use sqlx::sqlite::SqliteRow;

use super::ProjectionError;

/// A log position as the tables store it.
pub(crate) fn db_position(position: u64) -> Result<i64, ProjectionError> {
    i64::try_from(position)
        .map_err(|_| ProjectionError::Damaged(format!("position {position} is out of range")))
}

/// Personal data as stored: the CBOR of the sealed value, exactly as the event carried it.
pub(crate) fn sealed_bytes(sealed: &Sealed) -> Result<Vec<u8>, ProjectionError> {
    countersign_domain::cbor::to_canonical_vec(sealed)
        .map_err(|e| ProjectionError::Damaged(format!("a sealed value does not encode: {e}")))
}

/// The fixed-length ids, rebuilt from stored bytes.
pub(crate) trait FromBytes: Sized {
    fn from_slice(bytes: &[u8]) -> Option<Self>;
}

macro_rules! from_bytes {
    ($($id:ty),+) => {
        $(impl FromBytes for $id {
            fn from_slice(bytes: &[u8]) -> Option<Self> {
                bytes.try_into().ok().map(<$id>::from_bytes)
            }
        })+
    };
}
from_bytes!(
    ServerId,
    ApiKeyId,
    AccountId,
    EnrolmentId,
    AppInstanceId,
    UserDigest,
    Hsid,
    TransactionId
);

impl FromBytes for [u8; 32] {
    fn from_slice(bytes: &[u8]) -> Option<Self> {
        bytes.try_into().ok()
    }
}

fn damaged(column: usize, what: &str) -> ProjectionError {
    ProjectionError::Damaged(format!("column {column} does not hold {what}"))
}

/// Typed column access by index, for both backends' rows.
pub(crate) trait Get {
    fn bytes(&self, i: usize) -> Result<Vec<u8>, ProjectionError>;
    fn opt_bytes(&self, i: usize) -> Result<Option<Vec<u8>>, ProjectionError>;
    fn int(&self, i: usize) -> Result<i64, ProjectionError>;
    fn opt_int(&self, i: usize) -> Result<Option<i64>, ProjectionError>;
    fn text(&self, i: usize) -> Result<String, ProjectionError>;
    fn opt_text(&self, i: usize) -> Result<Option<String>, ProjectionError>;
    fn boolean(&self, i: usize) -> Result<bool, ProjectionError>;

    fn id<T: FromBytes>(&self, i: usize) -> Result<T, ProjectionError> {
        T::from_slice(&self.bytes(i)?).ok_or_else(|| damaged(i, "an id"))
    }

    fn opt_id<T: FromBytes>(&self, i: usize) -> Result<Option<T>, ProjectionError> {
        self.opt_bytes(i)?
            .map(|b| T::from_slice(&b).ok_or_else(|| damaged(i, "an id")))
            .transpose()
    }

    fn position(&self, i: usize) -> Result<u64, ProjectionError> {
        u64::try_from(self.int(i)?).map_err(|_| damaged(i, "a position"))
    }

    fn time(&self, i: usize) -> Result<Timestamp, ProjectionError> {
        self.int(i).map(Timestamp::from_millis)
    }

    fn opt_time(&self, i: usize) -> Result<Option<Timestamp>, ProjectionError> {
        Ok(self.opt_int(i)?.map(Timestamp::from_millis))
    }

    fn sealed(&self, i: usize) -> Result<Sealed, ProjectionError> {
        countersign_domain::cbor::from_slice(&self.bytes(i)?)
            .map_err(|_| damaged(i, "a sealed value"))
    }
}

macro_rules! get_for {
    ($row:ty) => {
        impl Get for $row {
            fn bytes(&self, i: usize) -> Result<Vec<u8>, ProjectionError> {
                Ok(self.try_get(i)?)
            }
            fn opt_bytes(&self, i: usize) -> Result<Option<Vec<u8>>, ProjectionError> {
                Ok(self.try_get(i)?)
            }
            fn int(&self, i: usize) -> Result<i64, ProjectionError> {
                Ok(self.try_get(i)?)
            }
            fn opt_int(&self, i: usize) -> Result<Option<i64>, ProjectionError> {
                Ok(self.try_get(i)?)
            }
            fn text(&self, i: usize) -> Result<String, ProjectionError> {
                Ok(self.try_get(i)?)
            }
            fn opt_text(&self, i: usize) -> Result<Option<String>, ProjectionError> {
                Ok(self.try_get(i)?)
            }
            fn boolean(&self, i: usize) -> Result<bool, ProjectionError> {
                Ok(self.try_get(i)?)
            }
        }
    };
}
get_for!(PgRow);
get_for!(SqliteRow);
