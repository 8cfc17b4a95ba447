//! The credit scheduler.
