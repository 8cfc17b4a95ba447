//! Event channel ABI (`event_channel.h`): sub-op numbers and argument structs.
