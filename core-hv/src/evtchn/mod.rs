//! Event channels: the 2-level ABI, per-domain port tables and delivery.
