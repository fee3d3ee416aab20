//! The wire and evidence formats (in progress).
