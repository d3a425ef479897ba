//! tokio side of forward (filled in by the tunnel work).
pub mod relay;
