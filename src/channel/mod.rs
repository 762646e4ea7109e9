//! The Direct Line 3.0 channel bot users reach anonymously.

pub mod cors;
