//! (skeleton: being written)

#[allow(unused_imports)]
use crate::state::IdpState;

/// This module's routes.
#[allow(dead_code)]
pub(crate) fn routes() -> axum::Router<IdpState> {
    axum::Router::new()
}
