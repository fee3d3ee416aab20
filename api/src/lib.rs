//! The REST API business systems integrate with (placeholder while it is being built).

pub mod qr;
