//! Domains: the table of domains and the builder that makes them from ELF images.
