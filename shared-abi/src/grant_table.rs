//! Grant table v1 ABI (`grant_table.h`): entries, flags, sub-op structs, status codes.
