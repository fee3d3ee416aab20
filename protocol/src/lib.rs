//! What crosses the wire and what outlives it, as pure functions: no I/O, no clock, no RNG.
//! Times are inputs, signing takes the key, and every decoder of outside bytes answers with a
//! typed error, never a panic.

pub mod cose;
pub mod merkle;
