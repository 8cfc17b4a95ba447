//! Xenstore wire protocol (`io/xs_wire.h`): header, message types, ring page.
