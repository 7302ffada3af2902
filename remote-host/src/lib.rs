//! remote-host
