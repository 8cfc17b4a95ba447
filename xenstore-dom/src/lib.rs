//! xenstore-dom: the xenstore engine, service domain and host daemon.
#![forbid(unsafe_code)]
