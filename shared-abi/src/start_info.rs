//! Bulkhead's start-info page for PV domains and the domain address-space layout.
