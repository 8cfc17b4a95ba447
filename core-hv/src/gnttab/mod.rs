//! Grant tables v1: map, copy, maptrack and their policy checks.
